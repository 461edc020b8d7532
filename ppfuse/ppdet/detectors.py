"""How ppfuse runs a PaddleDetection detector: its inputs, its raw outputs, its detections.

Two wrappers, one per kind of ppdet architecture, both ``nn.Layer`` s that trace
with ``to_static(full_graph=True)``:

- :class:`DetectorForInference` -- PP-YOLOE-style detectors (``backbone``, ``neck``, a
  ``PPYOLOEHead``): ``(image, scale_factor)``; raw outputs are decoded boxes and
  scores before NMS. ppfuse's own tuned path (per-class top-k for ONNX).
- :class:`PPDetDetector` -- any other ppdet architecture: ``(image, im_shape,
  scale_factor)`` into ppdet's own forward in eval mode; detections are what
  ppdet's post-processing returns (``bbox [K, 6]``, ``bbox_num [N]``), traced with
  :func:`ppfuse.ppdet.postprocess.pir_traceable_postprocess` active; raw outputs
  are the outputs of the detector's head (its last layer with parameters) --
  everything the conversion can change, before any selection (NMS, top-k) that
  would turn a rounding difference into a different box.
- :class:`ImageOnly` -- either of them as the plain graph: ``image`` alone, the image's own size as
  ``im_shape`` and scale factors of 1, so every box is in pixels of the input; without NMS its outputs are
  the boxes and scores NMS would have taken.

:func:`wrapper_for`, :func:`input_spec`, :func:`sample_inputs` and
:func:`raw_outputs` choose between them, so the rest of ppfuse does not.
"""
from __future__ import annotations

import contextlib
import os
import traceback
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import paddle
import paddle.nn as nn

from ppfuse.errors import ConfigError, ModelError, PPFuseError, first_line

# attributes under which ppdet 2.6.0's architectures hold their head (in this order of preference)
HEAD_ATTRIBUTES = ("yolo_head", "fcos_head", "ssd_head", "blaze_head", "ttf_head", "detr_head", "head",
                   "bbox_head")
PPYOLOE_HEADS = ("PPYOLOEHead",)


def is_ppyoloe_style(model: nn.Layer) -> bool:
    """A PP-YOLOE(+) detector: backbone, neck and a ``PPYOLOEHead`` as ``yolo_head``."""
    head = getattr(model, "yolo_head", None)
    return (hasattr(model, "backbone") and hasattr(model, "neck")
            and type(head).__name__ in PPYOLOE_HEADS)


def head_of(model: nn.Layer) -> Tuple[str, nn.Layer]:
    """``(attribute, layer)`` of the detector's head: what its raw outputs are read from."""
    heads = [(name, getattr(model, name, None)) for name in HEAD_ATTRIBUTES]
    heads = [(name, layer) for name, layer in heads if isinstance(layer, nn.Layer)]
    # a head with parameters first; else one without (RT-DETR's DINOHead reads what its transformer predicted)
    for name, layer in sorted(heads, key=lambda item: not item[1].parameters()):
        return name, layer
    raise ConfigError(f"{type(model).__name__}: no head found (looked for {', '.join(HEAD_ATTRIBUTES)} with "
                      "parameters); ppfuse reads a detector's raw outputs from its head")


