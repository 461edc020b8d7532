"""Runtimes behind one interface: Paddle Inference, ONNX Runtime, OpenVINO; fp32 and bf16 on CPU.

Every runtime x precision is compared with Paddle Inference fp32 on the raw detector outputs (boxes
before NMS, as a fraction of the input size, and scores) of PP-YOLOE+ s at 320 with random weights:

* fp32: the export's tolerance, atol = rtol = 1e-4 (measured: <= 8e-6 for ONNX Runtime and OpenVINO);
* bf16 (8-bit mantissa): mean absolute error <= 0.01 on boxes / input size and <= 0.005 on scores,
  max <= 0.15 and 0.1 (measured for both bf16 runtimes: mean 0.0025 and 6e-4, max 0.068 and 0.041).
  Random weights cannot say whether that drift matters; tools/accuracy_parity.py scores a trained model.

bf16 cases run only on a CPU with bf16 instructions; the CPU check itself is tested with a replaced
/proc/cpuinfo. ONNX Runtime and OpenVINO cases are skipped without their extras.
"""
import importlib.util
import os

import numpy as np
import pytest

from conftest import ROOT
from ppfuse import runtime
from ppfuse.export_format import read_report
from ppfuse.deploy import forms
from ppfuse.errors import ExportError, InferenceError
from ppfuse.ppdet import detection, detectors, export
from ppfuse.runtime import base
from test_errors import INFER, expect_error, load_tool, run_tool

CONFIG = os.path.join(ROOT, "configs", "ppyoloe", "ppyoloe_plus_crn_s_320_test.yml")
SIZE = 320
FP32_TOLERANCE = 1e-4
BF16_MEAN = {"boxes": 0.01, "scores": 0.005}
BF16_MAX = {"boxes": 0.15, "scores": 0.1}
# model.onnx is written (and checked against ONNX Runtime) with the [onnx] extra
ONNX_EXTRA = all(importlib.util.find_spec(m) is not None for m in ("paddle2onnx", "onnxruntime"))

CPUINFO = """processor\t: 0
vendor_id\t: {vendor}
model name\t: {model}
flags\t\t: fpu sse2 avx2 avx512f avx512_vnni {flags}

processor\t: 1
model name\t: {model}
flags\t\t: fpu sse2 avx2 avx512f avx512_vnni {flags}
"""


def cpuinfo(monkeypatch, model, flags):
    monkeypatch.setattr(base, "read_cpuinfo", lambda: CPUINFO.format(vendor="X", model=model, flags=flags))


def cases():
    for name, precision in (("paddle", "fp32"), ("paddle", "bf16"), ("onnxruntime", "fp32"),
                            ("openvino", "fp32"), ("openvino", "bf16")):
        marks = []
        if name != "paddle" and not (ONNX_EXTRA and runtime.available(name)):
            marks.append(pytest.mark.skip(reason=f"needs the extra of {name} (and [onnx] to write model.onnx)"))
        if precision == "bf16" and not base.bf16_supported():
            marks.append(pytest.mark.skip(reason="this CPU has no bf16 instructions"))
        yield pytest.param(name, precision, marks=marks, id=f"{name}-{precision}")


# --- the CPU check ----------------------------------------------------------------------------------------------


def test_bf16_on_a_cpu_without_bf16_is_refused_in_one_line(monkeypatch):
    cpuinfo(monkeypatch, "AMD EPYC 7B12", "")
    assert not base.bf16_supported()
    with pytest.raises(InferenceError, match=r"^--precision bf16: this CPU \(AMD EPYC 7B12\) has no bf16 "
                                             r"instructions \(avx512_bf16 or amx_bf16 in /proc/cpuinfo\)"):
        base.check_options(base.RuntimeOptions(precision="bf16"), "paddle")
    base.check_options(base.RuntimeOptions(precision="fp32"), "paddle")  # fp32 is fine anywhere


@pytest.mark.parametrize("flags", ["avx512_bf16", "amx_bf16 amx_tile", "avx512_bf16 amx_bf16 amx_tile amx_int8"])
def test_bf16_instructions_are_found_in_cpuinfo(monkeypatch, flags):
    cpuinfo(monkeypatch, "Some Xeon", flags)
    assert base.bf16_supported()
    base.check_options(base.RuntimeOptions(precision="bf16"), "openvino")
    description = base.cpu_description()
    assert description.startswith("Some Xeon (")
    for flag in base.ISA_FLAGS:
        assert f"{flag} {'yes' if flag in flags.split() or flag in ('avx2', 'avx512f', 'avx512_vnni') else 'no'}" \
            in description


