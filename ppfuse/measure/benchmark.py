"""Side-by-side benchmark of export variants in every runtime and precision, in one process
(``tools/benchmark.py``): latency, ops, size, conversion time, memory.

Variants of one random-weight model (BatchNorm statistics from generated
images, alpha != 1), each exported by :func:`ppfuse.ppdet.export.save_inference_model`:

* ``train form`` -- no conversion at all;
* ``ppdet path`` -- ``convert_to_deploy()`` on each ppdet ``RepVggBlock``, as
  ppdet's trainer export does, nothing else;
* ``ppfuse deploy`` -- :func:`ppfuse.core.convert`: every block one conv, every
  Conv+BN folded (families other than PP-YOLOE as the export converts them,
  :func:`ppfuse.ppdet.detection.convert_detector`: each fold confirmed by a
  trace). Its program is already the plain network (one conv with
  bias per block, no BatchNorm), so no separate "plain" variant is built.

Rows, each a runtime and precision of :mod:`ppfuse.runtime`: Paddle Inference
with oneDNN and its default passes (fp32, and bf16 on a CPU with bf16
instructions), any extra "oneDNN minus these passes" rows asked for, Paddle
Inference without oneDNN, ONNX Runtime fp32 and OpenVINO fp32 and bf16 (on the
variants' ``model.onnx``, with the optional packages), and GPU rows only on a
CUDA build with a device. Rows that cannot run here are listed with the reason.
Latency rounds are interleaved (A B C A B C ...) so machine drift hits every
variant alike; every ratio is to the ppdet path measured in the same run.
Runtimes do not share threads: after a run, Paddle's OpenMP threads keep
spinning for up to 200 ms (``KMP_BLOCKTIME``) and so do ONNX Runtime's, taking
the cores from the next runtime and slowing it down. So a timed run that
follows another runtime's run (anything but Paddle after Paddle, whose
predictors share one OpenMP pool) waits :data:`SETTLE_SECONDS` first, and each
cell then runs as fast as it does alone in a fresh process. Each round starts
one cell later than the one before (:func:`rotated`), so no cell is always the
first after a pause or always the one after a particular model.

Each runtime runs what an export gives it: Paddle Inference without oneDNN
runs ppfuse deploy's ``model_plain.json`` (conv biases as ``[C, 1, 1]`` adds,
the form Paddle's plain CPU kernels run faster), every other row ``model.json``
or ``model.onnx``.

By default the exported programs end before NMS: NMS is the same in every
variant, and with random weights it has thousands of candidate boxes a
trained model never gives it, which makes NMS a large share of the time, so
it would hide the part re-parameterization changes. ``with_nms=True``
measures the whole detector.

Every family the export handles runs here, each as :func:`ppfuse.ppdet.detectors.wrapper_for` runs it, with the
inputs of :func:`ppfuse.ppdet.detectors.input_names` (each runtime reads those its program takes). Without NMS,
PP-YOLOE's outputs are its decoded boxes and scores, any other family's the outputs of its head
(:func:`ppfuse.ppdet.detectors.raw_outputs`; DETR, CenterNet and TTFNet, whose post-processing is a top-k,
too: a note says so), compared each relative to its own largest magnitude by the export's criterion
(:func:`ppfuse.ppdet.export.judge_raw_outputs`). A family without such outputs is measured with its
post-processing (a note says so). Their ``model.onnx`` is the export's own
(:func:`ppfuse.ppdet.export.export_onnx`).

Parity is checked on the second run of each predictor and again on its last
timed run, never only on the first (bf16 cells against a looser, stated
criterion, :data:`BF16_MEAN_ERROR` and :data:`BF16_MEAN_ERROR_OF_SCALE`): Paddle Inference 3.3.1 with oneDNN and
``constant_folding_pass`` deleted is right on the first run of a conv with
bias and an activation, and wrong (NaN on PP-YOLOE) on every later one.
"""
from __future__ import annotations

import copy
import importlib.util
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import paddle

from ppfuse import runtime as runtimes
from ppfuse.core import layers
from ppfuse.core.convert import convert
from ppfuse.core.verify import pair_detections
from ppfuse.deploy.program import count_ops
from ppfuse.errors import ConfigError, first_line
from ppfuse.export_format import (INT8_ONNX_FILE, INT8_OPENVINO_FILE, MODEL_FILE, ONNX_FILE, OPENVINO_FILE,
                                  PARAMS_FILE, REPORT_FILE, nms_after_graph)
from ppfuse.measure.results import table
from ppfuse.ppdet.detection import (BuiltModel, DetectionConfig, build_model, convert_detector,
                                    raw_outputs_float64)
from ppfuse.ppdet.detectors import (generated_inputs, input_names, is_ppyoloe_style, last_nms_call, normalize_like,
                                    ppdet_failures, ppdet_path, ppyoloe_outputs, raw_outputs,
                                    raw_outputs_in_float64, wrapper_for)
from ppfuse.ppdet.export import (DEFAULT_ATOL, export_onnx, judge_raw_outputs, save_inference_model,
                                 save_plain_program, verify_deployed)

VARIANTS = ("train form", "ppdet path", "ppfuse deploy")
THROUGHPUT_BATCHES = (1, 2, 4, 8)  # serving batch sizes of the throughput table
COUNTED = ("conv2d", "batch_norm", "add", "add_tensors", "if")


@dataclass
class Row:
    """One runtime and precision of the table: ``runtime`` is a :data:`ppfuse.runtime.RUNTIMES` name."""
    name: str
    runtime: str
    options: runtimes.RuntimeOptions


# seconds a timed run waits after another runtime's run: longer than the 200 ms Paddle's OpenMP threads
# (KMP_BLOCKTIME) and ONNX Runtime's pool spin after a run
SETTLE_SECONDS = 0.3


def needs_settle(previous: Optional[str], runtime: str) -> bool:
    """Whether a run in ``runtime`` must wait for the threads of the ``previous`` run's runtime to go idle:
    always, except Paddle after Paddle (one process, one OpenMP pool) or at the start."""
    return previous is not None and not (previous == runtime == "paddle")


def rotated(count: int, round_index: int) -> List[int]:
    """The order of the cells in one round: the list rotated by the round's index, so that every cell
    is in turn the first after a settle or right after another model (whose weights fill the caches)."""
    start = round_index % count if count else 0
    return list(range(start, count)) + list(range(start))