class DetectorForInference(nn.Layer):  # PP-YOLOE style
    """``(image, scale_factor)`` -> ``(bbox, bbox_num)`` after NMS, or ``(boxes, scores)`` before it.

    ``bbox`` rows are ``[class, score, x1, y1, x2, y2]`` in original-image
    pixels, as ppdet's exported models give them.

    ``topk_before_nms`` hands NMS each class's ``nms_top_k`` best boxes only,
    as separate box sets (scores block-diagonal, zero elsewhere). Paddle's
    ``multiclass_nms3`` does that selection itself, so detections are the same;
    ONNX ``NonMaxSuppression`` (what paddle2onnx makes of it) does not, and
    without it spent 80% of ONNX Runtime's time on PP-YOLOE+ s.
    """

    def __init__(self, model: nn.Layer, with_nms: bool = True, topk_before_nms: bool = False,
                 nms_inputs_too: bool = False):
        super().__init__()
        self.nms_inputs_too = nms_inputs_too  # detections, then the boxes and scores NMS took (the ONNX check's)
        for part in ("backbone", "neck", "yolo_head"):
            if not hasattr(model, part):
                raise ConfigError(f"{type(model).__name__} has no '{part}'; ppfuse exports PP-YOLOE-style "
                                  "detectors (backbone, neck, yolo_head)")
        self.model = model
        self.with_nms = with_nms
        self.topk_before_nms = topk_before_nms

    def raw_outputs(self, image, scale_factor):
        from ppdet.modeling.bbox_utils import batch_distance2bbox
        model = self.model
        feats = model.backbone({"image": image})
        feats = model.neck(feats, getattr(model, "for_mot", False))
        scores, distances, anchor_points, stride_tensor = model.yolo_head(feats)
        boxes = batch_distance2bbox(anchor_points, distances) * stride_tensor
        scale_y, scale_x = paddle.split(scale_factor, 2, axis=-1)
        scale = paddle.concat([scale_x, scale_y, scale_x, scale_y], axis=-1).reshape([-1, 1, 4])
        return boxes / scale, scores

    def forward(self, image, scale_factor):
        boxes, scores = self.raw_outputs(image, scale_factor)
        if not self.with_nms:
            return boxes, scores
        nms = self.model.yolo_head.nms
        raw = (boxes, scores)
        if self.topk_before_nms:
            from ppfuse.ppdet.postprocess import per_class_top_k
            boxes, scores = per_class_top_k(boxes, scores, nms.nms_top_k)
        bbox, _, bbox_num = paddle._C_ops.multiclass_nms3(
            boxes, scores, None, nms.score_threshold, nms.nms_top_k, nms.keep_top_k, nms.nms_threshold,
            nms.normalized, nms.nms_eta, -1)
        return (bbox, bbox_num) + (raw if self.nms_inputs_too else ())



class _HeadOutputs(Exception):
    """Raised by the head hook in dygraph: the raw outputs are there, post-processing need not run."""


class PPDetDetector(nn.Layer):
    """Any ppdet architecture: ``(image, [im_shape,] [scale_factor])`` -> ``(bbox, bbox_num)`` by ppdet's
    own forward and post-processing (eval mode), or with ``with_nms=False`` the head's raw outputs (a flat
    tuple of its float tensors, in the head's order).

    The export traces it with the inputs some output uses (``paddle.jit.save`` refuses a program with an
    input it does not use). Post-processing traces under PIR only inside
    :func:`traceable` (ppdet's NMS and prior-box ops call Paddle's legacy API). Built by
    :func:`wrapper_for`, which picks the subclass whose ``forward`` takes exactly those inputs
    (``to_static`` reads the signature).
    """

    def __init__(self, model: nn.Layer, with_nms: bool = True, nms_inputs_too: bool = False,
                 nms_inputs_only: bool = False):
        super().__init__()
        self.model = model
        self.with_nms = with_nms
        self.nms_inputs_too = nms_inputs_too  # detections and the (boxes, scores) NMS took: the ONNX check's
        # the (boxes, scores) NMS takes instead of the detections: an ONNX program whose NMS follows it
        self.nms_inputs_only = nms_inputs_only
        self.head_name, _ = head_of(model)

    def _run(self, image, im_shape=None, scale_factor=None):
        # an input the traced outputs do not use is not a program input; ppdet may still read it
        if im_shape is None:
            im_shape = image_shape(image)
        if scale_factor is None:
            scale_factor = paddle.ones_like(im_shape)
        inputs = {"image": image, "im_shape": im_shape, "scale_factor": scale_factor}
        if self.with_nms and self.nms_inputs_only:
            return _nms_inputs(self.model, self.model, inputs)
        if self.with_nms and self.nms_inputs_too:
            from ppfuse.ppdet.postprocess import nms_inputs
            store: list = []
            with nms_inputs(store):
                out = self.model(inputs)
            return (out["bbox"], out["bbox_num"]) + (tuple(store[-1]) if store else ())
        if self.with_nms:
            out = self.model(inputs)
            return out["bbox"], out["bbox_num"]
        captured = []

        def keep(layer, args, output):
            captured.append(output)
            if paddle.in_dynamic_mode():  # eager: skip post-processing; tracing: it is traced and pruned
                raise _HeadOutputs()
        handle = getattr(self.model, self.head_name).register_forward_post_hook(keep)
        try:
            self.model(inputs)
        except _HeadOutputs:
            pass
        finally:
            handle.remove()
        if not captured:
            raise ConfigError(f"{type(self.model).__name__}: its forward did not call its {self.head_name}")
        return tuple(_float_tensors(captured[-1]))


