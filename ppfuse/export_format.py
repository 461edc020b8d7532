"""What an export directory holds: its file names, its inputs and outputs, the Paddle it needs.

The one place these facts live, so that the export that writes a directory,
the runtimes that read it (:mod:`ppfuse.runtime`) and the ONNX tools agree
without importing each other. Imports nothing of ppfuse but its errors.

An export directory (``tools/export_deploy.py``)::

    model.json, model.pdiparams   the inference program (PIR) and its weights
    model_plain.json              the same network with conv biases as [C, 1, 1] adds, for Paddle
                                  Inference with oneDNN off (its plain CPU kernels run that form
                                  faster); reads model.pdiparams
    model.onnx                    with --onnx: the same network for ONNX Runtime and OpenVINO; for a detector
                                  whose NMS has no ONNX form (PP-YOLOE-R's rotated boxes) it ends at the boxes
                                  and scores NMS takes, and the report names the NMS to apply (nms_after_graph)
    model.xml, model.bin          with --onnx and the [openvino] extra: model.onnx as OpenVINO IR (OpenVINO
                                  loads it without converting the ONNX file on every load)
    model_int8.onnx               tools/quantize.py: model.onnx quantized to int8 (QDQ), for ONNX Runtime
    model_int8.xml, model_int8.bin  tools/quantize.py: model.onnx quantized by NNCF, for OpenVINO (without it
                                  OpenVINO runs model_int8.onnx)
    infer_cfg.yml                 PaddleDetection's deploy config (preprocessing, labels)
    model_deploy.pdparams         the converted checkpoint
    ppfuse_report.json            what was converted and verified, the program's forms
"""
from __future__ import annotations

import json
import os
from typing import List, Optional, Sequence

from ppfuse.errors import ExportError

MODEL_FILE = "model"  # the prefix paddle.jit.save writes
PROGRAM_FILES = (MODEL_FILE + ".json", MODEL_FILE + ".pdmodel")  # PIR; the older format, still readable
PARAMS_FILE = MODEL_FILE + ".pdiparams"
PLAIN_MODEL_FILE = "model_plain"  # the prefix of the oneDNN-off program; its weights are PARAMS_FILE
PLAIN_PROGRAM_FILE = PLAIN_MODEL_FILE + ".json"
ONNX_FILE = "model.onnx"
INT8_ONNX_FILE = "model_int8.onnx"  # written by ppfuse.deploy.quantize, recorded in the report under "int8"
OPENVINO_FILE = "model.xml"  # OpenVINO IR of ONNX_FILE (its weights: model.bin), written by the export
INT8_OPENVINO_FILE = "model_int8.xml"  # OpenVINO's int8 model (NNCF), written by ppfuse.deploy.quantize
INFER_CFG = "infer_cfg.yml"
DEPLOY_CHECKPOINT = "model_deploy.pdparams"
REPORT_FILE = "ppfuse_report.json"

INPUT_NAMES = ("image", "scale_factor")
PLAIN_INPUT_NAMES = ("image",)        # --image_only: the plain graph; its contract is the report's "plain_graph"
NMS_OUTPUTS = ("bbox", "bbox_num")    # bbox [K, 6]: class, score, x1, y1, x2, y2; bbox_num [N]
RAW_OUTPUTS = ("boxes", "scores")     # --no_nms: boxes [N, A, 4], scores [N, C, A]
NMS_AFTER_GRAPH = "nms_after_graph"   # key of the report's "onnx" record: the NMS to apply to model.onnx's outputs

MIN_PADDLE = 3


def require_paddle_3(error: type = ExportError) -> None:
    """Raise ``error`` (one line) on a Paddle older than 3.0.

    ppfuse traces with ``to_static(full_graph=True)`` and writes and reads PIR
    programs (``model.json``); Paddle 2.x has neither (``paddlepaddle-gpu`` 2.6.2,
    the newest GPU wheel on PyPI, is one). ``0.0.0`` is a develop build: accepted.
    """
    import paddle
    version = paddle.__version__
    try:
        major = int(version.split(".")[0])
    except ValueError:
        return  # a build naming itself otherwise: let Paddle speak for itself
    if 0 < major < MIN_PADDLE:
        raise error(f"ppfuse needs Paddle >= {MIN_PADDLE}.0, found {version}; install PaddlePaddle 3.x "
                    "(GPU builds: from paddlepaddle.org.cn's install page, not PyPI's paddlepaddle-gpu 2.6)")


def program_file(model_dir: str, error: type = ExportError) -> str:
    """The program file of an export directory (``model.json``, else ``model.pdmodel``)."""
    for name in PROGRAM_FILES:
        path = os.path.join(model_dir, name)
        if os.path.exists(path):
            return path
    raise error(f"{model_dir}: no {' or '.join(PROGRAM_FILES)}; is this an exported model directory?")


def plain_program_file(model_dir: str) -> Optional[str]:
    """The export's program for Paddle Inference with oneDNN off (``model_plain.json``), or None."""
    path = os.path.join(model_dir, PLAIN_PROGRAM_FILE)
    return path if os.path.exists(path) else None


def read_report(model_dir: str) -> dict:
    """The ``ppfuse_report.json`` of an export, or ``{}`` for a directory ppfuse did not write."""
    path = os.path.join(model_dir, REPORT_FILE)
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f)


def is_image_only(model_dir: str) -> bool:
    """Whether the export is the plain graph (``--image_only``): ``image`` in, boxes in input pixels."""
    return bool(read_report(model_dir).get("image_only", False))


def nms_after_graph(model_dir: str) -> Optional[dict]:
    """The NMS the ONNX runtimes apply to ``model.onnx``'s ``boxes``, ``scores`` (the report's
    ``onnx.nms_after_graph``: ``multiclass_nms3`` on rotated boxes and its parameters), or None: the graph's
    own outputs are the export's."""
    return (read_report(model_dir).get("onnx") or {}).get(NMS_AFTER_GRAPH)


def output_names(model_dir: str, own_names: Sequence[str]) -> List[str]:
    """Names for a runtime's outputs: ppfuse's (``bbox``, ``bbox_num`` or ``boxes``, ``scores``) for an
    export whose report says which, else the runtime's own (``fetch_name_0`` ...)."""
    report = read_report(model_dir)
    if "with_nms" in report and len(own_names) == 2:
        return list(NMS_OUTPUTS if report["with_nms"] else RAW_OUTPUTS)
    return list(own_names)