BASE_RUNTIME = "Paddle Inference oneDNN fp32"


def cpu_rows(threads: int, extra_deleted: Sequence[Sequence[str]] = (), log: Callable = print) -> List[Row]:
    """Every CPU runtime x precision that can run here; a line for each one that cannot."""
    options = lambda **kw: runtimes.RuntimeOptions(cpu_threads=threads, **kw)  # noqa: E731
    rows = [Row(BASE_RUNTIME, "paddle", options())]
    for passes in extra_deleted:
        rows.append(Row("Paddle Inference oneDNN fp32, deleting " + " + ".join(passes), "paddle",
                        options(delete_passes=list(passes))))
    bf16 = runtimes.bf16_supported()
    if bf16:
        rows.append(Row("Paddle Inference oneDNN bf16", "paddle", options(precision="bf16")))
    rows.append(Row("Paddle Inference no oneDNN fp32", "paddle", options(onednn=False)))
    for name, title in (("onnxruntime", "ONNX Runtime"), ("openvino", "OpenVINO")):
        if not (onnx_available() and runtimes.available(name)):
            log(f"not measured: {title} (needs the [onnx] extra to write model.onnx and the [{name}] extra)"
                if name == "openvino" else f"not measured: {title} (needs the [onnx] extra)")
            continue
        for precision in runtimes.CPU_PRECISIONS[name]:
            if precision == "bf16" and not bf16:
                continue
            rows.append(Row(f"{title} {precision}", name, options(precision=precision)))
            if name == "openvino" and precision == "int8" and importlib.util.find_spec("nncf") is not None:
                # the row above runs NNCF's model_int8.xml; this one ONNX Runtime's QDQ file, for comparison
                rows.append(Row(f"{title} int8 ({INT8_ONNX_FILE})", name,
                                options(precision=precision, int8_model=INT8_ONNX_FILE)))
            if name == "openvino" and precision == "int8" and bf16:
                # what NNCF left float (concats, element-wise ops, the head's tail) in bf16 instead of fp32
                rows.append(Row(f"{title} int8, rest bf16", name, options(precision=precision, int8_rest="bf16")))
    if not bf16:
        log(f"not measured: bf16 rows: this CPU ({runtimes.cpu_model()}) has no bf16 instructions")
    return rows


def gpu_rows() -> List[Row]:
    if not paddle.is_compiled_with_cuda() or paddle.device.cuda.device_count() == 0:
        return []
    return [Row("Paddle Inference GPU fp32", "paddle", runtimes.RuntimeOptions(device="gpu")),
            Row("Paddle Inference GPU TensorRT fp16", "paddle",
                runtimes.RuntimeOptions(device="gpu", precision="fp16", tensorrt=True))]


def int8_available() -> bool:
    """Whether ONNX Runtime's quantization can run (the [int8] extra)."""
    return all(importlib.util.find_spec(m) is not None for m in ("ml_dtypes", "onnx", "onnxruntime"))


# generated images calibrate the random-weight variants: the timing does not depend on what they show
INT8_CALIBRATION_IMAGES = 8


def _quantize_variant(directory: str, size: List[int]) -> None:
    """The int8 files of a variant with ppfuse's defaults, as ``tools/quantize.py`` writes them:
    ``model_int8.onnx`` (ONNX Runtime's QDQ) and, with NNCF installed, ``model_int8.xml`` for OpenVINO
    (every node after the last convolutions left float where NMS follows the graph, as there).
    Calibration feeds: generated images, with the inputs ``model.onnx`` takes."""
    import onnx
    from ppfuse.deploy import quantize
    source = os.path.join(directory, ONNX_FILE)
    feeds = [{name: value.numpy() for name, value in generated_inputs(size, 1, 100 + seed).items()}
             for seed in range(INT8_CALIBRATION_IMAGES)]
    feeds = quantize.model_feeds(onnx.load(source), feeds)
    quantize.quantize_onnx(source, os.path.join(directory, INT8_ONNX_FILE), feeds)
    if importlib.util.find_spec("nncf") is not None:
        quantize.quantize_openvino_or_say_why(source, os.path.join(directory, INT8_OPENVINO_FILE), feeds,
                                              float_after_convolutions=nms_after_graph(directory) is not None)


def onnx_available() -> bool:
    """Whether model.onnx can be written (paddle2onnx) and checked (onnxruntime)."""
    return all(importlib.util.find_spec(m) is not None for m in ("paddle2onnx", "onnxruntime"))


# bf16 (8-bit mantissa) is not exact: its cells are judged by mean absolute error, on boxes as a
# fraction of the input size and on scores; the limits leave room above bf16's rounding on random weights
# and catch a broken kernel (NaN, wrong layout), whose error is of the order of the outputs themselves
BF16_MEAN_ERROR = {"boxes_over_size": 0.01, "scores": 0.005}
# the same for the raw outputs of the other families' heads, each as a fraction of its own largest magnitude
# (detectors.normalize_like): bf16 rounds each value by up to 2^-8 = 0.4%, which a deep random-weight network
# amplifies a few times (YOLOX-s: mean 0.7-1% of scale on its first output); a broken kernel's error is of the
# order of the outputs themselves (tens of percent)
BF16_MEAN_ERROR_OF_SCALE = 0.02
# a converted variant's bf16 cell beyond those limits still passes when its mean drift is within this factor of
# the ppdet path's own in the same runtime (random-weight PicoDet: ~5% of scale in OpenVINO bf16, unconverted)
BF16_OF_BASELINE = 1.5


@dataclass
class VariantResult:
    name: str
    directory: str
    ops: Dict[str, int]
    params_bytes: int
    prepare_seconds: float = 0.0
    verify_seconds: float = 0.0
    error: Optional[str] = None
    onnx_error: Optional[str] = None  # no model.onnx (the Paddle rows still run): why
    int8_error: Optional[str] = None  # no int8 files (the float rows still run): why


@dataclass
class Measurement:
    variant: str
    runtime: str
    batch: int
    times: List[float] = field(default_factory=list)
    parity: str = ""
    error: Optional[str] = None

    @property
    def median(self) -> float:
        return float(np.median(self.times)) if self.times else float("nan")

    @property
    def p90(self) -> float:
        return float(np.percentile(self.times, 90)) if self.times else float("nan")


