"""OpenVINO (CPU) on an export's ``model.onnx``: OpenVINO cannot read Paddle 3's ``model.json``.

What is compiled: the export's OpenVINO IR (``model.xml``, written beside ``model.onnx``) when it is
there, else ``model.onnx`` through ``openvino.convert_model`` -- never ``Core.read_model`` of the ONNX
file. ``read_model`` keeps paddle2onnx's graph as it is: each conv's bias add behind a
``ShapeOf``/``Broadcast``/``Subtract`` subgraph and an ``Identity`` after each conv. In fp32 and bf16
the CPU plugin folds those away; in int8 it cannot: the zero-point subtraction of every quantized conv
input stayed an f32 ``Subtract`` node and every DequantizeLinear a reference ``Convert`` (together more
than half of the int8 run's node time, ``tools/openvino_profile.py``). ``convert_model`` applies
OpenVINO's own front-end transformations first; the same ``model_int8.onnx`` then runs with the zero
points inside the int8 convolutions.

The precision is always given as ``INFERENCE_PRECISION_HINT`` (f32 or bf16):
left unset, OpenVINO runs bf16 on any CPU with bf16 instructions, a silent
change of the numbers. What ran is read back from the compiled model: its
precision hint and the runtime precision of every convolution it executes.
int8 compiles the int8 model (NNCF's ``model_int8.xml`` or the QDQ ``model_int8.onnx``, ``tools/quantize.py``)
with the hint f32, so that what is not quantized runs f32, or with ``RuntimeOptions.int8_rest="bf16"`` the
hint bf16 (what is not quantized runs bf16); its low-precision transformations turn the quantized convs into
u8/i8 convolutions, counted from the runtime model.
Needs the ``[openvino]`` extra.
"""
from __future__ import annotations

import os
from collections import Counter
from typing import Dict, List, Mapping, Optional

import numpy as np

from ppfuse.errors import InferenceError, require_module
from ppfuse.export_format import INT8_ONNX_FILE, INT8_OPENVINO_FILE, ONNX_FILE, OPENVINO_FILE, read_report
from ppfuse.runtime.base import PrecisionReport, Runtime, RuntimeOptions, check_options
from ppfuse.runtime.onnx_runtime import int8_report, onnx_path
from ppfuse.runtime.openvino_extensions import onnx_extensions

HINTS = {"fp32": "f32", "bf16": "bf16", "int8": "f32"}  # int8 comes from the model's quantize nodes
INT8_TYPES = ("u8", "i8")
NAMES = {"f32": "fp32", "float32": "fp32", "bf16": "bf16", "bfloat16": "bf16", "f16": "fp16", "float16": "fp16"}


def _type_name(value) -> str:
    """An OpenVINO element type or rt_info value as ppfuse's precision name (``fp32``, ``bf16`` ...)."""
    text = value.astype(str) if hasattr(value, "astype") else str(value)
    text = text.replace("<Type: '", "").replace("'>", "").strip().lower()
    return NAMES.get(text, text)


class Unreadable(InferenceError):
    """OpenVINO cannot read an ONNX file: a node ppfuse's front-end extensions refuse (``reason``, one line)."""

    def __init__(self, path: str, reason: str):
        super().__init__(f"{path}: OpenVINO could not read it: {reason}")
        self.reason = reason


def read_file(ov, core, path: str):
    """An OpenVINO IR (``.xml``) as it is, an ONNX file through ``convert_model`` (never ``read_model``: above)
    with ppfuse's front-end extensions for the operators OpenVINO has no conversion rule for (ONNX
    ``DeformConv``: :mod:`ppfuse.runtime.openvino_extensions`). The one place ppfuse reads a model file into
    OpenVINO: the runtime, the export's IR (:func:`write_ir`) and NNCF's int8 model all go through it.

    Raises:
        Unreadable: a node the extensions refuse, in one line (OpenVINO's own errors pass through).
    """
    if path.endswith(".xml"):
        return core.read_model(path)
    refusals: List[str] = []
    try:
        return ov.convert_model(path, extension=list(onnx_extensions(refusals)))
    except Exception:
        if refusals:
            raise Unreadable(path, refusals[0]) from None
        raise


