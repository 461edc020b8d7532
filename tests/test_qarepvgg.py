"""QARepVggBlock and the config switch that puts it into PP-YOLOE(+).

Block: its training form, ``ppfuse.core.convert`` (with and without ``input_spec``) and
``convert_to_deploy()`` are all compared with ``paper_block`` below -- QARepVGG as the
paper draws it, written with plain Paddle ops from the weights alone (no ppfuse code):
per block, fp32, atol = rtol = 1e-5 on outputs scaled to unit magnitude.

Switch: ``ppfuse: {rep_block: qarepvgg}`` builds PP-YOLOE+ s (320x320 test config) with
QARepVggBlock in place of every ppdet RepVggBlock; it converts with no BatchNorm left, its
raw outputs equal the training form's within tests/test_ppyoloe.py's tolerance (boxes
1e-2 px, scores 1e-4; measured 3.0e-3 px and 2.2e-5: fp32 rounding -- from a float64 run, the
training form is 1.8e-3 px / 1.2e-5 off, the deployed model 1.7e-3 px / 1.0e-5), and it exports
with tools/export_deploy.py.
Measured per-block errors (300 random cases, relative to the output's scale): training form
vs paper_block 3.9e-7; convert, convert_to_deploy and the equivalent kernel 6.8e-7; with
input_spec 5.3e-7.
"""
import json
import os
import subprocess
import sys

import numpy as np
import paddle
import paddle.nn as nn
import paddle.nn.functional as F
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import ROOT, assert_close, scale_to_unit
from ppfuse.core import checkpoint, layers
from ppfuse import convert
from ppfuse.ppdet import detection
from ppfuse import CheckpointError, ConfigError, ConversionError, QARepVggBlock
from ppfuse.deploy.program import count_ops
from ppfuse.ppdet import detectors

EPS = 1e-5  # paddle.nn.BatchNorm2D's default epsilon
ACTIVATIONS = {"relu": F.relu, "swish": lambda x: x * F.sigmoid(x), None: lambda x: x}


# ------------------------------------------------------------------------------ the paper's block, by hand
def paper_block(x, p, stride, identity, avg_pool, act):
    """``act(BN(BN3(conv3x3(x)) + alpha * conv1x1(x) [+ x] [+ avgpool3x3(x)]))`` from the weights ``p``
    (named as in QARepVggBlock's state dict), BatchNorm written out, the pool as a sum of nine shifts."""
    def batch_norm(y, name):
        def v(key):
            return p[f"{name}.{key}"].reshape([1, -1, 1, 1])
        return (y - v("_mean")) / paddle.sqrt(v("_variance") + EPS) * v("weight") + v("bias")

    y = batch_norm(F.conv2d(x, p["conv1.conv.weight"], stride=stride, padding=1), "conv1.bn")
    one = F.conv2d(x, p["conv2.weight"], stride=stride)
    y = y + (one if "alpha" not in p else p["alpha"] * one)
    if identity:
        y = y + x
    if avg_pool:  # zero padding counted, as YOLOv6's nn.AvgPool2d(3, 1, 1)
        padded = F.pad(x, [1, 1, 1, 1])
        h, w = x.shape[2], x.shape[3]
        y = y + sum(padded[:, :, i:i + h, j:j + w] for i in range(3) for j in range(3)) / 9.0
    return ACTIVATIONS[act](batch_norm(y, "bn"))


def random_block(ch_in, ch_out, stride=1, identity=None, avg_pool=False, alpha=None, act="relu", seed=0):
    paddle.seed(seed)
    block = QARepVggBlock(ch_in, ch_out, act=act, alpha=alpha is not None, stride=stride, identity=identity,
                          avg_pool=avg_pool)
    layers.randomize(block, seed)  # BN statistics, gamma, beta away from the defaults
    if alpha is not None:
        block.alpha.set_value(paddle.to_tensor([float(alpha)]))
    block.eval()
    return block


def weights(block):
    return {k: paddle.to_tensor(v.numpy().copy()) for k, v in block.state_dict().items()}


