"""Random small models built to fool a Conv+BN converter (shared by the adversarial tests).

Every model is a ``Sequential`` of *patterns*: small layers whose ``forward``
uses a conv and a BatchNorm the way real code sometimes does -- plainly, or
tapping the conv output, reusing a layer (also inside an ``if``), rebuilding
the weight (weight_norm, spectral_norm, weight standardization), mixing data
formats, normalizing with batch statistics, overriding a registered type's
``forward``, sharing a layer between two places -- with random conv settings
(kernel 1/3, dilation 1/2, groups 1/2/depthwise, bias or not) and BatchNorm
kinds (BatchNorm2D with every ``use_global_stats``, legacy ``nn.BatchNorm``
with every ``use_global_stats`` / ``trainable_statistics``), activations,
residual adds and concats. Channels ``C`` and spatial size are equal (so a
BatchNorm of the wrong data format fits the shapes, as in the bug report).
"""
import collections
import dataclasses
import importlib.util

import numpy as np
import paddle
import paddle.nn as nn
import paddle.nn.functional as F
from hypothesis import strategies as st

from ppfuse.core import layers

from ppfuse import ConvBN, RepVggBlock

ACTIVATIONS = [None, "relu", "swish", "sigmoid"]


def _act(name):
    return {None: nn.Identity, "relu": nn.ReLU, "swish": nn.Swish, "sigmoid": nn.Sigmoid}[name]()


