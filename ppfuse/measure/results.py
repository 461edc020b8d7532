"""Dated result files: what a measuring tool found, with when, how and on what machine it was found.

Every tool that measures writes ``results/<topic>/<YYYY-MM-DD_HHMM>_<cpu tag>.md`` and a ``.json`` of the
same name (:func:`write`); both open with the date (UTC), the command line, the machine (CPU model, cores,
memory, the ISA flags that decide bf16 and int8), the versions of the packages that ran, and the thread
settings. Docs link to these files instead of retyping their figures. :func:`table` renders every
markdown table of :mod:`ppfuse.measure`.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import re
import shlex
import sys
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence

from ppfuse.errors import ConfigError
from ppfuse.runtime.base import ISA_FLAGS, cpu_flags, cpu_model

DEFAULT_DIR = "results"

# topic (the folder under results/) -> the tool that writes it
TOPICS = {
    "benchmark": "tools/benchmark.py",
    "accuracy": "tools/accuracy_parity.py",
    "coverage": "tools/family_coverage.py",
    "runtime_parity": "tools/compare_runtimes.py",
    "sqnr": "tools/quantization_error.py",
    "openvino_profile": "tools/openvino_profile.py",
    "scale": "tools/scale_benchmark.py",
    "ppdet_source": "tools/ppdet_source.py",
}

# name in the header -> the distributions that may provide it (the first installed one is reported)
PACKAGES = {
    "paddle": ("paddlepaddle", "paddlepaddle-gpu"),
    "numpy": ("numpy",),
    "ppfuse": ("ppfuse",),
    "ppdet": ("paddledet",),
    "onnxruntime": ("onnxruntime", "onnxruntime-openvino"),
    "openvino": ("openvino",),
    "paddle2onnx": ("paddle2onnx",),
}

# environment variables that set threads or the ISA the runtimes use; reported when set
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "OMP_PROC_BIND", "OMP_PLACES",
                    "OMP_WAIT_POLICY", "KMP_AFFINITY", "KMP_BLOCKTIME", "KMP_HW_SUBSET", "ONEDNN_MAX_CPU_ISA",
                    "DNNL_MAX_CPU_ISA", "ONEDNN_DEFAULT_FPMATH_MODE")

READING = ("ratios compare rows of this file, measured in one run on one machine; figures of files from other "
           "machines, CPUs or versions are not comparable")


# --- the one table renderer -------------------------------------------------------------------------------------


def _cell(value: Any) -> str:
    text = "" if value is None else str(value)
    return text.replace("\n", " ").replace("|", "\\|")


def table(header: Sequence[str], rows: Iterable[Sequence[Any]], align: str = "") -> str:
    """A markdown table of ``rows`` under ``header``, one line per row, without a trailing newline.

    Args:
        header: the column titles.
        rows: the cells of each row; ``None`` is an empty cell, other values are written with ``str``. A row
            shorter than the header is padded with empty cells. ``|`` in a cell is escaped, a newline is a space.
        align: one letter per column, ``l`` (left, the default for missing letters) or ``r`` (right, numbers).

    Raises:
        ValueError: a row with more cells than the header, or an alignment letter other than ``l``/``r``.
    """
    width = len(header)
    if set(align) - {"l", "r"} or len(align) > width:
        raise ValueError(f"table: align {align!r} for {width} columns; use one of 'l', 'r' per column")
    rule = ["---:" if letter == "r" else "---" for letter in align.ljust(width, "l")]

    def line(cells: Sequence[str]) -> str:
        return "|" + "|".join(f" {cell} " if cell else " " for cell in cells) + "|"

    lines = [line([_cell(title) for title in header]), line(rule)]
    for row in rows:
        row = list(row)
        if len(row) > width:
            raise ValueError(f"table: a row of {len(row)} cells under {width} columns: {row}")
        lines.append(line([_cell(value) for value in row] + [""] * (width - len(row))))
    return "\n".join(lines)


# --- what every result records ----------------------------------------------------------------------------------


def command_line(tool: str, argv: Sequence[str]) -> str:
    """``python tools/x.py ARGS`` as typed: the script as the shell gave it when ``tool`` is the running
    script, else ``tools/<its name>`` (a tool called from Python, as the tests do)."""
    name = os.path.basename(tool)
    script = sys.argv[0] if sys.argv and os.path.basename(sys.argv[0]) == name else os.path.join("tools", name)
    return " ".join(["python", shlex.quote(script)] + [shlex.quote(str(arg)) for arg in argv])


def _memory_bytes() -> Optional[int]:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def machine() -> Dict[str, Any]:
    """The CPU model (``/proc/cpuinfo``), its cores (and how many this process may use), memory, and which
    of the ISA flags that decide bf16 and int8 speed it has."""
    flags = cpu_flags()
    try:
        usable = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        usable = os.cpu_count()
    return {"cpu_model": cpu_model(), "cores": os.cpu_count(), "usable_cores": usable,
            "memory_bytes": _memory_bytes(), "flags": {flag: flag in flags for flag in ISA_FLAGS}}


def _version(name: str, distributions: Sequence[str]) -> Optional[str]:
    """The version of the module ``name`` that runs here, or None when it cannot be imported. An imported
    module says its own; otherwise its distribution's metadata does (without importing it: ppdet is slow)."""
    module = sys.modules.get(name)
    if module is not None and isinstance(getattr(module, "__version__", None), str):
        return module.__version__
    try:
        if importlib.util.find_spec(name) is None:
            return None
    except (ImportError, ValueError):
        return None
    for distribution in distributions:
        try:
            return importlib.metadata.version(distribution)
        except importlib.metadata.PackageNotFoundError:
            continue
    return "unknown"


