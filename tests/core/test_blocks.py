"""RepVggBlock: conversion equals the multi-branch block; PaddleDetection layout and parity.

Per block, fp32: atol = rtol = 1e-5 on outputs scaled to unit magnitude.
"""
import numpy as np
import paddle
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import assert_close, scale_to_unit
from ppfuse.core import layers
from ppfuse.deploy.program import count_ops
from ppfuse import convert
from ppfuse import RepVggBlock


def random_block(ch_in, ch_out, stride, identity, alpha, act, seed):
    paddle.seed(seed)
    block = RepVggBlock(ch_in, ch_out, act=act, alpha=alpha is not None, stride=stride, identity=identity)
    layers.randomize(block, seed)
    if alpha is not None:
        block.alpha.set_value(paddle.to_tensor([float(alpha)]))
    block.eval()
    return block


@settings(max_examples=100)
@given(ch_in=st.integers(1, 9), ch_out=st.integers(1, 9), stride=st.sampled_from([1, 2]),
       identity=st.booleans(), alpha=st.sampled_from([None, 1.0, 0.0, -0.6, 0.37, 2.2]),
       act=st.sampled_from(["relu", "swish", None]), size=st.integers(3, 10), seed=st.integers(0, 10_000))
def test_converted_block_equals_branches(ch_in, ch_out, stride, identity, alpha, act, size, seed):
    if identity and (stride != 1 or ch_in != ch_out):
        ch_out, stride = ch_in, 1
    block = random_block(ch_in, ch_out, stride, identity, alpha, act, seed)
    x = paddle.to_tensor(np.random.RandomState(seed).normal(0, 1, [2, ch_in, size, size + 1]).astype("float32"))
    expected = block(x)
    deployed = convert(block).model
    assert deployed.deployed and not block.deployed
    assert list(deployed.state_dict().keys()) == ["conv.weight", "conv.bias"]
    got = deployed(x)
    scale = max(float(np.abs(expected.numpy()).max()), 1e-12)
    assert_close(got.numpy() / scale, expected.numpy() / scale)


def test_alpha_zero_and_negative_are_exact():
    """alpha = 0 removes the 1x1 branch (ppdet's `if self.alpha:` would keep it); alpha < 0 subtracts it."""
    block = random_block(4, 4, 1, False, 0.0, None, 3)
    x = paddle.randn([1, 4, 6, 6])
    only_3x3 = block.conv1(x)
    assert_close(block(x), only_3x3)
    assert_close(convert(block).model(x), only_3x3)
    block.alpha.set_value(paddle.to_tensor([-1.5]))
    expected = block.conv1(x) - 1.5 * block.conv2(x)
    assert_close(scale_to_unit(convert(block).model(x)), scale_to_unit(expected))


def test_identity_branch_needs_stride_1_and_equal_channels():
    with pytest.raises(ValueError, match="identity branch needs stride 1"):
        RepVggBlock(4, 8, identity=True)
    with pytest.raises(ValueError, match="identity branch needs stride 1"):
        RepVggBlock(4, 4, stride=2, identity=True)


def test_convert_to_deploy_is_idempotent_and_deploy_form_loads_the_weights():
    block = random_block(6, 5, 2, False, 0.8, "relu", 11)
    x = paddle.randn([2, 6, 9, 9])
    expected = block(x).numpy()
    block.convert_to_deploy()
    state = {k: v.numpy().copy() for k, v in block.state_dict().items()}
    block.convert_to_deploy()
    for key, value in block.state_dict().items():
        np.testing.assert_array_equal(value.numpy(), state[key])
    direct = RepVggBlock(6, 5, act="relu", alpha=True, stride=2, deploy=True)
    direct.set_state_dict(block.state_dict())
    direct.eval()
    assert_close(scale_to_unit(direct(x)), scale_to_unit(expected))


def test_mixin_methods():
    block = random_block(3, 4, 1, False, 0.5, None, 5)
    k3, b3 = block._fuse_bn_tensor(block.conv1)
    assert list(k3.shape) == [4, 3, 3, 3] and list(b3.shape) == [4]
    k1, _ = block._fuse_bn_tensor(block.conv2)
    padded = block._pad_1x1_to_3x3_tensor(k1)
    np.testing.assert_array_equal(padded.numpy()[:, :, 1, 1], k1.numpy()[:, :, 0, 0])
    assert float(paddle.abs(padded).sum() - paddle.abs(k1).sum()) == pytest.approx(0.0, abs=1e-6)


