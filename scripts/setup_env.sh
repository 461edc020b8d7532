#!/usr/bin/env bash
# The full environment in .venv (quick start and CI): ppfuse with every extra the tests exercise, pinned by
# constraints.txt, and PaddleDetection 2.6.0 installed without its stale pins (numpy<1.24, opencv<=4.6,
# the dead `sklearn`): its real dependencies come from ppfuse's `ppdet` extra. docs/install.md explains.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${VENV:-.venv}
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
"$VENV/bin/pip" install -q --upgrade pip
"$VENV/bin/pip" install -q -c constraints.txt -e ".[cpu,ppdet,test,onnx,openvino,int8,bench,scale]"
"$VENV/bin/pip" install -q -c constraints.txt --no-deps paddledet==2.6.0
