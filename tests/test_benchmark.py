"""The benchmark's output checks for detector families other than PP-YOLOE (``ppfuse/measure/benchmark.py``).

Their raw outputs are a head's, of any scale: each is judged relative to its own largest magnitude, by the
export's criterion (atol/rtol 1e-4 of scale, beyond it the float64 check), so an error that is small for one
output and large for another is told apart. bf16: mean error per output within
``BF16_MEAN_ERROR_OF_SCALE`` of its scale; int8 is shown, not judged; detections are compared only when the
outputs are detections. PP-YOLOE's own cases are in ``tests/test_verify.py``.
"""
import os

import numpy as np
import pytest

from conftest import ROOT
from ppfuse.measure.benchmark import BF16_MEAN_ERROR_OF_SCALE, Reference, parity

SIZE = [320, 320]


def head_outputs(rng):
    """Two outputs of very different scales, as a head gives them: logits of order 100, offsets of order 1e-3."""
    return {"head.0": rng.normal(0, 30, (1, 80, 50)), "head.1": rng.uniform(-1e-3, 1e-3, (1, 50, 4))}


def as_reference(truth, fp32, **kw):
    names = list(truth)
    return Reference([fp32[n].astype(np.float32) for n in names], [truth[n] for n in names], names, **kw)


def test_raw_outputs_are_judged_each_relative_to_its_own_scale():
    rng = np.random.default_rng(0)
    truth = head_outputs(rng)
    reference = as_reference(truth, truth)
    small = 1e-5  # 1e-7 of head.0's scale, 1% of head.1's
    ok, text = parity(reference, [truth["head.0"] + small, truth["head.1"]], SIZE, with_nms=False)
    assert ok and text.startswith("same (max diff"), text
    ok, text = parity(reference, [truth["head.0"], truth["head.1"] + small], SIZE, with_nms=False)
    assert not ok and text.startswith("differ:") and "head.1" in text, text


def test_raw_outputs_beyond_tolerance_pass_by_the_float64_criterion_only_within_rounding():
    """An ill-conditioned model's own fp32 error exceeds the fixed tolerance: a candidate as far from float64
    as the training form passes, one five times as far fails."""
    rng = np.random.default_rng(1)
    truth = head_outputs(rng)
    scale = {n: np.abs(v).max() for n, v in truth.items()}
    noise = lambda factor: {n: v + factor * 1e-3 * scale[n] * rng.standard_normal(v.shape)  # noqa: E731
                            for n, v in truth.items()}
    reference = as_reference(truth, noise(1))
    ok, text = parity(reference, list(noise(1).values()), SIZE, with_nms=False)
    assert ok and text.startswith("same within fp32 rounding"), text
    ok, text = parity(reference, list(noise(5).values()), SIZE, with_nms=False)
    assert not ok and text.startswith("differ:") and "from float64" in text, text


def test_raw_outputs_of_another_shape_or_count_differ():
    rng = np.random.default_rng(2)
    truth = head_outputs(rng)
    reference = as_reference(truth, truth)
    ok, text = parity(reference, [truth["head.0"]], SIZE, with_nms=False)
    assert not ok and text.startswith("different outputs"), text
    ok, text = parity(reference, [truth["head.0"][:, :40], truth["head.1"]], SIZE, with_nms=False)
    assert not ok and text.startswith("different outputs"), text


def test_raw_bf16_is_judged_by_mean_error_of_each_outputs_scale_and_int8_not_at_all():
    rng = np.random.default_rng(3)
    truth = head_outputs(rng)
    reference = as_reference(truth, truth)
    scale = {n: np.abs(v).max() for n, v in truth.items()}

    def drift(mean_of_scale):  # |N(0, s)| has mean s * sqrt(2 / pi)
        return [v + rng.normal(0, mean_of_scale * scale[n] / np.sqrt(2 / np.pi), v.shape) for n, v in truth.items()]
    ok, text = parity(reference, drift(BF16_MEAN_ERROR_OF_SCALE / 2), SIZE, with_nms=False, precision="bf16")
    assert ok and text.startswith("bf16 drift, of each output's scale: head.0 mean"), text
    assert not parity(reference, drift(BF16_MEAN_ERROR_OF_SCALE / 2), SIZE, with_nms=False)[0]  # not fp32
    ok, text = parity(reference, drift(BF16_MEAN_ERROR_OF_SCALE * 2), SIZE, with_nms=False, precision="bf16")
    assert not ok and text.startswith("differ: bf16 drift"), text
    broken = [truth["head.0"], np.full_like(truth["head.1"], np.nan)]
    assert not parity(reference, broken, SIZE, with_nms=False, precision="bf16")[0]
    ok, text = parity(reference, drift(0.3), SIZE, with_nms=False, precision="int8")
    assert ok and "not judged" in text, text
    assert not parity(reference, broken, SIZE, with_nms=False, precision="int8")[0]


def test_detections_are_compared_when_they_are_detections_and_said_not_compared_otherwise():
    rng = np.random.default_rng(4)
    bbox = np.concatenate([rng.integers(0, 80, (10, 1)), rng.uniform(0, 1, (10, 1)),
                           rng.uniform(0, 320, (10, 4))], axis=1).astype(np.float32)
    num = np.array([10], np.int32)
    reference = Reference([bbox, num])
    ok, text = parity(reference, [bbox + np.float32(1e-3) * (np.arange(6) >= 2), num], SIZE, with_nms=True)
    assert ok and text.startswith("same"), text
    moved = bbox.copy()
    moved[3, 2] += 1.0  # one corner 1 px away: beyond 1e-4 of the input size
    ok, text = parity(reference, [moved, num], SIZE, with_nms=True)
    assert not ok and text.startswith("differ"), text
    heatmap = Reference([rng.uniform(0, 1, (1, 80, 8, 8)), rng.uniform(0, 1, (1, 2, 8, 8))])
    ok, text = parity(heatmap, list(heatmap.outputs), SIZE, with_nms=True)
    assert ok and text.startswith("not compared"), text


@pytest.mark.slow
@pytest.mark.ppdet
def test_benchmark_of_a_family_other_than_ppyoloe_runs_and_compares_its_head_outputs(tmp_path):
    """PicoDet end to end, one timed run: every variant exported (the ppdet path and the train form too), every
    fp32 Paddle Inference cell's head outputs equal to the dygraph training form's by the export's criterion."""
    from ppfuse.measure import benchmark
    from ppfuse.ppdet import detection
    config = detection.load_config(os.path.join(ROOT, "configs/picodet/picodet_s_320_coco_lcnet.yml"))
    result = benchmark.run_benchmark(config, str(tmp_path), runs=1, warmup=0, batches=(1,), memory=False,
                                     root=ROOT, log=lambda line: None, throughput_batches=())
    assert all(v.error is None for v in result.variants.values()), result.variants
    assert not result.with_nms and not result.ppyoloe
    fp32 = [m for m in result.measurements if m.runtime in (benchmark.BASE_RUNTIME, "Paddle Inference no oneDNN fp32")]
    assert len(fp32) == 6 and all(m.times and m.parity.startswith("same") for m in fp32), \
        [(m.variant, m.runtime, m.parity, m.error) for m in fp32]
    assert "before post-processing" in benchmark.markdown(result, 1e9, "nominal")
