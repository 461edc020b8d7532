"""The ONNX forms and repairs that make RetinaNet, YOLOF, TTFNet, FCOS and GFL convert, each against what it
stands for, on generated inputs:

- ``group_norm`` (FCOS's and GFL's heads): paddle2onnx 2.1.0 loses its epsilon (a float64 attribute in Paddle 3's
  programs), ``onnx_support.to_onnx`` puts it back: ONNX Runtime against Paddle within fp32 rounding (1e-5 of
  the output's scale; without the repair the error is of the order of the output itself);
- RetinaNet's and YOLOF's ``decode`` for the whole batch (``postprocess._retina_decode``, ``_yolof_decode``)
  against ppdet's per-image loop in dygraph: the same kernels on the same values, so to fp32 rounding (1e-5);
  TTFNet's post-processing for one image against ppdet's loop;
- ``order_tied_rows``: rows of near-tied best scores in another order are compared in the reference's order,
  rows that are not tied are left for the comparison to refuse;
- the ONNX check's float64 criterion (``check_extra_outputs(exact=...)``): on a conv whose cancelling sums
  amplify fp32 rounding beyond the tolerance, ONNX Runtime passes by being no further from float64 than twice
  Paddle Inference's own error; the same graph with weights 1e-3 off fails it.
"""
import os
import shutil

import numpy as np
import paddle
import pytest

from ppfuse.errors import ExportError

# the batched decoding runs ppdet's own ops on the same values as its per-image loop; exp() over a longer vector
# can take another (vectorized) path of the kernel, an ulp apart
DECODE_RTOL = DECODE_ATOL = 1e-5
ONNX_ATOL = 1e-5  # ONNX Runtime against Paddle, relative to the output's largest magnitude (fp32 rounding)


def _save_program(directory, epsilons, shape, x_file):
    """Runs in a child process (below): builds the layer with a fixed seed, saves its program and its dygraph
    output for the input in ``x_file``. ``paddle.jit.save`` of this small layer crashed the interpreter (SIGSEGV
    inside Paddle) in 2 of 4 full test runs, never alone; a child keeps that away from the test session."""
    import paddle as child_paddle
    from ppfuse.export_format import MODEL_FILE
    child_paddle.seed(0)
    layer = _ConvGroupNorms(epsilons)
    layer.eval()
    if x_file is not None:
        x = np.load(x_file)
        np.save(os.path.join(directory, "want.npy"), layer(child_paddle.to_tensor(x)).numpy())
    child_paddle.jit.save(child_paddle.jit.to_static(layer, full_graph=True), os.path.join(directory, MODEL_FILE),
                          input_spec=[child_paddle.static.InputSpec(shape, "float32", "x")])


def _onnx_of(tmp_path, epsilons, shape, x=None):
    """``model.onnx`` of ``_ConvGroupNorms(epsilons)`` and, given ``x``, the layer's own output for it."""
    import multiprocessing
    pytest.importorskip("paddle2onnx")
    pytest.importorskip("onnxruntime")
    from ppfuse.deploy import onnx_support
    directory = str(tmp_path / "program")
    os.makedirs(directory)
    x_file = None
    if x is not None:
        x_file = str(tmp_path / "x.npy")
        np.save(x_file, x)
    child = multiprocessing.get_context("spawn").Process(target=_save_program,
                                                         args=(directory, epsilons, shape, x_file))
    child.start()
    child.join(300)
    assert child.exitcode == 0, f"saving the program failed in the child process (exit code {child.exitcode})"
    path = onnx_support.to_onnx(directory, str(tmp_path / "model.onnx"))
    return path, (np.load(os.path.join(directory, "want.npy")) if x is not None else None)


def _save_amplifier(directory, x_file):
    """Runs in a child process (as :func:`_save_program`): builds :class:`_Amplifier` for the input in ``x_file``,
    saves its program, then its output evaluated in float64 (``float64_copy``, after the trace left its values in
    the layer's ``inputs``)."""
    import paddle as child_paddle
    from ppfuse.core.verify import float64_copy
    from ppfuse.export_format import MODEL_FILE
    child_paddle.seed(0)
    x = np.load(x_file)
    layer = _Amplifier(child_paddle.to_tensor(x))
    layer.eval()
    child_paddle.jit.save(child_paddle.jit.to_static(layer, full_graph=True), os.path.join(directory, MODEL_FILE),
                          input_spec=[child_paddle.static.InputSpec(list(x.shape), "float32", "x")])
    with child_paddle.no_grad():
        exact = float64_copy(layer)(child_paddle.to_tensor(x.astype("float64")))
    np.savez(os.path.join(directory, "float64.npz"), exact.numpy())


