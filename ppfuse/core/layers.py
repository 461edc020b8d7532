"""Layer access: the one place that reads Paddle layer internals.

BatchNorm statistics (``_mean``, ``_variance``, ``_epsilon``), conv attributes
and the building of a new conv from a kernel and bias live here, so that the
math in :mod:`ppfuse.core.kernels` stays on tensors and the blocks and converters
never touch private attributes themselves. Everything read is validated: a
BatchNorm in training mode, with non-finite statistics or with
``running_var + epsilon <= 0`` raises :class:`ConversionError` naming the layer.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import numpy as np
import paddle
import paddle.nn as nn
from paddle.nn.layer.conv import _ConvNd
from paddle.nn.layer.norm import _BatchNormBase
from paddle.vision.ops import DeformConv2D

from ppfuse.core import kernels
from ppfuse.errors import ConversionError, Unconvertible

TRANSPOSED_CONVS = (nn.Conv1DTranspose, nn.Conv2DTranspose, nn.Conv3DTranspose)
CONV_BY_NDIM = {1: nn.Conv1D, 2: nn.Conv2D, 3: nn.Conv3D}
# a deformable conv samples its input at learned offsets, but its kernel is applied per output channel
# like a plain conv's ([out, in/groups, kh, kw], optional bias): a BatchNorm after it folds the same way
DEFORMABLE_CONVS = (DeformConv2D,)
# what a conv or BatchNorm computes is vouched for only when its forward is Paddle's own
_STOCK_CONV_FORWARDS = {cls.forward for cls in (nn.Conv1D, nn.Conv2D, nn.Conv3D) + TRANSPOSED_CONVS
                        + DEFORMABLE_CONVS}
_STOCK_BN_FORWARDS = {cls.forward for cls in (nn.BatchNorm1D, nn.BatchNorm2D, nn.BatchNorm3D, nn.BatchNorm,
                                              nn.SyncBatchNorm, _BatchNormBase)}
CHANNEL_LAST = {"NHWC", "NLC", "NDHWC"}


def is_conv(layer: nn.Layer) -> bool:
    """A Paddle convolution (1D/2D/3D, plain or transposed; 2D deformable)."""
    return isinstance(layer, (_ConvNd,) + DEFORMABLE_CONVS)


def is_batch_norm(layer: nn.Layer) -> bool:
    """A BatchNorm with running statistics (BatchNorm1D/2D/3D, SyncBatchNorm, legacy BatchNorm)."""
    return isinstance(layer, (_BatchNormBase, nn.BatchNorm))


def named_paths(layer: nn.Layer) -> List[Tuple[Tuple[str, ...], nn.Layer]]:
    """Every sublayer of ``layer`` (each object once, in ``named_sublayers`` order) with the keys that lead
    to it from ``layer``, one per level as registered: ``('upsample.0', 'bn')``, not ``'upsample.0.bn'``
    split at each dot -- ppdet registers names with dots (TTFFPN's ``'upsample.0'``, HMHead's ``'conv.0'``),
    so a dotted path is for messages only, never to find a layer by."""
    found: List[Tuple[Tuple[str, ...], nn.Layer]] = []
    seen = {id(layer)}

    def walk(parent: nn.Layer, keys: Tuple[str, ...]) -> None:
        for key, child in parent._sub_layers.items():
            if child is None or id(child) in seen:
                continue
            seen.add(id(child))
            found.append((keys + (key,), child))
            walk(child, keys + (key,))
    walk(layer, ())
    return found


def path_text(keys: Tuple[str, ...]) -> str:
    """A layer path as messages show it: the keys joined by dots."""
    return ".".join(keys)


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


def hooks(layer: nn.Layer) -> int:
    """Number of forward hooks (pre and post) on ``layer``: a hook may rebuild a weight or change an output."""
    return len(getattr(layer, "_forward_pre_hooks", {}) or {}) + len(getattr(layer, "_forward_post_hooks", {}) or {})


def channel_last(layer: nn.Layer) -> bool:
    """Whether a conv's or BatchNorm's channels are the last axis (NHWC, NLC, NDHWC)."""
    fmt = getattr(layer, "_data_format", None) or getattr(layer, "_data_layout", None) or "NCHW"
    return fmt in CHANNEL_LAST


def _bn_probe_shape(bn: nn.Layer, channels: int) -> list:
    if isinstance(bn, nn.BatchNorm1D):
        spatial = [] if getattr(bn, "_data_format", "NCL") == "NC" else [3]
    elif isinstance(bn, nn.BatchNorm3D):
        spatial = [2, 2, 2]
    else:
        spatial = [3, 3]
    return [2] + spatial + [channels] if channel_last(bn) and spatial else [2, channels] + spatial


def check_running_statistics(bn: nn.Layer, where: str) -> None:
    """Raise :class:`Unconvertible` unless ``bn`` (eval mode) normalizes with its running statistics.

    Paddle's BatchNorm layers decide this from ``training``, ``use_global_stats``
    and (legacy ``nn.BatchNorm``) ``trainable_statistics`` in ways that differ by
    class, so the layer is asked what it computes: it is run once on an input
    whose batch statistics are far from its running ones, and compared with
    ``gamma * (x - running_mean) / sqrt(running_var + eps) + beta``.
    """
    channels = bn._mean.shape[0]
    dtype = bn._mean.dtype
    mean, var = bn._mean.numpy().astype(np.float64), bn._variance.numpy().astype(np.float64)
    std = np.sqrt(var + float(bn._epsilon))  # var + eps > 0 was checked; var itself may be slightly negative
    shape = _bn_probe_shape(bn, channels)
    axis = len(shape) - 1 if channel_last(bn) and len(shape) > 2 else 1
    view = [1] * len(shape)
    view[axis] = channels
    rng = np.random.RandomState(7)
    x = mean.reshape(view) + std.reshape(view) * (3.0 + rng.normal(0, 1, shape))
    gamma = np.ones(channels) if bn.weight is None else bn.weight.numpy().astype(np.float64)
    beta = np.zeros(channels) if bn.bias is None else bn.bias.numpy().astype(np.float64)
    expected = (x - mean.reshape(view)) / std.reshape(view) * gamma.reshape(view) + beta.reshape(view)
    try:
        with paddle.no_grad():
            got = bn(paddle.to_tensor(x).astype(dtype)).astype("float64").numpy()
    except Exception as exc:  # e.g. a dtype the CPU kernels lack
        raise Unconvertible(f"{_where(where, bn)}: cannot run it to check what it computes "
                            f"({type(exc).__name__}: {str(exc).splitlines()[0][:120]}); left unfolded") from None
    tolerance = 1e-2 if str(dtype) in ("paddle.float16", "paddle.bfloat16") else 1e-4
    if not np.allclose(got, expected, rtol=tolerance, atol=tolerance * (np.abs(expected).max() + 1)):
        settings = ", ".join(f"{k.strip('_')}={getattr(bn, k)!r}" for k in
                             ("_use_global_stats", "_trainable_statistics") if hasattr(bn, k))
        raise Unconvertible(f"{_where(where, bn)}: normalizes with batch statistics in eval mode ({settings}), "
                            "so its output depends on the batch and it cannot be folded into a conv")


def batch_norm_stats(bn: nn.Layer, where: str, probe: bool = True) -> BatchNormStats:
    """Read and validate the statistics a BatchNorm applies in eval mode.

    Raises:
        ConversionError: training mode, or statistics that are broken (NaN/Inf,
            ``running_var + epsilon <= 0``): the model is wrong, not just unfoldable.
        Unconvertible: a BatchNorm that cannot be folded as it stands (a fused
            activation, a forward of its own, a hook, batch statistics in eval mode -- the last
            found by running it, skipped with ``probe=False``).
    """
    if bn.training:
        raise ConversionError(f"{_where(where, bn)}: BatchNorm is in training mode; "
                              "call model.eval() before converting")
    if not is_batch_norm(bn):
        raise Unconvertible(f"{_where(where, bn)}: is not a BatchNorm with running statistics "
                            "(GroupNorm, LayerNorm, ... normalize per sample); left as it is")
    if getattr(bn, "_act", None):
        raise Unconvertible(f"{_where(where, bn)}: legacy BatchNorm with a fused activation "
                            f"'{bn._act}' cannot be folded; use BatchNorm2D and a separate activation")
    if type(bn).forward not in _STOCK_BN_FORWARDS:
        raise Unconvertible(f"{_where(where, bn)}: {type(bn).__name__} overrides forward, so what it computes "
                            "is not a BatchNorm's; left unfolded")
    if hooks(bn):
        raise Unconvertible(f"{_where(where, bn)}: has forward hooks, which may change what it computes; "
                            "left unfolded")
    stats = BatchNormStats(bn._mean, bn._variance, bn.weight, bn.bias, float(bn._epsilon))
    for label, value in (("running_mean", stats.running_mean), ("running_var", stats.running_var),
                         ("weight", stats.gamma), ("bias", stats.beta)):
        if value is not None and not bool(paddle.isfinite(value).all()):
            raise ConversionError(f"{_where(where, bn)}: {label} contains NaN or Inf; the checkpoint "
                                  "is broken (retrain or restore it) -- folding it would spread NaN")
    if bool((stats.running_var + stats.epsilon <= 0).any()):
        raise ConversionError(f"{_where(where, bn)}: running_var + epsilon <= 0 for some channel, "
                              "so the BatchNorm divides by zero or a negative root; the statistics are broken")
    if probe:
        check_running_statistics(bn, where)
    return stats


def conv_kernel_bias(conv: nn.Layer) -> Tuple[paddle.Tensor, Optional[paddle.Tensor]]:
    return conv.weight, conv.bias


def check_conv(conv: nn.Layer, where: str) -> None:
    """Raise :class:`Unconvertible` unless ``conv`` computes Paddle's conv of its own ``weight``/``bias``.

    A subclass's ``forward`` (weight standardization), a hook (``weight_norm``,
    ``spectral_norm`` rebuild ``weight`` before every call) or a weight that is
    not a parameter would overwrite or re-normalize a folded kernel.
    """
    if not is_conv(conv):
        raise Unconvertible(f"{_where(where, conv)}: is not a convolution; left as it is")
    if type(conv).forward not in _STOCK_CONV_FORWARDS:
        raise Unconvertible(f"{_where(where, conv)}: {type(conv).__name__} overrides forward (its weight may be "
                            "transformed there), so a folded kernel would not be what it uses; left unfolded")
    if hooks(conv):
        raise Unconvertible(f"{_where(where, conv)}: has forward hooks (weight_norm, spectral_norm and the like "
                            "rebuild the weight before each call), so a folded kernel would be overwritten; "
                            "left unfolded")
    if conv._parameters.get("weight") is None or (conv.bias is not None and conv._parameters.get("bias") is None):
        raise Unconvertible(f"{_where(where, conv)}: its weight or bias is not a parameter of the layer; "
                            "left unfolded")
    for label, value in (("weight", conv.weight), ("bias", conv.bias)):
        if value is not None and not bool(paddle.isfinite(value).all()):
            raise ConversionError(f"{_where(where, conv)}: its {label} contains NaN or Inf; the checkpoint is "
                                  "broken (retrain or restore it) -- folding it would spread NaN")


def checked_kernel(kernel_bias: kernels.KernelBias, where: str) -> kernels.KernelBias:
    """``kernel_bias`` if every value is finite; a fold that overflows the layer's dtype (fp16) is refused."""
    for label, value in zip(("kernel", "bias"), kernel_bias):
        if value is not None and not bool(paddle.isfinite(value.astype("float32")).all()):
            raise Unconvertible(f"{where}: the folded {label} is not finite in {str(value.dtype).split('.')[-1]} "
                                "(the BatchNorm's scale gamma / sqrt(var + eps) overflows it); left unfolded -- "
                                "convert the model in float32 to fold it")
    return kernel_bias


