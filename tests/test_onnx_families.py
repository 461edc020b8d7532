"""``--onnx`` for detector families other than PP-YOLOE: the export writes model.onnx and checks it, and
ONNX Runtime and OpenVINO give Paddle Inference's detections -- with the two-input export and the plain
graph (``--image_only``), with and without NMS. Random weights at the family tests' size (192).

Tolerances: raw outputs (``--no_nms``, boxes in pixels and scores, on the export check's kind of input) within
the export's check of them (boxes 1e-3 of the input size plus 1e-4 of the value: YOLOv3's pass through exp();
scores 1e-3, the export's tenfold check of them) in both runtimes; detections after NMS paired one to one with Paddle
Inference's (same class, corners within 0.05 px, scores within 1e-3) in every runtime.

The image is low-contrast gray: on a noise image random weights saturate the scores at 1.0, and NMS among
tied boxes keeps arbitrary ones (ONNX Runtime and Paddle Inference keep different ones), so detections after
NMS are not determined there. ``_same_detections`` first asserts that the reference's scores are below
saturation, so the comparison it makes is one the models determine. A top-k before NMS (RetinaNet's ``nms_pre``)
lists anchors whose best scores tie to fp32 rounding in either order: the raw comparison pairs those rows
(``onnx_support.order_tied_rows``), and only those, as Paddle Inference orders them. PP-YOLO(v2) with DCN
amplifies fp32 rounding beyond the check's tolerance in both runtimes: ONNX Runtime is measured against a float64
evaluation of the model, as close to it as Paddle Inference is.
Skipped without the [onnx] / [openvino] extras. Long cases are marked slow.
"""
import importlib.util
import os

import numpy as np
import pytest

from conftest import ROOT
from ppfuse import runtime
from ppfuse.deploy import onnx_support
from ppfuse.deploy.inference import Detector
from ppfuse.errors import ConfigError, ExportError
from ppfuse.measure import coverage
from ppfuse.measure.runtime_parity import match_detections
from ppfuse.ppdet import detection, export

pytestmark = pytest.mark.skipif(
    not all(importlib.util.find_spec(m) for m in ("paddle2onnx", "onnxruntime")),
    reason="ONNX tests need the [onnx] extra: pip install -e '.[onnx]'")
SIZE = 192
OPENVINO = importlib.util.find_spec("openvino") is not None
RUNTIMES = ["onnxruntime"] + (["openvino"] if OPENVINO else [])


def _export(tmp_path, path, **kwargs):
    config = detection.load_config(os.path.join(ROOT, path), coverage.size_overrides(SIZE) + ["weights="])
    return export.export(config, str(tmp_path), onnx=True, log=lambda *_: None, **kwargs).directory


def _image(seed=0):
    """Gray 128 +- 8: random weights give unsaturated scores on it (a noise image gives 1.0 everywhere)."""
    noise = np.random.RandomState(seed).randint(-8, 8, (150, 230, 3))
    return (128 + noise).astype("uint8")


SATURATED = 0.999  # a score this high is treated as tied with others: NMS among ties is not determined


def _same_detections(directory, name):
    reference = Detector(directory).predict(_image())
    assert len(reference.scores) > 0 and reference.scores.max() < SATURATED, \
        f"scores saturate ({reference.scores.max()}): NMS among tied boxes is arbitrary, nothing to compare"
    found = Detector(directory, runtime=name).predict(_image())
    match = match_detections(reference, found, box_tolerance=0.05)
    assert match.same and match.max_score_diff <= 1e-3, (name, match)
    return match


def _same_raw(directory, name):
    image = np.random.RandomState(3).uniform(0, 1, (2, 3, SIZE, SIZE)).astype("float32")  # as the export's check
    reference = runtime.load(directory, "paddle").run({"image": image})
    got = runtime.load(directory, name).run({"image": image})
    assert list(got) == list(reference) == ["boxes", "scores"]
    # a top-k before NMS (RetinaNet's nms_pre) lists anchors whose best scores tie to fp32 rounding in either
    # order: those rows (only those) are compared in Paddle Inference's order
    (got["boxes"], got["scores"]), moved = onnx_support.order_tied_rows(
        [reference["boxes"], reference["scores"]], [got["boxes"], got["scores"]], [1e-3 * SIZE, 1e-3], 1e-4)
    assert moved <= 0.01 * reference["boxes"].shape[0] * reference["boxes"].shape[1], moved
    finite = np.isfinite(reference["boxes"]) & (np.abs(reference["boxes"]) < 1e30)
    np.testing.assert_allclose(got["boxes"][finite], reference["boxes"][finite], atol=1e-3 * SIZE, rtol=1e-4,
                               err_msg=f"{name}: boxes")
    np.testing.assert_allclose(got["scores"], reference["scores"], atol=1e-3, rtol=1e-4, err_msg=f"{name}: scores")