def unit(y):
    return scale_to_unit(y.numpy() if isinstance(y, paddle.Tensor) else y)


def close_to(got, reference):
    scale = max(float(np.abs(reference.numpy()).max()), 1e-12)
    assert_close(got.numpy() / scale, reference.numpy() / scale)


# ----------------------------------------------------------------------------------------------- the block
@settings(max_examples=80)
@given(ch_in=st.integers(1, 9), ch_out=st.integers(1, 9), stride=st.sampled_from([1, 2]),
       identity=st.sampled_from([None, True, False]), avg_pool=st.booleans(),
       alpha=st.sampled_from([None, 1.0, 0.0, -0.6, 0.37, 2.2]), act=st.sampled_from(["relu", "swish", None]),
       size=st.integers(3, 10), seed=st.integers(0, 10_000))
def test_block_and_its_conversions_equal_the_paper_block(ch_in, ch_out, stride, identity, avg_pool, alpha, act,
                                                         size, seed):
    if (identity or avg_pool) and (stride != 1 or ch_in != ch_out):
        ch_out, stride = ch_in, 1
    block = random_block(ch_in, ch_out, stride, identity, avg_pool, alpha, act, seed)
    assert block.identity == (identity if identity is not None else (stride == 1 and ch_in == ch_out))
    x = paddle.to_tensor(np.random.RandomState(seed).normal(0, 1, [2, ch_in, size, size + 1]).astype("float32"))
    reference = paper_block(x, weights(block), stride, block.identity, avg_pool, act)

    close_to(block(x), reference)  # the training form is the paper's block
    deployed = convert(block).model
    assert deployed.deployed and not block.deployed
    assert list(deployed.state_dict().keys()) == ["conv.weight", "conv.bias"]
    close_to(deployed(x), reference)
    kernel, bias = block.get_equivalent_kernel_bias()  # one plain 3x3 conv
    close_to(ACTIVATIONS[act](F.conv2d(x, kernel, bias, stride=stride, padding=1)), reference)
    block.convert_to_deploy()
    close_to(block(x), reference)


@settings(max_examples=12)
@given(ch=st.integers(1, 7), stride=st.sampled_from([1, 2]), avg_pool=st.booleans(),
       alpha=st.sampled_from([None, 0.0, -0.6, 1.7]), seed=st.integers(0, 10_000))
def test_trace_confirmed_conversion_equals_the_paper_blocks(ch, stride, avg_pool, alpha, seed):
    """Through ``convert(model, input_spec=...)``: every fold confirmed by the traced program, outputs compared."""
    first = random_block(3, ch, stride, None, False, alpha, "swish", seed)
    second = random_block(ch, ch, 1, True, avg_pool, alpha, "relu", seed + 1)
    model = nn.Sequential(first, second)
    model.eval()
    report = convert(model, input_spec=[paddle.static.InputSpec([None, 3, 12, 12], "float32", "x")])
    assert report.confirmed_by_trace and report.verification is not None
    assert report.counts == {"QARepVggBlock": 2} and report.batch_norms_folded == 4
    assert not report.remaining_batch_norms
    assert not [sub for sub in report.model.sublayers() if layers.is_batch_norm(sub)]
    x = paddle.to_tensor(np.random.RandomState(seed).normal(0, 1, [2, 3, 12, 12]).astype("float32"))
    middle = paper_block(x, weights(first), stride, first.identity, False, "swish")
    reference = paper_block(middle, weights(second), 1, True, avg_pool, "relu")
    close_to(report.model(x), reference)


def test_alpha_zero_drops_the_1x1_branch_and_negative_subtracts_it():
    block = random_block(4, 4, identity=False, alpha=0.0, act=None, seed=3)
    x = paddle.randn([1, 4, 6, 6])
    only_3x3 = block.bn(block.conv1(x))
    assert_close(unit(block(x)), unit(only_3x3))
    assert_close(unit(convert(block).model(x)), unit(only_3x3))
    block.alpha.set_value(paddle.to_tensor([-1.5]))
    expected = block.bn(block.conv1(x) - 1.5 * block.conv2(x))
    assert_close(unit(convert(block).model(x)), unit(expected))