def _nms_inputs(model: nn.Layer, run: nn.Layer, inputs) -> Tuple:
    """The ``(boxes, scores)`` the last NMS of ``model``'s post-processing takes when ``run(inputs)`` runs it
    (its detections, traced, are pruned: no output uses them)."""
    from ppfuse.ppdet.postprocess import nms_inputs
    store: list = []
    with nms_inputs(store):
        run(inputs)
    if not store:
        raise ConfigError(f"{type(model).__name__} calls no NMS (its post-processing selects by top-k), "
                          "so it has no raw boxes and scores before NMS; export --image_only without --no_nms "
                          "(its detections)")
    return tuple(store[-1])


class _Image(PPDetDetector):
    def forward(self, image):
        return self._run(image)


class _ImageScale(PPDetDetector):
    def forward(self, image, scale_factor):
        return self._run(image, scale_factor=scale_factor)


class _ImageShape(PPDetDetector):
    def forward(self, image, im_shape):
        return self._run(image, im_shape=im_shape)


class _ImageShapeScale(PPDetDetector):
    def forward(self, image, im_shape, scale_factor):
        return self._run(image, im_shape, scale_factor)


def image_shape(image) -> paddle.Tensor:
    """``[N, 2]`` float32: the height and width of every image of the batch ``image [N, C, H, W]``."""
    return paddle.shape(image)[2:].astype("float32").unsqueeze(0).tile([paddle.shape(image)[0], 1])


class ImageOnly(nn.Layer):
    """The plain graph: ``image`` -> ``(bbox, bbox_num)`` after NMS or, with ``with_nms=False``, the
    ``(boxes, scores)`` NMS takes, every box in pixels of the input (``im_shape`` = the image's size, scale
    factors of 1, so ppdet's post-processing scales nothing and clips to the input).

    ``bgr`` flips the channels first: the plain graph takes RGB, a detector trained on BGR (CenterNet, whose
    ``WarpAffine`` converts) gets BGR. Without NMS, a family whose post-processing calls no NMS (DETR,
    CenterNet, TTFNet: a top-k) raises :class:`ConfigError` when traced.
    """

    def __init__(self, model: nn.Layer, with_nms: bool = True, topk_before_nms: bool = False, bgr: bool = False,
                 nms_inputs_too: bool = False, nms_inputs_only: bool = False):
        super().__init__()
        self.model = model
        self.with_nms = with_nms and not nms_inputs_only  # NMS after the graph: its inputs are the outputs
        self.bgr = bgr
        self.ppyoloe = is_ppyoloe_style(model)
        self.inner = (DetectorForInference(model, with_nms, topk_before_nms, nms_inputs_too and with_nms)
                      if self.ppyoloe else _Image(model, with_nms=True, nms_inputs_too=nms_inputs_too and with_nms))

    def forward(self, image):
        if self.bgr:
            image = paddle.flip(image, axis=[1])
        if self.ppyoloe:
            return self.inner(image, paddle.ones_like(image_shape(image)))
        if self.with_nms:
            return self.inner(image)
        return _nms_inputs(self.model, self.inner, image)


_BY_INPUTS = {("image",): _Image, ("image", "scale_factor"): _ImageScale, ("image", "im_shape"): _ImageShape,
              ("image", "im_shape", "scale_factor"): _ImageShapeScale}


def _float_tensors(out) -> List[paddle.Tensor]:
    if isinstance(out, (paddle.Tensor, paddle.pir.Value)):
        return [out] if out.dtype in (paddle.float32, paddle.float64, paddle.float16, paddle.bfloat16) else []
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (list, tuple)):
        return [t for item in out for t in _float_tensors(item)]
    return []


