"""What the command lines in tools/ share: PaddleDetection-style arguments and error handling.

``-c config.yml``, ``-o key=value ...`` and ``--output_dir`` follow
PaddleDetection's ``tools/export_model.py``. A :class:`PPFuseError` (a user
error) ends the command with one line on stderr and exit code 2; ``--debug``
shows the traceback instead. Paddle and ppdet log noise is kept off unless
``--debug``.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from typing import Callable, List, Optional

from .errors import PPFuseError

EXIT_USER_ERROR = 2


def base_parser(description: str, config: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    if config:
        parser.add_argument("-c", "--config", required=True, help="PaddleDetection YAML config")
        parser.add_argument("-o", "--opt", nargs="*", default=[], metavar="KEY=VALUE",
                            help="override config keys, e.g. -o weights=model.pdparams deploy=true")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks and library logs")
    return parser


def quiet_libraries() -> None:
    """Keep Paddle's and ppdet's log lines (warnings about absent COCO files and the like) off screen."""
    os.environ.setdefault("GLOG_minloglevel", "2")
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)


def main(run: Callable[[List[str]], int], argv: Optional[List[str]] = None) -> int:
    """Run ``run(argv)``; user errors become one line on stderr and exit code 2."""
    argv = sys.argv[1:] if argv is None else argv
    debug = "--debug" in argv
    if not debug:
        quiet_libraries()
    try:
        return run(argv)
    except PPFuseError as exc:
        if debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("error: interrupted; nothing was written", file=sys.stderr)
        return 130
    finally:
        logging.disable(logging.NOTSET)
