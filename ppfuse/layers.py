"""Layer access: the one place that reads Paddle layer internals.

BatchNorm statistics (``_mean``, ``_variance``, ``_epsilon``), conv attributes
and the building of a new conv from a kernel and bias live here, so that the
math in :mod:`ppfuse.kernels` stays on tensors and the blocks and converters
never touch private attributes themselves. Everything read is validated: a
BatchNorm in training mode, with non-finite statistics or with
``running_var + epsilon <= 0`` raises :class:`ConversionError` naming the layer.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Optional, Tuple

import numpy as np
import paddle
import paddle.nn as nn
from paddle.nn.layer.conv import _ConvNd
from paddle.nn.layer.norm import _BatchNormBase

from . import kernels
from .errors import ConversionError

TRANSPOSED_CONVS = (nn.Conv1DTranspose, nn.Conv2DTranspose, nn.Conv3DTranspose)
CONV_BY_NDIM = {1: nn.Conv1D, 2: nn.Conv2D, 3: nn.Conv3D}


def is_conv(layer: nn.Layer) -> bool:
    """A Paddle convolution (1D/2D/3D, plain or transposed)."""
    return isinstance(layer, _ConvNd)


def is_batch_norm(layer: nn.Layer) -> bool:
    """A BatchNorm with running statistics (BatchNorm1D/2D/3D, SyncBatchNorm, legacy BatchNorm)."""
    return isinstance(layer, (_BatchNormBase, nn.BatchNorm))


@dataclass
class BatchNormStats:
    running_mean: paddle.Tensor
    running_var: paddle.Tensor
    gamma: Optional[paddle.Tensor]
    beta: Optional[paddle.Tensor]
    epsilon: float


def _where(where: str, layer: nn.Layer) -> str:
    return f"{where or '<model>'} ({type(layer).__name__})"


def check_eval(layer: nn.Layer, where: str) -> None:
    """Refuse a layer (or any of its sublayers) in training mode."""
    for name, sub in [("", layer)] + list(layer.named_sublayers()):
        if sub.training:
            path = ".".join(p for p in (where, name) if p)
            raise ConversionError(f"{_where(path, sub)}: is in training mode; "
                                  "call model.eval() before converting")


def batch_norm_stats(bn: nn.Layer, where: str) -> BatchNormStats:
    """Read and validate the statistics a BatchNorm applies in eval mode."""
    if bn.training:
        raise ConversionError(f"{_where(where, bn)}: BatchNorm is in training mode; "
                              "call model.eval() before converting")
    if getattr(bn, "_use_global_stats", None) is False:
        raise ConversionError(f"{_where(where, bn)}: use_global_stats=False normalizes with batch "
                              "statistics even in eval mode, so it cannot be folded; build it with "
                              "use_global_stats=None")
    if getattr(bn, "_act", None):
        raise ConversionError(f"{_where(where, bn)}: legacy BatchNorm with a fused activation "
                              f"'{bn._act}' cannot be folded; use BatchNorm2D and a separate activation")
    stats = BatchNormStats(bn._mean, bn._variance, bn.weight, bn.bias, float(bn._epsilon))
    for label, value in (("running_mean", stats.running_mean), ("running_var", stats.running_var),
                         ("weight", stats.gamma), ("bias", stats.beta)):
        if value is not None and not bool(paddle.isfinite(value).all()):
            raise ConversionError(f"{_where(where, bn)}: {label} contains NaN or Inf; the checkpoint "
                                  "is broken (retrain or restore it) -- folding it would spread NaN")
    if bool((stats.running_var + stats.epsilon <= 0).any()):
        raise ConversionError(f"{_where(where, bn)}: running_var + epsilon <= 0 for some channel, "
                              "so the BatchNorm divides by zero or a negative root; the statistics are broken")
    return stats


def conv_kernel_bias(conv: nn.Layer) -> Tuple[paddle.Tensor, Optional[paddle.Tensor]]:
    return conv.weight, conv.bias


def fold_conv_bn(conv: nn.Layer, bn: nn.Layer, where: str) -> kernels.KernelBias:
    """Kernel and bias of ``bn(conv(x))`` as one conv."""
    if not is_conv(conv):
        raise ConversionError(f"{_where(where, conv)}: expected a convolution before the BatchNorm")
    stats = batch_norm_stats(bn, where)
    out_channels = conv._out_channels
    if stats.running_mean.shape[0] != out_channels:
        raise ConversionError(f"{_where(where, bn)}: BatchNorm has {stats.running_mean.shape[0]} channels "
                              f"but the conv before it gives {out_channels}")
    kernel, bias = conv_kernel_bias(conv)
    return kernels.fold_bn(kernel, bias, stats.running_mean, stats.running_var, stats.gamma,
                           stats.beta, stats.epsilon,
                           transposed=isinstance(conv, TRANSPOSED_CONVS), groups=conv._groups)


def bn_as_kernel(bn: nn.Layer, where: str, groups: int = 1, kernel_size=1, ndim: int = 2) -> kernels.KernelBias:
    """Kernel and bias of a bare BatchNorm (an identity branch) as one conv."""
    stats = batch_norm_stats(bn, where)
    channels = stats.running_mean.shape[0]
    identity = kernels.identity_kernel(channels, groups, kernel_size, ndim, dtype=stats.running_mean.dtype)
    return kernels.fold_bn(identity, None, stats.running_mean, stats.running_var, stats.gamma,
                           stats.beta, stats.epsilon)


def _set_param(layer: nn.Layer, name: str, value: paddle.Tensor) -> None:
    current = getattr(layer, name, None)
    if current is None:
        param = layer.create_parameter(shape=list(value.shape), dtype=value.dtype, is_bias=(name == "bias"))
        setattr(layer, name, param)
        current = param
    current.set_value(paddle.cast(value, current.dtype))


def conv_like(conv: nn.Layer, kernel: paddle.Tensor, bias: paddle.Tensor) -> nn.Layer:
    """A new conv with ``conv``'s geometry (stride, padding, dilation, groups, format) and the given weights."""
    new = copy.deepcopy(conv)
    if list(kernel.shape) != list(new.weight.shape):
        raise ConversionError(f"folded kernel {list(kernel.shape)} does not fit {type(conv).__name__} "
                              f"weight {list(new.weight.shape)}")
    _set_param(new, "weight", kernel)
    _set_param(new, "bias", bias)
    return new


