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
from ppfuse import checkpoint, detection, evaluation, export
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