def conv_flops(model, size: List[int], with_nms: bool = False) -> float:
    """Multiply-adds x 2 of every conv for one image, from the output shapes of a forward pass (up to the
    outputs the benchmark measures)."""
    total = [0.0]
    hooks = []

    def hook(layer, inputs, output):
        k = int(np.prod(layer.weight.shape[1:]))  # C_in/g * kh * kw
        total[0] += 2.0 * k * float(np.prod(output.shape[1:]))
    for sub in model.sublayers():
        if layers.is_conv(sub):
            hooks.append(sub.register_forward_post_hook(hook))
    values = generated_inputs(size, 1, 0)
    try:
        with paddle.no_grad(), ppdet_failures(model, size):
            wrapper_for(model, with_nms=with_nms)(*[values[n] for n in input_names(model)])
    finally:
        for h in hooks:
            h.remove()
    return total[0]


def peak_flops() -> (float, str):
    """Peak fp32 FLOP rate of one core, and how it was derived (a nominal figure, see the note)."""
    flags, mhz, vendor, family = "", 0.0, "", 0
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags") and not flags:
                    flags = line
                elif line.startswith("cpu MHz") and not mhz:
                    mhz = float(line.split(":")[1])
                elif line.startswith("vendor_id") and not vendor:
                    vendor = line.split(":")[1].strip()
                elif line.startswith("cpu family") and not family:
                    family = int(line.split(":")[1])
    except OSError:
        pass
    try:  # the boost clock, where the VM shows it
        with open("/sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq") as f:
            mhz = max(mhz, int(f.read()) / 1000.0)
    except OSError:
        pass
    if "avx512f" in flags and (vendor != "AuthenticAMD" or family >= 26):
        # Intel with two AVX-512 FMA units; AMD Zen 5 (family 26) has full-width 512-bit FMA pipes
        per_cycle, unit = 64, "AVX-512, 2 FMA units"
    elif "fma" in flags:
        # AMD Zen 4 runs 512-bit ops on two 256-bit FMA pipes: 32 fp32 FLOP/cycle like AVX2
        per_cycle, unit = 32, "2x256-bit FMA"
    else:
        per_cycle, unit = 8, "SSE"
    return mhz * 1e6 * per_cycle, f"{mhz:.0f} MHz x {per_cycle} fp32 FLOP/cycle ({unit}) per core"


def measured_outputs(model, size: List[int], with_nms: bool) -> Tuple[bool, Optional[str]]:
    """What the benchmark times and compares for ``model``: ``(with_nms, note)``. Without NMS, PP-YOLOE's boxes
    and scores before NMS, any other family's head outputs (:func:`ppfuse.ppdet.detectors.raw_outputs`); a
    family whose post-processing selects by top-k instead of NMS (DETR, CenterNet, TTFNet) gets a note saying
    so, and one without raw outputs is measured with its post-processing (detections), the note saying so."""
    if with_nms or is_ppyoloe_style(model):
        return with_nms, None
    arch = type(model).__name__
    values = generated_inputs(size, 1, 0)
    try:
        raw_outputs(model, [values[n] for n in input_names(model)], size)
    except ConfigError as exc:
        return True, (f"{arch}: no raw outputs to compare without NMS ({first_line(exc)}); measured as the whole "
                      "detector, post-processing included, detections compared")
    if last_nms_call(model, size) is None:
        return False, (f"{arch}: its post-processing selects by top-k, not NMS; timed up to its head's outputs like "
                       "the other families (--with_nms: the whole detector)")
    return False, None


def _error_line(exc: BaseException) -> str:
    return first_line(exc)[:200]


def write_onnx(model, directory: str, size: List[int], with_nms: bool, speed_forms: bool, folded: bool,
               log: Callable) -> None:
    """A variant's ``model.onnx`` and, with OpenVINO, its IR ``model.xml`` (what the OpenVINO rows load, as the
    export writes it). PP-YOLOE style: its program with per-class top-k before NMS, converted. Any other family:
    the export's own :func:`ppfuse.ppdet.export.export_onnx` (post-processing in the forms paddle2onnx converts,
    NMS after the graph where it has none, checked against the Paddle program beside it), and the report fields
    the runtimes read (``with_nms``, ``onnx``). ``folded``: every BatchNorm folded (ppfuse deploy), else
    BatchNormalization nodes are expected (the ppdet path)."""
    from ppfuse.deploy import onnx_support
    if is_ppyoloe_style(model):
        staging = os.path.join(directory, "onnx_source")
        save_inference_model(model, os.path.join(staging, MODEL_FILE), size, with_nms,
                             topk_before_nms=with_nms, speed_forms=speed_forms)
        onnx_support.to_onnx(staging, os.path.join(directory, ONNX_FILE))
    else:
        record = export_onnx(model, directory, size, with_nms, log, strict_detections=False, speed_forms=speed_forms,
                             folded=folded)
        with open(os.path.join(directory, REPORT_FILE), "w") as f:
            json.dump({"with_nms": with_nms, "onnx": record}, f, indent=2)
    if runtimes.available("openvino"):
        from ppfuse.runtime.openvino_runtime import write_ir
        try:
            write_ir(os.path.join(directory, ONNX_FILE), os.path.join(directory, OPENVINO_FILE))
        except Exception as exc:  # an op OpenVINO cannot read: its rows say so when they load model.onnx
            if is_ppyoloe_style(model):
                raise
            log(f"no {OPENVINO_FILE}: {_error_line(exc)}")


