"""OpenVINO reads the ONNX files it had no rule for (TTFNet's and CenterNet's DeformConv) or could not convert
(DETR's ArgMax after paddle2onnx's float64 tile count), and computes what Paddle and ONNX Runtime compute:

- ``DeformConv`` through ppfuse's front-end extension (``ppfuse.runtime.openvino_extensions``): Paddle's
  ``deform_conv2d`` (groups and deformable groups > 1, strides, dilations, paddings, offsets that sample outside
  the image) saved, converted by ``onnx_support.to_onnx`` and run in OpenVINO fp32, against ONNX Runtime and
  Paddle's dygraph output within fp32 rounding (1e-5 of the output's scale); random DeformConv nodes, with and
  without bias and mask (hypothesis), against ONNX Runtime; what the mapping does not handle refused in one line
  (without a mask paddle2onnx 2.1 cannot convert ``deform_conv2d``: ``to_onnx`` refuses it in one line);
- paddle2onnx's ``deformable_groups`` put back as ``offset_group`` (ONNX Runtime refuses the node without it);
- ``ArgMax`` after a ``tile`` whose repeats are tensors: OpenVINO fails on paddle2onnx's file
  (``Normalized axis of TopK is unknown``: the rank is unknown), reads ``to_onnx``'s (the float64 maximum of
  integers computed in int64: ``onnx_support.integer_max_in_int64``), and gives the same indices.

Paddle's programs are saved in a child process, as in tests/test_onnx_forms.py.
"""
import os

import numpy as np
import pytest

pytest.importorskip("openvino")
pytest.importorskip("onnxruntime")
pytest.importorskip("paddle2onnx")
onnx = pytest.importorskip("onnx")

from hypothesis import given, settings, strategies as st  # noqa: E402
from onnx import TensorProto, helper  # noqa: E402

from ppfuse.errors import ExportError  # noqa: E402
from ppfuse.runtime.openvino_runtime import Unreadable, conversion_failure, read_file  # noqa: E402

ATOL = 1e-5  # OpenVINO fp32 against ONNX Runtime and Paddle, relative to the output's largest magnitude

# Paddle deform_conv2d configurations: (name, layer keyword arguments, input channels, height, width)
DEFORM_CASES = [
    ("mask_groups2_dg3_stride2_dilation2", dict(cout=12, kernel=(3, 3), stride=2, padding=1, dilation=2, groups=2,
                                                deformable_groups=3, mask=True, bias=True, scale=3.0), 6, 11, 13),
    ("dg2_no_padding_no_bias", dict(cout=4, kernel=(3, 3), stride=1, padding=0, dilation=1, groups=1,
                                    deformable_groups=2, mask=True, bias=False, scale=4.0), 4, 9, 8),
    ("mask_like_ttfnet", dict(cout=8, kernel=(3, 3), stride=1, padding=1, dilation=1, groups=1,
                              deformable_groups=1, mask=True, bias=True, scale=2.0), 5, 10, 10),
    ("2x3_kernel_asymmetric", dict(cout=6, kernel=(2, 3), stride=(2, 1), padding=(1, 0), dilation=(1, 2),
                                   groups=2, deformable_groups=2, mask=True, bias=True, scale=3.0), 4, 9, 11),
]
# without a mask paddle2onnx 2.1 cannot convert deform_conv2d (to_onnx refuses it, below); OpenVINO's mapping
# without a mask is checked on ONNX DeformConv nodes against ONNX Runtime
NO_MASK = dict(cout=4, kernel=(3, 3), stride=1, padding=1, dilation=1, groups=1, deformable_groups=1, mask=False,
               bias=True, scale=2.0)


