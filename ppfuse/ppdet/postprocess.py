"""ppdet's detection post-processing in a form ``paddle.jit.to_static(full_graph=True)`` can trace.

ppdet 2.6.0's ``ppdet.modeling.ops`` runs ``multiclass_nms``, ``matrix_nms``,
``prior_box`` and ``box_coder`` through ``paddle._legacy_C_ops`` in dynamic mode
and through the old ``LayerHelper``/``append_op`` path otherwise. While Paddle 3's
``to_static`` builds a PIR program the mode is not dynamic, and the old path
refuses PIR values (``TypeError: The type of '%BBoxes' in operator
multiclass_nms3 should be one of [str, bytes, Variable]``). So every
PaddleDetection detector whose post-processing uses ``MultiClassNMS``,
``MatrixNMS``, ``AnchorGeneratorSSD`` (``prior_box``) or
``SSDBox(use_fuse_decode=True)`` (``box_coder``) fails to export: PP-YOLO(v2),
YOLOv3, PicoDet, YOLOX, RetinaNet, FCOS, GFL, SSD/SSDLite, BlazeFace, YOLOF.

:func:`pir_traceable_postprocess` replaces, while it is active, those functions
of ``ppdet.modeling.ops`` with versions of the same signature and return values
written on ``paddle._C_ops`` -- the operator API that runs eagerly in dygraph
and records a PIR op while tracing, with the same kernels -- and puts ppdet's
functions back on exit, also when the body raises. An argument value these do
not support raises :class:`ppfuse.errors.ExportError` naming it.

``multiclass_nms`` on rotated boxes (PP-YOLOE-R: 8 coordinates) has no ONNX form; its ONNX program ends at the
boxes and scores NMS takes (:func:`nms_after_graph`), and ppfuse's runtimes apply the NMS after it
(:mod:`ppfuse.runtime.rotated_nms`).

ppdet's layers call these functions as ``ops.<name>(...)``
(``ppdet.modeling.layers``: ``MultiClassNMS``, ``MatrixNMS``,
``AnchorGeneratorSSD``, ``SSDBox``), so replacing the module attribute reaches
every caller in those families. Not replaced: ``generate_proposals``,
``distribute_fpn_proposals`` and ``anchor_generator`` (two-stage RCNN and
rotated-box detectors, which are not exported through this path).
"""
from __future__ import annotations

import contextlib
import inspect
from typing import Dict, Iterator, List, Optional, Sequence

import numpy as np
import paddle
import paddle.nn.functional as F

from ppfuse.errors import ExportError
from ppfuse.runtime.rotated_nms import BOX_SIZE as ROTATED_BOX_SIZE, MultiClassNMS

Tensor = paddle.Tensor


def _is_tensor(value) -> bool:
    return isinstance(value, (paddle.Tensor, paddle.pir.Value))


def _as_list(value) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _unsupported(function: str, argument: str, value, supported: str) -> ExportError:
    return ExportError(f"ppdet.modeling.ops.{function} (replaced by ppfuse.ppdet.postprocess for export): "
                       f"{argument}={value!r} is not supported; {supported} -- change it in the model's config")


def multiclass_nms(bboxes, scores, score_threshold: float, nms_top_k: int, keep_top_k: int,
                   nms_threshold: float = 0.3, normalized: bool = True, nms_eta: float = 1.0,
                   background_label: int = -1, return_index: bool = False, return_rois_num: bool = True,
                   rois_num=None, name: Optional[str] = None):
    """``ppdet.modeling.ops.multiclass_nms`` on ``paddle._C_ops.multiclass_nms3``.

    Returns:
        ``(out [K, 6 or 10], rois_num [N], index [K, 1] or None)``, as ppdet's in dygraph:
        ``index`` only with ``return_index``; ``rois_num`` always (ppdet's dygraph path
        ignores ``return_rois_num``, and its callers are written against that path).
    """
    out, index, out_num = paddle._C_ops.multiclass_nms3(
        bboxes, scores, rois_num, float(score_threshold), int(nms_top_k), int(keep_top_k), float(nms_threshold),
        bool(normalized), float(nms_eta), int(background_label))
    return out, out_num, (index if return_index else None)


def matrix_nms(bboxes, scores, score_threshold: float, post_threshold: float, nms_top_k: int, keep_top_k: int,
               use_gaussian: bool = False, gaussian_sigma: float = 2.0, background_label: int = 0,
               normalized: bool = True, return_index: bool = False, return_rois_num: bool = True,
               name: Optional[str] = None):
    """``ppdet.modeling.ops.matrix_nms`` on ``paddle._C_ops.matrix_nms``.

    Returns:
        ``(out [K, 6], rois_num [N] or None, index [K, 1] or None)``, as ppdet's.
    """
    out, index, out_num = paddle._C_ops.matrix_nms(
        bboxes, scores, float(score_threshold), int(nms_top_k), int(keep_top_k), float(post_threshold),
        bool(use_gaussian), float(gaussian_sigma), int(background_label), bool(normalized))
    return out, (out_num if return_rois_num else None), (index if return_index else None)


