"""PP-YOLOE+ s end to end: conversion of the whole model, export, checkpoints, Paddle Inference.

Built by ppdet from configs/ppyoloe/ppyoloe_plus_crn_s_320_test.yml with random
weights, randomized gamma/beta/alpha != 1 and BatchNorm statistics set from
generated images (activations O(1), as in a trained model). Whole-model
tolerance on the raw detector outputs (boxes in pixels of a 320x320 image,
scores in [0, 1]): boxes atol 1e-2 px, scores atol 1e-4, rtol 1e-4. Measured:
~4e-3 px and ~2e-5 -- the size of fp32 rounding: the training form itself is
~3e-3 px from a float64 evaluation, and the deployed model is no further from it.
"""
import json
import os

import numpy as np
import paddle
import pytest

from conftest import ROOT
from ppfuse.core import checkpoint, layers
from ppfuse.ppdet import detection, export
from ppfuse.deploy import forms, program
from ppfuse.runtime import RuntimeOptions, paddle_inference
from ppfuse import CheckpointError
from ppfuse import export_format
from ppfuse.ppdet import detectors

CONFIG = os.path.join(ROOT, "configs", "ppyoloe", "ppyoloe_plus_crn_s_320_test.yml")
SIZE = [320, 320]


@pytest.fixture(scope="module")
def config():
    return detection.load_config(CONFIG)


@pytest.fixture(scope="module")
def built(config):
    return detection.build_model(config, deploy=True, seed=0)


@pytest.fixture(scope="module")
def inputs():
    return detectors.sample_inputs(SIZE, batch=2, seed=5)


def raw(model, inputs):
    with paddle.no_grad():
        boxes, scores = detectors.DetectorForInference(model, with_nms=False)(*inputs)
    return boxes.numpy(), scores.numpy()


def assert_detector_close(actual, expected):
    np.testing.assert_allclose(actual[0], expected[0], atol=1e-2, rtol=1e-4)  # boxes, pixels
    np.testing.assert_allclose(actual[1], expected[1], atol=1e-4, rtol=1e-4)  # scores


def test_deployed_fp32_is_as_close_to_float64_as_the_training_form(built, inputs):
    """The conversion adds no error beyond fp32 rounding: against a float64 run of the training
    form, the deployed fp32 model deviates no more than the training-form fp32 model does."""
    truth = detection.raw_outputs_float64(built.training_model, *inputs)
    for i, name in enumerate(("boxes", "scores")):
        train_error = np.abs(raw(built.training_model, inputs)[i] - truth[i]).max()
        deploy_error = np.abs(raw(built.model, inputs)[i] - truth[i]).max()
        print(f"\n{name}: fp32 training form {train_error:.3g}, fp32 deployed {deploy_error:.3g} from float64")
        assert deploy_error <= 2 * train_error + 1e-7


def test_config_is_deploy_and_alpha_is_randomized(config, built):
    assert config.deploy and config.architecture == "PPYOLOE" and config.input_size() == SIZE
    alphas = [float(p) for n, p in built.training_model.named_parameters() if n.endswith("alpha")]
    assert alphas and all(abs(a - 1.0) > 0.1 for a in alphas)


def test_whole_model_has_no_batch_norm_and_no_branches(built):
    from ppdet.modeling.backbones.cspresnet import RepVggBlock as PPDetRepVggBlock
    model = built.model
    assert not [n for n, s in model.named_sublayers() if layers.is_batch_norm(s)]
    blocks = [s for s in model.sublayers() if isinstance(s, PPDetRepVggBlock)]
    assert blocks and all(hasattr(b, "conv") and not hasattr(b, "conv1") for b in blocks)
    report = built.conversion
    assert report.counts["ppdet.RepVggBlock"] == len(blocks) and not report.remaining_batch_norms
    training_bns = [s for s in built.training_model.sublayers() if layers.is_batch_norm(s)]
    assert report.batch_norms_folded == len(training_bns)


def test_whole_model_outputs_match_training_form(built, inputs):
    expected = raw(built.training_model, inputs)
    got = raw(built.model, inputs)
    print(f"\nPP-YOLOE+ s 320: max abs error boxes {np.abs(got[0] - expected[0]).max():.3g} px, "
          f"scores {np.abs(got[1] - expected[1]).max():.3g}")
    assert_detector_close(got, expected)
    assert np.std(expected[1]) > 1e-4, "scores are all alike: the comparison would prove little"


@pytest.fixture(scope="module")
def exported(config, tmp_path_factory):
    out = tmp_path_factory.mktemp("export")
    result = export.export(config, str(out), seed=0, log=lambda *_: None)
    raw_result = export.export(config, str(out / "raw"), seed=0, with_nms=False, log=lambda *_: None)
    return result, raw_result


