"""Export a PaddleDetection detector for Paddle Inference.

ppdet 2.6.0's own export does not run on Paddle 3.x (PIR): ``to_static``
needs ``full_graph=True``, its ``multiclass_nms`` fails under PIR tracing, and
``_prune_input_spec`` returns ``{}``. ppfuse owns this small path instead:

1. wrap the model (:func:`ppfuse.detectors.wrapper_for`): PP-YOLOE style as
   ``(image, scale_factor) -> (bbox [K, 6], bbox_num [N])`` (or the raw
   ``(boxes, scores)`` before NMS), NMS by ``multiclass_nms3``; any other
   family as ppdet's own forward and post-processing, with the inputs an
   output uses and ppdet's post-processing ops in PIR-traceable form;
2. trace it with ``paddle.jit.to_static(full_graph=True)`` under
   :func:`deploy_rewrites`, forms Paddle Inference's oneDNN path runs (fast)
   (each verified with the rest of the deployed model, see :func:`verify_deployed`):
   nearest upsampling as a transposed conv with an identity kernel (exact,
   and oneDNN keeps its blocked layout through it) and other resizes as
   gathers (oneDNN's ``nearest_interp``/``bilinear_interp`` fail), ``leaky_relu``
   as ``maximum`` (oneDNN's conv + leaky_relu fusion crashes), CSPResNet's ESE
   ``x.mean((2, 3))`` as ``adaptive_avg_pool2d(x, 1)`` (oneDNN runs the mean as
   its slow reference reduction), conv biases inside the conv (oneDNN fuses
   them) unless ``conv_bias="channel_add"`` asks for separate ``[C, 1, 1]`` adds;
3. write ``model.json``/``model.pdiparams``, ``infer_cfg.yml`` (the format of
   PaddleDetection's ``deploy/python/infer.py``, fitted to the fixed input size),
   the deploy checkpoint and a report, into a temporary directory moved into
   place only when complete.
"""
from __future__ import annotations

import contextlib
import filecmp
import functools
import json
import os
import shutil
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import numpy as np
import paddle
import paddle.nn as nn
import paddle.nn.functional as F

from . import checkpoint, detectors, layers
from .detection import (BuiltModel, DetectionConfig, DetectorForInference, build_model,  # noqa: F401
                        detector_input_spec, raw_outputs_float64, sample_inputs)
from .errors import ConfigError, ExportError, VerificationError
from .export_format import (DEPLOY_CHECKPOINT, INFER_CFG, MODEL_FILE, ONNX_FILE, PARAMS_FILE,  # noqa: F401
                            PLAIN_MODEL_FILE, PLAIN_PROGRAM_FILE, REPORT_FILE,
                            program_file, require_paddle_3)
from .runtime.base import RuntimeOptions
from .runtime.paddle_inference import create_predictor, run_predictor
from .verify import VerificationResult, compare, judge

COUNTED_OPS = ("conv2d", "depthwise_conv2d", "deformable_conv", "conv2d_transpose", "batch_norm", "add",
               "add_tensors", "if", "nearest_interp", "multiclass_nms3", "matrix_nms")

# whole-model tolerance of the export check, on boxes / input size and scores (both O(1)).
# Measured fp32 differences: ~1e-5 (PP-YOLOE+ s, 320); the fp32 training form itself is
# that far from a float64 evaluation, so tighter would reject exact conversions.
DEFAULT_ATOL = 1e-4
DEFAULT_RTOL = 1e-4


_INTERPOLATE = F.interpolate
_LEAKY_RELU = F.leaky_relu