def fold_into(kernel_bias: kernels.KernelBias, bn: nn.Layer, where: str, transposed: bool = False,
              groups: int = 1, stats: Optional[BatchNormStats] = None) -> kernels.KernelBias:
    """``bn`` applied after a conv given by its kernel and bias, as one conv: the BatchNorm is validated
    (:func:`batch_norm_stats`, unless its ``stats`` are given), folded by :func:`ppfuse.core.kernels.fold_bn`,
    the result checked finite in its dtype, and the BatchNorm asked whether it really normalizes with its
    running statistics."""
    stats = stats or batch_norm_stats(bn, where, probe=False)
    kernel, bias = kernel_bias
    folded = checked_kernel(kernels.fold_bn(kernel, bias, stats.running_mean, stats.running_var, stats.gamma,
                                            stats.beta, stats.epsilon, transposed=transposed, groups=groups),
                            where)
    check_running_statistics(bn, where)
    return folded


def fold_conv_bn(conv: nn.Layer, bn: nn.Layer, where: str, conv_where: Optional[str] = None) -> kernels.KernelBias:
    """Kernel and bias of ``bn(conv(x))`` as one conv (after checking both layers compute what they say).

    ``where`` names the BatchNorm, ``conv_where`` the conv (default: ``where``)."""
    stats = batch_norm_stats(bn, where, probe=False)  # a broken BatchNorm is an error before any leaving
    check_conv(conv, conv_where or where)
    if channel_last(conv) != channel_last(bn):
        raise Unconvertible(f"{_where(where, bn)}: data format {getattr(bn, '_data_format', None) or bn._data_layout} "
                            f"differs from its conv's {getattr(conv, '_data_format', 'NCHW')}: it normalizes another axis than the "
                            "conv's channels; left unfolded")
    if bn._mean.shape[0] != conv._out_channels:
        raise Unconvertible(f"{_where(where, bn)}: BatchNorm has {bn._mean.shape[0]} channels "
                            f"but the conv before it gives {conv._out_channels}; left unfolded")
    return fold_into(conv_kernel_bias(conv), bn, where, transposed=isinstance(conv, TRANSPOSED_CONVS),
                     groups=conv._groups, stats=stats)


