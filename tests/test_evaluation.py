"""Accuracy parity pipeline: both forms scored by ppdet's COCOMetric on generated images.

A few validation images and random weights (no training: that takes minutes and is
measured by tools/accuracy_parity.py, not tested). The training form goes through
ppdet's EvalReader in dygraph, the export through Paddle Inference with preprocessing
read from its infer_cfg.yml; the two paths share no code but the metric, so equal
detection counts and equal COCO numbers say the export detects what the model does.
"""
import os

import numpy as np
import pytest

from conftest import ROOT
from ppfuse.core import checkpoint
from ppfuse.ppdet import detection, export
from ppfuse.measure import evaluation
from ppfuse.errors import ConfigError

CONFIG = os.path.join(ROOT, "configs", "shapes", "ppyoloe_plus_crn_s_shapes.yml")


def quiet(*_):
    pass


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    path = tmp_path_factory.mktemp("parity")
    cwd = os.getcwd()
    os.chdir(path)  # the config's dataset paths are relative, as in PaddleDetection
    try:
        yield path
    finally:
        os.chdir(cwd)


def test_export_and_training_form_score_alike(workdir):
    config = detection.load_config(CONFIG)
    evaluation.ensure_shapes_dataset(config, train_images=1, val_images=6, log=quiet)
    built = detection.build_model(config, deploy=False, seed=0)
    weights = str(workdir / "random.pdparams")
    checkpoint.save_state(built.training_model, weights)

    training = evaluation.evaluate_training_form(config, weights, str(workdir / "eval_train"), log=quiet)
    exported = export.export(config, str(workdir / "inference"), weights=weights, log=quiet)
    deployed = evaluation.evaluate_exported(exported.directory, evaluation.dataset_split(config, "EvalDataset"),
                                            str(workdir / "eval_export"), log=quiet)
    assert training.images == deployed.images == 6
    assert training.detections > 0 and deployed.detections == training.detections
    np.testing.assert_allclose(deployed.stats, training.stats, atol=1e-3)
    table = evaluation.parity_table([training, deployed])
    assert "absolute difference" in table and f"{training.map:.4f}" in table


def test_zero_images_asked_for_is_refused(workdir):
    config = detection.load_config(CONFIG)
    with pytest.raises(ConfigError, match="give at least 1"):
        evaluation.ensure_shapes_dataset(config, train_images=0, val_images=1, log=quiet)


def test_training_runs_once_per_settings(workdir, monkeypatch):
    """The accuracy tool trains once: the same config, epochs, seed and data reuse the checkpoint;
    other epochs or --retrain train again."""
    config = detection.load_config(CONFIG)
    calls = []

    def fake_train(config, save_dir, epochs=None, seed=0, log=None):
        calls.append(epochs)
        weights = os.path.join(save_dir, "train", "model_final.pdparams")
        os.makedirs(os.path.dirname(weights), exist_ok=True)
        with open(weights, "w") as f:
            f.write("checkpoint")
        return evaluation.TrainResult(weights, epochs, 60.0, {"epoch": epochs})
    monkeypatch.setattr(evaluation, "train", fake_train)
    save_dir = str(workdir / "cached")
    first = evaluation.train_once(config, save_dir, 2, 0, {"train_images": 5}, log=quiet)
    again = evaluation.train_once(config, save_dir, 2, 0, {"train_images": 5}, log=quiet)
    assert calls == [2] and again.weights == first.weights and again.seconds == 60.0
    evaluation.train_once(config, save_dir, 3, 0, {"train_images": 5}, log=quiet)
    evaluation.train_once(config, save_dir, 3, 0, {"train_images": 6}, log=quiet)
    evaluation.train_once(config, save_dir, 3, 0, {"train_images": 6}, retrain=True, log=quiet)
    assert calls == [2, 3, 3, 3]


def test_the_table_puts_every_runtime_beside_the_training_form_and_says_what_bf16_costs():
    def result(form, map_, map50):
        return evaluation.CocoResult(form, [map_, map50] + [0.0] * 10, 10, 20, 1.0)
    results = [result("training form (ppdet dygraph)", 0.5, 0.8), result("ppfuse export, OpenVINO fp32", 0.5, 0.8),
               result("ppfuse export, OpenVINO bf16", 0.4975, 0.7991),
               result("ppfuse export, ONNX Runtime fp32", 0.5, 0.8)]
    table = evaluation.parity_table(results).splitlines()
    assert table[2] == "| training form (ppdet dygraph) | 0.5000 | 0.8000 | - |"
    assert table[4] == "| ppfuse export, OpenVINO bf16 | 0.4975 | 0.7991 | 0.0025 / 0.0009 |"
    assert evaluation.bf16_costs(results) == [
        "bf16 in OpenVINO: mAP@[.5:.95] 0.4975 vs fp32 0.5000 (bf16 - fp32 = -0.0025), "
        "mAP@.5 0.7991 vs 0.8000 (-0.0009)"]
