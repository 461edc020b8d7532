"""ONNX Runtime (CPU) on an export's ``model.onnx`` (written with ``tools/export_deploy.py --onnx``).

fp32 and int8: ONNX Runtime's CPU kernels have no bf16 path worth the name; for
bf16 use Paddle Inference or OpenVINO. int8 runs ``model_int8.onnx`` (QDQ,
``tools/quantize.py``); ONNX Runtime fuses each DequantizeLinear -> Conv ->
QuantizeLinear into a ``QLinearConv``. What ran is read from the optimized
model the session itself writes (``SessionOptions.optimized_model_filepath``):
its convolutions counted as int8 (``QLinearConv``, ``ConvInteger``, any domain)
or float (``Conv``, ``FusedConv``, also a Conv left on dequantized weights).
Needs the ``[onnx]`` extra.
"""
from __future__ import annotations

import os
import tempfile
from collections import Counter
from typing import Dict, List, Mapping, Optional

import numpy as np

from ppfuse.errors import InferenceError, require_module
from ppfuse.export_format import read_report
from ppfuse.export_format import INT8_ONNX_FILE, ONNX_FILE
from ppfuse.runtime.base import PrecisionReport, Runtime, RuntimeOptions, check_options, int8_isa

INT8_CONVOLUTIONS = ("QLinearConv", "ConvInteger")
FLOAT_CONVOLUTIONS = ("Conv", "FusedConv")


def onnx_path(model_dir: str, runtime: str, precision: str = "fp32") -> str:
    """The ONNX file of an export a runtime runs: ``model.onnx``, or ``model_int8.onnx`` for int8."""
    if precision == "int8":
        path = os.path.join(model_dir, INT8_ONNX_FILE)
        if not os.path.isfile(path):
            raise InferenceError(f"{model_dir}: no {INT8_ONNX_FILE}; write it with tools/quantize.py --model_dir "
                                 f"{model_dir} to run int8 in {runtime}")
        return path
    path = os.path.join(model_dir, ONNX_FILE)
    if not os.path.isfile(path):
        raise InferenceError(f"{model_dir}: no {ONNX_FILE}; export with --onnx to run it in {runtime}")
    return path


def create_session(path: str, threads: int = 2, optimized_model: str = ""):
    """An ONNX Runtime CPU session with ``threads`` intra-op threads and quiet logging; with
    ``optimized_model`` it also writes the graph it optimized for this CPU there."""
    ort = require_module("onnxruntime", "--runtime onnxruntime", "onnx", InferenceError)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    if optimized_model:
        options.optimized_model_filepath = optimized_model
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def convolution_kinds(model) -> Dict[str, int]:
    """The convolutions of an (optimized) ONNX model by what they compute: ``int8`` (QLinearConv,
    ConvInteger, any domain) or ``fp32`` (Conv, FusedConv), and by op type (``com.microsoft.QLinearConv``)."""
    counts: Counter = Counter()
    for node in model.graph.node:
        kind = "int8" if node.op_type in INT8_CONVOLUTIONS else "fp32" if node.op_type in FLOAT_CONVOLUTIONS else ""
        if kind:
            counts[kind] += 1
            counts[f"{node.domain + '.' if node.domain else ''}{node.op_type}"] += 1
    return dict(counts)


def int8_report(requested: str, counts: Dict[str, int], where: str) -> PrecisionReport:
    """A :class:`PrecisionReport` from convolution counts ``{"int8": n, "fp32": m}``: int8 only if all ran int8."""
    int8, total = counts.get("int8", 0), counts.get("int8", 0) + counts.get("fp32", 0)
    ran = "int8" if total and int8 == total else "fp32" if int8 == 0 else "mixed"
    return PrecisionReport(requested, ran, f"{where}: {int8} of {total} convolutions int8; CPU {int8_isa()}")


class OnnxRuntime(Runtime):
    """``model.onnx`` in ONNX Runtime's CPU execution provider."""

    name = "onnxruntime"
    title = "ONNX Runtime"

    def __init__(self, model_dir: str, options: Optional[RuntimeOptions] = None):
        super().__init__(model_dir, options or RuntimeOptions())
        check_options(self.options, self.name)
        if self.options.device != "cpu" or self.options.precision not in ("fp32", "int8"):
            raise InferenceError(f"--runtime onnxruntime runs fp32 on CPU here, or int8 with {INT8_ONNX_FILE} (asked: "
                                 f"{self.options.precision} on {self.options.device}); for bf16 use --runtime paddle "
                                 "or openvino")
        self.path = onnx_path(model_dir, self.title, self.options.precision)
        self.session = create_session(self.path, self.options.cpu_threads)
        self.input_names = [i.name for i in self.session.get_inputs()]
        self._name_outputs([o.name for o in self.session.get_outputs()], onnx=True)
        self.one_image_per_run = bool(read_report(model_dir).get("with_nms", False)) and self.nms_after is None

    def _run(self, feeds: Dict[str, np.ndarray]) -> List[np.ndarray]:
        return self.session.run(None, feeds)

    def settings(self) -> str:
        return f"{self.title} {self.options.precision}"

    def optimized_convolutions(self) -> Dict[str, int]:
        """:func:`convolution_kinds` of the graph ONNX Runtime optimizes from this model for this CPU (the
        same settings as the running session, written out by a second session)."""
        onnx = require_module("onnx", "--runtime onnxruntime", "onnx", InferenceError)
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "optimized.onnx")
            create_session(self.path, self.options.cpu_threads, optimized_model=path)
            return convolution_kinds(onnx.load(path))

    def confirm_precision(self, inputs: Mapping[str, np.ndarray]) -> PrecisionReport:
        if self.options.precision == "int8":
            counts = self.optimized_convolutions()
            kinds = ", ".join(f"{n} {k}" for k, n in sorted(counts.items()) if k not in ("int8", "fp32"))
            return int8_report("int8", counts, f"optimized {INT8_ONNX_FILE} ({kinds})")
        return PrecisionReport(self.options.precision, "fp32", "CPU execution provider, the float32 model as is")
