"""ppdet's post-processing ops replaced by PIR-traceable ones (ppfuse.ppdet.postprocess).

Each replacement is compared with ppdet's original in dygraph on random inputs (the same Paddle
kernel runs in both, so the numbers agree to the last bit; the stated tolerances are the contract);
each is traced by ``paddle.jit.to_static(full_graph=True)`` through ``ppdet.modeling.ops.<name>``
(as ppdet's layers call it), saved, run in Paddle Inference and compared with dygraph; ppdet's
functions are back after the context, also after an exception inside it.
"""
import os
import re

import numpy as np
import paddle
import pytest

from ppfuse.ppdet import postprocess as ppdet_postprocess
from ppfuse.errors import ExportError
from ppfuse.ppdet.postprocess import pir_traceable_postprocess

ops = pytest.importorskip("ppdet.modeling.ops")

# the replacement runs ppdet's kernel through another API: identical, up to nothing
DYGRAPH_ATOL = 0.0
# Paddle Inference runs the same CPU kernels on the same fp32 inputs
INFERENCE_ATOL = 1e-5


def random_boxes(rng, shape, extent=100.0):
    """``[..., 4]`` boxes ``x1 < x2``, ``y1 < y2`` inside ``[0, 1.3 * extent]``."""
    corner = rng.uniform(0, extent, shape + (2,))
    size = rng.uniform(1, extent / 3, shape + (2,))
    return np.concatenate([corner, corner + size], -1).astype("float32")


def distinct_scores(rng, shape):
    """Scores in (0, 1) without ties, so NMS has one right answer."""
    flat = (rng.permutation(int(np.prod(shape))) + 1) / (np.prod(shape) + 1)
    return flat.reshape(shape).astype("float32")


def assert_same(actual, expected, atol):
    assert (actual is None) == (expected is None)
    if expected is None:
        return
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.shape == expected.shape
    np.testing.assert_allclose(actual, expected, rtol=0, atol=atol)


def numpy(values):
    return [None if v is None else v.numpy() for v in values]


# --- the same numbers as ppdet's functions, in dygraph ------------------------------------------------------

NMS_CASES = [
    dict(score_threshold=0.05, nms_top_k=40, keep_top_k=30, nms_threshold=0.5, normalized=False),
    dict(score_threshold=0.3, nms_top_k=-1, keep_top_k=-1, nms_threshold=0.3, normalized=True,
         background_label=0, return_index=True),
    dict(score_threshold=0.05, nms_top_k=10, keep_top_k=5, nms_threshold=0.7, normalized=False, nms_eta=0.9,
         return_rois_num=False),
]


def nms_against_ppdet(name, seed, classes, **kwargs):
    """ppfuse's and ppdet's ``name`` on the same random boxes and distinct scores: (ppfuse's, ppdet's)."""
    rng = np.random.RandomState(seed)
    bboxes = paddle.to_tensor(random_boxes(rng, (2, 60)))
    scores = paddle.to_tensor(distinct_scores(rng, (2, classes, 60)))
    return getattr(ppdet_postprocess, name)(bboxes, scores, **kwargs), getattr(ops, name)(bboxes, scores, **kwargs)


@pytest.mark.parametrize("kwargs", NMS_CASES)
def test_multiclass_nms_equals_ppdet(kwargs):
    actual, expected = nms_against_ppdet("multiclass_nms", 0, 5, **kwargs)
    assert len(actual) == 3
    for a, e in zip(numpy(actual), numpy(expected)):
        assert_same(a, e, DYGRAPH_ATOL)


def test_multiclass_nms_with_rois_num_equals_ppdet():
    # the RCNN form: boxes per class [M, C, 4], scores [M, C], images told by rois_num
    rng = np.random.RandomState(1)
    bboxes = paddle.to_tensor(random_boxes(rng, (30, 3)))
    scores = paddle.to_tensor(distinct_scores(rng, (30, 3)))
    rois_num = paddle.to_tensor(np.array([12, 18], "int32"))
    kwargs = dict(score_threshold=0.1, nms_top_k=-1, keep_top_k=20, nms_threshold=0.5, normalized=False,
                  rois_num=rois_num, return_index=True)
    expected = ops.multiclass_nms(bboxes, scores, **kwargs)
    actual = ppdet_postprocess.multiclass_nms(bboxes, scores, **kwargs)
    for a, e in zip(numpy(actual), numpy(expected)):
        assert_same(a, e, DYGRAPH_ATOL)


