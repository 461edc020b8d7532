"""Export a PaddleDetection detector for Paddle Inference.

ppdet 2.6.0's own export does not run on Paddle 3.x (PIR): ``to_static``
needs ``full_graph=True``, its ``multiclass_nms`` fails under PIR tracing, and
``_prune_input_spec`` returns ``{}``. ppfuse owns this small path instead:

1. wrap the model (:func:`ppfuse.ppdet.detectors.wrapper_for`): PP-YOLOE style as
   ``(image, scale_factor) -> (bbox [K, 6], bbox_num [N])`` (or the raw
   ``(boxes, scores)`` before NMS), NMS by ``multiclass_nms3``; any other
   family as ppdet's own forward and post-processing, with the inputs an
   output uses and ppdet's post-processing ops in PIR-traceable form;
2. trace it with ``paddle.jit.to_static(full_graph=True)`` under
   :func:`deploy_rewrites`, forms Paddle Inference's oneDNN path runs (fast)
   (each verified with the rest of the deployed model, see :func:`verify_deployed`):
   nearest upsampling as a transposed conv with an identity kernel (exact,
   and oneDNN keeps its blocked layout through it) and other resizes as
   gathers (oneDNN's ``nearest_interp``/``bilinear_interp`` fail), ``leaky_relu``
   as ``maximum`` (oneDNN's conv + leaky_relu fusion crashes), CSPResNet's ESE
   ``x.mean((2, 3))`` as ``adaptive_avg_pool2d(x, 1)`` (oneDNN runs the mean as
   its slow reference reduction), conv biases inside the conv (oneDNN fuses
   them) unless ``conv_bias="channel_add"`` asks for separate ``[C, 1, 1]`` adds;
3. write ``model.json``/``model.pdiparams``, ``infer_cfg.yml`` (the format of
   PaddleDetection's ``deploy/python/infer.py``, fitted to the fixed input size),
   the deploy checkpoint and a report, into a temporary directory moved into
   place only when complete;
4. with ``onnx``, ``model.onnx``: the same wrapper traced once more with post-processing in the forms
   paddle2onnx converts (:func:`ppfuse.ppdet.postprocess.onnx_postprocess`), converted, and checked
   against the Paddle Inference program written beside it.

``image_only`` writes the plain graph instead (:class:`ppfuse.ppdet.detectors.ImageOnly`): ``image`` is the
only input, boxes are in pixels of the input, and the report holds the preprocessing contract
(:func:`plain_graph_contract`, docs/plain-graph.md).
"""
from __future__ import annotations

import contextlib
import filecmp
import importlib.util
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field, replace
from typing import Callable, Dict, List, Optional

import numpy as np
import paddle
import paddle.nn as nn
import paddle.nn.functional as F

from ppfuse.core import checkpoint, layers

from ppfuse.ppdet import detectors
from ppfuse.ppdet.detection import BuiltModel, DetectionConfig, build_model
from ppfuse.errors import ConfigError, ExportError, PPFuseError, VerificationError, first_line
from ppfuse.export_format import (DEPLOY_CHECKPOINT, INFER_CFG, MODEL_FILE, NMS_AFTER_GRAPH, NMS_OUTPUTS, ONNX_FILE,
                                  OPENVINO_FILE, PARAMS_FILE, PLAIN_MODEL_FILE, PLAIN_PROGRAM_FILE, RAW_OUTPUTS,
                                  REPORT_FILE, program_file, require_paddle_3)
from ppfuse.runtime.base import RuntimeOptions
from ppfuse.runtime.paddle_inference import create_predictor, run_predictor
from ppfuse.core.verify import TopKReplay, VerificationResult, compare, judge
from ppfuse.deploy.forms import CONV_BIAS_FORMS, DEFAULT_CONV_BIAS, forms_report, patched, program_forms
from ppfuse.deploy.program import COUNTED_OPS, count_ops, inputs_used

# whole-model tolerance of the export check, on boxes / input size and scores (both O(1)).
# Measured fp32 differences: ~1e-5 (PP-YOLOE+ s, 320); the fp32 training form itself is
# that far from a float64 evaluation, so tighter would reject exact conversions.
DEFAULT_ATOL = 1e-4
DEFAULT_RTOL = 1e-4


def _ese_with_pool(self, x):
    """ppdet's ``EffectiveSELayer.forward`` with ``x.mean((2, 3), keepdim=True)`` written as
    ``F.adaptive_avg_pool2d(x, 1)``: the same mean (up to fp32 summation order), which
    oneDNN runs as a jit pooling primitive instead of its slow reference reduction."""
    return x * self.act(self.fc(F.adaptive_avg_pool2d(x, 1)))


@contextlib.contextmanager
def onednn_friendly_ese():
    """While tracing, make ppdet's CSPResNet ``EffectiveSELayer`` use :func:`_ese_with_pool`."""
    try:
        from ppdet.modeling.backbones import cspresnet
    except ImportError:
        yield
        return
    with patched([(cspresnet.EffectiveSELayer, "forward", _ese_with_pool)]):
        yield


