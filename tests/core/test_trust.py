"""`convert()` never returns a model that computes something else: one test per way it used to.

Each case is run without and with ``input_spec`` and must come out *equal*
(outputs within 1e-5 of their scale, on inputs of both signs so both sides of
an ``if`` run) or *refused* (the BatchNorm left with its reason, or a ppfuse
error) -- and the tests say which of the two is expected.
"""
import re

import numpy as np
import paddle
import paddle.nn as nn
import pytest
from paddle.static import InputSpec

from adversarial_models import (BNReused, ConvertsItself, ConvReusedInIf, BNReusedInIf, FormatMismatch, Plain, SeparateCalls,
                                Squeezed, StandardizedConv, TapIterated, TapSubclass)
from ppfuse.core import kernels, layers
from ppfuse import convert
from ppfuse import ConvBN, KernelError, PPFuseError, RepVggBlock
from ppfuse.errors import CheckpointError

C = 4
SPEC = [InputSpec([None, C, C, C], "float32", "x")]
TOLERANCE = 1e-5


def inputs(seed=0):
    x = paddle.to_tensor(np.random.RandomState(seed).normal(0.3, 1, (2, C, C, C)).astype("float32"))
    return [x, -x]


def prepared(model, seed=0):
    paddle.seed(seed)
    layers.randomize(model, seed)
    model.eval()
    return model


def outputs(model, xs):
    with paddle.no_grad():
        return [model(x).numpy() for x in xs]


def assert_equal(report, expected, xs):
    for want, got in zip(expected, outputs(report.model, xs)):
        scale = float(np.abs(want).max())
        np.testing.assert_allclose(got / scale, want / scale, atol=TOLERANCE, rtol=0)


def left_reason(report, suffix):
    found = [why for where, why in report.remaining_batch_norms.items() if where.endswith(suffix)]
    assert found, f"no BatchNorm left at *{suffix}: {report.remaining_batch_norms}"
    return found[0]


def both_modes(model):
    """The model converted without and with input_spec; outputs checked equal in both."""
    xs = inputs()
    expected = outputs(model, xs)
    reports = [convert(model), convert(model, input_spec=SPEC)]
    for report in reports:
        assert_equal(report, expected, xs)
    return reports


def conv(**kwargs):
    return nn.Conv2D(C, C, 3, padding=1, **kwargs)


# 1. ppdet's RepVggBlock computes conv1 + conv2 for alpha <= 0 and NaN (`if self.alpha:` is alpha > 0)
@pytest.mark.ppdet
@pytest.mark.parametrize("alpha", [0.7, 0.0, -0.5, float("nan")])
def test_ppdet_repvgg_alpha_as_ppdet_computes_it(alpha):
    from ppdet.modeling.backbones.cspresnet import RepVggBlock as PPDetRepVggBlock
    block = prepared(PPDetRepVggBlock(C, C, act="relu", alpha=True))
    block.alpha.set_value(np.array([alpha], "float32"))
    for report in both_modes(block):
        assert report.batch_norms_folded == 2 and hasattr(report.model, "conv")


@pytest.mark.ppdet
@pytest.mark.parametrize("alpha", [0.0, -0.5, float("nan")])
def test_ppdet_checkpoint_with_alpha_ppdet_ignores_is_refused_by_ppfuse_block(alpha):
    from ppdet.modeling.backbones.cspresnet import RepVggBlock as PPDetRepVggBlock
    ppdet_block = prepared(PPDetRepVggBlock(C, C, act="relu", alpha=True))
    ppdet_block.alpha.set_value(np.array([alpha], "float32"))
    ours = RepVggBlock(C, C, act="relu", alpha=True)
    with pytest.raises(CheckpointError, match="alpha = .* is not > 0: PaddleDetection's RepVggBlock ignores"):
        ours.set_state_dict(ppdet_block.state_dict())
    ppdet_block.alpha.set_value(np.array([0.6], "float32"))
    ours.set_state_dict(ppdet_block.state_dict())
    ours.eval()
    x = inputs()[0]
    np.testing.assert_allclose(ours(x).numpy(), ppdet_block(x).numpy(), rtol=1e-6, atol=1e-6)