def test_tiny_running_variance_of_the_bn_after_the_sum_folds_exactly():
    """The case RepVGG's branch BNs make hard for int8 (large gamma / sqrt(var + eps)): exact in fp32 still."""
    block = random_block(5, 5, alpha=0.8, act="relu", seed=4)
    block.bn._variance.set_value(paddle.full([5], 1e-4))
    x = paddle.randn([2, 5, 7, 7])
    close_to(convert(block).model(x), paper_block(x, weights(block), 1, True, False, "relu"))


def test_identity_defaults_to_where_shapes_allow_and_refuses_otherwise():
    assert QARepVggBlock(4, 4).identity and not QARepVggBlock(4, 6).identity
    assert not QARepVggBlock(4, 4, stride=2).identity and not QARepVggBlock(4, 4, identity=False).identity
    for kwargs in ({"identity": True}, {"avg_pool": True}):
        with pytest.raises(ValueError, match="needs stride 1 and ch_in == ch_out"):
            QARepVggBlock(4, 8, **kwargs)
        with pytest.raises(ValueError, match="needs stride 1 and ch_in == ch_out"):
            QARepVggBlock(4, 4, stride=2, **kwargs)


def test_layout_before_and_after_and_convert_to_deploy_is_idempotent():
    block = random_block(6, 6, alpha=0.7, avg_pool=True, act="swish", seed=11)
    assert sorted(block.state_dict()) == sorted(
        ["alpha", "conv1.conv.weight", "conv1.bn.weight", "conv1.bn.bias", "conv1.bn._mean", "conv1.bn._variance",
         "conv2.weight", "bn.weight", "bn.bias", "bn._mean", "bn._variance"])
    x = paddle.randn([2, 6, 9, 9])
    expected = block(x).numpy()
    block.convert_to_deploy()
    state = {k: v.numpy().copy() for k, v in block.state_dict().items()}
    assert list(state) == ["conv.weight", "conv.bias"] and state["conv.weight"].shape == (6, 6, 3, 3)
    block.convert_to_deploy()
    for key, value in block.state_dict().items():
        np.testing.assert_array_equal(value.numpy(), state[key])
    assert convert(block).converted == []  # converting the deployed block changes nothing
    direct = QARepVggBlock(6, 6, act="swish", alpha=True, avg_pool=True, deploy=True)
    direct.set_state_dict(block.state_dict())
    direct.eval()
    assert_close(unit(direct(x)), unit(expected))


def test_converting_twice_changes_nothing():
    model = nn.Sequential(random_block(3, 5, 2, seed=1), random_block(5, 5, seed=2))
    model.eval()
    once = convert(model).model
    again = convert(once)
    assert again.converted == [] and not again.remaining_batch_norms
    for (k1, v1), (k2, v2) in zip(once.state_dict().items(), again.model.state_dict().items()):
        assert k1 == k2
        np.testing.assert_array_equal(v1.numpy(), v2.numpy())


def test_training_mode_is_refused():
    block = QARepVggBlock(4, 4)
    with pytest.raises(ConversionError, match=r"model\.eval\(\)"):
        convert(block)
    with pytest.raises(ConversionError, match=r"model\.eval\(\)"):
        block.convert_to_deploy()


def test_weight_decay_spares_both_batch_norms_and_decays_the_conv_kernels():
    """The paper's 'normal L2': plain decay on the conv kernels, none on BatchNorm (as ppdet's ConvBNLayer)."""
    block = QARepVggBlock(4, 4, alpha=True)
    regularizers = {name: param.regularizer for name, param in block.named_parameters()}
    for name in ("conv1.bn.weight", "conv1.bn.bias", "bn.weight", "bn.bias"):
        assert regularizers[name] is not None and float(regularizers[name]._coeff) == 0.0, name
    for name in ("conv1.conv.weight", "conv2.weight", "alpha"):
        assert regularizers[name] is None, name  # the optimizer's regularizer applies
    assert block.conv2.bias is None  # a bias before the BatchNorm would be subtracted again


