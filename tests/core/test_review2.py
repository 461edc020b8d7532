"""The second outside review's classes, one test each, both modes (with and without input_spec) where it
applies: every case ends equal (outputs within tolerance of their scale, NaN/Inf in the same places) or
refused with one ppfuse error -- never a different model."""
import dataclasses

import numpy as np
import paddle
import paddle.nn as nn
import pytest
from paddle.static import InputSpec

from adversarial_models import (BiasAgain, BoundMethodTap, ClosureTap, GetattrTap, HookedParent, ParametersTap,
                                repvgg_geometry_block)
from conftest import scale_to_unit
from ppfuse import ConvBN, ConversionError, RepVggBlock, convert, register_converter
from ppfuse.core import checkpoint, layers
from ppfuse.core.verify import compare, rounding_check
from ppfuse.errors import CheckpointError

C = 4
SPEC = [InputSpec([None, C, 8, 8], "float32", "x")]


def prepared(model, seed=0):
    layers.randomize(model, seed)
    model.eval()
    return model


def x_of(seed=1, dtype="float32"):
    return paddle.to_tensor(np.random.RandomState(seed).normal(0.2, 1, (2, C, 8, 8)).astype(dtype))


def pair():
    return nn.Conv2D(C, C, 3, padding=1), nn.BatchNorm2D(C)


def assert_same(a, b, tolerance=1e-4):
    a, b = (np.asarray(v.numpy() if isinstance(v, paddle.Tensor) else v, np.float64) for v in (a, b))
    bad = ~np.isfinite(a)
    assert np.array_equal(bad, ~np.isfinite(b)) and np.array_equal(a[bad], b[bad], equal_nan=True)
    np.testing.assert_allclose(scale_to_unit(b[~bad]), scale_to_unit(a[~bad]) * 1.0, atol=tolerance)


# 1. callables the model holds reach the model itself, not the copy ppfuse plans on
@pytest.mark.parametrize("pattern", [ClosureTap, BoundMethodTap])
@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("spec", [SPEC, None])
def test_a_tap_through_a_held_callable_is_seen(pattern, inplace, spec):
    model = prepared(pattern(*pair(), "relu"))
    x = x_of()
    with paddle.no_grad():
        expected = model(x).numpy()
    report = convert(model, inplace=inplace, input_spec=spec)
    assert report.batch_norms_folded == 0 and list(report.remaining_batch_norms) == ["bn"]
    with paddle.no_grad():
        assert_same(expected, report.model(x))
        assert_same(expected, model(x))


# 2. every tensor of any output container is compared; an intermediate output keeps its BatchNorm
@dataclasses.dataclass
class Result:
    y: paddle.Tensor
    raw: paddle.Tensor


class ReturnsRaw(nn.Layer):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = pair()

    def forward(self, x):
        raw = self.conv(x)
        return Result(self.bn(raw), raw)


@pytest.mark.parametrize("check", [True, False])
def test_a_conv_output_returned_in_a_dataclass_keeps_its_batch_norm(check):
    model = prepared(ReturnsRaw())
    x = x_of()
    report = convert(model, input_spec=SPEC, check=check)
    assert report.batch_norms_folded == 0
    assert "also an output of the model" in report.remaining_batch_norms["bn"]
    with paddle.no_grad():
        got, want = report.model(x), model(x)
    assert_same(want.y, got.y)
    assert_same(want.raw, got.raw)


class Opaque(nn.Layer):
    """Returns its output inside an iterator: nothing a reader can take tensors from without consuming it."""

    def __init__(self):
        super().__init__()
        self.inner = ConvBN(C, C, 3, padding=1)

    def forward(self, x):
        return iter([self.inner(x)])


def test_an_output_without_any_tensor_is_refused():
    with pytest.raises(ConversionError, match="returned no floating-point tensor"):
        convert(prepared(Opaque()), example_inputs=[x_of()])


# 3. non-finite values are values
def test_compare_requires_the_same_non_finite_values_in_the_same_places():
    reference = {"out": np.array([1.0, -np.inf, np.nan, 2.0])}
    assert compare(reference, {"out": np.array([1.0, -np.inf, np.nan, 2.0 + 1e-9])}, 1e-6, 0).ok
    for other in ([1.0, np.inf, np.nan, 2.0], [1.0, -np.inf, 0.0, 2.0], [1.0, -5.0, np.nan, 2.0],
                  [np.nan, -np.inf, np.nan, 2.0]):
        result = compare(reference, {"out": np.array(other)}, 1e-6, 0)
        assert not result.ok and result.outputs[0].nonfinite
    result = compare(reference, {"out": np.array([1.5, -np.inf, np.nan, 2.0])}, 1e-6, 0)
    assert not result.ok and result.max_abs == pytest.approx(0.5)