class _Amplifier(paddle.nn.Layer):
    """A 1x1 conv whose terms cancel -- weights of zero sum per output channel on inputs near 10 that vary by
    1% --, so that its fp32 sums round at the size of their terms, ~100 times the result's own ulp: fp32
    rounding amplified, as a deep network on random weights does. Keeps its input as ``self.inputs``, as
    ppdet's detectors do."""

    def __init__(self, x):
        super().__init__()
        self.conv = paddle.nn.Conv2D(int(x.shape[1]), 8, 1, bias_attr=False)
        with paddle.no_grad():
            self.conv.weight.set_value(self.conv.weight - self.conv.weight.mean(axis=[1, 2, 3], keepdim=True))

    def forward(self, x):
        self.inputs = {"x": x}
        return self.conv(x)


def _scale_conv_weights(path, out_path, factor):
    """``path``'s ONNX model with every Conv's weight times ``factor`` (a conversion that is off)."""
    import onnx
    from onnx import numpy_helper
    model = onnx.load(path)
    weights = {n.input[1] for n in model.graph.node if n.op_type == "Conv"}
    for tensor in model.graph.initializer:
        if tensor.name in weights:
            tensor.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(tensor) * factor, tensor.name))
    for node in model.graph.node:
        if node.op_type == "Constant" and node.output[0] in weights:
            value = node.attribute[0].t
            value.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(value) * factor, value.name))
    onnx.save(model, out_path)


def test_the_onnx_check_tells_amplified_rounding_from_a_wrong_conversion(tmp_path):
    """ONNX Runtime's output against Paddle Inference's within 1e-5 of the output's scale: below the rounding
    the cancelling sums amplify (the runtimes sum in other orders), so the fixed tolerance alone refuses; the
    float64 criterion passes the faithful conversion and refuses one whose weights are 1e-3 off."""
    import multiprocessing
    pytest.importorskip("paddle2onnx")
    pytest.importorskip("onnxruntime")
    from ppfuse.deploy import onnx_support
    directory = str(tmp_path / "program")
    os.makedirs(directory)
    x = (10 + np.random.RandomState(0).uniform(-0.1, 0.1, (1, 512, 12, 12))).astype("float32")
    np.save(str(tmp_path / "x.npy"), x)
    child = multiprocessing.get_context("spawn").Process(target=_save_amplifier,
                                                         args=(directory, str(tmp_path / "x.npy")))
    child.start()
    child.join(300)
    assert child.exitcode == 0, f"saving the program failed in the child process (exit code {child.exitcode})"
    path = onnx_support.to_onnx(directory, str(tmp_path / "model.onnx"))
    exact = np.load(os.path.join(directory, "float64.npz"))["arr_0"]
    _scale_conv_weights(path, str(tmp_path / "wrong.onnx"), 1 + 1e-3)

    def check(name, **kwargs):  # the check drops the compared outputs from the file: each case on a copy
        copy = str(tmp_path / f"check-{len(os.listdir(tmp_path))}.onnx")
        shutil.copy(str(tmp_path / name), copy)
        return onnx_support.check_extra_outputs(directory, copy, {"x": x}, atol=1e-5, rtol=1e-5, keep=0, **kwargs)
    ok, text = check("model.onnx")
    assert not ok and "above tolerance" in text, text
    ok, text = check("model.onnx", exact=lambda: [exact])
    assert ok and "passed by the float64 criterion" in text, text
    ok, text = check("wrong.onnx", exact=lambda: [exact])
    assert not ok and "failed the float64 criterion" in text, text


class _ConvGroupNorms(paddle.nn.Layer):
    def __init__(self, epsilons=(1e-5,)):
        super().__init__()
        self.conv = paddle.nn.Conv2D(8, 32, 3, padding=1)
        self.norms = paddle.nn.LayerList([paddle.nn.GroupNorm(8, 32, epsilon=e) for e in epsilons])
        for norm in self.norms:  # weight and bias away from 1 and 0
            norm.weight.set_value(paddle.uniform([32], min=0.5, max=1.5))
            norm.bias.set_value(paddle.uniform([32], min=-0.5, max=0.5))

    def forward(self, x):
        x = self.conv(x)
        for norm in self.norms:
            x = norm(x)
        return x


