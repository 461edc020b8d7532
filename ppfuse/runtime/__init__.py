"""Runtimes for an export: Paddle Inference, ONNX Runtime, OpenVINO behind one interface.

    from ppfuse import runtime
    model = runtime.load("output_inference/ppyoloe_plus_crn_s_80e_coco", "openvino",
                         runtime.RuntimeOptions(precision="bf16"))
    outputs = model.run({"image": image, "scale_factor": scale})   # {"bbox": ..., "bbox_num": ...}
    print(model.confirm_precision(inputs).line())                 # what really ran

One module per runtime; each reads an export directory through
:mod:`ppfuse.export_format` only. ONNX Runtime and OpenVINO read
``model.onnx`` (``--onnx`` at export), and with ``--precision int8`` its quantized
``model_int8.onnx`` (``tools/quantize.py``), and need their extras; a runtime's
module is imported when it is loaded, so a missing extra costs nothing else.
"""
from __future__ import annotations

import importlib
import importlib.util
from typing import Optional

from ppfuse.errors import InferenceError
from ppfuse.runtime.base import (PrecisionReport, Runtime, RuntimeOptions, bf16_supported, check_options,
                                 cpu_description, cpu_flags, cpu_model, int8_isa, require_bf16)

__all__ = ["PrecisionReport", "Runtime", "RuntimeOptions", "bf16_supported", "check_options", "cpu_description",
           "cpu_flags", "cpu_model", "int8_isa", "require_bf16", "RUNTIMES", "CPU_PRECISIONS", "runtime_class",
           "load"]

# --runtime name -> (module, class)
RUNTIMES = {
    "paddle": ("paddle_inference", "PaddleInference"),
    "onnxruntime": ("onnx_runtime", "OnnxRuntime"),
    "openvino": ("openvino_runtime", "OpenVINO"),
}
# which precisions each runs on CPU
CPU_PRECISIONS = {"paddle": ("fp32", "bf16"), "onnxruntime": ("fp32", "int8"), "openvino": ("fp32", "bf16", "int8")}


def runtime_class(name: str) -> type:
    if name not in RUNTIMES:
        raise InferenceError(f"--runtime {name}: use one of {', '.join(RUNTIMES)}")
    module, cls = RUNTIMES[name]
    return getattr(importlib.import_module(f"{__name__}.{module}"), cls)


def load(model_dir: str, name: str = "paddle", options: Optional[RuntimeOptions] = None) -> Runtime:
    """Load an export directory into the runtime ``name`` (:data:`RUNTIMES`).

    Raises:
        InferenceError: an unknown runtime, a missing extra or file, or options the runtime or this
            CPU cannot run (bf16 without bf16 instructions, fp16 on CPU, ...), in one line.
    """
    return runtime_class(name)(model_dir, options or RuntimeOptions())


def available(name: str) -> bool:
    """Whether the optional package of runtime ``name`` is installed."""
    package = {"paddle": "paddle", "onnxruntime": "onnxruntime", "openvino": "openvino"}[name]
    return importlib.util.find_spec(package) is not None