def openvino_model(ov, core, model_dir: str, path: str):
    """The model OpenVINO compiles for the ONNX file ``path`` of ``model_dir``: the IR beside it when one
    was written (``model.xml`` for ``model.onnx``: the export; ``model_int8.xml`` for ``model_int8.onnx``:
    NNCF's int8 model, ``tools/quantize.py``), else ``path`` itself; and the file's name."""
    ir = {ONNX_FILE: OPENVINO_FILE, INT8_ONNX_FILE: INT8_OPENVINO_FILE}.get(os.path.basename(path))
    chosen = os.path.join(model_dir, ir) if ir and os.path.isfile(os.path.join(model_dir, ir)) else path
    return read_file(ov, core, chosen), os.path.basename(chosen)


def runtime_convolutions(compiled) -> Dict[str, int]:
    """Convolutions of a compiled (runtime) model by the precision the CPU plugin executes them in."""
    counts: Counter = Counter()
    for op in compiled.get_runtime_model().get_ordered_ops():
        info = op.get_rt_info()
        if "layerType" in info and info["layerType"].astype(str) == "Convolution":
            counts[_type_name(info["runtimePrecision"]) if "runtimePrecision" in info else "?"] += 1
    return dict(counts)


def chosen_int8_model(ov, core, model_dir: str, name: str):
    """The int8 file ``name`` of ``model_dir`` (``model_int8.xml`` or ``model_int8.onnx``), and its name."""
    path = os.path.join(model_dir, name)
    if name not in (INT8_OPENVINO_FILE, INT8_ONNX_FILE) or not os.path.isfile(path):
        raise InferenceError(f"int8 model {name}: use {INT8_OPENVINO_FILE} or {INT8_ONNX_FILE} of {model_dir} "
                             "(written by tools/quantize.py)")
    return read_file(ov, core, path), name


def conversion_failure(exc: BaseException) -> str:
    """One line of why OpenVINO could not read an ONNX file: the ops it has no conversion for, when it says."""
    if isinstance(exc, Unreadable):
        return exc.reason
    text = str(exc)
    marker = "No conversion rule found for operations:"
    if marker in text:
        return marker[:-1].replace("No conversion rule found", "no conversion rule") + ": " + \
            text.split(marker, 1)[1].strip().splitlines()[0].strip()
    failed = [line.strip()[3:].split(" with a message")[0] for line in text.splitlines()
              if line.strip().startswith("-- ") and " with a message" in line]
    if failed:  # "Failed operations detailed log: -- ArgMax-13 with a message: ..."
        line = "conversion failed for operations: " + ", ".join(dict.fromkeys(failed))
        if "Normalized axis of TopK is unknown" in text:  # paddle2onnx's float64 tile count, before to_onnx's fix
            line += " (its input's rank is unknown to OpenVINO: export the model again with --onnx, which " \
                    "computes paddle2onnx's tile repeats in int64)"
        return line
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return f"{type(exc).__name__}: {lines[0][:200] if lines else ''}"


def write_ir(onnx_file: str, xml_file: str) -> None:
    """``onnx_file`` as OpenVINO IR (``xml_file`` and its ``.bin``), weights kept fp32 (``save_model``
    would store them fp16 by default: not the function the export verified)."""
    import openvino as ov
    ov.save_model(read_file(ov, None, onnx_file), xml_file, compress_to_fp16=False)


def by_kernel(nodes: List[dict]) -> Dict[tuple, float]:
    """:meth:`OpenVINO.node_profile`'s milliseconds summed per ``(node type, kernel)``."""
    totals: Counter = Counter()
    for node in nodes:
        totals[(node["node_type"], node["kernel"])] += node["ms"]
    return dict(totals)


