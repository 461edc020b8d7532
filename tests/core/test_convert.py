"""The model-wide converter: refusal, idempotence, untouched original, registration, report."""
import numpy as np
import paddle
import paddle.nn as nn
import paddle.nn.functional as F
import pytest

from adversarial_models import ConvertsItself
from conftest import assert_close, scale_to_unit
from ppfuse import ConvBN, ConversionError, RepVggBlock, Rewrite, convert, register_conv_bn, register_converter
from ppfuse.core import layers


def small_net(seed=0):
    paddle.seed(seed)
    net = nn.Sequential(
        ConvBN(3, 8, 3, padding=1, act="relu"),
        RepVggBlock(8, 8, act="relu", alpha=True, identity=True),
        nn.Sequential(nn.Conv2D(8, 6, 3, padding=1, bias_attr=False), nn.BatchNorm2D(6), nn.ReLU()),
        RepVggBlock(6, 10, act="swish", stride=2),
    )
    layers.randomize(net, seed)
    net.eval()
    return net


def state_of(model):
    return {k: v.numpy().copy() for k, v in model.state_dict().items()}


def test_whole_net_converted_and_equal():
    net = small_net()
    x = paddle.randn([2, 3, 12, 12])
    expected = net(x)
    report = convert(net)
    assert report.counts == {"conv+bn": 2, "RepVggBlock": 2}
    assert report.batch_norms_folded == 2 + 3 + 2 and not report.remaining_batch_norms
    assert not [s for s in report.model.sublayers() if layers.is_batch_norm(s)]
    assert_close(scale_to_unit(report.model(x)), scale_to_unit(expected))


def test_training_mode_is_refused_with_a_message_naming_the_layer():
    net = small_net()
    net[1].conv2.bn.train()
    before = state_of(net)
    with pytest.raises(ConversionError, match=r"1\.conv2\.bn .*training mode.*model\.eval\(\)"):
        convert(net, inplace=True)
    assert net[1].conv1 is not None and not net[1].deployed
    for key, value in net.state_dict().items():
        np.testing.assert_array_equal(value.numpy(), before[key])


def test_inplace_false_leaves_the_original_untouched():
    net = small_net()
    x = paddle.randn([1, 3, 8, 8])
    before_state, before_out = state_of(net), net(x).numpy()
    report = convert(net)
    assert report.model is not net
    assert not net[1].deployed and isinstance(net[2][1], nn.BatchNorm2D)
    assert state_of(net).keys() == before_state.keys()
    for key, value in state_of(net).items():
        np.testing.assert_array_equal(value, before_state[key])
    np.testing.assert_array_equal(net(x).numpy(), before_out)


def test_converting_twice_changes_nothing():
    net = small_net()
    once = convert(net).model
    state = state_of(once)
    report = convert(once, inplace=True)
    assert report.converted == [] and report.model is once
    assert state_of(once).keys() == state.keys()
    for key, value in state_of(once).items():
        np.testing.assert_array_equal(value, state[key])


def test_broken_statistics_fail_before_anything_changes():
    net = small_net()
    var = net[3].conv2.bn._variance.numpy()
    var[0] = np.nan
    net[3].conv2.bn._variance.set_value(var)
    with pytest.raises(ConversionError, match=r"3\.conv2\.bn.*running_var contains NaN"):
        convert(net, inplace=True)
    assert not net[1].deployed, "an earlier block was converted before the failure"
    net = small_net()
    net[0].bn._variance.set_value(np.full([8], -1.0, "float32"))
    with pytest.raises(ConversionError, match=r"running_var \+ epsilon <= 0"):
        convert(net)


class TwoBranch(nn.Layer):
    """A user block: 3x3 conv+BN plus 1x3 conv+BN, added; a user converter registers it."""

    def __init__(self):
        super().__init__()
        self.square = ConvBN(4, 4, 3, padding=1)
        self.row = nn.Sequential()
        self.row.conv = nn.Conv2D(4, 4, (1, 3), padding=(0, 1), bias_attr=False)
        self.row.bn = nn.BatchNorm2D(4)

    def forward(self, x):
        return self.square(x) + self.row.bn(self.row.conv(x))


def convert_two_branch(layer, site):
    from ppfuse.core import kernels
    square = layers.fold_conv_bn(layer.square.conv, layer.square.bn, site.where + ".square")
    row = layers.fold_conv_bn(layer.row.conv, layer.row.bn, site.where + ".row")
    kernel, bias = kernels.merge_parallel([square, (kernels.pad_kernel(row[0], 3), row[1])])
    conv = layers.make_conv(kernel, bias, padding=1)
    return [Rewrite(site.where, "TwoBranch", lambda: site.replace(conv), [layer.square.bn, layer.row.bn])]