def nearest_upsample(x=None, size=None, scale_factor=None, mode="nearest", align_corners=False, align_mode=0,
                     data_format=None, name=None, *, deconv: bool = True, **more):
    """``F.interpolate`` with nearest x-integer upsampling written as a transposed conv
    (:func:`upsample_by_deconv`; reshape+expand+reshape where the channel count is not static, or with
    ``deconv=False``), and
    bilinear x2 (half-pixel) as slices and weighted sums (:func:`_bilinear_x2`): oneDNN fails on both
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
    factor = scale_factor
    if isinstance(factor, (list, tuple)) and len(set(factor)) == 1:
        factor = factor[0]
    if factor is None and isinstance(size, (list, tuple)) and len(size) == 2 and len(x.shape) == 4 \
            and all(isinstance(v, int) for v in size) and all(isinstance(v, int) and v > 0 for v in x.shape[2:]) \
            and size[0] % x.shape[2] == 0 and size[0] // x.shape[2] == size[1] / x.shape[3]:
        factor, size = size[0] // x.shape[2], None
    if (mode == "bilinear" and size is None and data_format == "NCHW" and not align_corners and align_mode == 0
            and isinstance(factor, (int, float)) and float(factor) == 2.0):
        return _bilinear_x2(_bilinear_x2(x, 3), 2)
    if (mode != "nearest" or size is not None or data_format != "NCHW" or not isinstance(factor, (int, float))
            or float(factor) != int(factor) or int(factor) < 1):
        if mode in ("nearest", "bilinear") and data_format == "NCHW" and len(x.shape) == 4:
            return _interpolate_by_gather(x, size, scale_factor, mode, bool(align_corners), int(align_mode))
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
    no reorders (PP-YOLOE+ s at 640: 31 -> 21 reorders, 0.94x latency, README Export)."""
    channels = int(x.shape[1])
    weight = upsample_kernel(channels, factor)
    groups = channels // weight.shape[1]
    return F.conv2d_transpose(x, paddle.to_tensor(weight, dtype=x.dtype), stride=factor, groups=groups)


def _bilinear_x2(x, axis: int):
    """Bilinear x2 upsampling (half-pixel centres: ``align_corners=False, align_mode=0``) along one axis of
    an NCHW tensor: output ``2i`` is ``0.25 x[i-1] + 0.75 x[i]``, ``2i+1`` is ``0.75 x[i] + 0.25 x[i+1]``, the
    border repeated -- the weights and order of Paddle's kernel (which interpolates along W, then H)."""
    n = x.shape[axis]
    first = paddle.slice(x, [axis], [0], [1])
    last = paddle.slice(x, [axis], [n - 1], [n])
    padded = paddle.concat([first, x, last], axis=axis)
    left = paddle.slice(padded, [axis], [0], [n])
    right = paddle.slice(padded, [axis], [2], [n + 2])
    even = left * 0.25 + x * 0.75
    odd = x * 0.75 + right * 0.25
    out = paddle.stack([even, odd], axis=axis + 1)
    shape = list(x.shape)
    shape[axis] = 2 * n
    return out.reshape([-1 if i == 0 else s for i, s in enumerate(shape)])


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
            y = paddle.index_select(y, paddle.clip(index, 0, in_n - 1), axis=axis)
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
        y = paddle.index_select(y, low, axis=axis) * (1.0 - weight) + paddle.index_select(y, high, axis=axis) * weight
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
def _patched(attributes):
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
    return _patched([(F, "interpolate", resize), (common, "interpolate", resize)])


def onednn_friendly_leaky_relu():
    """While tracing, ``F.leaky_relu`` (and ``nn.LeakyReLU``) is :func:`leaky_relu_as_maximum`."""
    from paddle.nn.functional import activation
    return _patched([(F, "leaky_relu", leaky_relu_as_maximum), (activation, "leaky_relu", leaky_relu_as_maximum)])


def _conv2d_bias_per_channel(self, x):
    """``nn.Conv2D.forward`` with the bias added as ``[C, 1, 1]`` instead of Paddle's ``[1, C, 1, 1]``.

    The same sum, bit for bit; but Paddle's CPU ``add`` broadcasts a ``[1, C, 1, 1]``
    operand over a batch slowly (dygraph, 1 thread, [2, 384, 40, 40]: 10 ms vs 0.7 ms),
    which made the folded model slower than ppdet's (conv + batch_norm) without oneDNN.
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
    return _patched([(nn.Conv2D, "forward", _conv2d_bias_per_channel)])


def _ese_with_pool(self, x):
    """ppdet's ``EffectiveSELayer.forward`` with ``x.mean((2, 3), keepdim=True)`` written as
    ``F.adaptive_avg_pool2d(x, 1)``: the same mean (up to fp32 summation order), which
    oneDNN runs as a jit pooling primitive instead of its reference reduction (PP-YOLOE+ s
    at 640, verbose profile: 4 reductions took ~28 ms of ~130, the pooling < 0.5 ms)."""
    return x * self.act(self.fc(F.adaptive_avg_pool2d(x, 1)))


@contextlib.contextmanager
def onednn_friendly_ese():
    """While tracing, make ppdet's CSPResNet ``EffectiveSELayer`` use :func:`_ese_with_pool`."""
    try:
        from ppdet.modeling.backbones import cspresnet
    except ImportError:
        yield
        return
    with _patched([(cspresnet.EffectiveSELayer, "forward", _ese_with_pool)]):
        yield