# architectures whose ppdet 2.6.0 forward was seen failing on Paddle 3.x itself (0-d tensors from indexing, no
# implicit float/int promotion): only for these is the Paddle version named as the cause
FAIL_ON_PADDLE_3 = ("FasterRCNN", "MaskRCNN", "CascadeRCNN", "TOOD", "DETR:DeformableTransformer", "DINO", "SOLOv2")
# the largest feature stride of the detectors ppfuse exports: an input size must be a multiple of it
STRIDE = 32


def size_problem(model: nn.Layer, size: Optional[Sequence[int]]) -> Optional[str]:
    """What is wrong with exporting ``model`` at ``size`` = ``[H, W]``, if a size constraint explains a
    failure: not a multiple of :data:`STRIDE`, or a head that precomputed anchors for another ``eval_size``."""
    if size is None:
        return None
    size = [int(s) for s in size]
    if any(s % STRIDE for s in size):
        fits = [max(STRIDE, int(round(s / STRIDE)) * STRIDE) for s in size]
        return (f"input size {size} is not a multiple of {STRIDE}, the largest feature stride of the detector "
                f"(feature maps of the neck no longer match); use e.g. {fits} (--input_size {fits[0]} {fits[1]})")
    head = next((sub for sub in [model] + model.sublayers() if getattr(sub, "eval_size", None)), None)
    if head is not None and [int(s) for s in head.eval_size] != size:
        return (f"{type(head).__name__} precomputes its anchors for eval_size {list(head.eval_size)}, but the input "
                f"is {size}; export with --input_size {size[0]} {size[1]} (or -o eval_size={size}) so that both "
                "agree")
    return None


@contextlib.contextmanager
def ppdet_failures(model: nn.Layer, size: Optional[Sequence[int]] = None):
    """Turn an exception from ppdet's own code while it runs ``model`` (at input ``size``) into one line:
    a size the architecture cannot take (:func:`size_problem`) as a :class:`ConfigError` naming the
    constraint and the fix; else what failed and where in ppdet as a :class:`ModelError`, naming Paddle's
    version as the cause only for the architectures seen failing on Paddle 3.x (:data:`FAIL_ON_PADDLE_3`)."""
    try:
        yield
    except (PPFuseError, _HeadOutputs, KeyboardInterrupt):
        raise
    except Exception as exc:
        import ppdet
        root = os.path.dirname(os.path.abspath(ppdet.__file__)) + os.sep  # PaddleDetection's own files only
        frames = traceback.extract_tb(exc.__traceback__)
        ppdet_frames = [f for f in frames if os.path.abspath(f.filename).startswith(root)]
        if not ppdet_frames:
            raise
        where = ppdet_frames[-1]
        inside = os.path.relpath(os.path.abspath(where.filename), root).replace(os.sep, "/")
        problem = size_problem(model, size)
        if problem is not None:
            raise ConfigError(f"{type(model).__name__}: {problem} (ppdet's forward fails: {first_line(exc)[:160]})"
                              ) from None
        version = getattr(ppdet, "__version__", "")
        if type(model).__name__ not in FAIL_ON_PADDLE_3 and not _transformer_in(model, FAIL_ON_PADDLE_3):
            raise ModelError(f"{type(model).__name__}: ppdet {version}'s own forward fails on this config: "
                             f"{first_line(exc)[:250]} (at ppdet/{inside}:{where.lineno}); check the config "
                             "(input size, eval_size, the model's settings)") from None
        raise ModelError(f"{type(model).__name__}: ppdet {version}'s own forward fails on "
                         f"Paddle {paddle.__version__}: {first_line(exc)[:250]} (at ppdet/"
                         f"{inside}:{where.lineno}); ppfuse "
                         "converts models ppdet can run -- use a Paddle version this ppdet supports") from None