def versions() -> Dict[str, Optional[str]]:
    """Python's version and each of :data:`PACKAGES` (None: not importable here)."""
    found: Dict[str, Optional[str]] = {"python": platform.python_version()}
    found.update((name, _version(name, distributions)) for name, distributions in PACKAGES.items())
    return found


def thread_settings() -> Dict[str, str]:
    """The :data:`THREAD_VARIABLES` set in the environment."""
    return {name: os.environ[name] for name in THREAD_VARIABLES if name in os.environ}


def cpu_tag(model: str, flags: Iterable[str]) -> str:
    """A file-name word for the machine: the CPU model without trademarks, clock and filler words, and its widest
    ISA (``amx``, ``avx512``, ``avx2``), e.g. ``intel-xeon-platinum-8481c-amx``."""
    flags = set(flags)
    name = re.sub(r"\((r|tm)\)|@.*$|\b(cpu|processor|\d+-core)\b", " ", model.lower())
    words = re.findall(r"[a-z0-9]+", name)[:6] or ["unknown", "cpu"]
    isa = next((tag for flag, tag in (("amx_tile", "amx"), ("avx512f", "avx512"), ("avx2", "avx2"))
                if flag in flags), "")
    return "-".join(words + ([isa] if isa else []))


@dataclasses.dataclass
class Context:
    """Where a result comes from; the opening of both files of a result."""
    date: datetime.datetime  # UTC
    command: str
    machine: Dict[str, Any]
    versions: Dict[str, Optional[str]]
    threads: Dict[str, str]

    @classmethod
    def here(cls, command: str, now: Optional[datetime.datetime] = None) -> "Context":
        now = (now or datetime.datetime.now(datetime.timezone.utc)).astimezone(datetime.timezone.utc)
        return cls(now, command, machine(), versions(), thread_settings())

    def stem(self) -> str:
        flags = [flag for flag, present in self.machine["flags"].items() if present]
        return f"{self.date:%Y-%m-%d_%H%M}_{cpu_tag(self.machine['cpu_model'], flags)}"

    def to_dict(self) -> Dict[str, Any]:
        return {"date_utc": self.date.strftime("%Y-%m-%dT%H:%M:%SZ"), "command": self.command,
                "machine": self.machine, "versions": self.versions, "thread_settings": self.threads}

    def markdown(self, title: str, json_name: str, files: Sequence[str] = ()) -> str:
        m = self.machine
        memory = f"{m['memory_bytes'] / 2**30:.1f} GiB memory" if m["memory_bytes"] else "memory unknown"
        usable = f" ({m['usable_cores']} usable by this process)" if m["usable_cores"] != m["cores"] else ""
        lines = [f"# {title}, {self.date:%Y-%m-%d %H:%M} UTC", "",
                 f"- command: `{self.command}`",
                 f"- machine: {m['cpu_model']}, {m['cores']} cores{usable}, {memory}",
                 "- CPU flags: " + ", ".join(f"{flag} {'present' if present else 'absent'}"
                                             for flag, present in m["flags"].items()),
                 "- versions: " + ", ".join(f"{name} {version or 'absent'}" for name, version in self.versions.items()),
                 "- thread settings: " + (", ".join(f"{k}={v}" for k, v in self.threads.items())
                                          or f"none in the environment ({', '.join(THREAD_VARIABLES[:3])}, ...)"),
                 f"- data: [{json_name}]({json_name})"]
        if files:
            # the tool's other files live in its output directory, which is not kept with the results: named, not
            # linked
            lines.append("- also written by the run (not kept here): " + ", ".join(f"`{path}`" for path in files))
        lines.append(f"- reading: {READING}")
        return "\n".join(lines) + "\n"