def test_training_form_trains():
    block = QARepVggBlock(3, 3, act="swish", alpha=True, avg_pool=True)
    block.train()
    mean_before = block.bn._mean.numpy().copy()
    loss = block(paddle.randn([4, 3, 8, 8]) + 2.0).square().mean()
    loss.backward()
    for name, param in block.named_parameters():
        if not param.stop_gradient:
            assert param.grad is not None and bool(paddle.isfinite(param.grad).all()), name
    assert not np.allclose(block.bn._mean.numpy(), mean_before)  # batch statistics were used and recorded


def test_traced_training_form_has_no_if_and_the_deployed_one_conv(tmp_path):
    def saved_ops(layer, directory):
        static = paddle.jit.to_static(layer, input_spec=[paddle.static.InputSpec([None, 4, 8, 8], "float32", "x")],
                                      full_graph=True)
        paddle.jit.save(static, str(directory / "model"))
        return count_ops(str(directory))
    block = random_block(4, 4, alpha=0.0, act="relu", seed=2)
    training = saved_ops(block, tmp_path / "training")
    assert training.get("if", 0) == 0
    assert training.get("conv2d", 0) == 2 and training.get("batch_norm", 0) == 2
    deployed = saved_ops(convert(block).model, tmp_path / "deployed")
    assert deployed.get("conv2d", 0) == 1 and deployed.get("batch_norm", 0) == 0 and deployed.get("if", 0) == 0


class Tapping(nn.Layer):
    """Uses the block's 3x3 branch outside the block too: folding the whole block would change that use."""

    def __init__(self):
        super().__init__()
        self.block = random_block(4, 4, alpha=0.5, seed=6)

    def forward(self, x):
        return self.block(x) + self.block.conv1(x)


def test_a_part_used_outside_the_block_keeps_the_block_with_input_spec():
    model = Tapping()
    model.eval()
    report = convert(model, input_spec=[paddle.static.InputSpec([None, 4, 8, 8], "float32", "x")])
    assert report.counts == {"conv+bn": 1}  # the 3x3 pair alone, confirmed: it is used twice, each time whole
    assert list(report.remaining_batch_norms) == ["block.bn"]
    assert "a part also used outside the block" in report.remaining_batch_norms["block.bn"]
    x = paddle.randn([2, 4, 8, 8])
    assert_close(unit(report.model(x)), unit(model(x)))


class OwnForward(QARepVggBlock):
    def forward(self, x):
        return super().forward(x) * 2.0


class OwnBranches(QARepVggBlock):
    def forward_branches(self, x):
        return super().forward_branches(x) * 2.0


@pytest.mark.parametrize("subclass", [OwnForward, OwnBranches])
def test_a_subclass_with_its_own_forward_is_left(subclass):
    block = subclass(4, 4)
    layers.randomize(block, 0)
    block.eval()
    report = convert(block)
    assert report.converted == []
    assert sorted(report.remaining_batch_norms) == ["bn", "conv1.bn"]
    assert all("overrides forward" in why for why in report.remaining_batch_norms.values())


# ---------------------------------------------------------------------------- the switch in a ppdet config
TEST_CONFIG = os.path.join(ROOT, "configs", "ppyoloe", "ppyoloe_plus_crn_s_320_test.yml")
SHAPES_CONFIG = os.path.join(ROOT, "configs", "shapes", "ppyoloe_plus_crn_s_shapes_qarepvgg.yml")
SWITCH = ["ppfuse.rep_block=qarepvgg"]
SIZE = [320, 320]


@pytest.fixture(scope="module")
def qa_config():
    return detection.load_config(TEST_CONFIG, SWITCH)


@pytest.fixture(scope="module")
def qa_built(qa_config):
    return detection.build_model(qa_config, deploy=True, seed=0)