def test_no_cpuinfo_means_no_bf16(monkeypatch):
    monkeypatch.setattr(base, "read_cpuinfo", lambda: "")
    assert base.cpu_flags() == set() and not base.bf16_supported()


@pytest.mark.parametrize("options, message", [
    (dict(precision="fp16"), r"--precision fp16 runs on GPU only"),
    (dict(precision="int8"), r"--precision int8: use fp32, bf16 \(CPU\) or fp16 \(GPU\)"),
    (dict(device="gpu", precision="bf16"), r"--precision bf16 runs on CPU only here"),
    (dict(cpu_threads=0), r"--cpu_threads 0: use 1 or more"),
])
def test_options_no_runtime_can_run_are_refused(options, message):
    with pytest.raises(InferenceError, match=message):
        base.check_options(base.RuntimeOptions(**options), "paddle")


# --- runtimes on one export -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def raw_export(tmp_path_factory):
    """PP-YOLOE+ s 320, random weights, raw outputs (no NMS), with model.onnx when the extra is there."""
    config = detection.load_config(CONFIG)
    result = export.export(config, str(tmp_path_factory.mktemp("raw")), with_nms=False, onnx=ONNX_EXTRA,
                           log=lambda *_: None)
    image, scale = detectors.sample_inputs([SIZE, SIZE], 1, 5)
    inputs = {"image": image.numpy(), "scale_factor": scale.numpy()}
    reference = runtime.load(result.directory, "paddle").run(inputs)
    return result.directory, inputs, reference


@pytest.mark.parametrize("name, precision", list(cases()))
def test_every_runtime_gives_paddle_fp32_outputs(raw_export, name, precision):
    directory, inputs, reference = raw_export
    model = runtime.load(directory, name, runtime.RuntimeOptions(precision=precision))
    assert model.input_names == ["image", "scale_factor"] and model.output_names == ["boxes", "scores"]
    for _ in range(2):  # the second run too
        outputs = model.run(inputs)
    assert list(outputs) == ["boxes", "scores"]
    errors = {"boxes": np.abs(outputs["boxes"] - reference["boxes"]) / SIZE,
              "scores": np.abs(outputs["scores"] - reference["scores"])}
    print(f"\n{name} {precision}: " + ", ".join(f"{k} max {v.max():.3g} mean {v.mean():.3g}"
                                              for k, v in errors.items()))
    if precision == "fp32":
        np.testing.assert_allclose(outputs["boxes"] / SIZE, reference["boxes"] / SIZE, atol=FP32_TOLERANCE,
                                   rtol=FP32_TOLERANCE)
        np.testing.assert_allclose(outputs["scores"], reference["scores"], atol=FP32_TOLERANCE, rtol=FP32_TOLERANCE)
    else:
        for key, error in errors.items():
            assert error.mean() <= BF16_MEAN[key] and error.max() <= BF16_MAX[key], (key, error.mean(), error.max())
        assert errors["scores"].max() > 0, "bf16 gave fp32's numbers exactly: bf16 did not run"


@pytest.mark.skipif(not (ONNX_EXTRA and runtime.available("openvino")), reason="needs the onnx and openvino extras")
def test_openvino_loads_the_exports_ir_with_the_onnx_files_numbers(raw_export, tmp_path):
    """The export writes OpenVINO's IR beside model.onnx (weights kept fp32, not save_model's default fp16);
    OpenVINO loads it, and gives what it gives converting model.onnx itself (the test above: Paddle's)."""
    import shutil
    directory, inputs, _ = raw_export
    assert read_report(directory)["onnx"]["openvino_ir"] == "model.xml"
    with_ir = runtime.load(directory, "openvino")
    assert with_ir.source == "model.xml"
    without = str(tmp_path / "onnx_only")
    shutil.copytree(directory, without, ignore=shutil.ignore_patterns("model.xml", "model.bin"))
    converted = runtime.load(without, "openvino")
    assert converted.source == "model.onnx"
    a, b = with_ir.run(inputs), converted.run(inputs)
    for key in a:
        np.testing.assert_allclose(a[key], b[key], rtol=1e-6, atol=1e-6 * float(np.abs(b[key]).max()))