def prior_box(input, image, min_sizes, max_sizes=None, aspect_ratios=(1.0,), variance=(0.1, 0.1, 0.2, 0.2),
              flip: bool = False, clip: bool = False, steps=(0.0, 0.0), offset: float = 0.5,
              min_max_aspect_ratios_order: bool = False, name: Optional[str] = None):
    """``ppdet.modeling.ops.prior_box`` on ``paddle._C_ops.prior_box``.

    ``max_sizes`` counts only when its first entry is > 0, as in ppdet.

    Returns:
        ``(boxes [H, W, P, 4], variances [H, W, P, 4])``.

    Raises:
        ExportError: ``steps`` is not ``(step_w, step_h)``.
    """
    steps = _as_list(steps)
    if len(steps) != 2:
        raise _unsupported("prior_box", "steps", steps, "it is (step_w, step_h)")
    max_list = [float(s) for s in _as_list(max_sizes)] if max_sizes is not None else []
    if not max_list or max_list[0] <= 0:
        max_list = []
    return paddle._C_ops.prior_box(
        input, image, [float(s) for s in _as_list(min_sizes)], max_list,
        [float(r) for r in _as_list(aspect_ratios)], [float(v) for v in variance], bool(flip), bool(clip),
        float(steps[0]), float(steps[1]), float(offset), bool(min_max_aspect_ratios_order))


BOX_CODE_TYPES = ("encode_center_size", "decode_center_size")


def box_coder(prior_box, prior_box_var, target_box, code_type: str = "encode_center_size",
              box_normalized: bool = True, axis: int = 0, name: Optional[str] = None):
    """``ppdet.modeling.ops.box_coder`` on ``paddle._C_ops.box_coder``.

    ``prior_box_var`` is a tensor ``[M, 4]`` or four floats shared by all boxes.

    Raises:
        ExportError: another ``code_type``, or ``prior_box_var`` neither a tensor nor four numbers.
    """
    if code_type not in BOX_CODE_TYPES:
        raise _unsupported("box_coder", "code_type", code_type, f"use one of {', '.join(BOX_CODE_TYPES)}")
    if _is_tensor(prior_box_var):
        return paddle._C_ops.box_coder(prior_box, prior_box_var, target_box, code_type, bool(box_normalized),
                                       int(axis), [])
    if isinstance(prior_box_var, (list, tuple)) and len(prior_box_var) == 4:
        return paddle._C_ops.box_coder(prior_box, None, target_box, code_type, bool(box_normalized), int(axis),
                                       [float(v) for v in prior_box_var])
    raise _unsupported("box_coder", "prior_box_var", prior_box_var, "a tensor [M, 4] or four floats")


# ppdet.modeling.ops attribute -> replacement; all callers in ppdet use ``ops.<name>``
REPLACEMENTS = {
    "multiclass_nms": multiclass_nms,
    "matrix_nms": matrix_nms,
    "prior_box": prior_box,
    "box_coder": box_coder,
}


@contextlib.contextmanager
def pir_traceable_postprocess() -> Iterator[Dict[str, object]]:
    """While active, ppdet's post-processing ops are the PIR-traceable ones of this module.

    Replaces the attributes :data:`REPLACEMENTS` names in ``ppdet.modeling.ops``;
    the originals come back on exit, also when the body raises. Entering it again
    while active is harmless (the inner exit restores what the outer one set).

    Yields:
        ``{name: ppdet's original function}``, for comparisons.
    """
    from ppdet.modeling import ops
    originals = {name: getattr(ops, name) for name in REPLACEMENTS}
    try:
        for name, function in REPLACEMENTS.items():
            setattr(ops, name, function)
        yield dict(originals)
    finally:
        for name, function in originals.items():
            setattr(ops, name, function)


# --- forms for ONNX -------------------------------------------------------------------------------------------------
# The program paddle2onnx converts is traced once more with these (the Paddle Inference program keeps ppdet's ops):
# each computes what the op of the same name computes, in ops paddle2onnx maps exactly.


def per_class_top_k(boxes, scores, top_k: int, with_source: bool = False):
    """``boxes [N, A, 4]``, ``scores [N, C, A]`` -> ``[N, C*k, 4]``, ``[N, C, C*k]``: class c's ``k`` best boxes
    only (its block of the scores; zero elsewhere), ``k = min(top_k, A)`` (all for ``top_k <= 0``). With
    ``with_source`` also ``[N*C*k]``: each chosen row's index in the flattened ``[N*A]`` input, the numbering
    of ``multiclass_nms3``'s ``index`` output (image ``n``'s box ``a`` is ``n*A + a``).

    Paddle's ``multiclass_nms3`` hands NMS each class's ``nms_top_k`` best boxes; ONNX ``NonMaxSuppression``
    (what paddle2onnx makes of it) reads ``nms_top_k`` as the number of boxes it *keeps* per class and gets
    them all. Fed these, both see the same boxes per class, so the detections are the same.
    """
    classes, anchors = scores.shape[1], scores.shape[2]
    k = min(top_k, anchors) if top_k and top_k > 0 else anchors
    top_scores, index = paddle.topk(scores, k, axis=-1)  # [N, C, k]
    flat = index.reshape([0, classes * k, 1]).expand([-1, classes * k, boxes.shape[-1]])
    chosen = paddle.take_along_axis(boxes, flat, axis=1)
    eye = paddle.eye(classes, dtype=scores.dtype).reshape([1, classes, classes, 1])
    block = (eye * top_scores.unsqueeze(1)).reshape([0, classes, classes * k])
    if not with_source:
        return chosen, block
    images = paddle.arange(paddle.shape(index)[0], dtype=index.dtype).reshape([-1, 1]) * anchors
    return chosen, block, (index.reshape([0, classes * k]) + images).reshape([-1])