def conv_of(draw, c, data_format="NCHW"):
    k = draw(st.sampled_from([1, 3]))
    dilation = draw(st.sampled_from([1, 2])) if k == 3 else 1
    groups = draw(st.sampled_from([1, c] + ([2] if c % 2 == 0 else [])))
    bias = draw(st.booleans())
    return nn.Conv2D(c, c, k, padding=dilation * (k // 2), dilation=dilation, groups=groups,
                     bias_attr=None if bias else False, data_format=data_format)


def bn_of(draw, c, data_format="NCHW"):
    kind = draw(st.sampled_from(["2d", "2d", "2d", "2d_global_true", "2d_global_false", "legacy",
                                 "legacy_global_none_trainable", "legacy_trainable"]))
    if kind == "2d":
        return nn.BatchNorm2D(c, data_format=data_format)
    if kind == "2d_global_true":
        return nn.BatchNorm2D(c, data_format=data_format, use_global_stats=True)
    if kind == "2d_global_false":
        return nn.BatchNorm2D(c, data_format=data_format, use_global_stats=False)
    if kind == "legacy":
        return nn.BatchNorm(c, data_layout=data_format)
    if kind == "legacy_global_none_trainable":
        return nn.BatchNorm(c, data_layout=data_format, use_global_stats=None, trainable_statistics=True)
    return nn.BatchNorm(c, data_layout=data_format, trainable_statistics=True)


class Plain(nn.Layer):
    """Sequential(conv, bn, act): foldable."""

    def __init__(self, conv, bn, act):
        super().__init__()
        self.seq = nn.Sequential(conv, bn, _act(act))

    def forward(self, x):
        return self.seq(x)


class Declared(nn.Layer):
    """ppfuse's registered ConvBN."""

    def __init__(self, conv, bn, act):
        super().__init__()
        self.block = ConvBN(conv._in_channels, conv._out_channels, act=act)
        self.block.conv, self.block.bn = conv, bn

    def forward(self, x):
        return self.block(x)


class ByName(nn.Layer):
    """bn(conv(x)) in forward, declared nowhere: only dataflow can pair it."""

    def __init__(self, conv, bn, act):
        super().__init__()
        self.conv, self.bn, self.act = conv, bn, _act(act)

    def forward(self, x):
        return self.act(self.bn(self.conv(x)))


class TapIterated(nn.Layer):
    """Iterates a Sequential(conv, bn) and keeps the conv output."""

    def __init__(self, conv, bn, act):
        super().__init__()
        self.seq = nn.Sequential(conv, bn)

    def forward(self, x):
        outs = []
        y = x
        for layer in self.seq:
            y = layer(y)
            outs.append(y)
        return outs[-1] + outs[0]


class Intermediates(nn.Sequential):
    """A Sequential subclass whose forward also returns the conv output."""

    def forward(self, x):
        c = self[0](x)
        return self[1](c), c


class TapSubclass(nn.Layer):
    def __init__(self, conv, bn, act):
        super().__init__()
        self.seq = Intermediates(conv, bn)

    def forward(self, x):
        y, c = self.seq(x)
        return y - 0.5 * c


class SeparateCalls(nn.Layer):
    """Calls .conv and .bn of a registered layer separately, with a residual from the conv output."""

    def __init__(self, conv, bn, act):
        super().__init__()
        self.block = ConvBN(conv._in_channels, conv._out_channels)
        self.block.conv, self.block.bn = conv, bn

    def forward(self, x):
        c = self.block.conv(x)
        return self.block.bn(c) + c


class BNReused(nn.Layer):
    """The pair's BN is also applied to another conv's output."""

    def __init__(self, conv, bn, act, other):
        super().__init__()
        self.seq = nn.Sequential(conv, bn)
        self.other = other

    def forward(self, x):
        return self.seq(x) + self.seq[1](self.other(x))


class ConvReused(nn.Layer):
    def __init__(self, conv, bn, act):
        super().__init__()
        self.seq = nn.Sequential(conv, bn)

    def forward(self, x):
        return self.seq(x) + self.seq[0](x)


class ConvReusedInIf(nn.Layer):
    """The conv (``reused = 0``) or the BN (``reused = 1``) is applied again only inside a data-dependent branch."""
    reused = 0

    def __init__(self, conv, bn, act):
        super().__init__()
        self.seq = nn.Sequential(conv, bn)

    def forward(self, x):
        y = self.seq(x)
        if x.mean() > 0:
            y = y + self.seq[self.reused](x)
        return y


class BNReusedInIf(ConvReusedInIf):
    reused = 1


class StandardizedConv(nn.Conv2D):
    """Weight standardization: the weight used is recomputed from the parameter."""

    def forward(self, x):
        w = self.weight
        mean = w.mean(axis=[1, 2, 3], keepdim=True)
        std = (w - mean).pow(2).mean(axis=[1, 2, 3], keepdim=True).add(paddle.to_tensor(1e-5)).sqrt()
        return F.conv2d(x, (w - mean) / std, self.bias, self._stride, self._padding, self._dilation, self._groups)


class ActBetween(ConvBN):
    """A subclass of a registered pair type that puts an activation between conv and BN."""

    def forward(self, x):
        return self.bn(F.relu(self.conv(x)))


class OverridingSubclass(nn.Layer):
    def __init__(self, conv, bn, act):
        super().__init__()
        self.block = ActBetween(conv._in_channels, conv._out_channels)
        self.block.conv, self.block.bn = conv, bn

    def forward(self, x):
        return self.block(x)


class FormatMismatch(nn.Layer):
    """Sequential(conv, bn), each in its own data format; shapes fit because C == H == W."""

    def __init__(self, conv, bn, act):
        super().__init__()
        self.channel_last = conv._data_format == "NHWC"
        self.seq = nn.Sequential(conv, bn)

    def forward(self, x):
        if self.channel_last:
            return self.seq(x.transpose([0, 2, 3, 1])).transpose([0, 3, 1, 2])
        return self.seq(x)


class Squeezed(nn.Layer):
    """Global pool -> 1x1 conv -> squeeze -> BatchNorm1D -> broadcast back."""

    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2D(c, c, 1)
        self.bn = nn.BatchNorm1D(c)

    def forward(self, x):
        y = self.bn(self.conv(F.adaptive_avg_pool2d(x, 1)).squeeze([2, 3]))
        return x * F.sigmoid(y).unsqueeze([2, 3])


class Residual(nn.Layer):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return x + self.inner(x)


class Concat(nn.Layer):
    def __init__(self, a, b, c):
        super().__init__()
        self.a, self.b = a, b
        self.reduce = nn.Sequential(nn.Conv2D(2 * c, c, 1, bias_attr=False), nn.BatchNorm2D(c))

    def forward(self, x):
        return self.reduce(paddle.concat([self.a(x), self.b(x)], axis=1))


class Shared(nn.Layer):
    """The same pattern applied twice."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(self.inner(x))


class PosthookConv(nn.Layer):
    def __init__(self, conv, bn, act):
        super().__init__()
        self.seq = nn.Sequential(conv, bn)
        conv.register_forward_post_hook(lambda layer, inputs, output: output * 0.5 + 0.1)

    def forward(self, x):
        return self.seq(x)


class ConvertsItself(nn.Layer):
    """A third-party block that only exposes convert_to_deploy()."""

    def __init__(self, channels, kernel=1):
        super().__init__()
        self.conv = nn.Conv2D(channels, channels, kernel, padding=kernel // 2, bias_attr=False)
        self.bn = nn.BatchNorm2D(channels)

    def forward(self, x):
        return self.bn(self.conv(x))

    def convert_to_deploy(self):
        kernel, bias = layers.fold_conv_bn(self.conv, self.bn, "ConvertsItself")
        self.conv = layers.conv_like(self.conv, kernel, bias)
        self.bn = nn.Identity()


# --- kinds of the second review: what the model itself computes, in every output, non-finite values too ---
class ClosureTap(nn.Layer):
    """A lambda made in __init__ closes over the model and taps the conv output (a copy still reaches it)."""

    def __init__(self, conv, bn, act):
        super().__init__()
        self.conv, self.bn, self.act = conv, bn, _act(act)
        self.tap = lambda x: self.conv(x)

    def forward(self, x):
        return self.act(self.bn(self.conv(x))) + 0.5 * self.tap(x)


class BoundMethodTap(nn.Layer):
    """A bound method of the conv, kept as an attribute, taps its output."""

    def __init__(self, conv, bn, act):
        super().__init__()
        self.conv, self.bn, self.act = conv, bn, _act(act)
        self.raw = self.conv.forward

    def forward(self, x):
        return self.act(self.bn(self.conv(x))) - 0.3 * self.raw(x)


class BiasAgain(nn.Layer):
    """The conv's bias added a second time before the BatchNorm (or its weight used as a number)."""

    def __init__(self, conv, bn, act):
        super().__init__()
        self.conv, self.bn, self.act = conv, bn, _act(act)

    def forward(self, x):
        y = self.conv(x)
        if self.conv.bias is not None:
            y = y + self.conv.bias.reshape([1, -1, 1, 1])
        else:
            y = y + self.conv.weight.mean()
        return self.act(self.bn(y))


class GetattrTap(nn.Layer):
    """Reaches the conv by getattr and applies it again outside the pair."""

    def __init__(self, conv, bn, act):
        super().__init__()
        self.conv, self.bn, self.act = conv, bn, _act(act)

    def forward(self, x):
        conv = getattr(self, "conv")
        return self.act(self.bn(self.conv(x))) + 0.2 * conv(x)


class ParametersTap(nn.Layer):
    """Reads the conv weight through self.parameters() in forward."""

    def __init__(self, conv, bn, act):
        super().__init__()
        self.conv, self.bn, self.act = conv, bn, _act(act)

    def forward(self, x):
        weight = next(iter(self.parameters()))
        return self.act(self.bn(self.conv(x))) + 0.1 * weight.mean()


class HookedParent(nn.Layer):
    """An unregistered parent whose forward post-hook reads the registered pair's conv weight."""

    def __init__(self, conv, bn, act):
        super().__init__()
        self.inner = ConvBN(conv._in_channels, conv._out_channels, 3, padding=1, act=act)
        self.register_forward_post_hook(lambda layer, inputs, out: out + layer.inner.conv.weight.mean())

    def forward(self, x):
        return self.inner(x)


class NonFiniteTail(nn.Layer):
    """Adds a constant holding +Inf, -Inf and NaN on one channel each (the rest finite): the outputs hold
    non-finite values in fixed places, which a conversion must keep in the same places."""

    def __init__(self, c, conv, bn):
        super().__init__()
        self.conv, self.bn = conv, bn
        mask = np.zeros([1, c, 1, 1], "float32")
        mask[0, :3, 0, 0] = [np.inf, -np.inf, np.nan][: min(3, c)]
        self.register_buffer("mask", paddle.to_tensor(mask))

    def forward(self, x):
        return self.bn(self.conv(x)) + self.mask.astype(x.dtype)


Outputs = collections.namedtuple("Outputs", ["y", "extra"])


@dataclasses.dataclass
class DataOutputs:
    y: paddle.Tensor
    extra: object


class ObjectOutputs:
    def __init__(self, y, extra):
        self.y, self.extra = y, extra


class Returns(nn.Layer):
    """The model's output in a container (tuple, dict, namedtuple, dataclass, plain object), with an
    intermediate beside it: the input of the last BatchNorm-after-conv pair (its conv's raw output) or the
    last pattern's input."""
    CONTAINERS = ("tensor", "tuple", "dict", "namedtuple", "dataclass", "object")

    def __init__(self, body, container, raw_conv):
        super().__init__()
        self.body, self.container, self.raw_conv = body, container, raw_conv

    def forward(self, x):
        y = self.body(x)
        extra = self.raw_conv(x) if self.raw_conv is not None else x * 1.0
        if self.container == "tensor":
            return y
        if self.container == "tuple":
            return y, extra
        if self.container == "dict":
            return {"y": y, "extra": [extra]}
        if self.container == "namedtuple":
            return Outputs(y, extra)
        if self.container == "dataclass":
            return DataOutputs(y, extra)
        return ObjectOutputs(y, extra)


GEOMETRIES = ("dilated", "5x5", "stride2", "grouped", "reflect", "dilated_vs_3x3")


def repvgg_geometry_block(kind: str, c: int, act="relu", alpha: bool = False, identity: bool = False):
    """ppfuse's RepVggBlock whose branch convs are replaced by another geometry (dilated, 5x5, stride 2,
    grouped, reflect padding, a plain 3x3 beside a dilated one): exact merges convert, the others must be
    left."""
    stride = 2 if kind == "stride2" else 1
    groups = 2 if kind == "grouped" and c % 2 == 0 else 1
    block = RepVggBlock(c, c, act=act or "relu", alpha=alpha, stride=stride, identity=stride == 1 and identity)
    k, dilation, mode = {"dilated": (3, 2, "zeros"), "dilated_vs_3x3": (3, 2, "zeros"), "5x5": (5, 1, "zeros"),
                         "reflect": (3, 1, "reflect")}.get(kind, (3, 1, "zeros"))
    block.conv1.conv = nn.Conv2D(c, c, k, stride=stride, padding=dilation * (k // 2), dilation=dilation,
                                 groups=groups, padding_mode=mode, bias_attr=False)
    if kind == "dilated_vs_3x3":  # a plain 3x3 beside a dilated one: padded into it, it would read other pixels
        block.conv2.conv = nn.Conv2D(c, c, 3, stride=stride, padding=1, bias_attr=False)
    else:
        block.conv2.conv = nn.Conv2D(c, c, 1, stride=stride, padding=0, groups=groups, bias_attr=False)
    return block


def repvgg_with_geometry(draw, c, act):
    # stride 2 changes the shape, which the generated patterns (residuals, concats, shared) cannot take:
    # tests/core/test_review2.py converts it alone
    kinds = [kind for kind in GEOMETRIES if kind != "stride2"]
    return repvgg_geometry_block(draw(st.sampled_from(kinds)), c, act, draw(st.booleans()), draw(st.booleans()))

PAIR_PATTERNS = [Plain, Declared, ByName, TapIterated, TapSubclass, SeparateCalls, ConvReused, ConvReusedInIf,
                 BNReusedInIf, OverridingSubclass, PosthookConv, ClosureTap, BoundMethodTap, BiasAgain, GetattrTap,
                 ParametersTap, HookedParent]


# ppdet's own block joins the generated models where PaddleDetection is installed (not in the core's
# environment, which has no ppdet)
HAVE_PPDET = importlib.util.find_spec("ppdet") is not None


@st.composite
def patterns(draw, c, depth=0):
    kind = draw(st.sampled_from(["pair"] * 6 + ["bn_reused", "weight_norm", "spectral_norm", "standardized",
                                                "format", "squeezed", "repvgg", "repvgg_geometry"]
                                + (["ppdet_repvgg"] if HAVE_PPDET else [])
                                + (["residual", "concat", "shared"] if depth < 2 else [])))
    act = draw(st.sampled_from(ACTIVATIONS))
    if kind == "pair":
        return draw(st.sampled_from(PAIR_PATTERNS))(conv_of(draw, c), bn_of(draw, c), act)
    if kind == "bn_reused":
        return BNReused(conv_of(draw, c), bn_of(draw, c), act, conv_of(draw, c))
    if kind in ("weight_norm", "spectral_norm"):
        conv = conv_of(draw, c)
        conv = (paddle.nn.utils.weight_norm(conv) if kind == "weight_norm"
                else paddle.nn.utils.spectral_norm(conv))
        return Plain(conv, bn_of(draw, c), act)
    if kind == "standardized":
        return Plain(StandardizedConv(c, c, 3, padding=1), bn_of(draw, c), act)
    if kind == "format":
        conv_format, bn_format = draw(st.sampled_from([("NHWC", "NCHW"), ("NCHW", "NHWC"), ("NHWC", "NHWC")]))
        return FormatMismatch(conv_of(draw, c, conv_format), bn_of(draw, c, bn_format), act)
    if kind == "squeezed":
        return Squeezed(c)
    if kind == "repvgg":
        block = RepVggBlock(c, c, act=act or "relu", alpha=draw(st.booleans()), identity=draw(st.booleans()))
        if block.alpha is not None:
            block.drawn_alpha = draw(st.sampled_from([0.7, 1.3, 0.0, -0.5]))
        return block
    if kind == "repvgg_geometry":
        return repvgg_with_geometry(draw, c, act)
    if kind == "ppdet_repvgg":
        from ppdet.modeling.backbones.cspresnet import RepVggBlock as PPDetRepVggBlock
        block = PPDetRepVggBlock(c, c, act=act or "relu", alpha=True)
        block.drawn_alpha = draw(st.sampled_from([0.7, 1.3, 0.0, -0.5, float("nan")]))
        return block
    if kind == "residual":
        return Residual(draw(patterns(c, depth + 1)))
    if kind == "concat":
        return Concat(draw(patterns(c, depth + 1)), draw(patterns(c, depth + 1)), c)
    return Shared(draw(patterns(c, depth + 1)))


@st.composite
def models(draw):
    """``(model, channels)``: a Sequential of 1-3 patterns, weights and BN
    statistics randomized, in eval mode; drawn too: a non-finite tail, an output container with an
    intermediate beside the output, float64, frozen parameters. ``model.input_dtype`` is the dtype to feed."""
    c = draw(st.sampled_from([3, 4, 5, 6]))
    seed = draw(st.integers(0, 2 ** 16))
    paddle.seed(seed)
    body = [draw(patterns(c)) for _ in range(draw(st.integers(1, 3)))]
    if draw(st.integers(0, 9)) == 0:
        body.append(NonFiniteTail(c, conv_of(draw, c), bn_of(draw, c)))
    model = nn.Sequential(*body)
    container = draw(st.sampled_from(Returns.CONTAINERS))
    if container != "tensor":
        last_pair = next((p for p in reversed(body) if isinstance(p, Plain)), None)
        raw = last_pair.seq[0] if last_pair is not None and draw(st.booleans()) else None
        model = Returns(model, container, raw)
    layers.randomize(model, seed)
    for sub in model.sublayers():  # alphas drawn above (0, negative, NaN too): randomize draws only 0.3-1.7
        if hasattr(sub, "drawn_alpha"):
            sub.alpha.set_value(np.array([sub.drawn_alpha], "float32"))
    model.input_dtype = "float32"
    if draw(st.integers(0, 9)) == 0:
        model.to(dtype="float64")
        model.input_dtype = "float64"
    if draw(st.integers(0, 9)) == 0:
        for param in model.parameters():
            param.stop_gradient = True
        model.frozen = True
    model.eval()
    return model, c
