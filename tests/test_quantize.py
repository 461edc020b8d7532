"""int8 from an export (ppfuse.deploy.quantize, tools/quantize.py), the runtimes' int8 confirmation, per-layer
SQNR (ppfuse.measure.sqnr, tools/quantization_error.py).

PP-YOLOE+ s at 320 with random weights, calibrated on a handful of generated shapes images:

* int8 outputs against fp32 in the same runtime (raw boxes as a fraction of the input size, and scores):
  mean absolute error <= 0.05 on boxes and on scores, and not exactly equal (int8 did run). Loose because
  random weights saturate the scores (most at 0 or 1), so a quantization step near a logit of 0 flips a
  score fully (max error 1). What int8 costs a trained model is measured as mAP (tools/accuracy_parity.py);
* every one of the 86 convs runs int8 in ONNX Runtime (QLinearConv in the optimized graph) and OpenVINO
  (u8 runtime precision); a conv left float is counted as such, never reported as int8;
* SQNR: exact on known arrays, infinite for identical outputs, finite and positive for every conv of the
  int8 model; an injected outlier weight (the centre tap RepVGG's identity branch inflates) costs per-tensor
  weights more than per-channel ones -- a test that fails if the weight granularity is not honoured.
"""
import importlib.util
import math
import os
import shutil
import sys

import numpy as np
import pytest

from conftest import ROOT
from ppfuse.ppdet import detection, export
from ppfuse.deploy import quantize
from ppfuse.measure import sqnr
from ppfuse import runtime
from ppfuse.errors import ConfigError, InferenceError
from ppfuse.export_format import INT8_ONNX_FILE, INT8_OPENVINO_FILE, read_report
from test_errors import INFER, expect_error, load_tool, run_tool
from test_runtime import nms_export  # noqa: F401  (a pytest fixture: an export with NMS and model.onnx, an image)

CONFIG = os.path.join(ROOT, "configs", "ppyoloe", "ppyoloe_plus_crn_s_320_test.yml")
SIZE = 320
CONVS = 86
IMAGES = 4
INT8_MEAN = {"boxes": 0.05, "scores": 0.05}
EXTRAS = all(importlib.util.find_spec(m) is not None for m in ("paddle2onnx", "onnxruntime", "ml_dtypes"))
pytestmark = pytest.mark.skipif(not EXTRAS, reason="needs the [int8] extra")
QUANTIZE = load_tool("quantize")
QUANTIZATION_ERROR = load_tool("quantization_error")
RUNTIMES = [pytest.param(name, marks=pytest.mark.skipif(not runtime.available(name), reason=f"needs {name}"))
            for name in ("onnxruntime", "openvino")]
NNCF = importlib.util.find_spec("nncf") is not None and runtime.available("openvino")
needs_nncf = pytest.mark.skipif(not NNCF, reason="needs NNCF and OpenVINO (the [int8] extra)")


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    from ppfuse.measure.shapes import write_split
    root = str(tmp_path_factory.mktemp("shapes"))
    write_split(root, "train", IMAGES, seed=0, size=SIZE)
    return os.path.join(root, "train")


@pytest.fixture(scope="module")
def raw_export(tmp_path_factory, images):
    """Raw outputs (no NMS), quantized with the defaults; the fp32 outputs of each runtime on one image."""
    result = export.export(detection.load_config(CONFIG), str(tmp_path_factory.mktemp("raw")), with_nms=False,
                           onnx=True, log=lambda *_: None)
    quantized = quantize.quantize_export(result.directory, images, quantize.QuantizeSettings(images=IMAGES),
                                         log=lambda *_: None)
    inputs = quantize.calibration_inputs(result.directory, quantize.calibration_images(images, 1))[0]
    return result.directory, quantized, inputs


# --- the int8 model ---------------------------------------------------------------------------------------------


def test_quantize_writes_int8_next_to_model_onnx_and_records_it(raw_export, images):
    directory, quantized, _ = raw_export
    assert quantized.path == os.path.join(directory, INT8_ONNX_FILE) and os.path.isfile(quantized.path)
    assert quantized.convs == CONVS and quantized.quantized_convs == CONVS  # int8 weights stored, every conv
    record = read_report(directory)["int8"]
    assert record["file"] == INT8_ONNX_FILE and record["quantized_convs"] == CONVS and record["images"] == IMAGES
    assert record["per_channel"] and record["activation_type"] == "uint8" and record["calibration"] == "minmax"
    assert "with_nms" in read_report(directory)  # the export's own record is kept