def make_conv(kernel: paddle.Tensor, bias: paddle.Tensor, stride=1, padding=0, dilation=1,
              groups: int = 1, data_format: Optional[str] = None) -> nn.Layer:
    """A new plain conv holding ``kernel`` and ``bias``."""
    ndim = len(kernel.shape) - 2
    cls = CONV_BY_NDIM[ndim]
    out_channels, in_per_group = kernel.shape[0], kernel.shape[1]
    kwargs = {"data_format": data_format} if data_format else {}
    # a constant initializer: the random default would cost more than the whole fold
    zeros = paddle.ParamAttr(initializer=paddle.nn.initializer.Constant(0.0))
    conv = cls(in_per_group * groups, out_channels, list(kernel.shape[2:]), stride=stride,
               padding=padding, dilation=dilation, groups=groups, weight_attr=zeros, bias_attr=zeros, **kwargs)
    _set_param(conv, "weight", kernel)
    _set_param(conv, "bias", bias)
    conv.eval()  # it replaces layers of a model in eval mode
    return conv


def calibrate_batch_norms(model: nn.Layer, forward) -> None:
    """Set every BatchNorm's running statistics to the batch statistics of one forward pass.

    Random weights with unit statistics let activations of a deep residual
    network grow by orders of magnitude (PP-YOLOE+ l reaches ~1e4 at the neck),
    which a trained model never does; calibrated statistics keep them O(1).
    ``forward()`` runs the model; only the BatchNorm layers are put in training
    mode for it (momentum 0), everything else stays as it is.
    """
    norms = [sub for sub in model.sublayers() if isinstance(sub, _BatchNormBase)]
    saved = [(bn, bn.training, bn._momentum) for bn in norms]
    for bn in norms:
        bn._momentum = 0.0  # paddle: running = momentum * running + (1 - momentum) * batch
        bn.train()
    try:
        with paddle.no_grad():
            forward()
    finally:
        for bn, training, momentum in saved:
            bn._momentum = momentum
            bn.training = training


def randomize(model: nn.Layer, seed: int = 0) -> nn.Layer:
    """Give ``model`` statistics that expose fusion bugs, in place; returns it.

    Default BatchNorm statistics (mean 0, var 1, gamma 1, beta 0) make a wrong
    fold look right, so, relative to the current running statistics: mean +=
    N(0, 0.1) * std, var *= U(0.5, 2); gamma ~ U(0.5, 1.5), beta ~ N(0, 0.1);
    a learnable ``alpha`` of shape [1] ~ U(0.3, 0.8) or U(1.2, 1.7) (away from
    1); conv weights that are constant (e.g. PP-YOLOE's zero-initialized
    prediction convs, which would make every score equal) get small random
    values. Deterministic for a seed.
    """
    rng = np.random.RandomState(seed)
    for sub in [model] + model.sublayers():
        if is_batch_norm(sub):
            c = sub._mean.shape[0]
            mean, var = sub._mean.numpy(), sub._variance.numpy()
            sub._mean.set_value((mean + rng.normal(0, 0.1, c) * np.sqrt(var)).astype("float32"))
            sub._variance.set_value((var * rng.uniform(0.5, 2.0, c)).astype("float32"))
            if sub.weight is not None:
                sub.weight.set_value(rng.uniform(0.5, 1.5, c).astype("float32"))
            if sub.bias is not None:
                sub.bias.set_value(rng.normal(0, 0.1, c).astype("float32"))
        elif is_conv(sub) and not sub.weight.stop_gradient:
            w = sub.weight.numpy()
            if w.size > 1 and np.all(w == w.flat[0]):
                sub.weight.set_value(rng.normal(0, 0.01, w.shape).astype(w.dtype))
        alpha = getattr(sub, "alpha", None)
        if isinstance(alpha, paddle.Tensor) and list(alpha.shape) == [1]:
            low = rng.choice([0.3, 1.2])
            alpha.set_value(np.array([rng.uniform(low, low + 0.5)], "float32"))
    return model


FP16_MAX = 65504.0


def fp16_overflow(model: nn.Layer) -> dict:
    """Parameters whose values exceed the float16 range, as ``{name: max |value|}``.

    Folding a BatchNorm with a tiny running variance multiplies the kernel by
    ``gamma / sqrt(var + eps)``; in fp16 such a kernel becomes Inf.
    """
    found = {}
    for name, param in model.named_parameters():
        peak = float(paddle.abs(param).max()) if param.size else 0.0
        if peak > FP16_MAX:
            found[name] = peak
    return found