def export_variants(config: DetectionConfig, workdir: str, with_nms: bool = False, log: Callable = print,
                    built: Optional[BuiltModel] = None):
    """Build the random-weight model once (or take ``built``) and export the three variants; returns the built
    model and their results. ppfuse deploy gets its ``model_plain.json`` as its export does (the ppdet path has
    no conv biases to write). A variant that cannot be made, converted, verified or exported is a result with its
    error; a ``model.onnx`` or int8 model that cannot be written is the error of that variant's ONNX rows."""
    size = config.input_size()
    built = built or build_model(config, deploy=False, seed=0)
    train = built.training_model
    # every variant converts and traces a copy made before anything is traced: tracing leaves PIR values in
    # some ppdet models (PicoDet's head, ...) that deepcopy cannot copy; the training form stays untraced for
    # the reference outputs, the FLOP count and the verification, which run it in dygraph
    models = {name: copy.deepcopy(train) for name in VARIANTS}
    results = {}
    for name in VARIANTS:
        directory = os.path.join(workdir, name.replace(" ", "_"))
        os.makedirs(directory, exist_ok=True)
        if os.path.exists(os.path.join(directory, REPORT_FILE)):  # an earlier run's; the runtimes would read it
            os.remove(os.path.join(directory, REPORT_FILE))
        model = models.pop(name)
        result = VariantResult(name, directory, {}, 0)
        try:
            start = time.perf_counter()  # conversion in place, copying excluded for both converters
            if name == "ppdet path":
                ppdet_path(model, inplace=True)
            elif name == "ppfuse deploy" and is_ppyoloe_style(model):
                convert(model, inplace=True)  # every fold vouched for by the layers' code: no trace needed
            elif name == "ppfuse deploy":  # as the export converts it: each fold confirmed by a trace
                convert_detector(config, model, check=False, inplace=True)
            result.prepare_seconds = time.perf_counter() - start
            if name == "ppfuse deploy":
                start = time.perf_counter()
                verify_deployed(train, model, size)
                result.verify_seconds = time.perf_counter() - start
            # ppdet's own path keeps its ESE mean and gets only the plain exact upsample (without which no
            # variant runs under oneDNN); ppfuse deploy gets ppfuse's speed forms
            speed_forms = name == "ppfuse deploy"
            save_inference_model(model, os.path.join(directory, MODEL_FILE), size, with_nms=with_nms,
                                 speed_forms=speed_forms)
            if name == "ppfuse deploy":
                save_plain_program(model, directory, size, with_nms)
            result.ops = count_ops(directory)
            result.params_bytes = os.path.getsize(os.path.join(directory, PARAMS_FILE))
        except Exception as exc:  # a variant that cannot be exported is a result, not a crash
            result.error = _error_line(exc)
        if not result.error and name != "train form" and onnx_available():
            # (the train form's `if` ops fail in every runtime)
            try:
                write_onnx(model, directory, size, with_nms, speed_forms, name == "ppfuse deploy", log)
            except Exception as exc:
                result.onnx_error = _error_line(exc)
            if not result.onnx_error and int8_available():
                try:
                    _quantize_variant(directory, size)
                except Exception as exc:
                    result.int8_error = _error_line(exc)
        log(f"exported {name}: {result.error or 'ok'}" +
            (f"; no {ONNX_FILE}: {result.onnx_error}" if result.onnx_error else "") +
            (f"; no int8 model: {result.int8_error}" if result.int8_error else ""))
        results[name] = result
        del model
    return built, results


@dataclass
class Reference:
    """The training-form dygraph model's outputs on one batch (fp32), and their float64 evaluation where the
    raw outputs are compared (a list, or a function giving it, called when first needed: :meth:`exact`).

    ``names``: the head outputs' names (:func:`ppfuse.ppdet.detectors.raw_outputs`) of a family other than
    PP-YOLOE, compared each relative to its own scale; None: PP-YOLOE's boxes and scores, or detections."""
    outputs: List[np.ndarray]
    float64: Union[None, List[np.ndarray], Callable[[], List[np.ndarray]]] = None
    names: Optional[List[str]] = None

    def exact(self) -> Optional[List[np.ndarray]]:
        if callable(self.float64):
            self.float64 = self.float64()
        return self.float64


def reference_outputs(model, size: List[int], batch: int, with_nms: bool):
    """Inputs of one batch (every input the model's wrapper takes, :func:`ppfuse.ppdet.detectors.input_names`;
    each runtime reads the ones its program takes) and the training-form model's outputs on them."""
    values = generated_inputs(size, batch, 7)
    inputs = [values[n] for n in input_names(model)]
    feeds = {n: values[n].numpy() for n in input_names(model)}
    if with_nms or is_ppyoloe_style(model):
        with paddle.no_grad(), ppdet_failures(model, size):
            outputs = [o.numpy() for o in wrapper_for(model, with_nms=with_nms)(*inputs)]
        exact = None if with_nms else list(raw_outputs_float64(model, *inputs))
        return feeds, Reference(outputs, exact)
    raw = raw_outputs(model, inputs, size)
    return feeds, Reference(list(raw.values()), lambda: list(raw_outputs_in_float64(model, inputs, size).values()),
                            list(raw))


def parity(reference: Reference, outputs: List[np.ndarray], size: List[int], with_nms: bool,
           precision: str = "fp32", baseline: Optional[Dict[str, float]] = None):
    """``(ok, description)``: detections (with NMS) or raw outputs (without) against the reference.

    The export check's criterion (:func:`ppfuse.ppdet.export.judge_raw_outputs`): atol/rtol 1e-4 on scores and
    on boxes as fractions of the input size (PP-YOLOE), or on every head output relative to its own largest
    magnitude (the other families: ``reference.names``); beyond it, no further from float64 than twice the
    training form's fp32 error. Detections: :func:`ppfuse.core.verify.pair_detections`. bf16 and int8:
    :func:`low_precision_parity` (``baseline``: the ppdet path's mean bf16 drift in the same runtime).
    """
    if precision in ("bf16", "int8"):
        return low_precision_parity(reference, outputs, size, with_nms, precision, baseline)
    if with_nms:
        return detection_parity(reference, outputs, size)
    if len(outputs) != len(reference.outputs) or any(a.shape != b.shape for a, b in zip(reference.outputs, outputs)):
        return False, f"different outputs ({[list(o.shape) for o in outputs]})"
    if reference.names is not None:
        return raw_parity(reference, outputs)
    result = judge_raw_outputs(ppyoloe_outputs(*reference.outputs, size=size), ppyoloe_outputs(*outputs, size=size),
                               lambda: ppyoloe_outputs(*reference.exact(), size=size))
    extent = float(max(size))
    boxes, scores = result.outputs
    text = f"box diff {boxes.max_abs * extent:.2g} px, score diff {scores.max_abs:.2g}"
    return _verdict(result, text, lambda check: (
        f"box {check.candidate_error['boxes_over_size'] * extent:.2g} px, score "
        f"{check.candidate_error['scores']:.2g} (training form fp32: box "
        f"{check.original_error['boxes_over_size'] * extent:.2g} px, score {check.original_error['scores']:.2g})"))


def _verdict(result, text: str, rounding_text: Callable) -> Tuple[bool, str]:
    """``(ok, description)`` of a :func:`ppfuse.ppdet.export.judge_raw_outputs` result: the same within the
    tolerance, within fp32 rounding by the float64 check (``rounding_text(check)`` says how far each is from
    float64), or different."""
    if result.within_tolerance:
        return True, "same (" + text + ")"
    text += "; from float64: " + rounding_text(result.rounding)
    return (True, f"same within fp32 rounding ({text})") if result.rounding.ok else (False, "differ: " + text)