def has_onnx_form(box_shape: Sequence[int], score_shape: Sequence[int]) -> bool:
    """Whether ``multiclass_nms3`` on boxes and scores of these shapes has an ONNX form: ONNX's
    ``NonMaxSuppression`` takes axis-aligned boxes ``[N, M, 4]`` with scores ``[N, C, M]``."""
    return len(score_shape) == 3 and len(box_shape) == 3 and box_shape[-1] == 4


def nms_after_graph(name: str, box_shape: Sequence[int], score_shape: Sequence[int],
                    arguments: Dict[str, object]) -> Optional[MultiClassNMS]:
    """The NMS ppfuse's runtimes apply after the ONNX graph for the NMS call ``name(boxes, scores, **arguments)``
    (:func:`nms_inputs` records it): ``multiclass_nms`` on rotated boxes ``[N, M, 8]`` with scores ``[N, C, M]``
    (:mod:`ppfuse.runtime.rotated_nms`); None for any other call (which has an ONNX form, or none at all)."""
    if name != "multiclass_nms" or len(score_shape) != 3 or len(box_shape) != 3 \
            or box_shape[-1] != ROTATED_BOX_SIZE or arguments.get("rois_num") is not None:
        return None
    return MultiClassNMS(float(arguments["score_threshold"]), int(arguments["nms_top_k"]),
                         int(arguments["keep_top_k"]), float(arguments["nms_threshold"]),
                         bool(arguments["normalized"]), float(arguments["nms_eta"]),
                         int(arguments["background_label"]))


def onnx_multiclass_nms(bboxes, scores, score_threshold: float, nms_top_k: int, keep_top_k: int,
                        nms_threshold: float = 0.3, normalized: bool = True, nms_eta: float = 1.0,
                        background_label: int = -1, return_index: bool = False, return_rois_num: bool = True,
                        rois_num=None, name: Optional[str] = None):
    """:func:`multiclass_nms` with each class's ``nms_top_k`` boxes chosen first (:func:`per_class_top_k`).

    Raises:
        ExportError: boxes that are not ``[N, M, 4]`` with scores ``[N, C, M]`` (rotated boxes: ONNX's
            ``NonMaxSuppression`` compares axis-aligned boxes only; per-box scores ``[M, C]``).
    """
    if not has_onnx_form(bboxes.shape, scores.shape):
        what = "rotated boxes (8 coordinates)" if bboxes.shape[-1] == ROTATED_BOX_SIZE else \
            f"boxes {list(bboxes.shape)} with scores {list(scores.shape)}"
        raise ExportError(f"ONNX: multiclass_nms3 on {what} has no ONNX form (ONNX NonMaxSuppression takes "
                          "axis-aligned boxes [N, M, 4] and scores [N, C, M]); export with --no_nms for ONNX, or "
                          "without --onnx for Paddle Inference")
    if float(nms_eta) < 1.0:
        raise _unsupported("multiclass_nms (ONNX)", "nms_eta", nms_eta, "ONNX NMS has a fixed threshold (1.0)")
    bboxes, scores, source = per_class_top_k(bboxes, scores, int(nms_top_k), with_source=True)
    out, out_num, index = multiclass_nms(bboxes, scores, score_threshold, nms_top_k, keep_top_k, nms_threshold,
                                         normalized, nms_eta, background_label, return_index, return_rois_num,
                                         rois_num, name)
    if index is not None:  # NMS numbered the chosen rows; the caller gathers from the input's rows
        index = paddle.gather(source, index.reshape([-1])).reshape([-1, 1])
    return out, out_num, index