class OpenVINO(Runtime):
    """``model.onnx`` compiled by OpenVINO for the CPU, latency mode, with an explicit precision hint."""

    name = "openvino"
    title = "OpenVINO"

    def __init__(self, model_dir: str, options: Optional[RuntimeOptions] = None, perf_count: bool = False):
        super().__init__(model_dir, options or RuntimeOptions())
        check_options(self.options, self.name)
        if self.options.device != "cpu":
            raise InferenceError("--runtime openvino runs on CPU here; use --device cpu")
        ov = require_module("openvino", "--runtime openvino", "openvino", InferenceError)
        path = onnx_path(model_dir, self.title, self.options.precision)
        core = ov.Core()
        hint = HINTS[self.options.int8_rest] if self.options.precision == "int8" else HINTS[self.options.precision]
        config = {"INFERENCE_PRECISION_HINT": hint,
                  "INFERENCE_NUM_THREADS": self.options.cpu_threads, "PERFORMANCE_HINT": "LATENCY"}
        if perf_count:  # per-node execution times (:meth:`profile`)
            config["PERF_COUNT"] = True
        try:
            if self.options.precision == "int8" and self.options.int8_model:
                model, self.source = chosen_int8_model(ov, core, model_dir, self.options.int8_model)
            else:
                model, self.source = openvino_model(ov, core, model_dir, path)
        except InferenceError:
            raise
        except Exception as exc:  # convert_model raises its own error types
            raise InferenceError(f"{path}: OpenVINO could not read it: {conversion_failure(exc)}")
        try:
            self.compiled = core.compile_model(model, "CPU", config)
        except RuntimeError as exc:
            raise InferenceError(f"{os.path.join(model_dir, self.source)}: OpenVINO could not compile it: "
                                 f"{str(exc).strip().splitlines()[0][:200]}")
        self.request = self.compiled.create_infer_request()
        self.version = ov.__version__.split("-")[0]
        self.input_names = [i.get_any_name() for i in self.compiled.inputs]
        self._name_outputs([o.get_any_name() for o in self.compiled.outputs], onnx=True)
        self.one_image_per_run = bool(read_report(model_dir).get("with_nms", False)) and self.nms_after is None

    def _run(self, feeds: Dict[str, np.ndarray]) -> List[np.ndarray]:
        results = self.request.infer(feeds)
        return [np.asarray(results[output]) for output in self.compiled.outputs]

    def settings(self) -> str:
        return f"{self.title} {self.version} {self.options.precision}"

    def profile(self, inputs: Mapping[str, np.ndarray], runs: int = 10) -> Dict[tuple, float]:
        """Milliseconds per run spent in each ``(node type, kernel)`` OpenVINO executed (:meth:`node_profile`
        summed over nodes). The kernel names the implementation and precision (``brgconv_avx512_bf16``,
        ``brgconv_avx512_I8``, ``jit_avx512_FP32`` ...)."""
        return by_kernel(self.node_profile(inputs, runs))

    def node_profile(self, inputs: Mapping[str, np.ndarray], runs: int = 10) -> List[dict]:
        """Each executed node of the runtime model: name, node type, kernel, milliseconds per run from
        OpenVINO's per-node performance counters (load with ``perf_count=True``; averaged over ``runs`` after
        one warm-up run), and its first input's, its weights' and its output's shapes."""
        feeds = {n: np.ascontiguousarray(inputs[n]) for n in self.input_names}
        self.request.infer(feeds)
        totals: Counter = Counter()
        kinds = {}
        for _ in range(runs):
            self.request.infer(feeds)
            for info in self.request.get_profiling_info():
                if info.status.name == "EXECUTED":
                    totals[info.node_name] += info.real_time.total_seconds() * 1000.0
                    kinds[info.node_name] = (info.node_type, info.exec_type)
        ops = {op.get_friendly_name(): op for op in self.compiled.get_runtime_model().get_ordered_ops()}

        def shape(op, index, output=False):
            if op is None or index >= (op.get_output_size() if output else op.get_input_size()):
                return None
            partial = op.get_output_partial_shape(index) if output else op.get_input_partial_shape(index)
            return [d.get_length() if d.is_static else -1 for d in partial]
        return [{"name": name, "node_type": kinds[name][0], "kernel": kinds[name][1], "ms": ms / runs,
                 "input": shape(ops.get(name), 0), "weights": shape(ops.get(name), 1),
                 "output": shape(ops.get(name), 0, output=True)} for name, ms in totals.items()]

    def convolution_precisions(self) -> Dict[str, int]:
        """Convolutions of the compiled (runtime) model by the precision they execute in."""
        return runtime_convolutions(self.compiled)

    def confirm_precision(self, inputs: Mapping[str, np.ndarray]) -> PrecisionReport:
        hint = _type_name(self.compiled.get_property("INFERENCE_PRECISION_HINT"))
        counts = self.convolution_precisions()
        if self.options.precision == "int8":
            kinds = ", ".join(f"{n} {k}" for k, n in sorted(counts.items()))
            int8 = sum(n for k, n in counts.items() if k in INT8_TYPES)
            return int8_report("int8", {"int8": int8, "fp32": sum(counts.values()) - int8},
                               f"runtime model of {self.source}, hint {hint} ({kinds})")
        kinds = set(counts)
        ran = kinds.pop() if len(kinds) == 1 else "mixed" if kinds else hint
        total = sum(counts.values())
        detail = ", ".join(f"{n} of {total} convolutions {k}" for k, n in sorted(counts.items()))
        return PrecisionReport(self.options.precision, ran, f"compiled with INFERENCE_PRECISION_HINT {hint}; "
                               f"runtime model: {detail or 'no convolutions'}")
