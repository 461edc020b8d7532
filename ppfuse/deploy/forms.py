"""Program forms per runtime: exact rewrites in force while a model is traced for export.

Paddle Inference's oneDNN path fails on ``nearest_interp``/``bilinear_interp`` and crashes on a fused
conv + ``leaky_relu``, and runs some ops on slow reference kernels. Each context manager here swaps a
Paddle function for one computing the same values in a form the runtime runs (and runs fast); they are
on while tracing *and* while verifying the deployed model, so each form is verified with the rest:

* every ``F.interpolate``: nearest x-integer upsampling as a transposed conv with an identity kernel,
  bilinear by an integer factor as slices and weighted sums, any other nearest/bilinear resize as gathers;
* ``F.leaky_relu(x, s)`` as ``maximum(x, s * x)`` for ``s`` in [0, 1];
* ``nn.Conv2D``'s bias as a ``[C, 1, 1]`` add (``conv_bias="channel_add"``), the form Paddle's plain CPU
  kernels (oneDNN off) broadcast fast; the default keeps Paddle's own form, which oneDNN fuses.

Model-specific forms (ppdet's ESE layer) are passed in by the caller (:mod:`ppfuse.ppdet.export`).
"""
from __future__ import annotations

import contextlib
import functools
from typing import Dict, Sequence

import numpy as np
import paddle
import paddle.nn as nn
import paddle.nn.functional as F

from ppfuse.errors import ExportError

_INTERPOLATE = F.interpolate
_LEAKY_RELU = F.leaky_relu


def nearest_upsample(x=None, size=None, scale_factor=None, mode="nearest", align_corners=False, align_mode=0,
                     data_format=None, name=None, *, deconv: bool = True, **more):
    """``F.interpolate`` with nearest x-integer upsampling written as a transposed conv
    (:func:`upsample_by_deconv`; reshape+expand+reshape where the channel count is not static, or with
    ``deconv=False``), and
    bilinear by an integer factor (half-pixel) as slices and weighted sums (:func:`_bilinear_by_integer`):
    oneDNN fails on both
    interp ops.

    Nearest: ``out[i, j] = in[i // s, j // s]`` exactly (the transposed conv turns -0.0 into +0.0, the same
    value; reshape+expand is bit-identical); an integer ``size``
    that is the same integer multiple of a static input height and width counts as that factor. Bilinear:
    the kernel's weights in its order (equal up to fp32 rounding at the borders; verified with the rest of
    the export). Anything else goes to ``F.interpolate`` unchanged.
    """
    # recompute_scale_factor changes nothing for an integer factor (nn.Upsample passes None)
    plain = {k: v for k, v in more.items() if not (k == "recompute_scale_factor" or (k == "antialias" and not v))}
    if x is None or plain:  # Paddle 3's other spellings (input=, antialias=True)
        return _INTERPOLATE(*(() if x is None else (x,)), size=size, scale_factor=scale_factor, mode=mode,
                            align_corners=align_corners, **more)
    data_format = data_format or "NCHW"
    factor, given_size = scale_factor, size  # a size read as a factor below is kept for the gather form
    if isinstance(factor, (list, tuple)) and len(set(factor)) == 1:
        factor = factor[0]
    if factor is None and isinstance(size, (list, tuple)) and len(size) == 2 and len(x.shape) == 4 \
            and all(isinstance(v, int) for v in size) and all(isinstance(v, int) and v > 0 for v in x.shape[2:]) \
            and size[0] % x.shape[2] == 0 and size[0] // x.shape[2] == size[1] / x.shape[3]:
        factor, size = size[0] // x.shape[2], None
    if (mode == "bilinear" and size is None and data_format == "NCHW" and not align_corners and align_mode == 0
            and isinstance(factor, (int, float)) and float(factor) == int(factor) and int(factor) >= 2
            and len(x.shape) == 4 and all(isinstance(v, int) and v > 0 for v in x.shape[2:])):
        return _bilinear_by_integer(_bilinear_by_integer(x, 3, int(factor)), 2, int(factor))
    if (mode != "nearest" or size is not None or data_format != "NCHW" or not isinstance(factor, (int, float))
            or float(factor) != int(factor) or int(factor) < 1):
        if mode in ("nearest", "bilinear") and data_format == "NCHW" and len(x.shape) == 4:
            return _interpolate_by_gather(x, given_size, scale_factor, mode, bool(align_corners), int(align_mode))
        return _INTERPOLATE(x, size=size, scale_factor=scale_factor, mode=mode, align_corners=align_corners,
                            align_mode=align_mode, data_format=data_format, name=name)
    s = int(factor)
    if s > 1 and deconv and x.shape[1] > 0:
        return upsample_by_deconv(x, s)
    y = x.unsqueeze([3, 5]).expand([-1, -1, -1, s, -1, s]) if s > 1 else x
    return y.flatten(4, 5).flatten(2, 3) if s > 1 else y


