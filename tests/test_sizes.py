"""The export size, set in one place: --input_size (or the TestReader override) sets eval_size with it; a size
the architecture cannot take is one line naming the constraint and the fix, never a blame on Paddle's version."""
import os

from conftest import ROOT
from ppfuse import export_format
from ppfuse.ppdet import detection
from test_errors import EXPORT, expect_error, run_tool

TEST_CONFIG = os.path.join(ROOT, "configs", "ppyoloe", "ppyoloe_plus_crn_s_320_test.yml")  # eval_size 320


def test_a_reader_size_override_sets_eval_size_too():
    config = detection.load_config(TEST_CONFIG, ["TestReader.inputs_def.image_shape=[3,256,256]"])
    assert config.input_size() == [256, 256] and list(config["eval_size"]) == [256, 256]
    explicit = detection.load_config(TEST_CONFIG, ["TestReader.inputs_def.image_shape=[3,256,256]",
                                                   "eval_size=[320,320]"])
    assert explicit.input_size() == [256, 256] and list(explicit["eval_size"]) == [320, 320]
    sized = detection.load_config(TEST_CONFIG, [], input_size=[192, 224])
    assert sized.input_size() == [192, 224] and list(sized["eval_size"]) == [192, 224]


def test_input_size_exports_at_that_size(tmp_path, capsys):
    out = str(tmp_path / "out")
    code, stdout, err = run_tool(EXPORT, ["-c", TEST_CONFIG, "--input_size", "256", "256", "--output_dir", out],
                                 capsys)
    assert code == 0, err
    directory = os.path.join(out, "ppyoloe_plus_crn_s_320_test")
    report = export_format.read_report(directory)
    assert report["input_size"] == [256, 256]
    with open(os.path.join(directory, export_format.INFER_CFG)) as f:
        assert "256" in f.read()


def test_a_size_not_a_multiple_of_32_is_one_line_naming_the_constraint(tmp_path, capsys):
    out = str(tmp_path / "out")
    line = expect_error(EXPORT, ["-c", TEST_CONFIG, "--input_size", "300", "300", "--output_dir", out], capsys,
                        r"input size \[300, 300\] is not a multiple of 32, .*--input_size 288 288", out)
    assert "Paddle" not in line.split("(ppdet's forward fails")[0]


def test_an_eval_size_that_disagrees_with_the_input_says_how_to_fix_it(tmp_path, capsys):
    out = str(tmp_path / "out")
    line = expect_error(EXPORT, ["-c", TEST_CONFIG, "-o", "TestReader.inputs_def.image_shape=[3,256,256]",
                                 "eval_size=[320,320]", "--output_dir", out], capsys,
                        r"precomputes its anchors for eval_size \[320, 320\], but the input is \[256, 256\]; "
                        r"export with --input_size 256 256", out)
    assert "use a Paddle version" not in line