@pytest.mark.parametrize("name", RUNTIMES)
def test_int8_outputs_stay_near_fp32(raw_export, name):
    directory, _, inputs = raw_export
    fp32 = runtime.load(directory, name).run(inputs)
    int8 = runtime.load(directory, name, runtime.RuntimeOptions(precision="int8")).run(inputs)
    assert list(int8) == ["boxes", "scores"]
    errors = {"boxes": np.abs(int8["boxes"] - fp32["boxes"]) / SIZE, "scores": np.abs(int8["scores"] - fp32["scores"])}
    print(f"\n{name} int8: " + ", ".join(f"{k} mean {v.mean():.3g} max {v.max():.3g}" for k, v in errors.items()))
    for key, error in errors.items():
        assert error.mean() <= INT8_MEAN[key], (key, error.mean())
    assert errors["scores"].max() > 0, "int8 gave fp32's numbers exactly: int8 did not run"


@pytest.mark.parametrize("name", RUNTIMES)
def test_every_conv_runs_int8_and_the_runtime_says_so(raw_export, name):
    directory, _, inputs = raw_export
    report = runtime.load(directory, name, runtime.RuntimeOptions(precision="int8")).confirm_precision(inputs)
    assert report.requested == "int8" and report.ran == "int8", report.line()
    assert f"{CONVS} of {CONVS} convolutions int8" in report.detail and "avx512_vnni" in report.detail, report.detail


@pytest.mark.parametrize("name", RUNTIMES)
def test_a_float_conv_is_counted_never_hidden(raw_export, images, tmp_path, name):
    """A model with one conv left float says 85 of 86 (mixed); a float model under the int8 name says 0 (fp32)."""
    import onnx
    directory, _, inputs = raw_export
    first = quantize.conv_nodes(onnx.load(os.path.join(directory, "model.onnx")))[0].name
    for case, expected, ran in (("one_float", CONVS - 1, "mixed"), ("all_float", 0, "fp32")):
        target = tmp_path / case
        target.mkdir()
        if case == "one_float":
            feeds = quantize.calibration_inputs(directory, quantize.calibration_images(images, 2))
            quantize.quantize_onnx(os.path.join(directory, "model.onnx"), str(target / INT8_ONNX_FILE), feeds,
                                   quantize.QuantizeSettings(images=2, exclude=[first]))
        else:
            shutil.copy(os.path.join(directory, "model.onnx"), target / INT8_ONNX_FILE)
        report = runtime.load(str(target), name, runtime.RuntimeOptions(precision="int8")).confirm_precision(inputs)
        assert report.ran == ran and f"{expected} of {CONVS} convolutions int8" in report.detail, report.line()


def _runtime_layers(model) -> dict:
    """Layers of an OpenVINO runtime (compiled) model by (layer type, runtime precision)."""
    from collections import Counter
    return Counter((op.get_rt_info()["layerType"].astype(str), op.get_rt_info()["runtimePrecision"].astype(str))
                   for op in model.compiled.get_runtime_model().get_ordered_ops())


@needs_nncf
def test_openvino_runs_nncfs_model_and_the_qdq_file_on_request(raw_export):
    """OpenVINO runs NNCF's model_int8.xml by default and says so; int8_model picks the QDQ file. Both are
    int8 quantizations of one network: each near fp32, not equal to it, not equal to each other."""
    directory, quantized, inputs = raw_export
    assert quantized.openvino_path == os.path.join(directory, INT8_OPENVINO_FILE)
    assert quantized.openvino_quantized_convs == CONVS
    assert os.path.isfile(quantized.openvino_path) and os.path.isfile(quantized.openvino_path[:-4] + ".bin")
    record = read_report(directory)["int8"]
    assert record["openvino_file"] == INT8_OPENVINO_FILE and record["openvino"] == "nncf"
    fp32 = runtime.load(directory, "openvino").run(inputs)
    outputs = {}
    for name, options in (("nncf", runtime.RuntimeOptions(precision="int8")),
                          ("qdq", runtime.RuntimeOptions(precision="int8", int8_model=INT8_ONNX_FILE))):
        model = runtime.load(directory, "openvino", options)
        report = model.confirm_precision(inputs)
        expected = INT8_OPENVINO_FILE if name == "nncf" else INT8_ONNX_FILE
        assert model.source == expected and f"runtime model of {expected}" in report.detail, report.line()
        assert report.ran == "int8" and f"{CONVS} of {CONVS} convolutions int8" in report.detail, report.line()
        outputs[name] = model.run(inputs)
        error = np.abs(outputs[name]["scores"] - fp32["scores"])
        assert 0 < error.mean() <= INT8_MEAN["scores"], (name, error.mean())
    assert not np.array_equal(outputs["nncf"]["scores"], outputs["qdq"]["scores"])
    with pytest.raises(InferenceError, match=r"int8 model model_int8.bin: use model_int8.xml or model_int8.onnx"):
        runtime.load(directory, "openvino", runtime.RuntimeOptions(precision="int8", int8_model="model_int8.bin"))


