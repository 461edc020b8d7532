"""Checkpoints: safe reading, strict loading, atomic writing.

``paddle.load`` unpickles whatever a ``.pdparams`` file holds, so a downloaded
checkpoint can run code. ppfuse reads every checkpoint with a restricted
unpickler that admits only what ``paddle.save`` writes for a state dict:
dicts, lists, tuples, strings, numbers and numpy arrays of numeric dtype.

Loading is strict: missing, unexpected and mis-shaped keys are an error that
names them, never a silent partial load.
"""
from __future__ import annotations

import io
import os
import pickle
from typing import Dict, Mapping

import numpy as np
import paddle
import paddle.nn as nn

from ppfuse.errors import CheckpointError

# (module, name) pairs a paddle.save'd state dict needs, across numpy 1.x/2.x spellings.
_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy", "ndarray"), ("numpy", "dtype"),
    ("collections", "OrderedDict"),
}


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) in _ALLOWED_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load global '{module}.{name}'")


def _check_values(value, path: str, source: str) -> None:
    if isinstance(value, np.ndarray):
        if value.dtype == object:
            raise CheckpointError(f"{source}: {path} is an object array; a checkpoint holds numeric arrays only")
        if np.issubdtype(value.dtype, np.floating) and not np.isfinite(value).all():
            bad = np.argwhere(~np.isfinite(value))[0]
            raise CheckpointError(f"{source}: {path} holds NaN or Inf (first at index {bad.tolist()}); the training "
                                  "run that wrote it diverged -- use a checkpoint from before it did")
    elif isinstance(value, Mapping):
        for key, item in value.items():
            _check_values(item, f"{path}.{key}" if path else str(key), source)
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _check_values(item, f"{path}[{i}]", source)
    elif not isinstance(value, (str, bytes, int, float, bool, type(None), np.generic)):
        raise CheckpointError(f"{source}: {path} holds a {type(value).__name__}, not data")


def safe_load(path: str) -> Dict[str, np.ndarray]:
    """Read a ``.pdparams`` state dict without executing anything from the file.

    Raises:
        CheckpointError: file missing, truncated, not a checkpoint, or holding
            anything but data (e.g. a pickle that would call a function).
    """
    if not os.path.exists(path):
        raise CheckpointError(f"{path}: weights file not found; check the path given as weights=")
    if os.path.isdir(path):
        raise CheckpointError(f"{path}: is a directory; give the .pdparams file")
    with open(path, "rb") as f:
        data = f.read()
    try:
        state = _RestrictedUnpickler(io.BytesIO(data)).load()
    except pickle.UnpicklingError as exc:
        if "refusing" in str(exc):
            raise CheckpointError(f"{path}: not loaded, the file asks to run code ({exc}); "
                                  "a checkpoint holds only arrays -- do not trust this file") from None
        raise CheckpointError(f"{path}: not a readable checkpoint ({exc}); the file is truncated or not "
                              "a .pdparams state dict") from None
    except (EOFError, ValueError, TypeError, AttributeError, IndexError, MemoryError) as exc:
        raise CheckpointError(f"{path}: not a readable checkpoint ({type(exc).__name__}: {exc}); "
                              "the file is truncated or not a .pdparams state dict") from None
    if not isinstance(state, Mapping):
        raise CheckpointError(f"{path}: holds a {type(state).__name__}, not a state dict")
    _check_values(state, "", path)
    # ppdet writes a name table beside the arrays in some versions
    return {k: v for k, v in state.items() if isinstance(v, np.ndarray)}


def key_mismatch(model: nn.Layer, state: Mapping[str, np.ndarray]) -> Dict[str, list]:
    """Keys a state dict lacks, has in excess, or has with another shape, against ``model``."""
    expected = {k: list(v.shape) for k, v in model.state_dict().items()}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    misshaped = sorted(f"{k} (checkpoint {list(np.shape(state[k]))}, model {expected[k]})"
                       for k in set(expected) & set(state) if list(np.shape(state[k])) != expected[k])
    return {"missing": missing, "unexpected": unexpected, "mis-shaped": misshaped}


def describe_mismatch(mismatch: Dict[str, list], limit: int = 5) -> str:
    parts = []
    for label, keys in mismatch.items():
        if keys:
            shown = ", ".join(keys[:limit]) + (f" (+{len(keys) - limit} more)" if len(keys) > limit else "")
            parts.append(f"{len(keys)} {label} keys: {shown}")
    return "; ".join(parts)


def load_strict(model: nn.Layer, state: Mapping[str, np.ndarray], source: str) -> None:
    """Load ``state`` into ``model`` only if every key matches in name and shape."""
    mismatch = key_mismatch(model, state)
    if any(mismatch.values()):
        raise CheckpointError(f"{source}: does not fit the model built from the config: "
                              f"{describe_mismatch(mismatch)}; use the config the checkpoint was trained with")
    model.set_state_dict({k: state[k] for k in model.state_dict()})


def save_state(model: nn.Layer, path: str) -> None:
    """Write ``model``'s state dict as numpy arrays (readable by :func:`safe_load` and ``paddle.load``)."""
    state = {k: v.numpy() for k, v in model.state_dict().items()}
    paddle.save(state, path)
