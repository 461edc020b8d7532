"""The pure transforms of ppfuse.core.kernels, each checked against running the original Paddle layers.

Property-based: hypothesis sweeps kernel sizes, strides, groups (1, 2,
depthwise), dilation, conv bias, spatial rank and channel counts (odd ones
too), with randomized BatchNorm statistics. Tolerance: fp32, atol = rtol = 1e-5.
"""
import numpy as np
import paddle
import paddle.nn as nn
import paddle.nn.functional as F
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import assert_close
from ppfuse.core import kernels, layers
from ppfuse.errors import KernelError

CONV = {1: nn.Conv1D, 2: nn.Conv2D, 3: nn.Conv3D}
CONV_T = {1: nn.Conv1DTranspose, 2: nn.Conv2DTranspose, 3: nn.Conv3DTranspose}
BN = {1: nn.BatchNorm1D, 2: nn.BatchNorm2D, 3: nn.BatchNorm3D}
FUNC_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def random_bn(bn, rng):
    c = bn._mean.shape[0]
    bn._mean.set_value(rng.normal(0, 0.5, c).astype("float32"))
    bn._variance.set_value(rng.uniform(0.05, 3.0, c).astype("float32"))
    if bn.weight is not None:
        bn.weight.set_value(rng.uniform(-2, 2, c).astype("float32"))
        bn.bias.set_value(rng.normal(0, 1, c).astype("float32"))
    bn.eval()
    return bn


def run_folded(conv, kernel, bias, x):
    folded = layers.conv_like(conv, kernel, bias)
    folded.eval()
    return folded(x)


@st.composite
def conv_bn_case(draw):
    ndim = draw(st.sampled_from([1, 2, 2, 2, 3]))
    groups_kind = draw(st.sampled_from(["one", "two", "depthwise"]))
    per_group_in = draw(st.integers(1, 3))
    if groups_kind == "one":
        groups, cin = 1, draw(st.integers(1, 7))
        cout = draw(st.integers(1, 7))
    elif groups_kind == "two":
        groups, cin = 2, 2 * per_group_in
        cout = 2 * draw(st.integers(1, 3))
    else:
        cin = draw(st.integers(1, 6))
        groups, cout = cin, cin * draw(st.integers(1, 2))
    kernel = tuple(draw(st.sampled_from([1, 2, 3, 5])) for _ in range(ndim))
    return dict(ndim=ndim, cin=cin, cout=cout, groups=groups, kernel=kernel,
                stride=draw(st.integers(1, 2)), dilation=draw(st.integers(1, 2)),
                padding=draw(st.integers(0, 2)), bias=draw(st.booleans()),
                affine=draw(st.booleans()),
                epsilon=draw(st.sampled_from([1e-5, 1e-3, 0.1])), seed=draw(st.integers(0, 10_000)))


@settings(max_examples=120)
@given(conv_bn_case())
def test_fold_bn_matches_conv_then_bn(case):
    """Conv (any rank, groups, stride, dilation, kernel shape, with/without bias) then BN == one conv."""
    rng = np.random.RandomState(case["seed"])
    ndim = case["ndim"]
    conv = CONV[ndim](case["cin"], case["cout"], case["kernel"], stride=case["stride"],
                      padding=case["padding"], dilation=case["dilation"], groups=case["groups"],
                      bias_attr=None if case["bias"] else False)
    bn_kwargs = {} if case["affine"] else {"weight_attr": False, "bias_attr": False}
    bn = random_bn(BN[ndim](case["cout"], epsilon=case["epsilon"], **bn_kwargs), rng)
    conv.eval()
    spatial = [(k - 1) * case["dilation"] + 3 + d for d, k in enumerate(case["kernel"])]
    x = paddle.to_tensor(rng.normal(0, 1, [2, case["cin"]] + spatial).astype("float32"))
    expected = bn(conv(x))
    kernel, bias = layers.fold_conv_bn(conv, bn, "case")
    assert kernel.dtype == conv.weight.dtype
    assert_close(run_folded(conv, kernel, bias, x), expected)


@settings(max_examples=40)
@given(ndim=st.sampled_from([1, 2, 3]), groups=st.sampled_from([1, 2]), per_group=st.integers(1, 3),
       out_per_group=st.integers(1, 3), k=st.sampled_from([1, 2, 3]), stride=st.integers(1, 2),
       bias=st.booleans(), seed=st.integers(0, 10_000))