MATRIX_NMS_CASES = [
    dict(score_threshold=0.05, post_threshold=0.05, nms_top_k=40, keep_top_k=30, normalized=False),
    dict(score_threshold=0.01, post_threshold=0.1, nms_top_k=-1, keep_top_k=100, use_gaussian=True,
         gaussian_sigma=2.0, background_label=-1, normalized=True, return_index=True),
    dict(score_threshold=0.2, post_threshold=0.2, nms_top_k=20, keep_top_k=-1, background_label=1,
         return_rois_num=False),
]


@pytest.mark.parametrize("kwargs", MATRIX_NMS_CASES)
def test_matrix_nms_equals_ppdet(kwargs):
    actual, expected = nms_against_ppdet("matrix_nms", 2, 4, **kwargs)
    for a, e in zip(numpy(actual), numpy(expected)):
        assert_same(a, e, DYGRAPH_ATOL)


PRIOR_BOX_CASES = [
    # AnchorGeneratorSSD's call: one min and one max size, steps given
    dict(min_sizes=[30.0], max_sizes=[60.0], aspect_ratios=[2.0], flip=True, clip=False, steps=[8, 8]),
    dict(min_sizes=[20.0, 40.0], max_sizes=[30.0, 60.0], aspect_ratios=[2.0, 3.0], flip=True, clip=True,
         steps=[0.0, 0.0], offset=0.3, min_max_aspect_ratios_order=True),
    dict(min_sizes=24.0, max_sizes=None, aspect_ratios=1.0, variance=[0.2, 0.2, 0.1, 0.1]),
    dict(min_sizes=[16.0], max_sizes=[-1.0], aspect_ratios=[0.5], steps=(4.0, 6.0)),  # max_sizes off (<= 0)
]


@pytest.mark.parametrize("kwargs", PRIOR_BOX_CASES)
def test_prior_box_equals_ppdet(kwargs):
    feature = paddle.rand([1, 4, 5, 7])
    image = paddle.rand([1, 3, 40, 56])
    expected = ops.prior_box(feature, image, **kwargs)
    actual = ppdet_postprocess.prior_box(feature, image, **kwargs)
    for a, e in zip(numpy(actual), numpy(expected)):
        assert_same(a, e, DYGRAPH_ATOL)


def box_coder_inputs(rng, code_type, axis):
    priors = paddle.to_tensor(random_boxes(rng, (12,)))
    if code_type == "encode_center_size":
        target = paddle.to_tensor(random_boxes(rng, (5,)))
    else:
        target = paddle.to_tensor(rng.normal(0, 1, (12, 3, 4) if axis == 1 else (3, 12, 4)).astype("float32"))
    return priors, target


@pytest.mark.parametrize("variance", ["list", "tensor"])
@pytest.mark.parametrize("code_type,normalized,axis", [
    ("encode_center_size", True, 0), ("encode_center_size", False, 0),
    ("decode_center_size", True, 0), ("decode_center_size", False, 0),
    ("decode_center_size", False, 1)])  # axis is a decode option
def test_box_coder_equals_ppdet(code_type, variance, normalized, axis):
    rng = np.random.RandomState(3)
    priors, target = box_coder_inputs(rng, code_type, axis)
    var = ([0.1, 0.1, 0.2, 0.2] if variance == "list"
           else paddle.to_tensor(rng.uniform(0.1, 0.3, (12, 4)).astype("float32")))
    expected = ops.box_coder(priors, var, target, code_type, normalized, axis)
    actual = ppdet_postprocess.box_coder(priors, var, target, code_type, normalized, axis)
    assert_same(actual.numpy(), expected.numpy(), DYGRAPH_ATOL)


