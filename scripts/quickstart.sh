#!/usr/bin/env bash
# Quick start on a fresh machine: set up .venv, export PP-YOLOE+ s (random weights unless
# WEIGHTS=path.pdparams is given) and run it with Paddle Inference on CPU on a generated image.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh   # .venv: ppfuse with every extra, PaddleDetection 2.6.0 without its stale pins
CONFIG=configs/ppyoloe/ppyoloe_plus_crn_s_80e_coco.yml
EXTRA=()
if [ -n "${WEIGHTS:-}" ]; then EXTRA=(-o "weights=$WEIGHTS"); fi
.venv/bin/python tools/export_deploy.py -c "$CONFIG" "${EXTRA[@]}" --output_dir output_inference
.venv/bin/python tools/make_shapes_dataset.py --output_dir output/demo --images 1 --split demo
# --print_max 5: with random weights the detections are meaningless; all of them go to output/infer/*.json
.venv/bin/python tools/infer.py --model_dir output_inference/ppyoloe_plus_crn_s_80e_coco \
  --image_dir output/demo/demo --output_dir output/infer --print_max 5
