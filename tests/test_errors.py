"""Bad input and faults: one clear line, a non-zero exit code, nothing written.

The command lines are run in-process (tools/*.py loaded as modules) for speed;
one test runs a real subprocess to check the exit code and that stderr is a
single line without a traceback.
"""
import importlib.util
import os
import pickle
import subprocess
import sys

import numpy as np
import paddle
import pytest

from conftest import ROOT
from ppfuse import CheckpointError, cli
from ppfuse.ppdet import detection, export
from ppfuse.core import layers
from ppfuse import export_format

TEST_CONFIG = os.path.join(ROOT, "configs", "ppyoloe", "ppyoloe_plus_crn_s_320_test.yml")


def load_tool(name):
    spec = importlib.util.spec_from_file_location(f"tool_{name}", os.path.join(ROOT, "tools", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


EXPORT = load_tool("export_deploy")
INFER = load_tool("infer")


def run_tool(tool, argv, capsys):
    code = cli.main(tool.run, argv)
    out, err = capsys.readouterr()
    return code, out, err


def expect_error(tool, argv, capsys, pattern, output_dir=None):
    code, out, err = run_tool(tool, argv, capsys)
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == cli.EXIT_USER_ERROR, (code, out, err)
    assert len(lines) == 1 and "Traceback" not in err, err
    import re
    assert re.search(pattern, lines[0]), lines[0]
    if output_dir is not None:
        assert not os.path.exists(output_dir) or os.listdir(output_dir) == [], os.listdir(output_dir)
    return lines[0]


@pytest.fixture
def out_dir(tmp_path):
    return str(tmp_path / "out")


def write(path, text):
    with open(path, "w") as f:
        f.write(text)
    return str(path)


def test_config_missing(capsys, out_dir):
    expect_error(EXPORT, ["-c", "nope.yml", "--output_dir", out_dir], capsys, r"nope\.yml: config file not found",
                 out_dir)


def test_config_not_yaml(tmp_path, capsys, out_dir):
    bad = write(tmp_path / "bad.yml", "architecture: [PPYOLOE\n  x: : :\n")
    expect_error(EXPORT, ["-c", bad, "--output_dir", out_dir], capsys, r"bad\.yml: not valid YAML at line \d+",
                 out_dir)


def test_config_without_architecture(tmp_path, capsys, out_dir):
    cfg = write(tmp_path / "noarch.yml", "metric: COCO\nnum_classes: 3\n")
    expect_error(EXPORT, ["-c", cfg, "--output_dir", out_dir], capsys, r"no 'architecture' key", out_dir)


def test_architecture_unknown(tmp_path, capsys, out_dir):
    cfg = write(tmp_path / "unknown.yml", "architecture: PPYOLOF\n")
    expect_error(EXPORT, ["-c", cfg, "--output_dir", out_dir], capsys,
                 r"architecture 'PPYOLOF' is not known to ppdet", out_dir)


@pytest.mark.parametrize("override", ["weights", "=3", "a..b=1", "x=[1, 2"])
def test_override_malformed(override, capsys, out_dir):
    expect_error(EXPORT, ["-c", TEST_CONFIG, "-o", override, "--output_dir", out_dir], capsys,
                 r"-o .*(key=value|empty part|not YAML)", out_dir)


def test_weights_missing(capsys, out_dir):
    expect_error(EXPORT, ["-c", TEST_CONFIG, "-o", "weights=missing.pdparams", "--output_dir", out_dir], capsys,
                 r"missing\.pdparams: weights file not found", out_dir)


def test_weights_truncated_or_not_a_checkpoint(tmp_path, capsys, out_dir):
    good = tmp_path / "good.pdparams"
    paddle.save({"a": np.ones([64, 64], "float32")}, str(good))
    truncated = tmp_path / "truncated.pdparams"
    truncated.write_bytes(good.read_bytes()[:200])
    garbage = tmp_path / "garbage.pdparams"
    garbage.write_bytes(b"this is not a checkpoint at all")
    for path in (truncated, garbage):
        expect_error(EXPORT, ["-c", TEST_CONFIG, "-o", f"weights={path}", "--output_dir", out_dir], capsys,
                     r"not a readable checkpoint.*truncated or not a \.pdparams", out_dir)


def test_checkpoint_of_another_model(tmp_path, capsys, out_dir):
    other = tmp_path / "other.pdparams"
    paddle.save({"backbone.conv.weight": np.ones([4, 3, 3, 3], "float32")}, str(other))
    line = expect_error(EXPORT, ["-c", TEST_CONFIG, "-o", f"weights={other}", "--output_dir", out_dir], capsys,
                        r"does not fit ppyoloe_plus_crn_s_320_test", out_dir)
    assert "1 unexpected keys: backbone.conv.weight" in line and "missing keys:" in line


def test_crafted_pickle_does_not_run_code(tmp_path):
    """A .pdparams whose unpickling would create a file: refused, and the file is not created."""
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))
    path = tmp_path / "evil.pdparams"
    path.write_bytes(pickle.dumps({"w": Exploit()}))
    with pytest.raises(CheckpointError, match=r"evil\.pdparams: not loaded, the file asks to run code .*"
                                              r"(posix|os)\.system"):
        from ppfuse.core.checkpoint import safe_load
        safe_load(str(path))
    assert not marker.exists()