def _saved_ops(layer, tmp_path, shape):
    static = paddle.jit.to_static(layer, input_spec=[paddle.static.InputSpec(shape, "float32", "x")],
                                  full_graph=True)
    paddle.jit.save(static, str(tmp_path / "model"))
    return count_ops(str(tmp_path))


def test_to_static_emits_no_if_op(tmp_path):
    """alpha is tested with `is not None`, so the traced training-form block has no `if`."""
    block = random_block(4, 4, 1, True, 0.7, "relu", 2)
    ops = _saved_ops(block, tmp_path, [None, 4, 8, 8])
    assert ops.get("if", 0) == 0
    assert ops.get("conv2d", 0) == 2 and ops.get("batch_norm", 0) == 3


@pytest.mark.ppdet
def test_ppdet_block_traced_has_if_op_but_converted_one_not(tmp_path):
    """The bug ppfuse avoids: ppdet's `if self.alpha:` becomes an `if` op; after convert, none is left."""
    from ppdet.modeling.backbones.cspresnet import RepVggBlock as PPDetRepVggBlock
    block = PPDetRepVggBlock(4, 4, act="relu", alpha=True)
    layers.randomize(block, 1)
    block.eval()
    assert _saved_ops(block, tmp_path / "ppdet", [None, 4, 8, 8]).get("if", 0) >= 1
    deployed = convert(block).model
    ops = _saved_ops(deployed, tmp_path / "converted", [None, 4, 8, 8])
    assert ops.get("if", 0) == 0 and ops.get("batch_norm", 0) == 0 and ops.get("conv2d", 0) == 1


@pytest.mark.ppdet
@pytest.mark.parametrize("alpha", [False, True])
def test_same_state_dict_same_outputs_as_ppdet(alpha):
    """A ppdet RepVggBlock's state dict loads into ppfuse's; outputs match before and after conversion."""
    from ppdet.modeling.backbones.cspresnet import RepVggBlock as PPDetRepVggBlock
    paddle.seed(7)
    theirs = PPDetRepVggBlock(6, 8, act="swish", alpha=alpha)
    layers.randomize(theirs, 7)
    theirs.eval()
    ours = RepVggBlock(6, 8, act="swish", alpha=alpha)
    assert sorted(ours.state_dict().keys()) == sorted(theirs.state_dict().keys())
    missing, unexpected = ours.set_state_dict(theirs.state_dict())
    assert not missing and not unexpected
    ours.eval()
    x = paddle.randn([2, 6, 7, 7])
    np.testing.assert_array_equal(ours(x).numpy(), theirs(x).numpy())
    ours_deployed = convert(ours).model
    theirs_deployed = convert(theirs).model
    assert_close(scale_to_unit(ours_deployed(x)), scale_to_unit(theirs(x)))
    assert_close(scale_to_unit(theirs_deployed(x)), scale_to_unit(theirs(x)))
    assert sorted(ours_deployed.state_dict()) == sorted(theirs_deployed.state_dict()) == ["conv.bias", "conv.weight"]


@settings(max_examples=20)
@given(kernel=st.sampled_from([3, 5]), stride=st.sampled_from([1, 2]), conv_num=st.integers(1, 3),
       same=st.booleans(), seed=st.integers(0, 1000))
@pytest.mark.ppdet
def test_ppdet_mobileone_block(kernel, stride, conv_num, same, seed):
    """ppdet's MobileOneBlock (kxk depthwise + 1x1 + identity, then 1x1 + identity) converts exactly."""
    from ppdet.modeling.backbones.mobileone import MobileOneBlock
    paddle.seed(seed)
    ch_out = 6 if same else 10
    block = MobileOneBlock(6, ch_out, stride, kernel, conv_num=conv_num, act="relu")
    layers.randomize(block, seed)
    block.eval()
    x = paddle.to_tensor(np.random.RandomState(seed).normal(0, 1, [2, 6, 9, 9]).astype("float32"))
    expected = block(x)
    report = convert(block)
    assert report.counts == {"ppdet.MobileOneBlock": 1} and not report.remaining_batch_norms
    assert_close(scale_to_unit(report.model(x)), scale_to_unit(expected))