@pytest.mark.skipif(not runtime.available("openvino"), reason="needs openvino")
def test_openvino_keeps_the_zero_points_inside_the_int8_convolutions(raw_export):
    """Regression (found by the per-node profile): OpenVINO reading model_int8.onnx with Core.read_model left
    an f32 zero-point subtraction (Eltwise) and a reference Convert per quantized conv; converted by
    openvino.convert_model, as ppfuse loads it, the zero points go into the int8 convolutions."""
    directory, _, _ = raw_export
    model = runtime.load(directory, "openvino", runtime.RuntimeOptions(precision="int8", int8_model=INT8_ONNX_FILE))
    layers = _runtime_layers(model)
    converts = sum(n for (kind, _), n in layers.items() if kind == "Convert")
    float_eltwise = layers.get(("Eltwise", "f32"), 0)
    print(f"\nruntime model of {INT8_ONNX_FILE}: {converts} Convert, {float_eltwise} f32 Eltwise, "
          f"{layers.get(('Convolution', 'u8'), 0)} u8 convolutions")
    assert layers.get(("Convolution", "u8"), 0) == CONVS
    assert converts < CONVS // 10 and float_eltwise < CONVS // 2, layers


def test_qdq_choice_removes_an_old_nncf_model(raw_export, images, tmp_path):
    """--openvino_int8 qdq leaves no model_int8.xml behind that OpenVINO would run instead."""
    directory, _, inputs = raw_export
    copy = str(tmp_path / "copy")
    shutil.copytree(directory, copy)
    open(os.path.join(copy, INT8_OPENVINO_FILE), "w").close()  # an earlier run's file
    result = quantize.quantize_export(copy, images, quantize.QuantizeSettings(images=2, openvino="qdq"),
                                      log=lambda *_: None)
    assert result.openvino_path is None and not os.path.exists(os.path.join(copy, INT8_OPENVINO_FILE))
    assert read_report(copy)["int8"]["openvino_file"] == INT8_ONNX_FILE
    if runtime.available("openvino"):
        model = runtime.load(copy, "openvino", runtime.RuntimeOptions(precision="int8"))
        assert model.source == INT8_ONNX_FILE


def test_a_model_openvino_cannot_read_still_gets_onnx_runtimes_int8(raw_export, images, tmp_path, monkeypatch):
    """An operator OpenVINO has no conversion rule for: NNCF cannot take what OpenVINO cannot read; the QDQ file
    for ONNX Runtime is written all the same, and the report says why there is no model_int8.xml."""
    directory, _, _ = raw_export
    copy = str(tmp_path / "copy")
    shutil.copytree(directory, copy, ignore=shutil.ignore_patterns("model_int8.*"))

    def cannot(*args, **kwargs):
        raise RuntimeError("Check 'false' failed\nNo conversion rule found for operations: DeformConv-19\nmore")
    monkeypatch.setattr(quantize, "quantize_openvino", cannot)
    lines = []
    result = quantize.quantize_export(copy, images, quantize.QuantizeSettings(images=2), log=lines.append)
    assert result.openvino_path is None and os.path.isfile(os.path.join(copy, INT8_ONNX_FILE))
    assert sorted(n for n in os.listdir(copy) if n.startswith("model_int8")) == [INT8_ONNX_FILE]
    assert not [n for n in os.listdir(copy) if "staging" in n or n.endswith(".tmp")]
    record = read_report(copy)["int8"]
    assert record["openvino_file"] is None
    assert record["openvino_failure"] == "no conversion rule for operations: DeformConv-19"
    assert any(line.startswith("no model_int8.xml: OpenVINO cannot read or run model.onnx") for line in lines)


# --- SQNR -------------------------------------------------------------------------------------------------------


