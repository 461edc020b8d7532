"""What the command lines in tools/ share: PaddleDetection-style arguments and error handling.

``-c config.yml``, ``-o key=value ...`` and ``--output_dir`` follow
PaddleDetection's ``tools/export_model.py``. A :class:`PPFuseError` (a user
error) ends the command with one line on stderr and exit code 2; ``--debug``
shows the traceback instead.

Paddle and ppdet print lines that say nothing to a ppfuse user, some from C++
straight to the process's file descriptors (glog, ``std::cout``), some from
Python at import time. Unless ``--debug``, :func:`quiet_libraries` keeps them
off screen: Python warnings and library logging are muted, and file
descriptors 1 and 2 are passed through a filter that drops the lines of
:data:`THIRD_PARTY_NOISE` and forwards everything else unchanged. One
warning comes before any of this can run: ``import paddle`` (by ``import
ppfuse``) warns that ccache is missing, so each tool mutes that warning itself
before importing ppfuse.
"""
from __future__ import annotations

import argparse
import contextlib
import ctypes
import logging
import os
import re
import sys
import threading
import warnings
from typing import Callable, Iterator, List, Optional

from ppfuse.errors import PPFuseError

EXIT_USER_ERROR = 2

DEBUG_HELP = ("show full tracebacks and every message of Paddle and ppdet (glog lines, Python warnings, "
              "ppdet's numba notice), which are filtered out otherwise")

# Lines dropped from the output of ppfuse's commands (seen with Paddle 3.3.1 and ppdet 2.6.0).
THIRD_PARTY_NOISE = (
    # glog INFO and WARNING lines of Paddle's C++, e.g. "W1126 13:05:57.369800  2824 eager_utils.cc:3584]
    # Paddle static graph(PIR) not support input out tensor for now!!!!!" while tracing; ERROR lines stay
    re.compile(r"^[IW]\d{4} \d\d:\d\d:\d\d\.\d+ +\d+ [\w.-]+:\d+\] "),
    # printed (std::cout) by Paddle Inference's oneDNN passes, four times per predictor
    re.compile(r"^ReduceMeanCheckIfOneDNNSupport\s*$"),
    # printed twice by ppdet 2.6.0 at import (its MOT trackers, unused here)
    re.compile(r"^Warning: Unable to use numba in PP-Tracking"),
    # paddle2onnx's progress and its failed optional onnxoptimizer step (ppfuse checks the ONNX model itself)
    re.compile(r"^\[Paddle2ONNX\] "),
    re.compile(r"^(\x1b\[[0-9;]*m)?\d{4}-\d\d-\d\d \d\d:\d\d:\d\d \[(INFO|WARNING)\]\t"),
)


def base_parser(description: str, config: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    if config:
        parser.add_argument("-c", "--config", required=True, help="PaddleDetection YAML config")
        parser.add_argument("-o", "--opt", nargs="*", default=[], metavar="KEY=VALUE",
                            help="override config keys, e.g. -o weights=model.pdparams deploy=true")
    parser.add_argument("--debug", action="store_true", help=DEBUG_HELP)
    return parser


def add_export_and_images(parser: argparse.ArgumentParser) -> None:
    """``--model_dir`` (an export) and one of ``--image_file`` / ``--image_dir``: the tools that run an export."""
    parser.add_argument("--model_dir", required=True, help="directory written by tools/export_deploy.py")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--image_file", help="one image")
    source.add_argument("--image_dir", help="a folder of images")


def is_noise(line: str) -> bool:
    """Whether one output line is third-party noise (:data:`THIRD_PARTY_NOISE`)."""
    return any(pattern.search(line) for pattern in THIRD_PARTY_NOISE)


def _flush_all() -> None:
    """Flush Python's and C's buffered stdout/stderr, so what is pending goes where the fds point now."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    with contextlib.suppress(Exception):  # std::cout from Paddle's C++ sits in libc's buffer when fd 1 is a pipe
        ctypes.CDLL(None).fflush(None)


class _LineFilter:
    """File descriptor ``fd`` redirected into a pipe; a thread forwards each line to the original
    destination unless :func:`is_noise` says to drop it."""

    def __init__(self, fd: int):
        self.fd = fd
        self.original = os.dup(fd)
        read_end, write_end = os.pipe()
        os.dup2(write_end, fd)
        os.close(write_end)
        self.thread = threading.Thread(target=self._pump, args=(read_end,), daemon=True,
                                       name=f"ppfuse-filter-fd{fd}")
        self.thread.start()

    def _pump(self, read_end: int) -> None:
        with os.fdopen(read_end, "rb") as pipe:
            for line in pipe:
                if not is_noise(line.decode("utf-8", "replace")):
                    view = memoryview(line)
                    while view:
                        view = view[os.write(self.original, view):]

    def close(self) -> None:
        os.dup2(self.original, self.fd)  # closes the pipe's write end: the thread reads to its end
        # a child process still holding the pipe (a data loader worker) would keep it open
        self.thread.join(timeout=5)
        if not self.thread.is_alive():
            os.close(self.original)


@contextlib.contextmanager
def filtered_output() -> Iterator[None]:
    """While inside, lines written to fds 1 and 2 (by Python, C++ or child processes) that are
    third-party noise are dropped; nothing else changes."""
    _flush_all()
    filters = []
    try:
        for fd in (1, 2):
            filters.append(_LineFilter(fd))
    except OSError:  # a closed or unusual stdout/stderr: run unfiltered
        pass
    try:
        yield
    finally:
        _flush_all()
        for line_filter in filters:
            line_filter.close()


def _drop_warning(*args, **kwargs) -> None:
    """``warnings.showwarning`` while quiet: Paddle resets the filters (``simplefilter("always")``
    in ``paddle.utils.decorator_utils``), so dropping at display is what holds."""


@contextlib.contextmanager
def quiet_libraries() -> Iterator[None]:
    """Keep Paddle's and ppdet's log lines, warnings and prints off screen (see the module docstring)."""
    os.environ.setdefault("GLOG_minloglevel", "2")  # for child processes: read when Paddle loads
    show_warning = warnings.showwarning
    warnings.showwarning = _drop_warning
    logging.disable(logging.WARNING)
    try:
        with filtered_output():
            yield
    finally:
        warnings.showwarning = show_warning
        logging.disable(logging.NOTSET)


def main(run: Callable[[List[str]], int], argv: Optional[List[str]] = None) -> int:
    """Run ``run(argv)``; user errors become one line on stderr and exit code 2."""
    argv = sys.argv[1:] if argv is None else argv
    debug = "--debug" in argv
    try:
        with contextlib.nullcontext() if debug else quiet_libraries():
            return run(argv)
    except PPFuseError as exc:
        if debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("error: interrupted; nothing was written", file=sys.stderr)
        return 130
