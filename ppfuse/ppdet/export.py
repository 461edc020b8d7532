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
   place only when complete.
"""
from __future__ import annotations

import contextlib
import filecmp
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import numpy as np
import paddle
import paddle.nn as nn
import paddle.nn.functional as F

from ppfuse.core import checkpoint, layers

from ppfuse.ppdet import detectors
from ppfuse.ppdet.detection import BuiltModel, DetectionConfig, build_model
from ppfuse.errors import ConfigError, ExportError, VerificationError
from ppfuse.export_format import (DEPLOY_CHECKPOINT, INFER_CFG, MODEL_FILE, ONNX_FILE, PARAMS_FILE,
                            PLAIN_MODEL_FILE, PLAIN_PROGRAM_FILE, REPORT_FILE,
                            program_file, require_paddle_3)
from ppfuse.runtime.base import RuntimeOptions
from ppfuse.runtime.paddle_inference import create_predictor, run_predictor
from ppfuse.core.verify import VerificationResult, compare, judge
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


def save_inference_model(model: nn.Layer, path_prefix: str, size: List[int], with_nms: bool = True,
                         topk_before_nms: bool = False, conv_bias: str = DEFAULT_CONV_BIAS,
                         speed_forms: bool = True) -> None:
    """Trace ``model`` (a ppdet detector in eval mode, run by :func:`ppfuse.ppdet.detectors.wrapper_for`) under
    :func:`deploy_rewrites` and ``paddle.jit.save`` it.

    A detector that does not use all of ``image, im_shape, scale_factor`` (``paddle.jit.save`` refuses an
    input no output depends on) is traced again with the ones it uses.
    """
    names = detectors.input_names(model)
    with deploy_rewrites(conv_bias, speed_forms), detectors.traceable(model):
        while True:
            wrapper = detectors.wrapper_for(model, with_nms, topk_before_nms, names)
            wrapper.eval()
            static = paddle.jit.to_static(wrapper, input_spec=detectors.input_spec(model, size, names),
                                          full_graph=True)
            used = inputs_used(static.forward.concrete_program)
            if used == names:
                break
            names = used
        paddle.jit.save(static, path_prefix)


def save_plain_program(model: nn.Layer, directory: str, size: List[int], with_nms: bool = True) -> None:
    """Write ``model_plain.json`` next to an export's ``model.json`` (conv biases in oneDNN's form): the same
    network with the biases as ``[C, 1, 1]`` adds, the form Paddle's plain CPU kernels run faster (oneDNN
    off, batch > 1; Paddle Inference picks it then, :func:`ppfuse.runtime.paddle_inference.create_predictor`).
    It reads the export's ``model.pdiparams``: its own weights file is checked byte-identical, then removed.
    Both programs then run in Paddle Inference with oneDNN off on a generated image (batch 1: some families'
    post-processing takes no more); their outputs must be identical (the same sums in the same kernels), or
    nothing is kept and :class:`ExportError` says so.
    """
    save_inference_model(model, os.path.join(directory, PLAIN_MODEL_FILE), size, with_nms, conv_bias="channel_add")
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
    original = detectors.raw_outputs(training_model, inputs, size)
    with deploy_rewrites(conv_bias, speed_forms):
        candidate = detectors.raw_outputs(deployed, inputs, size)
    reference, candidate = detectors.normalize_like(original, candidate)

    def float64_reference():
        from ppfuse.core.verify import float64_copy
        try:
            exact = detectors.raw_outputs(float64_copy(training_model), [t.astype("float64") for t in inputs],
                                          size)
        except Exception as exc:  # a ppdet module that cannot compute in float64
            raise VerificationError(f"deployed model differs from the original beyond tolerance "
                                    f"({compare(reference, candidate, atol, rtol).brief()}), and the float64 "
                                    f"reference that would tell rounding from error could not run: "
                                    f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from None
        return detectors.normalize_like(original, exact)[1]
    result = judge(reference, candidate, atol, rtol, float64_reference)
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


def _infer_cfg(config: DetectionConfig, path: str, size: List[int], model: nn.Layer) -> None:
    """``infer_cfg.yml`` for PaddleDetection's ``deploy/python/infer.py``, written by ppdet's own function."""
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


def _export_onnx(model: nn.Layer, directory: str, size: List[int], with_nms: bool, log) -> dict:
    """Write and check ``model.onnx`` beside the Paddle model; raise (nothing written) when it is off.

    The ONNX model is converted from a program traced with per-class top-k
    before NMS (see :class:`DetectorForInference`); it is checked against the
    Paddle model written beside it.
    """
    from ppfuse.deploy import onnx_support
    staging = os.path.join(directory, ".onnx_source")
    save_inference_model(model, os.path.join(staging, MODEL_FILE), size, with_nms, topk_before_nms=True)
    path = onnx_support.to_onnx(staging, os.path.join(directory, ONNX_FILE))
    shutil.rmtree(staging)
    nodes = onnx_support.node_counts(path)
    if nodes.get("BatchNormalization", 0) or nodes.get("If", 0):
        raise ExportError(f"{path}: {nodes.get('BatchNormalization', 0)} BatchNormalization and "
                          f"{nodes.get('If', 0)} If nodes left; the deployed program should have none")
    image, scale = detectors.sample_inputs(size, 1, 3)
    # same tolerance as the export check: 1e-4 of the input size, in pixels
    ok, how = onnx_support.check_against_paddle(directory, path, {"image": image.numpy(),
                                                                  "scale_factor": scale.numpy()},
                                                box_atol=DEFAULT_ATOL * max(size), with_nms=with_nms)
    log(f"ONNX Runtime vs Paddle Inference: {how}")
    if not ok:
        raise VerificationError(f"{path}: ONNX Runtime's outputs differ from Paddle Inference's: {how}")
    return {"nodes": nodes, "check": how}


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
           log=print) -> ExportResult:
    """Build, convert, verify and write ``output_dir/<config name>/``; all files or none.

    Args:
        strict: fail when any BatchNorm would stay unfolded (otherwise warn).
        conv_bias: how ``model.json`` writes conv biases (:data:`CONV_BIAS_FORMS`): ``in_conv``
            (default; oneDNN fuses it; ``model_plain.json`` is written too, :func:`save_plain_program`) or
            ``channel_add`` (faster with oneDNN off, batch > 1; ``model.json`` only).
        onnx: also write ``model.onnx`` (paddle2onnx), checked against Paddle
            Inference: no BatchNormalization or If node, outputs within tolerance.

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
    if onnx and not detectors.is_ppyoloe_style(built.model):
        raise ConfigError(f"--onnx: ppfuse writes ONNX for PP-YOLOE(+) exports only; {config.name} is "
                          f"{config.architecture} (its Paddle Inference export works without --onnx)")
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
        save_inference_model(built.model, os.path.join(tmp, MODEL_FILE), size, with_nms, conv_bias=conv_bias)
        if plain:
            save_plain_program(built.model, tmp, size, with_nms)
        _infer_cfg(config, os.path.join(tmp, INFER_CFG), size, built.model)
        checkpoint.save_state(built.model, os.path.join(tmp, DEPLOY_CHECKPOINT))
        ops = count_ops(tmp)
        onnx_report = _export_onnx(built.model, tmp, size, with_nms, log) if onnx else None
        report = {
            "config": os.path.abspath(config.path), "weights": weights or config.weights or None,
            "weights_form": built.weights_form, "random_weights": built.weights_form == "random",
            "input_size": size, "with_nms": with_nms,
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