UPSAMPLE_FORM = "conv2d_transpose with an identity kernel (reshape+expand where channels are unknown)"
# channels per group of the identity transposed conv: the group's kernel is a 16x16 identity per tap
UPSAMPLE_GROUP = 16


def upsample_kernel(channels: int, factor: int) -> np.ndarray:
    """The weight ``[C, C / groups, s, s]`` of a transposed conv with stride ``s`` that repeats every
    pixel ``s x s`` times: per group of :data:`UPSAMPLE_GROUP` channels (all of them if ``C`` is not a
    multiple), an identity matrix at every one of the ``s x s`` taps."""
    group = UPSAMPLE_GROUP if channels % UPSAMPLE_GROUP == 0 else channels
    eye = np.eye(group, dtype="float32")[:, :, None, None]
    return np.tile(np.broadcast_to(eye, (group, group, factor, factor)), (channels // group, 1, 1, 1))


def upsample_by_deconv(x, factor: int):
    """Nearest upsampling by an integer ``factor`` as ``conv2d_transpose`` (stride = kernel = factor) with
    :func:`upsample_kernel`: output pixel ``(i, j)`` is ``1 * x[i // s, j // s]`` plus zeros times the
    other channels of its group -- the same value for finite inputs. oneDNN runs it as a deconvolution
    whose output stays in oneDNN's blocked layout, so the concat that follows and the convs after it need
    no reorders."""
    channels = int(x.shape[1])
    weight = upsample_kernel(channels, factor)
    groups = channels // weight.shape[1]
    return F.conv2d_transpose(x, paddle.to_tensor(weight, dtype=x.dtype), stride=factor, groups=groups)


def _bilinear_by_integer(x, axis: int, s: int):
    """Bilinear upsampling by an integer ``s >= 2`` (half-pixel centres: ``align_corners=False, align_mode=0``)
    along one axis of an NCHW tensor, as slices and weighted sums: output ``s*i + r`` samples the input at
    ``i + d`` with ``d = (r + 0.5) / s - 0.5`` in (-0.5, 0.5), so it is ``-d x[i-1] + (1 + d) x[i]`` for
    ``d < 0`` and ``(1 - d) x[i] + d x[i+1]`` otherwise, the border repeated (the kernel clamps the source
    position at 0 and the upper neighbour at the last row). For ``s = 2``: ``0.25 x[i-1] + 0.75 x[i]`` and
    ``0.75 x[i] + 0.25 x[i+1]``, the weights and order of Paddle's kernel (which interpolates along W, then
    H); for other ``s`` its weights up to fp32 rounding of the source position."""
    n = x.shape[axis]
    first = paddle.slice(x, [axis], [0], [1])
    last = paddle.slice(x, [axis], [n - 1], [n])
    padded = paddle.concat([first, x, last], axis=axis)
    left = paddle.slice(padded, [axis], [0], [n])
    right = paddle.slice(padded, [axis], [2], [n + 2])
    phases = []
    for r in range(s):
        d = (r + 0.5) / s - 0.5
        phases.append(left * (-d) + x * (1.0 + d) if d < 0 else x * (1.0 - d) + right * d)
    out = paddle.stack(phases, axis=axis + 1)
    shape = list(x.shape)
    shape[axis] = s * n
    return out.reshape([-1 if i == 0 else v for i, v in enumerate(shape)])


def _interpolate_by_gather(x, size, scale_factor, mode: str, align_corners: bool, align_mode: int):
    """Nearest or bilinear resizing of an NCHW tensor as index gathers and weighted sums, any output size
    (a tensor too: BlazeFace's FPN resizes to ``paddle.shape(y)[-2:]``), the source positions computed as
    Paddle's CPU kernel computes them in float32: ``ratio = (in - 1) / (out - 1)`` with ``align_corners``,
    else ``1 / scale`` or ``in / out``; nearest takes ``int(ratio * k)`` (``+ 0.5`` with align_corners);
    bilinear ``ratio * (k + 0.5) - 0.5`` (half-pixel, ``align_mode=0``) or ``ratio * k``, clamped at 0, and
    its two neighbours weighted by the distance. Bilinear is separable (W, then H), so it equals the
    kernel's four-term sum up to fp32 rounding."""
    if isinstance(scale_factor, (list, tuple)):
        scales = [float(v) for v in scale_factor]
    elif scale_factor is not None:
        scales = [float(scale_factor)] * 2
    else:
        scales = [0.0, 0.0]
    out_sizes = []
    for axis in (2, 3):
        if size is not None:
            target = size[axis - 2]
        else:
            target = int(float(x.shape[axis]) * scales[axis - 2])
        out_sizes.append(target)
    y = x
    for axis, out_n, scale in zip((3, 2), out_sizes[::-1], scales[::-1]):
        in_n = y.shape[axis]
        k = paddle.arange(out_n, dtype="float32") if not isinstance(out_n, int) else \
            paddle.arange(0, out_n, dtype="float32")
        out_f = paddle.cast(out_n, "float32") if not isinstance(out_n, int) else float(out_n)
        if align_corners:
            ratio = (float(in_n) - 1.0) / (out_f - 1.0) if not isinstance(out_f, float) else \
                ((in_n - 1.0) / (out_f - 1.0) if out_f > 1 else 0.0)
        else:
            ratio = (1.0 / scale) if scale > 0 else float(in_n) / out_f
        if mode == "nearest":
            index = paddle.floor(ratio * k + (0.5 if align_corners else 0.0)).astype("int64")
            y = paddle.gather(y, paddle.clip(index, 0, in_n - 1), axis=axis)
            continue
        half = (not align_corners) and align_mode == 0
        source = paddle.clip(ratio * (k + 0.5) - 0.5, min=0.0) if half else ratio * k
        low = paddle.floor(source)
        weight = source - low  # the distance to the lower neighbour: the upper one's weight
        low = low.astype("int64")
        high = paddle.minimum(low + 1, paddle.full_like(low, in_n - 1))
        shape = [1, 1, 1, 1]
        shape[axis] = -1
        weight = weight.reshape(shape)
        y = paddle.gather(y, low, axis=axis) * (1.0 - weight) + paddle.gather(y, high, axis=axis) * weight
    return y


def leaky_relu_as_maximum(x, negative_slope=0.01, name=None):
    """``F.leaky_relu`` for a slope in [0, 1] written as ``maximum(x, slope * x)``: the same value bit for
    bit (``x`` where ``x > 0``, else ``slope * x``). Paddle 3.3.1's oneDNN conv + leaky_relu fusion crashes
    (segmentation fault in ``FusedConv2dOp::Build``: DarkNet, PP-YOLO, YOLOv3, TTFNet)."""
    slope = float(negative_slope)
    if not 0.0 <= slope <= 1.0:
        return _LEAKY_RELU(x, negative_slope, name)
    return paddle.maximum(x, x * slope)


@contextlib.contextmanager
def patched(attributes):
    """Set ``(object, name, value)`` attributes for the duration; put the old ones back."""
    saved = [(owner, attr, getattr(owner, attr)) for owner, attr, _ in attributes]
    for owner, attr, value in attributes:
        setattr(owner, attr, value)
    try:
        yield
    finally:
        for owner, attr, value in saved:
            setattr(owner, attr, value)


def onednn_friendly_upsample(deconv: bool = True):
    """While tracing, every ``F.interpolate`` (and ``F.upsample``, ``nn.Upsample``) call goes through
    :func:`nearest_upsample`: oneDNN's ``nearest_interp`` fails in Paddle 3.3.1. ``deconv=False``
    keeps integer nearest upsampling as reshape+expand, the plain form it needs to run at all."""
    from paddle.nn.functional import common
    resize = nearest_upsample if deconv else functools.partial(nearest_upsample, deconv=False)
    return patched([(F, "interpolate", resize), (common, "interpolate", resize)])


def onednn_friendly_leaky_relu():
    """While tracing, ``F.leaky_relu`` (and ``nn.LeakyReLU``) is :func:`leaky_relu_as_maximum`."""
    from paddle.nn.functional import activation
    return patched([(F, "leaky_relu", leaky_relu_as_maximum), (activation, "leaky_relu", leaky_relu_as_maximum)])


def _conv2d_bias_per_channel(self, x):
    """``nn.Conv2D.forward`` with the bias added as ``[C, 1, 1]`` instead of Paddle's ``[1, C, 1, 1]``.

    The same sum, bit for bit; but Paddle's CPU ``add`` broadcasts a ``[1, C, 1, 1]``
    operand over a batch slowly, which made the folded model slower than ppdet's
    (conv + batch_norm) without oneDNN.
    With oneDNN it is the slower form: oneDNN's conv-bias fusion matches Paddle's own
    ``[1, C, 1, 1]`` add only, and leaves this one a separate binary primitive.
    """
    if self.bias is None or self._data_format != "NCHW" or self._padding_mode != "zeros":
        return _CONV2D_FORWARD(self, x)
    out = F.conv2d(x, self.weight, None, self._stride, self._padding, self._dilation, self._groups,
                   self._data_format)
    return out + self.bias.reshape([-1, 1, 1])


_CONV2D_FORWARD = nn.Conv2D.forward


def cpu_friendly_conv_bias():
    """While tracing, make every ``nn.Conv2D`` add its bias per channel (:func:`_conv2d_bias_per_channel`)."""
    return patched([(nn.Conv2D, "forward", _conv2d_bias_per_channel)])



# How the export writes each conv's bias: "in_conv" keeps Paddle's own form (conv2d, then an add of
# the bias as [1, C, 1, 1]), which oneDNN fuses into the conv -- the default, as Paddle Inference runs
# oneDNN by default; "channel_add" adds it as [C, 1, 1], which Paddle's own CPU kernels (oneDNN off)
# broadcast faster over a batch > 1.
CONV_BIAS_FORMS = ("in_conv", "channel_add")
DEFAULT_CONV_BIAS = "in_conv"


@contextlib.contextmanager
def program_forms(conv_bias: str = DEFAULT_CONV_BIAS, speed_forms: bool = True, model_forms: Sequence = ()):
    """Every generic form of the exported program, plus ``model_forms`` (context managers) when ``speed_forms``.

    Args:
        conv_bias: one of :data:`CONV_BIAS_FORMS`.
        speed_forms: the forms for speed -- nearest upsampling as a transposed conv and ``model_forms``.
            Off, only what oneDNN needs to run at all stays (the benchmark's ppdet path).
        model_forms: model-specific forms, entered after the generic ones.
    """
    if conv_bias not in CONV_BIAS_FORMS:
        raise ExportError(f"conv_bias {conv_bias!r}: use one of {', '.join(CONV_BIAS_FORMS)}")
    with contextlib.ExitStack() as stack:
        stack.enter_context(onednn_friendly_upsample(deconv=speed_forms))
        stack.enter_context(onednn_friendly_leaky_relu())
        if speed_forms:
            for form in model_forms:
                stack.enter_context(form)
        if conv_bias == "channel_add":
            stack.enter_context(cpu_friendly_conv_bias())
        yield


def forms_report(conv_bias: str = DEFAULT_CONV_BIAS, speed_forms: bool = True) -> Dict[str, str]:
    """What :func:`program_forms` wrote, for ``ppfuse_report.json``."""
    return {"nearest_upsample": UPSAMPLE_FORM if speed_forms else "reshape+expand+reshape",
            "leaky_relu": "maximum(x, slope * x)", "bilinear_by_integer": "slices and weighted sums",
            "conv_bias": conv_bias}