def _transformer_in(model: nn.Layer, names: Sequence[str]) -> bool:
    """``"Architecture:Transformer"`` entries of ``names`` that ``model`` matches (DETR is fine, DETR with a
    deformable transformer is not)."""
    parts = {type(sub).__name__ for sub in model.sublayers()}
    return any(":" in n and n.split(":")[0] == type(model).__name__ and n.split(":")[1] in parts for n in names)


def wrapper_for(model: nn.Layer, with_nms: bool = True, topk_before_nms: bool = False,
                names: Optional[Sequence[str]] = None, image_only: bool = False, bgr: bool = False,
                nms_inputs_too: bool = False, nms_inputs_only: bool = False) -> nn.Layer:
    """The wrapper that runs ``model``: :class:`DetectorForInference` for PP-YOLOE style, else a
    :class:`PPDetDetector` taking ``names`` (default :func:`input_names`; ``topk_before_nms`` is PP-YOLOE's
    only); with ``image_only`` the plain graph :class:`ImageOnly` (``bgr``: the model takes BGR).
    ``nms_inputs_too``: after the detections, also the boxes and scores NMS took, if it ran;
    ``nms_inputs_only`` (not PP-YOLOE style): those instead of the detections (NMS follows the graph)."""
    if image_only:
        return ImageOnly(model, with_nms, topk_before_nms, bgr, nms_inputs_too, nms_inputs_only)
    if is_ppyoloe_style(model):
        return DetectorForInference(model, with_nms, topk_before_nms, nms_inputs_too)
    return _BY_INPUTS[tuple(names or input_names(model))](model, with_nms, nms_inputs_too, nms_inputs_only)


def input_names(model: nn.Layer, image_only: bool = False) -> Tuple[str, ...]:
    """The inputs of ``model``'s wrapper: ``image, scale_factor`` for PP-YOLOE style, else all three
    ppdet models take (the export drops those no output uses, :func:`ppfuse.ppdet.export.save_inference_model`);
    ``image`` alone for the plain graph."""
    if image_only:
        return ("image",)
    if is_ppyoloe_style(model):
        return ("image", "scale_factor")
    return ("image", "im_shape", "scale_factor")


def input_spec(model: nn.Layer, size: Sequence[int],
               names: Optional[Sequence[str]] = None) -> List[paddle.static.InputSpec]:
    """The inputs of :func:`wrapper_for` ``(model)`` (or the inputs ``names``) at ``size`` = ``[H, W]``."""
    shapes = {"image": [None, 3, int(size[0]), int(size[1])], "im_shape": [None, 2], "scale_factor": [None, 2]}
    return [paddle.static.InputSpec(shapes[n], "float32", n) for n in names or input_names(model)]


def generated_inputs(size: Sequence[int], batch: int = 1, seed: int = 0) -> Dict[str, paddle.Tensor]:
    """Images in [0, 1] at ``size`` drawn from ``seed``, ``im_shape`` = size, scale factors of 1."""
    rng = np.random.RandomState(seed)
    values = {"image": rng.uniform(0, 1, (batch, 3, size[0], size[1])).astype("float32"),
              "im_shape": np.tile(np.array([[size[0], size[1]]], "float32"), (batch, 1)),
              "scale_factor": np.ones((batch, 2), "float32")}
    return {name: paddle.to_tensor(value) for name, value in values.items()}


def sample_inputs(size: Sequence[int], batch: int = 1, seed: int = 0,
                  names: Sequence[str] = ("image", "scale_factor")) -> List[paddle.Tensor]:
    """:func:`generated_inputs` in the order of ``names`` (a model's: :func:`input_names`; the default is
    PP-YOLOE style's ``image, scale_factor``)."""
    values = generated_inputs(size, batch, seed)
    return [values[n] for n in names]


def ppdet_path(model: nn.Layer, inplace: bool = False) -> nn.Layer:
    """The model as ppdet's own export gives it: ``convert_to_deploy()`` called where a layer has it (ppdet's
    RepVggBlock, whose training form's ``if self.alpha`` traces to an ``if`` op Paddle Inference cannot run),
    every Conv + BatchNorm left for Paddle Inference's own passes. On a copy unless ``inplace``."""
    if not inplace:
        import copy
        model = copy.deepcopy(model)
    for layer in model.sublayers():
        if hasattr(layer, "convert_to_deploy"):
            layer.convert_to_deploy()
    return model


