"""ppfuse: structural re-parameterization for PaddlePaddle models.

Layers, lowest first: :mod:`ppfuse.kernels` (pure kernel math),
:mod:`ppfuse.layers` (reads Paddle layers, builds convs), :mod:`ppfuse.blocks`
(RepVggBlock, QARepVggBlock, the mixin), :mod:`ppfuse.convert` and :mod:`ppfuse.verify`
(model-wide conversion, equivalence check), then the PaddleDetection
integration (:mod:`ppfuse.detection`, :mod:`ppfuse.checkpoint`,
:mod:`ppfuse.export`, :mod:`ppfuse.inference`), which import ppdet and are not
loaded here.
"""
from .blocks import ConvBN, QARepVggBlock, RepParamMixin, RepVggBlock
from .convert import (ConversionReport, Rewrite, Site, convert, register_conv_bn,
                      register_converter)
from .errors import (CheckpointError, ConfigError, ConversionError, ExportError, InferenceError,
                     KernelError, PPFuseError, VerificationError)
from .verify import VerificationResult, verify

__version__ = "0.1.0"

__all__ = ["ConvBN", "QARepVggBlock", "RepParamMixin", "RepVggBlock", "ConversionReport", "Rewrite", "Site",
           "convert", "register_conv_bn", "register_converter", "CheckpointError", "ConfigError", "ConversionError",
           "ExportError", "InferenceError", "KernelError", "PPFuseError", "VerificationError",
           "VerificationResult", "verify"]