def test_user_registered_block_type():
    register_converter(TwoBranch, convert_two_branch, replace=True)
    paddle.seed(3)
    net = nn.Sequential(TwoBranch(), nn.ReLU(), TwoBranch())
    layers.randomize(net, 3)
    net.eval()
    x = paddle.randn([2, 4, 7, 7])
    report = convert(net)
    assert report.counts == {"TwoBranch": 2}
    assert isinstance(report.model[0], nn.Conv2D) and not report.remaining_batch_norms
    assert_close(scale_to_unit(report.model(x)), scale_to_unit(net(x)))


def test_duplicate_registration_is_an_error():
    with pytest.raises(ConversionError, match="already has converter.*replace=True"):
        register_converter(RepVggBlock, lambda layer, site: None)


class ConvThenBNByName(nn.Layer):
    """bn1 follows conv1 in forward, but nothing in the structure says so."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2D(3, 5, 3, bias_attr=False)
        self.bn1 = nn.BatchNorm2D(5)

    def forward(self, x):
        return self.bn1(self.conv1(x))


def test_unpaired_bn_is_reported_with_reason_and_strict_refuses():
    net = ConvThenBNByName()
    layers.randomize(net, 0)
    net.eval()
    report = convert(net)
    assert list(report.remaining_batch_norms) == ["bn1"]
    assert "register its parent with ppfuse.register_conv_bn" in report.remaining_batch_norms["bn1"]
    with pytest.raises(ConversionError, match="1 BatchNorm would stay unfolded.*bn1"):
        convert(net, strict=True)


def test_register_conv_bn_declares_the_pair():
    register_conv_bn(ConvThenBNByName, "conv1", "bn1", replace=True)
    try:
        net = ConvThenBNByName()
        layers.randomize(net, 1)
        net.eval()
        x = paddle.randn([2, 3, 6, 6])
        report = convert(net)
        assert report.counts == {"conv+bn": 1} and not report.remaining_batch_norms
        assert_close(scale_to_unit(report.model(x)), scale_to_unit(net(x)))
    finally:
        from ppfuse import DEFAULT_REGISTRY
        DEFAULT_REGISTRY.unregister(ConvThenBNByName)


def test_layers_with_convert_to_deploy_are_converted_on_a_copy():
    net = nn.Sequential(ConvertsItself(2), nn.ReLU())
    layers.randomize(net, 2)
    net.eval()
    x = paddle.randn([1, 2, 4, 4])
    report = convert(net)
    assert report.counts == {"ConvertsItself.convert_to_deploy": 1} and report.batch_norms_folded == 1
    assert isinstance(net[0].bn, nn.BatchNorm2D) and isinstance(report.model[0].bn, nn.Identity)
    assert_close(scale_to_unit(report.model(x)), scale_to_unit(net(x)))


class Gate(nn.Layer):
    """A conv -> BN whose converter (registered in the test's own registry) waits for the other thread."""

    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2D(c, c, 3, padding=1)
        self.bn = nn.BatchNorm2D(c)

    def forward(self, x):
        return self.bn(self.conv(x))


class SharedPair(nn.Layer):
    """The same conv and BN at two places: without a trace the fold must be refused ("held elsewhere")."""

    def __init__(self, c):
        super().__init__()
        self.first = ConvBN(c, c, 3, padding=1)
        self.second = ConvBN(c, c, 3, padding=1)
        self.second.conv, self.second.bn = self.first.conv, self.first.bn

    def forward(self, x):
        return self.second(F.relu(self.first(x)))


def test_two_conversions_at_once_in_threads_are_each_as_alone():
    """Reentrancy: each conversion keeps its own place index and registry; both plans are in progress at once
    (a barrier in a converter holds each until the other arrives), and each report and output equals that of
    the same conversion run alone."""
    import threading
    from ppfuse import DEFAULT_REGISTRY
    barrier = threading.Barrier(2, timeout=60)
    registry = DEFAULT_REGISTRY.copy("test registry")
    registry.register_conv_bn(Gate, "conv", "bn")
    plain = registry.lookup(Gate(1)).converter
    registry.register_converter(Gate, lambda layer, site: (barrier.wait(), plain(layer, site))[1], replace=True)
    models = []
    for seed, c in ((0, 3), (1, 5)):
        net = nn.Sequential(Gate(c), nn.ReLU(), SharedPair(c), ConvBN(c, c, 1))
        layers.randomize(net, seed)
        net.eval()
        models.append((net, paddle.randn([2, c, 8, 8])))
    results = [None, None]

    def run(i):
        try:
            results[i] = convert(models[i][0], registry=registry)
        except Exception as exc:  # reported below
            results[i] = exc
    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    barrier = threading.Barrier(1)  # alone now: the converter passes straight through
    for (net, x), report in zip(models, results):
        assert not isinstance(report, Exception), report
        alone = convert(net, registry=registry)
        assert report.counts == alone.counts == {"conv+bn": 2}
        assert report.remaining_batch_norms == alone.remaining_batch_norms
        assert list(report.remaining_batch_norms) == ["2.first.bn"]
        assert "held elsewhere" in report.remaining_batch_norms["2.first.bn"]
        assert_close(scale_to_unit(report.model(x)), scale_to_unit(net(x)))