def onnx_box_coder(prior_box, prior_box_var, target_box, code_type: str = "encode_center_size",
                   box_normalized: bool = True, axis: int = 0, name: Optional[str] = None):
    """:func:`box_coder`'s ``decode_center_size`` (``target [N, M, 4]``, priors ``[M, 4]``, ``axis=0``) in
    elementwise ops, in the kernel's order of operations (paddle2onnx has no ``box_coder``).

    Raises:
        ExportError: another code type or axis.
    """
    if code_type != "decode_center_size" or int(axis) != 0 or len(target_box.shape) != 3:
        raise ExportError(f"ONNX: box_coder with code_type={code_type}, axis={axis} has no ONNX form in ppfuse "
                          "(decode_center_size on [N, M, 4] with axis 0 has); export without --onnx")
    one = 0.0 if box_normalized else 1.0
    px1, py1, px2, py2 = paddle.split(prior_box.unsqueeze(0), 4, axis=-1)
    width, height = px2 - px1 + one, py2 - py1 + one
    cx, cy = px1 + width / 2, py1 + height / 2
    if _is_tensor(prior_box_var):
        vx, vy, vw, vh = paddle.split(prior_box_var.unsqueeze(0), 4, axis=-1)
    else:
        vx, vy, vw, vh = (float(v) for v in prior_box_var)
    tx, ty, tw, th = paddle.split(target_box, 4, axis=-1)
    centre_x = vx * tx * width + cx
    centre_y = vy * ty * height + cy
    box_w = paddle.exp(vw * tw) * width
    box_h = paddle.exp(vh * th) * height
    return paddle.concat([centre_x - box_w / 2, centre_y - box_h / 2, centre_x + box_w / 2 - one,
                          centre_y + box_h / 2 - one], axis=-1)


def onnx_matrix_nms(bboxes, scores, score_threshold: float, post_threshold: float, nms_top_k: int,
                    keep_top_k: int, use_gaussian: bool = False, gaussian_sigma: float = 2.0,
                    background_label: int = 0, normalized: bool = True, return_index: bool = False,
                    return_rois_num: bool = True, name: Optional[str] = None):
    """``matrix_nms`` (SOLOv2's matrix NMS, as Paddle's kernel computes it) in ONNX-convertible ops, one image.

    Per class, as the kernel: its boxes above ``score_threshold`` (a dynamic count), the ``nms_top_k`` best in
    score order (exact ties: the lower box first, where the kernel's ``std::partial_sort`` leaves it open; a
    stable sort, so that Paddle, whose ``topk`` is not stable, and ONNX's ``TopK`` agree); each box's decay
    from the boxes before it (:func:`_matrix_decay`); the decayed score ``decay_i * score_i`` kept above
    ``post_threshold``; then all classes' kept boxes by decayed score (ties: the lower class first), the first
    ``keep_top_k``. Rows ``[class, score, x1, y1, x2, y2]``, ``rois_num [1]``. paddle2onnx has no
    ``matrix_nms``.

    Memory: one class at a time, ``k x k`` for that class's ``k`` candidates -- the kernel's own order (a
    dense ``[C, M, M]`` over all anchors took 12.7 GB for PP-YOLO at 192 and could not run at 608).

    Raises:
        ExportError: more than one image per run would be needed (the batch must be 1), or rotated boxes.
    """
    if len(scores.shape) != 3 or bboxes.shape[-1] != 4:
        raise ExportError("ONNX: matrix_nms on boxes that are not [N, M, 4] with scores [N, C, M] has no ONNX "
                          "form in ppfuse; export with --no_nms for ONNX, or without --onnx")
    classes, anchors = int(scores.shape[1]), int(scores.shape[2])
    keep_classes = [c for c in range(classes) if c != int(background_label)]
    if not keep_classes:
        rows = paddle.zeros([0, 6], scores.dtype)
        return rows, (paddle.zeros([1], "int32") if return_rois_num else None), \
            (paddle.zeros([0, 1], "int64") if return_index else None)
    # a last candidate that is never kept (score -1, below any threshold, after every real box in score order,
    # so no real box's decay sees it): no class's candidate set is empty
    score = paddle.concat([scores[0], paddle.full([classes, 1], -1.0, scores.dtype)], axis=1)  # [C, M + 1]
    boxes = paddle.concat([bboxes[0], paddle.zeros([1, 4], bboxes.dtype)], axis=0)  # [M + 1, 4]
    positions = paddle.arange(anchors + 1, dtype="int64")
    limit = int(nms_top_k) if int(nms_top_k) > 0 else anchors + 1
    parts = []
    for c in keep_classes:
        candidate = paddle.nonzero(paddle.logical_or(score[c] > float(score_threshold),
                                                     positions == anchors)).reshape([-1])
        candidate_scores = paddle.gather(score[c], candidate)
        order = paddle.argsort(candidate_scores, descending=True, stable=True)[:limit]  # ties: the lower box first
        top, source = paddle.gather(candidate_scores, order), paddle.gather(candidate, order)
        box = paddle.gather(boxes, source)  # [k, 4]
        decayed = top * _matrix_decay(box, bool(normalized), use_gaussian, float(gaussian_sigma))
        kept = paddle.logical_and(paddle.logical_and(top > float(score_threshold), source < anchors),
                                  decayed > float(post_threshold))
        parts.append((paddle.where(kept, decayed, paddle.full_like(decayed, -1.0)), source,
                      paddle.full_like(decayed, float(c))))
    flat_scores, sources, labels = (paddle.concat(list(p), axis=0) for p in zip(*parts))
    order = paddle.argsort(flat_scores, descending=True, stable=True)  # ties: the lower class first
    if int(keep_top_k) > -1:
        order = order[:int(keep_top_k)]
    order = paddle.gather(order, paddle.nonzero(paddle.gather(flat_scores, order) > -0.5).reshape([-1]))
    rows = paddle.concat([paddle.gather(labels, order).unsqueeze(1), paddle.gather(flat_scores, order).unsqueeze(1),
                          paddle.gather(boxes, paddle.gather(sources, order))], axis=1)
    number = paddle.shape(rows)[0:1].astype("int32")
    return rows, (number if return_rois_num else None), (paddle.gather(sources, order).unsqueeze(1)
                                                         if return_index else None)