@contextlib.contextmanager
def traceable(model: nn.Layer, onnx: bool = False, priors=None, record: bool = False, nms_after: bool = False):
    """While active, ``model``'s post-processing traces under PIR (a no-op for PP-YOLOE style, whose
    wrapper calls PIR-aware ops itself). ``onnx``: in the forms paddle2onnx converts
    (:func:`ppfuse.ppdet.postprocess.onnx_postprocess`; ``priors`` recorded with ``record``, then replayed;
    ``nms_after``: NMS without an ONNX form left as it is, for a program that ends before it)."""
    if is_ppyoloe_style(model):
        yield
        return
    from ppfuse.ppdet.postprocess import onnx_postprocess, pir_traceable_postprocess
    if priors is not None:
        priors.rewind()
    with pir_traceable_postprocess(), (onnx_postprocess(priors, record, nms_after) if onnx
                                       else contextlib.nullcontext()):
        yield


def last_nms_call(model: nn.Layer, size: Sequence[int], image_only: bool = False) -> Optional[tuple]:
    """``(name, box shape, score shape, {argument: value})`` of the last NMS ``model``'s post-processing calls on
    a generated input (a dygraph run; :func:`ppfuse.ppdet.postprocess.nms_inputs`), or None: PP-YOLOE style
    (its wrapper calls NMS itself) or a family without NMS."""
    if is_ppyoloe_style(model):
        return None
    from ppfuse.ppdet.postprocess import nms_inputs
    names = input_names(model, image_only)
    values = generated_inputs(size, 1, 0)
    calls: list = []
    with traceable(model), nms_inputs([], calls), paddle.no_grad(), ppdet_failures(model, size):
        wrapper_for(model, True, False, names, image_only)(*[values[n] for n in names])
    return calls[-1] if calls else None


def raw_outputs(model: nn.Layer, inputs: Sequence[paddle.Tensor], size: Sequence[int]) -> Dict[str, np.ndarray]:
    """``model``'s raw outputs on ``inputs`` as compared everywhere, each O(1): PP-YOLOE's boxes as fractions
    of the input size and its scores; any other detector's head outputs each divided by its own largest
    magnitude (so one tolerance is relative to each output's scale). Evaluated under ``no_grad``."""
    with paddle.no_grad(), ppdet_failures(model, size):
        out = wrapper_for(model, with_nms=False)(*inputs)
    if is_ppyoloe_style(model):
        return ppyoloe_outputs(*(t.numpy() for t in out), size=size)
    return {f"{head_of(model)[0]}.{i}": t.numpy() for i, t in enumerate(out)}


def raw_outputs_in_float64(model: nn.Layer, inputs: Sequence[paddle.Tensor],
                           size: Sequence[int]) -> Dict[str, np.ndarray]:
    """:func:`raw_outputs` of a float64 copy of ``model`` on ``inputs`` cast to float64 (``model`` is left as
    it is): the reference that tells fp32 rounding from a conversion error."""
    from ppfuse.core.verify import float64_copy
    return raw_outputs(float64_copy(model), [t.astype("float64") for t in inputs], size)


def ppyoloe_outputs(boxes, scores, size: Sequence[int]) -> Dict[str, np.ndarray]:
    """PP-YOLOE's raw boxes and scores as compared everywhere: boxes as fractions of the input size, so one
    tolerance fits both (both O(1))."""
    return {"boxes_over_size": np.asarray(boxes, np.float64) / float(max(size)), "scores": np.asarray(scores)}


def normalize_like(reference: Dict[str, np.ndarray], *others: Dict[str, np.ndarray]):
    """Divide every output of ``reference`` and ``others`` by the reference's largest magnitude of that
    output (PP-YOLOE's, already O(1), are left); returns the normalized dicts."""
    def scale(name):
        if name in ("boxes_over_size", "scores"):
            return 1.0
        return float(np.abs(np.asarray(reference[name], np.float64)).max()) or 1.0
    return [{k: np.asarray(v, np.float64) / scale(k) for k, v in d.items()} for d in (reference,) + others]