def test_export_writes_every_file_and_a_clean_program(exported):
    result, _ = exported
    names = sorted(os.listdir(result.directory))
    assert names == ["infer_cfg.yml", "model.json", "model.pdiparams", "model_deploy.pdparams", "model_plain.json",
                     "ppfuse_report.json"]
    ops = result.op_counts
    assert ops.get("batch_norm", 0) == 0 and ops.get("if", 0) == 0 and ops.get("nearest_interp", 0) == 0
    assert ops["conv2d"] > 50


def test_exported_adds_of_two_activations_are_the_residuals_only(built, exported):
    """No re-param branch sum is left: the adds of two activations are exactly the residual
    shortcuts of CSPResNet's BasicBlocks and the head's ESE residual (one per level)."""
    from ppdet.modeling.backbones.cspresnet import BasicBlock
    shortcuts = sum(1 for s in built.model.sublayers() if isinstance(s, BasicBlock) and s.shortcut)
    levels = len(built.model.yolo_head.fpn_strides)
    result, _ = exported
    assert shortcuts > 0 and result.op_counts["add_tensors"] == shortcuts + levels
    assert not [n for n in os.listdir(os.path.dirname(result.directory)) if n.startswith(".ppfuse")]


def test_paddle_inference_matches_training_form_on_every_run(built, exported, inputs):
    """Default CPU settings (oneDNN on, every pass kept), run three times: a predictor can be right
    on its first run only (Paddle 3.3.1 with oneDNN and constant_folding_pass deleted is)."""
    _, raw_result = exported
    predictor = paddle_inference.create_predictor(raw_result.directory)
    feed = {"image": inputs[0].numpy(), "scale_factor": inputs[1].numpy()}
    expected = raw(built.training_model, inputs)
    for _ in range(3):
        assert_detector_close(paddle_inference.run_predictor(predictor, feed), expected)


def test_deleting_constant_folding_with_onednn_warns(exported, capfd):
    _, raw_result = exported
    paddle_inference.create_predictor(raw_result.directory, RuntimeOptions(
        delete_passes=["constant_folding_pass"]))
    err = capfd.readouterr().err
    assert "WARNING: deleting constant_folding_pass with oneDNN on" in err and "second run" in err


def test_paddle_inference_nms_detections_match_dygraph(built, exported, inputs):
    result, _ = exported
    image, scale = inputs[0][:1], inputs[1][:1]
    with paddle.no_grad():
        bbox, num = detectors.DetectorForInference(built.training_model)(image, scale)
    assert int(num.numpy().sum()) > 0, "no detections: the comparison would prove little"
    for options in (RuntimeOptions(), RuntimeOptions(onednn=False)):
        predictor = paddle_inference.create_predictor(result.directory, options)
        for _ in range(2):  # the second run too
            got_bbox, got_num = paddle_inference.run_predictor(predictor, {"image": image.numpy(), "scale_factor": scale.numpy()})
            np.testing.assert_array_equal(got_num, num.numpy())
            np.testing.assert_array_equal(got_bbox[:, 0], bbox.numpy()[:, 0])
            np.testing.assert_allclose(got_bbox[:, 1:], bbox.numpy()[:, 1:], atol=1e-3, rtol=1e-4)


def test_deploy_checkpoint_loads_with_deploy_true(config, exported, built, inputs):
    result, _ = exported
    ckpt = os.path.join(result.directory, export_format.DEPLOY_CHECKPOINT)
    loaded = detection.build_model(config, weights=ckpt, deploy=True)
    assert loaded.weights_form == "deploy" and loaded.training_model is None
    np.testing.assert_array_equal(raw(loaded.model, inputs)[1], raw(built.model, inputs)[1])
    with pytest.raises(CheckpointError, match="is a deploy checkpoint.*deploy: true"):
        detection.build_model(config, weights=ckpt, deploy=False)


def test_export_from_a_training_checkpoint(config, built, inputs, tmp_path):
    ckpt = str(tmp_path / "trained.pdparams")
    checkpoint.save_state(built.training_model, ckpt)
    config_with_weights = detection.load_config(CONFIG, [f"weights={ckpt}"])
    result = export.export(config_with_weights, str(tmp_path / "out"), log=lambda *_: None)
    assert result.built.weights_form == "train" and result.verification.ok
    assert_detector_close(raw(result.built.model, inputs), raw(built.training_model, inputs))


