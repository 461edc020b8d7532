"""ppfuse's rotated multiclass NMS (:mod:`ppfuse.runtime.rotated_nms`) against Paddle's own kernel, and the
runtimes that apply it after an ONNX graph.

The NMS is compared with ``paddle._C_ops.multiclass_nms3`` (dygraph, the CPU kernel Paddle Inference runs)
on generated rotated rectangles: overlapping, nested, identical, touching and degenerate (zero width) ones,
corners clockwise or not from any corner, tied scores, several classes and images, a background class,
``nms_top_k``/``keep_top_k`` truncation, ``nms_eta``: the same rows (classes, order, boxes, scores) bit for
bit, the same counts. Polygon IoU against analytic cases and a grid count of the intersection.
"""
import importlib.util
import json
import os
import shutil

import numpy as np
import paddle
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ppfuse.errors import InferenceError
from ppfuse.export_format import ONNX_FILE, REPORT_FILE
from ppfuse.runtime import rotated_nms
from ppfuse.runtime.rotated_nms import MultiClassNMS, intersection_area, polygon_iou

EXAMPLES = int(os.environ.get("PPFUSE_ADVERSARIAL_EXAMPLES", "60"))


def rectangles(rng, count, scale=100.0, integer=False):
    """``count`` rotated rectangles ``[count, 8]``: any angle (or axis-aligned on an integer grid), some of zero
    width; corners clockwise or counter-clockwise, from any corner; then identical copies, nested (shrunk about
    the centre) and touching (shifted by a side) copies of earlier ones."""
    if integer:  # exact areas and intersections: ties at the threshold and shared edges decide exactly
        x1, y1 = rng.randint(0, 20, (2, count)).astype(float)
        w, h = rng.randint(0, 8, (2, count)).astype(float)
        centre_x, centre_y, angle = x1 + w / 2, y1 + h / 2, np.zeros(count)
    else:
        centre_x, centre_y = rng.uniform(0, scale, (2, count))
        w, h = rng.uniform(0, 0.4 * scale, (2, count))
        w[rng.rand(count) < 0.1] = 0.0
        angle = rng.uniform(-np.pi, np.pi, count)
    dx = np.stack([-w, w, w, -w], axis=1) / 2
    dy = np.stack([-h, -h, h, h], axis=1) / 2
    cos, sin = np.cos(angle)[:, None], np.sin(angle)[:, None]
    quads = np.stack([centre_x[:, None] + dx * cos - dy * sin, centre_y[:, None] + dx * sin + dy * cos], axis=2)
    for i in range(1, count):
        j = rng.randint(0, i)
        kind = rng.randint(0, 5)
        if kind == 0:  # identical
            quads[i] = quads[j]
        elif kind == 1:  # nested
            middle = quads[j].mean(axis=0)
            quads[i] = middle + rng.uniform(0.2, 0.9) * (quads[j] - middle)
        elif kind == 2:  # touching along a side
            quads[i] = quads[j] + (quads[j][1] - quads[j][0])
    clockwise = rng.rand(count) < 0.5
    quads[clockwise] = quads[clockwise][:, ::-1]
    quads = np.stack([np.roll(q, shift, axis=0) for q, shift in zip(quads, rng.randint(0, 4, count))])
    return quads.reshape(count, 8).astype(np.float32)


def paddle_nms(boxes, scores, params: MultiClassNMS):
    out, _, number = paddle._C_ops.multiclass_nms3(
        paddle.to_tensor(boxes), paddle.to_tensor(scores), None, params.score_threshold, params.nms_top_k,
        params.keep_top_k, params.nms_threshold, params.normalized, params.nms_eta, params.background_label)
    return out.numpy().reshape(-1, 10), number.numpy()


def assert_same_as_paddle(boxes, scores, params: MultiClassNMS):
    want_bbox, want_number = paddle_nms(boxes, scores, params)
    bbox, number = params(boxes, scores)
    assert bbox.dtype == np.float32 and number.dtype == np.int32
    np.testing.assert_array_equal(number, want_number)
    np.testing.assert_array_equal(bbox, want_bbox)  # classes, order, scores and corners: bit for bit
    return bbox


@settings(max_examples=EXAMPLES, deadline=None)
@given(seed=st.integers(0, 2 ** 31 - 1), images=st.integers(1, 3), count=st.integers(1, 40),
       classes=st.integers(1, 4), integer=st.booleans(), tied=st.booleans(),
       score_threshold=st.sampled_from([0.0, 0.05, 0.3]), nms_top_k=st.sampled_from([-1, 0, 1, 5, 100]),
       keep_top_k=st.sampled_from([-1, 0, 3, 10]), nms_threshold=st.sampled_from([0.1, 0.3, 0.5, 0.7, 0.99]),
       nms_eta=st.sampled_from([1.0, 0.9, 0.5]), background_label=st.sampled_from([-1, 0, 1]),
       normalized=st.booleans())