# How the export writes each conv's bias: "in_conv" keeps Paddle's own form (conv2d, then an add of
# the bias as [1, C, 1, 1]), which oneDNN fuses into the conv -- the default, as Paddle Inference runs
# oneDNN by default; "channel_add" adds it as [C, 1, 1], which Paddle's own CPU kernels (oneDNN off)
# broadcast faster over a batch > 1. Measured in README, Export.
CONV_BIAS_FORMS = ("in_conv", "channel_add")
DEFAULT_CONV_BIAS = "in_conv"


@contextlib.contextmanager
def deploy_rewrites(conv_bias: str = DEFAULT_CONV_BIAS, speed_forms: bool = True):
    """Every rewrite of the exported program; on while tracing and while verifying the deployed model.

    Args:
        conv_bias: one of :data:`CONV_BIAS_FORMS`.
        speed_forms: ppfuse's forms for speed -- CSPResNet's ESE mean as ``adaptive_avg_pool2d``
            (:func:`onednn_friendly_ese`) and nearest upsampling as a transposed conv
            (:func:`upsample_by_deconv`). The benchmark turns them off for ppdet's own path, which
            keeps only the rewrites it needs to run under oneDNN at all.
    """
    if conv_bias not in CONV_BIAS_FORMS:
        raise ExportError(f"conv_bias {conv_bias!r}: use one of {', '.join(CONV_BIAS_FORMS)}")
    with contextlib.ExitStack() as stack:
        stack.enter_context(onednn_friendly_upsample(deconv=speed_forms))
        stack.enter_context(onednn_friendly_leaky_relu())
        if speed_forms:
            stack.enter_context(onednn_friendly_ese())
        if conv_bias == "channel_add":
            stack.enter_context(cpu_friendly_conv_bias())
        yield


def rewrites_report(conv_bias: str = DEFAULT_CONV_BIAS, speed_forms: bool = True) -> Dict[str, str]:
    """What :func:`deploy_rewrites` wrote, for ``ppfuse_report.json``."""
    return {"nearest_upsample": UPSAMPLE_FORM if speed_forms else "reshape+expand+reshape",
            "leaky_relu": "maximum(x, slope * x)", "bilinear_x2": "slices and weighted sums",
            "ese_mean": "adaptive_avg_pool2d" if speed_forms else "mean",
            "conv_bias": conv_bias}


def save_inference_model(model: nn.Layer, path_prefix: str, size: List[int], with_nms: bool = True,
                         topk_before_nms: bool = False, conv_bias: str = DEFAULT_CONV_BIAS,
                         speed_forms: bool = True) -> None:
    """Trace ``model`` (a ppdet detector in eval mode, run by :func:`ppfuse.detectors.wrapper_for`) under
    :func:`deploy_rewrites` and ``paddle.jit.save`` it.

    A detector that does not use all of ``image, im_shape, scale_factor`` (``paddle.jit.save`` refuses an
    input no output depends on) is traced again with the ones it uses.
    """
    names = detectors.input_names(model)
    with deploy_rewrites(conv_bias, speed_forms), detectors.traceable(model):
        while True:
            wrapper = detectors.wrapper_for(model, with_nms, topk_before_nms, names)
            wrapper.eval()
            static = paddle.jit.to_static(wrapper, input_spec=detectors.input_spec(model, size, names),
                                          full_graph=True)
            used = _inputs_used(static.forward.concrete_program)
            if used == names:
                break
            names = used
        paddle.jit.save(static, path_prefix)