def test_the_float64_criterion_does_not_pass_what_inf_hides():
    original64 = {"out": np.array([1.0, -np.inf, 3.0])}
    original32 = {"out": np.array([1.0 + 1e-7, -np.inf, 3.0])}
    assert rounding_check(original32, {"out": np.array([1.0, -np.inf, 3.0 + 1e-7])}, original64).ok
    assert not rounding_check(original32, {"out": np.array([9.0, -np.inf, 3.0])}, original64).ok
    assert not rounding_check(original32, {"out": np.array([1.0, -np.inf, -np.inf])}, original64).ok
    broken = {"out": np.array([1.0, 5.0, 3.0])}  # the original's own fp32 run is unbounded: decides nothing
    assert not rounding_check(broken, {"out": np.array([1.0, -np.inf, 3.0])}, original64).ok


class LogOfRelu(nn.Layer):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = pair()

    def forward(self, x):
        return paddle.log(nn.functional.relu(self.bn(self.conv(x))))


def test_a_model_with_minus_inf_outputs_converts_with_them_in_place():
    model = prepared(LogOfRelu())
    x = x_of()
    report = convert(model, input_spec=SPEC, example_inputs=[x])
    with paddle.no_grad():
        want = model(x).numpy()
    assert np.isneginf(want).any() and report.batch_norms_folded == 1
    with paddle.no_grad():
        assert_same(want, report.model(x))


@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_a_checkpoint_with_non_finite_weights_is_refused_naming_the_tensor(tmp_path, value):
    model = prepared(ConvBN(C, C, 3, padding=1))
    state = {k: v.numpy() for k, v in model.state_dict().items()}
    state["conv.weight"][1, 2, 0, 0] = value
    path = str(tmp_path / "diverged.pdparams")
    paddle.save(state, path)
    with pytest.raises(CheckpointError, match=r"conv\.weight holds NaN or Inf \(first at index \[1, 2, 0, 0\]\)"):
        checkpoint.safe_load(path)


def test_a_nan_conv_weight_is_named_as_such():
    model = prepared(ConvBN(C, C, 3, padding=1))
    model.conv.weight.set_value(np.full(model.conv.weight.shape, np.nan, "float32"))
    with pytest.raises(ConversionError, match=r"conv \(Conv2D\): its weight contains NaN or Inf"):
        convert(model)


# 4. dataflow: a second use of the conv's bias
@pytest.mark.parametrize("check", [True, False])
def test_a_conv_bias_added_again_keeps_its_batch_norm(check):
    model = prepared(BiasAgain(*pair(), None))
    x = x_of()
    report = convert(model, input_spec=SPEC, check=check)
    assert report.batch_norms_folded == 0 and list(report.remaining_batch_norms) == ["bn"]
    with paddle.no_grad():
        assert_same(model(x), report.model(x))


# 5. the vouched path: getattr, parameters(), a hook on a parent
@pytest.mark.parametrize("pattern", [GetattrTap, ParametersTap, HookedParent])
@pytest.mark.parametrize("spec", [SPEC, None])
def test_reaching_a_pair_generically_is_not_vouched_for(pattern, spec):
    model = prepared(pattern(*pair(), "relu"))
    x = x_of()
    report = convert(model, input_spec=spec)
    with paddle.no_grad():
        assert_same(model(x), report.model(x))
    if spec is None:
        assert report.batch_norms_folded == 0 and not report.confirmed_by_trace


# 6. block geometry: reproduced exactly, or the block is left with its reason
@pytest.mark.parametrize("kind, converts", [("dilated", True), ("5x5", True), ("stride2", True), ("grouped", True),
                                            ("reflect", False), ("dilated_vs_3x3", False)])
@pytest.mark.parametrize("spec", [SPEC, None])
def test_repvgg_block_geometry_is_reproduced_or_left(kind, converts, spec):
    model = prepared(repvgg_geometry_block(kind, C, "relu", alpha=True, identity=True))
    x = x_of()
    report = convert(model, input_spec=spec)
    with paddle.no_grad():
        assert_same(model(x), report.model(x))
    if converts:
        assert report.counts == {"RepVggBlock": 1}, report.summary()
    else:
        assert "RepVggBlock" not in report.counts and report.remaining_batch_norms, report.summary()