def test_group_norm_converts_with_its_epsilon(tmp_path):
    import onnx
    from ppfuse.deploy import onnx_support
    x = np.random.RandomState(0).randn(2, 8, 12, 12).astype("float32")
    path, want = _onnx_of(tmp_path, (1e-5, 1e-5), [None, 8, 12, 12], x)
    epsilons = [a.f for n in onnx.load(path).graph.node if n.op_type == "InstanceNormalization"
                for a in n.attribute if a.name == "epsilon"]
    assert epsilons == [pytest.approx(1e-5, rel=1e-6)] * 2
    got = onnx_support.run_onnx(onnx_support.session(path), {"x": x})[0]
    np.testing.assert_allclose(got / np.abs(want).max(), want / np.abs(want).max(), atol=ONNX_ATOL, rtol=0)


def test_group_norms_with_different_epsilons_are_refused(tmp_path):
    with pytest.raises(ExportError, match=r"different ones \(\[1e-05, 0.001\]\)"):
        _onnx_of(tmp_path, (1e-5, 1e-3), [1, 8, 12, 12])


def _head(cls, **attributes):
    """A ppdet head with only the attributes its ``decode`` reads (no layers built)."""
    head = cls.__new__(cls)
    paddle.nn.Layer.__init__(head)
    for name, value in attributes.items():
        setattr(head, name, value)
    return head


def _level(rng, batch, size, anchors_per_cell, classes, extent):
    """One level: distinct class logits (no ties in the top-k), deltas, anchors ``[H*W*A, 4]``."""
    count = size * size * anchors_per_cell
    logits = (rng.permutation(batch * count * classes) / (batch * count * classes) * 8 - 4)
    logits = logits.reshape([batch, size, size, anchors_per_cell * classes]).astype("float32")
    deltas = rng.uniform(-1.5, 1.5, (batch, size, size, anchors_per_cell * 4)).astype("float32")
    corner = rng.uniform(0, extent, (count, 2))
    anchors = np.concatenate([corner, corner + rng.uniform(4, extent / 2, (count, 2))], 1).astype("float32")
    return paddle.to_tensor(anchors), paddle.to_tensor(logits), paddle.to_tensor(deltas)


def _inputs(batch):
    im_shape = paddle.to_tensor(np.array([[96, 96], [80, 120], [64, 64]][:batch], "float32"))
    scale_factor = paddle.to_tensor(np.array([[1.5, 2.0], [0.5, 0.8], [1.0, 1.0]][:batch], "float32"))
    return im_shape, scale_factor


@pytest.mark.ppdet
@pytest.mark.parametrize("batch", [1, 2])
def test_retina_decode_for_the_batch_equals_ppdet_per_image(batch):
    from ppdet.modeling.heads.retina_head import RetinaHead
    from ppfuse.ppdet.postprocess import _retina_decode
    rng = np.random.RandomState(batch)
    head = _head(RetinaHead, num_classes=4, nms_pre=50, weights=[1.0, 1.0, 1.0, 1.0])
    levels = [_level(rng, batch, 6, 3, 4, 96), _level(rng, batch, 3, 3, 4, 96)]  # 108 > nms_pre, 27 < nms_pre
    anchors, logits, deltas = ([level[i] for level in levels] for i in range(3))
    want = RetinaHead.decode(head, anchors, logits, deltas, *_inputs(batch))
    got = _retina_decode(head, anchors, logits, deltas, *_inputs(batch))
    assert [list(t.shape) for t in got] == [[batch, 77, 4], [batch, 4, 77]]
    for g, w in zip(got, want):
        np.testing.assert_allclose(g.numpy(), w.numpy(), rtol=DECODE_RTOL, atol=DECODE_ATOL)


@pytest.mark.ppdet
@pytest.mark.parametrize("nms_pre", [40, 1000])  # a top-k, and none
def test_yolof_decode_for_the_batch_equals_ppdet_per_image(nms_pre):
    from ppdet.modeling.heads.yolof_head import YOLOFHead
    from ppfuse.ppdet.postprocess import _yolof_decode
    rng = np.random.RandomState(nms_pre)
    head = _head(YOLOFHead, num_classes=3, nms_pre=nms_pre, ctr_clip=8.0, delta_mean=[0.0, 0.1, 0.0, -0.1],
                 delta_std=[1.0, 0.5, 1.0, 2.0])
    anchor, logits, deltas = _level(rng, 2, 5, 4, 3, 140)  # anchors beyond the images: clipped per image
    want = YOLOFHead.decode(head, [anchor], [logits], [deltas], *_inputs(2))
    got = _yolof_decode(head, [anchor], [logits], [deltas], *_inputs(2))
    count = min(nms_pre, 100)
    assert [list(t.shape) for t in got] == [[2, count, 4], [2, 3, count]]
    for g, w in zip(got, want):
        np.testing.assert_allclose(g.numpy(), w.numpy(), rtol=DECODE_RTOL, atol=DECODE_ATOL)