@pytest.mark.ppdet
def test_whole_ppyoloe_with_a_negative_alpha_converts_to_what_ppdet_computes():
    from ppfuse.ppdet import detection, detectors
    config = detection.load_config("configs/ppyoloe/ppyoloe_plus_crn_s_320_test.yml")
    model = detection.build_training_model(config)
    layers.randomize(model, 5)
    image, scale = detectors.sample_inputs(config.input_size(), 1, 5)
    wrapper = detectors.DetectorForInference(model, with_nms=False)
    layers.calibrate_batch_norms(model, lambda: wrapper(image, scale))
    blocks = [sub for sub in model.sublayers() if type(sub).__name__ == "RepVggBlock"]
    blocks[len(blocks) // 2].alpha.set_value(np.array([-0.5], "float32"))
    with paddle.no_grad():
        boxes, scores = (t.numpy() for t in wrapper(image, scale))
    report = convert(model, input_spec=detection.detector_input_spec(config.input_size()),
                     example_inputs=[image, scale], forward_with=lambda m: detectors.DetectorForInference(m, False))
    assert not report.remaining_batch_norms and report.confirmed_by_trace
    with paddle.no_grad():
        got_boxes, got_scores = (t.numpy() for t in detectors.DetectorForInference(report.model, False)(image, scale))
    assert np.abs(got_boxes - boxes).max() < 0.05  # pixels at 320
    assert np.abs(got_scores - scores).max() < 1e-4


# 2. structure proposes, dataflow proves
@pytest.mark.parametrize("pattern", [TapIterated, TapSubclass, SeparateCalls])
def test_taps_of_the_conv_output_are_not_folded(pattern):
    model = prepared(nn.Sequential(pattern(conv(), nn.BatchNorm2D(C), None)))
    for report in both_modes(model):
        assert report.batch_norms_folded == 0
        assert left_reason(report, "bn" if pattern is SeparateCalls else "1")


def test_batch_norm_also_applied_elsewhere_is_not_folded():
    model = prepared(nn.Sequential(BNReused(conv(), nn.BatchNorm2D(C), None, conv())))
    no_spec, with_spec = both_modes(model)
    assert with_spec.batch_norms_folded == 0 and "BatchNorm 2 times" in left_reason(with_spec, "seq.1")
    assert "not vouched for without a trace" in left_reason(no_spec, "seq.1")


@pytest.mark.ppdet
def test_subclasses_of_ppdet_layers_overriding_forward_are_not_trusted():
    from ppdet.modeling.backbones.cspresnet import ConvBNLayer, RepVggBlock as PPDetRepVggBlock
    import paddle.nn.functional as F

    class ActBeforeBN(ConvBNLayer):
        def forward(self, x):
            return self.bn(F.relu(self.conv(x)))

    class Scaled(PPDetRepVggBlock):
        def forward(self, x):
            return self.conv1(x) * 2.0 + self.conv2(x)

    model = prepared(nn.Sequential(ActBeforeBN(C, C, 3, padding=1), Scaled(C, C, act="relu", alpha=True)))
    no_spec, with_spec = both_modes(model)
    assert "overrides forward of ConvBNLayer" in left_reason(no_spec, "0.bn")
    assert "overrides forward of RepVggBlock" in left_reason(no_spec, "1.conv1.bn")
    # with a trace, the inner conv -> BN pairs of the overriding RepVggBlock are proven and folded
    assert with_spec.batch_norms_folded == 2 and "0.bn" in with_spec.remaining_batch_norms


# 3. weights rebuilt in forward or a hook
@pytest.mark.parametrize("rebuild", ["weight_norm", "spectral_norm", "standardized"])
def test_convs_whose_weight_is_rebuilt_are_not_folded(rebuild):
    if rebuild == "standardized":
        layer = StandardizedConv(C, C, 3, padding=1)
    else:
        layer = getattr(paddle.nn.utils, rebuild)(conv())
    model = prepared(nn.Sequential(Plain(layer, nn.BatchNorm2D(C), "relu")))
    for report in both_modes(model):
        assert report.batch_norms_folded == 0
        assert re.search("hooks|overrides forward", left_reason(report, "seq.1"))


# 4. data formats
@pytest.mark.parametrize("conv_format,bn_format", [("NHWC", "NCHW"), ("NCHW", "NHWC")])
def test_batch_norm_of_another_data_format_is_not_folded(conv_format, bn_format):
    model = prepared(nn.Sequential(FormatMismatch(nn.Conv2D(C, C, 3, padding=1, data_format=conv_format),
                                                  nn.BatchNorm2D(C, data_format=bn_format), None)))
    for report in both_modes(model):
        assert report.batch_norms_folded == 0 and "data format" in left_reason(report, "seq.1")


def test_channel_last_pair_folds():
    model = prepared(nn.Sequential(FormatMismatch(nn.Conv2D(C, C, 3, padding=1, data_format="NHWC"),
                                                  nn.BatchNorm2D(C, data_format="NHWC"), None)))
    for report in both_modes(model):
        assert report.batch_norms_folded == 1


# 5. reuse inside control flow
@pytest.mark.parametrize("pattern", [ConvReusedInIf, BNReusedInIf])
def test_reuse_inside_an_if_is_seen(pattern):
    model = prepared(nn.Sequential(pattern(conv(), nn.BatchNorm2D(C), None)))
    no_spec, with_spec = both_modes(model)
    assert with_spec.batch_norms_folded == 0 and "times in forward" in left_reason(with_spec, "seq.1")


# 6. legacy nn.BatchNorm: what it computes in eval mode decides
def test_legacy_batch_norm_with_batch_statistics_is_left_and_default_one_folds():
    batch_stats = nn.BatchNorm(C, use_global_stats=None, trainable_statistics=True)
    model = prepared(nn.Sequential(Plain(conv(), batch_stats, None), Plain(conv(), nn.BatchNorm(C), None)))
    for report in both_modes(model):
        assert "batch statistics" in left_reason(report, "0.seq.1")
        assert "1.seq.1" not in report.remaining_batch_norms and report.batch_norms_folded == 1


def test_batch_norm_2d_with_use_global_stats_false_is_left():
    model = prepared(nn.Sequential(Plain(conv(), nn.BatchNorm2D(C, use_global_stats=False), None)))
    for report in both_modes(model):
        assert "batch statistics" in left_reason(report, "seq.1")


# 7. low precision: a fold that overflows the dtype is left
def test_fold_overflowing_float16_is_left_not_made_inf():
    model = prepared(nn.Sequential(nn.Conv2D(C, C, 3, padding=1), nn.BatchNorm2D(C)))
    model[0].weight.set_value(np.full([C, C, 3, 3], 60000.0, "float32"))
    model[1]._variance.set_value(np.full([C], 1e-6, "float32"))
    model[1]._epsilon = 1e-7
    model.to(dtype="float16")
    report = convert(model)
    assert report.batch_norms_folded == 0
    assert "not finite in float16" in left_reason(report, "1")
    assert bool(paddle.isfinite(report.model[0].weight.astype("float32")).all())


# 8. report and API
def test_inplace_converts_a_root_that_has_convert_to_deploy():
    model = prepared(ConvertsItself(C, 3))
    xs = inputs()
    expected = outputs(model, xs)
    report = convert(model, inplace=True)
    assert report.model is model and isinstance(model.bn, nn.Identity)
    assert_equal(report, expected, xs)


class TwoParents(nn.Layer):
    def __init__(self, shared):
        super().__init__()
        self.a = nn.Sequential(shared, nn.ReLU())
        self.b = nn.Sequential(shared, nn.Sigmoid())

    def forward(self, x):
        return self.a(x) + self.b(x)


def test_layer_shared_by_two_parents_is_converted_in_both():
    model = prepared(TwoParents(ConvertsItself(C, 3)))
    for report in both_modes(model):
        assert isinstance(report.model.a[0].bn, nn.Identity) and report.model.a[0] is report.model.b[0]
        assert not report.remaining_batch_norms
        convert(report.model, strict=True)  # nothing left, so strict passes -- truthfully


# crashes that are now one clear ppfuse error, or a BatchNorm left with its reason
@pytest.mark.ppdet
def test_mobileone_with_group_norm_is_left_with_reason():
    from ppdet.modeling.backbones.mobileone import MobileOneBlock
    model = prepared(nn.Sequential(MobileOneBlock(C, C, 1, 3, norm_type="gn", norm_groups=2)))
    xs = inputs()
    expected = outputs(model, xs)
    report = convert(model)
    assert_equal(report, expected, xs)


def test_transposed_fold_with_wrong_groups_is_a_kernel_error():
    kernel = paddle.randn([4, 3, 3, 3])  # a transposed conv 4 -> 6 channels with groups=2
    stats = [paddle.zeros([6]), paddle.ones([6]), None, None, 1e-5]
    kernels.fold_bn(kernel, None, *stats, transposed=True, groups=2)
    with pytest.raises(KernelError, match="groups=3 gives 9 output channels, BatchNorm has 6"):
        kernels.fold_bn(kernel, None, *stats, transposed=True, groups=3)


def test_per_channel_alpha_is_merged_per_channel():
    block = prepared(RepVggBlock(C, C, act="relu", alpha=True))
    block.alpha = block.create_parameter([1, C, 1, 1])
    block.alpha.set_value(np.linspace(-1, 2, C).reshape([1, C, 1, 1]).astype("float32"))
    for report in both_modes(block):
        assert report.model.deployed


@pytest.mark.ppdet
def test_ppdet_block_with_per_channel_alpha_is_left_as_ppdet_cannot_run_it():
    from ppdet.modeling.backbones.cspresnet import RepVggBlock as PPDetRepVggBlock
    block = prepared(PPDetRepVggBlock(C, C, act="relu", alpha=True))
    block.alpha = block.create_parameter([1, C, 1, 1])
    report = convert(block)
    assert "has no truth value" in left_reason(report, "conv1.bn")


def test_conv_output_squeezed_before_batchnorm1d_is_left_not_aborted():
    model = prepared(nn.Sequential(Squeezed(C), Plain(conv(), nn.BatchNorm2D(C), None)))
    no_spec, with_spec = both_modes(model)
    assert "squeeze" in left_reason(with_spec, "0.bn") and with_spec.batch_norms_folded == 1


class ThisNotSelf(nn.Layer):
    def __init__(this):
        super().__init__()
        this.conv, this.bn = conv(), nn.BatchNorm2D(C)

    def forward(this, x):
        return this.bn(this.conv(x))


def test_forward_whose_first_parameter_is_not_self_is_traced():
    model = prepared(ThisNotSelf())
    no_spec, with_spec = both_modes(model)
    assert with_spec.batch_norms_folded == 1


def test_trace_failure_names_the_real_cause():
    class Untraceable(nn.Layer):
        def forward(self, x):
            if not paddle.in_dynamic_mode():
                raise RuntimeError("my_custom_op has no static-graph kernel")
            return x
    # a failed trace no longer aborts: the conversion goes on as without input_spec, the report says why
    report = convert(prepared(Untraceable()), input_spec=SPEC)
    assert report.trace_error == ("tracing Untraceable.forward with paddle.jit.to_static failed in "
                                  "Untraceable.forward: RuntimeError: my_custom_op has no static-graph kernel")
    assert report.trace_error in report.summary() and not report.confirmed_by_trace


def test_after_a_failed_trace_the_vouched_folds_are_still_compared_on_the_example_inputs(monkeypatch):
    class UntraceableTail(nn.Layer):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = conv(), nn.BatchNorm2D(C)

        def forward(self, x):
            y = self.bn(self.conv(x))
            if not paddle.in_dynamic_mode():
                raise RuntimeError("my_custom_op has no static-graph kernel")
            return y

    from ppfuse import register_conv_bn
    register_conv_bn(UntraceableTail)
    model = prepared(UntraceableTail())
    x = paddle.randn([2, C, C, C])
    report = convert(model, input_spec=SPEC, example_inputs=[x])
    assert report.trace_error and report.batch_norms_folded == 1 and report.verification is not None
    assert report.verification.ok
    real = kernels.fold_bn  # a wrong fold is now caught although no trace confirmed it
    monkeypatch.setattr(kernels, "fold_bn", lambda *a, **k: (real(*a, **k)[0], real(*a, **k)[1] + 0.5))
    with pytest.raises(PPFuseError, match="first rewrite after which they differ"):
        convert(model, input_spec=SPEC, example_inputs=[x])


def test_merge_concat_with_mixed_dtypes_is_a_kernel_error():
    a = (paddle.randn([2, 3, 3, 3]), paddle.zeros([2]))
    b = (paddle.randn([2, 3, 1, 1]).astype("float64"), None)
    with pytest.raises(KernelError, match="different dtypes"):
        kernels.merge_concat([a, b])


def test_output_check_refuses_and_names_the_rewrite(monkeypatch):
    """A conversion bug is refused with the first differing output and the first bad rewrite named."""
    real = kernels.fold_bn
    calls = []

    def buggy(*args, **kwargs):
        kernel, bias = real(*args, **kwargs)
        calls.append(1)
        return kernel, bias + (0.5 if len(calls) == 2 else 0.0)
    monkeypatch.setattr(kernels, "fold_bn", buggy)
    model = prepared(nn.Sequential(Plain(conv(), nn.BatchNorm2D(C), "relu"), Plain(conv(), nn.BatchNorm2D(C), None)))
    before = {k: v.numpy().copy() for k, v in model.state_dict().items()}
    with pytest.raises(PPFuseError, match=r"output out \[2, 4, 4, 4\] is off by .* first rewrite after which "
                                          r"they differ: 1\.seq\.0"):
        convert(model, inplace=True, input_spec=SPEC)
    for key, value in model.state_dict().items():
        np.testing.assert_array_equal(value.numpy(), before[key])





class SharedBatchNorm(nn.Layer):
    """The pair's BN object also sits under a second name and is applied to the input."""

    def __init__(self):
        super().__init__()
        self.seq = nn.Sequential(conv(), nn.BatchNorm2D(C))
        self.extra = self.seq[1]

    def forward(self, x):
        return self.seq(x) + self.extra(x)


class Intermediates(ConvBN):
    def intermediates(self, x):
        c = self.conv(x)
        return self.bn(c), c


class CallsAMethod(nn.Layer):
    """A parent calls a method of a registered pair type that returns the conv output too."""

    def __init__(self):
        super().__init__()
        self.block = Intermediates(C, C, 3, padding=1)

    def forward(self, x):
        y, c = self.block.intermediates(x)
        return y + c


@pytest.mark.parametrize("model_type,why", [(SharedBatchNorm, "held elsewhere|BatchNorm 2 times"),
                                            (CallsAMethod, "calls block.intermediates|also used elsewhere")])
def test_layers_reached_other_than_through_forward_are_not_folded(model_type, why):
    for report in both_modes(prepared(model_type())):
        assert report.batch_norms_folded == 0
        assert re.search(why, next(iter(report.remaining_batch_norms.values())))