@pytest.mark.parametrize("name, precision", list(cases()))
def test_each_runtime_reports_the_precision_it_ran(raw_export, name, precision):
    directory, inputs, _ = raw_export
    model = runtime.load(directory, name, runtime.RuntimeOptions(precision=precision))
    report = model.confirm_precision(inputs)
    assert report.requested == precision and report.ran == precision, report.line()
    if name != "onnxruntime":
        assert f"86 of 86 convolutions {precision}" in report.detail, report.detail
    if name == "openvino":
        assert f"INFERENCE_PRECISION_HINT {precision}" in report.detail  # set explicitly, read back


def test_the_interface_names_inputs_and_refuses_what_it_cannot_run(raw_export, tmp_path):
    directory, inputs, _ = raw_export
    model = runtime.load(directory)
    with pytest.raises(InferenceError, match=r"the model needs input 'scale_factor'"):
        model.run({"image": inputs["image"]})
    with pytest.raises(InferenceError, match=r"--runtime tensorflow: use one of paddle, onnxruntime, openvino"):
        runtime.load(directory, "tensorflow")
    with pytest.raises(InferenceError, match=r"--runtime onnxruntime runs fp32 on CPU here"):
        runtime.load(directory, "onnxruntime", runtime.RuntimeOptions(precision="bf16"))
    with pytest.raises(InferenceError, match=r"--precision bf16 runs through oneDNN; drop --onednn off"):
        runtime.load(directory, "paddle", runtime.RuntimeOptions(precision="bf16", onednn=False))
    empty = tmp_path / "no_onnx"
    empty.mkdir()
    for name, title in (("onnxruntime", "ONNX Runtime"), ("openvino", "OpenVINO")):
        if ONNX_EXTRA and runtime.available(name):
            with pytest.raises(InferenceError, match=rf"no model.onnx; export with --onnx to run it in {title}"):
                runtime.load(str(empty), name)


# --- tools/infer.py ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def nms_export(tmp_path_factory):
    import cv2
    tmp = tmp_path_factory.mktemp("nms")
    result = export.export(detection.load_config(CONFIG), str(tmp), onnx=ONNX_EXTRA, log=lambda *_: None)
    image = str(tmp / "image.jpg")
    cv2.imwrite(image, np.random.RandomState(0).randint(0, 255, (240, 320, 3)).astype("uint8"))
    return result.directory, image, tmp


@pytest.mark.parametrize("name, precision", list(cases()))
def test_infer_runs_in_every_runtime_and_says_what_ran(nms_export, name, precision, capsys):
    directory, image, tmp = nms_export
    out = str(tmp / f"out_{name}_{precision}")
    code, stdout, err = run_tool(INFER, ["--model_dir", directory, "--image_file", image, "--runtime", name,
                                         "--precision", precision, "--output_dir", out, "--print_max", "1"], capsys)
    assert code == 0, err
    assert "detections with score >=" in stdout and os.path.isfile(os.path.join(out, "image.json"))
    if name != "paddle" or precision != "fp32":
        assert f"{precision} requested, {precision} ran" in stdout, stdout


def test_infer_bf16_on_a_cpu_without_bf16_is_one_line(nms_export, monkeypatch, capsys):
    directory, image, tmp = nms_export
    cpuinfo(monkeypatch, "AMD EPYC 7B12", "")
    out = str(tmp / "refused")
    expect_error(INFER, ["--model_dir", directory, "--image_file", image, "--precision", "bf16", "--output_dir", out],
                 capsys, r"^error: --precision bf16: this CPU \(AMD EPYC 7B12\) has no bf16 instructions", out)


def test_accuracy_tool_refuses_an_unknown_runtime_before_training(capsys, tmp_path):
    from test_errors import load_tool
    out = str(tmp_path / "acc")
    expect_error(load_tool("accuracy_parity"), ["--runtimes", "paddle", "tensorflow", "--output_dir", out], capsys,
                 r"^error: --runtime tensorflow: use one of paddle, onnxruntime, openvino", out)


def test_onednn_off_runs_the_plain_program_with_the_same_outputs(raw_export, capsys):
    """The export writes model_plain.json (biases as [C, 1, 1] adds) for Paddle Inference without oneDNN;
    it reads model.pdiparams and gives model.json's outputs exactly (the same sums in the same kernels)."""
    from ppfuse.runtime.paddle_inference import create_predictor, program_for, run_predictor
    directory, inputs = raw_export[0], raw_export[1]
    off, on = runtime.RuntimeOptions(onednn=False), runtime.RuntimeOptions()
    assert program_for(directory, off).endswith("model_plain.json") and program_for(directory, on).endswith("model.json")
    assert not os.path.exists(os.path.join(directory, "model_plain.pdiparams"))
    plain = runtime.load(directory, "paddle", off).run(inputs)
    assert "WARNING" not in capsys.readouterr().err
    main = run_predictor(create_predictor(directory, off, os.path.join(directory, "model.json")), inputs)
    for got, want in zip(plain.values(), main):
        np.testing.assert_array_equal(got, want)


