"""Every PaddleDetection detector family shipped in configs/: converted with no BatchNorm left, every fold
confirmed by a trace, the deployed model verified against the training form (random weights, randomized
BatchNorm statistics, 192x192). The slow test exports each and runs it in Paddle Inference
(``pytest -m slow tests/test_families.py``, 2.2 minutes on 2 cores).

And the pieces that made the families export: interpolation and leaky_relu in forms oneDNN runs, inputs a
detector does not use, preprocessing ops, ppdet's own dataset files, ppdet's forward failing.
"""
import os

import numpy as np
import paddle
import paddle.nn.functional as F
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from ppfuse.measure import coverage

from ppfuse.ppdet import detection, detectors, export

from ppfuse.deploy import forms, inference, program
from ppfuse.errors import ModelError

SIZE = 192  # (at 160 SSDLite's last 1x1 maps make random weights ill-conditioned beyond the float64 criterion)
ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))


def _config(path, size=SIZE):
    return detection.load_config(os.path.join(ROOT, path), coverage.size_overrides(size) + ["weights="])


@pytest.mark.parametrize("path", coverage.FAMILY_CONFIGS, ids=lambda p: os.path.basename(p)[:-4])
def test_family_converts_and_verifies(path):
    config = _config(path)
    built = detection.build_model(config, deploy=True, check=False)
    report = built.conversion
    before = sum(1 for layer in built.training_model.sublayers() if detection.layers.is_batch_norm(layer))
    assert before > 0
    assert report.remaining_batch_norms == {}, report.summary()
    assert report.batch_norms_folded == before
    assert report.confirmed_by_trace, report.summary()
    assert not any(detection.layers.is_batch_norm(layer) for layer in built.model.sublayers())
    result = export.verify_deployed(built.training_model, built.model, config.input_size())
    assert result.ok, result.summary()


@pytest.mark.slow
@pytest.mark.parametrize("path", coverage.FAMILY_CONFIGS, ids=lambda p: os.path.basename(p)[:-4])
def test_family_exports_and_runs_in_paddle_inference(path, tmp_path):
    row = coverage.cover(os.path.join(ROOT, path), coverage.size_overrides(192), str(tmp_path), rounds=0,
                         log=lambda line: None)
    assert not row.failed_step, f"{row.failed_step}: {row.error}"
    assert row.exported and row.paddle_inference_ok
    assert row.bn_left == 0 and row.bn_in_program == 0
    assert row.detections is not None and row.detections >= 0


# --------------------------------------------------------------------------------- rewrites for oneDNN
@pytest.mark.parametrize("factor", [2, 3, 4, 8])
@pytest.mark.parametrize("shape", [(2, 3, 5, 7), (1, 4, 1, 1), (1, 2, 6, 2)])
@pytest.mark.parametrize("by_size", [False, True])
def test_bilinear_by_an_integer_rewrite_matches_interpolate(shape, factor, by_size, monkeypatch):
    """Slices and weighted sums (no gather, no interp op), given as a factor or as a size that is one
    (PP-YOLOE-Seg's masks: 4x): Paddle's kernel up to fp32 rounding of its source positions."""
    x = paddle.to_tensor(np.random.RandomState(factor).normal(size=shape).astype("float32"))
    kwargs = dict(size=[shape[2] * factor, shape[3] * factor]) if by_size else dict(scale_factor=float(factor))
    expected = F.interpolate(x, mode="bilinear", **kwargs).numpy()

    def refuse(*args, **more):
        raise AssertionError("the resize fell back to the gather form or the interp op")
    monkeypatch.setattr(forms, "_interpolate_by_gather", refuse)
    monkeypatch.setattr(forms, "_INTERPOLATE", refuse)
    got = forms.nearest_upsample(x, mode="bilinear", **kwargs).numpy()
    assert got.shape == expected.shape
    # weights like 1/3 are rounded: fp32 rounding relative to the values' magnitude
    np.testing.assert_allclose(got, expected, atol=1e-6 * float(np.abs(x.numpy()).max()), rtol=0)