# 7. float64 models stay float64; frozen ones stay frozen
def test_a_float64_block_converts_to_float64_convs():
    model = prepared(nn.Sequential(RepVggBlock(C, C, alpha=True, identity=True), ConvBN(C, C, 1)))
    model.to(dtype="float64")
    x = x_of(dtype="float64")
    report = convert(model, input_spec=[InputSpec([None, C, 8, 8], "float64", "x")])
    assert report.batch_norms_folded == 4
    assert all(p.dtype == paddle.float64 for p in report.model.parameters())
    with paddle.no_grad():
        np.testing.assert_allclose(report.model(x).numpy(), model(x).numpy(), rtol=1e-9, atol=1e-9)


def test_a_frozen_model_stays_frozen_and_no_trace_is_not_a_confirmation():
    model = prepared(nn.Sequential(RepVggBlock(C, C, alpha=True), ConvBN(C, C, 3, padding=1)))
    for param in model.parameters():
        param.stop_gradient = True
    report = convert(model)
    assert report.batch_norms_folded == 3 and all(p.stop_gradient for p in report.model.parameters())
    assert not report.confirmed_by_trace
    assert convert(model, input_spec=SPEC).confirmed_by_trace


# 8. one ppfuse error, not a raw one
def test_malformed_input_specs_are_one_error_and_a_bare_spec_works():
    model = prepared(ConvBN(C, C, 3, padding=1))
    with pytest.raises(ConversionError, match="flat list of paddle.static.InputSpec"):
        convert(model, input_spec=[SPEC])
    with pytest.raises(ConversionError, match=r"running it on inputs of input_spec's shapes \(\[2, 5, 8, 8\]\)"):
        convert(model, input_spec=[InputSpec([None, 5, 8, 8], "float32", "x")])
    assert convert(model, input_spec=SPEC[0]).batch_norms_folded == 1


class Custom(nn.Layer):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = pair()

    def forward(self, x):
        return self.bn(self.conv(x))


def test_a_failing_user_converter_is_named():
    def broken(layer, site):
        raise KeyError("no such branch")
    register_converter(Custom, broken)
    try:
        with pytest.raises(ConversionError, match=r"^inner \(Custom\): its converter .*broken raised KeyError"):
            convert(prepared(nn.Sequential(("inner", Custom()))))
    finally:
        from ppfuse import DEFAULT_REGISTRY
        DEFAULT_REGISTRY.unregister(Custom)


def test_a_grouped_repvgg_block_converts_with_a_spec():
    block = RepVggBlock(C, C, identity=True)
    block.conv1.conv = nn.Conv2D(C, C, 3, padding=1, groups=2, bias_attr=False)
    block.conv2.conv = nn.Conv2D(C, C, 1, groups=2, bias_attr=False)
    model = prepared(block)
    x = x_of()
    report = convert(model, input_spec=SPEC)
    assert report.counts == {"RepVggBlock": 1} and report.model.conv._groups == 2
    with paddle.no_grad():
        assert_same(model(x), report.model(x))


# 9. the reason given is the real one
def test_a_slightly_negative_running_variance_folds():
    model = prepared(ConvBN(C, C, 3, padding=1))
    var = model.bn._variance.numpy()
    var[0] = -0.5 * model.bn._epsilon
    model.bn._variance.set_value(var)
    x = x_of()
    report = convert(model, input_spec=SPEC)
    assert report.batch_norms_folded == 1, report.summary()
    with paddle.no_grad():
        assert_same(model(x), report.model(x))


class Masked(nn.Layer):
    """Keeps a boolean mask as a buffer (RT-DETR keeps its anchors' valid mask so)."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = pair()
        self.register_buffer("valid", paddle.to_tensor(np.arange(C) % 2 == 0).reshape([1, C, 1, 1]))

    def forward(self, x):
        return paddle.where(self.valid, self.bn(self.conv(x)), paddle.zeros_like(x))


def test_the_float64_reference_keeps_boolean_buffers_boolean():
    from ppfuse.core.verify import float64_copy
    model = prepared(Masked())
    model64 = float64_copy(model)
    assert model64.valid.dtype == paddle.bool and model64.conv.weight.dtype == paddle.float64
    x = x_of()
    with paddle.no_grad():
        np.testing.assert_allclose(model64(x.astype("float64")).numpy(), model(x).numpy(), rtol=1e-5, atol=1e-5)