CASES = [  # (config, marks): small models in the default run, the rest slow
    ("configs/picodet/picodet_s_320_coco_lcnet.yml", []),
    ("configs/yolov3/yolov3_mobilenet_v1_270e_coco.yml", []),
    ("configs/ssd/ssdlite_mobilenet_v3_small_320_coco.yml", [pytest.mark.slow]),  # prior boxes as constants
    ("configs/ppyolo/ppyolo_tiny_650e_coco.yml", [pytest.mark.slow]),
    ("configs/yolox/yolox_s_300e_coco.yml", [pytest.mark.slow]),
    ("configs/detr/detr_r50_1x_coco.yml", [pytest.mark.slow]),  # no NMS: a top-k in the graph
    ("configs/fcos/fcos_r50_fpn_1x_coco.yml", [pytest.mark.slow]),  # group_norm's epsilon put back
    ("configs/gfl/gfl_r50_fpn_1x_coco.yml", [pytest.mark.slow]),  # group_norm's epsilon put back
    ("configs/retinanet/retinanet_r50_fpn_1x_coco.yml", [pytest.mark.slow]),  # decoding for the batch at once
]
# how each family is compared, where detections after NMS are not determined by random weights (run 2026-12-05):
# PP-YOLO tiny's and YOLOX's scores saturate even on the gray image; SSDLite's NMS keeps 196 of the same 200 boxes
# in OpenVINO (near ties); those compare their boxes and scores before NMS (the plain graph, --no_nms), every
# anchor. DETR's model.onnx runs in OpenVINO too (its ArgMax once could not: onnx_support.integer_max_in_int64).
RAW_ONLY = {"ppyolo_tiny_650e_coco": RUNTIMES, "yolox_s_300e_coco": RUNTIMES,
            "ssdlite_mobilenet_v3_small_320_coco": ["openvino"] if OPENVINO else []}


@pytest.mark.parametrize("path", [pytest.param(p, marks=m, id=os.path.basename(p)[:-4]) for p, m in CASES])
def test_family_onnx_gives_paddle_inference_detections(tmp_path, path):
    name = os.path.basename(path)[:-4]
    raw_only = RAW_ONLY.get(name, [])
    if set(RUNTIMES) - set(raw_only):
        directory = _export(tmp_path / "two_inputs", path)
        report = __import__("json").load(open(os.path.join(directory, "ppfuse_report.json")))
        assert report["onnx"]["nodes"].get("BatchNormalization", 0) == 0
        if OPENVINO:  # the export's OpenVINO IR, which the openvino runtime then loads
            assert report["onnx"]["openvino_ir"] == "model.xml", report["onnx"].get("openvino_ir_error")
        for runtime_name in RUNTIMES:
            if runtime_name not in raw_only:
                _same_detections(directory, runtime_name)
    if raw_only:
        raw = _export(tmp_path / "raw", path, image_only=True, with_nms=False)
        for runtime_name in raw_only:
            _same_raw(raw, runtime_name)


PLAIN_CASES = [(CASES[0][0], []), (CASES[1][0], [pytest.mark.slow]), CASES[2],  # one in the default run
               CASES[7], CASES[8]]  # GFL, RetinaNet


@pytest.mark.parametrize("path", [pytest.param(p, marks=m, id=os.path.basename(p)[:-4]) for p, m in PLAIN_CASES])
def test_family_plain_graph_in_every_runtime(tmp_path, path):
    """--image_only: one input; with NMS the detections pair; without, the raw boxes and scores agree for a
    batch of two."""
    with_nms = _export(tmp_path / "nms", path, image_only=True)
    for name in ["paddle"] + RUNTIMES:
        assert runtime.load(with_nms, name).input_names == ["image"]
    for name in RUNTIMES:
        if name not in RAW_ONLY.get(os.path.basename(path)[:-4], []):  # those: the raw comparison below
            _same_detections(with_nms, name)
    raw = _export(tmp_path / "raw", path, image_only=True, with_nms=False)
    for name in RUNTIMES:
        _same_raw(raw, name)


@pytest.mark.slow
@pytest.mark.parametrize("path", ["configs/ttfnet/ttfnet_darknet53_1x_coco.yml",
                                  "configs/centernet/centernet_r50_140e_coco.yml"], ids=["ttfnet", "centernet"])