def bn_as_kernel(bn: nn.Layer, where: str, groups: int = 1, kernel_size=1, ndim: int = 2) -> kernels.KernelBias:
    """Kernel and bias of a bare BatchNorm (an identity branch) as one conv."""
    stats = batch_norm_stats(bn, where, probe=False)
    identity = kernels.identity_kernel(stats.running_mean.shape[0], groups, kernel_size, ndim,
                                       dtype=stats.running_mean.dtype)
    return fold_into((identity, None), bn, where, stats=stats)


def channel_scale(alpha: paddle.Tensor, channels: int, where: str) -> paddle.Tensor:
    """A branch scale as the merge takes it: a one-element tensor, or ``[channels]`` when ``alpha``
    broadcasts per channel over an NCHW output (shape ``[1, C, 1, 1]`` or ``[C, 1, 1]``)."""
    shape = list(alpha.shape)
    if alpha.size == 1:
        return alpha.reshape([1])
    padded = [1] * (4 - len(shape)) + shape
    if len(padded) == 4 and padded[1] == channels and padded[0] == padded[2] == padded[3] == 1:
        return alpha.reshape([channels])
    raise Unconvertible(f"{where}: alpha of shape {shape} is neither one number nor one per output channel "
                        f"([1, {channels}, 1, 1]); left as it is")