@pytest.mark.parametrize("kwargs", [
    dict(size=[8, 9], mode="nearest"), dict(size=[3, 4], mode="nearest"), dict(size="tensor", mode="nearest"),
    dict(scale_factor=2, mode="bilinear", align_corners=True), dict(size=[8, 11], mode="bilinear", align_corners=True),
    dict(size=[8, 11], mode="bilinear"), dict(scale_factor=1.5, mode="bilinear"),
    dict(size=[9, 3], mode="bilinear", align_mode=1),
    # a x2 with align_corners
    dict(size=[10, 14], mode="bilinear", align_corners=True)], ids=str)
def test_any_nearest_or_bilinear_resize_is_rewritten_to_match_interpolate(kwargs):
    """Sizes that are no integer multiple, sizes given as a tensor (BlazeFace's FPN), align_corners (CenterNet's
    DLA neck): gathers and weighted sums, equal to Paddle's op (nearest exactly)."""
    rng = np.random.RandomState(0)
    x = paddle.to_tensor(rng.normal(size=(1, 3, 5, 7)).astype("float32"))
    kwargs = dict(kwargs)
    if kwargs.get("size") == "tensor":
        kwargs["size"] = paddle.shape(paddle.zeros([1, 1, 10, 13]))[-2:]
    expected = F.interpolate(x, **kwargs).numpy()
    got = forms.nearest_upsample(x, **kwargs).numpy()
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, atol=1e-6 if kwargs["mode"] == "bilinear" else 0, rtol=0)


def test_tracing_leaves_the_model_without_traced_values():
    """ppdet's BaseArch keeps ``self.inputs`` from each forward; after a trace it must not hold the program's
    values (a copy of the converted model, e.g. the float64 reference, would fail)."""
    import copy

    config = _config("configs/yolox/yolox_s_300e_coco.yml", 128)
    built = detection.build_model(config, deploy=True, check=False)
    for layer in [built.model] + built.model.sublayers():
        for value in vars(layer).values():
            items = value.values() if isinstance(value, dict) else value if isinstance(value, (list, tuple)) else [value]
            assert not any(isinstance(item, paddle.pir.Value) for item in items)
    copy.deepcopy(built.model)


@pytest.mark.parametrize("channels,factor", [(3, 2), (32, 2), (48, 3), (20, 4)])
def test_nearest_upsample_as_transposed_conv_is_bit_exact(channels, factor):
    """Groups of 16 channels where they divide C, one group otherwise; every factor: equal to Paddle's op."""
    x = paddle.to_tensor(np.random.RandomState(channels).normal(size=(2, channels, 5, 6)).astype("float32"))
    np.testing.assert_array_equal(forms.upsample_by_deconv(x, factor).numpy(),
                                  F.interpolate(x, scale_factor=factor, mode="nearest").numpy())
    kernel = forms.upsample_kernel(channels, factor)
    group = 16 if channels % 16 == 0 else channels
    assert kernel.shape == (channels, group, factor, factor)
    assert kernel.sum() == channels * factor * factor  # one 1 per output channel and tap, the rest zeros


def test_nearest_rewrite_is_exact_for_scale_and_size():
    x = paddle.to_tensor(np.random.RandomState(1).normal(size=(2, 3, 4, 5)).astype("float32"))
    by_scale = F.interpolate(x, scale_factor=2, mode="nearest").numpy()
    np.testing.assert_array_equal(forms.nearest_upsample(x, scale_factor=2, mode="nearest").numpy(), by_scale)
    np.testing.assert_array_equal(forms.nearest_upsample(x, size=[8, 10], mode="nearest").numpy(), by_scale)
    # nn.Upsample passes recompute_scale_factor=None: still rewritten, still exact
    np.testing.assert_array_equal(forms.nearest_upsample(x, scale_factor=3, mode="nearest",
                                                          recompute_scale_factor=None).numpy(),
                                  F.interpolate(x, scale_factor=3, mode="nearest").numpy())
    # a size that is no integer multiple goes to Paddle's own op
    odd = forms.nearest_upsample(x, size=[6, 7], mode="nearest").numpy()
    np.testing.assert_array_equal(odd, F.interpolate(x, size=[6, 7], mode="nearest").numpy())