def deploy_rewrites(conv_bias: str = DEFAULT_CONV_BIAS, speed_forms: bool = True):
    """Every rewrite of the exported program (:func:`ppfuse.deploy.forms.program_forms` and, for speed,
    CSPResNet's ESE mean as pooling); on while tracing and while verifying the deployed model. The benchmark
    turns ``speed_forms`` off for ppdet's own path, which keeps only the rewrites it needs to run under
    oneDNN at all."""
    return program_forms(conv_bias, speed_forms, model_forms=[onednn_friendly_ese()] if speed_forms else [])


def rewrites_report(conv_bias: str = DEFAULT_CONV_BIAS, speed_forms: bool = True) -> Dict[str, str]:
    """What :func:`deploy_rewrites` wrote, for ``ppfuse_report.json``."""
    return {**forms_report(conv_bias, speed_forms), "ese_mean": "adaptive_avg_pool2d" if speed_forms else "mean"}


@dataclass(frozen=True)
class Graph:
    """What a saved program takes and gives (besides the conv-bias form).

    Attributes:
        with_nms: detections after NMS, else raw outputs.
        image_only: the plain graph, ``image`` alone, boxes in input pixels (:class:`detectors.ImageOnly`).
        bgr: the detector takes BGR (CenterNet): the plain graph flips the RGB it takes.
        onnx: post-processing in the forms paddle2onnx converts (the program ``model.onnx`` is made from).
        nms_inputs_too: after the detections, also output the boxes and scores NMS took (the ONNX check's).
        nms_after: the boxes and scores NMS takes instead of the detections (an ONNX program for a detector
            whose NMS has no ONNX form: ppfuse's runtimes apply it, :mod:`ppfuse.runtime.rotated_nms`).
    """
    with_nms: bool = True
    image_only: bool = False
    bgr: bool = False
    onnx: bool = False
    nms_inputs_too: bool = False
    nms_after: bool = False


def save_inference_model(model: nn.Layer, path_prefix: str, size: List[int], with_nms: bool = True,
                         topk_before_nms: bool = False, conv_bias: str = DEFAULT_CONV_BIAS,
                         speed_forms: bool = True, graph: Optional[Graph] = None) -> None:
    """Trace ``model`` (a ppdet detector in eval mode, run by :func:`ppfuse.ppdet.detectors.wrapper_for`) under
    :func:`deploy_rewrites` and ``paddle.jit.save`` it.

    A detector that does not use all of ``image, im_shape, scale_factor`` (``paddle.jit.save`` refuses an
    input no output depends on) is traced again with the ones it uses. ``graph`` (when given, instead of
    ``with_nms`` and ``topk_before_nms``) chooses the plain graph and the ONNX forms; with the ONNX forms, the
    constant prior boxes (SSD, BlazeFace) are recorded on a dygraph run first.
    """
    graph = graph or Graph(with_nms=with_nms, onnx=topk_before_nms)
    names = detectors.input_names(model, graph.image_only)
    priors = None
    if graph.onnx and not detectors.is_ppyoloe_style(model):
        from ppfuse.ppdet.postprocess import PriorBoxes
        priors = PriorBoxes()
        values = detectors.generated_inputs(size, 1, 0)
        with deploy_rewrites(conv_bias, speed_forms), \
                detectors.traceable(model, True, priors, record=True, nms_after=graph.nms_after), \
                paddle.no_grad(), detectors.ppdet_failures(model, size):
            detectors.wrapper_for(model, graph.with_nms, True, names, graph.image_only, graph.bgr,
                                  graph.nms_inputs_too, graph.nms_after)(*[values[n] for n in names])
    with deploy_rewrites(conv_bias, speed_forms), \
            detectors.traceable(model, graph.onnx, priors, nms_after=graph.nms_after):
        while True:
            if priors is not None:
                priors.rewind()
            wrapper = detectors.wrapper_for(model, graph.with_nms, graph.onnx, names, graph.image_only, graph.bgr,
                                            graph.nms_inputs_too, graph.nms_after)
            wrapper.eval()
            static = paddle.jit.to_static(wrapper, input_spec=detectors.input_spec(model, size, names),
                                          full_graph=True)
            try:
                used = inputs_used(static.forward.concrete_program)
            except PPFuseError:
                raise
            except Exception as exc:  # a model (its post-processing, say) that to_static cannot trace
                from paddle.jit.dy2static import error as dy2static_error
                context = exc.__context__ if hasattr(exc.__context__, dy2static_error.ERROR_DATA) else exc
                raise ExportError(f"{type(model).__name__}: tracing it for export failed: {first_line(context)}; "
                                  "ppfuse cannot export this model's forward as it stands") from None
            # none used: the outputs come out of tensor arrays written in a loop (RetinaNet's, YOLOF's, TTFNet's
            # per-image post-processing), through which inputs_used does not see; keep the inputs as they are
            if used == names or not used:
                break
            names = used
        paddle.jit.save(static, path_prefix)