def _matrix_decay(box, normalized: bool, use_gaussian: bool, sigma: float):
    """Matrix NMS's decay factor of each box ``[k, 4]`` (in score order) from the boxes before it, as Paddle's
    CPU kernel computes it: its IoU (0 for boxes apart, even by less than the +1 of unnormalized boxes; an
    inverted box has area 0; nothing clipped), ``decay_i = min(1, min_{j<i} f(iou[i, j], max_{l<j} iou[j, l]))``
    with ``f = (1 - iou) / (1 - iou_max)`` (or ``exp((iou_max^2 - iou^2) * sigma)``); a NaN (0/0: two boxes of
    area 0, or IoU 1 after IoU 1) is passed over, as ``std::max``/``std::min`` pass it there."""
    k = paddle.shape(box)[0]
    one = 0.0 if normalized else 1.0
    x1, y1, x2, y2 = paddle.split(box.unsqueeze(0), 4, axis=-1)  # [1, k, 1]: row i; transposed: column j
    area = paddle.where(paddle.logical_or(x2 < x1, y2 < y1), paddle.zeros_like(x1), (x2 - x1 + one) * (y2 - y1 + one))
    xt1, yt1, xt2, yt2, area_t = (v.transpose([0, 2, 1]) for v in (x1, y1, x2, y2, area))
    apart = paddle.logical_or(paddle.logical_or(xt1 > x2, xt2 < x1), paddle.logical_or(yt1 > y2, yt2 < y1))
    inter = (paddle.minimum(x2, xt2) - paddle.maximum(x1, xt1) + one) * \
        (paddle.minimum(y2, yt2) - paddle.maximum(y1, yt1) + one)
    iou = paddle.where(apart, paddle.zeros_like(inter), inter / (area + area_t - inter))  # [1, k, k]
    index = paddle.arange(k, dtype="int64")
    below = (index.unsqueeze(1) > index.unsqueeze(0)).unsqueeze(0)  # j < i
    counted = paddle.logical_and(below, paddle.logical_not(paddle.isnan(iou)))
    iou = paddle.where(counted, iou, paddle.zeros_like(iou))
    column_max = iou.max(axis=-1).unsqueeze(1)  # [1, 1, k]: box j's largest IoU with a better box
    if use_gaussian:
        decay = paddle.exp((column_max * column_max - iou * iou) * sigma)
    else:
        decay = (1.0 - iou) / (1.0 - column_max)
    counted = paddle.logical_and(counted, paddle.logical_not(paddle.isnan(decay)))
    decay = paddle.where(counted, decay, paddle.full_like(decay, 1e30))
    return paddle.clip(decay.min(axis=-1), max=1.0).reshape([-1])  # the best box keeps its score


class PriorBoxes:
    """What a dygraph run shows and a trace cannot know, recorded (``recording``) for the ONNX program's trace:
    ``prior_box`` outputs, given back as constants (they depend on the feature map and image sizes only,
    fixed by the export size; paddle2onnx has no ``prior_box``; Paddle's own kernel computed them, so exact),
    the shapes NMS gets (paddle2onnx's NMS needs the box count static; SSD's concatenations leave it
    open in the trace), and the anchor counts of batched decoding (:meth:`rows`)."""

    def __init__(self):
        self.values: list = []
        self.nms_shapes: list = []
        self.row_counts: list = []
        self.position = 0
        self.nms_position = 0
        self.rows_position = 0
        self.recording = False

    def rewind(self) -> None:
        self.position = self.nms_position = self.rows_position = 0

    def rows(self, tensor, per_row: int) -> int:
        """How many rows of ``per_row`` values one image of ``tensor [N, ...]`` holds, as the dygraph run saw it.

        YOLOF's head reshapes by tensor shapes, so the trace does not know the count, and ppdet's ``nms_pre``
        test (``cls_score.shape[0] > nms_pre``) becomes an ``if`` in the Paddle program, decided at run time
        by this count -- fixed by the export size, so the recorded one decides it the same way."""
        if self.recording:
            self.row_counts.append(_static_count(tensor, per_row))
            return self.row_counts[-1]
        if self.rows_position >= len(self.row_counts):
            return _static_count(tensor, per_row)
        self.rows_position += 1
        return self.row_counts[self.rows_position - 1]

    def prior_box(self, *args, **kwargs):
        if self.recording:
            boxes, variances = prior_box(*args, **kwargs)
            self.values.append((boxes.numpy(), variances.numpy()))
            return boxes, variances
        if self.position >= len(self.values):
            raise ExportError("ONNX: prior_box was called more often while tracing than when it was recorded")
        boxes, variances = self.values[self.position]
        self.position += 1
        return paddle.to_tensor(boxes), paddle.to_tensor(variances)

    def static_shapes(self, bboxes, scores):
        """``bboxes``, ``scores`` reshaped to the shapes recorded for this NMS call (batch left open)."""
        if self.recording:
            self.nms_shapes.append((list(bboxes.shape[1:]), list(scores.shape[1:])))
            return bboxes, scores
        if self.nms_position >= len(self.nms_shapes):
            return bboxes, scores
        box_shape, score_shape = self.nms_shapes[self.nms_position]
        self.nms_position += 1
        return bboxes.reshape([-1] + box_shape), scores.reshape([-1] + score_shape)