def test_deformable_family_onnx_takes_one_image_and_gives_paddle_inference_detections(tmp_path, path):
    """TTFNet's and CenterNet's post-processing (a top-k per image, ppdet's loop over the batch) as one image's:
    no Loop in the graph, and the detections of ONNX Runtime and of OpenVINO (its ONNX front end has no
    DeformConv, which their deformable convs become: ppfuse's front-end extension maps it) pair with Paddle
    Inference's."""
    directory = _export(tmp_path, path)
    report = __import__("json").load(open(os.path.join(directory, "ppfuse_report.json")))["onnx"]
    assert report["nodes"].get("Loop", 0) == report["nodes"].get("BatchNormalization", 0) == 0
    assert report["nodes"].get("DeformConv", 0) > 0
    if OPENVINO:
        assert report["openvino_ir"] == "model.xml", report.get("openvino_ir_error")
    reference = Detector(directory).predict(_image())
    assert len(reference.scores) > 0 and (reference.scores >= SATURATED).sum() <= 1, \
        "tied saturated scores: the top-k among them is arbitrary, nothing to compare"
    for name in RUNTIMES:
        match = match_detections(reference, Detector(directory, runtime=name).predict(_image()), box_tolerance=0.05)
        assert match.same and match.max_score_diff <= 1e-3, (name, match)


@pytest.mark.slow
def test_yolof_onnx_decodes_the_batch_and_gives_paddle_inference_boxes(tmp_path):
    """YOLOF's decoding (ppdet's loop over the batch) for the batch at once: no Loop in the graph; the export's
    own check passed (boxes and scores before NMS, then the detections). Random weights saturate YOLOF's scores
    at 1.0 on every image tried, so its detections are not determined; the boxes and scores NMS takes are
    compared instead, for a batch of two, in every runtime."""
    path = "configs/yolof/yolof_r50_c5_1x_coco.yml"
    directory = _export(tmp_path / "nms", path)
    report = __import__("json").load(open(os.path.join(directory, "ppfuse_report.json")))["onnx"]
    assert report["nodes"].get("Loop", 0) == report["nodes"].get("BatchNormalization", 0) == 0
    assert report["nodes"].get("NonMaxSuppression", 0) == 1 and "within tolerance" in report["raw_check"]
    raw = _export(tmp_path / "raw", path, image_only=True, with_nms=False)
    for name in RUNTIMES:
        _same_raw(raw, name)


@pytest.mark.slow
def test_rotated_nms_follows_the_onnx_graph_in_every_runtime_and_precision(tmp_path):
    """PP-YOLOE-R: ``multiclass_nms3`` on rotated boxes has no ONNX form, so model.onnx ends at the boxes
    [N, M, 8] and scores [N, C, M] NMS takes, the report names the NMS and its parameters (the config's), and
    ONNX Runtime and OpenVINO apply ppfuse's rotated NMS after the graph.

    - fp32: detections paired one to one with Paddle Inference's (model.json, NMS inside) on the gray image: same
      class, corners within 0.1 px (the two runtimes' boxes before NMS differ by up to ~0.07 px on this random
      model, within the export's raw check of them), scores within 1e-3;
    - every runtime and precision (fp32, bf16 on a bf16 CPU, int8 after quantize_export), a batch of two:
      ``bbox [K, 10]``, ``bbox_num [2]`` exactly what Paddle's own kernel gives on that runtime's graph outputs.
    """
    import json

    import cv2
    import paddle

    from ppfuse.deploy import quantize
    from ppfuse.deploy.inference import Preprocess
    directory = _export(tmp_path / "export", "configs/ppyoloe_r/ppyoloe_r_crn_s_3x_dota.yml")
    record = json.load(open(os.path.join(directory, "ppfuse_report.json")))["onnx"]
    assert record["nms_after_graph"] == {"op": "multiclass_nms3", "box_size": 8, "score_threshold": 0.1,
                                         "nms_top_k": 2000, "keep_top_k": -1, "nms_threshold": 0.1,
                                         "normalized": False, "nms_eta": 1.0, "background_label": -1}
    assert record["nodes"].get("NonMaxSuppression", 0) == record["nodes"].get("BatchNormalization", 0) == 0
    assert "within tolerance" in record["raw_check"] and record["check"].startswith("same detections")

    reference = Detector(directory).predict(_image(1))
    assert len(reference.scores) > 0 and reference.scores.max() < SATURATED, reference.scores.max()
    for name in RUNTIMES:
        match = match_detections(reference, Detector(directory, runtime=name).predict(_image(1)),
                                 box_tolerance=0.1)
        assert match.same and match.max_score_diff <= 1e-3, (name, match)

    images = tmp_path / "calibration"
    images.mkdir()
    for i in range(2):
        cv2.imwrite(str(images / f"{i}.png"), _image(10 + i))
    quantize.quantize_export(directory, str(images), quantize.QuantizeSettings(images=2), log=lambda *_: None)
    preprocess = Preprocess.from_infer_cfg(directory)
    feeds = [preprocess(_image(seed)) for seed in (0, 1)]
    batch = {k: np.concatenate([f[k] for f in feeds]) for k in feeds[0]}
    cases = [(name, precision) for name in RUNTIMES for precision in runtime.CPU_PRECISIONS[name]
             if precision != "bf16" or runtime.bf16_supported()]
    for name, precision in cases:
        model = runtime.load(directory, name, runtime.RuntimeOptions(precision=precision))
        got = model.run(batch)
        boxes, scores = model._run({n: batch[n] for n in model.input_names})  # the graph's own outputs
        assert boxes.shape[0] == 2 and boxes.shape[2] == 8 and scores.shape[0] == 2
        want, _, number = paddle._C_ops.multiclass_nms3(
            paddle.to_tensor(boxes), paddle.to_tensor(scores), None, 0.1, 2000, -1, 0.1, False, 1.0, -1)
        assert list(got) == ["bbox", "bbox_num"] and len(got["bbox_num"]) == 2, (name, precision)
        np.testing.assert_array_equal(got["bbox_num"], number.numpy(), err_msg=f"{name} {precision}")
        np.testing.assert_array_equal(got["bbox"], want.numpy().reshape(-1, 10), err_msg=f"{name} {precision}")


