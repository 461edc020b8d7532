"""ONNX Runtime (CPU) on an export's ``model.onnx`` (written with ``tools/export_deploy.py --onnx``).

fp32 only: ONNX Runtime's CPU kernels have no bf16 path worth the name; for
bf16 use Paddle Inference or OpenVINO. Needs the ``[onnx]`` extra.
"""
from __future__ import annotations

import os
from typing import Dict, List, Mapping, Optional

import numpy as np

from ..errors import InferenceError
from ..export_format import ONNX_FILE
from .base import PrecisionReport, Runtime, RuntimeOptions, check_options


def require_module(module: str, runtime: str, extra: str):
    """Import an optional package, or one line saying which extra installs it."""
    try:
        return __import__(module)
    except ImportError:
        raise InferenceError(f"--runtime {runtime} needs the optional package '{module}': "
                             f"pip install -c constraints.txt -e \".[{extra}]\"") from None


def onnx_path(model_dir: str, runtime: str) -> str:
    path = os.path.join(model_dir, ONNX_FILE)
    if not os.path.isfile(path):
        raise InferenceError(f"{model_dir}: no {ONNX_FILE}; export with --onnx to run it in {runtime}")
    return path


def create_session(path: str, threads: int = 2):
    """An ONNX Runtime CPU session with ``threads`` intra-op threads and quiet logging."""
    ort = require_module("onnxruntime", "onnxruntime", "onnx")
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


class OnnxRuntime(Runtime):
    """``model.onnx`` in ONNX Runtime's CPU execution provider."""

    name = "onnxruntime"
    title = "ONNX Runtime"

    def __init__(self, model_dir: str, options: Optional[RuntimeOptions] = None):
        super().__init__(model_dir, options or RuntimeOptions())
        check_options(self.options, self.name)
        if self.options.device != "cpu" or self.options.precision != "fp32":
            raise InferenceError(f"--runtime onnxruntime runs fp32 on CPU here (asked: {self.options.precision} "
                                 f"on {self.options.device}); for bf16 use --runtime paddle or openvino")
        self.session = create_session(onnx_path(model_dir, self.title), self.options.cpu_threads)
        self.input_names = [i.name for i in self.session.get_inputs()]
        self._name_outputs([o.name for o in self.session.get_outputs()])

    def _run(self, feeds: Dict[str, np.ndarray]) -> List[np.ndarray]:
        return self.session.run(None, feeds)

    def settings(self) -> str:
        return f"{self.title} {self.options.precision}"

    def confirm_precision(self, inputs: Mapping[str, np.ndarray]) -> PrecisionReport:
        return PrecisionReport(self.options.precision, "fp32", "CPU execution provider, the float32 model as is")