def ppdet_rep_blocks(model):
    from ppdet.modeling.backbones.cspresnet import RepVggBlock as PPDetRepVggBlock
    return [name for name, sub in model.named_sublayers() if isinstance(sub, PPDetRepVggBlock)]


def qa_blocks(model):
    return [name for name, sub in model.named_sublayers() if isinstance(sub, QARepVggBlock)]


def test_switch_puts_qarepvgg_blocks_where_ppdet_has_repvgg_blocks(qa_config):
    plain = detection.build_training_model(detection.load_config(TEST_CONFIG))
    switched = detection.build_training_model(qa_config)
    where = ppdet_rep_blocks(plain)
    assert len(where) == 11 and not qa_blocks(plain)  # PP-YOLOE+ s: 6 in the backbone, 5 in the neck
    assert qa_blocks(switched) == where and not ppdet_rep_blocks(switched)
    assert {w.split(".")[0] for w in where} == {"backbone", "neck"}
    theirs, ours = dict(plain.named_sublayers()), dict(switched.named_sublayers())
    for name in where:  # alpha where ppdet's block has one (PP-YOLOE+: use_alpha in the backbone only)
        assert (ours[name].alpha is None) == (theirs[name].alpha is None), name
        assert (ours[name].ch_in, ours[name].ch_out) == (theirs[name].ch_in, theirs[name].ch_out)
        assert not ours[name].identity and ours[name].avg_pool is None
    assert sum(ours[name].alpha is not None for name in where) == 6
    # every other parameter is named as in the plain model: only the blocks' own names differ
    plain_keys = {k for k in plain.state_dict() if not any(k.startswith(w + ".") for w in where)}
    switched_keys = {k for k in switched.state_dict() if not any(k.startswith(w + ".") for w in where)}
    assert plain_keys == switched_keys


def test_switched_model_converts_with_no_batch_norm_left_and_equal_outputs(qa_built):
    assert qa_built.conversion.counts["QARepVggBlock"] == 11
    assert not qa_built.conversion.remaining_batch_norms and qa_built.conversion.confirmed_by_trace
    assert not [s for s in qa_built.model.sublayers() if layers.is_batch_norm(s)]
    blocks = [s for s in qa_built.model.sublayers() if isinstance(s, QARepVggBlock)]
    assert len(blocks) == 11 and all(block.deployed for block in blocks)
    image, scale = detectors.sample_inputs(SIZE, batch=2, seed=5)
    with paddle.no_grad():
        expected = detectors.DetectorForInference(qa_built.training_model, with_nms=False)(image, scale)
        got = detectors.DetectorForInference(qa_built.model, with_nms=False)(image, scale)
    np.testing.assert_allclose(got[0].numpy(), expected[0].numpy(), atol=1e-2, rtol=1e-4)  # boxes, px
    np.testing.assert_allclose(got[1].numpy(), expected[1].numpy(), atol=1e-4, rtol=1e-4)  # scores
    # and through ppfuse.core.convert without a trace, as a user would call it
    plain = convert(qa_built.training_model)
    assert not plain.remaining_batch_norms and plain.counts["QARepVggBlock"] == 11


def test_training_checkpoint_of_the_switched_model_loads_back(qa_config, qa_built, tmp_path):
    path = str(tmp_path / "qa.pdparams")
    checkpoint.save_state(qa_built.training_model, path)
    loaded = detection.build_model(qa_config, weights=path, deploy=False)
    assert loaded.weights_form == "train" and len(qa_blocks(loaded.model)) == 11
    image, scale = detectors.sample_inputs(SIZE, batch=1, seed=2)
    with paddle.no_grad():
        expected = detectors.DetectorForInference(qa_built.training_model, with_nms=False)(image, scale)
        got = detectors.DetectorForInference(loaded.model, with_nms=False)(image, scale)
    for a, b in zip(got, expected):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    with pytest.raises(CheckpointError, match="does not fit"):  # nor into the plain config: the keys name the blocks
        detection.build_model(detection.load_config(TEST_CONFIG), weights=path, deploy=False)