def test_rewrites_are_in_force_only_inside_deploy_rewrites():
    original = F.interpolate, F.leaky_relu
    with export.deploy_rewrites():
        assert F.interpolate is forms.nearest_upsample and F.leaky_relu is forms.leaky_relu_as_maximum
        assert paddle.nn.Upsample(scale_factor=2)(paddle.ones([1, 1, 2, 2])).shape == [1, 1, 4, 4]
    assert (F.interpolate, F.leaky_relu) == original


@pytest.mark.parametrize("slope", [0.1, 0.01, 0.0, 1.0])
def test_leaky_relu_as_maximum_is_exact(slope):
    x = paddle.to_tensor(np.random.RandomState(2).normal(size=(3, 50)).astype("float32") * 10)
    np.testing.assert_array_equal(forms.leaky_relu_as_maximum(x, slope).numpy(), F.leaky_relu(x, slope).numpy())


# --------------------------------------------------------------------------------- inputs and outputs
class _Net(paddle.nn.Layer):
    """A stand-in head: output depends on the image only."""

    def __init__(self):
        super().__init__()
        self.conv = paddle.nn.Conv2D(3, 2, 1)

    def forward(self, x):
        return self.conv(x)


def test_inputs_used_finds_the_inputs_outputs_depend_on():
    class Uses(paddle.nn.Layer):
        def __init__(self):
            super().__init__()
            self.net = _Net()

        def forward(self, image, im_shape, scale_factor):
            return self.net(image).mean() * scale_factor.sum()

    spec = [paddle.static.InputSpec([None, 3, 8, 8], "float32", "image"),
            paddle.static.InputSpec([None, 2], "float32", "im_shape"),
            paddle.static.InputSpec([None, 2], "float32", "scale_factor")]
    static = paddle.jit.to_static(Uses(), input_spec=spec, full_graph=True)
    assert program.inputs_used(static.forward.concrete_program) == ("image", "scale_factor")


def test_ppdet_failure_is_one_model_error_naming_ppdet():
    from ppdet.modeling import bbox_utils

    with pytest.raises(ModelError) as info:
        with detectors.ppdet_failures(_Net()):
            bbox_utils.bbox_area(None)  # fails inside ppdet's own code
    message = str(info.value)
    assert "ppdet" in message and "bbox_utils.py:" in message and "\n" not in message


def test_a_failure_outside_ppdet_is_not_renamed():
    with pytest.raises(ZeroDivisionError):
        with detectors.ppdet_failures(_Net()):
            1 / 0


# --------------------------------------------------------------------------------- preprocessing
def _preprocess(tmp_path, ops, size=None):
    with open(tmp_path / "infer_cfg.yml", "w") as f:
        yaml.safe_dump({"Preprocess": ops}, f)
    if size:
        with open(tmp_path / "ppfuse_report.json", "w") as f:
            f.write('{"input_size": [%d, %d]}' % tuple(size))
    return inference.Preprocess.from_infer_cfg(str(tmp_path))


def test_keep_ratio_resize_then_pad_reports_the_resized_shape(tmp_path):
    pre = _preprocess(tmp_path, [{"type": "Resize", "target_size": [64, 64], "keep_ratio": True, "interp": 1},
                                 {"type": "NormalizeImage", "mean": [0, 0, 0], "std": [1, 1, 1], "is_scale": True},
                                 {"type": "Pad", "size": [64, 64], "fill_value": [0.0, 0.0, 0.0]},
                                 {"type": "Permute"}])
    image = np.full((40, 80, 3), 255, np.uint8)
    feeds = pre(image)
    assert feeds["image"].shape == (1, 3, 64, 64)
    np.testing.assert_allclose(feeds["im_shape"], [[32, 64]])
    np.testing.assert_allclose(feeds["scale_factor"], [[0.8, 0.8]])
    assert feeds["image"][0, :, :32].min() == pytest.approx(1.0) and feeds["image"][0, :, 32:].max() == 0.0