def detection_parity(reference: Reference, outputs: List[np.ndarray], size: List[int]):
    """Detections ``(bbox [K, 2 + box values], bbox_num [N])`` paired one to one in any order
    (:func:`ppfuse.core.verify.pair_detections`: boxes within the export's atol of the input size; runtimes
    list a class's detections in their own order); outputs of another shape are said to be not compared."""
    shapes = [list(np.shape(o)) for o in reference.outputs]
    if len(shapes) != 2 or len(shapes[0]) != 2 or shapes[0][1] < 6 or len(shapes[1]) != 1:
        return True, f"not compared: the outputs ({shapes}) are not detections (bbox [K, 6 or more], bbox_num [N])"
    if len(outputs) != 2 or np.ndim(outputs[0]) != 2 or np.shape(outputs[0])[1] != shapes[0][1]:
        return False, f"different outputs ({[list(np.shape(o)) for o in outputs]})"
    return pair_detections(reference.outputs, outputs, DEFAULT_ATOL * max(size))


def raw_parity(reference: Reference, outputs: List[np.ndarray]):
    """A head's raw outputs (``reference.names``), each relative to the reference's largest magnitude of it, by
    the export's criterion (:func:`ppfuse.ppdet.export.judge_raw_outputs`); the text gives the largest error as
    a fraction of that output's scale."""
    names = reference.names
    original = dict(zip(names, reference.outputs))
    try:
        result = judge_raw_outputs(original, dict(zip(names, outputs)), lambda: dict(zip(names, reference.exact())))
    except Exception as exc:  # the float64 evaluation that would tell rounding from error could not run
        return False, f"differ beyond tolerance; the float64 reference could not run ({_error_line(exc)[:120]})"
    worst = max(result.outputs, key=lambda o: o.max_abs)

    def furthest(check) -> str:  # the output furthest from float64 relative to the training form's own error
        name = max(check.candidate_error, key=lambda k: check.candidate_error[k] / (check.original_error[k] or 1e-30))
        return f"{name} {check.candidate_error[name]:.2g} (training form fp32: {check.original_error[name]:.2g})"
    return _verdict(result, f"max diff {worst.max_abs:.2g} of the output's scale ({worst.name})", furthest)


def low_precision_parity(reference: Reference, outputs: List[np.ndarray], size: List[int], with_nms: bool,
                         precision: str = "bf16", baseline: Optional[Dict[str, float]] = None):
    """``(ok, description)`` of a bf16 or int8 cell: its drift from fp32, mean and max absolute error per output
    (PP-YOLOE: boxes in pixels and scores; other families: each head output as a fraction of its scale,
    :func:`ppfuse.ppdet.detectors.normalize_like`).

    bf16 is judged by a mean-error limit per output (:data:`BF16_MEAN_ERROR`, :data:`BF16_MEAN_ERROR_OF_SCALE`),
    or, where ``baseline`` gives the ppdet path's mean drift per output in the same runtime and precision (the
    function before conversion, rounded the same way), by :data:`BF16_OF_BASELINE` times that drift, whichever
    is larger: a random-weight head can amplify bf16's rounding beyond the fixed limit before any conversion;
    int8 is not judged here (calibrated on generated images, random weights push scores to 0 or 1, so small
    noise flips them): only a trained model's mAP says what it costs (``tools/accuracy_parity.py``). A
    non-finite output fails either way.
    """
    if with_nms:
        return True, f"{precision}: detections not compared (random weights; see accuracy parity for mAP)"
    if len(outputs) != len(reference.outputs) or any(a.shape != b.shape for a, b in zip(reference.outputs, outputs)):
        return False, f"different outputs ({[list(o.shape) for o in outputs]})"
    errors = low_precision_errors(reference, outputs, size)
    if reference.names is None:
        extent = float(max(size))
        text = (f"{precision} drift: box mean {errors['boxes_over_size'].mean() * extent:.2g} px (max "
                f"{errors['boxes_over_size'].max() * extent:.2g}), score mean {errors['scores'].mean():.2g} (max "
                f"{errors['scores'].max():.2g})")
        limits = BF16_MEAN_ERROR
    else:
        text = f"{precision} drift, of each output's scale: " + ", ".join(
            f"{k} mean {e.mean():.2g} (max {e.max():.2g})" for k, e in errors.items())
        limits = {k: BF16_MEAN_ERROR_OF_SCALE for k in errors}
    finite = all(np.isfinite(errors[k]).all() for k in errors)
    if precision == "int8":
        return finite, (text + " (not judged on random weights)") if finite else "differ: " + text
    ok = finite and all(errors[k].mean() <= limit for k, limit in limits.items())
    if not ok and finite and baseline is not None and set(baseline) == set(errors):
        ok = all(errors[k].mean() <= max(limits[k], BF16_OF_BASELINE * baseline[k]) for k in errors)
        if ok:
            text += (f" (beyond the fixed limit, within {BF16_OF_BASELINE}x the ppdet path's own bf16 drift here: "
                     + ", ".join(f"{k} mean {baseline[k]:.2g}" for k in errors) + ")")
    return ok, text if ok else "differ: " + text


def low_precision_errors(reference: Reference, outputs: List[np.ndarray], size: List[int]) -> Dict[str, np.ndarray]:
    """Absolute error per output element from the fp32 reference: PP-YOLOE's boxes as fractions of the input
    size and its scores; the other families' head outputs as fractions of their scale
    (:func:`ppfuse.ppdet.detectors.normalize_like`). Their means are what bf16 is judged by and the baseline a
    converted variant's bf16 cell is compared with."""
    if reference.names is None:
        expected, got = ppyoloe_outputs(*reference.outputs, size=size), ppyoloe_outputs(*outputs, size=size)
        return {k: np.abs(got[k].astype(np.float64) - expected[k]) for k in expected}
    expected, got = normalize_like(dict(zip(reference.names, reference.outputs)),
                                   dict(zip(reference.names, outputs)))
    return {k: np.abs(got[k] - expected[k]) for k in expected}


