"""The verification criteria: fixed tolerance, and the float64 check used beyond it.

Some models amplify fp32 rounding past any fixed tolerance (PP-YOLOE+ l with random
weights: its fp32 and float64 evaluations differ by more than the tolerance). There a
converted model passes when it is no further from float64 than twice the original's own
fp32 error, and fails when it is further.
"""
import numpy as np

from ppfuse.measure.benchmark import Reference, parity
from ppfuse.core.verify import compare, rounding_check


def outputs(truth, error, rng):
    return {k: v + error * rng.standard_normal(v.shape) for k, v in truth.items()}


def test_rounding_check_passes_within_twice_the_original_error_and_fails_beyond():
    rng = np.random.default_rng(0)
    truth = {"boxes": rng.uniform(0, 1, (2, 50, 4)), "scores": rng.uniform(0, 1, (2, 3, 50))}
    original = outputs(truth, 1e-3, rng)
    close = outputs(truth, 1e-3, rng)
    far = outputs(truth, 5e-3, rng)
    assert not compare(original, close, 1e-4, 1e-4).within_tolerance  # the fixed tolerance alone fails it
    check = rounding_check(original, close, truth)
    assert check.ok and 0.5 < check.candidate_error["boxes"] / check.original_error["boxes"] < 2
    assert not rounding_check(original, far, truth).ok


def test_the_float64_reference_of_a_traced_model_leaves_the_trace_values_out():
    """ppdet's detectors keep their inputs as ``self.inputs``; once a wrapper around one is traced (the export's
    ``to_static``), those are the trace's values, which ``deepcopy`` cannot copy. The float64 copy leaves them
    out and computes what the model computes."""
    import paddle

    from ppfuse.core.verify import float64_copy

    class KeepsInputs(paddle.nn.Layer):
        def __init__(self):
            super().__init__()
            self.conv = paddle.nn.Conv2D(3, 4, 3)

        def forward(self, x):
            self.inputs = {"image": x}
            return self.conv(x)

    class Wrapper(paddle.nn.Layer):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, x):
            return self.model(x)
    paddle.seed(0)
    model = KeepsInputs()
    model.eval()
    wrapper = Wrapper(model)
    paddle.jit.to_static(wrapper, input_spec=[paddle.static.InputSpec([1, 3, 8, 8], "float32", "x")],
                         full_graph=True).forward.concrete_program
    assert isinstance(model.inputs["image"], paddle.pir.Value)
    model64 = float64_copy(model)
    x = paddle.to_tensor(np.random.RandomState(0).uniform(-1, 1, (1, 3, 8, 8)).astype("float32"))
    with paddle.no_grad():
        want, got = model(x).numpy(), model64(x.astype("float64")).numpy()
    assert got.dtype == np.float64
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_rounding_check_fails_on_nan():
    truth = {"scores": np.linspace(0, 1, 10)}
    original = {"scores": truth["scores"] + 1e-6}
    assert not rounding_check(original, {"scores": np.full(10, np.nan)}, truth).ok


def test_benchmark_parity_judges_by_tolerance_then_by_float64():
    rng = np.random.default_rng(1)
    size = [640, 640]
    boxes = rng.uniform(0, 640, (1, 100, 4))
    scores = rng.uniform(0, 1, (1, 80, 100))
    exact = [boxes, scores]
    fp32 = [boxes + 0.5, scores + 1e-3]  # an ill-conditioned model's own fp32 error
    reference = Reference([a.astype(np.float32) for a in fp32], exact)
    ok, text = parity(reference, [fp32[0] + 0.001, fp32[1] + 1e-6], size, with_nms=False)
    assert ok and text.startswith("same (")
    ok, text = parity(reference, [boxes - 0.4, scores - 1e-3], size, with_nms=False)
    assert ok and text.startswith("same within fp32 rounding")
    ok, text = parity(reference, [boxes + 3.0, scores], size, with_nms=False)
    assert not ok and text.startswith("differ:")


def test_benchmark_bf16_cells_are_judged_by_mean_error():
    """bf16 drift (mean |error| 1 px, 1e-3) passes the stated bf16 criterion, fp32's would not; a broken bf16
    run (mean 10 px, or NaN) fails it."""
    rng = np.random.default_rng(2)
    size = [640, 640]
    boxes = rng.uniform(0, 640, (1, 100, 4)).astype(np.float32)
    scores = rng.uniform(0, 1, (1, 80, 100)).astype(np.float32)
    reference = Reference([boxes, scores], [boxes.astype(np.float64), scores.astype(np.float64)])
    drift = [boxes + rng.normal(0, 1.25, boxes.shape), scores + rng.normal(0, 1.25e-3, scores.shape)]
    assert not parity(reference, drift, size, with_nms=False)[0]
    ok, text = parity(reference, drift, size, with_nms=False, precision="bf16")
    assert ok and text.startswith("bf16 drift: box mean 1 px"), text
    ok, text = parity(reference, [boxes + 10.0, scores], size, with_nms=False, precision="bf16")
    assert not ok and text.startswith("differ: bf16 drift: box mean 10 px"), text
    ok, _ = parity(reference, [boxes, np.full_like(scores, np.nan)], size, with_nms=False, precision="bf16")
    assert not ok