def test_unsupported_arguments_are_clear_errors():
    priors = paddle.rand([4, 4])
    with pytest.raises(ExportError, match="code_type='decode_corner'"):
        ppdet_postprocess.box_coder(priors, [0.1] * 4, priors, "decode_corner")
    with pytest.raises(ExportError, match="prior_box_var"):
        ppdet_postprocess.box_coder(priors, [0.1, 0.2], priors, "encode_center_size")
    with pytest.raises(ExportError, match="steps"):
        ppdet_postprocess.prior_box(paddle.rand([1, 2, 3, 3]), paddle.rand([1, 3, 9, 9]), [4.0], steps=[8.0])


# --- traced with full_graph=True, run in Paddle Inference -------------------------------------------------------

class PostProcess(paddle.nn.Layer):
    """Every replaced op, called as ppdet's layers call them (``ops.<name>``), on traced inputs."""

    def forward(self, feature, image, deltas, bboxes, scores):
        priors, variances = ops.prior_box(feature, image, min_sizes=[8.0], max_sizes=[16.0], aspect_ratios=[2.0],
                                          flip=True, clip=True, steps=[8.0, 8.0])
        priors = priors.reshape([-1, 4])
        decoded = ops.box_coder(priors, [0.1, 0.1, 0.2, 0.2], deltas, code_type="decode_center_size",
                                box_normalized=True)
        decoded_var = ops.box_coder(priors, variances.reshape([-1, 4]), deltas, code_type="decode_center_size",
                                    box_normalized=True)
        nms, nms_num, nms_index = ops.multiclass_nms(bboxes, scores, 0.05, 40, 30, 0.5, False, 1.0, -1,
                                                     return_index=True)
        matrix, matrix_num, _ = ops.matrix_nms(bboxes, scores, 0.05, 0.05, 40, 30, use_gaussian=True,
                                               gaussian_sigma=2.0, background_label=-1, normalized=False)
        return priors, decoded, decoded_var, nms, nms_num, nms_index, matrix, matrix_num


def post_process_inputs():
    rng = np.random.RandomState(4)
    priors_per_image = 4 * 4 * 4  # 4x4 feature, 4 priors per position (1, 2, 1/2, max)
    return {"feature": rng.normal(0, 1, (1, 2, 4, 4)).astype("float32"),
            "image": rng.normal(0, 1, (1, 3, 32, 32)).astype("float32"),
            "deltas": rng.normal(0, 1, (2, priors_per_image, 4)).astype("float32"),
            "bboxes": random_boxes(rng, (2, 50)),
            "scores": distinct_scores(rng, (2, 3, 50))}


def input_spec():
    return [paddle.static.InputSpec([1, 2, 4, 4], "float32", "feature"),
            paddle.static.InputSpec([1, 3, 32, 32], "float32", "image"),
            paddle.static.InputSpec([None, 64, 4], "float32", "deltas"),
            paddle.static.InputSpec([None, 50, 4], "float32", "bboxes"),
            paddle.static.InputSpec([None, 3, 50], "float32", "scores")]


def run_inference(prefix, feeds):
    config = paddle.inference.Config(prefix + ".json", prefix + ".pdiparams")
    config.disable_gpu()
    config.disable_glog_info()
    predictor = paddle.inference.create_predictor(config)
    for name in predictor.get_input_names():
        predictor.get_input_handle(name).copy_from_cpu(feeds[name])
    predictor.run()
    return [predictor.get_output_handle(n).copy_to_cpu() for n in predictor.get_output_names()]


