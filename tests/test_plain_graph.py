"""The plain graph (``--image_only``) fed by a script that knows only its documented contract
(docs/plain-graph.md): the numpy preprocessing below reads the export's ``ppfuse_report.json`` "plain_graph"
and nothing of ppfuse, runs ``model.onnx`` in a bare ``onnxruntime.InferenceSession``, maps the boxes back to
the image as the doc says, and must give tools/infer.py's detections (same runtime: equal to 0.01 px and
1e-5 in score). Skipped without the [onnx] extra."""
import importlib.util
import json
import os

import numpy as np
import pytest

from conftest import ROOT

pytestmark = pytest.mark.skipif(
    not all(importlib.util.find_spec(m) for m in ("paddle2onnx", "onnxruntime")),
    reason="needs the [onnx] extra: pip install -e '.[onnx]'")
CONFIG = os.path.join(ROOT, "configs", "picodet", "picodet_s_320_coco_lcnet.yml")
THRESHOLD = 0.01


def detect_by_contract(model_dir: str, image_path: str, threshold: float):
    """What a user's script does with only docs/plain-graph.md: no ppfuse."""
    import cv2
    import onnxruntime

    contract = json.load(open(os.path.join(model_dir, "ppfuse_report.json")))["plain_graph"]
    height, width = contract["resize"]["to"]
    bgr = cv2.imread(image_path, cv2.IMREAD_COLOR)
    rgb = bgr[:, :, ::-1]                                                    # channel order RGB
    resized = cv2.resize(rgb, (width, height), interpolation=cv2.INTER_LINEAR)  # stretched, bilinear
    norm = contract["normalize"]
    x = (resized.astype("float32") * np.float32(norm["scale"]) - np.array(norm["mean"], "float32")) \
        / np.array(norm["std"], "float32")
    x = x.transpose(2, 0, 1)[None].astype("float32")                          # NCHW, N = 1
    session = onnxruntime.InferenceSession(os.path.join(model_dir, "model.onnx"), providers=["CPUExecutionProvider"])
    bbox, bbox_num = session.run(["bbox", "bbox_num"], {"image": x})
    rows = bbox[:int(bbox_num[0])]
    h, w = bgr.shape[:2]
    scale = np.array([width / w, height / h, width / w, height / h], "float32")
    boxes = rows[:, 2:6] / scale                                             # input pixels -> image pixels
    boxes = np.clip(boxes, 0, [w, h, w, h])
    keep = (rows[:, 1] >= threshold) & (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    return [{"class_id": int(c), "score": float(s), "box": b.tolist()}
            for c, s, b in zip(rows[keep, 0], rows[keep, 1], boxes[keep])]


def test_a_script_that_knows_only_the_contract_gets_infers_detections(tmp_path, capsys):
    import cv2

    from ppfuse.ppdet import detection, export
    from test_errors import INFER, run_tool
    config = detection.load_config(CONFIG, ["TestReader.inputs_def.image_shape=[3,192,192]", "eval_size=[192,192]",
                                            "weights="])
    directory = export.export(config, str(tmp_path), onnx=True, image_only=True, log=lambda *_: None).directory
    image = str(tmp_path / "image.png")
    # low-contrast gray: on noise, random weights saturate every score at 1.0 and NMS among tied boxes is
    # arbitrary, so this script's input (resized apart from tools/infer.py's) could keep other boxes
    cv2.imwrite(image, (128 + np.random.RandomState(5).randint(-8, 8, (150, 230, 3))).astype("uint8"))
    out = str(tmp_path / "infer")
    code, _, err = run_tool(INFER, ["--model_dir", directory, "--image_file", image, "--runtime", "onnxruntime",
                                    "--threshold", str(THRESHOLD), "--output_dir", out], capsys)
    assert code == 0, err
    expected = json.load(open(os.path.join(out, "image.json")))["detections"]
    got = detect_by_contract(directory, image, THRESHOLD)
    assert len(got) == len(expected) > 0
    key = lambda d: (d["class_id"], -d["score"], d["box"])  # noqa: E731
    for a, b in zip(sorted(got, key=key), sorted(expected, key=key)):
        assert a["class_id"] == b["class_id"] and abs(a["score"] - b["score"]) <= 1e-5
        np.testing.assert_allclose(a["box"], b["box"], atol=1e-2)  # float32 scale factors rounded apart
