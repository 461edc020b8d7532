"""First use as a PaddleDetection user meets it: quiet commands, plain verification text,
honest output for random weights, one clear line for a Paddle that is too old.

The commands run in real subprocesses here, because the noise they must hide comes
from C++ (glog, ``std::cout``) straight to the process's file descriptors.
"""
import ctypes
import json
import os
import re
import subprocess
import sys

import numpy as np
import paddle
import pytest

from conftest import ROOT
from ppfuse import cli
from ppfuse.deploy.inference import Detections
from ppfuse.core.verify import compare, judge
from ppfuse import export_format
from test_errors import EXPORT, INFER, TEST_CONFIG, expect_error, run_tool

MODEL = "ppyoloe_plus_crn_s_320_test"

# What Paddle 3.3.1 and ppdet 2.6.0 print on their own, written here independently of ppfuse.cli's patterns
NOISE = [re.compile(p) for p in (r"numba", r"ccache", r"not support input out tensor", r"ReduceMeanCheckIfOneDNN",
                                 r"^[IW]\d{4} \d\d:\d\d:\d\d", r"UserWarning")]


def noise_in(text):
    return [line for line in text.splitlines() if any(p.search(line) for p in NOISE)]


def tool(name, *args):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tools", f"{name}.py"), *args], capture_output=True,
                          text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr
    return proc


@pytest.fixture(scope="module")
def first_use(tmp_path_factory):
    """The quick start's commands on the test config: export random weights, make an image, infer."""
    tmp = tmp_path_factory.mktemp("first_use")
    exported = tool("export_deploy", "-c", TEST_CONFIG, "--output_dir", str(tmp / "inference"))
    image_dir = tmp / "demo"
    tool("make_shapes_dataset", "--output_dir", str(image_dir), "--images", "1", "--split", "demo",
         "--size", "200")
    model_dir = str(tmp / "inference" / MODEL)
    args = ["--model_dir", model_dir, "--image_dir", str(image_dir / "demo"), "--print_max", "5"]
    inferred = tool("infer", *args, "--output_dir", str(tmp / "infer"))
    return {"tmp": tmp, "model_dir": model_dir, "export": exported, "infer": inferred, "infer_args": args}


def test_commands_show_ppfuse_lines_and_no_third_party_noise(first_use):
    exported, inferred = first_use["export"], first_use["infer"]
    for proc in (exported, inferred):
        assert noise_in(proc.stdout) == [] and noise_in(proc.stderr) == [], (proc.stdout, proc.stderr)
    assert "verified against the training form:" in exported.stdout
    assert f"wrote {first_use['tmp'] / 'inference' / MODEL}/" in exported.stdout
    assert all(line.startswith("WARNING: ") for line in exported.stderr.splitlines()), exported.stderr
    assert any(line.startswith("WARNING: no weights given") for line in exported.stderr.splitlines())
    assert "detections with score >= 0.5" in inferred.stdout


def test_debug_shows_the_library_noise(first_use):
    """The noise is real in this environment (so the test above can fail), and --debug shows it."""
    debug = tool("infer", *first_use["infer_args"], "--output_dir", str(first_use["tmp"] / "infer_debug"), "--debug")
    assert noise_in(debug.stdout + debug.stderr), (debug.stdout, debug.stderr)
    help_text = tool("infer", "--help").stdout
    assert "--debug" in help_text and "Paddle and ppdet" in " ".join(help_text.split())