def test_traced_and_saved_program_equals_dygraph(tmp_path):
    feeds = post_process_inputs()
    layer = PostProcess()
    with pir_traceable_postprocess():
        expected = numpy(layer(*[paddle.to_tensor(v) for v in feeds.values()]))
        static = paddle.jit.to_static(layer, input_spec=input_spec(), full_graph=True)
        traced = numpy(static(*[paddle.to_tensor(v) for v in feeds.values()]))
        prefix = str(tmp_path / "model")
        paddle.jit.save(static, prefix)
    assert os.path.exists(prefix + ".json"), "a PIR program (model.json)"
    with open(prefix + ".json") as f:
        program_ops = set(re.findall(r'"#":"\d+\.(\w+)"', f.read()))  # op names as the PIR json writes them
    assert {"prior_box", "box_coder", "multiclass_nms3", "matrix_nms"} <= program_ops
    assert expected[4].sum() > 0 and expected[7].sum() > 0, "the inputs must leave detections to compare"
    for a, e in zip(traced, expected):
        assert_same(a, e, INFERENCE_ATOL)
    for a, e in zip(run_inference(prefix, feeds), expected):
        assert_same(a, e, INFERENCE_ATOL)


def test_ppdet_original_does_not_trace():
    # why the module exists: if a Paddle or ppdet release makes ppdet's own op traceable, this says so
    class NMS(paddle.nn.Layer):
        def forward(self, bboxes, scores):
            return ops.multiclass_nms(bboxes, scores, 0.05, 40, 30, 0.5, False)[:2]

    spec = [paddle.static.InputSpec([None, 50, 4], "float32", "bboxes"),
            paddle.static.InputSpec([None, 3, 50], "float32", "scores")]
    static = paddle.jit.to_static(NMS(), input_spec=spec, full_graph=True)
    # ppdet's LayerHelper path appends an old-IR op, which refuses PIR values
    with pytest.raises(TypeError, match="multiclass_nms3"):
        static.forward.concrete_program  # noqa: B018  (building the program is what fails)


# --- the context restores ppdet's functions -------------------------------------------------------------------

def test_context_replaces_then_restores():
    originals = {name: getattr(ops, name) for name in ppdet_postprocess.REPLACEMENTS}
    with pir_traceable_postprocess() as yielded:
        assert yielded == originals
        for name, function in ppdet_postprocess.REPLACEMENTS.items():
            assert getattr(ops, name) is function
            assert getattr(ops, name) is not originals[name]
    for name, function in originals.items():
        assert getattr(ops, name) is function


def test_context_restores_after_an_exception():
    originals = {name: getattr(ops, name) for name in ppdet_postprocess.REPLACEMENTS}
    with pytest.raises(RuntimeError, match="inside"):
        with pir_traceable_postprocess():
            raise RuntimeError("inside")
    for name, function in originals.items():
        assert getattr(ops, name) is function


def test_nested_contexts_restore_the_originals():
    originals = {name: getattr(ops, name) for name in ppdet_postprocess.REPLACEMENTS}
    with pir_traceable_postprocess():
        with pir_traceable_postprocess():
            pass
        assert ops.multiclass_nms is ppdet_postprocess.multiclass_nms
    for name, function in originals.items():
        assert getattr(ops, name) is function


def test_nms_inputs_with_stop_keeps_the_inputs_and_runs_no_nms():
    """``nms_inputs(store, stop=True)`` (the float64 reference of the export's ONNX check): the boxes and scores
    reach the store as given, NMS is not run (NMSReached instead), and ppdet's functions come back."""
    rng = np.random.RandomState(0)
    bboxes = paddle.to_tensor(random_boxes(rng, (1, 30)))
    scores = paddle.to_tensor(distinct_scores(rng, (1, 3, 30)))
    originals = {name: getattr(ops, name) for name in ("multiclass_nms", "matrix_nms")}
    for name in originals:
        store = []
        with pir_traceable_postprocess(), ppdet_postprocess.nms_inputs(store, stop=True):
            with pytest.raises(ppdet_postprocess.NMSReached):
                getattr(ops, name)(bboxes, scores, 0.05, 0.05, 10, 10) if name == "matrix_nms" else \
                    getattr(ops, name)(bboxes, scores, 0.05, 10, 10)
        assert len(store) == 1
        assert_same(store[0][0].numpy(), bboxes.numpy(), 0.0)
        assert_same(store[0][1].numpy(), scores.numpy(), 0.0)
    for name, function in originals.items():
        assert getattr(ops, name) is function