def _add_coord(x, data_format):
    """ppdet's ``yolo_fpn.add_coord`` (CoordConv's coordinate channels, PP-YOLO) with the batch broadcast by an
    add to zeros shaped like ``x`` instead of ``expand([b, 1, h, w])`` with a tensor ``b`` (which becomes
    ``full_batch_size_like``, which paddle2onnx lacks): the same values (0 + v)."""
    if data_format != "NCHW":
        return _ADD_COORD[0](x, data_format)
    h, w = x.shape[2], x.shape[3]
    gx = paddle.cast(paddle.arange(w) / ((w - 1.) * 2.0) - 1., x.dtype)
    gy = paddle.cast(paddle.arange(h) / ((h - 1.) * 2.0) - 1., x.dtype)
    zeros = paddle.zeros_like(x[:, 0:1, :, :])
    gx = zeros + gx.reshape([1, 1, 1, w])
    gy = zeros + gy.reshape([1, 1, h, 1])
    gx.stop_gradient = True
    gy.stop_gradient = True
    return gx, gy


_ADD_COORD: list = []


def _de_sigmoid(x, eps=1e-7):
    """ppdet's ``yolo_head._de_sigmoid`` (PP-YOLO's IoU-aware objectness) with ``1. / x`` as
    ``paddle.reciprocal(x)``: the same quotient, without the ``full_batch_size_like`` the scalar division
    traces to (paddle2onnx lacks it)."""
    x = paddle.clip(x, eps, 1. / eps)
    x = paddle.clip(paddle.reciprocal(x) - 1., eps, 1. / eps)
    return -paddle.log(x)


@paddle.jit.not_to_static  # a traced function's ``x.shape`` gives tensors for unknown dims
def _static_count(tensor, per_row: int) -> int:
    """Rows of ``tensor [N, ...]`` reshaped to ``[N, -1, per_row]`` when its shape past the batch is known at
    trace time, else -1 (YOLOF's head reshapes by tensor shapes)."""
    dims = [int(d) for d in tensor.shape[1:]]
    return int(np.prod(dims)) // per_row if all(d >= 0 for d in dims) else -1


def _decode_batch(head, anchors, cls_scores, bbox_preds, im_shape, scale_factor, decode_deltas, clip: bool,
                  rows=None):
    """ppdet's ``RetinaHead.decode`` / ``YOLOFHead.decode`` -- a Python loop over the images calling
    ``get_bboxes_single``, then ``stack`` -- for the whole batch at once, op for op: per level its ``nms_pre``
    best anchors by their best class score (a top-k along each image's anchors), the deltas decoded against
    those anchors (``decode_deltas``: ppdet's ``delta2bbox`` or ``delta2bbox_v2`` on ``[n, 4]``), with ``clip``
    each box clipped to its image's ``im_shape`` (``delta2bbox_v2``'s ``max_shape``), divided by the image's
    scale factors; sigmoid scores, ``[N, C, M]``. Every op is elementwise or per image, so the values are the
    loop's. ``rows(tensor, per_row)`` gives a level's anchor count per image (:meth:`PriorBoxes.rows`).

    The loop traces to a ``while`` over tensor arrays, which paddle2onnx 2.1.0 converts into a Loop whose
    arrays are not carried out of it (ONNX Runtime: ``Invalid model. Node input
    'p2o.sub_block.pd_op.array_write_.0.0' is not a graph input, initializer, or output of a previous node``).

    Returns:
        ``(boxes [N, M, 4], scores [N, C, M])``, as ``decode``.
    """
    rows = rows or _static_count  # (not a default value: to_static evaluates those where the name is unknown)
    classes = int(head.num_classes)
    all_boxes, all_scores = [], []
    for anchor, cls_score, bbox_pred in zip(anchors, cls_scores, bbox_preds):
        count = rows(cls_score, classes)  # ppdet's cls_score.shape[0]; -1 when not known
        cls_score = cls_score.reshape([0, count if count >= 0 else -1, classes])  # [N, M, C]: each image's [M, C]
        bbox_pred = bbox_pred.reshape([0, count if count >= 0 else -1, 4])
        anchor = anchor.reshape([-1, 4])
        if head.nms_pre is not None and count > head.nms_pre:
            count = int(head.nms_pre)
            _, index = cls_score.max(axis=2).topk(count)  # [N, k]: each image's top-k
            bbox_pred = paddle.take_along_axis(bbox_pred, index.unsqueeze(-1).expand([-1, count, 4]), axis=1)
            cls_score = paddle.take_along_axis(cls_score, index.unsqueeze(-1).expand([-1, count, classes]), axis=1)
            anchor = paddle.gather(anchor, index.reshape([-1]))  # [N*k, 4]
        else:
            anchor = (paddle.zeros_like(bbox_pred) + anchor.unsqueeze(0)).reshape([-1, 4])  # every image's
        boxes = decode_deltas(bbox_pred.reshape([-1, 4]), anchor).reshape(paddle.shape(bbox_pred))
        if clip:  # delta2bbox_v2's max_shape: x to [0, width], y to [0, height] of each image
            bounds = im_shape.flip([1]).tile([1, 2]).unsqueeze(1)  # [N, 1, 4]: w, h, w, h
            boxes = paddle.minimum(paddle.maximum(boxes, paddle.zeros_like(boxes)), bounds)
        all_boxes.append(boxes)
        all_scores.append(F.sigmoid(cls_score))
    boxes = paddle.concat(all_boxes, axis=1)
    boxes = boxes / scale_factor.flip([1]).tile([1, 2]).unsqueeze(1)  # per image: [w, h, w, h] scales
    return boxes, paddle.concat(all_scores, axis=1).transpose([0, 2, 1])