@pytest.mark.ppdet
def test_ttf_box_for_one_image_equals_ppdet_and_refuses_a_batch():
    from ppdet.modeling.layers import TTFBox
    from ppfuse.ppdet.postprocess import _ttf_box_one_image
    rng = np.random.RandomState(0)
    box = TTFBox(max_per_img=20, score_thresh=0.3, down_ratio=4)
    heat = (rng.permutation(3 * 8 * 8) / (3 * 8 * 8) * 6 - 3).reshape([1, 3, 8, 8]).astype("float32")
    wh = rng.uniform(1, 10, (1, 4, 8, 8)).astype("float32")
    inputs = [paddle.to_tensor(heat), paddle.to_tensor(wh), *_inputs(1)]
    want, want_num = box(*inputs)
    got, got_num = _ttf_box_one_image(box, *inputs)
    assert list(got.shape) == list(want.shape) and got.shape[1] == 6
    np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=DECODE_RTOL, atol=DECODE_ATOL)
    np.testing.assert_array_equal(got_num.numpy(), want_num.numpy())
    two = [paddle.concat([t, t]) for t in inputs]
    with pytest.raises(Exception):  # one image per run: a batch fails instead of mixing images
        _ttf_box_one_image(box, *two)


def _rows(rng, count=6, classes=3):
    boxes = rng.uniform(0, 100, (1, count, 4))
    scores = rng.uniform(0, 0.5, (1, classes, count))
    scores[0, 0, 2] = scores[0, 0, 3] = 0.9  # rows 2 and 3: the same best score
    return boxes, scores


def test_tied_rows_in_another_order_are_compared_in_the_reference_order():
    from ppfuse.deploy.onnx_support import order_tied_rows
    boxes, scores = _rows(np.random.RandomState(0))
    swap = [0, 1, 3, 2, 4, 5]
    (got_boxes, got_scores), moved = order_tied_rows([boxes, scores], [boxes[:, swap] + 1e-6, scores[:, :, swap]],
                                                     atol=[1e-3, 1e-4], rtol=1e-4)
    assert moved == 2
    np.testing.assert_allclose(got_boxes, boxes, atol=1e-5, rtol=0)
    np.testing.assert_allclose(got_scores, scores, atol=0, rtol=0)


def test_rows_that_are_not_tied_stay_where_they_are():
    from ppfuse.deploy.onnx_support import order_tied_rows
    boxes, scores = _rows(np.random.RandomState(1))
    swap = [1, 0, 2, 3, 4, 5]  # rows 0 and 1 have different best scores: another order is another result
    candidate = [boxes[:, swap], scores[:, :, swap]]
    got, moved = order_tied_rows([boxes, scores], candidate, atol=[1e-3, 1e-4], rtol=1e-4)
    assert moved == 0
    np.testing.assert_array_equal(got[0], candidate[0])
    assert np.abs(got[1] - scores).max() > 0.01


@pytest.mark.parametrize("images,top_k", [(1, 5), (2, 5), (2, -1)])
def test_nms_index_after_the_per_class_top_k_numbers_the_input_rows(images, top_k):
    """PP-YOLOE-Seg gathers mask coefficients with NMS's ``index``: the ONNX form's NMS (each class's top-k
    first) must return the index Paddle's ``multiclass_nms3`` returns on the whole input."""
    from ppfuse.ppdet.postprocess import multiclass_nms, onnx_multiclass_nms
    rng = np.random.RandomState(images)
    corners = rng.uniform(0, 50, size=(images, 30, 2)).astype("float32")
    boxes = np.concatenate([corners, corners + rng.uniform(5, 30, size=(images, 30, 2)).astype("float32")], -1)
    scores = rng.uniform(0, 1, size=(images, 3, 30)).astype("float32")
    arguments = dict(score_threshold=0.2, nms_top_k=top_k, keep_top_k=20, nms_threshold=0.5, return_index=True)
    want, want_num, want_index = multiclass_nms(paddle.to_tensor(boxes), paddle.to_tensor(scores), **arguments)
    got, got_num, got_index = onnx_multiclass_nms(paddle.to_tensor(boxes), paddle.to_tensor(scores), **arguments)
    np.testing.assert_array_equal(got_num.numpy(), want_num.numpy())
    np.testing.assert_array_equal(got.numpy(), want.numpy())
    np.testing.assert_array_equal(got_index.numpy().ravel(), want_index.numpy().ravel())
    # the index points at the rows whose boxes were kept
    flat = boxes.reshape(-1, 4)
    np.testing.assert_array_equal(flat[got_index.numpy().ravel()], got.numpy()[:, 2:6])
