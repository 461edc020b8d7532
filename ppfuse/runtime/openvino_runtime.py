"""OpenVINO (CPU) on an export's ``model.onnx``: OpenVINO cannot read Paddle 3's ``model.json``.

The precision is always given as ``INFERENCE_PRECISION_HINT`` (f32 or bf16):
left unset, OpenVINO runs bf16 on any CPU with bf16 instructions, a silent
change of the numbers. What ran is read back from the compiled model: its
precision hint and the runtime precision of every convolution it executes.
int8 compiles ``model_int8.onnx`` (QDQ, ``tools/quantize.py``) with the hint
f32, so that what is not quantized runs f32; its low-precision transformations
turn the QDQ convs into u8/i8 convolutions, counted from the runtime model.
Needs the ``[openvino]`` extra.
"""
from __future__ import annotations

from collections import Counter
from typing import Dict, List, Mapping, Optional

import numpy as np

from ppfuse.errors import InferenceError, require_module
from ppfuse.export_format import read_report
from ppfuse.runtime.base import PrecisionReport, Runtime, RuntimeOptions, check_options
from ppfuse.runtime.onnx_runtime import int8_report, onnx_path

HINTS = {"fp32": "f32", "bf16": "bf16", "int8": "f32"}  # int8 comes from the model's QDQ nodes
INT8_TYPES = ("u8", "i8")
NAMES = {"f32": "fp32", "float32": "fp32", "bf16": "bf16", "bfloat16": "bf16", "f16": "fp16", "float16": "fp16"}


def _type_name(value) -> str:
    """An OpenVINO element type or rt_info value as ppfuse's precision name (``fp32``, ``bf16`` ...)."""
    text = value.astype(str) if hasattr(value, "astype") else str(value)
    text = text.replace("<Type: '", "").replace("'>", "").strip().lower()
    return NAMES.get(text, text)


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
        config = {"INFERENCE_PRECISION_HINT": HINTS[self.options.precision],
                  "INFERENCE_NUM_THREADS": self.options.cpu_threads, "PERFORMANCE_HINT": "LATENCY"}
        if perf_count:  # per-node execution times (:meth:`profile`)
            config["PERF_COUNT"] = True
        try:
            self.compiled = core.compile_model(core.read_model(path), "CPU", config)
        except RuntimeError as exc:
            raise InferenceError(f"{path}: OpenVINO could not compile it: {str(exc).strip().splitlines()[0][:200]}")
        self.request = self.compiled.create_infer_request()
        self.version = ov.__version__.split("-")[0]
        self.input_names = [i.get_any_name() for i in self.compiled.inputs]
        self._name_outputs([o.get_any_name() for o in self.compiled.outputs])
        self.one_image_per_run = bool(read_report(model_dir).get("with_nms", False))

    def _run(self, feeds: Dict[str, np.ndarray]) -> List[np.ndarray]:
        results = self.request.infer(feeds)
        return [np.asarray(results[output]) for output in self.compiled.outputs]

    def settings(self) -> str:
        return f"{self.title} {self.version} {self.options.precision}"

    def profile(self, inputs: Mapping[str, np.ndarray], runs: int = 10) -> Dict[tuple, float]:
        """Milliseconds per run spent in each ``(node type, kernel)`` OpenVINO executed -- its per-node
        performance counters (load with ``perf_count=True``), summed over nodes, averaged over ``runs``
        after one warm-up run. The kernel names the implementation and precision (``brgconv_avx512_bf16``,
        ``brgconv_avx512_I8``, ``jit_avx512_FP32`` ...)."""
        feeds = {n: np.ascontiguousarray(inputs[n]) for n in self.input_names}
        self.request.infer(feeds)
        totals: Counter = Counter()
        for _ in range(runs):
            self.request.infer(feeds)
            for info in self.request.get_profiling_info():
                if info.status.name == "EXECUTED":
                    totals[(info.node_type, info.exec_type)] += info.real_time.total_seconds() * 1000.0
        return {key: value / runs for key, value in totals.items()}

    def convolution_precisions(self) -> Dict[str, int]:
        """Convolutions of the compiled (runtime) model by the precision they execute in."""
        counts: Counter = Counter()
        for op in self.compiled.get_runtime_model().get_ordered_ops():
            info = op.get_rt_info()
            if "layerType" in info and info["layerType"].astype(str) == "Convolution":
                counts[_type_name(info["runtimePrecision"]) if "runtimePrecision" in info else "?"] += 1
        return dict(counts)

    def confirm_precision(self, inputs: Mapping[str, np.ndarray]) -> PrecisionReport:
        hint = _type_name(self.compiled.get_property("INFERENCE_PRECISION_HINT"))
        counts = self.convolution_precisions()
        if self.options.precision == "int8":
            kinds = ", ".join(f"{n} {k}" for k, n in sorted(counts.items()))
            int8 = sum(n for k, n in counts.items() if k in INT8_TYPES)
            return int8_report("int8", {"int8": int8, "fp32": sum(counts.values()) - int8},
                               f"runtime model of model_int8.onnx, hint {hint} ({kinds})")
        kinds = set(counts)
        ran = kinds.pop() if len(kinds) == 1 else "mixed" if kinds else hint
        total = sum(counts.values())
        detail = ", ".join(f"{n} of {total} convolutions {k}" for k, n in sorted(counts.items()))
        return PrecisionReport(self.options.precision, ran, f"compiled with INFERENCE_PRECISION_HINT {hint}; "
                               f"runtime model: {detail or 'no convolutions'}")