def test_sqnr_is_exact_on_known_arrays_and_infinite_for_equal_ones():
    signal = np.full(100, 2.0)
    assert sqnr.sqnr_db(signal, signal + 0.2) == pytest.approx(20.0)  # 400 / 4 -> 20 dB
    assert sqnr.sqnr_db(signal, signal) == math.inf
    assert sqnr.sqnr_db(np.zeros(4), np.ones(4)) == -math.inf
    weight = np.random.RandomState(0).randn(8, 4, 3, 3)
    for per_channel in (True, False):  # symmetric int8: at most half a step off, every value on the grid
        fake = sqnr.fake_quantize_weight(weight, per_channel)
        step = (np.abs(weight).max(axis=(1, 2, 3), keepdims=True) if per_channel else np.abs(weight).max()) / 127
        assert np.all(np.abs(fake - weight) <= step / 2 + 1e-12)
        np.testing.assert_allclose(np.round(fake / step), fake / step, atol=1e-9)


def test_every_conv_has_a_finite_positive_sqnr_and_identical_models_an_infinite_one(raw_export, images):
    directory, quantized, _ = raw_export
    source = os.path.join(directory, "model.onnx")
    feeds = quantize.calibration_inputs(directory, quantize.calibration_images(images, 2))
    errors = sqnr.layer_errors(source, quantized.path, feeds)
    assert len(errors) == CONVS
    for layer in errors:
        for value in (layer.output_sqnr, layer.weight_sqnr_per_channel, layer.weight_sqnr_per_tensor):
            assert math.isfinite(value) and value > 0, layer
        assert layer.weight_sqnr_per_channel >= layer.weight_sqnr_per_tensor - 1e-9, layer
    same = sqnr.layer_errors(source, source, feeds)  # the float model as its own "int8" model
    assert all(layer.output_sqnr == math.inf for layer in same)
    model = sqnr.ModelErrors(directory, same, quantize.QuantizeSettings())
    assert "| inf | inf |" in sqnr.summary_table([model], ["same"])