def _check_twice(call, reference: Reference, size, with_nms, precision: str = "fp32", baseline=None):
    """Parity of the second run (a predictor can be right on its first run only), noting a right first run;
    returns ``(description, the second run's outputs)``."""
    first = [o.copy() for o in call()]
    second = call()
    ok, text = parity(reference, second, size, with_nms, precision, baseline)
    if not ok and parity(reference, first, size, with_nms, precision, baseline)[0]:
        text += "; the first run was right"
    return (text if ok else "FAILS: " + text), second


def measure(variants: Dict[str, VariantResult], rows: List[Row], inputs_by_batch, references,
            runs: int, warmup: int, size: List[int], with_nms: bool, progress=None) -> List[Measurement]:
    """Interleaved latency of every (row, variant) pair, per batch size; parity on repeated runs. A run
    after another runtime's run first waits :data:`SETTLE_SECONDS` (:func:`needs_settle`), outside the timing."""
    results = []
    for batch, inputs in inputs_by_batch.items():
        cells, baselines = [], {}  # baselines: the ppdet path's mean bf16 drift per row (low_precision_parity)
        for row in rows:  # row-major: cells of one runtime follow each other, fewer settles per round
            for variant in variants.values():
                if row.runtime != "paddle" and variant.name == "train form":
                    continue
                cell = Measurement(variant.name, row.name, batch)
                if variant.error:
                    cell.error = "not exported"
                elif row.runtime != "paddle" and variant.onnx_error:
                    cell.error = f"no {ONNX_FILE}: {variant.onnx_error}"
                elif row.options.precision == "int8" and variant.int8_error:
                    cell.error = f"no int8 model: {variant.int8_error}"
                else:
                    try:
                        model = runtimes.load(variant.directory, row.runtime, row.options)
                        call = (lambda model=model: list(model.run(inputs).values()))
                        baseline = baselines.get(row.name) if variant.name != "ppdet path" else None
                        cell.parity, outputs = _check_twice(call, references[batch], size, with_nms,
                                                            row.options.precision, baseline)
                        if (variant.name == "ppdet path" and row.options.precision == "bf16" and not with_nms
                                and [np.shape(o) for o in outputs] == [o.shape for o in references[batch].outputs]):
                            baselines[row.name] = {k: float(e.mean()) for k, e in
                                                   low_precision_errors(references[batch], outputs, size).items()}
                        cells.append((cell, call, row, baseline))
                    except Exception as exc:
                        cell.error = f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1][:160]}"
                results.append(cell)
        last, previous = {}, None
        for round_index in range(warmup + runs):
            for index in rotated(len(cells), round_index):
                cell, call, row, _ = cells[index]
                if needs_settle(previous, row.runtime):
                    time.sleep(SETTLE_SECONDS)
                previous = row.runtime
                start = time.perf_counter()
                last[index] = call()
                elapsed = time.perf_counter() - start
                if round_index >= warmup:
                    cell.times.append(elapsed)
                if progress:
                    progress()
        for index, (cell, _, row, baseline) in enumerate(cells):  # still right after all the runs?
            ok, text = parity(references[batch], last[index], size, with_nms, row.options.precision, baseline)
            if not ok and not cell.parity.startswith("FAILS"):
                cell.parity = f"FAILS on the last timed run: {text}"
        del cells, last
    return results


_RSS_TAIL = "\nimport resource\nprint('PEAK_RSS_KB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\n"


def child_peak_mb(code: str, cwd: str) -> float:
    """Peak resident memory (MB) of a fresh Python process running ``code``."""
    proc = subprocess.run([sys.executable, "-c", code + _RSS_TAIL], capture_output=True, text=True, cwd=cwd)
    lines = [l for l in proc.stdout.splitlines() if l.startswith("PEAK_RSS_KB")]
    if proc.returncode != 0 or not lines:
        tail = proc.stderr.strip().splitlines()[-1:] or ["no output"]
        raise RuntimeError(f"memory probe failed: {tail[0]}")
    return int(lines[-1].split()[1]) / 1024.0


def export_memory(config_path: str, root: str, workdir: str) -> Dict[str, float]:
    """Peak memory of building the training form and running it once, and of a whole ppfuse export."""
    setup = (f"import sys; sys.path.insert(0, {root!r})\n"
             f"from ppfuse.ppdet import detection, detectors, export\n"
             f"config = detection.load_config({config_path!r})\n")
    train = setup + ("built = detection.build_model(config, deploy=False)\n"
                     "names = detectors.input_names(built.model)\n"
                     "inputs = detectors.sample_inputs(config.input_size(), names=names)\n"
                     "detectors.wrapper_for(built.model, names=names)(*inputs)\n")
    full = setup + f"export.export(config, {os.path.join(workdir, 'memory_probe')!r}, log=lambda *a: None)\n"
    return {"training form (build + one forward)": child_peak_mb(train, root),
            "ppfuse export": child_peak_mb(full, root)}


def machine_description(threads: int) -> str:
    """The CPU, its ISA flags (bf16, AMX), cores, threads and the versions of every runtime."""
    versions = [f"Python {platform.python_version()}", f"Paddle {paddle.__version__}"]
    for module, title in (("onnxruntime", "ONNX Runtime"), ("openvino", "OpenVINO")):
        if importlib.util.find_spec(module) is not None:
            versions.append(f"{title} {importlib.import_module(module).__version__.split('-')[0]}")
    return (f"{runtimes.cpu_description()}, {os.cpu_count()} cores, {threads} threads; " + ", ".join(versions))


@dataclass
class BenchmarkResult:
    config: DetectionConfig
    variants: Dict[str, VariantResult]
    measurements: List[Measurement]
    flops: float
    memory: Dict[str, float]
    threads: int
    with_nms: bool = False
    notes: List[str] = field(default_factory=list)  # rows that could not run here, and why
    throughput: List[Measurement] = field(default_factory=list)  # the best rows at serving batch sizes
    ppyoloe: bool = True  # PP-YOLOE style: its boxes and scores; else the head's outputs, or detections
    best: Dict[str, str] = field(default_factory=dict)  # precision -> the fastest accepted row (best_rows)

    def cell(self, variant: str, runtime: str, batch: int) -> Optional[Measurement]:
        return next((m for m in self.measurements
                     if m.variant == variant and m.runtime == runtime and m.batch == batch), None)

    def to_dict(self) -> dict:
        """The numbers of the run, for the result file's JSON (times in milliseconds)."""
        return {"config": self.config.path, "name": self.config.name, "input_size": list(self.config.input_size()),
                "threads": self.threads, "with_nms": self.with_nms, "conv_flops_per_image": self.flops,
                "peak_memory_mb": self.memory, "notes": self.notes,
                "variants": [asdict(v) for v in self.variants.values()],
                "measurements": [{"variant": m.variant, "runtime": m.runtime, "batch": m.batch,
                                  "median_ms": m.median * 1e3 if m.times else None,
                                  "p90_ms": m.p90 * 1e3 if m.times else None,
                                  "times_ms": [t * 1e3 for t in m.times], "parity": m.parity, "error": m.error}
                                 for m in self.measurements],
                "throughput": [{"variant": m.variant, "runtime": m.runtime, "batch": m.batch,
                                "images_per_second": m.batch / m.median if m.times else None,
                                "median_ms": m.median * 1e3 if m.times else None, "parity": m.parity,
                                "error": m.error} for m in self.throughput]}


