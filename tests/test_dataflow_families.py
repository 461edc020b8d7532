"""Layer families the dataflow pairing first missed, and models that broke the walker.

* BatchNorm after a deformable conv (Paddle's ``DeformConv2D``; ppdet's ``DeformableConvV2``, resnet's
  ``ConvNormLayer(dcn_v2=True)``, TTFNet's ``Upsample``): folded into the deformable conv's kernel and
  bias, the offset/mask conv untouched -- with a trace and by structure;
* sublayers registered under names containing dots (ppdet's TTFFPN ``'upsample.0'``);
* a model ``to_static`` cannot trace: the structural folds are kept and the report says why.

Every comparison is on outputs relative to their largest magnitude, tolerance 1e-5, after BatchNorm
statistics are randomized (and the zero-initialized offset convs given weights, so inputs are really
sampled at offsets).
"""
import numpy as np
import paddle
import paddle.nn as nn
import paddle.nn.functional as F
import pytest
from paddle.static import InputSpec
from paddle.vision.ops import DeformConv2D

from ppfuse.core import layers

from ppfuse import convert

from ppfuse import ConvBN, ConversionError, register_conv_bn

TOLERANCE = 1e-5


def prepared(model, seed=0):
    paddle.seed(seed)
    layers.randomize(model, seed)
    rng = np.random.RandomState(seed)
    for name, param in model.named_parameters():
        if "offset" in name or name.split(".")[-2:-1] == ["conv_offset"]:
            param.set_value(rng.normal(0, 0.1, param.shape).astype("float32"))
    model.eval()
    return model


def tensor(shape, seed=0):
    return paddle.to_tensor(np.random.RandomState(seed).normal(0.2, 1, shape).astype("float32"))


def run(model, inputs):
    with paddle.no_grad():
        out = model(*inputs)
    return [o.numpy() for o in (out if isinstance(out, (list, tuple)) else [out])]


def assert_same(report, expected, inputs):
    for want, got in zip(expected, run(report.model, inputs)):
        scale = float(np.abs(want).max())
        np.testing.assert_allclose(got / scale, want / scale, atol=TOLERANCE, rtol=0)


def batch_norms(model):
    return [name for name, sub in model.named_sublayers() if layers.is_batch_norm(sub)]