def test_warp_affine_centres_the_fitted_image(tmp_path):
    pre = _preprocess(tmp_path, [{"type": "WarpAffine", "keep_res": True}, {"type": "Permute"}], size=[64, 64])
    image = np.zeros((32, 16, 3), np.uint8)
    image[..., 2] = 200  # red in BGR
    feeds = pre(image)
    assert feeds["image"].shape == (1, 3, 64, 64)
    np.testing.assert_allclose(feeds["im_shape"], [[32, 16]])
    # centred: rows 16..47, columns 24..39; BGR as ppdet's WarpAffine gives it
    assert feeds["image"][0, 2, 16:48, 24:40].min() == 200 and feeds["image"][0, 2, :16].max() == 0


def test_unknown_preprocess_op_is_named(tmp_path):
    with pytest.raises(inference.InferenceError, match="GridMask"):
        _preprocess(tmp_path, [{"type": "Resize", "target_size": 32}, {"type": "GridMask"}])


# --------------------------------------------------------------------------------- ppdet's config files
def test_infer_cfg_from_a_config_with_ppdet_style_test_dataset(tmp_path):
    """PaddleDetection's own dataset files write TestDataset as a plain mapping (no !ImageFolder tag)."""
    (tmp_path / "coco_detection.yml").write_text(
        "metric: COCO\nnum_classes: 80\nTestDataset:\n  name: ImageFolder\n"
        "  anno_path: annotations/instances_val2017.json\n  dataset_dir: dataset/coco\n")
    path = tmp_path / "ppdet_style.yml"
    body = open(os.path.join(ROOT, "configs/yolov3/yolov3_mobilenet_v1_270e_coco.yml")).read()
    body = body.replace("'../datasets/coco_detection.yml'", f"'{tmp_path}/coco_detection.yml'")
    for base in ("runtime.yml",):
        body = body.replace(f"'../{base}'", f"'{ROOT}/configs/{base}'")
    body = body.replace("'./_base_/", f"'{ROOT}/configs/yolov3/_base_/")
    path.write_text(body)
    config = detection.load_config(str(path), coverage.size_overrides(128) + ["weights="])
    model = detection.build_training_model(config)
    target = tmp_path / "infer_cfg.yml"
    export._infer_cfg(config, str(target), [128, 128], model)
    cfg = yaml.safe_load(target.read_text())
    assert cfg["arch"] == "YOLO" and len(cfg["label_list"]) == 80
    assert any(op["type"] == "Resize" and list(op["target_size"]) == [128, 128] for op in cfg["Preprocess"])


def test_rotated_detections_get_their_bounding_boxes():
    rows = np.array([[3, 0.9, 10, 20, 30, 15, 35, 40, 15, 45],
                     [1, 0.5, 1, 2, 3, 4, 5, 6, 7, 8]], "float32")
    (found,) = inference.split_detections(rows, np.array([2]), ["a", "b", "c", "d"])
    np.testing.assert_array_equal(found.boxes, [[10, 15, 35, 45], [1, 2, 7, 8]])
    np.testing.assert_array_equal(found.classes, [3, 1])
    np.testing.assert_allclose(found.scores, [0.9, 0.5])


@settings(max_examples=int(os.environ.get("PPFUSE_ADVERSARIAL_EXAMPLES", "60")), deadline=None)
@given(channels=st.integers(1, 70), factor=st.integers(2, 4), height=st.integers(1, 7), width=st.integers(1, 7),
       batch=st.integers(1, 2), by_size=st.booleans(), scale=st.sampled_from([1e-30, 1.0, 1e30]))
def test_generated_upsamples_equal_paddles_nearest_interp(channels, factor, height, width, batch, by_size, scale):
    """Any channel count (groups of 16 or one group), factor, shape and magnitude (tiny, huge, negative
    zero among the values): the rewrite equals Paddle's op in value (-0.0 may come out as +0.0)."""
    rng = np.random.RandomState(channels * 31 + factor)
    values = rng.normal(size=(batch, channels, height, width)) * scale
    values.flat[0] = -0.0
    x = paddle.to_tensor(values.astype("float32"))
    kwargs = {"size": [height * factor, width * factor]} if by_size else {"scale_factor": factor}
    got = forms.nearest_upsample(x, mode="nearest", **kwargs).numpy()
    np.testing.assert_array_equal(got, F.interpolate(x, scale_factor=factor, mode="nearest").numpy())