def save_plain_program(model: nn.Layer, directory: str, size: List[int], with_nms: bool = True) -> None:
    """Write ``model_plain.json`` next to an export's ``model.json`` (conv biases in oneDNN's form): the same
    network with the biases as ``[C, 1, 1]`` adds, the form Paddle's plain CPU kernels run faster (oneDNN
    off, batch > 1; Paddle Inference picks it then, :func:`ppfuse.runtime.paddle_inference.create_predictor`).
    It reads the export's ``model.pdiparams``: its own weights file is checked byte-identical, then removed.
    Both programs then run in Paddle Inference with oneDNN off on a generated image (batch 1: some families'
    post-processing takes no more); their outputs must be identical (the same sums in the same kernels), or
    nothing is kept and :class:`ExportError` says so.
    """
    save_inference_model(model, os.path.join(directory, PLAIN_MODEL_FILE), size, with_nms, conv_bias="channel_add")
    own_params = os.path.join(directory, PLAIN_MODEL_FILE + ".pdiparams")
    same_weights = filecmp.cmp(own_params, os.path.join(directory, PARAMS_FILE), shallow=False)
    os.remove(own_params)
    plain = os.path.join(directory, PLAIN_PROGRAM_FILE)
    problem = None if same_weights else "its weights file differs from model.pdiparams"
    if problem is None:
        values = {name: tensor.numpy() for name, tensor in detectors.generated_inputs(size, 1, 7).items()}
        options = RuntimeOptions(onednn=False)
        outputs = [run_predictor(create_predictor(directory, options, program), values)
                   for program in (program_file(directory), plain)]
        if not all(np.array_equal(a, b) for a, b in zip(*outputs)):
            problem = "its outputs differ from model.json's with oneDNN off"
    if problem:
        os.remove(plain)
        raise ExportError(f"{PLAIN_PROGRAM_FILE} (conv biases as [C, 1, 1] adds): {problem}; export with "
                          "--conv_bias channel_add for Paddle Inference without oneDNN")


def _inputs_used(concrete) -> tuple:
    """Names of the traced inputs some output depends on (ops inside if/loop regions count as using
    everything they read)."""
    needed, stack, seen = set(), list(concrete.outputs), set()
    while stack:
        value = stack.pop()
        if value is None or not value.initialized() or value.id in seen:  # (an optional operand left out)
            continue
        seen.add(value.id)
        op = value.get_defining_op()
        if op is None:
            continue
        if op.name() == "pd_op.data":
            needed.add(op.attrs().get("name"))
            continue
        ops = [op]
        while ops:
            current = ops.pop()
            stack.extend(current.operands_source())
            for block in current.blocks():
                ops.extend(block.ops)
    return tuple(name for name in ("image", "im_shape", "scale_factor") if name in needed)


def count_ops(model_dir: str) -> Dict[str, int]:
    """Op counts of a saved PIR program (``model.json``), ops inside ``if``/loop regions included.

    Names lose their dialect prefix and the trailing ``_`` of in-place variants
    (``pd_op.batch_norm_`` counts as ``batch_norm``). ``add_tensors`` counts the
    adds whose two inputs both depend on the model's inputs -- residual
    shortcuts and re-param branch sums, as opposed to a conv's bias add (one
    input a parameter): a converted model has as many as the plain network has
    shortcuts.
    """
    path = program_file(model_dir)
    if not path.endswith(".json"):
        return {}
    with open(path) as f:
        program = json.load(f)
    counts: Counter = Counter()
    from_inputs = set()  # ids of values computed from the feeds

    def ids(values):
        values = values if isinstance(values, list) else [values]
        return [v["%"] for v in values if isinstance(v, dict) and "%" in v]

    def walk_regions(regions):
        for region in regions or []:
            for block in region.get("blocks", []):
                for op in block.get("ops", []):
                    name = op["#"].split(".")[-1].rstrip("_")
                    counts[name] += 1
                    inputs = ids(op.get("I", []))
                    if name == "data" or any(i in from_inputs for i in inputs):
                        from_inputs.update(ids(op.get("O", [])))
                    if name == "add" and len(inputs) == 2 and all(i in from_inputs for i in inputs):
                        counts["add_tensors"] += 1
                    walk_regions(op.get("regions"))
    walk_regions(program["program"]["regions"])
    return dict(counts)


detector_outputs = detectors.ppyoloe_outputs  # its name before ppfuse.detectors