def test_random_weights_are_said_once_and_boxes_stay_in_the_image(first_use):
    with open(os.path.join(first_use["model_dir"], export_format.REPORT_FILE)) as f:
        report = json.load(f)
    assert report["random_weights"] is True and report["weights"] is None
    warnings = [line for line in first_use["infer"].stderr.splitlines() if "RANDOM weights" in line]
    assert len(warnings) == 1 and warnings[0].startswith("WARNING: "), first_use["infer"].stderr
    printed = [line for line in first_use["infer"].stdout.splitlines() if line.startswith("  ") and "[" in line]
    assert 0 < len(printed) <= 5  # --print_max 5
    with open(first_use["tmp"] / "infer" / "demo_00000.json") as f:
        detections = json.load(f)["detections"]
    boxes = np.array([d["box"] for d in detections] + [[float(v) for v in re.search(r"\[(.*)\]", line).group(1)
                                                        .split(",")] for line in printed])
    assert len(detections) > 0
    assert (boxes >= 0).all() and (boxes[:, [0, 2]] <= 200).all() and (boxes[:, [1, 3]] <= 200).all()
    assert ((boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])).all()


def test_export_of_given_weights_is_not_called_random(first_use, capsys):
    checkpoint = os.path.join(first_use["model_dir"], export_format.DEPLOY_CHECKPOINT)
    out = str(first_use["tmp"] / "from_checkpoint")
    code, _, err = run_tool(EXPORT, ["-c", TEST_CONFIG, "-o", f"weights={checkpoint}", "--output_dir", out], capsys)
    assert code == 0 and "RANDOM" not in err
    model_dir = os.path.join(out, MODEL)
    with open(os.path.join(model_dir, export_format.REPORT_FILE)) as f:
        assert json.load(f)["random_weights"] is False
    image = os.path.join(first_use["tmp"], "demo", "demo", "demo_00000.jpg")
    code, _, err = run_tool(INFER, ["--model_dir", model_dir, "--image_file", image,
                                    "--output_dir", str(first_use["tmp"] / "infer2")], capsys)
    assert code == 0 and "RANDOM" not in err


def test_clipped_drops_boxes_left_empty():
    boxes = np.array([[-50, -20, 30, 40], [10, 10, 500, 90], [-30, 5, -1, 50], [20, 120, 60, 200]], "float32")
    detections = Detections(boxes, np.array([0.9, 0.8, 0.7, 0.6], "float32"), np.array([0, 1, 2, 3]), ["a"] * 4)
    clipped = detections.clipped(height=100, width=200)
    np.testing.assert_array_equal(clipped.boxes, [[0, 0, 30, 40], [10, 10, 200, 90]])
    np.testing.assert_array_equal(clipped.scores, np.array([0.9, 0.8], "float32"))
    np.testing.assert_array_equal(clipped.classes, [0, 1])


@pytest.mark.parametrize("line", [
    "Warning: Unable to use numba in PP-Tracking, please install numba, for example(python3.7): "
    "`pip install numba==0.56.4`",
    "W1126 13:05:57.369800  2824 eager_utils.cc:3584] Paddle static graph(PIR) not support input out tensor "
    "for now!!!!!",
    "I1126 13:05:57.369800  2824 analysis_predictor.cc:123] some info",
    "ReduceMeanCheckIfOneDNNSupport\n",
    "[Paddle2ONNX] Start parsing the Paddle model file...",
    "2026-11-26 13:48:15 [INFO]\tTry to perform optimization on the ONNX model with onnxoptimizer.",
    "\x1b[0;33m2026-11-26 13:48:16 [WARNING]\tFail to optimize onnx model with error: pass eliminate_nop_cast",
])
def test_noise_lines_are_recognised(line):
    assert cli.is_noise(line)


@pytest.mark.parametrize("line", [
    "WARNING: no weights given (-o weights=PATH): exporting RANDOM weights",
    "error: x.yml: config file not found",
    "E1126 13:05:57.369800  2824 predictor.cc:12] an error of Paddle's is kept",
    "verified against the training form: max abs error 2.2e-05",
])
def test_own_lines_and_errors_are_kept(line):
    assert not cli.is_noise(line)