def test_an_export_without_the_plain_program_says_so_with_onednn_off(raw_export, tmp_path, capsys):
    import shutil
    old = str(tmp_path / "old_export")
    shutil.copytree(raw_export[0], old)
    os.remove(os.path.join(old, "model_plain.json"))  # as exports before model_plain.json were
    runtime.load(old, "paddle", runtime.RuntimeOptions(onednn=False))
    assert "has no model_plain.json" in capsys.readouterr().err
    runtime.load(old, "paddle", runtime.RuntimeOptions())
    assert "model_plain" not in capsys.readouterr().err


def _conv_off_by_a_thousandth(self, x):
    return 1.001 * forms._CONV2D_FORWARD(self, x)


def test_a_plain_program_that_differs_is_refused_and_not_kept(tmp_path, monkeypatch):
    """save_plain_program runs both programs with oneDNN off: a plain form off by 0.1% is refused, one line."""
    config = detection.load_config(CONFIG)
    built = detection.build_model(config, deploy=True, seed=0)
    directory = str(tmp_path / "export")
    export.save_inference_model(built.model, os.path.join(directory, "model"), [SIZE, SIZE])
    monkeypatch.setattr(forms, "_conv2d_bias_per_channel", _conv_off_by_a_thousandth)
    with pytest.raises(ExportError, match=r"^model_plain.json .*outputs differ from model.json's"):
        export.save_plain_program(built.model, directory, [SIZE, SIZE])
    assert sorted(os.listdir(directory)) == ["model.json", "model.pdiparams"]


@pytest.mark.skipif(not runtime.available("openvino") or not ONNX_EXTRA, reason="needs the [openvino] extra")
def test_openvino_profile_names_the_kernels_that_ran(raw_export):
    """The per-node counters behind tools/openvino_profile.py: fp32 convolutions run fp32 kernels, and
    the counters add up to about one run's time (not more than a timed run, not nothing)."""
    import time

    from ppfuse.runtime.openvino_runtime import OpenVINO
    directory, inputs, _ = raw_export
    model = OpenVINO(directory, runtime.RuntimeOptions(precision="fp32"), perf_count=True)
    times = model.profile(inputs, runs=2)
    convolutions = {kernel: ms for (node, kernel), ms in times.items() if node == "Convolution"}
    assert convolutions and all(("f32" in k.lower() or "fp32" in k.lower()) for k in convolutions), convolutions
    start = time.perf_counter()
    model.run(inputs)
    wall = (time.perf_counter() - start) * 1000
    assert 0 < sum(times.values()) <= 3 * wall


# --- the same export in every runtime, detection by detection (tools/compare_runtimes.py) -----------------------

def _detections(rows):
    from ppfuse.deploy.inference import Detections
    rows = np.asarray(rows, dtype="float32").reshape(-1, 6)
    return Detections(rows[:, 2:], rows[:, 1], rows[:, 0].astype("int64"))


def test_detections_pair_by_class_and_box_within_the_tolerance():
    from ppfuse.measure.runtime_parity import match_detections
    reference = _detections([[0, 0.9, 10, 10, 50, 50], [1, 0.8, 10, 10, 50, 50], [0, 0.4, 100, 100, 140, 160]])
    # the first moved 0.5 px and rescored; the class-1 box became class 2; the third moved 3 px; one extra
    candidate = _detections([[0, 0.88, 10.5, 10, 50, 50.25], [2, 0.8, 10, 10, 50, 50], [0, 0.4, 103, 100, 140, 160],
                             [0, 0.35, 200, 200, 220, 220]])
    match = match_detections(reference, candidate, box_tolerance=1.0)
    assert (match.reference, match.candidate, match.matched) == (3, 4, 1) and not match.same
    assert match.max_box_diff == pytest.approx(0.5) and match.max_score_diff == pytest.approx(0.02)
    # unpaired: reference's class-1 (0.8) and moved box (0.4); candidate's class-2 (0.8), moved (0.4), extra (0.35)
    assert sorted(match.unmatched_scores) == pytest.approx([0.35, 0.4, 0.4, 0.8, 0.8])
    assert match_detections(reference, candidate, box_tolerance=3.0).matched == 2