def test_benchmark_bf16_beyond_the_limit_passes_only_within_the_unconverted_paths_own_drift():
    """A head that amplifies bf16 rounding beyond the fixed limit before any conversion: the converted cell
    passes when its mean drift is within BF16_OF_BASELINE of the ppdet path's in the same runtime, not beyond."""
    from ppfuse.measure.benchmark import BF16_OF_BASELINE, low_precision_errors
    rng = np.random.default_rng(4)
    size = [640, 640]
    boxes = rng.uniform(0, 640, (1, 100, 4)).astype(np.float32)
    scores = rng.uniform(0, 1, (1, 80, 100)).astype(np.float32)
    reference = Reference([boxes, scores], [boxes.astype(np.float64), scores.astype(np.float64)])
    unconverted = [boxes, scores + rng.normal(0, 0.02, scores.shape)]  # score drift 4x the fixed 0.005
    baseline = {k: float(e.mean()) for k, e in low_precision_errors(reference, unconverted, size).items()}
    assert 0.012 < baseline["scores"] < 0.02 and baseline["boxes_over_size"] == 0.0
    assert not parity(reference, unconverted, size, with_nms=False, precision="bf16")[0]
    close = [boxes, scores + rng.normal(0, 0.024, scores.shape)]  # 1.2x the baseline's drift
    ok, text = parity(reference, close, size, with_nms=False, precision="bf16", baseline=baseline)
    assert ok and "the ppdet path's own bf16 drift" in text, text
    far = [boxes, scores + rng.normal(0, 0.02 * BF16_OF_BASELINE * 1.4, scores.shape)]
    ok, text = parity(reference, far, size, with_nms=False, precision="bf16", baseline=baseline)
    assert not ok and text.startswith("differ:"), text
    ok, _ = parity(reference, [boxes + 10.0, scores], size, with_nms=False, precision="bf16", baseline=baseline)
    assert not ok  # the box error is beyond both the limit and the baseline's (zero) box drift


def test_benchmark_detections_pair_in_any_order_and_fail_on_a_moved_box():
    """Runtimes list one class's detections in different orders; the pairing is one to one."""
    rng = np.random.default_rng(5)
    bbox = np.concatenate([rng.integers(0, 3, (6, 1)), rng.uniform(0.3, 1, (6, 1)),
                           rng.uniform(0, 300, (6, 4))], axis=1).astype(np.float32)
    num = np.array([4, 2], np.int32)
    reference = Reference([bbox, num], None)
    shuffled = np.concatenate([bbox[:4][[2, 0, 3, 1]], bbox[4:][[1, 0]]])
    ok, text = parity(reference, [shuffled, num], [320, 320], with_nms=True)
    assert ok and text.startswith("same detections"), text
    moved = shuffled.copy()
    moved[1, 3] += 2.0
    ok, text = parity(reference, [moved, num], [320, 320], with_nms=True)
    assert not ok and "no counterpart" in text, text
    across = np.concatenate([bbox[:3], bbox[4:5], bbox[3:4], bbox[5:]])  # a row moved to the other image
    assert not parity(reference, [across, num], [320, 320], with_nms=True)[0]


def test_benchmark_int8_cells_show_their_drift_and_fail_only_when_broken():
    """int8 of random weights is not judged by a tolerance (its drift is printed); NaN still fails."""
    rng = np.random.default_rng(3)
    size = [320, 320]
    boxes = rng.uniform(0, 320, (1, 50, 4)).astype(np.float32)
    scores = rng.uniform(0, 1, (1, 80, 50)).astype(np.float32)
    reference = Reference([boxes, scores], [boxes.astype(np.float64), scores.astype(np.float64)])
    ok, text = parity(reference, [boxes + 10.0, scores], size, with_nms=False, precision="int8")
    assert ok and text.startswith("int8 drift: box mean 10 px") and "not judged" in text, text
    ok, text = parity(reference, [boxes, np.full_like(scores, np.nan)], size, with_nms=False, precision="int8")
    assert not ok and text.startswith("differ: int8 drift"), text


def test_benchmark_rounds_rotate_so_every_cell_leads_once():
    from ppfuse.measure.benchmark import rotated
    orders = [rotated(4, r) for r in range(4)]
    assert orders[1] == [1, 2, 3, 0] and orders[4 % 4] == [0, 1, 2, 3]
    assert all(sorted(order) == [0, 1, 2, 3] for order in orders)  # each round runs every cell once
    assert sorted(order[0] for order in orders) == [0, 1, 2, 3]  # and each cell is first in one round
    assert rotated(0, 5) == []


def test_benchmark_settles_between_runtimes_but_not_between_paddle_predictors():
    from ppfuse.measure.benchmark import needs_settle
    assert not needs_settle(None, "openvino")  # the first run
    assert not needs_settle("paddle", "paddle")  # one OpenMP pool
    assert needs_settle("paddle", "onnxruntime") and needs_settle("onnxruntime", "paddle")
    assert needs_settle("openvino", "openvino") and needs_settle("onnxruntime", "onnxruntime")  # own pools