def run_benchmark(config: DetectionConfig, workdir: str, threads: int = 2, runs: int = 30, warmup: int = 3,
                  batches=(1, 2), memory: bool = True, root: str = ".", with_nms: bool = False,
                  extra_deleted: Sequence[Sequence[str]] = (), log: Callable = print,
                  throughput_batches: Sequence[int] = THROUGHPUT_BATCHES) -> BenchmarkResult:
    """Export the variants of ``config``'s model and measure them side by side; then the best row of each
    precision again at ``throughput_batches`` (images per second, :func:`best_rows`)."""
    paddle.set_device("cpu")
    size = config.input_size()
    notes: List[str] = []

    def note(line: str) -> None:
        notes.append(line)
        log(line)
    rows = cpu_rows(threads, extra_deleted, note) + gpu_rows()
    built = build_model(config, deploy=False, seed=0)
    with_nms, scope = measured_outputs(built.training_model, size, with_nms)
    if scope:
        note(scope)
    built, variants = export_variants(config, workdir, with_nms, log, built)
    inputs_by_batch, references = {}, {}

    def add_references(wanted: Sequence[int]) -> List[int]:
        """The batch sizes of ``wanted`` with inputs and reference outputs; a note for any the training form
        cannot run (some families' post-processing takes one image)."""
        for batch in wanted:
            if batch in inputs_by_batch:
                continue
            try:
                inputs_by_batch[batch], references[batch] = reference_outputs(built.training_model, size, batch,
                                                                              with_nms)
            except Exception as exc:
                note(f"not measured: batch {batch} (the training form does not run it: {_error_line(exc)})")
        return [b for b in wanted if b in inputs_by_batch]
    batches = add_references(batches)
    flops = conv_flops(built.training_model, size, with_nms and not is_ppyoloe_style(built.training_model))
    ok = sum(1 for v in variants.values() if not v.error)
    total = ok * len(rows) * len(batches) * (runs + warmup)  # an upper bound: the train form runs in Paddle only
    try:
        from tqdm import tqdm
        bar = tqdm(total=total, desc=f"{config.name} latency", unit="run", file=sys.stderr)
        tick = lambda: bar.update(1)  # noqa: E731
    except ImportError:
        bar, tick = None, None
    measurements = measure(variants, rows, {b: inputs_by_batch[b] for b in batches}, references, runs, warmup,
                           size, with_nms, tick)
    if bar:
        bar.close()
    throughput = []
    best = best_rows(measurements, rows)
    if throughput_batches and best:
        log(f"throughput: {', '.join(r.name for r in best)} at batch {', '.join(map(str, throughput_batches))}")
        throughput_batches = add_references(throughput_batches)
        pair = {name: variants[name] for name in ("ppdet path", "ppfuse deploy")}
        throughput = measure(pair, best, {b: inputs_by_batch[b] for b in throughput_batches}, references,
                             runs, warmup, size, with_nms)
    deploy = variants["ppfuse deploy"]
    if not deploy.error and os.path.exists(os.path.join(deploy.directory, OPENVINO_FILE)):
        note(openvino_load_line(deploy.directory, threads))
    mem = export_memory(os.path.abspath(config.path), root, workdir) if memory else {}
    return BenchmarkResult(config, variants, measurements, flops, mem, threads, with_nms, notes, throughput,
                           is_ppyoloe_style(built.training_model), {r.options.precision: r.name for r in best})


def openvino_load_line(directory: str, threads: int, repeats: int = 3) -> str:
    """What the export's OpenVINO IR saves per load: median seconds to read and compile ``model.xml`` against
    converting ``model.onnx`` (``openvino.convert_model``) and compiling it, fp32, ``repeats`` times each."""
    import openvino as ov
    from ppfuse.runtime.openvino_runtime import read_file
    core = ov.Core()
    config = {"INFERENCE_PRECISION_HINT": "f32", "INFERENCE_NUM_THREADS": threads}
    seconds = {}
    for name in (OPENVINO_FILE, ONNX_FILE):
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            core.compile_model(read_file(ov, core, os.path.join(directory, name)), "CPU", config)
            times.append(time.perf_counter() - start)
        seconds[name] = float(np.median(times))
    return (f"OpenVINO load of ppfuse deploy (read + compile, fp32, median of {repeats}): {OPENVINO_FILE} "
            f"{seconds[OPENVINO_FILE]:.2f} s, {ONNX_FILE} through convert_model {seconds[ONNX_FILE]:.2f} s")


def best_rows(measurements: List[Measurement], rows: List[Row]) -> List[Row]:
    """Per precision (fp32, bf16, int8), the row where ppfuse deploy ran fastest at batch 1 with its outputs
    accepted: the rows the throughput table measures at larger batches."""
    best = {}
    for m in measurements:
        row = next((r for r in rows if r.name == m.runtime), None)
        if (row is None or m.variant != "ppfuse deploy" or m.batch != 1 or not m.times
                or m.parity.startswith(("FAILS", "differ"))):
            continue
        precision = row.options.precision
        if precision not in best or m.median < best[precision][0]:
            best[precision] = (m.median, row)
    return [best[p][1] for p in ("fp32", "bf16", "int8") if p in best]