def _retina_decode(self, anchors, cls_logits, bboxes_reg, im_shape, scale_factor, rows=None):
    """``RetinaHead.decode`` for the batch at once (:func:`_decode_batch` with ppdet's ``delta2bbox``)."""
    from ppdet.modeling.bbox_utils import delta2bbox
    return _decode_batch(self, anchors, cls_logits, bboxes_reg, im_shape, scale_factor,
                         lambda deltas, boxes: delta2bbox(deltas, boxes, self.weights), clip=False, rows=rows)


def _yolof_decode(self, anchors, cls_scores, bbox_preds, im_shape, scale_factor, rows=None):
    """``YOLOFHead.decode`` for the batch at once (:func:`_decode_batch` with ppdet's ``delta2bbox_v2``, each
    box clipped to its image's ``im_shape`` as ``delta2bbox_v2``'s ``max_shape`` does)."""
    from ppdet.modeling.bbox_utils import delta2bbox_v2
    return _decode_batch(self, anchors, cls_scores, bbox_preds, im_shape, scale_factor,
                         lambda deltas, boxes: delta2bbox_v2(deltas, boxes, self.delta_mean, self.delta_std,
                                                             max_shape=None, ctr_clip=self.ctr_clip), clip=True,
                         rows=rows)


def _ttf_box_one_image(self, hm, wh, im_shape, scale_factor):
    """``TTFBox.__call__`` -- ``_decode`` image by image in a Python loop, results concatenated -- for one
    image: its ``_decode``, what the loop gives for a batch of one. The loop traces to a ``while`` over tensor
    arrays that paddle2onnx 2.1.0 converts into an invalid Loop (:func:`_decode_batch`); ``_decode`` keeps a
    variable number of detections per image, so it has no batched form, and the ONNX program takes one image
    per run (as a program with NMS does). ``hm`` is reshaped to one image so that a larger batch fails in the
    runtime instead of mixing images (``_decode`` itself assumes one). The detections are reshaped to ``[K, 6]``,
    the shape they have: ``_decode`` keeps them by ``gather(results, nonzero(...))``, an index ``[K, 1]``, which
    paddle2onnx writes as an ONNX Gather giving ``[K, 1, 6]``."""
    hm = hm.reshape([1] + [int(d) for d in hm.shape[1:]])
    results, number = self._decode(hm, wh, im_shape, scale_factor)
    return results.reshape([-1, int(results.shape[-1])]), number