def verify_deployed(training_model: nn.Layer, deployed: nn.Layer, size: List[int], atol: float = DEFAULT_ATOL,
                    rtol: float = DEFAULT_RTOL, seed: int = 0, conv_bias: str = DEFAULT_CONV_BIAS,
                    speed_forms: bool = True) -> VerificationResult:
    """Raw detector outputs of both forms on a generated image (:func:`ppfuse.detectors.raw_outputs`:
    PP-YOLOE's boxes and scores before NMS, any other family's head outputs).

    The deployed model runs under the export's :func:`deploy_rewrites` (the
    function the saved program computes), the training form as ppdet wrote it.
    Boxes are compared as fractions of the input size, so one tolerance fits
    boxes and scores (both O(1)); other families' outputs each relative to its
    largest magnitude. Above tolerance, the training form is also
    evaluated in float64: some models (PP-YOLOE+ l with random weights: ~1 px
    at 640) amplify fp32 rounding beyond any fixed tolerance, and then the
    deployed model passes if it is no further from float64 than twice the
    training form's own fp32 error (:func:`ppfuse.verify.rounding_check`).
    Raises :class:`VerificationError` otherwise.
    """
    inputs = detectors.sample_inputs(training_model, size, 1, seed)
    original = detectors.raw_outputs(training_model, inputs, size)
    with deploy_rewrites(conv_bias, speed_forms):
        candidate = detectors.raw_outputs(deployed, inputs, size)
    reference, candidate = detectors.normalize_like(original, candidate)

    def float64_reference():
        from .verify import float64_copy
        try:
            exact = detectors.raw_outputs(float64_copy(training_model), [t.astype("float64") for t in inputs],
                                          size)
        except Exception as exc:  # a ppdet module that cannot compute in float64
            raise VerificationError(f"deployed model differs from the original beyond tolerance "
                                    f"({compare(reference, candidate, atol, rtol).brief()}), and the float64 "
                                    f"reference that would tell rounding from error could not run: "
                                    f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from None
        return detectors.normalize_like(original, exact)[1]
    result = judge(reference, candidate, atol, rtol, float64_reference)
    if not result.ok:
        raise VerificationError(f"deployed model differs from the original beyond tolerance: {result.brief()}")
    return result


@dataclass
class ExportResult:
    directory: str
    built: BuiltModel
    verification: Optional[VerificationResult]
    op_counts: Dict[str, int]
    seconds: Dict[str, float] = field(default_factory=dict)


def _infer_cfg(config: DetectionConfig, path: str, size: List[int], model: nn.Layer) -> None:
    """``infer_cfg.yml`` for PaddleDetection's ``deploy/python/infer.py``, written by ppdet's own function."""
    from ppdet.engine.export_utils import TRT_MIN_SUBGRAPH, _dump_infer_config
    config.activate()
    arch = config.architecture
    if arch != "PPYOLOEWithAuxHead" and not any(known in arch for known in TRT_MIN_SUBGRAPH):
        # (ppdet's function would end the process with os._exit(0))
        raise ConfigError(f"{config.path}: PaddleDetection's deploy/python/infer.py does not know architecture "
                          f"{arch}, so there is no infer_cfg.yml for it; export with ppdet's own tools")
    from ppdet.core.workspace import create, global_config
    if not hasattr(global_config.get("TestDataset"), "get_anno"):
        # PaddleDetection's own dataset files write TestDataset as a plain mapping (not !ImageFolder); ppdet's
        # Trainer creates the dataset before exporting, ppfuse does it here
        global_config["TestDataset"] = create("TestDataset")()
    _dump_infer_config(global_config, path, [None, 3] + list(size), model)
    _fit_to_export_size(path, size)


def _fit_to_export_size(path: str, size: List[int]) -> None:
    """Make ``infer_cfg.yml``'s preprocessing give the export's fixed ``size``.

    ppdet writes the config's ``Resize`` with the export size as target; with ``keep_ratio: true`` (RetinaNet,
    FCOS, DETR ...) an image of another aspect ratio comes out smaller, and the fixed-shape program cannot take
    it. ppdet batches such images padded with zeros after normalization (``PadBatch``/``PadStride``); so a
    ``Pad`` to ``size`` with zeros goes right before ``Permute`` (``im_shape`` stays the resized size). A
    config's own ``Pad`` (YOLOX's, to its training size) pads to ``size`` instead. Preprocessing without any
    resize (BlazeFace's) gets a ``Resize`` to ``size``. CenterNet's ``WarpAffine`` is left to the runtime
    (:class:`ppfuse.inference.Preprocess` fits the image into ``size`` first).
    """
    import yaml
    with open(path) as f:
        cfg = yaml.safe_load(f)
    ops = cfg.get("Preprocess") or []
    if not any(op.get("type") in ("Resize", "LetterBoxResize", "WarpAffine") for op in ops):
        # BlazeFace's runs at each image's own size; a fixed-size export needs the image at its size
        ops.insert(0, {"type": "Resize", "target_size": [int(size[0]), int(size[1])], "keep_ratio": False,
                       "interp": 1})
    pads = [op for op in ops if op.get("type") == "Pad"]
    for op in pads:  # the config's Pad (YOLOX: to 640) goes to the export's size
        op["size"] = [int(size[0]), int(size[1])]
    resize = next((op for op in ops if op.get("type") == "Resize"), None)
    if resize is not None and resize.get("keep_ratio") and not pads:
        where = next((i for i, op in enumerate(ops) if op.get("type") == "Permute"), len(ops))
        ops.insert(where, {"type": "Pad", "size": [int(size[0]), int(size[1])], "fill_value": [0.0, 0.0, 0.0]})
        ops[:] = [op for op in ops if op.get("type") != "PadStride"]
    with open(path, "w") as f:
        yaml.safe_dump(cfg, f, sort_keys=False)


def _export_onnx(model: nn.Layer, directory: str, size: List[int], with_nms: bool, log) -> dict:
    """Write and check ``model.onnx`` beside the Paddle model; raise (nothing written) when it is off.

    The ONNX model is converted from a program traced with per-class top-k
    before NMS (see :class:`DetectorForInference`); it is checked against the
    Paddle model written beside it.
    """
    from . import onnx_support
    staging = os.path.join(directory, ".onnx_source")
    save_inference_model(model, os.path.join(staging, MODEL_FILE), size, with_nms, topk_before_nms=True)
    path = onnx_support.to_onnx(staging, os.path.join(directory, ONNX_FILE))
    shutil.rmtree(staging)
    nodes = onnx_support.node_counts(path)
    if nodes.get("BatchNormalization", 0) or nodes.get("If", 0):
        raise ExportError(f"{path}: {nodes.get('BatchNormalization', 0)} BatchNormalization and "
                          f"{nodes.get('If', 0)} If nodes left; the deployed program should have none")
    image, scale = sample_inputs(size, 1, 3)
    # same tolerance as the export check: 1e-4 of the input size, in pixels
    ok, how = onnx_support.check_against_paddle(directory, path, {"image": image.numpy(),
                                                                  "scale_factor": scale.numpy()},
                                                box_atol=DEFAULT_ATOL * max(size), with_nms=with_nms)
    log(f"ONNX Runtime vs Paddle Inference: {how}")
    if not ok:
        raise VerificationError(f"{path}: ONNX Runtime's outputs differ from Paddle Inference's: {how}")
    return {"nodes": nodes, "check": how}


@contextlib.contextmanager
def atomic_directory(target: str):
    """Yield a temporary directory beside ``target``; on success it replaces ``target`` whole.

    On any failure the temporary directory is removed and ``target`` (a
    previous export, say) is left as it was.
    """
    parent = os.path.dirname(os.path.abspath(target))
    try:
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=".ppfuse-tmp-", dir=parent)
        os.chmod(tmp, 0o755)
    except OSError as exc:
        raise ExportError(f"{parent}: cannot write the export there ({exc.strerror}); choose another "
                          "--output_dir") from None
    try:
        try:
            yield tmp
        except OSError as exc:
            raise ExportError(f"{target}: writing failed ({exc.strerror or exc}: {exc.filename or ''}); "
                              "nothing was written and any previous export there is untouched") from None
        old = None
        if os.path.exists(target):
            old = tempfile.mkdtemp(prefix=".ppfuse-old-", dir=parent)
            os.rename(target, os.path.join(old, "previous"))
        os.rename(tmp, target)
        if old:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def export(config: DetectionConfig, output_dir: str, weights: Optional[str] = None, seed: int = 0,
           atol: float = DEFAULT_ATOL, rtol: float = DEFAULT_RTOL, with_nms: bool = True,
           strict: bool = False, onnx: bool = False, conv_bias: str = DEFAULT_CONV_BIAS,
           log=print) -> ExportResult:
    """Build, convert, verify and write ``output_dir/<config name>/``; all files or none.

    Args:
        strict: fail when any BatchNorm would stay unfolded (otherwise warn).
        conv_bias: how ``model.json`` writes conv biases (:data:`CONV_BIAS_FORMS`): ``in_conv``
            (default; oneDNN fuses it; ``model_plain.json`` is written too, :func:`save_plain_program`) or
            ``channel_add`` (faster with oneDNN off, batch > 1; ``model.json`` only).
        onnx: also write ``model.onnx`` (paddle2onnx), checked against Paddle
            Inference: no BatchNormalization or If node, outputs within tolerance.

    Raises:
        VerificationError: the deployed model differs beyond tolerance (nothing written).
        ExportError: Paddle older than 3.0, or writing failed (nothing written).
        ConfigError, CheckpointError, ConversionError: as named.
    """
    require_paddle_3()
    if conv_bias not in CONV_BIAS_FORMS:
        raise ConfigError(f"--conv_bias {conv_bias}: use one of {', '.join(CONV_BIAS_FORMS)}")
    timings = {}
    size = config.input_size()
    start = time.perf_counter()
    built = build_model(config, weights=weights, deploy=True, seed=seed, strict=strict, check=False)
    timings["build_and_convert"] = time.perf_counter() - start
    if onnx and not detectors.is_ppyoloe_style(built.model):
        raise ConfigError(f"--onnx: ppfuse writes ONNX for PP-YOLOE(+) exports only; {config.name} is "
                          f"{config.architecture} (its Paddle Inference export works without --onnx)")
    left = built.conversion.remaining_batch_norms if built.conversion else {}
    if left:
        first = next(iter(left))
        log(f"WARNING: {len(left)} BatchNorm left unfolded (first: {first}: {left[first]}); "
            "--strict makes this an error")
    overflow = layers.fp16_overflow(built.model)
    if overflow:
        log(f"WARNING: {len(overflow)} folded weights exceed the float16 range, first {next(iter(overflow))} "
            f"(|w| up to {max(overflow.values()):.3g}): fp16 inference of this export will overflow")
    start = time.perf_counter()
    # without a training form (a deploy checkpoint), the rewrites are still checked: the deployed
    # model as loaded against itself under deploy_rewrites
    reference = built.training_model if built.training_model is not None else built.model
    verification = verify_deployed(reference, built.model, size, atol, rtol, seed, conv_bias)
    timings["verify"] = time.perf_counter() - start
    if built.training_model is not None:
        log(f"verified against the training form: {verification.summary()}")
    else:
        log("weights are already deployed: no training form to verify against; the export's rewrites "
            f"verified against the deployed model as loaded: {verification.summary()}")
    target = os.path.join(output_dir, config.name)
    start = time.perf_counter()
    plain = conv_bias != "channel_add"  # model.json is not already the plain form: write model_plain.json too
    with atomic_directory(target) as tmp:
        save_inference_model(built.model, os.path.join(tmp, MODEL_FILE), size, with_nms, conv_bias=conv_bias)
        if plain:
            save_plain_program(built.model, tmp, size, with_nms)
        _infer_cfg(config, os.path.join(tmp, INFER_CFG), size, built.model)
        checkpoint.save_state(built.model, os.path.join(tmp, DEPLOY_CHECKPOINT))
        ops = count_ops(tmp)
        onnx_report = _export_onnx(built.model, tmp, size, with_nms, log) if onnx else None
        report = {
            "config": os.path.abspath(config.path), "weights": weights or config.weights or None,
            "weights_form": built.weights_form, "random_weights": built.weights_form == "random",
            "input_size": size, "with_nms": with_nms,
            "conversion": built.conversion.to_dict() if built.conversion else None,
            "verification": verification.to_dict(),
            "verified_against": "training form" if built.training_model is not None else "deployed model as loaded",
            "rewrites": rewrites_report(conv_bias),
            "programs": {"model.json": f"conv biases {conv_bias}",
                         **({PLAIN_PROGRAM_FILE: "conv biases channel_add, for Paddle Inference with oneDNN off"}
                            if plain else {})},
            "op_counts": {op: ops.get(op, 0) for op in COUNTED_OPS},
            "fp16_overflow": overflow,
            "onnx": onnx_report,
            "paddle": paddle.__version__,
        }
        with open(os.path.join(tmp, REPORT_FILE), "w") as f:
            json.dump(report, f, indent=2)
    timings["save"] = time.perf_counter() - start
    return ExportResult(target, built, verification, ops, timings)