def _deform_layer(paddle, cin, cout, kernel, stride, padding, dilation, groups, deformable_groups, mask, bias,
                  scale):
    """``deform_conv2d`` with offsets (and a sigmoid mask) computed from its input by plain convs, offsets
    multiplied by ``scale`` so that many sampling points leave the image."""
    from paddle.vision.ops import deform_conv2d

    class Deform(paddle.nn.Layer):
        def __init__(self):
            super().__init__()
            points = deformable_groups * kernel[0] * kernel[1]
            geometry = dict(stride=stride, padding=padding, dilation=dilation)
            self.offset = paddle.nn.Conv2D(cin, 2 * points, kernel, **geometry)
            self.mask = paddle.nn.Conv2D(cin, points, kernel, **geometry) if mask else None
            self.weight = self.create_parameter([cout, cin // groups, *kernel])
            self.bias = self.create_parameter([cout], is_bias=True) if bias else None
            if bias:
                self.bias.set_value(paddle.uniform([cout], min=-1.0, max=1.0))

        def forward(self, x):
            offset = self.offset(x) * scale
            modulation = paddle.nn.functional.sigmoid(self.mask(x)) if self.mask is not None else None
            y = deform_conv2d(x, offset, self.weight, self.bias, stride=stride, padding=padding, dilation=dilation,
                              deformable_groups=deformable_groups, groups=groups, mask=modulation)
            return y, offset

    return Deform()


def _tiled_queries(paddle):
    """DETR's pattern: learned queries tiled to the batch (repeats ``[N, 1, 1]``, ``N`` a tensor), class scores
    without the last class, their argmax."""
    import paddle.nn.functional as F

    class Tiled(paddle.nn.Layer):
        def __init__(self):
            super().__init__()
            self.queries = paddle.nn.Embedding(10, 8)
            self.classes = paddle.nn.Linear(8, 6)

        def forward(self, x):
            queries = self.queries.weight.unsqueeze(0).tile([x.shape[0], 1, 1])
            scores = F.softmax(self.classes(queries + x.unsqueeze(1)), -1)[:, :, :-1]
            return scores.argmax(-1), scores.max(-1)

    return Tiled()


def _save_programs(root):
    """Runs in a child process (``paddle.jit.save`` of small layers has crashed pytest sessions): saves each
    program of this module under ``root``, with its input ``x.npy`` and its dygraph outputs ``want*.npy``."""
    import paddle as child_paddle
    from ppfuse.export_format import MODEL_FILE

    def save(name, layer, x, batch_dim):
        directory = os.path.join(root, name)
        os.makedirs(directory)
        layer.eval()
        np.save(os.path.join(directory, "x.npy"), x)
        for i, out in enumerate(layer(child_paddle.to_tensor(x))):
            np.save(os.path.join(directory, f"want{i}.npy"), out.numpy())
        shape = [None] + list(x.shape[1:]) if batch_dim else list(x.shape)
        child_paddle.jit.save(child_paddle.jit.to_static(layer, full_graph=True), os.path.join(directory, MODEL_FILE),
                              input_spec=[child_paddle.static.InputSpec(shape, "float32", "x")])

    for seed, (name, kwargs, cin, height, width) in enumerate(DEFORM_CASES):
        child_paddle.seed(seed)
        x = np.random.RandomState(seed).randn(2, cin, height, width).astype("float32")
        save(name, _deform_layer(child_paddle, cin, **kwargs), x, batch_dim=True)

    class TwoGroupings(child_paddle.nn.Layer):  # deformable convs with different deformable_groups
        def __init__(self):
            super().__init__()
            common = dict(cout=4, kernel=(3, 3), stride=1, padding=1, dilation=1, groups=1, mask=True, bias=False,
                          scale=1.0)
            self.one = _deform_layer(child_paddle, 4, deformable_groups=1, **common)
            self.two = _deform_layer(child_paddle, 4, deformable_groups=2, **common)

        def forward(self, x):
            return self.one(x)[0] + self.two(x)[0], x

    child_paddle.seed(0)
    save("no_mask", _deform_layer(child_paddle, 4, **NO_MASK), np.random.RandomState(0).randn(1, 4, 6, 6).astype(
        "float32"), False)
    child_paddle.seed(0)
    save("two_groupings", TwoGroupings(), np.random.RandomState(0).randn(1, 4, 6, 6).astype("float32"), False)
    child_paddle.seed(0)
    save("tiled_argmax", _tiled_queries(child_paddle), np.random.RandomState(0).randn(3, 8).astype("float32"), True)


@pytest.fixture(scope="module")
def programs(tmp_path_factory):
    import multiprocessing
    root = str(tmp_path_factory.mktemp("programs"))
    child = multiprocessing.get_context("spawn").Process(target=_save_programs, args=(root,))
    child.start()
    child.join(600)
    assert child.exitcode == 0, f"saving the programs failed in the child process (exit code {child.exitcode})"
    return root


def _openvino(path, feeds):
    import openvino as ov
    core = ov.Core()
    compiled = core.compile_model(read_file(ov, core, path), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    results = compiled(feeds)
    return [np.asarray(results[output]) for output in compiled.outputs]


def _onnx_runtime(path, feeds):
    import onnxruntime
    return onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"]).run(None, feeds)


def _relative(got, want):
    scale = float(np.abs(want).max())
    return got / scale, want / scale


def _outside(offset, height, width, kernel, stride, padding, dilation):
    """Fraction of ``deform_conv2d``'s sampling points that fall outside the image (``y <= -1`` or ``y >= H``,
    same in x: bilinear weights all on zeros)."""
    n, channels, out_h, out_w = offset.shape
    kh, kw = kernel
    pairs = offset.reshape(n, channels // (2 * kh * kw), kh, kw, 2, out_h, out_w)
    base_y = np.arange(kh)[:, None] * dilation[0] + np.arange(out_h)[None, :] * stride[0] - padding[0]  # [kh, oh]
    base_x = np.arange(kw)[:, None] * dilation[1] + np.arange(out_w)[None, :] * stride[1] - padding[1]  # [kw, ow]
    y = pairs[:, :, :, :, 0] + base_y[None, None, :, None, :, None]
    x = pairs[:, :, :, :, 1] + base_x[None, None, None, :, None, :]
    return float(((y <= -1) | (y >= height) | (x <= -1) | (x >= width)).mean())


def _pair(value):
    return tuple(value) if isinstance(value, tuple) else (value, value)


@pytest.mark.parametrize("case", DEFORM_CASES, ids=[c[0] for c in DEFORM_CASES])
def test_paddle_deform_conv_in_openvino_gives_onnx_runtime_and_paddle_outputs(programs, tmp_path, case):
    from ppfuse.deploy import onnx_support
    name, kwargs, _, height, width = case
    directory = os.path.join(programs, name)
    path = onnx_support.to_onnx(directory, str(tmp_path / "model.onnx"))
    nodes = [n for n in onnx.load(path).graph.node if n.op_type == "DeformConv"]
    assert len(nodes) == 1
    groups = {a.name: a.i for a in nodes[0].attribute if a.name == "offset_group"}
    assert groups.get("offset_group", 1) == kwargs["deformable_groups"]
    feeds = {"x": np.load(os.path.join(directory, "x.npy"))}
    want, offset = (np.load(os.path.join(directory, f"want{i}.npy")) for i in (0, 1))
    outside = _outside(offset, height, width, kwargs["kernel"], _pair(kwargs["stride"]), _pair(kwargs["padding"]),
                       _pair(kwargs["dilation"]))
    assert outside > 0.05, f"only {outside:.1%} of the sampling points leave the image"
    got = _openvino(path, feeds)
    reference = _onnx_runtime(path, feeds)
    assert got[0].shape == want.shape == reference[0].shape
    np.testing.assert_allclose(*_relative(got[0], reference[0]), atol=ATOL, rtol=0, err_msg="OpenVINO vs ONNX Runtime")
    np.testing.assert_allclose(*_relative(got[0], want), atol=ATOL, rtol=0, err_msg="OpenVINO vs Paddle")


def test_a_deformable_conv_without_a_mask_is_refused_in_one_line(programs, tmp_path):
    from ppfuse.deploy import onnx_support
    with pytest.raises(ExportError, match=r"1 deformable_conv op\(s\) without a mask, which paddle2onnx 2.1 cannot "
                                          r"convert .*give deform_conv2d a mask of ones"):
        onnx_support.to_onnx(os.path.join(programs, "no_mask"), str(tmp_path / "model.onnx"))


def test_deformable_convs_with_different_groups_are_refused(programs, tmp_path):
    from ppfuse.deploy import onnx_support
    with pytest.raises(ExportError, match=r"deformable convs have different ones \(\[1, 2\]\)"):
        onnx_support.to_onnx(os.path.join(programs, "two_groupings"), str(tmp_path / "model.onnx"))


# --- random DeformConv nodes against ONNX Runtime ----------------------------------------------------------------


def _deform_conv_model(path, batch, cin, cout, kernel, strides, pads, dilations, group, offset_group, bias, mask):
    """An ONNX model of one DeformConv whose inputs are all graph inputs; returns their shapes."""
    height, width = 7, 8
    out_h = (height + pads[0] + pads[2] - dilations[0] * (kernel[0] - 1) - 1) // strides[0] + 1
    out_w = (width + pads[1] + pads[3] - dilations[1] * (kernel[1] - 1) - 1) // strides[1] + 1
    points = offset_group * kernel[0] * kernel[1]
    shapes = {"x": [batch, cin, height, width], "w": [cout, cin // group, *kernel],
              "offset": [batch, 2 * points, out_h, out_w], "b": [cout], "mask": [batch, points, out_h, out_w]}
    names = ["x", "w", "offset"] + (["b"] if bias else [""] if mask else []) + (["mask"] if mask else [])
    node = helper.make_node("DeformConv", names, ["y"], strides=strides, pads=pads, dilations=dilations,
                            group=group, offset_group=offset_group, kernel_shape=kernel)
    graph = helper.make_graph([node], "deform_conv",
                              [helper.make_tensor_value_info(n, TensorProto.FLOAT, shapes[n]) for n in names if n],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)]), path)
    return {n: shapes[n] for n in names if n}


@settings(max_examples=30)
@given(batch=st.integers(1, 2), group=st.sampled_from([1, 2]), offset_group=st.sampled_from([1, 2, 3]),
       channels=st.integers(1, 2), outputs=st.integers(1, 3), kernel=st.tuples(st.integers(1, 3), st.integers(1, 3)),
       strides=st.tuples(st.integers(1, 2), st.integers(1, 2)),
       dilations=st.tuples(st.integers(1, 2), st.integers(1, 2)),
       pads=st.tuples(*[st.integers(0, 2)] * 4), bias=st.booleans(), mask=st.booleans(),
       offsets=st.sampled_from(["float", "integer", "half"]), seed=st.integers(0, 2 ** 16))
def test_random_deform_conv_nodes_in_openvino_give_onnx_runtime_outputs(tmp_path_factory, batch, group, offset_group,
                                                                        channels, outputs, kernel, strides, dilations,
                                                                        pads, bias, mask, offsets, seed):
    """Offsets of three kinds: real, integers (samples exactly on pixels, also exactly on -1 and H), halves."""
    path = str(tmp_path_factory.mktemp("deform") / "model.onnx")
    shapes = _deform_conv_model(path, batch, group * offset_group * channels, group * outputs, list(kernel),
                                list(strides), list(pads), list(dilations), group, offset_group, bias, mask)
    rng = np.random.RandomState(seed)
    feeds = {n: rng.randn(*shape).astype("float32") for n, shape in shapes.items()}
    feeds["offset"] = {"float": 3 * feeds["offset"], "integer": np.round(3 * feeds["offset"]),
                       "half": np.round(6 * feeds["offset"]) / 2}[offsets].astype("float32")
    if mask:
        feeds["mask"] = rng.uniform(0, 1, shapes["mask"]).astype("float32")
    want = _onnx_runtime(path, feeds)[0]
    got = _openvino(path, feeds)[0]
    assert got.shape == want.shape
    np.testing.assert_allclose(*_relative(got, want), atol=ATOL, rtol=0)


def _single_node(path, inputs, **attributes):
    node = helper.make_node("DeformConv", [name for name, _ in inputs], ["y"], **attributes)
    graph = helper.make_graph([node], "deform_conv",
                              [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in inputs],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)]), path)
    return path