def test_fold_bn_into_transposed_conv(ndim, groups, per_group, out_per_group, k, stride, bias, seed):
    """ConvTranspose (weight [C_in, C_out/g, ...]) with groups, then BN, == one ConvTranspose."""
    rng = np.random.RandomState(seed)
    cin, cout = groups * per_group, groups * out_per_group
    conv = CONV_T[ndim](cin, cout, k, stride=stride, groups=groups, bias_attr=None if bias else False)
    bn = random_bn(BN[ndim](cout), rng)
    conv.eval()
    x = paddle.to_tensor(rng.normal(0, 1, [2, cin] + [5] * ndim).astype("float32"))
    kernel, bias_ = layers.fold_conv_bn(conv, bn, "case")
    assert_close(run_folded(conv, kernel, bias_, x), bn(conv(x)))


@settings(max_examples=30)
@given(groups=st.sampled_from([1, 2, "depthwise"]), per_group=st.integers(1, 4), k=st.sampled_from([1, 3, 5]),
       ndim=st.sampled_from([1, 2, 3]), seed=st.integers(0, 1000))
def test_identity_kernel_returns_input(groups, per_group, k, ndim, seed):
    channels = (per_group * 2) if groups == 2 else per_group * 3 if groups == 1 else per_group
    groups = channels if groups == "depthwise" else groups
    x = paddle.to_tensor(np.random.RandomState(seed).normal(0, 1, [2, channels] + [6] * ndim).astype("float32"))
    kernel = kernels.identity_kernel(channels, groups, k, ndim)
    y = FUNC_CONV[ndim](x, kernel, padding=k // 2, groups=groups)
    np.testing.assert_array_equal(y.numpy(), x.numpy())


@settings(max_examples=30)
@given(shape=st.sampled_from([(1, 1), (1, 3), (3, 1), (3, 3), (1, 5), (3, 5)]), target=st.sampled_from([3, 5, 7]),
       stride=st.integers(1, 2), seed=st.integers(0, 1000))
def test_pad_kernel_keeps_the_function(shape, target, stride, seed):
    """A kh x kw conv with 'same' padding equals the padded TxT conv with padding T//2."""
    if max(shape) > target:
        return
    rng = np.random.RandomState(seed)
    x = paddle.to_tensor(rng.normal(0, 1, [1, 3, 9, 8]).astype("float32"))
    w = paddle.to_tensor(rng.normal(0, 1, [4, 3, *shape]).astype("float32"))
    small = F.conv2d(x, w, stride=stride, padding=[shape[0] // 2, shape[1] // 2])
    big = F.conv2d(x, kernels.pad_kernel(w, target), stride=stride, padding=target // 2)
    assert_close(big, small)


def test_pad_kernel_refuses_off_centre_sizes():
    with pytest.raises(KernelError, match="even amount"):
        kernels.pad_kernel(paddle.ones([1, 1, 2, 2]), 3)


@settings(max_examples=40)
@given(branches=st.integers(1, 4), scales=st.lists(st.sampled_from([None, 1.0, 0.0, -0.7, 2.5, "tensor"]),
                                                    min_size=4, max_size=4), seed=st.integers(0, 1000))
def test_merge_parallel_with_scales(branches, scales, seed):
    """sum_i s_i * conv_i(x) == one conv; scales None, 0, negative, or a learnable [1] tensor."""
    rng = np.random.RandomState(seed)
    x = paddle.to_tensor(rng.normal(0, 1, [2, 3, 7, 7]).astype("float32"))
    pairs, expected, used = [], 0, []
    for i in range(branches):
        k = paddle.to_tensor(rng.normal(0, 1, [5, 3, 3, 3]).astype("float32"))
        b = paddle.to_tensor(rng.normal(0, 1, [5]).astype("float32"))
        s = scales[i]
        if s == "tensor":
            s = paddle.to_tensor([float(rng.uniform(-2, 2))])
        pairs.append((k, b))
        used.append(s)
        factor = 1.0 if s is None else s
        expected = expected + factor * F.conv2d(x, k, b, padding=1)
    kernel, bias = kernels.merge_parallel(pairs, used)
    assert_close(F.conv2d(x, kernel, bias, padding=1), expected)


@settings(max_examples=40)
@given(groups=st.sampled_from([1, 2]), k=st.sampled_from([1, 3, 5]), bias1=st.booleans(), bias2=st.booleans(),
       stride=st.integers(1, 2), seed=st.integers(0, 1000))
def test_merge_sequential_1x1_then_kxk(groups, k, bias1, bias2, stride, seed):
    """1x1 conv (stride 1, padding 0) then kxk conv (padding 0), same groups, == one kxk conv."""
    rng = np.random.RandomState(seed)
    cin, mid, cout = 2 * groups, 4 * groups, 3 * groups
    x = paddle.to_tensor(rng.normal(0, 1, [2, cin, 9, 9]).astype("float32"))
    k1 = paddle.to_tensor(rng.normal(0, 1, [mid, cin // groups, 1, 1]).astype("float32"))
    b1 = paddle.to_tensor(rng.normal(0, 1, [mid]).astype("float32")) if bias1 else None
    k2 = paddle.to_tensor(rng.normal(0, 1, [cout, mid // groups, k, k]).astype("float32"))
    b2 = paddle.to_tensor(rng.normal(0, 1, [cout]).astype("float32")) if bias2 else None
    expected = F.conv2d(F.conv2d(x, k1, b1, groups=groups), k2, b2, stride=stride, groups=groups)
    kernel, bias = kernels.merge_sequential((k1, b1), (k2, b2), groups)
    assert_close(F.conv2d(x, kernel, bias, stride=stride, groups=groups), expected, atol=1e-4)


@settings(max_examples=25)
@given(sizes=st.lists(st.sampled_from([1, 3, 5]), min_size=1, max_size=3), seed=st.integers(0, 1000))
def test_merge_concat(sizes, seed):
    """Branches of different kernel sizes ('same' padding) concatenated on channels == one conv."""
    rng = np.random.RandomState(seed)
    x = paddle.to_tensor(rng.normal(0, 1, [2, 3, 8, 8]).astype("float32"))
    pairs, outs = [], []
    for k in sizes:
        w = paddle.to_tensor(rng.normal(0, 1, [2, 3, k, k]).astype("float32"))
        b = paddle.to_tensor(rng.normal(0, 1, [2]).astype("float32"))
        pairs.append((w, b))
        outs.append(F.conv2d(x, w, b, padding=k // 2))
    kernel, bias = kernels.merge_concat(pairs)
    big = max(sizes)
    assert_close(F.conv2d(x, kernel, bias, padding=big // 2), paddle.concat(outs, axis=1))


@settings(max_examples=25)
@given(k=st.integers(1, 4), stride=st.integers(1, 3), channels=st.integers(1, 5), ndim=st.sampled_from([1, 2, 3]),
       seed=st.integers(0, 1000))
def test_avg_pool_as_conv(k, stride, channels, ndim, seed):
    x = paddle.to_tensor(np.random.RandomState(seed).normal(0, 1, [2, channels] + [8] * ndim).astype("float32"))
    pool = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}[ndim]
    expected = pool(x, k, stride=stride)
    got = FUNC_CONV[ndim](x, kernels.avg_pool_kernel(channels, k, ndim), stride=stride)
    assert_close(got, expected)


def test_fold_keeps_dtype_and_computes_in_float64():
    """A tiny variance: the float64 fold matches numpy's float64 result to fp32 rounding."""
    kernel = paddle.to_tensor(np.full([2, 1, 1, 1], 3.0, "float32"))
    mean = paddle.to_tensor([0.1, -0.2])
    var = paddle.to_tensor([1e-7, 4.0])
    gamma = paddle.to_tensor([2.0, 0.5])
    beta = paddle.to_tensor([0.3, 0.0])
    k, b = kernels.fold_bn(kernel, None, mean, var, gamma, beta, 1e-5)
    assert k.dtype == paddle.float32
    scale = np.array([2.0, 0.5]) / np.sqrt(np.array([1e-7, 4.0]) + 1e-5)
    np.testing.assert_allclose(k.numpy().reshape(-1), 3.0 * scale, rtol=1e-6)
    np.testing.assert_allclose(b.numpy(), np.array([0.3, 0.0]) - np.array([0.1, -0.2]) * scale, rtol=1e-6)
