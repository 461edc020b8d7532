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

ppdet's layers call these functions as ``ops.<name>(...)``
(``ppdet.modeling.layers``: ``MultiClassNMS``, ``MatrixNMS``,
``AnchorGeneratorSSD``, ``SSDBox``), so replacing the module attribute reaches
every caller in those families. Not replaced: ``generate_proposals``,
``distribute_fpn_proposals`` and ``anchor_generator`` (two-stage RCNN and
rotated-box detectors, which are not exported through this path).
"""
from __future__ import annotations

import contextlib
from typing import Dict, Iterator, Optional

import paddle

from ppfuse.errors import ExportError

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
