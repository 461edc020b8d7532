"""Exceptions of ppfuse.

Every message says where (a layer path, a file, a key), what is wrong, and how
to fix it. Command lines print the message as one line and exit non-zero.
"""


class PPFuseError(Exception):
    """Base of every error ppfuse raises on purpose."""


class KernelError(PPFuseError, ValueError):
    """Kernel shapes or sizes that a transform cannot combine."""


class ConversionError(PPFuseError):
    """A layer cannot be converted (training mode, bad statistics, unsupported form)."""


class Unconvertible(ConversionError):
    """This layer cannot be converted as it is used; the walker leaves it unchanged and reports why.

    Raised by converters for a layer form ppfuse does not fold (GroupNorm in a
    branch, batch statistics in eval mode, a hook that rebuilds a weight, ...).
    :func:`ppfuse.convert` never lets it abort a conversion: the layer's
    BatchNorms are listed as left, with this message as the reason.
    """


class VerificationError(PPFuseError):
    """The converted model's outputs differ from the original's beyond tolerance."""


class ConfigError(PPFuseError):
    """A config file or override that cannot be used."""


class ModelError(ConfigError):
    """The model the config builds cannot run here: ppdet's own forward fails (on this Paddle)."""


class CheckpointError(PPFuseError):
    """A checkpoint that cannot be read or does not fit the model."""


class ExportError(PPFuseError):
    """Writing an exported model failed."""


class InferenceError(PPFuseError):
    """Paddle Inference cannot run as asked (device, precision, input)."""
