"""Pure kernel arithmetic of structural re-parameterization.

Tensors in, tensors out: nothing here knows about ``nn.Layer``. Every
transform returns a ``(kernel, bias)`` pair for one convolution that computes
what the original pieces computed. Kernels use Paddle's layout
``[out_channels, in_channels / groups, *kernel_size]`` (transposed convs:
``[in_channels, out_channels / groups, *kernel_size]``). Arithmetic is done in
float64 and the result is cast back to the dtype of the first kernel given,
because folding tiny variances in fp16/fp32 loses digits the model then misses.

The transforms (DBB's numbering in brackets):

* :func:`fold_bn` -- Conv then BatchNorm  [I]
* :func:`merge_parallel` -- branches added, each with a scale (RepVGG's alpha)  [II]
* :func:`merge_sequential` -- a 1x1 conv followed by a kxk conv  [III]
* :func:`merge_concat` -- branches concatenated on channels  [IV]
* :func:`avg_pool_kernel` -- average pooling as a conv  [V]
* :func:`pad_kernel` -- 1x1, 1x3, 3x1, kxk padded centred to a larger size  [VI]
* :func:`identity_kernel` -- the identity as a conv kernel
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union

import numpy as np
import paddle

from ppfuse.errors import KernelError

Tensor = paddle.Tensor
KernelBias = Tuple[Tensor, Tensor]
Size = Union[int, Sequence[int]]

FOLD_DTYPE = "float64"


def _as_tuple(size: Size, ndim: int, what: str) -> Tuple[int, ...]:
    if isinstance(size, int):
        return (size,) * ndim
    size = tuple(int(s) for s in size)
    if len(size) != ndim:
        raise KernelError(f"{what} {size} has {len(size)} dims, the kernel has {ndim} spatial dims")
    return size


def _f64(x: Tensor) -> Tensor:
    return paddle.cast(x, FOLD_DTYPE)


# What every conversion runs (fold_bn per BatchNorm; pad_kernel, merge_parallel per block) computes in
# numpy: Paddle's float64 elementwise kernels on CPU are ~5x slower than its float32 ones, numpy's are not.
_NUMPY_FLOATS = {paddle.float16: np.float16, paddle.float32: np.float32, paddle.float64: np.float64}


def _np64(x: Tensor) -> np.ndarray:
    return np.asarray(x.numpy(), dtype=np.float64)


def _tensor(values: np.ndarray, dtype) -> Tensor:
    """``values`` (float64) as a tensor of ``dtype``."""
    if dtype in _NUMPY_FLOATS:
        return paddle.to_tensor(values.astype(_NUMPY_FLOATS[dtype]))
    return paddle.cast(paddle.to_tensor(values), dtype)


def fold_bn(kernel: Tensor,
            bias: Optional[Tensor],
            running_mean: Tensor,
            running_var: Tensor,
            gamma: Optional[Tensor],
            beta: Optional[Tensor],
            epsilon: float,
            transposed: bool = False,
            groups: int = 1) -> KernelBias:
    """Fold an eval-mode BatchNorm into the conv that feeds it.

    ``BN(conv(x)) = gamma * (W*x + b - mean) / sqrt(var + eps) + beta``
    ``            = (W * s) * x + (beta + (b - mean) * s)``, with ``s = gamma / sqrt(var + eps)``.

    Works for any spatial rank (1D/2D/3D), any groups, stride, dilation and
    kernel shape: those only decide which input pixels a kernel touches, and
    the fold scales whole output channels.

    Args:
        kernel: conv weight, ``[C_out, C_in/g, *k]`` (transposed: ``[C_in, C_out/g, *k]``).
        bias: conv bias ``[C_out]`` or None (a conv without bias).
        running_mean, running_var: the BN's running statistics, ``[C_out]``.
        gamma, beta: the BN's affine weight and bias, or None when the BN has none.
        epsilon: the BN's own epsilon.
        transposed: ``kernel`` belongs to a ConvTranspose layer.
        groups: the conv's groups (needed only when ``transposed``).

    Returns:
        ``(kernel, bias)`` of one conv, in ``kernel``'s dtype.
    """
    dtype = kernel.dtype
    mean, var = _np64(running_mean), _np64(running_var)
    out_channels = mean.shape[0]
    gamma = np.ones(out_channels) if gamma is None else _np64(gamma)
    beta = np.zeros(out_channels) if beta is None else _np64(beta)
    scale = gamma / np.sqrt(var + float(epsilon))
    w = _np64(kernel)
    spatial = [1] * (len(kernel.shape) - 2)
    if transposed:
        in_channels = w.shape[0]
        if groups < 1 or in_channels % groups or w.shape[1] * groups != out_channels:
            raise KernelError(f"transposed kernel {list(kernel.shape)} with groups={groups} gives "
                              f"{w.shape[1] * max(groups, 1)} output channels, BatchNorm has {out_channels}; "
                              "pass the conv's own groups")
        w = w.reshape([groups, in_channels // groups, out_channels // groups] + list(w.shape[2:]))
        w = w * scale.reshape([groups, 1, out_channels // groups] + spatial)
        w = w.reshape(list(kernel.shape))
    else:
        if kernel.shape[0] != out_channels:
            raise KernelError(f"kernel has {kernel.shape[0]} output channels, BatchNorm has {out_channels}")
        w = w * scale.reshape([-1, 1] + spatial)
    b = np.zeros(out_channels) if bias is None else _np64(bias)
    new_bias = beta + (b - mean) * scale
    return _tensor(w, dtype), _tensor(new_bias, dtype)


def identity_kernel(channels: int,
                    groups: int = 1,
                    kernel_size: Size = 1,
                    ndim: int = 2,
                    dtype: str = "float32") -> Tensor:
    """A conv kernel (stride 1, 'same' padding) that returns its input.

    Output channel ``c`` reads input channel ``c``, which within its group is
    input slot ``c % (channels // groups)``; the one non-zero tap sits at the
    kernel centre.
    """
    size = _as_tuple(kernel_size, ndim, "kernel size")
    if any(k % 2 == 0 for k in size):
        raise KernelError(f"identity needs an odd kernel size to have a centre, got {size}")
    if channels % groups:
        raise KernelError(f"{channels} channels do not split into {groups} groups")
    per_group = channels // groups
    kernel = paddle.zeros([channels, per_group] + list(size), dtype=dtype)
    centre = tuple(k // 2 for k in size)
    index = paddle.arange(channels)
    slots = [index, index % per_group] + [paddle.full([channels], c, "int64") for c in centre]
    return paddle.scatter_nd_add(kernel, paddle.stack(slots, axis=1), paddle.ones([channels], dtype))


def pad_kernel(kernel: Tensor, size: Size) -> Tensor:
    """Pad a kernel with zeros, centred, to a larger spatial size.

    1x1 -> 3x3, 1x3 and 3x1 -> 3x3, kxk -> KxK. Equivalent only when the
    smaller conv's padding is smaller by the same amount on each side
    (e.g. a 1x1 conv with padding 0 beside a 3x3 conv with padding 1).
    """
    ndim = len(kernel.shape) - 2
    target = _as_tuple(size, ndim, "target size")
    pads = []
    for have, want in zip(kernel.shape[2:], target):
        if want < have or (want - have) % 2:
            raise KernelError(f"cannot centre a kernel of size {tuple(kernel.shape[2:])} in {target}: "
                              "each dim must grow by an even amount")
        pads.append((want - have) // 2)
    if not any(pads):
        return kernel
    if kernel.dtype in _NUMPY_FLOATS:  # the fast path, as in fold_bn
        return paddle.to_tensor(np.pad(kernel.numpy(), [(0, 0), (0, 0)] + [(p, p) for p in pads]))
    # paddle's pad lists the last dim first: [w_lo, w_hi, h_lo, h_hi, ...]
    flat = []
    for p in reversed(pads):
        flat += [p, p]
    data_format = {1: "NCL", 2: "NCHW", 3: "NCDHW"}[ndim]
    return paddle.nn.functional.pad(kernel, flat, data_format=data_format)


def _scale_vector(scale, out_channels: int) -> np.ndarray:
    """A branch scale as ``[out_channels]`` float64: None -> 1, a number or one-element tensor -> that
    number, a tensor or array of ``out_channels`` elements -> one scale per output channel."""
    if scale is None:
        return np.ones(out_channels)
    values = _np64(scale) if isinstance(scale, Tensor) else np.asarray(scale, dtype=np.float64)
    values = values.reshape([-1])
    if values.size == 1:
        return np.full(out_channels, values[0])
    if values.size == out_channels:
        return values
    raise KernelError(f"a branch scale has {values.size} elements; it must be one number or one per output "
                      f"channel ({out_channels})")


def merge_parallel(branches: Sequence[KernelBias],
                   scales: Optional[Sequence[Union[float, Tensor, None]]] = None) -> KernelBias:
    """Branches whose outputs are added, each times a scale, as one conv.

    ``sum_i s_i * (W_i * x + b_i) = (sum_i s_i W_i) * x + sum_i s_i b_i``.
    A scale may be a float, a one-element tensor (a learnable alpha), a
    tensor of one scale per output channel (``[C_out]``), or None (meaning 1).
    Kernels must already share one shape (see :func:`pad_kernel`).
    """
    if not branches:
        raise KernelError("merge_parallel needs at least one branch")
    if scales is None:
        scales = [None] * len(branches)
    if len(scales) != len(branches):
        raise KernelError(f"{len(branches)} branches but {len(scales)} scales")
    dtype = branches[0][0].dtype
    shape = list(branches[0][0].shape)
    kernel = np.zeros(shape)
    bias = np.zeros(shape[0])
    spatial = [1] * (len(shape) - 1)
    for (k, b), s in zip(branches, scales):
        if list(k.shape) != shape:
            raise KernelError(f"cannot add kernels of shapes {shape} and {list(k.shape)}; pad them first")
        s = _scale_vector(s, shape[0])
        kernel += s.reshape([-1] + spatial) * _np64(k)
        if b is not None:
            bias += s * _np64(b)
    return _tensor(kernel, dtype), _tensor(bias, dtype)


def merge_sequential(first: KernelBias, second: KernelBias, groups: int = 1) -> KernelBias:
    """A 1x1 conv followed by a kxk conv, as one kxk conv.

    ``W2 * (W1 x + b1) + b2 = (W2 . W1) * x + (b2 + sum_{m,taps} W2[o, m] b1[m])``.

    Conditions for equivalence: the 1x1 conv has stride 1 and padding 0; both
    convs have the same ``groups``; and the kxk conv has padding 0 -- or, if it
    pads, ``b1`` is zero, because its zero padding would otherwise stand where
    the 1x1 conv's output holds ``b1`` (DBB pads with ``b1`` instead).

    Args:
        first: ``(kernel [M, C/g, 1, ...], bias [M] or None)`` of the 1x1 conv.
        second: ``(kernel [O, M/g, *k], bias [O] or None)`` of the kxk conv.
        groups: groups of both convs.
    """
    k1, b1 = first
    k2, b2 = second
    dtype = k2.dtype
    if any(s != 1 for s in k1.shape[2:]):
        raise KernelError(f"the first conv must be 1x1, its kernel is {list(k1.shape[2:])}")
    mid, out = k1.shape[0], k2.shape[0]
    if k2.shape[1] * groups != mid:
        raise KernelError(f"the first conv gives {mid} channels, the second reads {k2.shape[1] * groups}")
    w1 = _f64(k1).reshape([groups, mid // groups, k1.shape[1]])  # g, M/g, C/g
    w2 = _f64(k2).reshape([groups, out // groups, mid // groups, -1])  # g, O/g, M/g, taps
    kernel = paddle.einsum("gomt,gmc->goct", w2, w1)
    kernel = kernel.reshape([out, k1.shape[1]] + list(k2.shape[2:]))
    bias = paddle.zeros([out], FOLD_DTYPE) if b2 is None else _f64(b2)
    if b1 is not None:
        b1g = _f64(b1).reshape([groups, 1, mid // groups, 1])
        bias = bias + (w2 * b1g).sum(axis=[2, 3]).reshape([out])
    return paddle.cast(kernel, dtype), paddle.cast(bias, dtype)


def merge_concat(branches: Sequence[KernelBias]) -> KernelBias:
    """Branches reading the same input, concatenated on channels, as one conv.

    Kernels are padded centred to the largest size first, so branches of
    different kernel sizes with 'same' padding concatenate too.
    """
    if not branches:
        raise KernelError("merge_concat needs at least one branch")
    dtypes = {str(t.dtype) for k, b in branches for t in (k, b) if t is not None}
    if len(dtypes) > 1:
        raise KernelError(f"merge_concat: branches have different dtypes ({', '.join(sorted(dtypes))}); "
                          "cast them to one dtype first")
    ndim = len(branches[0][0].shape) - 2
    size = [max(k.shape[2 + d] for k, _ in branches) for d in range(ndim)]
    kernels, biases = [], []
    for k, b in branches:
        kernels.append(pad_kernel(k, size))
        biases.append(paddle.zeros([k.shape[0]], k.dtype) if b is None else b)
    return paddle.concat(kernels, axis=0), paddle.concat(biases, axis=0)


def avg_pool_kernel(channels: int, kernel_size: Size, ndim: int = 2, dtype: str = "float32") -> Tensor:
    """Average pooling as a (channel-wise, groups=1) conv kernel.

    Equal to ``AvgPool`` with the same kernel size and stride when the pool
    has no padding or counts padded zeros (``exclusive=False``); with
    ``exclusive=True`` border windows divide by fewer taps and differ.
    """
    size = _as_tuple(kernel_size, ndim, "kernel size")
    taps = 1
    for k in size:
        taps *= k
    kernel = paddle.zeros([channels, channels] + list(size), dtype=FOLD_DTYPE)
    ones = paddle.full([channels] + list(size), 1.0 / taps, FOLD_DTYPE)
    eye = paddle.eye(channels, dtype=FOLD_DTYPE).reshape([channels, channels] + [1] * ndim)
    kernel = kernel + eye * ones.unsqueeze(1)
    return paddle.cast(kernel, dtype)