def test_filter_drops_noise_written_to_the_file_descriptors(capfd):
    """Both Python's and C's writes (libc buffers stdout when it is not a terminal) go through the filter."""
    libc = ctypes.CDLL(None)
    with cli.filtered_output():
        os.write(1, b"ReduceMeanCheckIfOneDNNSupport\nkept on stdout\n")
        libc.printf(b"ReduceMeanCheckIfOneDNNSupport\nkept from C\n")
        os.write(2, b"W1126 13:05:57.369800  2824 eager_utils.cc:3584] Paddle static graph(PIR) not support\n")
        os.write(2, b"kept on stderr\n")
    out, err = capfd.readouterr()
    assert out.splitlines() == ["kept on stdout", "kept from C"] and err.splitlines() == ["kept on stderr"]


@pytest.mark.parametrize("version", ["2.6.2", "2.5.0"])
def test_old_paddle_is_one_line(version, monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(paddle, "__version__", version)
    out_dir = str(tmp_path / "out")
    expect_error(EXPORT, ["-c", TEST_CONFIG, "--output_dir", out_dir], capsys,
                 rf"^error: ppfuse needs Paddle >= 3\.0, found {re.escape(version)}; install PaddlePaddle 3\.x",
                 out_dir)
    image = str(tmp_path / "img.jpg")
    import cv2
    cv2.imwrite(image, np.zeros([32, 32, 3], "uint8"))
    results = str(tmp_path / "results")
    expect_error(INFER, ["--model_dir", str(tmp_path / "any"), "--image_file", image, "--output_dir", results],
                 capsys, rf"^error: ppfuse needs Paddle >= 3\.0, found {re.escape(version)}", results)


@pytest.mark.parametrize("version", ["3.0.0", "3.3.1", "3.0.0rc1", "0.0.0"])
def test_paddle_3_and_develop_builds_pass_the_check(version, monkeypatch):
    monkeypatch.setattr(paddle, "__version__", version)
    export_format.require_paddle_3()


def test_verification_text_says_which_criterion_decided():
    rng = np.random.default_rng(0)
    truth = {"boxes": rng.uniform(0, 1, (1, 50, 4)), "scores": rng.uniform(0, 1, (1, 3, 50))}
    original = {k: v + 1e-3 * rng.standard_normal(v.shape) for k, v in truth.items()}

    def candidate(error):
        return {k: v + error * rng.standard_normal(v.shape) for k, v in truth.items()}

    within = compare(original, original, 1e-4, 1e-4)
    assert within.brief().endswith("within tolerance (atol 0.0001, rtol 0.0001)") and "<--" not in within.summary()

    passed = judge(original, candidate(1e-3), 1e-4, 1e-4, lambda: truth)
    assert passed.ok and not passed.within_tolerance
    text = passed.summary()
    assert "passed by the float64 criterion" in passed.brief() and "above tolerance" not in text and "<--" not in text
    assert "BEYOND" not in text and "failed" not in text

    failed = judge(original, candidate(1e-2), 1e-4, 1e-4, lambda: truth)
    assert not failed.ok
    assert "failed the float64 criterion" in failed.brief() and "BEYOND 2x the original's" in failed.brief()
    assert "<-- above atol/rtol and failed the float64 criterion" in failed.summary()


@pytest.mark.parametrize("options, message", [
    (dict(precision="fp16"), r"--precision fp16 runs on GPU only"),
    (dict(tensorrt=True), r"--tensorrt needs --device gpu"),
    (dict(device="gpu"), r"--device gpu: this Paddle .* has no CUDA support; install a PaddlePaddle 3\.x GPU build"),
])
def test_gpu_options_on_a_cpu_build_are_refused_in_one_line(options, message):
    from ppfuse.errors import InferenceError
    from ppfuse.runtime import RuntimeOptions
    from ppfuse.runtime.paddle_inference import check_device
    if paddle.is_compiled_with_cuda():
        pytest.skip("this Paddle build has CUDA")
    with pytest.raises(InferenceError, match=message):
        check_device(RuntimeOptions(**options))
