"""ONNX: the export's ONNX model has no BatchNormalization/If and matches Paddle Inference;
the ONNX-level fold matches the unfused model. Skipped (with the reason) without the [onnx] extra;
CI installs it."""
import os

import numpy as np
import paddle
import pytest

from conftest import ROOT

pytest.importorskip("paddle2onnx", reason="ONNX tests need the [onnx] extra: pip install -e '.[onnx]'")
pytest.importorskip("onnxruntime", reason="ONNX tests need the [onnx] extra: pip install -e '.[onnx]'")

from ppfuse.ppdet import detection, export  # noqa: E402

from ppfuse.core import layers

from ppfuse.deploy import onnx_support
from ppfuse.ppdet import detectors

CONFIG = os.path.join(ROOT, "configs", "ppyoloe", "ppyoloe_plus_crn_s_320_test.yml")


def test_export_with_onnx(tmp_path):
    config = detection.load_config(CONFIG)
    result = export.export(config, str(tmp_path), onnx=True, log=lambda *_: None)
    path = os.path.join(result.directory, onnx_support.ONNX_FILE)
    nodes = onnx_support.node_counts(path)
    assert nodes.get("BatchNormalization", 0) == 0 and nodes.get("If", 0) == 0 and nodes["Conv"] == 86
    # paddle2onnx writes each conv bias as Reshape + Add; ppfuse puts it back into the Conv (the check
    # below compares ONNX Runtime on that graph with Paddle Inference)
    import onnx
    model = onnx.load(path)
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    assert sum(len(n.input) == 3 for n in convs) >= 80 and nodes["Add"] < 20, nodes
    assert onnx_support.fuse_conv_bias_adds(model) == 0  # nothing left to fuse
    image, scale = detectors.sample_inputs([320, 320], 1, 9)
    ok, how = onnx_support.check_against_paddle(result.directory, path, {"image": image.numpy(),
                                                                         "scale_factor": scale.numpy()},
                                                box_atol=0.032)
    assert ok, how


def _training_form_onnx(tmp_path):
    from paddle.vision.models import resnet18
    paddle.seed(0)
    model = resnet18(num_classes=10)
    layers.randomize(model, 0)
    model.eval()
    spec = [paddle.static.InputSpec([None, 3, 32, 32], "float32", "x")]
    paddle.jit.save(paddle.jit.to_static(model, input_spec=spec, full_graph=True), str(tmp_path / "model"))
    return onnx_support.to_onnx(str(tmp_path), str(tmp_path / "model.onnx"))


def test_fold_batch_norms_in_a_foreign_onnx_model(tmp_path):
    path = _training_form_onnx(tmp_path)
    assert onnx_support.node_counts(path)["BatchNormalization"] == 20
    folded = str(tmp_path / "folded.onnx")
    result = onnx_support.fold_batch_norms(path, folded)
    assert result == {"folded": 20, "left": {}}
    assert onnx_support.node_counts(folded).get("BatchNormalization", 0) == 0
    check = onnx_support.verify_fold(path, folded, {"x": [2, 3, 32, 32]})
    assert check.ok and check.max_abs > 0, check.summary()  # > 0: the two runs are different graphs
    feeds = onnx_support.random_inputs(onnx_support.session(path), {"x": [2, 3, 32, 32]}, seed=4)
    before = onnx_support.run_onnx(onnx_support.session(path), feeds)[0]
    after = onnx_support.run_onnx(onnx_support.session(folded), feeds)[0]
    scale = np.abs(before).max()
    np.testing.assert_allclose(after / scale, before / scale, atol=1e-5, rtol=1e-5)