@pytest.mark.parametrize("inputs, attributes, message", [
    ([("x", [1, 2, 4, 5, 6]), ("w", [2, 2, 1, 1, 1]), ("offset", [1, 3, 4, 5, 6])], {},
     r"DeformConv of 3-D input .*: OpenVINO's DeformableConvolution is 2-D only; run it in ONNX Runtime"),
    ([("x", [1, 4, 6, 6]), ("w", [2, 4, 3, 3]), ("offset", [1, 36, 4, 4])], {},
     r"DeformConv offset_group 1: its offset has 36 channels, not offset_group x kH x kW x 2 = 18 \(paddle2onnx"),
    ([("x", [1, 4, 6, 6]), ("w", [2, 4, 3, 3]), ("offset", [1, 18, 4, 4])], {"kernel_shape": [2, 2]},
     r"DeformConv kernel_shape \[2, 2\] but W is \[2, 4, 3, 3\]"),
], ids=["3d", "offset_channels", "kernel_shape"])
def test_what_the_deform_conv_mapping_does_not_handle_is_one_line(tmp_path, inputs, attributes, message):
    import openvino as ov
    path = _single_node(str(tmp_path / "model.onnx"), inputs, **attributes)
    with pytest.raises(Unreadable, match=message) as raised:
        read_file(ov, ov.Core(), path)
    assert "\n" not in str(raised.value) and str(raised.value).startswith(path)


