"""Conv -> BN pairs found by traced dataflow: paddle.vision models, 1D/3D/transposed convs, refusals.

Models are built with random weights (no downloads), BatchNorm statistics set
from a random batch, then randomized. Tolerance, on outputs relative to their
largest magnitude: 1e-5 -- or, where the fp32 model itself is further than
that from a float64 run of it (MobileNets: ~1.3e-5 and ~2.9e-5), no further
from float64 than twice the original's own fp32 error.
"""
import copy

import numpy as np
import paddle
import paddle.nn as nn
import pytest
from paddle.static import InputSpec

from conftest import assert_close, scale_to_unit
from ppfuse.core import layers
from ppfuse import convert


def prepared(model, shape, seed=0):
    paddle.seed(seed)
    x = paddle.to_tensor(np.random.RandomState(seed).normal(0, 1, shape).astype("float32"))
    layers.randomize(model, seed)
    model.eval()
    layers.calibrate_batch_norms(model, lambda: model(x))
    layers.randomize(model, seed + 1)  # statistics away from the batch's too
    return model, x


@pytest.mark.parametrize("name,by_dataflow", [("resnet18", True), ("resnet50", True), ("mobilenet_v2", False),
                                              ("mobilenet_v3_small", False)])
def test_paddle_vision_models_fold_every_bn(name, by_dataflow):
    """ResNets need dataflow (bn1(conv1(x)) in forward); MobileNets declare Sequential(Conv, BN, act)."""
    from paddle.vision import models
    model, x = prepared(getattr(models, name)(num_classes=10), [2, 3, 64, 64])
    expected = model(x)
    report = convert(model, input_spec=[InputSpec([None, 3, 64, 64], "float32", "x")])
    assert not report.remaining_batch_norms, report.remaining_batch_norms
    assert not [s for s in report.model.sublayers() if layers.is_batch_norm(s)]
    assert (report.counts.get("conv+bn (dataflow)", 0) > 0) == by_dataflow
    model64 = copy.deepcopy(model)
    model64.to(dtype="float64")
    truth = model64(x.astype("float64")).numpy()
    scale = np.abs(truth).max()
    original_error = np.abs(expected.numpy() - truth).max() / scale
    deployed_error = np.abs(report.model(x).numpy() - truth).max() / scale
    print(f"\n{name}: relative error vs float64: fp32 original {original_error:.2g}, deployed {deployed_error:.2g}")
    assert deployed_error <= max(1e-5, 2 * original_error)


def test_without_input_spec_the_resnet_stem_bn_is_reported():
    from paddle.vision.models import resnet18
    model, _ = prepared(resnet18(num_classes=10), [1, 3, 32, 32])
    report = convert(model)
    assert "bn1" in report.remaining_batch_norms and "input_spec" in report.remaining_batch_norms["bn1"]


class Mixed(nn.Layer):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv1D(3, 4, 3, bias_attr=True)
        self.b1 = nn.BatchNorm1D(4)
        self.c3 = nn.Conv3D(2, 4, 3, groups=2, padding=1, bias_attr=False)
        self.b3 = nn.BatchNorm3D(4)
        self.ct = nn.Conv2DTranspose(4, 6, 3, stride=2, groups=2)
        self.bt = nn.BatchNorm2D(6)

    def forward(self, x1, x3, x2):
        return self.b1(self.c1(x1)), self.b3(self.c3(x3)), self.bt(self.ct(x2))


def test_conv1d_conv3d_and_grouped_transposed_conv_fold():
    rng = np.random.RandomState(0)
    model = Mixed()
    layers.randomize(model, 4)
    model.eval()
    inputs = [paddle.to_tensor(rng.normal(0, 1, s).astype("float32")) for s in ([2, 3, 9], [1, 2, 5, 5, 5],
                                                                               [2, 4, 5, 5])]
    expected = model(*inputs)
    specs = [InputSpec([None, 3, 9]), InputSpec([None, 2, 5, 5, 5]), InputSpec([None, 4, 5, 5])]
    report = convert(model, input_spec=specs)
    assert report.counts == {"conv+bn (dataflow)": 3} and not report.remaining_batch_norms
    for got, want in zip(report.model(*inputs), expected):
        assert_close(scale_to_unit(got), scale_to_unit(want))


class SharedOutput(nn.Layer):
    """The conv output feeds the BN and a residual add: folding would change the add."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2D(3, 3, 3, padding=1)
        self.bn = nn.BatchNorm2D(3)
        self.head_bn = nn.BatchNorm2D(3)
        self.conv2 = nn.Conv2D(3, 3, 1)

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y) + y, self.conv2(self.head_bn(x))


def test_refusals_are_reported_with_reasons():
    model = SharedOutput()
    layers.randomize(model, 1)
    model.eval()
    x = paddle.randn([1, 3, 6, 6])
    expected = model(x)
    report = convert(model, input_spec=[InputSpec([None, 3, 6, 6])])
    assert report.converted == []
    assert "also used elsewhere" in report.remaining_batch_norms["bn"]
    assert "input is a model input" in report.remaining_batch_norms["head_bn"]
    for got, want in zip(report.model(x), expected):
        np.testing.assert_array_equal(got.numpy(), want.numpy())
