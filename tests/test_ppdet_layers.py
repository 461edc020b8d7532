"""ppdet's conv-norm layers of every detector family fold with nothing registered by the user.

Each layer type of :data:`ppfuse.ppdet.converters.PPDET_CONV_NORM_LAYERS` is built as ppdet builds
it, with randomized statistics, inside a parent that calls it; converted without and with
``input_spec``, every BatchNorm folds and the outputs stay within 1e-5 of their scale.
"""
import importlib

import numpy as np
import paddle
import paddle.nn as nn
import pytest
from paddle.static import InputSpec

from ppfuse.core import layers

from ppfuse import convert

BUILD = {  # (module, class) -> the layer, 4 input channels, spatial size kept
    ("backbones.resnet", "ConvNormLayer"): lambda cls: cls(4, 6, 3, 1, act="relu", freeze_norm=False),
    ("backbones.hrnet", "ConvNormLayer"): lambda cls: cls(4, 6, 3, act="relu"),
    ("backbones.darknet", "ConvBNLayer"): lambda cls: cls(4, 6, 3, padding=1),
    ("backbones.csp_darknet", "BaseConv"): lambda cls: cls(4, 6, 3, 1),
    ("backbones.mobilenet_v3", "ConvBNLayer"): lambda cls: cls(4, 6, 3, 1, 1, act="hard_swish"),
    ("backbones.lite_hrnet", "ConvNormLayer"): lambda cls: cls(4, 6, 3, norm_type="bn", act="relu"),
    ("backbones.mobilenet_v1", "ConvBNLayer"): lambda cls: cls(4, 6, 3, 1, 1),
    ("backbones.blazenet", "ConvBNLayer"): lambda cls: cls(4, 6, 3, 1, 1),
    ("backbones.shufflenet_v2", "ConvBNLayer"): lambda cls: cls(4, 6, 3, 1, 1, act="relu"),
    ("backbones.lcnet", "ConvBNLayer"): lambda cls: cls(4, 3, 6, 1),
    ("necks.csp_pan", "ConvBNLayer"): lambda cls: cls(4, 6, 3),
    ("necks.csp_pan", "DPModule"): lambda cls: cls(4, 4, 3),
    ("necks.blazeface_fpn", "ConvBNLayer"): lambda cls: cls(4, 6, 3, 1, 1),
    ("heads.ssd_head", "SepConvLayer"): lambda cls: cls(4, 6),
}


def built(module, name, seed=0):
    from ppfuse.ppdet import converters as ppdet_converters
    assert (module, name) in {(m, n) for m, n, _, _ in ppdet_converters.PPDET_CONV_NORM_LAYERS}
    paddle.seed(seed)
    model = nn.Sequential(BUILD[(module, name)](getattr(importlib.import_module(f"ppdet.modeling.{module}"), name)))
    layers.randomize(model, seed)
    model.eval()
    return model


@pytest.mark.parametrize("module,name", list(BUILD))
def test_ppdet_conv_norm_layer_folds_and_stays_equal(module, name):
    model = built(module, name)
    x = paddle.to_tensor(np.random.RandomState(1).normal(0, 1, (2, 4, 8, 8)).astype("float32"))
    expected = model(x).numpy()
    batch_norms = len([s for s in model.sublayers() if layers.is_batch_norm(s)])
    for kwargs in ({}, {"input_spec": [InputSpec([None, 4, 8, 8], "float32", "x")]}):
        report = convert(model, **kwargs)
        assert report.batch_norms_folded == batch_norms > 0 and not report.remaining_batch_norms
        got = report.model(x).numpy()
        scale = float(np.abs(expected).max())
        np.testing.assert_allclose(got / scale, expected / scale, atol=1e-5, rtol=0)


def test_a_norm_its_forward_would_not_apply_is_left():
    model = built("backbones.resnet", "ConvNormLayer")
    model[0].norm_type = "gn"  # ppdet's forward now skips the BatchNorm
    x = paddle.randn([1, 4, 8, 8])
    expected = model(x).numpy()
    report = convert(model)
    assert report.batch_norms_folded == 0 and "does not apply" in report.remaining_batch_norms["0.norm"]
    np.testing.assert_array_equal(report.model(x).numpy(), expected)