# --- ArgMax after paddle2onnx's tile ---------------------------------------------------------------------------


def test_argmax_after_a_tile_to_the_batch_reads_and_gives_the_same_indices(programs, tmp_path):
    import openvino as ov
    from ppfuse.deploy import onnx_support
    directory = os.path.join(programs, "tiled_argmax")
    raw = str(tmp_path / "raw.onnx")  # paddle2onnx's file as it writes it
    onnx_support._paddle2onnx(os.path.join(directory, "model.json"), os.path.join(directory, "model.pdiparams"),
                              raw, onnx_support.DEFAULT_OPSET)
    argmax = [n for n in onnx.load(raw).graph.node if n.op_type == "ArgMax"]
    assert [(a.name, a.i) for a in argmax[0].attribute] == [("axis", -1), ("keepdims", 0)]  # DETR's attributes
    with pytest.raises(Exception, match=r"Normalized axis of TopK is unknown") as raised:  # what this fixes
        read_file(ov, ov.Core(), raw)
    assert conversion_failure(raised.value) == (
        "conversion failed for operations: ArgMax-13 (its input's rank is unknown to OpenVINO: export the model "
        "again with --onnx, which computes paddle2onnx's tile repeats in int64)")
    path = onnx_support.to_onnx(directory, str(tmp_path / "model.onnx"))
    assert onnx_support.integer_max_in_int64(onnx.load(path)) == 0  # done by to_onnx
    feeds = {"x": np.load(os.path.join(directory, "x.npy"))}
    indices, scores = (np.load(os.path.join(directory, f"want{i}.npy")) for i in (0, 1))
    assert indices.shape == (3, 10)
    got, reference = _openvino(path, feeds), _onnx_runtime(path, feeds)
    np.testing.assert_array_equal(got[0], indices)
    np.testing.assert_array_equal(reference[0], indices)
    np.testing.assert_allclose(got[1], scores, atol=ATOL, rtol=0)  # softmax scores: at most 1