def test_rotated_nms_gives_paddles_detections(seed, images, count, classes, integer, tied, score_threshold,
                                              nms_top_k, keep_top_k, nms_threshold, nms_eta, background_label,
                                              normalized):
    """(Thresholds below 1: two identical rotated boxes have an IoU of 1 only up to float32 rounding, in Paddle's
    arithmetic as in this one, which decides them either way at a threshold of exactly 1.)"""
    rng = np.random.RandomState(seed)
    boxes = np.stack([rectangles(rng, count, integer=integer) for _ in range(images)])
    if tied:  # scores from a few values: the order of equal scores decides
        scores = rng.choice([0.05, 0.1, 0.3, 0.5, 0.9], (images, classes, count)).astype(np.float32)
    else:
        scores = rng.rand(images, classes, count).astype(np.float32)
    assert_same_as_paddle(boxes, scores, MultiClassNMS(score_threshold, nms_top_k, keep_top_k, nms_threshold,
                                                       normalized, nms_eta, background_label))


FLOAT32_EPS = float(np.finfo(np.float32).eps)


def iou_and_band(quad, others):
    """The IoUs of ``quad`` with ``others`` and how far from them Paddle's own can be: the kernel sums the
    intersection's shoelace in float32 (up to 8 corners, two products each), which cancels to about
    ``16 eps max|coordinate|^2`` of area, of the union; four times that."""
    iou = polygon_iou(quad, others).astype(np.float64)
    total = rotated_nms.polygon_area(quad[None])[0] + rotated_nms.polygon_area(others).astype(np.float64)
    union = np.maximum(total / (1 + iou), 1e-30)  # iou = inter / (total - inter)
    largest = np.maximum(np.abs(others).max(axis=(1, 2)), np.abs(quad).max()).astype(np.float64)
    return iou, 4 * 16 * FLOAT32_EPS * largest ** 2 / union


def check_greedy(boxes, scores, params: MultiClassNMS, bbox, classes):
    """``bbox`` (one image, ``keep_top_k=-1``) is what greedy NMS keeps, up to Paddle's rounding: replayed for each
    of ``classes`` over the candidates in order, every box whose IoUs with the boxes ``bbox`` kept before it are all
    further than :func:`iou_and_band`'s band below the threshold is kept, every box with one further above it is
    not.
    Returns how many decisions fell within the band (either is Paddle's)."""
    quads = boxes[0].reshape(-1, 4, 2)
    low, high = quads.min(axis=1), quads.max(axis=1)
    undecided = 0
    for c in classes:
        order = rotated_nms._candidates(scores[0, c], np.float32(params.score_threshold), params.nms_top_k)
        rows = bbox[bbox[:, 0] == c]
        threshold, kept, position = np.float32(params.nms_threshold), [], 0
        for i in order:
            was_kept = position < len(rows) and rows[position, 1] == scores[0, c, i] and \
                np.array_equal(rows[position, 2:], boxes[0, i])
            before = np.asarray(kept, np.int64)
            near = before[np.all((low[before] <= high[i]) & (high[before] >= low[i]), axis=1)]  # others: IoU 0
            if len(near):
                iou, band = iou_and_band(quads[i], quads[near])
                surely_kept, surely_not = np.all(iou + band <= threshold), np.any(iou - band > threshold)
            else:
                surely_kept, surely_not = threshold >= 0, threshold < 0
            assert not (surely_kept and not was_kept) and not (surely_not and was_kept), (c, i)
            undecided += not (surely_kept or surely_not)
            if was_kept:
                kept.append(i)
                position += 1
                if params.nms_eta < 1 and threshold > 0.5:
                    threshold = np.float32(threshold * np.float32(params.nms_eta))
        assert position == len(rows)
    return undecided


@pytest.mark.parametrize("scale", [1.0, 1000.0, 5000.0])
def test_many_boxes_at_image_scales_give_paddles_detections(scale):
    """PP-YOLOE-R's parameters (DOTA config) on 3000 boxes, coordinates up to ``scale`` pixels: Paddle's rows, or
    where they differ, both are greedy NMS's up to Paddle's own float32 rounding of the IoUs it compares with
    the threshold (:func:`check_greedy`), and some IoU was that close."""
    rng = np.random.RandomState(int(scale))
    boxes = rectangles(rng, 3000, scale)[None]
    scores = rng.rand(1, 3, 3000).astype(np.float32)
    params = MultiClassNMS(0.1, 2000, -1, 0.1, False)
    want_bbox, want_number = paddle_nms(boxes, scores, params)
    bbox, number = params(boxes, scores)
    assert 100 < len(want_bbox) < 6000  # something was kept and something suppressed
    differ = [c for c in range(3) if not np.array_equal(bbox[bbox[:, 0] == c], want_bbox[want_bbox[:, 0] == c])]
    if differ:
        assert check_greedy(boxes, scores, params, want_bbox, differ) > 0
        assert check_greedy(boxes, scores, params, bbox, differ) > 0
        assert abs(len(bbox) - len(want_bbox)) <= 0.001 * len(want_bbox)