@contextlib.contextmanager
def onnx_postprocess(priors: Optional[PriorBoxes] = None, record: bool = False,
                     nms_after: bool = False) -> Iterator[None]:
    """While active (inside :func:`pir_traceable_postprocess`), ppdet's post-processing ops are the ONNX forms
    of this module: per-class top-k before ``multiclass_nms`` (its inputs given the recorded static shapes;
    with ``nms_after``, a program that ends at the boxes and scores NMS takes, NMS on rotated boxes as it is,
    to be pruned with what else the outputs do not use),
    ``matrix_nms`` one class at a time, ``box_coder`` in elementwise ops, ``prior_box`` recorded (``record=True``,
    a dygraph run) or replayed from ``priors``, PP-YOLO's CoordConv grid without ``full_batch_size_like``, and
    RetinaNet's, YOLOF's and TTFNet's per-image loops without tensor arrays (batched; TTFNet: one image)."""
    from ppdet.modeling import layers as ppdet_layers
    from ppdet.modeling import ops
    from ppdet.modeling.heads import retina_head, yolo_head, yolof_head
    from ppdet.modeling.necks import yolo_fpn
    names = ("multiclass_nms", "matrix_nms", "box_coder", "prior_box")
    saved = {name: getattr(ops, name) for name in names}
    saved_coord, saved_de_sigmoid = yolo_fpn.add_coord, yolo_head._de_sigmoid
    priors = priors if priors is not None else PriorBoxes()
    priors.recording = record

    def retina_decode(self, anchors, cls_logits, bboxes_reg, im_shape, scale_factor):
        return _retina_decode(self, anchors, cls_logits, bboxes_reg, im_shape, scale_factor, rows=priors.rows)

    def yolof_decode(self, anchors, cls_scores, bbox_preds, im_shape, scale_factor):
        return _yolof_decode(self, anchors, cls_scores, bbox_preds, im_shape, scale_factor, rows=priors.rows)
    methods = [(retina_head.RetinaHead, "decode", retina_decode), (yolof_head.YOLOFHead, "decode", yolof_decode),
               (ppdet_layers.TTFBox, "__call__", _ttf_box_one_image)]
    saved_methods = [(owner, name, owner.__dict__[name]) for owner, name, _ in methods]

    def nms(bboxes, scores, *args, **kwargs):
        bboxes, scores = priors.static_shapes(bboxes, scores)
        if _static_count(scores, 1) < 0:
            # no box count recorded: the dygraph run stopped before NMS (a program of the head's raw outputs,
            # whose post-processing is traced, then pruned); the top-k per class needs the count
            return multiclass_nms(bboxes, scores, *args, **kwargs)
        if nms_after and not has_onnx_form(bboxes.shape, scores.shape):
            return multiclass_nms(bboxes, scores, *args, **kwargs)
        return onnx_multiclass_nms(bboxes, scores, *args, **kwargs)

    def matrix(bboxes, scores, *args, **kwargs):
        bboxes, scores = priors.static_shapes(bboxes, scores)
        return onnx_matrix_nms(bboxes, scores, *args, **kwargs)
    try:
        ops.multiclass_nms = nms
        ops.matrix_nms = matrix
        ops.box_coder = onnx_box_coder
        ops.prior_box = priors.prior_box
        _ADD_COORD[:] = [saved_coord]
        yolo_fpn.add_coord = _add_coord
        yolo_head._de_sigmoid = _de_sigmoid
        for owner, name, function in methods:
            setattr(owner, name, function)
        yield
    finally:
        for name, function in saved.items():
            setattr(ops, name, function)
        yolo_fpn.add_coord = saved_coord
        yolo_head._de_sigmoid = saved_de_sigmoid
        for owner, name, function in saved_methods:
            setattr(owner, name, function)


class NMSReached(Exception):
    """Raised by :func:`nms_inputs` with ``stop=True`` in place of the NMS: its inputs are in the store."""


@paddle.jit.not_to_static  # Python bookkeeping, not part of a traced program
def _record_call(calls: list, name: str, signature: inspect.Signature, bboxes, scores, args, kwargs) -> None:
    bound = signature.bind(bboxes, scores, *args, **kwargs)
    bound.apply_defaults()
    arguments = {k: v for k, v in bound.arguments.items() if k not in ("bboxes", "scores")}
    calls.append((name, list(bboxes.shape), list(scores.shape), arguments))


@contextlib.contextmanager
def nms_inputs(store: list, calls: Optional[List[tuple]] = None, stop: bool = False) -> Iterator[None]:
    """While active (inside :func:`pir_traceable_postprocess`), every ``multiclass_nms`` and ``matrix_nms`` call
    also appends its ``(boxes, scores)`` to ``store``: a detector's raw boxes and scores, the last step before
    NMS (the plain graph's outputs without NMS); and to ``calls``, when given, ``(name, box shape, score shape,
    {argument: value})`` with every argument but the two tensors, defaults included (for
    :func:`nms_after_graph`). With ``stop`` (dygraph), the first call raises :class:`NMSReached` instead of
    running the NMS (the float64 reference stops there)."""
    from ppdet.modeling import ops
    saved = {name: getattr(ops, name) for name in ("multiclass_nms", "matrix_nms")}

    def keeping(name, function):
        signature = inspect.signature(REPLACEMENTS[name])  # ppdet's signature

        def call(bboxes, scores, *args, **kwargs):
            store.append((bboxes, scores))
            if calls is not None:
                _record_call(calls, name, signature, bboxes, scores, args, kwargs)
            if stop:
                raise NMSReached()
            return function(bboxes, scores, *args, **kwargs)
        return call
    try:
        for name, function in saved.items():
            setattr(ops, name, keeping(name, function))
        yield
    finally:
        for name, function in saved.items():
            setattr(ops, name, function)
