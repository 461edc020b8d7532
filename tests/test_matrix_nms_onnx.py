"""PP-YOLO's ``matrix_nms`` in ONNX-convertible ops (``postprocess.onnx_matrix_nms``) against Paddle's kernel.

paddle2onnx has no ``matrix_nms``; ppfuse writes it one class at a time (a dense ``[C, M, M]`` form took 12.7 GB
for PP-YOLO at 192). Generated cases try to fool it: ties, nested and identical boxes, degenerate boxes, scores
on the thresholds, empty classes, ``nms_top_k`` and ``keep_top_k`` cutting through ties, a background class.
The contract: the same detections (class, score within ``SCORE_ATOL``, box exactly -- boxes are gathered, not
computed), the same count, the same source rows; listed in any order.

Exactly tied scores: the kernel orders them with ``std::partial_sort``, which leaves their order unspecified
(and a tied box's decay depends on it); the form takes the lower class, then the lower box, first. So tied
inputs are compared with the kernel on the same scores made distinct in that order, each tied score lowered
by a few ulps (``break_ties``).
"""
import numpy as np
import paddle
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ppfuse.ppdet import postprocess

# the decay is the kernel's formula in another order of float32 operations
SCORE_ATOL = 2e-6


def kernel(boxes, scores, **kwargs):
    return postprocess.matrix_nms(paddle.to_tensor(boxes), paddle.to_tensor(scores), return_index=True, **kwargs)


def form(boxes, scores, **kwargs):
    return postprocess.onnx_matrix_nms(paddle.to_tensor(boxes), paddle.to_tensor(scores), return_index=True,
                                       **kwargs)


def as_set(out, number, index):
    rows = np.concatenate([out.numpy(), index.numpy().reshape(-1, 1).astype(np.float32)], axis=1)
    return int(number.numpy().reshape(-1)[0]), rows


def assert_same_detections(want, got, score_atol=SCORE_ATOL):
    (n_want, rows_want), (n_got, rows_got) = want, got
    assert n_want == n_got == len(rows_want) == len(rows_got), (n_want, n_got)
    free = np.ones(len(rows_got), bool)
    for row in rows_want:
        fits = free & (rows_got[:, 0] == row[0]) & (rows_got[:, 6] == row[6]) & \
            (np.abs(rows_got[:, 1] - row[1]) <= score_atol) & np.all(rows_got[:, 2:6] == row[2:6], axis=1)
        assert fits.any(), f"kernel detection {row.tolist()} has no counterpart in {rows_got.tolist()}"
        free[np.flatnonzero(fits)[0]] = False


def break_ties(scores):
    """``scores [1, C, M]`` with each group of equal values made distinct in (class, box) order: the k-th of
    a group lowered by k ulps (the next distinct value is far below: scores are quarters when tied)."""
    flat = scores.reshape(-1).copy()
    for value in np.unique(flat):
        for k, i in enumerate(np.flatnonzero(flat == value)):
            for _ in range(k):
                flat[i] = np.nextafter(flat[i], np.float32(-np.inf))
    return flat.reshape(scores.shape)


def generated(seed, count, classes, tied, nested, degenerate, on_threshold, empty_class, threshold):
    rng = np.random.default_rng(seed)
    corner = rng.uniform(0, 60, (count, 2))
    size = rng.uniform(1, 30, (count, 2))
    boxes = np.concatenate([corner, corner + size], 1)
    if nested and count > 2:
        boxes[1] = boxes[0] + [2, 2, -2, -2]  # inside box 0 (size >= 1: may invert, a degenerate box then)
        boxes[2] = boxes[0]  # identical
    if degenerate and count > 3:
        boxes[3, 2:] = boxes[3, :2]  # zero area
    scores = rng.uniform(0, 1, (1, classes, count))
    if tied:
        scores = np.round(scores * 4) / 4  # many exact ties, 0 and 1 included
    if on_threshold:
        scores[0, 0, : count // 2] = threshold  # exactly the threshold: not above it
    if empty_class:
        scores[0, -1] = 0.0
    return boxes[None].astype(np.float32), scores.astype(np.float32)


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**31), count=st.integers(1, 40), classes=st.integers(1, 4), tied=st.booleans(),
       nested=st.booleans(), degenerate=st.booleans(), on_threshold=st.booleans(), empty_class=st.booleans(),
       score_threshold=st.sampled_from([0.0, 0.05, 0.25, 0.5]), post_threshold=st.sampled_from([0.0, 0.05, 0.3]),
       nms_top_k=st.sampled_from([-1, 1, 3, 10, 100]), keep_top_k=st.sampled_from([-1, 1, 5, 100]),
       use_gaussian=st.booleans(), background_label=st.sampled_from([-1, 0, 1]), normalized=st.booleans())