def _max_model(path, input_type, constant, to_double_users=1):
    """``Cast(n, to=DOUBLE) -> Max(., constant) -> Cast(to=INT64)`` (paddle2onnx's tile count) on input ``n``."""
    nodes = [helper.make_node("Cast", ["n"], ["n_double"], to=TensorProto.DOUBLE),
             helper.make_node("Constant", [], ["c"], value=onnx.numpy_helper.from_array(np.array(constant), "c")),
             helper.make_node("Max", ["n_double", "c"], ["m"]),
             helper.make_node("Cast", ["m"], ["y"], to=TensorProto.INT64)]
    outputs = [helper.make_tensor_value_info("y", TensorProto.INT64, [5])]
    if to_double_users > 1:
        nodes.append(helper.make_node("Neg", ["n_double"], ["other"]))
        outputs.append(helper.make_tensor_value_info("other", TensorProto.DOUBLE, [5]))
    graph = helper.make_graph(nodes, "max", [helper.make_tensor_value_info("n", input_type, [5])], outputs)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    onnx.save(model, path)
    return model


@pytest.mark.parametrize("input_type, dtype", [(TensorProto.INT64, "int64"), (TensorProto.INT32, "int32")],
                         ids=["int64", "int32"])
def test_integer_max_in_int64_computes_the_same_maximum(tmp_path, input_type, dtype):
    from ppfuse.deploy import onnx_support
    before = str(tmp_path / "before.onnx")
    model = _max_model(before, input_type, [-2.0, 0.0, 3.0, 2.0 ** 20, -7.0])
    assert onnx_support.integer_max_in_int64(model) == 1
    after = str(tmp_path / "after.onnx")
    onnx.checker.check_model(model)
    onnx.save(model, after)
    assert not [n for n in model.graph.node if n.op_type == "Cast" and n.attribute[0].i == TensorProto.DOUBLE]
    n = {"int64": np.array([-5, 0, 7, 2 ** 41, -2 ** 52], "int64"),
         "int32": np.array([-5, 0, 7, 2 ** 30, -2 ** 31], "int32")}[dtype]
    np.testing.assert_array_equal(_onnx_runtime(after, {"n": n})[0], _onnx_runtime(before, {"n": n})[0])
    # OpenVINO's CPU plugin computes int64 in int32 (2**41 saturates): values of a shape's size
    small = np.array([-5, 0, 7, 300, -2 ** 21], dtype)
    np.testing.assert_array_equal(_openvino(after, {"n": small})[0], np.maximum(small, [-2, 0, 3, 2 ** 20, -7]))


@pytest.mark.parametrize("input_type, constant, users", [
    (TensorProto.FLOAT, [0.0] * 5, 1),  # not an integer input: the maximum of floats is not an integer's
    (TensorProto.INT64, [0.5] * 5, 1),  # a constant that is not an integer
    (TensorProto.INT64, [2.0 ** 60] * 5, 1),  # not exact in float64
    (TensorProto.INT64, [0.0] * 5, 2),  # the float64 value is read elsewhere too
], ids=["float_input", "fraction", "beyond_2_53", "shared_cast"])
def test_integer_max_in_int64_leaves_what_it_cannot_prove(tmp_path, input_type, constant, users):
    from ppfuse.deploy import onnx_support
    model = _max_model(str(tmp_path / "m.onnx"), input_type, constant, users)
    before = model.SerializeToString()
    assert onnx_support.integer_max_in_int64(model) == 0
    assert model.SerializeToString() == before