def test_ordinary_paddle_checkpoint_loads(tmp_path):
    layer = paddle.nn.Sequential(paddle.nn.Conv2D(3, 4, 3), paddle.nn.BatchNorm2D(4))
    path = str(tmp_path / "plain.pdparams")
    paddle.save(layer.state_dict(), path)
    from ppfuse.core.checkpoint import safe_load
    state = safe_load(path)
    assert sorted(state) == sorted(layer.state_dict())
    np.testing.assert_array_equal(state["0.weight"], layer[0].weight.numpy())


@pytest.fixture(scope="module")
def trained_checkpoint(tmp_path_factory):
    config = detection.load_config(TEST_CONFIG)
    built = detection.build_model(config, deploy=False, seed=0)
    path = str(tmp_path_factory.mktemp("ckpt") / "train.pdparams")
    from ppfuse.core.checkpoint import save_state
    save_state(built.model, path)
    return path, {k: v.numpy() for k, v in built.model.state_dict().items()}


def test_batch_norm_statistics_nan_or_nonpositive(trained_checkpoint, tmp_path, capsys, out_dir):
    _, state = trained_checkpoint
    key = "neck.fpn_stages.0.0.convs.0.conv2.conv1.bn._variance"
    for name, value, pattern in (("nan", np.nan, "holds NaN or Inf"), ("neg", -5.0, r"running_var \+ epsilon <= 0")):
        broken = dict(state)
        broken[key] = state[key].copy()
        broken[key][3] = value
        path = str(tmp_path / f"{name}.pdparams")
        paddle.save(broken, path)
        line = expect_error(EXPORT, ["-c", TEST_CONFIG, "-o", f"weights={path}", "--output_dir", out_dir],
                            capsys, pattern, out_dir)
        assert "neck.fpn_stages.0.0.convs.0.conv2.conv1.bn" in line


def test_a_diverged_checkpoint_is_never_exported(trained_checkpoint, tmp_path, capsys, out_dir):
    """A NaN in a conv weight (a diverged training run): exit 2 naming the tensor, nothing written -- not an
    export whose outputs are NaN "verified" against a training form that is NaN too."""
    _, state = trained_checkpoint
    key = next(k for k in state if k.endswith("conv.weight"))
    broken = dict(state)
    broken[key] = state[key].copy()
    broken[key].reshape(-1)[5] = np.nan
    path = str(tmp_path / "diverged.pdparams")
    paddle.save(broken, path)
    expect_error(EXPORT, ["-c", TEST_CONFIG, "-o", f"weights={path}", "--output_dir", out_dir], capsys,
                 rf"{key.replace('.', '[.]')} holds NaN or Inf \(first at index", out_dir)


def test_deploy_checkpoint_without_deploy_true(tmp_path, capsys):
    """export_deploy always deploys, so a deploy checkpoint is handled there; building the
    training form from it (the API with deploy=False) is an error that says what to set."""
    out = str(tmp_path / "exp")
    assert run_tool(EXPORT, ["-c", TEST_CONFIG, "--output_dir", out], capsys)[0] == 0
    ckpt = os.path.join(out, "ppyoloe_plus_crn_s_320_test", export_format.DEPLOY_CHECKPOINT)
    other = str(tmp_path / "other")
    code, text, _ = run_tool(EXPORT, ["-c", TEST_CONFIG, "-o", f"weights={ckpt}", "deploy=false",
                                      "--output_dir", other], capsys)
    assert code == 0 and "weights are already deployed" in text
    config = detection.load_config(TEST_CONFIG, [f"weights={ckpt}", "deploy=false"])
    with pytest.raises(CheckpointError, match=r"is a deploy checkpoint .*load it with deploy: true"):
        detection.build_model(config)


def test_verification_above_tolerance_writes_nothing(capsys, out_dir, monkeypatch):
    """A conversion bug (every folded bias off by 0.01) is caught: beyond 1e-4 and further from a
    float64 evaluation than fp32 rounding puts the training form."""
    from ppfuse.core import kernels
    real = kernels.fold_bn

    def buggy(*args, **kwargs):
        kernel, bias = real(*args, **kwargs)
        return kernel, bias + 0.01
    monkeypatch.setattr(kernels, "fold_bn", buggy)
    line = expect_error(EXPORT, ["-c", TEST_CONFIG, "--output_dir", out_dir], capsys,
                        r"deployed model differs from the original beyond tolerance", out_dir)
    assert "BEYOND 2x the original's" in line


def test_output_directory_not_writable(tmp_path, capsys):
    blocker = write(tmp_path / "a_file", "x")
    expect_error(EXPORT, ["-c", TEST_CONFIG, "--output_dir", os.path.join(blocker, "out")], capsys,
                 r"cannot write the export there .*choose another --output_dir")