def test_no_detection_gives_an_empty_bbox_and_zero_counts():
    boxes = rectangles(np.random.RandomState(0), 5)[None].repeat(2, axis=0)
    scores = np.zeros((2, 2, 5), np.float32)
    bbox = assert_same_as_paddle(boxes, scores, MultiClassNMS(0.5, -1, -1, 0.3))
    assert bbox.shape == (0, 10)


SQUARE = np.array([-1, -1, 1, -1, 1, 1, -1, 1], np.float32)
DIAMOND = np.array([0, -np.sqrt(2), np.sqrt(2), 0, 0, np.sqrt(2), -np.sqrt(2), 0], np.float32)


@pytest.mark.parametrize("other, iou", [
    (SQUARE, 1.0),
    (SQUARE.reshape(4, 2)[::-1].reshape(-1), 1.0),  # the same square clockwise
    (DIAMOND, 1 / np.sqrt(2)),  # the square turned 45 degrees: a regular octagon, 8(sqrt2 - 1) of 8 - that
    (SQUARE + np.float32(1.0), 1 / 7),  # shifted by (1, 1): 1 of 4 + 4 - 1
    (SQUARE * np.float32(0.5), 0.25),  # nested
    (SQUARE + np.float32([2, 0] * 4), 0.0),  # touching along a side
    (SQUARE + np.float32(5.0), 0.0),  # apart
    (np.float32([-1, -1, 1, -1, 1, -1, -1, -1]), 0.0),  # zero area
])
def test_polygon_iou_known_cases(other, iou):
    np.testing.assert_allclose(polygon_iou(SQUARE, other[None]), [iou], atol=1e-6)


def _inside(points, quad):
    """Which of ``points [P, 2]`` lie inside the counter-clockwise convex ``quad [4, 2]``."""
    edges = np.roll(quad, -1, axis=0) - quad
    rel = points[:, None, :] - quad[None]
    return np.all(edges[None, :, 0] * rel[..., 1] - edges[None, :, 1] * rel[..., 0] >= 0, axis=1)


def test_intersection_area_matches_a_grid_count():
    """Random pairs of rotated rectangles: the intersection's area within the grid count's error (cells along
    both boundaries), on a 400 x 400 grid over the pair's bounding box."""
    rng = np.random.RandomState(5)
    quads = rotated_nms.counter_clockwise(rectangles(rng, 60, 10.0).reshape(-1, 4, 2))
    for a, b in zip(quads[0::2], quads[1::2]):
        low, high = np.minimum(a.min(0), b.min(0)), np.maximum(a.max(0), b.max(0))
        steps = 400
        cell = (high - low) / steps
        grid = np.stack(np.meshgrid(*[low[k] + (np.arange(steps) + 0.5) * cell[k] for k in (0, 1)]), axis=-1)
        grid = grid.reshape(-1, 2)
        counted = np.count_nonzero(_inside(grid, a) & _inside(grid, b)) * cell[0] * cell[1]
        perimeters = sum(np.linalg.norm(np.roll(q, -1, axis=0) - q, axis=1).sum() for q in (a, b))
        np.testing.assert_allclose(intersection_area(a, b[None])[0], counted,
                                   atol=perimeters * max(cell) + 1e-9)


@pytest.mark.parametrize("box, what", [
    ([0, 0, 4, 0, 1, 1, 0, 4], "not a convex quadrilateral"),  # concave
    ([0, 0, 4, 4, 4, 0, 0, 3], "not a convex quadrilateral"),  # self-crossing, some area
    ([0, 0, np.nan, 0, 1, 1, 0, 1], "non-finite corners"),
])
def test_a_candidate_the_convex_clipper_cannot_take_is_refused_in_one_line(box, what):
    boxes = np.array([[SQUARE, box]], np.float32)
    scores = np.array([[[0.9, 0.8]]], np.float32)
    with pytest.raises(InferenceError, match=f"box 1 .*{what}.*--runtime paddle") as caught:
        MultiClassNMS(0.1, -1, -1, 0.3)(boxes, scores)
    assert "\n" not in str(caught.value)


def test_a_crossing_quadrilateral_of_zero_area_is_taken_as_paddle_does():
    bow = np.float32([0, 0, 2, 2, 2, 0, 0, 2])  # two triangles of opposite orientation: shoelace area 0
    boxes = np.array([[SQUARE, bow]], np.float32)
    assert_same_as_paddle(boxes, np.array([[[0.9, 0.8]]], np.float32), MultiClassNMS(0.1, -1, -1, 0.3))