def save_plain_program(model: nn.Layer, directory: str, size: List[int], with_nms: bool = True,
                       graph: Optional[Graph] = None) -> None:
    """Write ``model_plain.json`` next to an export's ``model.json`` (conv biases in oneDNN's form): the same
    network with the biases as ``[C, 1, 1]`` adds, the form Paddle's plain CPU kernels run faster (oneDNN
    off, batch > 1; Paddle Inference picks it then, :func:`ppfuse.runtime.paddle_inference.create_predictor`).
    It reads the export's ``model.pdiparams``: its own weights file is checked byte-identical, then removed.
    Both programs then run in Paddle Inference with oneDNN off on a generated image (batch 1: some families'
    post-processing takes no more); their outputs must be identical (the same sums in the same kernels), or
    nothing is kept and :class:`ExportError` says so.
    """
    save_inference_model(model, os.path.join(directory, PLAIN_MODEL_FILE), size, with_nms, conv_bias="channel_add",
                         graph=graph)
    own_params = os.path.join(directory, PLAIN_MODEL_FILE + ".pdiparams")
    same_weights = filecmp.cmp(own_params, os.path.join(directory, PARAMS_FILE), shallow=False)
    os.remove(own_params)
    plain = os.path.join(directory, PLAIN_PROGRAM_FILE)
    problem = None if same_weights else "its weights file differs from model.pdiparams"
    if problem is None:
        values = {name: tensor.numpy() for name, tensor in detectors.generated_inputs(size, 1, 7).items()}
        options = RuntimeOptions(onednn=False)
        outputs = [run_predictor(create_predictor(directory, options, program), values)
                   for program in (program_file(directory), plain)]
        if not all(np.array_equal(a, b) for a, b in zip(*outputs)):
            problem = "its outputs differ from model.json's with oneDNN off"
    if problem:
        os.remove(plain)
        raise ExportError(f"{PLAIN_PROGRAM_FILE} (conv biases as [C, 1, 1] adds): {problem}; export with "
                          "--conv_bias channel_add for Paddle Inference without oneDNN")


def judge_raw_outputs(original: Dict[str, np.ndarray], candidate: Dict[str, np.ndarray],
                      float64: Callable[[], Dict[str, np.ndarray]], atol: float = DEFAULT_ATOL,
                      rtol: float = DEFAULT_RTOL) -> VerificationResult:
    """The export's criterion on raw outputs (:func:`ppfuse.ppdet.detectors.raw_outputs`, or anything shaped
    like them): every output relative to the original's largest magnitude of it
    (:func:`ppfuse.ppdet.detectors.normalize_like`; PP-YOLOE's boxes over the input size and scores as they
    are) within ``atol``/``rtol``, or beyond that no further from the float64 evaluation ``float64()``
    (called only then) than twice the original's own fp32 error (:func:`ppfuse.core.verify.judge`)."""
    reference, normalized = detectors.normalize_like(original, candidate)
    return judge(reference, normalized, atol, rtol, lambda: detectors.normalize_like(original, float64())[1])