def _set_param(layer: nn.Layer, name: str, value: paddle.Tensor) -> None:
    current = getattr(layer, name, None)
    if current is None:
        weight = getattr(layer, "weight", None)
        param = layer.create_parameter(shape=list(value.shape), dtype=weight.dtype if weight is not None
                                       else value.dtype, is_bias=(name == "bias"))
        if weight is not None:  # a frozen conv's new bias is frozen too
            param.stop_gradient = weight.stop_gradient
        setattr(layer, name, param)
        current = param
    current.set_value(paddle.cast(value, current.dtype))


def _per_dim(value, ndim: int) -> Optional[List[int]]:
    if isinstance(value, int):
        return [value] * ndim
    value = list(value)
    return [int(v) for v in value] if len(value) == ndim and all(isinstance(v, int) for v in value) else None


def _shifts(conv: nn.Layer) -> Optional[List[int]]:
    """Per spatial dim, how far the conv's padding moves its kernel's centre off the output position:
    ``padding - dilation * (k - 1) / 2`` (0 for "same" padding); None for an even kernel or uneven padding."""
    kernel = list(conv._kernel_size)
    ndim = len(kernel)
    dilation = _per_dim(conv._dilation, ndim)
    padding = conv._padding
    if isinstance(padding, str):
        padding = 0 if padding.upper() == "VALID" else None
    elif not isinstance(padding, int):
        flat = list(padding)
        if len(flat) == 2 * ndim and all(isinstance(v, int) for v in flat) and flat[0::2] == flat[1::2]:
            padding = flat[0::2]
    padding = _per_dim(padding, ndim) if padding is not None else None
    if padding is None or dilation is None or any(k % 2 == 0 for k in kernel):
        return None
    return [p - d * (k - 1) // 2 for p, d, k in zip(padding, dilation, kernel)]


def check_centred_merge(main: nn.Layer, where: str, small: Sequence[nn.Layer] = (), identity: bool = False,
                        pool: Optional[nn.Layer] = None) -> None:
    """Raise :class:`Unconvertible` unless ``main(x) + small_i(x) [+ x] [+ pool(x)]`` is one conv with
    ``main``'s geometry: each small kernel padded to ``main``'s size at its centre, the identity a centred
    identity kernel, the pool an averaging kernel.

    Exact when every branch reads its input at the same positions: the same stride, groups and data format,
    the centre of each kernel at the same input position (``padding - dilation * (k - 1) / 2`` equal; 0 for
    the identity and the pool), a small kernel with more than one tap dilated as ``main``, zero padding
    wherever a kernel reaches into it. Any other geometry (a 5x5 beside a 3x3 of another padding, a dilated
    small kernel, reflect padding, a stride-2 branch beside a stride-1 one) computes something else."""
    ndim = len(main._kernel_size)
    main_shift = _shifts(main)
    if main_shift is None:
        raise Unconvertible(f"{where}: {type(main).__name__} kernel {list(main._kernel_size)} with padding "
                            f"{main._padding} is not centred (an even kernel or uneven padding); left as it is")
    pads = _per_dim(main._padding, ndim) if not isinstance(main._padding, str) else None
    if getattr(main, "_padding_mode", "zeros") != "zeros" and (pads is None or any(pads)):
        raise Unconvertible(f"{where}: padding_mode '{main._padding_mode}': the branches' sum is one conv only "
                            "with zero padding; left as it is")
    for branch in small:
        geometry = [(name, getattr(main, attr), getattr(branch, attr)) for name, attr in
                    (("stride", "_stride"), ("groups", "_groups"), ("data format", "_data_format"))]
        for name, own, other in geometry:
            if _per_dim(own, ndim) != _per_dim(other, ndim) if name == "stride" else own != other:
                raise Unconvertible(f"{where}: a branch's {name} {other} differs from the {list(main._kernel_size)} "
                                    f"branch's {own}, so the branches do not sum to one conv; left as it is")
        kernel = list(branch._kernel_size)
        if any(k > m for k, m in zip(kernel, main._kernel_size)):
            raise Unconvertible(f"{where}: a {kernel} branch is larger than the {list(main._kernel_size)} one; "
                                "left as it is")
        if _shifts(branch) != main_shift:
            raise Unconvertible(f"{where}: a {kernel} branch with padding {branch._padding} is centred elsewhere "
                                f"than the {list(main._kernel_size)} branch with padding {main._padding}, so its "
                                "padded kernel would read other pixels; left as it is")
        if any(k > 1 for k in kernel) and _per_dim(branch._dilation, ndim) != _per_dim(main._dilation, ndim):
            raise Unconvertible(f"{where}: a {kernel} branch with dilation {branch._dilation} beside dilation "
                                f"{main._dilation}: its padded kernel would read other pixels; left as it is")
        small_pads = _per_dim(branch._padding, ndim) if not isinstance(branch._padding, str) else None
        if getattr(branch, "_padding_mode", "zeros") != "zeros" and (small_pads is None or any(small_pads)):
            raise Unconvertible(f"{where}: a branch pads with '{branch._padding_mode}'; left as it is")
    if (identity or pool is not None) and (any(main_shift) or _per_dim(main._stride, ndim) != [1] * ndim):
        raise Unconvertible(f"{where}: an identity or pooling branch beside a conv of stride {main._stride} and "
                            f"padding {main._padding}, which does not read each output's own pixel at its centre; "
                            "left as it is")
    if pool is not None:
        size = _per_dim(getattr(pool, "ksize", getattr(pool, "kernel_size", None)), ndim)
        if (size != list(main._kernel_size) or _per_dim(main._dilation, ndim) != [1] * ndim
                or _per_dim(getattr(pool, "stride", 1) or size, ndim) != [1] * ndim
                or _per_dim(getattr(pool, "padding", 0), ndim) != [(k - 1) // 2 for k in size]
                or getattr(pool, "exclusive", True) or getattr(pool, "ceil_mode", False)):
            raise Unconvertible(f"{where}: the average-pool branch is not a {list(main._kernel_size)} mean of "
                                "stride 1 centred like the conv (padding counted); left as it is")


def conv_like(conv: nn.Layer, kernel: paddle.Tensor, bias: paddle.Tensor) -> nn.Layer:
    """A new conv with ``conv``'s geometry (stride, padding, dilation, groups, padding mode, format), dtype
    and trainability, and the given weights."""
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
    if kernel.dtype != conv.weight.dtype:  # a float64 (or float16) model's conv keeps its dtype
        conv.to(dtype=kernel.dtype)
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
    mode for it (momentum 0), everything else stays as it is. A variance below 5%
    of its layer's median is raised to that (a channel constant over the batch).
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
    for bn in norms:  # a channel nearly constant over the batch (SSD's 1x1 maps at a small input: the variance
        # of two values) would get a near-zero variance that no trained model has, and a fold scaling by up to
        # 1/sqrt(eps) -- fp32 cancellation then dominates any comparison; floor it at 5% of the layer's median
        var = bn._variance.numpy()
        floor = 0.05 * float(np.median(var)) if var.size else 0.0
        if floor > 0 and (var < floor).any():
            bn._variance.set_value(np.maximum(var, floor).astype(var.dtype))


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