def test_write_failing_midway_keeps_the_previous_export(tmp_path, capsys, monkeypatch):
    out = str(tmp_path / "exp")
    assert run_tool(EXPORT, ["-c", TEST_CONFIG, "--output_dir", out], capsys)[0] == 0
    target = os.path.join(out, "ppyoloe_plus_crn_s_320_test")
    before = {n: os.path.getsize(os.path.join(target, n)) for n in os.listdir(target)}

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device", "model_deploy.pdparams")
    monkeypatch.setattr(export.checkpoint, "save_state", disk_full)
    expect_error(EXPORT, ["-c", TEST_CONFIG, "--seed", "1", "--output_dir", out], capsys,
                 r"writing failed \(No space left on device.*previous export there is untouched")
    assert {n: os.path.getsize(os.path.join(target, n)) for n in os.listdir(target)} == before
    assert sorted(os.listdir(out)) == ["ppyoloe_plus_crn_s_320_test"]


class Unregistered(paddle.nn.Layer):
    """Two conv+BN branches added, a type ppfuse has no converter for."""

    def __init__(self):
        super().__init__()
        self.a_conv, self.a_bn = paddle.nn.Conv2D(2, 2, 3, padding=1), paddle.nn.BatchNorm2D(2)
        self.b_conv, self.b_bn = paddle.nn.Conv2D(2, 2, 1), paddle.nn.BatchNorm2D(2)

    def forward(self, x):
        return self.a_bn(self.a_conv(x)) + self.b_bn(self.b_conv(x))


def test_unregistered_multi_branch_layer_warns_or_fails_strict():
    from ppfuse import convert
    from ppfuse import ConversionError
    net = Unregistered()
    layers.randomize(net, 0)
    net.eval()
    report = convert(net)
    assert sorted(report.remaining_batch_norms) == ["a_bn", "b_bn"]
    assert "Unregistered" not in report.counts
    with pytest.raises(ConversionError, match="2 BatchNorm would stay unfolded"):
        convert(net, strict=True)


def test_gpu_on_cpu_build_and_bad_images(tmp_path, capsys):
    if paddle.is_compiled_with_cuda():
        pytest.skip("this Paddle build has CUDA")
    out = str(tmp_path / "exp")
    assert run_tool(EXPORT, ["-c", TEST_CONFIG, "--output_dir", out], capsys)[0] == 0
    model_dir = os.path.join(out, "ppyoloe_plus_crn_s_320_test")
    image = str(tmp_path / "img.jpg")
    import cv2
    cv2.imwrite(image, np.zeros([32, 32, 3], "uint8"))
    results = str(tmp_path / "results")
    expect_error(INFER, ["--model_dir", model_dir, "--image_file", image, "--device", "gpu",
                         "--output_dir", results], capsys, r"--device gpu: this Paddle .* has no CUDA support", results)
    expect_error(INFER, ["--model_dir", model_dir, "--image_file", str(tmp_path / "no.jpg"),
                         "--output_dir", results], capsys, r"no\.jpg: image not found", results)
    not_image = write(tmp_path / "text.jpg", "hello")
    expect_error(INFER, ["--model_dir", model_dir, "--image_file", not_image, "--output_dir", results], capsys,
                 r"text\.jpg: not an image OpenCV can read", results)
    code, out_text, _ = run_tool(INFER, ["--model_dir", model_dir, "--image_file", image, "--threshold", "0",
                                         "--output_dir", results], capsys)
    assert code == 0 and sorted(os.listdir(results)) == ["img.jpg", "img.json"]


def test_real_process_exit_code_and_one_line(tmp_path):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "export_deploy.py"), "-c", "missing.yml"],
                          capture_output=True, text=True, cwd=str(tmp_path))
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and errors == ["error: missing.yml: config file not found"]
    assert "Traceback" not in proc.stderr
    debug = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "export_deploy.py"), "-c", "missing.yml",
                            "--debug"], capture_output=True, text=True, cwd=str(tmp_path))
    assert debug.returncode != 0 and "Traceback" in debug.stderr


def test_fp16_overflow_is_named_before_fp16_use(trained_checkpoint, tmp_path, capsys):
    """A tiny running variance (with a large gamma) makes the folded kernel exceed float16: the export
    warns and names it."""
    _, state = trained_checkpoint
    key = "backbone.stem.conv1.bn._variance"
    broken = dict(state)
    broken[key] = np.full_like(state[key], 1e-12)
    broken["backbone.stem.conv1.bn.weight"] = np.full_like(state["backbone.stem.conv1.bn.weight"], 1e4)
    path = str(tmp_path / "tiny_var.pdparams")
    paddle.save(broken, path)
    out = str(tmp_path / "out")
    code, _, err = run_tool(EXPORT, ["-c", TEST_CONFIG, "-o", f"weights={path}", "--atol", "1", "--rtol", "1",
                                     "--output_dir", out], capsys)
    assert code == 0
    warning = [line for line in err.splitlines() if "float16 range" in line]
    assert len(warning) == 1 and "backbone.stem.conv1.conv.weight" in warning[0], err
    import json
    with open(os.path.join(out, "ppyoloe_plus_crn_s_320_test", "ppfuse_report.json")) as f:
        report = json.load(f)
    assert "backbone.stem.conv1.conv.weight" in report["fp16_overflow"]