def test_export_deploy_tool_exports_the_switched_model(tmp_path):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "export_deploy.py"), "-c", TEST_CONFIG,
                           "-o", *SWITCH, "--output_dir", str(tmp_path)], capture_output=True, text=True,
                          cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    directory = tmp_path / "ppyoloe_plus_crn_s_320_test"
    report = json.loads((directory / "ppfuse_report.json").read_text())
    assert report["conversion"]["counts"]["QARepVggBlock"] == 11
    assert report["op_counts"]["batch_norm"] == 0 and report["op_counts"]["conv2d"] == 86
    deployed = detection.build_model(detection.load_config(TEST_CONFIG, SWITCH),
                                     weights=str(directory / "model_deploy.pdparams"), deploy=True)
    assert deployed.weights_form == "deploy"
    assert count_ops(str(directory)).get("batch_norm", 0) == 0


def test_shapes_config_differs_from_the_plain_one_only_in_the_blocks():
    plain = detection.load_config(os.path.join(ROOT, "configs", "shapes", "ppyoloe_plus_crn_s_shapes.yml"))
    qa = detection.load_config(SHAPES_CONFIG)
    assert detection.rep_block_switch(qa) == detection.RepBlockSwitch("qarepvgg")
    assert detection.rep_block_switch(plain) == detection.RepBlockSwitch()
    def held(value):  # datasets and schedulers are objects: compare what they hold
        if isinstance(value, dict):
            return {k: held(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [held(v) for v in value]
        return held(vars(value)) if hasattr(value, "__dict__") else value
    differing = {k for k in set(plain.values) | set(qa.values)
                 if held(plain.values.get(k)) != held(qa.values.get(k))}
    assert differing == {"ppfuse", "save_dir", "filename"}  # filename: ppdet's name of the config file


@pytest.mark.parametrize("override, message", [
    ("ppfuse=qarepvgg", "it is a mapping"),
    ("ppfuse.rep_block=qarep", "use one of repvgg, qarepvgg"),
    ("ppfuse.block=qarepvgg", "ppfuse.block is not a ppfuse key"),
    ("ppfuse.identity=true", "needs ppfuse.rep_block: qarepvgg"),
])
def test_switch_errors_name_the_key(override, message):
    config = detection.load_config(TEST_CONFIG, [override])
    with pytest.raises(ConfigError, match=message):
        detection.rep_block_switch(config)


def test_switch_on_a_model_without_repvgg_blocks_is_an_error():
    with pytest.raises(ConfigError, match="has none in training form"):
        detection.swap_rep_blocks(nn.Sequential(nn.Conv2D(3, 3, 3)), detection.RepBlockSwitch("qarepvgg"))


def test_ppdet_trainer_trains_the_switched_model(tmp_path, monkeypatch):
    """One iteration of ppdet's Trainer (through ppfuse.measure.evaluation.train) on the shapes config with the switch:
    the checkpoint it writes has QARepVggBlock's parameters and loads into the switched model."""
    from ppfuse.measure import evaluation
    monkeypatch.chdir(tmp_path)  # the config's dataset paths are relative, as in PaddleDetection
    config = detection.load_config(SHAPES_CONFIG)
    evaluation.ensure_shapes_dataset(config, train_images=8, val_images=1, log=lambda *_: None)
    lines = []
    trained = evaluation.train(config, str(tmp_path / "out"), epochs=1, log=lines.append)
    assert trained.epochs == 1 and lines and "mean loss" in lines[-1]
    state = checkpoint.safe_load(trained.weights)
    assert np.abs(state["backbone.stages.0.blocks.0.conv2.bn._mean"]).max() > 0  # the BN after the sum, trained
    assert "backbone.stages.0.blocks.0.conv2.conv2.conv.weight" not in state  # ppdet's 1x1 conv+BN is gone
    built = detection.build_model(config, weights=trained.weights, deploy=True)
    assert built.weights_form == "train" and not built.conversion.remaining_batch_norms