def test_other_shapes_are_refused():
    with pytest.raises(InferenceError, match=r"boxes \[N, M, 8\] and scores \[N, C, M\]"):
        MultiClassNMS(0.1, -1, -1, 0.3)(np.zeros((1, 4, 4), np.float32), np.zeros((1, 2, 4), np.float32))


def test_the_report_record_round_trips_and_a_foreign_one_is_refused():
    params = MultiClassNMS(0.1, 2000, -1, 0.1, False, 0.9, 3)
    record = json.loads(json.dumps(params.to_report()))
    assert record["op"] == "multiclass_nms3" and record["box_size"] == 8
    assert MultiClassNMS.from_report(record) == params
    with pytest.raises(InferenceError, match="multiclass_nms3 on rotated boxes"):
        MultiClassNMS.from_report({**record, "box_size": 4})
    with pytest.raises(InferenceError, match="lacks nms_eta"):
        MultiClassNMS.from_report({k: v for k, v in record.items() if k != "nms_eta"})


# --- the runtimes ------------------------------------------------------------------------------------------------

ONNX = all(importlib.util.find_spec(m) is not None for m in ("onnx", "onnxruntime"))
OPENVINO = importlib.util.find_spec("openvino") is not None


@pytest.fixture
def graph_then_nms(tmp_path):
    """An export directory whose ``model.onnx`` passes boxes and scores through (Identity) and whose report
    asks for the rotated NMS after it; ``model_int8.onnx`` is the same file (the int8 path's NMS)."""
    import onnx
    from onnx import TensorProto, helper
    inputs = [helper.make_tensor_value_info("raw_boxes", TensorProto.FLOAT, ["N", "M", 8]),
              helper.make_tensor_value_info("raw_scores", TensorProto.FLOAT, ["N", "C", "M"])]
    outputs = [helper.make_tensor_value_info("boxes", TensorProto.FLOAT, ["N", "M", 8]),
               helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["N", "C", "M"])]
    nodes = [helper.make_node("Identity", ["raw_boxes"], ["boxes"]),
             helper.make_node("Identity", ["raw_scores"], ["scores"])]
    model = helper.make_model(helper.make_graph(nodes, "pass", inputs, outputs),
                              opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, str(tmp_path / ONNX_FILE))
    shutil.copy(tmp_path / ONNX_FILE, tmp_path / "model_int8.onnx")
    params = MultiClassNMS(0.1, 50, 20, 0.3, False)
    (tmp_path / REPORT_FILE).write_text(json.dumps({"with_nms": True,
                                                    "onnx": {"nms_after_graph": params.to_report()}}))
    return str(tmp_path), params


RUNTIME_CASES = [pytest.param(name, precision, marks=[] if ok else pytest.mark.skip(reason=f"needs {name}"),
                              id=f"{name}-{precision}")
                 for name, precision, ok in (("onnxruntime", "fp32", ONNX), ("onnxruntime", "int8", ONNX),
                                             ("openvino", "fp32", ONNX and OPENVINO),
                                             ("openvino", "int8", ONNX and OPENVINO))]


@pytest.mark.parametrize("name, precision", RUNTIME_CASES)
def test_onnx_runtimes_apply_the_nms_the_report_asks_for(graph_then_nms, name, precision):
    from ppfuse import runtime
    directory, params = graph_then_nms
    rng = np.random.RandomState(11)
    boxes = np.stack([rectangles(rng, 80) for _ in range(2)])
    scores = rng.rand(2, 3, 80).astype(np.float32)
    model = runtime.load(directory, name, runtime.RuntimeOptions(precision=precision))
    assert model.output_names == ["bbox", "bbox_num"] and not model.one_image_per_run
    got = model.run({"raw_boxes": boxes, "raw_scores": scores})
    want_bbox, want_number = paddle_nms(boxes, scores, params)
    assert list(got) == ["bbox", "bbox_num"]
    np.testing.assert_array_equal(got["bbox_num"], want_number)
    np.testing.assert_array_equal(got["bbox"], want_bbox)


@pytest.mark.skipif(not ONNX, reason="needs onnxruntime")
def test_a_report_asking_for_an_nms_ppfuse_does_not_have_is_refused_at_load(graph_then_nms):
    from ppfuse import runtime
    directory, params = graph_then_nms
    report = os.path.join(directory, REPORT_FILE)
    with open(report, "w") as f:
        json.dump({"with_nms": True, "onnx": {"nms_after_graph": {**params.to_report(), "op": "matrix_nms"}}}, f)
    with pytest.raises(InferenceError, match="ppfuse applies multiclass_nms3 on rotated boxes"):
        runtime.load(directory, "onnxruntime")
