"""Exceptions of ppfuse.

Every message says where (a layer path, a file, a key), what is wrong, and how
to fix it. Command lines print the message as one line and exit non-zero.
"""
import importlib


def first_line(exc: BaseException) -> str:
    """``"Type: first line"`` of an error, for one-line messages; Paddle's C++ errors put theirs after
    "Error Message Summary", to_static's wrapped ones last in "In transformed code"."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip().strip("-")]
    if "Error Message Summary:" in lines and lines.index("Error Message Summary:") + 1 < len(lines):
        lines = lines[lines.index("Error Message Summary:") + 1:]
    elif lines and lines[0] == "In transformed code:":  # not unwrapped: its own summary is the last error line
        lines = [next((line for line in reversed(lines) if "Error" in line), lines[-1])]
    line = lines[0][:300] if lines else ""
    name = type(exc).__name__
    return line if line.startswith(name) else f"{name}: {line}" if line else name


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
    :func:`ppfuse.core.convert` never lets it abort a conversion: the layer's
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


class TrainingError(PPFuseError):
    """Training stopped: the loss became NaN/Inf, or no checkpoint was written."""


def require_module(module: str, needed_for: str, extra: str, error: type = ConfigError):
    """Import the optional package ``module`` (``a.b`` too), or raise ``error`` in one line naming the package
    that is missing and the extra that installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        missing = (exc.name or module).split(".")[0]
        raise error(f"{needed_for} needs the optional package '{missing}': "
                    f"pip install -c constraints.txt -e \".[{extra}]\"") from None
