"""Dated result files (ppfuse.measure.results): the header every result opens with, the markdown and JSON of
one run written together, the one table renderer, and a tool that writes nothing when asked to.

The machine is a fake ``/proc/cpuinfo`` (so the flags are known); the tool run is tools/compare_runtimes.py
with its measurement replaced by fixed rows, so what is tested is the writing, in a fraction of a second.
"""
import datetime
import json
import os
import platform

import numpy as np
import paddle
import pytest

import ppfuse
from ppfuse.errors import ConfigError
from ppfuse.measure import results, runtime_parity
from ppfuse.runtime import base
from test_errors import load_tool, run_tool

MODEL = "Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz"
FLAGS = ("fpu", "sse2", "avx2", "avx512f", "avx512_vnni")  # no bf16, no AMX
NOW = datetime.datetime(2026, 3, 4, 5, 6, 7, tzinfo=datetime.timezone.utc)
COMMAND = "python tools/benchmark.py -c 'configs/a b.yml' --runs 3"
COMPARE = load_tool("compare_runtimes")


@pytest.fixture
def machine(monkeypatch):
    """A CPU of known model and flags, and one thread setting in the environment."""
    cpuinfo = f"processor\t: 0\nmodel name\t: {MODEL}\nflags\t\t: {' '.join(FLAGS)}\n"
    monkeypatch.setattr(base, "read_cpuinfo", lambda: cpuinfo)
    for name in results.THREAD_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", "3")


def written(directory):
    return sorted(os.listdir(directory)) if os.path.isdir(directory) else []


def test_the_header_names_date_command_machine_flags_versions_and_threads(machine, tmp_path):
    path = results.write("benchmark", "Benchmark", "body text\n", {"x": 1}, str(tmp_path), COMMAND, now=NOW)
    with open(path) as f:
        text = f.read()
    with open(path[:-len(".md")] + ".json") as f:
        record = json.load(f)
    head, body = text.split("\n\n", 1)[0], text.split("- reading:", 1)[1]
    assert head == "# Benchmark, 2026-03-04 05:06 UTC"  # the date comes first, in UTC
    assert record["date_utc"] == "2026-03-04T05:06:07Z"
    assert f"- command: `{COMMAND}`" in text and record["command"] == COMMAND
    assert f"- machine: {MODEL}, {os.cpu_count()} cores" in text and record["machine"]["cpu_model"] == MODEL
    assert record["machine"]["cores"] == os.cpu_count()
    for flag in ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile", "amx_bf16", "amx_int8"):
        state = "present" if flag in FLAGS else "absent"
        assert f"{flag} {state}" in text, flag
        assert record["machine"]["flags"][flag] is (flag in FLAGS)
    expected = {"python": platform.python_version(), "paddle": paddle.__version__, "numpy": np.__version__,
                "ppfuse": ppfuse.__version__}
    for name, version in expected.items():
        assert f"{name} {version}" in text and record["versions"][name] == version
    for name in ("ppdet", "onnxruntime", "openvino", "paddle2onnx"):  # a version where importable, else absent
        assert name in record["versions"]
        assert f"{name} {record['versions'][name] or 'absent'}" in text
    assert "- thread settings: OMP_NUM_THREADS=3" in text and record["thread_settings"] == {"OMP_NUM_THREADS": "3"}
    assert body.rstrip().endswith("body text") and record["data"] == {"x": 1}


def test_markdown_and_json_are_written_together_and_name_the_same_run(machine, tmp_path):
    data = {"sqnr": [float("inf"), 12.5], "shape": np.array([2, 3])}
    first = results.write("sqnr", "SQNR", "| a |\n", data, str(tmp_path), COMMAND, now=NOW)
    again = results.write("sqnr", "SQNR", "| b |\n", data, str(tmp_path), COMMAND, now=NOW)  # the same minute
    stem = os.path.basename(first)[:-len(".md")]
    assert stem.startswith(f"{NOW:%Y-%m-%d_%H%M}_") and "xeon-platinum-8481c" in stem and stem.endswith("avx512")
    assert os.path.dirname(first) == str(tmp_path / "sqnr")
    assert written(tmp_path / "sqnr") == sorted([stem + ".json", stem + ".md", stem + "_2.json", stem + "_2.md"])
    assert again == str(tmp_path / "sqnr" / (stem + "_2.md"))  # a second run does not overwrite the first
    with open(first) as f:
        text = f.read()
    with open(first[:-len(".md")] + ".json") as f:
        record = json.load(f)
    assert f"[{stem}.json]({stem}.json)" in text and record["markdown"] == stem + ".md"
    assert record["topic"] == "sqnr" and record["data"] == {"sqnr": ["inf", 12.5], "shape": [2, 3]}
    with open(again[:-len(".md")] + ".json") as f:
        assert json.load(f)["markdown"] == stem + "_2.md"


