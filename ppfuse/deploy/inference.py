"""Exported detectors on images: preprocessing from ``infer_cfg.yml``, detections, drawing.

The runtime that runs the network (Paddle Inference by default, ONNX Runtime,
OpenVINO) comes from :mod:`ppfuse.runtime`; this module turns images into its
inputs and its ``(bbox, bbox_num)`` into :class:`Detections`.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import yaml

from ppfuse import runtime as runtimes
from ppfuse.errors import InferenceError
from ppfuse.export_format import INFER_CFG, is_image_only, read_report
from ppfuse.runtime.base import RuntimeOptions

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


@dataclass
class Preprocess:
    """The ``Preprocess`` of ``infer_cfg.yml``, as PaddleDetection's ``deploy/python/infer.py`` applies it:
    ``Resize``, ``LetterBoxResize``, ``NormalizeImage``, ``Pad``, ``PadStride``, ``Permute`` in the file's
    order, giving ``image``, ``im_shape`` (the image's size after resizing, before padding) and
    ``scale_factor``. An op ppfuse does not implement is an error naming it."""
    ops: List[dict]
    size: Optional[Tuple[int, int]] = None  # the export's input size (its report), for WarpAffine

    KNOWN = ("Resize", "LetterBoxResize", "WarpAffine", "NormalizeImage", "Pad", "PadStride", "Permute")

    @classmethod
    def from_infer_cfg(cls, model_dir: str) -> "Preprocess":
        path = os.path.join(model_dir, INFER_CFG)
        if not os.path.exists(path):
            raise InferenceError(f"{model_dir}: {INFER_CFG} is missing; export the model again")
        with open(path) as f:
            cfg = yaml.safe_load(f)
        ops = list(cfg.get("Preprocess") or [])
        for op in ops:
            if op.get("type") not in cls.KNOWN:
                raise InferenceError(f"{path}: Preprocess op {op.get('type')!r} is not implemented by ppfuse "
                                     f"(it runs {', '.join(cls.KNOWN)})")
        if not any(op["type"] in ("Resize", "LetterBoxResize", "WarpAffine") for op in ops):
            raise InferenceError(f"{path}: no Resize in Preprocess; ppfuse runs fixed-size exports")
        size = read_report(model_dir).get("input_size")
        if not size and any(op["type"] == "WarpAffine" for op in ops):
            raise InferenceError(f"{model_dir}: WarpAffine needs the export's input size, which its "
                                 "ppfuse_report.json gives; export the model again with ppfuse")
        return cls(ops, (int(size[0]), int(size[1])) if size else None)

    @property
    def target_size(self) -> Tuple[int, int]:
        if self.size:
            return self.size
        for op in self.ops:
            if op["type"] in ("Resize", "LetterBoxResize"):
                size = op["target_size"]
                return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
        raise InferenceError("no Resize in Preprocess")

    def __call__(self, image_bgr: np.ndarray) -> Dict[str, np.ndarray]:
        import cv2
        im = cv2.cvtColor(image_bgr, cv2.COLOR_BGR2RGB)
        im_shape = np.array(im.shape[:2], "float32")
        scale = np.array([1.0, 1.0], "float32")
        chw = False
        for op in self.ops:
            kind = op["type"]
            if kind == "Resize":
                th, tw = _pair(op["target_size"])
                h, w = im.shape[:2]
                if op.get("keep_ratio", True):
                    ratio = min(th, tw) / min(h, w)
                    if np.round(ratio * max(h, w)) > max(th, tw):
                        ratio = max(th, tw) / max(h, w)
                    sy = sx = ratio
                else:
                    sy, sx = th / h, tw / w
                im = cv2.resize(im, None, None, fx=sx, fy=sy, interpolation=int(op.get("interp", 1)))
                im_shape, scale = np.array(im.shape[:2], "float32"), np.array([sy, sx], "float32")
            elif kind == "LetterBoxResize":
                th, tw = _pair(op["target_size"])
                h, w = im.shape[:2]
                ratio = min(th / h, tw / w)
                nw, nh = round(w * ratio), round(h * ratio)
                pad_w, pad_h = (tw - nw) / 2, (th - nh) / 2
                im = cv2.resize(im, (nw, nh), interpolation=cv2.INTER_AREA)
                im = cv2.copyMakeBorder(im, round(pad_h - 0.1), round(pad_h + 0.1), round(pad_w - 0.1),
                                        round(pad_w + 0.1), cv2.BORDER_CONSTANT, value=(127.5, 127.5, 127.5))
                im_shape, scale = np.array([nh, nw], "float32"), np.array([ratio, ratio], "float32")
            elif kind == "WarpAffine":
                # ppdet's keep_res warp centres the image on a canvas (h|pad)+1 high, (w|pad)+1 wide, in BGR; a
                # fixed-size export takes one size: the image is first fitted into it (keeping its ratio), then
                # centred on a canvas of that size, as CenterNet's post-processing expects ((size - w) / 2)
                if not op.get("keep_res", False):
                    raise InferenceError("WarpAffine with keep_res: false is not implemented by ppfuse")
                th, tw = self.target_size
                h, w = im.shape[:2]
                ratio = min(th / h, tw / w, 1.0) if max(h, w) > 0 else 1.0
                if ratio < 1.0:
                    im = cv2.resize(im, (max(1, round(w * ratio)), max(1, round(h * ratio))))
                h, w = im.shape[:2]
                shift = np.array([[1, 0, tw / 2.0 - w // 2], [0, 1, th / 2.0 - h // 2]], "float32")
                im = cv2.warpAffine(cv2.cvtColor(im, cv2.COLOR_RGB2BGR), shift, (tw, th), flags=cv2.INTER_LINEAR)
                im_shape, scale = np.array([h, w], "float32"), np.array([ratio, ratio], "float32")
            elif kind == "NormalizeImage":
                im = im.astype("float32")
                if op.get("is_scale", True):
                    im = im / 255.0
                if op.get("norm_type", "mean_std") == "mean_std":
                    im = (im - np.array(op["mean"], "float32")) / np.array(op["std"], "float32")
            elif kind == "Pad":
                th, tw = _pair(op["size"])
                h, w = im.shape[:2]
                if (h, w) != (th, tw):
                    canvas = np.empty((th, tw, 3), "float32")
                    canvas[...] = np.array(op.get("fill_value", [114.0, 114.0, 114.0]), "float32")
                    canvas[:h, :w] = im
                    im = canvas
            elif kind == "PadStride":
                stride = int(op.get("stride", 0))
                if stride > 0:
                    layout = im if not chw else im.transpose(1, 2, 0)
                    h, w = layout.shape[:2]
                    ph, pw = int(np.ceil(h / stride) * stride), int(np.ceil(w / stride) * stride)
                    padded = np.zeros((ph, pw, layout.shape[2]), "float32")
                    padded[:h, :w] = layout
                    im = padded if not chw else padded.transpose(2, 0, 1)
            elif kind == "Permute":
                im, chw = im.transpose(2, 0, 1), True
        im = im.astype("float32")
        if not chw:
            im = im.transpose(2, 0, 1)
        return {"image": np.ascontiguousarray(im[None]), "scale_factor": scale[None],
                "im_shape": im_shape[None]}


def _pair(size) -> Tuple[int, int]:
    return (int(size), int(size)) if isinstance(size, (int, float)) else (int(size[0]), int(size[1]))


def read_image(path: str) -> np.ndarray:
    import cv2
    if not os.path.isfile(path):
        raise InferenceError(f"{path}: image not found")
    image = cv2.imread(path, cv2.IMREAD_COLOR)
    if image is None:
        raise InferenceError(f"{path}: not an image OpenCV can read")
    return image


def list_images(path: str) -> List[str]:
    if os.path.isdir(path):
        found = sorted(os.path.join(path, n) for n in os.listdir(path) if n.lower().endswith(IMAGE_EXTENSIONS))
        if not found:
            raise InferenceError(f"{path}: no images ({', '.join(IMAGE_EXTENSIONS)}) in this directory")
        return found
    if not os.path.exists(path):
        raise InferenceError(f"{path}: image not found")
    return [path]


@dataclass
class Detections:
    """Boxes ``[K, 4]`` (x1, y1, x2, y2, original pixels), scores ``[K]``, classes ``[K]``."""
    boxes: np.ndarray
    scores: np.ndarray
    classes: np.ndarray
    labels: List[str] = field(default_factory=list)

    def above(self, threshold: float) -> "Detections":
        keep = self.scores >= threshold
        return Detections(self.boxes[keep], self.scores[keep], self.classes[keep], self.labels)

    def clipped(self, height: int, width: int) -> "Detections":
        """Boxes clipped to the image, boxes left empty dropped -- what PaddleDetection's
        post-processing does (``BBoxPostProcess.get_pred``) before its visualization
        (PP-YOLOE's program leaves boxes unclipped)."""
        boxes = np.clip(self.boxes, 0, [width, height, width, height]).astype(self.boxes.dtype)
        keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        return Detections(boxes[keep], self.scores[keep], self.classes[keep], self.labels)

    def to_list(self) -> List[dict]:
        return [{"class_id": int(c), "label": self.labels[int(c)] if int(c) < len(self.labels) else str(int(c)),
                 "score": float(s), "box": [float(v) for v in b]}
                for b, s, c in zip(self.boxes, self.scores, self.classes)]


def split_detections(bbox: np.ndarray, bbox_num: np.ndarray, labels: Sequence[str] = ()) -> List[Detections]:
    """ppdet's ``(bbox [K, 6], bbox_num [N])`` as one :class:`Detections` per image. Rotated detectors
    (PP-YOLOE-R) give ``[K, 10]`` rows, a quadrilateral's four corners: their boxes are its bounding boxes."""
    result, start = [], 0
    for n in np.asarray(bbox_num).reshape(-1):
        rows = bbox[start:start + int(n)]
        start += int(n)
        if rows.shape[1] == 10:
            corners = rows[:, 2:10].reshape(-1, 4, 2)
            boxes = np.concatenate([corners.min(axis=1), corners.max(axis=1)], axis=1)
        else:
            boxes = rows[:, 2:6]
        result.append(Detections(boxes, rows[:, 1], rows[:, 0].astype("int64"), list(labels)))
    return result


class Detector:
    """An exported directory in one runtime (:mod:`ppfuse.runtime`), ready to run on images.

    ``random_weights`` is true for an export of random weights (its report says
    so): its detections are meaningless.
    """

    def __init__(self, model_dir: str, options: Optional[RuntimeOptions] = None, runtime: str = "paddle"):
        self.model_dir = model_dir
        self.options = options or RuntimeOptions()
        self.runtime = runtimes.load(model_dir, runtime, self.options)
        self.preprocess = Preprocess.from_infer_cfg(model_dir)
        with open(os.path.join(model_dir, INFER_CFG)) as f:
            cfg = yaml.safe_load(f)
        self.labels = cfg.get("label_list", [])
        self.draw_threshold = float(cfg.get("draw_threshold", 0.5))
        report = read_report(model_dir)
        # exports before "random_weights" existed say it by weights_form
        self.random_weights = bool(report.get("random_weights", report.get("weights_form") == "random"))
        # the plain graph (--image_only) gives boxes in input pixels: predict() maps them to the image
        self.image_only = is_image_only(model_dir)

    def run(self, image_bgr: np.ndarray) -> List[np.ndarray]:
        """The runtime's outputs for one image, in order."""
        return list(self.runtime.run(self.preprocess(image_bgr)).values())

    def predict(self, image_bgr: np.ndarray) -> Detections:
        return self.detections(self.preprocess(image_bgr))[0]

    def detections(self, feeds: Dict[str, np.ndarray]) -> List[Detections]:
        """The runtime's detections for preprocessed ``feeds`` (a batch of one or more images), one
        :class:`Detections` per image, boxes in pixels of the original images."""
        outputs = list(self.runtime.run(feeds).values())
        if len(outputs) != 2 or read_report(self.model_dir).get("with_nms") is False:
            raise InferenceError(f"{self.model_dir}: expected (bbox, bbox_num) outputs; export with NMS (no "
                                 "--no_nms) to run on images")
        found = split_detections(outputs[0], outputs[1], self.labels)
        if self.image_only:  # input pixels -> image pixels: the plain graph's scale factors are 1
            scales = np.asarray(feeds["scale_factor"], "float32").reshape(len(found), -1)
            for detections, (scale_y, scale_x) in zip(found, scales[:, :2]):
                detections.boxes = (detections.boxes / np.array([scale_x, scale_y, scale_x, scale_y], "float32")
                                    ).astype(detections.boxes.dtype)
        return found


def draw(image_bgr: np.ndarray, detections: Detections) -> np.ndarray:
    """A copy of the image with boxes, labels and scores drawn."""
    import cv2
    out = image_bgr.copy()
    for det in detections.to_list():
        x1, y1, x2, y2 = (int(round(v)) for v in det["box"])
        colour = tuple(int(c) for c in np.random.RandomState(det["class_id"]).randint(64, 255, 3))
        cv2.rectangle(out, (x1, y1), (x2, y2), colour, 2)
        cv2.putText(out, f"{det['label']} {det['score']:.2f}", (x1, max(y1 - 4, 10)), cv2.FONT_HERSHEY_SIMPLEX,
                    0.5, colour, 1, cv2.LINE_AA)
    return out