# --- the files --------------------------------------------------------------------------------------------------


def jsonable(value: Any) -> Any:
    """``value`` as strict JSON: dataclasses as dicts, numpy values as numbers and lists, a non-finite float as
    the string ``inf``, ``-inf`` or ``nan`` (an infinite SQNR is a result, and JSON has no infinity)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return jsonable(dataclasses.asdict(value))
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        items = sorted(value) if isinstance(value, (set, frozenset)) else value
        return [jsonable(v) for v in items]
    if hasattr(value, "tolist") and callable(value.tolist):  # numpy arrays and scalars
        return jsonable(value.tolist())
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else "inf" if value > 0 else "-inf"
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def _free_stem(directory: str, stem: str) -> str:
    """``stem``, or ``stem_2``, ``stem_3`` ... when a result of that minute and machine is there already."""
    candidate, index = stem, 1
    while any(os.path.exists(os.path.join(directory, candidate + ext)) for ext in (".md", ".json")):
        index += 1
        candidate = f"{stem}_{index}"
    return candidate


def write(topic: str, title: str, body: str, data: Any, results_dir: Optional[str] = DEFAULT_DIR,
          command: str = "", files: Sequence[str] = (), now: Optional[datetime.datetime] = None) -> Optional[str]:
    """Write one result as ``<results_dir>/<topic>/<YYYY-MM-DD_HHMM>_<cpu tag>.md`` and ``.json`` beside it.

    Both open with the same :class:`Context` (date, command, machine, versions, thread settings); the
    markdown goes on with ``body`` (the tool's tables), the JSON with ``data`` under ``"data"``. Both files
    are written or neither.

    Args:
        topic: one of :data:`TOPICS`, the folder the result goes in.
        title: the markdown's heading (the date follows it).
        body: markdown, the tool's own tables and notes.
        data: what the JSON holds under ``"data"`` (made JSON by :func:`jsonable`).
        results_dir: where the topic folders are; ``""`` or None writes nothing.
        command: the command line (:func:`command_line`).
        files: other files the tool wrote (plots, its output directory's copy), linked from the markdown.
        now: the date to record (default: now).

    Returns:
        The markdown's path, or None when ``results_dir`` is empty.

    Raises:
        ValueError: an unknown topic.
        ConfigError: the files cannot be written.
    """
    if topic not in TOPICS:
        raise ValueError(f"results.write: topic {topic!r}; use one of {', '.join(TOPICS)}")
    if not results_dir:
        return None
    context = Context.here(command, now)
    directory = os.path.join(results_dir, topic)
    staged: List[str] = []
    try:
        os.makedirs(directory, exist_ok=True)
        stem = _free_stem(directory, context.stem())
        links = [os.path.relpath(path) for path in files]
        texts = {".md": context.markdown(title, stem + ".json", links) + "\n" + body.rstrip("\n") + "\n",
                 ".json": json.dumps(dict(context.to_dict(), topic=topic, markdown=stem + ".md",
                                          data=jsonable(data)), indent=1, allow_nan=False) + "\n"}
        for ext, text in texts.items():
            staged.append(os.path.join(directory, f".{stem}{ext}.tmp"))
            with open(staged[-1], "w") as f:
                f.write(text)
        for ext, path in zip(texts, staged):
            os.replace(path, os.path.join(directory, stem + ext))
    except OSError as exc:
        raise ConfigError(f"--results_dir {results_dir}: cannot write the {topic} result "
                          f"({exc.strerror or exc}); give a writable directory or --no_results") from None
    finally:
        for path in staged:
            if os.path.exists(path):
                os.remove(path)
    return os.path.join(directory, stem + ".md")


# --- the command-line arguments ---------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``--results_dir DIR`` (default ``results``; ``''`` writes none) and ``--no_results``."""
    parser.add_argument("--results_dir", default=DEFAULT_DIR, help="where the dated result file (markdown and "
                        f"JSON, under <dir>/<topic>/) goes (default {DEFAULT_DIR}; '' writes none)")
    parser.add_argument("--no_results", action="store_true", help="write no dated result file")


def directory(args: argparse.Namespace) -> Optional[str]:
    """The results directory the arguments of :func:`add_arguments` ask for, or None for none; refused now,
    before any measuring, when it cannot be written."""
    if args.no_results or not args.results_dir:
        return None
    existing = os.path.abspath(args.results_dir)
    while not os.path.exists(existing) and os.path.dirname(existing) != existing:
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing) or not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"--results_dir {args.results_dir}: {existing} is not a writable directory; give "
                          "another or --no_results")
    return args.results_dir