def verify_deployed(training_model: nn.Layer, deployed: nn.Layer, size: List[int], atol: float = DEFAULT_ATOL,
                    rtol: float = DEFAULT_RTOL, seed: int = 0, conv_bias: str = DEFAULT_CONV_BIAS,
                    speed_forms: bool = True) -> VerificationResult:
    """Raw detector outputs of both forms on a generated image (:func:`ppfuse.ppdet.detectors.raw_outputs`:
    PP-YOLOE's boxes and scores before NMS, any other family's head outputs).

    The deployed model runs under the export's :func:`deploy_rewrites` (the
    function the saved program computes), the training form as ppdet wrote it.
    Boxes are compared as fractions of the input size, so one tolerance fits
    boxes and scores (both O(1)); other families' outputs each relative to its
    largest magnitude. Above tolerance, the training form is also
    evaluated in float64: some models (PP-YOLOE+ l with random weights: ~1 px
    at 640) amplify fp32 rounding beyond any fixed tolerance, and then the
    deployed model passes if it is no further from float64 than twice the
    training form's own fp32 error (:func:`ppfuse.core.verify.rounding_check`).
    Raises :class:`VerificationError` otherwise.
    """
    inputs = detectors.sample_inputs(size, 1, seed, detectors.input_names(training_model))
    choices = TopKReplay()
    with choices.record():
        original = detectors.raw_outputs(training_model, inputs, size)
    with deploy_rewrites(conv_bias, speed_forms):
        candidate = detectors.raw_outputs(deployed, inputs, size)

    def float64_outputs(replay: bool = False):
        try:
            with choices.replay() if replay else contextlib.nullcontext():
                return detectors.raw_outputs_in_float64(training_model, inputs, size)
        except VerificationError:
            raise
        except Exception as exc:  # a ppdet module that cannot compute in float64
            reference, normalized = detectors.normalize_like(original, candidate)
            raise VerificationError(f"deployed model differs from the original beyond tolerance "
                                    f"({compare(reference, normalized, atol, rtol).brief()}), and the float64 "
                                    f"reference that would tell rounding from error could not run: "
                                    f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from None
    result = judge_raw_outputs(original, candidate, float64_outputs, atol, rtol)
    if not result.ok and choices.indices:
        # a top-k selection (RT-DETR's queries) turned rounding into other rows: compare with the original's
        # choices, each run's own values (TopKReplay)
        with deploy_rewrites(conv_bias, speed_forms), choices.replay():
            replayed = detectors.raw_outputs(deployed, inputs, size)
        description = choices.describe()
        result = judge_raw_outputs(original, replayed, lambda: float64_outputs(replay=True), atol, rtol)
        result.replayed = description
    if not result.ok:
        raise VerificationError(f"deployed model differs from the original beyond tolerance: {result.brief()}")
    return result


@dataclass
class ExportResult:
    directory: str
    built: BuiltModel
    verification: Optional[VerificationResult]
    op_counts: Dict[str, int]
    seconds: Dict[str, float] = field(default_factory=dict)


def _infer_cfg(config: DetectionConfig, path: str, size: List[int], model: nn.Layer,
               image_only: bool = False) -> None:
    """``infer_cfg.yml`` for PaddleDetection's ``deploy/python/infer.py``, written by ppdet's own function
    (for the plain graph, with the preprocessing of :func:`_plain_preprocessing`)."""
    from ppdet.engine.export_utils import TRT_MIN_SUBGRAPH, _dump_infer_config
    config.activate()
    arch = config.architecture
    if arch != "PPYOLOEWithAuxHead" and not any(known in arch for known in TRT_MIN_SUBGRAPH):
        # (ppdet's function would end the process with os._exit(0))
        raise ConfigError(f"{config.path}: PaddleDetection's deploy/python/infer.py does not know architecture "
                          f"{arch}, so there is no infer_cfg.yml for it; export with ppdet's own tools")
    from ppdet.core.workspace import create, global_config
    if not hasattr(global_config.get("TestDataset"), "get_anno"):
        # PaddleDetection's own dataset files write TestDataset as a plain mapping (not !ImageFolder); ppdet's
        # Trainer creates the dataset before exporting, ppfuse does it here
        global_config["TestDataset"] = create("TestDataset")()
    _dump_infer_config(global_config, path, [None, 3] + list(size), model)
    _fit_to_export_size(path, size)
    if image_only:
        _plain_preprocessing(path, size)


def takes_bgr(config: DetectionConfig) -> bool:
    """Whether the detector is fed BGR: its TestReader has ppdet's ``WarpAffine`` (CenterNet), which converts."""
    transforms = (config.get("TestReader") or {}).get("sample_transforms") or []
    return any(isinstance(t, dict) and "WarpAffine" in t for t in transforms)


def _plain_preprocessing(path: str, size: List[int]) -> None:
    """The plain graph's ``infer_cfg.yml``: the image stretched to ``size`` (``Resize``, ``keep_ratio: false``,
    bilinear), no padding, normalized in RGB order (a BGR detector's mean and std reversed: the graph flips the
    channels itself), ``Permute`` -- the contract :func:`plain_graph_contract` states."""
    import yaml
    with open(path) as f:
        cfg = yaml.safe_load(f)
    ops = cfg.get("Preprocess") or []
    bgr = any(op.get("type") == "WarpAffine" for op in ops)
    out = []
    for op in ops:
        kind = op.get("type")
        if kind in ("Resize", "LetterBoxResize", "WarpAffine"):
            out.append({"type": "Resize", "target_size": [int(size[0]), int(size[1])], "keep_ratio": False,
                        "interp": 1})
        elif kind in ("Pad", "PadStride"):
            continue
        elif kind == "NormalizeImage" and bgr:
            op = dict(op, mean=list(op.get("mean", [0, 0, 0]))[::-1], std=list(op.get("std", [1, 1, 1]))[::-1])
            out.append(op)
        else:
            out.append(op)
    cfg["Preprocess"] = out
    with open(path, "w") as f:
        yaml.safe_dump(cfg, f, sort_keys=False)


def plain_graph_contract(infer_cfg_path: str, size: List[int], with_nms: bool, box_values: int = 4,
                         onnx_report: Optional[dict] = None) -> dict:
    """What the plain graph expects and gives, for ``ppfuse_report.json`` (``"plain_graph"``): a script that reads
    this and docs/plain-graph.md can feed it from any language. ``box_values``: 4 (x1, y1, x2, y2) or 8 (a rotated
    box's four corners, PP-YOLOE-R)."""
    import yaml
    with open(infer_cfg_path) as f:
        ops = yaml.safe_load(f).get("Preprocess") or []
    normalize = next((op for op in ops if op.get("type") == "NormalizeImage"), {})
    mean_std = normalize.get("norm_type", "mean_std") == "mean_std" and bool(normalize)
    height, width = int(size[0]), int(size[1])
    if box_values == 8:
        corners = "x1, y1, x2, y2, x3, y3, x4, y4 (the rotated box's four corners)"
        outputs = ({"bbox": f"[K, 10] float32: class, score, {corners}",
                    "bbox_num": "[N] int32: rows of bbox per image, in order"} if with_nms else
                   {"boxes": f"[N, M, 8] float32: {corners}",
                    "scores": "[N, C, M] float32: each box's score per class"})
    else:
        outputs = ({"bbox": "[K, 6] float32: class, score, x1, y1, x2, y2 (boxes clipped to the input)",
                    "bbox_num": "[N] int32: rows of bbox per image, in order"} if with_nms else
                   {"boxes": "[N, M, 4] float32: x1, y1, x2, y2 (not clipped)",
                    "scores": "[N, C, M] float32: each box's score per class"})
    after = (onnx_report or {}).get(NMS_AFTER_GRAPH)
    if with_nms and after:  # no ONNX form of this NMS: model.onnx ends before it (model.json has it inside)
        outputs = dict(outputs, **{"model.onnx": {
            "boxes": f"[N, M, {box_values}] float32, scores [N, C, M]: the raw outputs; apply the NMS below",
            "nms": after}})
    return {
        "input": {"name": "image", "shape": [-1, 3, height, width], "dtype": "float32", "layout": "NCHW",
                  "channel_order": "RGB"},
        "resize": {"to": [height, width], "keep_ratio": False, "interpolation": "bilinear (OpenCV INTER_LINEAR)"},
        "normalize": {"scale": (1.0 / 255.0) if normalize.get("is_scale", True) and normalize else 1.0,
                      "mean": [float(v) for v in normalize.get("mean", [0, 0, 0])] if mean_std else [0.0, 0.0, 0.0],
                      "std": [float(v) for v in normalize.get("std", [1, 1, 1])] if mean_std else [1.0, 1.0, 1.0]},
        "outputs": outputs,
        "coordinates": "pixels of the H x W input; x / (W / image width), y / (H / image height) for the image",
        "batch": "any N without NMS; with NMS the ONNX graph takes one image per run",
    }


def _box_values(model: nn.Layer, size: List[int]) -> int:
    """How many values a box of ``model``'s NMS has: 8 for rotated boxes (PP-YOLOE-R), else 4."""
    call = detectors.last_nms_call(model, size)
    return int(call[1][-1]) if call is not None and len(call[1]) else 4


def _fit_to_export_size(path: str, size: List[int]) -> None:
    """Make ``infer_cfg.yml``'s preprocessing give the export's fixed ``size``.

    ppdet writes the config's ``Resize`` with the export size as target; with ``keep_ratio: true`` (RetinaNet,
    FCOS, DETR ...) an image of another aspect ratio comes out smaller, and the fixed-shape program cannot take
    it. ppdet batches such images padded with zeros after normalization (``PadBatch``/``PadStride``); so a
    ``Pad`` to ``size`` with zeros goes right before ``Permute`` (``im_shape`` stays the resized size). A
    config's own ``Pad`` (YOLOX's, to its training size) pads to ``size`` instead. Preprocessing without any
    resize (BlazeFace's) gets a ``Resize`` to ``size``. CenterNet's ``WarpAffine`` is left to the runtime
    (:class:`ppfuse.deploy.inference.Preprocess` fits the image into ``size`` first).
    """
    import yaml
    with open(path) as f:
        cfg = yaml.safe_load(f)
    ops = cfg.get("Preprocess") or []
    if not any(op.get("type") in ("Resize", "LetterBoxResize", "WarpAffine") for op in ops):
        # BlazeFace's runs at each image's own size; a fixed-size export needs the image at its size
        ops.insert(0, {"type": "Resize", "target_size": [int(size[0]), int(size[1])], "keep_ratio": False,
                       "interp": 1})
    pads = [op for op in ops if op.get("type") == "Pad"]
    for op in pads:  # the config's Pad (YOLOX: to 640) goes to the export's size
        op["size"] = [int(size[0]), int(size[1])]
    resize = next((op for op in ops if op.get("type") == "Resize"), None)
    if resize is not None and resize.get("keep_ratio") and not pads:
        where = next((i for i, op in enumerate(ops) if op.get("type") == "Permute"), len(ops))
        ops.insert(where, {"type": "Pad", "size": [int(size[0]), int(size[1])], "fill_value": [0.0, 0.0, 0.0]})
        ops[:] = [op for op in ops if op.get("type") != "PadStride"]
    with open(path, "w") as f:
        yaml.safe_dump(cfg, f, sort_keys=False)


def export_onnx(model: nn.Layer, directory: str, size: List[int], with_nms: bool = True, log=print,
                graph: Optional[Graph] = None, strict_detections: bool = True, atol: float = DEFAULT_ATOL,
                rtol: float = DEFAULT_RTOL, speed_forms: bool = True, folded: bool = True) -> dict:
    """Write and check ``model.onnx`` beside the Paddle program in ``directory``; raise (no ``model.onnx`` left)
    when it cannot be written or is off.

    The ONNX model is converted from the same wrapper traced with post-processing in the forms paddle2onnx
    converts (:class:`Graph` ``onnx``: per-class top-k before NMS, matrix NMS in dense ops, prior boxes as
    constants); an op paddle2onnx cannot convert is named in one line (:func:`onnx_support.to_onnx`). Checked
    on a generated image, within the export's tolerance (1e-4 of the input size plus 1e-4 of the value on
    boxes, 1e-4 on scores):

    - raw outputs: the boxes and scores NMS takes (other families with NMS: that program in Paddle Inference
      against ONNX Runtime, each relative to its largest value, within ten times the export's ``atol``/``rtol``
      -- box decoding's ``exp`` amplifies fp32 differences -- before the two extra outputs are dropped from
      ``model.onnx``), or the export's own
      raw outputs (``--no_nms``; a head's outputs relative to each one's scale); beyond the tolerance, by the
      float64 criterion (:func:`raw_outputs_float64`): ONNX Runtime no further from a float64 evaluation of the
      model than twice Paddle Inference's own fp32 error (a model that amplifies rounding, PP-YOLO with DCN on
      random weights, exceeds any fixed tolerance in both runtimes);
    - detections after NMS against ``model.json``'s, paired one to one (:func:`ppfuse.core.verify.pair_detections`).
      Random weights give degenerate and tied boxes on which ONNX's NMS and Paddle's legitimately choose
      differently, so with ``strict_detections=False`` (an export of random weights) a difference there is
      reported, not refused -- the raw check still holds.

    ``speed_forms``: the program forms of :func:`deploy_rewrites` for speed, as the Paddle program beside it was
    written (the benchmark's ppdet path has them off). ``folded=False``: ``model`` is not the deployed form
    (the benchmark's ppdet path), so BatchNormalization nodes are expected, not refused.

    Returns the record the export's report keeps under ``onnx``; in a finished export (its report written),
    the report is brought up to date with it.

    A detector whose NMS has no ONNX form (``multiclass_nms`` on rotated boxes: PP-YOLOE-R) gets a ``model.onnx``
    that ends at the boxes ``[N, M, 8]`` and scores ``[N, C, M]`` NMS takes (:class:`Graph` ``nms_after``), named
    ``boxes``, ``scores``; the returned record's ``nms_after_graph`` holds the NMS and its parameters (the report
    keeps it: :func:`ppfuse.export_format.nms_after_graph`), which ppfuse's ONNX Runtime and OpenVINO runtimes
    apply (:mod:`ppfuse.runtime.rotated_nms`). Checked: those outputs against the same program in Paddle
    Inference (as the raw outputs above, within ten times ``atol``/``rtol``), and ONNX Runtime's followed by
    ppfuse's NMS against ``model.json``'s detections, paired one to one (their scores, NMS's inputs as they are,
    within the raw check's ten times ``atol``).

    No BatchNormalization may be left, and no If in a PP-YOLOE program (its ``if self.alpha`` would be one); no
    NonMaxSuppression in a graph that NMS follows.
    """
    from ppfuse.deploy import onnx_support
    from ppfuse.ppdet.postprocess import nms_after_graph
    ppyoloe = detectors.is_ppyoloe_style(model)
    graph = replace(graph or Graph(with_nms=with_nms), onnx=True)
    after = call = None
    if graph.with_nms:
        call = detectors.last_nms_call(model, size, graph.image_only)
        after = nms_after_graph(*call) if call is not None else None
    graph = replace(graph, nms_inputs_too=graph.with_nms and after is None, nms_after=after is not None)
    staging = os.path.join(directory, ".onnx_source")
    path = os.path.join(directory, ONNX_FILE)
    box_atol = DEFAULT_ATOL * max(size)
    values = {name: tensor.numpy() for name, tensor in detectors.generated_inputs(size, 1, 3).items()}

    def exact():
        return raw_outputs_float64(model, values, size, graph)
    raw = None
    try:
        save_inference_model(model, os.path.join(staging, MODEL_FILE), size, speed_forms=speed_forms, graph=graph)
        onnx_support.to_onnx(staging, path)
        # decoded boxes pass through exp(): fp32 differences of the network grow tenfold there
        if graph.nms_inputs_too:
            # decoded boxes pass through exp(): fp32 differences of the network grow tenfold there; beyond
            # that, the float64 criterion (a model that amplifies rounding, in both runtimes alike)
            raw = onnx_support.check_extra_outputs(staging, path, values, 10 * atol, 10 * rtol, keep=2,
                                                   exact=exact)
        elif graph.nms_after:
            raw = onnx_support.check_raw_outputs(staging, path, values, 10 * atol, 10 * rtol)
        onnx_support.name_outputs(path, list(NMS_OUTPUTS if graph.with_nms and not graph.nms_after else RAW_OUTPUTS)
                                  if graph.with_nms or graph.image_only or ppyoloe else [])
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    try:
        nodes = onnx_support.node_counts(path)
        left = {"BatchNormalization": nodes.get("BatchNormalization", 0) if folded else 0}
        if ppyoloe:
            left["If"] = nodes.get("If", 0)
        if graph.nms_after:
            left["NonMaxSuppression"] = nodes.get("NonMaxSuppression", 0)
        if any(left.values()):
            raise ExportError(f"{path}: " + " and ".join(f"{n} {k}" for k, n in left.items()) +
                              " nodes left; the deployed program should have none")
        if raw is not None:
            log(f"ONNX Runtime vs Paddle Inference, boxes and scores before NMS: {raw[1]}")
            if not raw[0]:
                raise VerificationError(f"{path}: ONNX Runtime's boxes and scores before NMS differ from Paddle "
                                        f"Inference's: {raw[1]}")
        relative = not graph.image_only and not graph.with_nms and not ppyoloe
        # without NMS the outputs are the boxes and scores before NMS: for the other families the same tenfold
        # tolerance as above (YOLOv3's boxes pass through exp()); PP-YOLOE keeps the export's own tolerance
        ok, how = onnx_support.check_against_paddle(directory, path, values,
                                                    box_atol=box_atol if graph.with_nms or ppyoloe
                                                    else 10 * box_atol,
                                                    with_nms=graph.with_nms, relative=relative, nms_after=after,
                                                    # its scores are the raw ones, checked within 10 * atol
                                                    score_atol=10 * atol if after is not None else 1e-4,
                                                    exact=None if graph.with_nms else exact)
        if after is not None:
            how += " (ONNX Runtime followed by ppfuse's rotated NMS)"
        log(f"ONNX Runtime vs Paddle Inference: {how}")
        if not ok and (strict_detections or raw is None):
            raise VerificationError(f"{path}: ONNX Runtime's outputs differ from Paddle Inference's: {how}")
        if not ok:
            log("WARNING: detections after NMS differ on random weights (degenerate, tied boxes); the boxes and "
                "scores before NMS agree")
    except BaseException:
        if os.path.exists(path):
            os.remove(path)
        raise
    if not graph.with_nms:
        nms = "none (raw outputs)"
    elif nodes.get("NonMaxSuppression"):
        nms = "in the graph"
    elif call is not None and call[0] == "matrix_nms":
        nms = "in the graph: matrix NMS in ONNX operators, one class at a time"
    else:
        nms = "none in the post-processing (top-k)"
    if after is not None:
        nms = "after the graph: ppfuse's multiclass_nms3 on rotated boxes in ONNX Runtime and OpenVINO"
    record = {"nodes": nodes, "check": how, "raw_check": raw[1] if raw else None, "nms": nms,
              **({NMS_AFTER_GRAPH: after.to_report()} if after is not None else {})}
    report_path = os.path.join(directory, REPORT_FILE)
    if os.path.exists(report_path):  # a finished export given a model.onnx: the runtimes read what it holds there
        with open(report_path) as f:
            report = json.load(f)
        report["onnx"] = record
        with open(report_path, "w") as f:
            json.dump(report, f, indent=2)
    return record


def raw_outputs_float64(model: nn.Layer, values: Dict[str, np.ndarray], size: List[int],
                        graph: Graph) -> List[np.ndarray]:
    """The boxes and scores NMS takes (``graph.with_nms``; PP-YOLOE and the plain graph without NMS: the raw
    outputs) of the program :func:`export_onnx` converts, on ``values``, evaluated in float64 by a float64 copy of
    ``model`` with the ONNX forms of the post-processing -- the exact values the ONNX check's float64 criterion
    measures both runtimes against. Dygraph stops where NMS would start (:func:`postprocess.nms_inputs`).

    Raises:
        VerificationError: a layer of ``model`` that cannot compute in float64, or no NMS was reached.
    """
    from ppfuse.core.verify import float64_copy
    from ppfuse.ppdet.postprocess import NMSReached, nms_inputs
    names = detectors.input_names(model, graph.image_only)
    try:
        model64 = float64_copy(model)
        inputs = [paddle.to_tensor(values[n]).astype("float64") for n in names]
        with paddle.no_grad(), detectors.ppdet_failures(model64, size):
            if detectors.is_ppyoloe_style(model) or not (graph.with_nms or graph.image_only):
                with detectors.traceable(model64, True, record=True):
                    out = detectors.wrapper_for(model64, False, True, names, graph.image_only, graph.bgr)(*inputs)
            else:  # the NMS inputs of ppdet's post-processing
                store: list = []
                with detectors.traceable(model64, True, record=True), nms_inputs(store, stop=True):
                    try:
                        detectors.wrapper_for(model64, True, True, names, graph.image_only, graph.bgr)(*inputs)
                    except NMSReached:
                        pass
                if not store:
                    raise VerificationError(f"{type(model).__name__} reached no NMS in float64")
                out = store[0]
    except VerificationError:
        raise
    except Exception as exc:  # a ppdet module that cannot compute in float64
        raise VerificationError(f"the float64 evaluation that tells fp32 rounding from a conversion error could "
                                f"not run: {first_line(exc)}") from None
    return [t.numpy() for t in out]


def _export_onnx(model: nn.Layer, directory: str, size: List[int], with_nms: bool, log) -> dict:
    """:func:`export_onnx` (the name the export used)."""
    return export_onnx(model, directory, size, with_nms, log)


@contextlib.contextmanager
def atomic_directory(target: str):
    """Yield a temporary directory beside ``target``; on success it replaces ``target`` whole.

    On any failure the temporary directory is removed and ``target`` (a
    previous export, say) is left as it was.
    """
    parent = os.path.dirname(os.path.abspath(target))
    try:
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=".ppfuse-tmp-", dir=parent)
        os.chmod(tmp, 0o755)
    except OSError as exc:
        raise ExportError(f"{parent}: cannot write the export there ({exc.strerror}); choose another "
                          "--output_dir") from None
    try:
        try:
            yield tmp
        except OSError as exc:
            raise ExportError(f"{target}: writing failed ({exc.strerror or exc}: {exc.filename or ''}); "
                              "nothing was written and any previous export there is untouched") from None
        old = None
        if os.path.exists(target):
            old = tempfile.mkdtemp(prefix=".ppfuse-old-", dir=parent)
            os.rename(target, os.path.join(old, "previous"))
        os.rename(tmp, target)
        if old:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def export(config: DetectionConfig, output_dir: str, weights: Optional[str] = None, seed: int = 0,
           atol: float = DEFAULT_ATOL, rtol: float = DEFAULT_RTOL, with_nms: bool = True,
           strict: bool = False, onnx: bool = False, conv_bias: str = DEFAULT_CONV_BIAS,
           log=print, image_only: bool = False) -> ExportResult:
    """Build, convert, verify and write ``output_dir/<config name>/``; all files or none.

    Args:
        strict: fail when any BatchNorm would stay unfolded (otherwise warn).
        conv_bias: how ``model.json`` writes conv biases (:data:`CONV_BIAS_FORMS`): ``in_conv``
            (default; oneDNN fuses it; ``model_plain.json`` is written too, :func:`save_plain_program`) or
            ``channel_add`` (faster with oneDNN off, batch > 1; ``model.json`` only).
        onnx: also write ``model.onnx`` (paddle2onnx), checked against Paddle
            Inference: no BatchNormalization (nor If, PP-YOLOE) node, outputs within tolerance
            (:func:`export_onnx`).
        image_only: the plain graph -- ``image`` the only input, boxes in input pixels (after NMS, or with
            ``with_nms=False`` the boxes and scores NMS takes); ``ppfuse_report.json`` gets its
            ``plain_graph`` contract (docs/plain-graph.md).

    Raises:
        VerificationError: the deployed model differs beyond tolerance (nothing written).
        ExportError: Paddle older than 3.0, or writing failed (nothing written).
        ConfigError, CheckpointError, ConversionError: as named.
    """
    require_paddle_3()
    if conv_bias not in CONV_BIAS_FORMS:
        raise ConfigError(f"--conv_bias {conv_bias}: use one of {', '.join(CONV_BIAS_FORMS)}")
    timings = {}
    size = config.input_size()
    start = time.perf_counter()
    built = build_model(config, weights=weights, deploy=True, seed=seed, strict=strict, check=False)
    timings["build_and_convert"] = time.perf_counter() - start
    graph = Graph(with_nms=with_nms, image_only=image_only, bgr=image_only and takes_bgr(config))
    left = built.conversion.remaining_batch_norms if built.conversion else {}
    if left:
        first = next(iter(left))
        log(f"WARNING: {len(left)} BatchNorm left unfolded (first: {first}: {left[first]}); "
            "--strict makes this an error")
    overflow = layers.fp16_overflow(built.model)
    if overflow:
        log(f"WARNING: {len(overflow)} folded weights exceed the float16 range, first {next(iter(overflow))} "
            f"(|w| up to {max(overflow.values()):.3g}): fp16 inference of this export will overflow")
    start = time.perf_counter()
    # without a training form (a deploy checkpoint), the rewrites are still checked: the deployed
    # model as loaded against itself under deploy_rewrites
    reference = built.training_model if built.training_model is not None else built.model
    verification = verify_deployed(reference, built.model, size, atol, rtol, seed, conv_bias)
    timings["verify"] = time.perf_counter() - start
    if built.training_model is not None:
        log(f"verified against the training form: {verification.summary()}")
    else:
        log("weights are already deployed: no training form to verify against; the export's rewrites "
            f"verified against the deployed model as loaded: {verification.summary()}")
    target = os.path.join(output_dir, config.name)
    start = time.perf_counter()
    plain = conv_bias != "channel_add"  # model.json is not already the plain form: write model_plain.json too
    with atomic_directory(target) as tmp:
        save_inference_model(built.model, os.path.join(tmp, MODEL_FILE), size, conv_bias=conv_bias, graph=graph)
        if plain:
            save_plain_program(built.model, tmp, size, with_nms, graph=graph)
        _infer_cfg(config, os.path.join(tmp, INFER_CFG), size, built.model, image_only)
        checkpoint.save_state(built.model, os.path.join(tmp, DEPLOY_CHECKPOINT))
        ops = count_ops(tmp)
        onnx_report = (export_onnx(built.model, tmp, size, with_nms, log, graph,
                                   strict_detections=built.weights_form != "random", atol=atol, rtol=rtol)
                       if onnx else None)
        if onnx and importlib.util.find_spec("openvino") is not None:
            # OpenVINO's IR of the checked model.onnx: loads without converting the ONNX file each time
            from ppfuse.runtime.openvino_runtime import conversion_failure, write_ir
            try:
                write_ir(os.path.join(tmp, ONNX_FILE), os.path.join(tmp, OPENVINO_FILE))
                onnx_report["openvino_ir"] = OPENVINO_FILE
            except Exception as exc:  # an op OpenVINO cannot read: the ONNX file stays
                reason = conversion_failure(exc)
                onnx_report["openvino_ir"] = None
                onnx_report["openvino_ir_error"] = reason
                log(f"no {OPENVINO_FILE}: OpenVINO cannot read {ONNX_FILE} ({reason}); ONNX Runtime runs it")
        report = {
            "config": os.path.abspath(config.path), "weights": weights or config.weights or None,
            "weights_form": built.weights_form, "random_weights": built.weights_form == "random",
            "input_size": size, "with_nms": with_nms, "image_only": image_only,
            **({"plain_graph": plain_graph_contract(os.path.join(tmp, INFER_CFG), size, with_nms,
                                                    _box_values(built.model, size), onnx_report)}
               if image_only else {}),
            "conversion": built.conversion.to_dict() if built.conversion else None,
            "verification": verification.to_dict(),
            "verified_against": "training form" if built.training_model is not None else "deployed model as loaded",
            "rewrites": rewrites_report(conv_bias),
            "programs": {"model.json": f"conv biases {conv_bias}",
                         **({PLAIN_PROGRAM_FILE: "conv biases channel_add, for Paddle Inference with oneDNN off"}
                            if plain else {})},
            "op_counts": {op: ops.get(op, 0) for op in COUNTED_OPS},
            "fp16_overflow": overflow,
            "onnx": onnx_report,
            "paddle": paddle.__version__,
        }
        with open(os.path.join(tmp, REPORT_FILE), "w") as f:
            json.dump(report, f, indent=2)
    timings["save"] = time.perf_counter() - start
    return ExportResult(target, built, verification, ops, timings)