def markdown(result: BenchmarkResult, peak: float, peak_note: str) -> str:
    """The tables of one config's run."""
    cfg = result.config
    if result.ppyoloe:
        scope = ("the whole detector, NMS included" if result.with_nms else
                 "image to boxes and scores, before NMS (NMS is the same in every variant)")
    else:
        scope = ("the whole detector, its post-processing (NMS or top-k) included" if result.with_nms else
                 "image to the outputs of the detector's head, before post-processing (the same in every variant)")
    latency = []
    for m in result.measurements:
        if m.error:
            latency.append([m.variant, m.runtime, m.batch, "-", "-", "-", "-", f"fails: {m.error}"])
            continue
        ratios = []
        for runtime in (m.runtime, BASE_RUNTIME):
            base = result.cell("ppdet path", runtime, m.batch)
            ratios.append(f"{m.median / base.median:.3f}x" if base and base.times else "-")
        latency.append([m.variant, m.runtime, m.batch, f"{m.median * 1e3:.1f}", f"{m.p90 * 1e3:.1f}", *ratios,
                        m.parity])
    programs = []
    for v in result.variants.values():
        if v.error:
            programs.append([v.name, f"export failed: {v.error}"])
            continue
        programs.append([v.name, *(v.ops.get(op, 0) for op in COUNTED), f"{v.params_bytes / 2**20:.1f}",
                         f"{v.prepare_seconds:.3f}", f"{v.verify_seconds:.3f}"])
    lines = [f"### {cfg.name} ({cfg.input_size()[0]}x{cfg.input_size()[1]}, random weights)", "",
             f"Latency of {scope}.", "",
             table(["variant", "runtime", "batch", "median ms", "p90 ms", "vs ppdet path, same runtime",
                    f"vs ppdet path, {BASE_RUNTIME}", "outputs vs dygraph (2nd and last run)"], latency, "llrrrrrl"),
             "",
             table(["variant", "conv2d", "batch_norm", "add", "add of two activations", "if", "params MB",
                    "conversion s", "verification s"], programs, "l" + "r" * 8)]
    best = result.cell("ppfuse deploy", BASE_RUNTIME, 1)
    base = result.cell("ppdet path", BASE_RUNTIME, 1)
    lines.append("")
    if best and best.times and base and base.times:
        lines.append(f"- ppfuse deploy vs ppdet path, both with oneDNN and default passes, batch 1: "
                     f"**{best.median / base.median:.3f}x** latency ({best.median * 1e3:.1f} ms vs "
                     f"{base.median * 1e3:.1f} ms)")
        rate = result.flops / best.median
        lines.append(f"- model {result.flops / 1e9:.2f} GFLOP per image (2 x multiply-adds of every conv, direct "
                     f"convolution); ppfuse deploy runs at {rate / 1e9:.1f} GFLOP/s = "
                     f"{rate / (peak * result.threads):.0%} "
                     f"of a nominal {result.threads}-thread peak of {peak * result.threads / 1e9:.0f} GFLOP/s "
                     f"({peak_note}; the VM's clock may boost above it, and oneDNN may use Winograd, so this "
                     "is an estimate of the distance to the limit, not a bound)")
    for precision, row in result.best.items():
        cell = result.cell("ppfuse deploy", row, 1)
        if cell and cell.times and base and base.times:
            median = cell.median
            lines.append(f"- best {precision} row for ppfuse deploy, batch 1: {row}, {median * 1e3:.1f} ms = "
                         f"**{median / base.median:.3f}x** the ppdet path in {BASE_RUNTIME}")
    if result.throughput:
        lines += ["", throughput_table(result), ""]
    slower = [f"{m.runtime} batch {m.batch} ({m.median / p.median:.2f}x)" for m in result.measurements
              if m.variant == "ppfuse deploy" and m.times
              for p in [result.cell("ppdet path", m.runtime, m.batch)] if p and p.times and m.median > p.median]
    lines.append("- ppfuse deploy slower than the ppdet path on the same row: " + (", ".join(slower) or "none"))
    lines += [f"- {n}" for n in result.notes]
    if result.memory:
        values = list(result.memory.values())
        lines.append("- peak memory: " + ", ".join(f"{k} {v:.0f} MB" for k, v in result.memory.items()) +
                     f" (ratio {values[1] / values[0]:.2f}x)")
    spreads = [float(np.percentile(m.times, 90) / np.median(m.times)) for m in result.measurements if m.times]
    if spreads:
        lines.append(f"- spread: p90/median from {min(spreads):.2f} to {max(spreads):.2f} across cells")
    return "\n".join(lines) + "\n"


def throughput_table(result: BenchmarkResult) -> str:
    """Images per second of the best row of each precision at the serving batch sizes, the ppdet path on the
    same row beside ppfuse deploy (one run, rounds interleaved as in the latency table)."""
    batches = sorted({m.batch for m in result.throughput})
    rows = []
    for runtime in dict.fromkeys(m.runtime for m in result.throughput):
        for variant in ("ppdet path", "ppfuse deploy"):
            cells = []
            for batch in batches:
                m = next((m for m in result.throughput if m.runtime == runtime and m.variant == variant
                          and m.batch == batch), None)
                cells.append("-" if m is None or not m.times else
                             f"{batch / m.median:.1f}" + (" (!)" if m.parity.startswith(("FAILS", "differ")) else ""))
            rows.append([variant, runtime, *cells])
    return ("Throughput, images per second (batch / median latency), of the fastest row per precision at batch 1; "
            "(!) marks a cell whose outputs failed the check:\n\n" +
            table(["variant", "runtime", *[f"batch {b}" for b in batches]], rows, "ll" + "r" * len(batches)))


def plot(results: List[BenchmarkResult], path: str) -> Optional[str]:
    """A PNG bar chart of batch-1 median latency per variant and runtime; None without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, axes = plt.subplots(1, len(results), figsize=(6.5 * len(results), 4.2), squeeze=False)
    for ax, result in zip(axes[0], results):
        rows = list(dict.fromkeys(m.runtime for m in result.measurements))
        width = 0.8 / len(VARIANTS)
        for i, variant in enumerate(VARIANTS):
            values = []
            for row in rows:
                cell = result.cell(variant, row, 1)
                values.append(cell.median * 1e3 if cell and cell.times else 0.0)
            xs = [j + i * width for j in range(len(rows))]
            ax.bar(xs, values, width, label=variant)
        ax.set_xticks([j + width for j in range(len(rows))])
        ax.set_xticklabels([r.replace("Paddle Inference ", "Paddle\n").replace(", ", "\n") for r in rows], fontsize=7)
        ax.set_ylabel("median latency, batch 1 (ms)")
        ax.set_title(f"{result.config.name} {result.config.input_size()[0]}px, {result.threads} threads")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