@pytest.mark.slow
@pytest.mark.parametrize("path", ["configs/ppyolo/ppyolo_r50vd_dcn_1x_coco.yml",
                                  "configs/ppyolo/ppyolov2_r50vd_dcn_365e_coco.yml"],
                         ids=["ppyolo_r50vd_dcn", "ppyolov2_r50vd_dcn"])
def test_ppyolo_dcn_onnx_is_as_close_to_float64_as_paddle_inference(tmp_path, path):
    """PP-YOLO(v2) ResNet50-vd-DCN on random weights amplifies fp32 rounding through its depth and box
    decoding's exp(): both runtimes' boxes before NMS are further from a float64 evaluation of the model than
    the export's fixed tolerance between the runtimes, so the export decides by the float64 criterion.
    Measured here for the plain graph without NMS: ONNX Runtime and OpenVINO (ppfuse's DeformConv rule) no
    further from float64 than twice Paddle Inference's own fp32 error, per output. (Its scores saturate at 1.0,
    so detections after NMS are not determined.)"""
    from ppfuse.ppdet import detectors
    directory = _export(tmp_path, path, image_only=True, with_nms=False)
    values = {n: t.numpy() for n, t in detectors.generated_inputs([SIZE, SIZE], 1, 3).items()}
    config = detection.load_config(os.path.join(ROOT, path), coverage.size_overrides(SIZE) + ["weights="])
    model = detection.build_model(config, deploy=True, seed=0, check=False).model  # the export's weights
    exact = export.raw_outputs_float64(model, values, [SIZE, SIZE], export.Graph(with_nms=False, image_only=True))
    inference = list(runtime.load(directory, "paddle").run({"image": values["image"]}).values())
    for name in RUNTIMES:  # OpenVINO through ppfuse's DeformConv conversion rule
        got_all = list(runtime.load(directory, name).run({"image": values["image"]}).values())
        for output, want, fp32, got in zip(["boxes", "scores"], exact, inference, got_all):
            own, error = np.abs(fp32 - want).max(), np.abs(got - want).max()
            assert error <= 2 * own, f"{name} {output}: {error:.3g} from float64, Paddle Inference {own:.3g}"


def test_plain_graph_without_nms_of_a_top_k_family_is_one_line(tmp_path):
    with pytest.raises(ConfigError, match=r"calls no NMS .* export --image_only without --no_nms"):
        _export(tmp_path, "configs/detr/detr_r50_1x_coco.yml", image_only=True, with_nms=False)


def test_an_operator_paddle2onnx_lacks_is_named_in_one_line(tmp_path, monkeypatch):
    """A program with an operator outside paddle2onnx's list is converted in a child process (paddle2onnx
    aborts the process on it) and the failure names the operator."""
    import paddle

    from ppfuse.deploy import onnx_support
    from ppfuse.export_format import MODEL_FILE
    directory = str(tmp_path / "ok")  # any saved program: the list of operators is patched below
    paddle.jit.save(paddle.nn.Linear(2, 2), os.path.join(directory, MODEL_FILE),
                    input_spec=[paddle.static.InputSpec([1, 2], "float32", "x")])
    monkeypatch.setattr(onnx_support, "unconvertible_ops", lambda model_dir: ["matrix_nms"])
    monkeypatch.setattr(onnx_support, "_paddle2onnx", None)  # the child cannot run it either
    import subprocess
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: type("Done", (), {"returncode": 1, "stdout": ""})())
    with pytest.raises(ExportError, match=r"^paddle2onnx cannot convert pd_op.matrix_nms \(not among its operators\)"):
        onnx_support.to_onnx(directory, str(tmp_path / "x.onnx"))