def _with_outlier(directory, target, index, factor):
    """A copy of the export whose conv ``index`` has one outlier weight: the centre tap of output and input
    channel 0 set to ``factor`` times the kernel's largest magnitude (what RepVGG's identity branch does)."""
    import onnx
    from onnx import numpy_helper
    model = quantize.constants_as_initializers(onnx.load(os.path.join(directory, "model.onnx")))
    name = quantize.conv_nodes(model)[index].input[1]
    tensor = next(t for t in model.graph.initializer if t.name == name)
    weight = numpy_helper.to_array(tensor).copy()
    weight[0, 0, weight.shape[2] // 2, weight.shape[3] // 2] = factor * np.abs(weight).max()
    tensor.CopyFrom(numpy_helper.from_array(weight, name))
    os.makedirs(target)
    onnx.save(model, os.path.join(target, "model.onnx"))
    shutil.copy(os.path.join(directory, "infer_cfg.yml"), target)
    return target


def test_an_outlier_weight_costs_per_tensor_quantization_more_than_per_channel(raw_export, images, tmp_path):
    directory, _, _ = raw_export
    index = 23  # a 96x96 3x3 conv in the backbone
    outlier = _with_outlier(directory, str(tmp_path / "outlier"), index, 50.0)
    gaps = {}
    for name, model_dir in (("plain", directory), ("outlier", outlier)):
        layers = {per_channel: sqnr.measure_export(model_dir, images, quantize.QuantizeSettings(
            images=3, per_channel=per_channel)).layers[index] for per_channel in (True, False)}
        gaps[name] = layers[True].output_sqnr - layers[False].output_sqnr
        weight_gap = layers[True].weight_sqnr_per_channel - layers[True].weight_sqnr_per_tensor
        print(f"\n{name}: conv {index} output SQNR per-channel {layers[True].output_sqnr:.2f} dB, per-tensor "
              f"{layers[False].output_sqnr:.2f} dB; weights {layers[True].weight_sqnr_per_channel:.1f} vs "
              f"{layers[True].weight_sqnr_per_tensor:.1f} dB")
        if name == "outlier":
            assert weight_gap > 15.0, weight_gap
    assert gaps["outlier"] > 3.0 and gaps["outlier"] > gaps["plain"] + 1.5, gaps


# --- the command lines and their errors -------------------------------------------------------------------------


def test_quantize_tool_then_infer_int8_in_both_runtimes(nms_export, images, capsys):
    directory, image, tmp = nms_export
    checks = [name for name in ("onnxruntime", "openvino") if runtime.available(name)]
    code, out, err = run_tool(QUANTIZE, ["--model_dir", directory, "--image_dir", images, "--images", str(IMAGES),
                                         "--check"] + checks, capsys)
    assert code == 0, err
    assert f"{CONVS} of {CONVS} convs int8" in out and "avx512_vnni" in out, out
    for name in checks:
        assert "int8 requested, int8 ran" in out and f"{CONVS} of {CONVS} convolutions int8" in out, out
        output = str(tmp / f"out_{name}")
        code, out_infer, err = run_tool(INFER, ["--model_dir", directory, "--image_file", image, "--runtime", name,
                                                "--precision", "int8", "--output_dir", output], capsys)
        assert code == 0, err
        assert "int8 requested, int8 ran" in out_infer and os.path.isfile(os.path.join(output, "image.json"))


def test_quantization_error_tool_writes_its_tables_plot_and_a_dated_result(raw_export, images, tmp_path, capsys):
    import json
    directory, _, _ = raw_export
    out, results = tmp_path / "qe", tmp_path / "results"
    code, stdout, err = run_tool(QUANTIZATION_ERROR, ["--model_dir", directory, "--image_dir", images, "--images", "2",
                                                      "--output_dir", str(out), "--results_dir", str(results)], capsys)
    assert code == 0, err
    assert sorted(os.listdir(out)) == ["quantization_error.md", "quantization_error.png"]
    (name,) = [n for n in os.listdir(results / "sqnr") if n.endswith(".md")]
    path = results / "sqnr" / name
    assert stdout.rstrip().endswith(f"wrote {path}")
    with open(str(path)[:-len(".md")] + ".json") as f:
        record = json.load(f)
    layers = record["data"]["models"][0]["layers"]
    assert len(layers) == CONVS and record["command"].startswith("python tools/quantization_error.py --model_dir")
    for layer in layers:  # the numbers of the table, as numbers
        assert 0 < layer["output_sqnr"] < 200, layer
        assert layer["weight_sqnr_per_channel"] >= layer["weight_sqnr_per_tensor"] - 1e-9, layer
    with open(out / "quantization_error.md") as f:
        assert path.read_text().endswith(f.read())  # the result's body is the tool's own file


def test_int8_errors_are_one_line(nms_export, images, tmp_path, capsys, monkeypatch):
    directory, image, tmp = nms_export
    empty = str(tmp_path / "empty")
    os.makedirs(empty)
    expect_error(QUANTIZE, ["--model_dir", empty, "--image_dir", images], capsys,
                 r"^error: .*empty: no model.onnx; export with --onnx")
    out, results = str(tmp_path / "qe"), str(tmp_path / "results")
    expect_error(QUANTIZATION_ERROR, ["--model_dir", empty, "--image_dir", images, "--output_dir", out,
                                      "--results_dir", results], capsys,
                 r"^error: .*empty: no model.onnx; export with --onnx", out)
    assert not os.path.exists(results)  # no result file for a run that failed
    expect_error(QUANTIZE, ["--model_dir", directory, "--image_dir", images, "--calibration", "magic"], capsys,
                 r"^error: --calibration magic: use one of minmax, entropy, percentile")
    expect_error(QUANTIZE, ["--model_dir", directory, "--image_dir", images, "--openvino_int8", "ir"], capsys,
                 r"^error: --openvino_int8 ir: use nncf or qdq")
    expect_error(INFER, ["--model_dir", directory, "--image_file", image, "--precision", "int8",
                         "--output_dir", str(tmp_path / "p")], capsys,
                 r"^error: --precision int8: use fp32, bf16 \(CPU\) or fp16 \(GPU\) with --runtime paddle")
    shutil.copytree(directory, str(tmp_path / "no_int8"), ignore=shutil.ignore_patterns(INT8_ONNX_FILE))
    with pytest.raises(InferenceError, match=r"no model_int8.onnx; write it with tools/quantize.py"):
        runtime.load(str(tmp_path / "no_int8"), "onnxruntime", runtime.RuntimeOptions(precision="int8"))
    monkeypatch.setitem(sys.modules, "ml_dtypes", None)  # as if the [int8] extra were not installed
    expect_error(QUANTIZE, ["--model_dir", directory, "--image_dir", images], capsys,
                 r"^error: int8 needs the optional package 'ml_dtypes': pip install -c constraints.txt "
                 r"-e \"\.\[int8\]\"")
    with pytest.raises(ConfigError, match=r"'ml_dtypes'"):
        quantize.require_quantization()
