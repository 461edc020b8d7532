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


PAIR_PATTERNS = [Plain, Declared, ByName, TapIterated, TapSubclass, SeparateCalls, ConvReused, ConvReusedInIf,
                 BNReusedInIf, OverridingSubclass, PosthookConv]


# ppdet's own block joins the generated models where PaddleDetection is installed (not in the core's
# environment, which has no ppdet)
HAVE_PPDET = importlib.util.find_spec("ppdet") is not None


@st.composite
def patterns(draw, c, depth=0):
    kind = draw(st.sampled_from(["pair"] * 6 + ["bn_reused", "weight_norm", "spectral_norm", "standardized",
                                                "format", "squeezed", "repvgg"]
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
    """``(model, channels)``: a Sequential of 1-3 patterns, weights and BN statistics randomized, in eval mode."""
    c = draw(st.sampled_from([3, 4, 5, 6]))
    seed = draw(st.integers(0, 2 ** 16))
    paddle.seed(seed)
    model = nn.Sequential(*[draw(patterns(c)) for _ in range(draw(st.integers(1, 3)))])
    layers.randomize(model, seed)
    for sub in model.sublayers():  # alphas drawn above (0, negative, NaN too): randomize draws only 0.3-1.7
        if hasattr(sub, "drawn_alpha"):
            sub.alpha.set_value(np.array([sub.drawn_alpha], "float32"))
    model.eval()
    return model, c
