"""ppfuse: structural re-parameterization for PaddlePaddle models.

The public API. The package's layers, lowest first (each imports only those below it):

* :mod:`ppfuse.errors`, :mod:`ppfuse.export_format`: facts every layer may read;
* :mod:`ppfuse.core`: kernel math, layer access, blocks, the converter registry, conversion,
  dataflow proof, verification, checkpoints -- Paddle only, never PaddleDetection;
* :mod:`ppfuse.runtime`: load an export and run it (Paddle Inference, ONNX Runtime, OpenVINO);
* :mod:`ppfuse.deploy`: program forms per runtime, ONNX, int8, detections from images;
* :mod:`ppfuse.ppdet`: PaddleDetection's layer types, configs, models and the export pipeline;
* :mod:`ppfuse.measure`: benchmark, accuracy, family coverage, runtime parity, generated data.

Importing ``ppfuse`` loads the core only; PaddleDetection is imported by :mod:`ppfuse.ppdet`.
"""
import functools
import sys

from ppfuse.core.blocks import ConvBN, QARepVggBlock, RepParamMixin, RepVggBlock
from ppfuse.core.converters import DEFAULT_REGISTRY, register_conv_bn, register_conv_wrapper, register_converter
from ppfuse.core.convert import ConversionReport
from ppfuse.core.convert import convert as _convert
from ppfuse.core.registry import Registry, Rewrite, Site
from ppfuse.core.verify import VerificationResult, verify
from ppfuse.errors import (CheckpointError, ConfigError, ConversionError, ExportError, InferenceError,
                           KernelError, ModelError, PPFuseError, TrainingError, VerificationError)

__version__ = "0.2.0"


@functools.wraps(_convert)
def convert(model, *args, **kwargs):
    # A model built by PaddleDetection needs ppdet's layer types registered: they are, once ppfuse.ppdet
    # is imported; a user who built the model with ppdet directly has ppdet loaded but maybe not ppfuse.ppdet.
    if "ppdet" in sys.modules and kwargs.get("registry") is None:
        import ppfuse.ppdet  # noqa: F401  (registers PaddleDetection's layer types into DEFAULT_REGISTRY)
    return _convert(model, *args, **kwargs)


__all__ = ["ConvBN", "QARepVggBlock", "RepParamMixin", "RepVggBlock", "ConversionReport", "Registry", "Rewrite",
           "Site", "DEFAULT_REGISTRY", "convert", "register_conv_bn", "register_conv_wrapper", "register_converter",
           "CheckpointError", "ConfigError", "ConversionError", "ExportError", "InferenceError", "KernelError",
           "ModelError", "PPFuseError", "TrainingError", "VerificationError", "VerificationResult", "verify"]
