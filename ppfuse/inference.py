"""Exported detectors on images: preprocessing from ``infer_cfg.yml``, detections, drawing.

The runtime that runs the network (Paddle Inference by default, ONNX Runtime,
OpenVINO) comes from :mod:`ppfuse.runtime`; this module turns images into its
inputs and its ``(bbox, bbox_num)`` into :class:`Detections`. The Paddle
Inference names of earlier versions (``PredictorOptions``,
``create_predictor``, ``run``, ``check_device``) are kept here.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import yaml

from . import runtime as runtimes
from .errors import InferenceError
from .export_format import INFER_CFG, read_report
from .runtime.base import RuntimeOptions
from .runtime.paddle_inference import (UNSAFE_TO_DELETE_WITH_ONEDNN, check_device,  # noqa: F401
                                       create_predictor, run_predictor as run)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")

PredictorOptions = RuntimeOptions  # the name of earlier versions
export_report = read_report


@dataclass
class Preprocess:
    """The ``Preprocess`` of ``infer_cfg.yml``: Resize, NormalizeImage, Permute."""
    target_size: Tuple[int, int]
    keep_ratio: bool = False
    interp: int = 2
    mean: Sequence[float] = (0.0, 0.0, 0.0)
    std: Sequence[float] = (1.0, 1.0, 1.0)
    is_scale: bool = True
    norm_type: str = "none"

    @classmethod
    def from_infer_cfg(cls, model_dir: str) -> "Preprocess":
        path = os.path.join(model_dir, INFER_CFG)
        if not os.path.exists(path):
            raise InferenceError(f"{model_dir}: {INFER_CFG} is missing; export the model again")
        with open(path) as f:
            cfg = yaml.safe_load(f)
        kwargs = {}
        for op in cfg.get("Preprocess", []):
            if op["type"] == "Resize":
                kwargs.update(target_size=tuple(op["target_size"]), keep_ratio=op.get("keep_ratio", False),
                              interp=op.get("interp", 2))
            elif op["type"] == "NormalizeImage":
                kwargs.update(mean=op.get("mean", kwargs.get("mean")), std=op.get("std"),
                              is_scale=op.get("is_scale", True), norm_type=op.get("norm_type", "mean_std"))
        if "target_size" not in kwargs:
            raise InferenceError(f"{path}: no Resize in Preprocess; ppfuse runs fixed-size exports")
        return cls(**kwargs)

    def __call__(self, image_bgr: np.ndarray) -> Dict[str, np.ndarray]:
        import cv2
        rgb = cv2.cvtColor(image_bgr, cv2.COLOR_BGR2RGB)
        h, w = rgb.shape[:2]
        th, tw = self.target_size
        if self.keep_ratio:
            ratio = min(th / h, tw / w)
            sy = sx = ratio
        else:
            sy, sx = th / h, tw / w
        resized = cv2.resize(rgb, None, None, fx=sx, fy=sy, interpolation=self.interp).astype("float32")
        if self.is_scale:
            resized /= 255.0
        if self.norm_type == "mean_std":
            resized = (resized - np.array(self.mean, "float32")) / np.array(self.std, "float32")
        chw = resized.transpose(2, 0, 1)[None]
        return {"image": np.ascontiguousarray(chw), "scale_factor": np.array([[sy, sx]], "float32"),
                "im_shape": np.array([[th, tw]], "float32")}


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
    """ppdet's ``(bbox [K, 6], bbox_num [N])`` as one :class:`Detections` per image."""
    result, start = [], 0
    for n in np.asarray(bbox_num).reshape(-1):
        rows = bbox[start:start + int(n)]
        start += int(n)
        result.append(Detections(rows[:, 2:6], rows[:, 1], rows[:, 0].astype("int64"), list(labels)))
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

    def run(self, image_bgr: np.ndarray) -> List[np.ndarray]:
        """The runtime's outputs for one image, in order."""
        return list(self.runtime.run(self.preprocess(image_bgr)).values())

    def predict(self, image_bgr: np.ndarray) -> Detections:
        outputs = self.run(image_bgr)
        if len(outputs) != 2 or read_report(self.model_dir).get("with_nms") is False:
            raise InferenceError(f"{self.model_dir}: expected (bbox, bbox_num) outputs; export with NMS (no "
                                 "--no_nms) to run on images")
        return split_detections(outputs[0], outputs[1], self.labels)[0]


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