def test_mismatched_checkpoints_name_the_keys(config, built, tmp_path):
    state = {k: v.numpy() for k, v in built.training_model.state_dict().items()}
    key = "backbone.stem.conv1.conv.weight"
    bad_shape = dict(state)
    bad_shape[key] = np.zeros([1, 2, 3], "float32")
    missing = dict(state)
    del missing["yolo_head.pred_cls.0.bias"]
    for name, broken, pattern in (("shape", bad_shape, r"1 mis-shaped keys: backbone\.stem\.conv1\.conv\.weight "
                                                       r"\(checkpoint \[1, 2, 3\]"),
                                  ("missing", missing, r"1 missing keys: yolo_head\.pred_cls\.0\.bias")):
        path = str(tmp_path / f"{name}.pdparams")
        paddle.save(broken, path)
        with pytest.raises(CheckpointError, match=pattern):
            detection.build_model(config, weights=path)


def test_top_k_before_nms_gives_the_same_detections(built, inputs):
    """The ONNX program's per-class top-k selection is what multiclass_nms3 does itself."""
    image, scale = inputs
    with paddle.no_grad():
        plain = detectors.DetectorForInference(built.model)(image, scale)
        topk = detectors.DetectorForInference(built.model, topk_before_nms=True)(image, scale)
    np.testing.assert_array_equal(topk[1].numpy(), plain[1].numpy())
    assert plain[1].numpy().sum() > 10
    np.testing.assert_array_equal(topk[0].numpy(), plain[0].numpy())


def test_ese_mean_written_as_pooling_is_the_same_mean(built):
    """The export's ESE rewrite (oneDNN runs x.mean((2, 3)) as its slow reference reduction): the same
    numbers up to fp32 summation order, per layer, on inputs that are not all alike."""
    from ppdet.modeling.backbones.cspresnet import EffectiveSELayer
    ese_layers = [s for s in built.model.sublayers() if isinstance(s, EffectiveSELayer)]
    assert len(ese_layers) == 4
    rng = np.random.RandomState(3)
    for layer in ese_layers:
        x = paddle.to_tensor(rng.standard_normal([2, layer.fc._in_channels, 9, 7]).astype("float32") + 0.5)
        with paddle.no_grad():
            expected = layer(x).numpy()
            with export.onednn_friendly_ese():
                got = layer(x).numpy()
        np.testing.assert_allclose(got, expected, atol=1e-6, rtol=1e-5)


def test_exported_program_has_the_ese_mean_as_pooling(exported):
    _, raw_result = exported
    ops = program.count_ops(raw_result.directory)
    assert ops.get("mean", 0) == 0 and ops["pool2d"] >= 4  # 4 ESE + SPP's max pools + the head's ESE pools
    assert ops["conv2d_transpose"] == 2 and ops.get("expand", 0) == 0  # the neck's two x2 upsamples
    with open(os.path.join(raw_result.directory, export_format.REPORT_FILE)) as f:
        rewrites = json.load(f)["rewrites"]
    assert rewrites == {"nearest_upsample": forms.UPSAMPLE_FORM, "leaky_relu": "maximum(x, slope * x)",
                        "bilinear_by_integer": "slices and weighted sums",
                        "ese_mean": "adaptive_avg_pool2d", "conv_bias": "in_conv"}


def test_a_wrong_rewrite_is_refused_by_the_export_check(built, monkeypatch):
    """The rewrites are part of what the export verifies: a rewrite off by 1% fails the check."""
    monkeypatch.setattr(export, "_ese_with_pool", lambda self, x: 1.01 * x * self.act(self.fc(x.mean((2, 3),
                                                                                                   keepdim=True))))
    with pytest.raises(export.VerificationError, match="differs from the original beyond tolerance"):
        export.verify_deployed(built.training_model, built.model, SIZE)


@pytest.mark.parametrize("conv_bias", forms.CONV_BIAS_FORMS)
def test_both_conv_bias_forms_run_the_same_with_and_without_onednn(built, inputs, conv_bias, tmp_path):
    """in_conv (the default, fused by oneDNN) and channel_add (a [C, 1, 1] add, for oneDNN off at
    batch > 1) are the same function: Paddle Inference matches the training form on repeated runs."""
    export.save_inference_model(built.model, str(tmp_path / "model"), SIZE, with_nms=False, conv_bias=conv_bias)
    feed = {"image": inputs[0].numpy(), "scale_factor": inputs[1].numpy()}
    expected = raw(built.training_model, inputs)
    for onednn in (True, False):
        predictor = paddle_inference.create_predictor(str(tmp_path), RuntimeOptions(onednn=onednn))
        for _ in range(2):
            assert_detector_close(paddle_inference.run_predictor(predictor, feed), expected)


def test_an_unknown_conv_bias_form_is_refused():
    with pytest.raises(export.ExportError, match="conv_bias 'fused': use one of in_conv, channel_add"):
        with export.deploy_rewrites("fused"):
            pass
