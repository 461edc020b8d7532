"""Paddle Inference for exported detectors: predictor settings, preprocessing, detections.

Default settings on CPU are the fastest measured to give the same detections
on every run: oneDNN on with all of Paddle Inference's passes (oneDNN off was
3-4x slower on PP-YOLOE+ s and l). ``PredictorOptions`` lets a user change each of
them.

Not a default, though once measured as a lever: oneDNN with
``constant_folding_pass`` deleted. On Paddle 3.3.1 a predictor built so runs a
conv with bias followed by an activation right the first time and wrong on
every later run (NaN boxes and scores on PP-YOLOE, so no detections); its
apparent speed-up came from NMS having nothing left to do. Deleting that pass
with oneDNN on is allowed but warned about.
"""
from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import paddle
import yaml

from .errors import InferenceError
from .export import MODEL_FILE, REPORT_FILE, program_file, require_paddle_3

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


@dataclass
class PredictorOptions:
    """How to run: ``device`` cpu|gpu, ``precision`` fp32|fp16, TensorRT, CPU threads, oneDNN, passes."""
    device: str = "cpu"
    precision: str = "fp32"
    tensorrt: bool = False
    cpu_threads: int = 2
    onednn: bool = True
    delete_passes: Sequence[str] = ()
    gpu_memory_mb: int = 500
    gpu_id: int = 0


def export_report(model_dir: str) -> dict:
    """The ``ppfuse_report.json`` of an export, or ``{}`` for a directory ppfuse did not write."""
    path = os.path.join(model_dir, REPORT_FILE)
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f)


# passes that, deleted with oneDNN on, make Paddle 3.3.1 give wrong outputs after the first run
UNSAFE_TO_DELETE_WITH_ONEDNN = ("constant_folding_pass",)


def check_device(options: PredictorOptions) -> None:
    """Raise one clear :class:`InferenceError` for a device/precision this build cannot run."""
    if options.device not in ("cpu", "gpu"):
        raise InferenceError(f"--device {options.device}: use cpu or gpu")
    if options.precision not in ("fp32", "fp16"):
        raise InferenceError(f"--precision {options.precision}: use fp32 or fp16")
    if options.device == "gpu":
        if not paddle.is_compiled_with_cuda():
            raise InferenceError(f"--device gpu: this Paddle {paddle.__version__} build has no CUDA support; "
                                 "install a PaddlePaddle 3.x GPU build (README, GPU), or use --device cpu")
        if paddle.device.cuda.device_count() == 0:
            raise InferenceError("--device gpu: Paddle has CUDA support but sees no GPU; use --device cpu")
    elif options.precision == "fp16":
        raise InferenceError("--precision fp16 runs on GPU only; use --device gpu, or fp32 on CPU")
    elif options.tensorrt:
        raise InferenceError("--tensorrt needs --device gpu")


def create_predictor(model_dir: str, options: Optional[PredictorOptions] = None):
    """A Paddle Inference predictor for an exported directory."""
    options = options or PredictorOptions()
    require_paddle_3(InferenceError)
    check_device(options)
    if options.precision == "fp16":
        overflow = export_report(model_dir).get("fp16_overflow") or {}
        if overflow:
            name = next(iter(overflow))
            print(f"WARNING: {len(overflow)} weights of {model_dir} exceed the float16 range (first {name}, "
                  f"|w| up to {max(overflow.values()):.3g}); fp16 results will contain Inf/NaN -- use fp32",
                  file=sys.stderr)
    program = program_file(model_dir)
    params = os.path.join(model_dir, MODEL_FILE + ".pdiparams")
    if not os.path.exists(params):
        raise InferenceError(f"{model_dir}: {MODEL_FILE}.pdiparams is missing; export the model again")
    config = paddle.inference.Config(program, params)
    if options.device == "gpu":
        config.enable_use_gpu(options.gpu_memory_mb, options.gpu_id)
        precision = (paddle.inference.PrecisionType.Half if options.precision == "fp16"
                     else paddle.inference.PrecisionType.Float32)
        if options.tensorrt:
            config.enable_tensorrt_engine(workspace_size=1 << 30, max_batch_size=1, min_subgraph_size=3,
                                          precision_mode=precision, use_static=False, use_calib_mode=False)
        elif options.precision == "fp16":
            config.enable_use_gpu(options.gpu_memory_mb, options.gpu_id, precision)
    else:
        config.disable_gpu()
        config.set_cpu_math_library_num_threads(options.cpu_threads)
        if options.onednn:
            config.enable_onednn()
        else:
            config.disable_onednn()
    for name in options.delete_passes:
        if options.device == "cpu" and options.onednn and name in UNSAFE_TO_DELETE_WITH_ONEDNN:
            print(f"WARNING: deleting {name} with oneDNN on: Paddle {paddle.__version__} then gives wrong "
                  "outputs (NaN) from the second run on for a conv with bias and an activation; "
                  "check repeated runs before relying on it", file=sys.stderr)
        config.delete_pass(name)
    config.disable_glog_info()
    return paddle.inference.create_predictor(config)


def run(predictor, inputs: Dict[str, np.ndarray]) -> List[np.ndarray]:
    """Feed inputs by name, run, return every output as an array."""
    for name in predictor.get_input_names():
        if name not in inputs:
            raise InferenceError(f"the model needs input '{name}', given {sorted(inputs)}")
        predictor.get_input_handle(name).copy_from_cpu(np.ascontiguousarray(inputs[name]))
    predictor.run()
    return [predictor.get_output_handle(n).copy_to_cpu() for n in predictor.get_output_names()]


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
        path = os.path.join(model_dir, "infer_cfg.yml")
        if not os.path.exists(path):
            raise InferenceError(f"{model_dir}: infer_cfg.yml is missing; export the model again")
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
    """An exported directory, ready to run on images.

    ``random_weights`` is true for an export of random weights (its report says
    so): its detections are meaningless.
    """

    def __init__(self, model_dir: str, options: Optional[PredictorOptions] = None):
        self.model_dir = model_dir
        self.options = options or PredictorOptions()
        self.predictor = create_predictor(model_dir, self.options)
        self.preprocess = Preprocess.from_infer_cfg(model_dir)
        with open(os.path.join(model_dir, "infer_cfg.yml")) as f:
            cfg = yaml.safe_load(f)
        self.labels = cfg.get("label_list", [])
        self.draw_threshold = float(cfg.get("draw_threshold", 0.5))
        report = export_report(model_dir)
        # exports before "random_weights" existed say it by weights_form
        self.random_weights = bool(report.get("random_weights", report.get("weights_form") == "random"))

    def predict(self, image_bgr: np.ndarray) -> Detections:
        outputs = run(self.predictor, self.preprocess(image_bgr))
        if len(outputs) != 2:
            raise InferenceError(f"{self.model_dir}: expected (bbox, bbox_num) outputs, got {len(outputs)}; "
                                 "export with NMS to run on images")
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