class DeformBN(nn.Layer):
    """An offset/mask conv, a DeformConv2D and a BatchNorm: ``bn(dcn(x, offset, mask))``."""

    def __init__(self, cin=4, cout=6, k=3, stride=1, groups=1, bias=True, mask=True):
        super().__init__()
        self.k, self.mask = k, mask
        self.offset = nn.Conv2D(cin, (3 if mask else 2) * k * k, k, stride=stride, padding=k // 2)
        self.dcn = DeformConv2D(cin, cout, k, stride=stride, padding=k // 2, groups=groups,
                                bias_attr=None if bias else False)
        self.bn = nn.BatchNorm2D(cout)

    def forward(self, x):
        offset_mask = self.offset(x)
        if not self.mask:
            return self.bn(self.dcn(x, offset_mask))
        offset, mask = paddle.split(offset_mask, [2 * self.k * self.k, self.k * self.k], axis=1)
        return self.bn(self.dcn(x, offset, mask=F.sigmoid(mask)))


# --------------------------------------------------------------------------------------- deformable
@pytest.mark.parametrize("k,stride,groups,bias,mask", [(3, 1, 1, True, True), (3, 2, 2, False, True),
                                                       (1, 1, 1, False, False), (3, 1, 2, True, False)])
def test_batch_norm_after_deform_conv2d_folds_by_dataflow(k, stride, groups, bias, mask):
    model = prepared(DeformBN(4, 6, k, stride, groups, bias, mask))
    x = tensor([2, 4, 9, 9])
    expected = run(model, [x])
    offset_weight = model.offset.weight.numpy().copy()
    report = convert(model, example_inputs=[x])
    assert report.counts == {"conv+bn (dataflow)": 1} and report.confirmed_by_trace
    assert not report.remaining_batch_norms and not batch_norms(report.model)
    assert isinstance(report.model.dcn, DeformConv2D) and report.model.dcn.bias is not None
    np.testing.assert_array_equal(report.model.offset.weight.numpy(), offset_weight)  # not touched
    assert_same(report, expected, [x])


def test_deform_conv_output_also_used_elsewhere_is_not_folded():
    class Tapped(DeformBN):
        def forward(self, x):
            offset, mask = paddle.split(self.offset(x), [18, 9], axis=1)
            y = self.dcn(x, offset, mask=F.sigmoid(mask))
            return self.bn(y) + y

    model = prepared(Tapped())
    report = convert(model, input_spec=[InputSpec([None, 4, 8, 8])])
    assert report.batch_norms_folded == 0 and "also used elsewhere" in report.remaining_batch_norms["bn"]


def test_registered_deform_conv_pair_folds_without_a_trace():
    class OwnDeformBN(DeformBN):  # a type of its own, so the registration reaches no other test
        pass
    register_conv_bn(OwnDeformBN, "dcn", "bn")
    model = prepared(OwnDeformBN())
    x = tensor([2, 4, 8, 8])
    expected = run(model, [x])
    for report in (convert(model), convert(model, example_inputs=[x])):
        assert report.counts == {"conv+bn": 1} and not batch_norms(report.model)
        assert_same(report, expected, [x])


@pytest.mark.parametrize("use_spec", [False, True])
def test_ppdet_resnet_conv_norm_layer_with_dcn_v2(use_spec):
    from ppdet.modeling.backbones.resnet import ConvNormLayer
    model = prepared(nn.Sequential(ConvNormLayer(4, 8, 3, 1, act="relu", dcn_v2=True),
                                   ConvNormLayer(8, 8, 3, 2, groups=2, dcn_v2=True)))
    x = tensor([2, 4, 10, 10])
    expected = run(model, [x])
    report = convert(model, input_spec=[InputSpec([None, 4, 10, 10])] if use_spec else None)
    assert report.counts == {"conv+bn": 2} and report.confirmed_by_trace == use_spec
    assert not report.remaining_batch_norms and not batch_norms(report.model)
    assert_same(report, expected, [x])


@pytest.mark.parametrize("use_spec", [False, True])
def test_ppdet_deformable_conv_v2_then_batch_norm(use_spec):
    """TTFNet's Upsample (DeformableConvV2 -> BN -> relu -> x2) and ConvNormLayer(use_dcn=True): the BN folds
    into the wrapper's conv_dcn."""
    from ppdet.modeling.layers import ConvNormLayer
    from ppdet.modeling.necks.ttf_fpn import Upsample
    model = prepared(nn.Sequential(Upsample(4, 6), ConvNormLayer(6, 6, 3, 1, use_dcn=True)))
    offset_weights = [p.numpy().copy() for n, p in model.named_parameters() if "conv_offset" in n]
    x = tensor([2, 4, 6, 6])
    expected = run(model, [x])
    report = convert(model, example_inputs=[x] if use_spec else None)
    assert report.counts == {"conv+bn": 2} and not batch_norms(report.model)
    assert report.converted[0].where == "0.dcn.conv_dcn"
    for got, want in zip([p.numpy() for n, p in report.model.named_parameters() if "conv_offset" in n],
                         offset_weights):
        np.testing.assert_array_equal(got, want)  # the offset/mask convs are not touched
    assert_same(report, expected, [x])


def test_deformable_conv_v2_overriding_forward_is_not_vouched_for():
    from ppdet.modeling.layers import DeformableConvV2
    from ppdet.modeling.necks.ttf_fpn import Upsample

    class Doubled(DeformableConvV2):
        def forward(self, x):
            return super().forward(x) * 2.0

    model = Upsample(4, 6)
    model.dcn = Doubled(4, 6, 3)
    model = prepared(model)
    x = tensor([1, 4, 6, 6])
    expected = run(model, [x])
    no_spec = convert(model)
    assert "overrides forward of DeformableConvV2" in no_spec.remaining_batch_norms["bn"]
    with_spec = convert(model, example_inputs=[x])  # nor by the trace: a scale op between conv_dcn and BN
    assert with_spec.batch_norms_folded == 0 and "bn" in with_spec.remaining_batch_norms
    for report in (no_spec, with_spec):
        assert_same(report, expected, [x])


# ------------------------------------------------------------------------------------ dotted names
class Dotted(nn.Layer):
    """Sublayers under names with dots, reached through a plain list as ppdet's TTFFPN does."""

    def __init__(self):
        super().__init__()
        self.stages = [self.add_sublayer(f"up.{i}", ConvBN(4, 4, 3, padding=1)) for i in range(2)]
        head = nn.Sequential()
        head.add_sublayer("conv.0", nn.Conv2D(4, 4, 3, padding=1))
        head.add_sublayer("conv.0.bn", nn.BatchNorm2D(4))
        head.add_sublayer("conv.0.act", nn.ReLU())
        self.add_sublayer("head.0", head)
        self.stem = nn.Conv2D(4, 4, 1)
        self.add_sublayer("stem.bn", nn.BatchNorm2D(4))

    def forward(self, x):
        x = getattr(self, "stem.bn")(self.stem(x))
        for i in range(len(self.stages)):
            x = self.stages[i](x)
        return getattr(self, "head.0")(x)


def test_dotted_sublayer_names():
    model = prepared(Dotted())
    x = tensor([2, 4, 6, 6])
    expected = run(model, [x])
    no_spec = convert(model)
    # 'up.*' is reached through the plain list `stages`, used other than by calling one item: not vouched for
    assert "uses its list 'stages'" in no_spec.remaining_batch_norms["up.0.bn"]
    assert "stem.bn" in no_spec.remaining_batch_norms
    with_spec = convert(model, input_spec=[InputSpec([None, 4, 6, 6])])
    assert with_spec.batch_norms_folded == 4 and not batch_norms(with_spec.model)
    assert {r.where for r in with_spec.converted} == {"up.0.conv", "up.1.conv", "head.0.conv.0", "stem"}
    for report in (no_spec, with_spec):
        assert_same(report, expected, [x])


class ListTap(nn.Layer):
    """A dotted child reached through a list, and its conv output tapped there."""

    def __init__(self):
        super().__init__()
        self.blocks = [self.add_sublayer("block.0", ConvBN(4, 4, 3, padding=1))]

    def forward(self, x):
        return self.blocks[0](x) + self.blocks[0].conv(x)


def test_a_tap_through_a_list_of_dotted_children_is_seen():
    model = prepared(ListTap())
    x = tensor([2, 4, 6, 6])
    expected = run(model, [x])
    no_spec, with_spec = convert(model), convert(model, example_inputs=[x])
    assert "uses block.0.conv directly" in no_spec.remaining_batch_norms["block.0.bn"]
    assert "2 times" in with_spec.remaining_batch_norms["block.0.bn"]
    for report in (no_spec, with_spec):
        assert report.batch_norms_folded == 0
        assert_same(report, expected, [x])


class TTFNeck(nn.Layer):
    def __init__(self):
        super().__init__()
        from ppdet.modeling.necks.ttf_fpn import TTFFPN
        self.fpn = TTFFPN([4, 8, 8, 8], planes=[8, 8, 4], shortcut_num=[2, 1, 1])

    def forward(self, a, b, c, d):
        return self.fpn([a, b, c, d])


@pytest.mark.parametrize("use_spec", [False, True])
def test_ttfnet_neck_with_dotted_names_and_deformable_upsamples(use_spec):
    model = prepared(TTFNeck())
    inputs = [tensor([2, ch, s, s], i) for i, (ch, s) in enumerate([(4, 16), (8, 8), (8, 4), (8, 2)])]
    expected = run(model, inputs)
    assert batch_norms(model) == ["fpn.upsample.0.bn", "fpn.upsample.1.bn", "fpn.upsample.2.bn"]
    report = convert(model, example_inputs=inputs if use_spec else None)
    assert report.counts == {"conv+bn": 3} and not batch_norms(report.model)
    assert report.converted[0].where == "fpn.upsample.0.dcn.conv_dcn"
    assert_same(report, expected, inputs)


def test_paths_that_read_alike_are_both_reported():
    model = nn.Layer()
    inner = nn.Layer()
    inner.add_sublayer("c", nn.BatchNorm2D(2))
    other = nn.Layer()
    other.add_sublayer("b.c", nn.BatchNorm2D(2))
    model.add_sublayer("a.b", inner)
    model.add_sublayer("a", other)
    model.eval()
    assert sorted(convert(model).remaining_batch_norms) == ["a.b.c", "a.b.c (#2)"]


# ------------------------------------------------------------------------------------ failed trace
class Untraceable(nn.Layer):
    def forward(self, x):
        if not paddle.in_dynamic_mode():
            raise NotImplementedError("my_custom_op has no static-graph kernel\n  (details on a second line)")
        return x


class PartlyTraceable(nn.Layer):
    def __init__(self):
        super().__init__()
        self.block = ConvBN(4, 4, 3, padding=1)
        self.add_sublayer("custom.0", nn.Sequential(nn.ReLU(), Untraceable()))
        self.conv, self.bn = nn.Conv2D(4, 4, 1), nn.BatchNorm2D(4)

    def forward(self, x):
        return self.bn(self.conv(getattr(self, "custom.0")(self.block(x))))


def test_a_failed_trace_keeps_the_structural_folds_and_says_why():
    model = prepared(PartlyTraceable())
    x = tensor([2, 4, 6, 6])
    expected = run(model, [x])
    report = convert(model, input_spec=[InputSpec([None, 4, 6, 6])])
    assert report.trace_error == ("tracing PartlyTraceable.forward with paddle.jit.to_static failed in custom.0.1 "
                                  "(Untraceable): NotImplementedError: my_custom_op has no static-graph kernel")
    assert report.trace_error in report.summary() and report.to_dict()["trace_error"] == report.trace_error
    assert report.counts == {"conv+bn": 1} and not report.confirmed_by_trace
    assert report.unconfirmed == ["block.conv"] and "the trace failed" in report.summary()
    assert list(report.remaining_batch_norms) == ["bn"]  # only a trace could pair it
    assert_same(report, expected, [x])
    assert convert(model).trace_error is None
    with pytest.raises(ConversionError, match=r"1 BatchNorm would stay unfolded \(strict\).*failed in "
                                              r"custom\.0\.1 \(Untraceable\): NotImplementedError"):
        convert(model, input_spec=[InputSpec([None, 4, 6, 6])], strict=True)


def test_a_failed_trace_of_a_fully_vouched_model_passes_strict():
    model = prepared(nn.Sequential(ConvBN(4, 4, 3, padding=1), Untraceable()))
    report = convert(model, input_spec=[InputSpec([None, 4, 6, 6])], strict=True)
    assert report.batch_norms_folded == 1 and "failed in 1 (Untraceable)" in report.trace_error