def test_each_reference_detection_takes_its_closest_candidate_once():
    from ppfuse.measure.runtime_parity import match_detections
    reference = _detections([[0, 0.9, 10, 10, 50, 50], [0, 0.7, 10.6, 10, 50, 50]])
    candidate = _detections([[0, 0.7, 10.6, 10, 50, 50], [0, 0.9, 10.1, 10, 50, 50]])
    match = match_detections(reference, candidate, box_tolerance=1.0)
    assert match.same and match.max_box_diff == pytest.approx(0.1, abs=1e-5)  # 10 -> 10.1, 10.6 -> 10.6


COMPARE = load_tool("compare_runtimes")


def test_compare_runtimes_runs_every_runtime_says_what_ran_and_warns_on_random_weights(nms_export, capsys):
    directory, image, tmp = nms_export
    out = str(tmp / "compare")
    code, stdout, err = run_tool(COMPARE, ["--model_dir", directory, "--image_file", image, "--output_dir", out,
                                           "--results_dir", str(tmp / "results")],
                                 capsys)
    assert code == 0, err
    table = open(os.path.join(out, "compare_runtimes.md")).read()
    assert "**Random weights**" in table and runtime.cpu_model() in table
    rows = {tuple(cell.strip() for cell in line.split("|")[1:3]): line for line in table.splitlines()
            if line.startswith("| paddle") or line.startswith("| onnx") or line.startswith("| openvino")}
    assert len(rows) == sum(len(p) for p in runtime.CPU_PRECISIONS.values())  # every combination has a row
    assert "| reference |" in rows[("paddle", "fp32")]
    checked = 0
    for (name, precision), line in rows.items():
        installed = name == "paddle" or (ONNX_EXTRA and runtime.available(name))
        if precision == "int8" or not installed:
            assert "not run: " in line, line  # no model_int8.onnx written, or the extra missing
        elif precision == "bf16" and not base.bf16_supported():
            assert "not run: " in line and "no bf16 instructions" in line, line
        else:
            assert f"{precision} requested, {precision} ran" in line, line
            checked += 1
    assert checked >= 1 + ONNX_EXTRA  # paddle fp32, and onnxruntime fp32 with the extra


@pytest.mark.skipif(not base.bf16_supported(), reason="this CPU has no bf16 instructions")
def test_paddle_inference_bf16_runs_a_transpose_reshape_softmax_matmul_tail(tmp_path):
    """PicoDet's and GFL's distribution integral (transpose, reshape to [-1, 8], softmax, matmul with the bin
    positions): Paddle 3.3.1's oneDNN bf16 could not create that predictor ("K_lhs:32 != K_rhs:8") until
    ppfuse deleted the reshape fusion for bf16 (paddle_inference.DELETED_FOR_BF16); its outputs stay within
    bf16 rounding of fp32."""
    import paddle

    class Integral(paddle.nn.Layer):
        def __init__(self):
            super().__init__()
            self.conv = paddle.nn.Conv2D(16, 32, 3, padding=1)
            self.register_buffer("bins", paddle.arange(8, dtype="float32"))

        def forward(self, image):
            x = self.conv(image).transpose([0, 2, 3, 1]).reshape([-1, 8])
            return paddle.matmul(paddle.nn.functional.softmax(x, axis=1), self.bins)

    paddle.seed(0)
    layer = Integral()
    layer.eval()
    spec = [paddle.static.InputSpec([None, 16, 20, 20], "float32", "image")]
    paddle.jit.save(paddle.jit.to_static(layer, input_spec=spec, full_graph=True), str(tmp_path / "model"))
    image = np.random.default_rng(0).standard_normal((1, 16, 20, 20)).astype("float32")
    fp32 = runtime.load(str(tmp_path), "paddle", base.RuntimeOptions()).run({"image": image})
    bf16 = runtime.load(str(tmp_path), "paddle", base.RuntimeOptions(precision="bf16")).run({"image": image})
    (want,), (got,) = fp32.values(), bf16.values()
    assert got.shape == want.shape == (20 * 20 * 4,)
    assert np.abs(got - want).mean() < 0.02 * np.abs(want).max() and np.isfinite(got).all()