def test_the_onnx_form_gives_the_kernels_detections(seed, count, classes, tied, nested, degenerate, on_threshold,
                                                    empty_class, score_threshold, post_threshold, nms_top_k,
                                                    keep_top_k, use_gaussian, background_label, normalized):
    boxes, scores = generated(seed, count, classes, tied, nested, degenerate, on_threshold, empty_class,
                              score_threshold)
    kwargs = dict(score_threshold=score_threshold, post_threshold=post_threshold, nms_top_k=nms_top_k,
                  keep_top_k=keep_top_k, use_gaussian=use_gaussian, gaussian_sigma=2.0,
                  background_label=background_label, normalized=normalized)
    distinct = break_ties(scores) if tied else scores
    want = as_set(*kernel(boxes, distinct, **kwargs))
    got = as_set(*form(boxes, scores, **kwargs))
    # the ulps break_ties took off (up to ~30 for a value tied across every class) move the kernel's scores too
    assert_same_detections(want, got, SCORE_ATOL + float(np.abs(distinct - scores).max()))


@pytest.mark.slow  # ~45 s: the kernel and the form each take all 80 x 2268 candidates
def test_pp_yolo_sized_inputs_run_one_class_at_a_time():
    """PP-YOLO's MatrixNMS (nms_top_k -1, every anchor above 0.01) at 192: 2268 anchors, 80 classes, all of
    them candidates (random scores, distinct). The dense form needed [80, 2268, 2268] floats at once (12.7 GB
    peak in ONNX Runtime); per class the kernel's result with memory of one class."""
    rng = np.random.default_rng(1)
    anchors, classes = 2268, 80
    corner = rng.uniform(0, 180, (anchors, 2))
    boxes = np.concatenate([corner, corner + rng.uniform(2, 60, (anchors, 2))], 1)[None].astype(np.float32)
    scores = (0.01 + 0.02 * (rng.permutation(classes * anchors) + 1) / (classes * anchors + 1))
    scores = scores.reshape(1, classes, anchors).astype(np.float32)
    assert len(np.unique(scores)) == scores.size
    kwargs = dict(score_threshold=0.01, post_threshold=0.01, nms_top_k=-1, keep_top_k=100, use_gaussian=False,
                  background_label=-1, normalized=False)
    want = as_set(*kernel(boxes, scores, **kwargs))
    assert want[0] == 100
    assert_same_detections(want, as_set(*form(boxes, scores, **kwargs)))


def test_the_form_traces_and_runs_in_onnx_runtime_as_the_kernel(tmp_path):
    """Traced (full_graph), saved, converted by paddle2onnx: ONNX Runtime gives the kernel's detections."""
    pytest.importorskip("paddle2onnx")
    ort = pytest.importorskip("onnxruntime")
    from ppfuse.deploy import onnx_support
    from ppfuse.export_format import MODEL_FILE
    kwargs = dict(score_threshold=0.05, post_threshold=0.05, nms_top_k=30, keep_top_k=20, use_gaussian=True,
                  gaussian_sigma=2.0, background_label=-1, normalized=False)

    class Matrix(paddle.nn.Layer):
        def forward(self, boxes, scores):
            out, number, index = postprocess.onnx_matrix_nms(boxes, scores, return_index=True, **kwargs)
            return out, number, index

    layer = Matrix()
    spec = [paddle.static.InputSpec([1, 50, 4], "float32", "boxes"),
            paddle.static.InputSpec([1, 3, 50], "float32", "scores")]
    directory = tmp_path / "program"
    paddle.jit.save(paddle.jit.to_static(layer, input_spec=spec, full_graph=True), str(directory / MODEL_FILE))
    path = onnx_support.to_onnx(str(directory), str(tmp_path / "model.onnx"))
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    for seed in range(5):
        boxes, scores = generated(seed, 50, 3, tied=seed % 2 == 1, nested=True, degenerate=True,
                                  on_threshold=False, empty_class=seed == 4, threshold=0.05)
        out, number, index = session.run(None, {"boxes": boxes, "scores": scores})
        got = (int(number.reshape(-1)[0]), np.concatenate([out, index.reshape(-1, 1).astype(np.float32)], 1))
        distinct = break_ties(scores)
        assert_same_detections(as_set(*kernel(boxes, distinct, **kwargs)), got,
                               SCORE_ATOL + float(np.abs(distinct - scores).max()))