def test_nothing_is_written_without_a_results_dir_or_for_an_unknown_topic(machine, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert results.write("benchmark", "Benchmark", "body", {}, "", COMMAND) is None
    assert results.write("benchmark", "Benchmark", "body", {}, None, COMMAND) is None
    with pytest.raises(ValueError, match="topic 'speed'"):
        results.write("speed", "Speed", "body", {}, str(tmp_path / "r"), COMMAND)
    assert written(tmp_path) == []


def test_an_unwritable_results_dir_is_refused_before_measuring(tmp_path):
    import argparse
    parser = argparse.ArgumentParser()
    results.add_arguments(parser)
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    assert results.directory(parser.parse_args(["--results_dir", ""])) is None
    assert results.directory(parser.parse_args(["--no_results"])) is None
    assert results.directory(parser.parse_args([])) == results.DEFAULT_DIR
    with pytest.raises(ConfigError, match="--results_dir .*file/results: .* is not a writable directory"):
        results.directory(parser.parse_args(["--results_dir", str(blocker / "results")]))


def test_the_table_renders_header_rule_and_rows():
    header = ["runtime", "median ms", "note"]
    rows = [["Paddle Inference", 12.25, "ok"], ["OpenVINO bf16", None, "a|b\nc"], ["ONNX Runtime"]]
    expected = "\n".join([
        f"| {header[0]} | {header[1]} | {header[2]} |",
        "| --- | ---: | --- |",  # align "lr": the third column left by default
        f"| {rows[0][0]} | {rows[0][1]} | {rows[0][2]} |",
        f"| {rows[1][0]} | | a\\|b c |",  # None is an empty cell; "|" escaped, the newline a space
        f"| {rows[2][0]} | | |",  # a short row padded with empty cells
    ])
    assert results.table(header, rows, "lr") == expected
    assert results.table(["a"], []) == "| a |\n| --- |"
    with pytest.raises(ValueError, match="a row of 2 cells under 1 columns"):
        results.table(["a"], [[1, 2]])
    with pytest.raises(ValueError, match="align 'c'"):
        results.table(["a"], [], "c")


def _compare_inputs(tmp_path, monkeypatch):
    """An image file, and compare_runtimes' measurement replaced by fixed rows."""
    import cv2
    image = str(tmp_path / "image.png")
    cv2.imwrite(image, np.zeros((8, 8, 3), "uint8"))
    rows = [runtime_parity.Row("paddle", "fp32", ran="precision: fp32 requested, fp32 ran (x)", detections=2),
            runtime_parity.Row("openvino", "fp32", ran="precision: fp32 requested, fp32 ran (y)", detections=2,
                               match=runtime_parity.Match(2, 2, 2, 0.5, 0.01)),
            runtime_parity.Row("openvino", "bf16", error="this CPU has no bf16 instructions")]
    monkeypatch.setattr(runtime_parity, "compare", lambda *args, **kwargs: (rows, False))
    return image, rows


def test_a_tool_writes_its_result_and_says_where_or_writes_none_when_asked(machine, tmp_path, monkeypatch, capsys):
    image, rows = _compare_inputs(tmp_path, monkeypatch)
    monkeypatch.chdir(tmp_path)
    argv = ["--model_dir", "some_export", "--image_file", image, "--output_dir", "out"]
    for off in (["--results_dir", ""], ["--no_results"]):
        code, out, err = run_tool(COMPARE, argv + off, capsys)
        assert code == 0, err
        assert written(tmp_path / "results") == [] and out.count("wrote ") == 1  # the tool's own file only
    code, out, err = run_tool(COMPARE, argv + ["--results_dir", "r"], capsys)
    assert code == 0, err
    (name,) = [n for n in written(tmp_path / "r" / "runtime_parity") if n.endswith(".md")]
    path = os.path.join("r", "runtime_parity", name)
    assert out.rstrip().endswith(f"wrote {path}")  # the tool prints where its result went
    with open(path) as f:
        text = f.read()
    with open(path[:-len(".md")] + ".json") as f:
        record = json.load(f)
    assert record["command"] == f"python tools/compare_runtimes.py {' '.join(argv)} --results_dir r"
    assert f"- command: `{record['command']}`" in text
    with open(os.path.join("out", "compare_runtimes.md")) as f:  # the tool's own file, kept, is the body
        assert text.endswith(f.read())
    assert [r["runtime"] + " " + r["precision"] for r in record["data"]["rows"]] == \
        [r.runtime + " " + r.precision for r in rows]
    assert record["data"]["rows"][1]["match"]["matched"] == 2
