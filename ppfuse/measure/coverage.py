"""Which PaddleDetection detector families ppfuse converts, verifies, exports and runs: one row per config
(``tools/family_coverage.py``).

For each config: build the model (random weights, randomized BatchNorm statistics), convert it
(BatchNorms before / left, every fold confirmed by a trace unless the trace failed), verify the deployed
model against the training form, export it (``ppfuse.ppdet.export``), run the export in Paddle Inference on a
generated image, and time the training form against the export in Paddle Inference, interleaved, in one
process (the training form as ppdet's own export would write it, :func:`ppfuse.ppdet.detectors.ppdet_path`).
With ``onnx``: write ``model.onnx`` (:func:`ppfuse.ppdet.export.export_onnx`, its check included), run it in
ONNX Runtime and OpenVINO on the same image and pair their detections with Paddle Inference's, quantize it
(two generated calibration images) and run the int8 model in ONNX Runtime, saying how many convolutions ran
int8. A family that fails at some step gets its row with the step and the error's first line; the sweep goes
on; an ONNX step that fails is its cell, with the reason.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np

from ppfuse.core import layers
from ppfuse.errors import PPFuseError, first_line
from ppfuse.measure.results import table
from ppfuse.ppdet import detection, detectors, export


FAMILY_CONFIGS = [  # one per family shipped in configs/, in the order of the README's table
    "configs/ppyoloe/ppyoloe_plus_crn_s_80e_coco.yml",
    "configs/ppyoloe/ppyoloe_plus_crn_t_auxhead_300e_coco.yml",
    "configs/ppyoloe_r/ppyoloe_r_crn_s_3x_dota.yml",
    "configs/picodet/picodet_s_320_coco_lcnet.yml",
    "configs/picodet/picodet_s_320_coco.yml",
    "configs/ppyolo/ppyolo_tiny_650e_coco.yml",
    "configs/ppyolo/ppyolo_mbv3_large_coco.yml",
    "configs/ppyolo/ppyolo_r50vd_dcn_1x_coco.yml",
    "configs/ppyolo/ppyolov2_r50vd_dcn_365e_coco.yml",
    "configs/yolov3/yolov3_darknet53_270e_coco.yml",
    "configs/yolov3/yolov3_mobilenet_v1_270e_coco.yml",
    "configs/yolov3/yolov3_mobilenet_v3_large_270e_coco.yml",
    "configs/yolox/yolox_s_300e_coco.yml",
    "configs/retinanet/retinanet_r50_fpn_1x_coco.yml",
    "configs/fcos/fcos_r50_fpn_1x_coco.yml",
    "configs/gfl/gfl_r50_fpn_1x_coco.yml",
    "configs/ssd/ssd_mobilenet_v1_300_120e_coco.yml",
    "configs/ssd/ssdlite_mobilenet_v3_small_320_coco.yml",
    "configs/face_detection/blazeface_1000e.yml",
    "configs/ttfnet/ttfnet_darknet53_1x_coco.yml",
    "configs/centernet/centernet_r50_140e_coco.yml",
    "configs/yolof/yolof_r50_c5_1x_coco.yml",
    "configs/detr/detr_r50_1x_coco.yml",
]


def size_overrides(size: Optional[int]) -> List[str]:
    """``-o`` overrides that make a config's model take ``size`` x ``size`` (PP-YOLOE's and PicoDet's heads
    precompute their anchors for ``eval_size``); none for None."""
    if not size:
        return []
    return [f"TestReader.inputs_def.image_shape=[3,{size},{size}]", f"eval_size=[{size},{size}]"]


@dataclass
class CoverageRow:
    config: str
    architecture: str = ""
    input_size: List[int] = field(default_factory=list)
    bn_before: Optional[int] = None
    bn_left: Optional[int] = None
    bn_in_program: Optional[int] = None
    confirmed_by_trace: Optional[bool] = None
    trace_error: str = ""
    verification: str = ""
    verification_max_rel: Optional[float] = None
    exported: bool = False
    paddle_inference_ok: bool = False
    detections: Optional[int] = None
    inputs: List[str] = field(default_factory=list)
    latency_training_ms: Optional[float] = None
    latency_export_ms: Optional[float] = None
    onnx: str = ""  # "ok" or why not
    onnxruntime: str = ""  # detections paired with Paddle Inference's, or why not
    openvino: str = ""
    int8: str = ""  # convolutions that ran int8 in ONNX Runtime, or why not
    # bf16 and int8 runs (LOW_PRECISION_COLUMNS): detections paired with Paddle Inference fp32's, or why not
    low_precision: Dict[str, str] = field(default_factory=dict)
    failed_step: str = ""
    error: str = ""
    seconds: float = 0.0

    @property
    def ratio(self) -> Optional[float]:
        if self.latency_training_ms and self.latency_export_ms:
            return self.latency_export_ms / self.latency_training_ms
        return None


def _times_ms(call: Callable, inputs, rounds: int) -> List[float]:
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        call(inputs)
        times.append((time.perf_counter() - start) * 1000)
    return times


def _cell(exc: BaseException) -> str:
    return "no: " + first_line(exc)[:160].replace("|", "/")


def calibration_images(directory: str, size: Sequence[int], count: int) -> str:
    """``count`` generated images of ``size`` (seeded noise) as PNG files in ``directory``, for int8 calibration
    of random-weight models (what they show does not matter); returns ``directory``."""
    import cv2
    os.makedirs(directory, exist_ok=True)
    for i in range(count):
        cv2.imwrite(os.path.join(directory, f"{i}.png"), np.random.RandomState(10 + i).randint(
            0, 255, (size[0], size[1], 3)).astype("uint8"))
    return directory


# the low-precision columns: (title, runtime, precision); a bf16 column only on a CPU with bf16 instructions
LOW_PRECISION_COLUMNS = (("Paddle Inference bf16", "paddle", "bf16"), ("ONNX Runtime int8", "onnxruntime", "int8"),
                         ("OpenVINO bf16", "openvino", "bf16"), ("OpenVINO int8", "openvino", "int8"))


def _paired(model_dir: str, runtime: str, options, feeds, reference) -> str:
    """Detections of ``runtime`` on ``feeds`` paired with ``reference`` (Paddle Inference fp32's), as a cell."""
    from ppfuse.measure.runtime_parity import match_outputs
    from ppfuse.runtime import load
    found = list(load(model_dir, runtime, options).run(feeds).values())
    return match_outputs(reference, found).cell if reference is not None else "runs"


def _onnx_runtimes(row: CoverageRow, result, feeds, outputs, workdir: str, threads: int) -> None:
    """The ONNX columns of ``row``: write and check ``model.onnx``, run it in ONNX Runtime and OpenVINO against
    Paddle Inference's ``outputs`` on ``feeds``, quantize and run int8 (ONNX Runtime, OpenVINO), run bf16 (Paddle
    Inference, OpenVINO) where the CPU has it. Each failure is its cell."""
    from ppfuse.deploy import quantize
    from ppfuse.deploy.inference import split_detections
    from ppfuse.runtime import RuntimeOptions, base as runtime_base, load
    try:
        export.export_onnx(result.built.model, result.directory, row.input_size, log=lambda message: None,
                           strict_detections=False)
        row.onnx = "ok"
    except Exception as exc:
        row.onnx = row.onnxruntime = row.openvino = row.int8 = _cell(exc)
        return
    reference = split_detections(outputs[0], outputs[1])[0] if len(outputs) == 2 else None
    for name in ("onnxruntime", "openvino"):
        try:
            setattr(row, name, _paired(result.directory, name, RuntimeOptions(cpu_threads=threads), feeds, reference))
        except Exception as exc:
            setattr(row, name, _cell(exc))
    quantized = None
    try:
        images = calibration_images(os.path.join(workdir, "calibration"), row.input_size, 2)
        quantize.quantize_export(result.directory, images, quantize.QuantizeSettings(images=2),
                                 log=lambda message: None)
        model = load(result.directory, "onnxruntime", RuntimeOptions(precision="int8", cpu_threads=threads))
        model.run(feeds)
        row.int8 = model.confirm_precision(feeds).detail.split(": ", 1)[-1].split(";")[0]
    except Exception as exc:
        row.int8 = quantized = _cell(exc)
    for title, name, precision in LOW_PRECISION_COLUMNS:
        if precision == "bf16" and not runtime_base.bf16_supported():
            row.low_precision[title] = "no bf16 on this CPU"
        elif precision == "int8" and quantized:
            row.low_precision[title] = quantized
        else:
            try:
                row.low_precision[title] = _paired(result.directory, name, RuntimeOptions(
                    precision=precision, cpu_threads=threads), feeds, reference)
            except Exception as exc:
                row.low_precision[title] = _cell(exc)


def cover(path: str, overrides: Sequence[str] = (), workdir: Optional[str] = None, rounds: int = 5,
          threads: int = 2, log: Callable = print, onnx: bool = False) -> CoverageRow:
    """One config through every step (see the module docstring); never raises for the family's own failures.
    ``onnx``: also the ONNX, ONNX Runtime, OpenVINO and int8 columns (:func:`_onnx_runtimes`)."""
    from ppfuse.runtime import RuntimeOptions, load
    row = CoverageRow(os.path.relpath(path))
    start = time.perf_counter()
    own_workdir = workdir is None
    workdir = workdir or tempfile.mkdtemp(prefix="ppfuse-coverage-")
    step = "load config"
    try:
        config = detection.load_config(path, list(overrides) + ["weights="])
        row.architecture, row.input_size = config.architecture, config.input_size()
        step = "export"
        result = export.export(config, workdir, log=lambda message: None)
        built = result.built
        report = built.conversion
        row.bn_before = sum(1 for layer in built.training_model.sublayers() if layers.is_batch_norm(layer))
        row.bn_left = len(report.remaining_batch_norms)
        row.confirmed_by_trace = report.confirmed_by_trace
        row.trace_error = getattr(report, "trace_error", "") or ""
        row.bn_in_program = result.op_counts.get("batch_norm", 0)
        row.verification = result.verification.summary().splitlines()[0]
        row.verification_max_rel = result.verification.max_rel
        row.exported = True
        step = "Paddle Inference"
        options = RuntimeOptions(cpu_threads=threads)
        deployed = load(result.directory, "paddle", options)
        row.inputs = list(deployed.input_names)
        from ppfuse.deploy.inference import Preprocess
        image = (np.random.RandomState(0).uniform(0, 255, (row.input_size[0], row.input_size[1], 3))
                 .astype("uint8"))
        feeds = Preprocess.from_infer_cfg(result.directory)(image)
        deployed.run(feeds)  # the infer_cfg.yml preprocessing feeds the program
        # compared and timed: the export check's generated image (values in [0, 1]); a normalized noise image
        # saturates random weights (every score 1.0, boxes on the border), where NMS's choice among exact ties
        # is each runtime's own
        generated = detectors.generated_inputs(row.input_size, 1, 3)
        feeds = {name: generated[name].numpy() for name in feeds}
        outputs = list(deployed.run(feeds).values())
        row.detections = int(np.asarray(outputs[1]).sum()) if len(outputs) > 1 else None
        row.paddle_inference_ok = True
        if onnx:
            step = "ONNX"
            _onnx_runtimes(row, result, feeds, outputs, workdir, threads)
        if rounds > 0:
            step = "latency"
            training_dir = os.path.join(workdir, "training_form")
            os.makedirs(training_dir, exist_ok=True)
            export.save_inference_model(detectors.ppdet_path(built.training_model), os.path.join(training_dir, "model"),
                                        row.input_size, speed_forms=False)
            training = load(training_dir, "paddle", options)
            for runtime in (training, deployed):  # warm-up
                runtime.run(feeds)
            a, b = [], []
            for _ in range(rounds):  # interleaved
                a += _times_ms(training.run, feeds, 1)
                b += _times_ms(deployed.run, feeds, 1)
            row.latency_training_ms, row.latency_export_ms = float(np.median(a)), float(np.median(b))
    except Exception as exc:  # a family's failure is a row, not the end of the sweep
        row.failed_step, row.error = step, first_line(exc)
        if not isinstance(exc, PPFuseError):
            frame = traceback.extract_tb(exc.__traceback__)[-1]
            row.error += f" @ {frame.filename.split('site-packages/')[-1]}:{frame.lineno}"
    finally:
        if own_workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    row.seconds = time.perf_counter() - start
    log(line(row))
    return row


def line(row: CoverageRow) -> str:
    if row.failed_step:
        return f"{row.config}: FAILED at {row.failed_step}: {row.error}"
    ratio = f", export/training latency {row.ratio:.2f}" if row.ratio else ""
    onnx = (f", ONNX {row.onnx}; ONNX Runtime {row.onnxruntime}; OpenVINO {row.openvino}; int8 {row.int8}"
            if row.onnx else "")
    return (f"{row.config}: {row.architecture} {row.input_size}, BN {row.bn_before} -> {row.bn_left} left "
            f"({row.bn_in_program} in program), verified {row.verification_max_rel:.1e} of scale, Paddle Inference "
            f"ok ({row.detections} detections){ratio}{onnx} [{row.seconds:.0f} s]")


def markdown(rows: List[CoverageRow], note: str = "") -> str:
    with_onnx = any(r.onnx for r in rows)
    body = []
    for r in rows:
        size = "x".join(map(str, r.input_size))
        if r.failed_step and not r.exported:
            body.append([f"`{r.config}`", r.architecture, size, r.bn_before, None, None, None,
                         f"failed at {r.failed_step}: {r.error.replace('|', '/')}"])
            continue
        trace = "yes" if r.confirmed_by_trace else f"no: {r.trace_error[:80]}"
        run = "ok" if r.paddle_inference_ok else f"failed at {r.failed_step}: {r.error[:100]}"
        fmt = (lambda v: f"{v:.1f}" if v is not None else "")
        body.append([f"`{r.config}`", r.architecture, size, r.bn_before, f"{r.bn_left} ({r.bn_in_program})", trace,
                     f"{r.verification_max_rel:.1e}", run, fmt(r.latency_training_ms), fmt(r.latency_export_ms),
                     "" if r.ratio is None else f"{r.ratio:.2f}"] +
                    ([r.onnx, r.onnxruntime, r.openvino, r.int8] +
                     [r.low_precision.get(c[0], "") for c in LOW_PRECISION_COLUMNS] if with_onnx else []))
    text = table(["config", "architecture", "size", "BN before", "BN left (program)", "confirmed by trace",
                  "verification (max rel. to scale)", "export + Paddle Inference", "training form ms", "export ms",
                  "ratio"] + (["ONNX (export's check)", "ONNX Runtime vs Paddle Inference", "OpenVINO vs Paddle "
                               "Inference", "int8 (ONNX Runtime)"] + [c[0] for c in LOW_PRECISION_COLUMNS]
                              if with_onnx else []),
                 body, "lllrrlrlrrr" + ("l" * (4 + len(LOW_PRECISION_COLUMNS)) if with_onnx else ""))
    return (note + "\n\n" if note else "") + text + "\n"


def to_data(rows: List[CoverageRow]) -> List[dict]:
    """The rows as the JSON files hold them, the latency ratio included."""
    return [dict(asdict(r), ratio=r.ratio) for r in rows]


def write(rows: List[CoverageRow], directory: str, note: str = "") -> str:
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "coverage.json"), "w") as f:
        json.dump(to_data(rows), f, indent=2)
    path = os.path.join(directory, "coverage.md")
    with open(path, "w") as f:
        f.write(markdown(rows, note))
    return path
