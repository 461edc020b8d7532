"""Paddle's ``multiclass_nms3`` on rotated boxes (a quadrilateral's 8 corner coordinates), in numpy.

PP-YOLOE-R's post-processing is that op with polygon IoU. ONNX's ``NonMaxSuppression`` compares axis-aligned
boxes only, so such an export's ``model.onnx`` ends at the boxes and scores NMS takes, its report records the
op's parameters (:func:`ppfuse.export_format.nms_after_graph`), and the ONNX Runtime and OpenVINO runtimes apply
:class:`MultiClassNMS` to the graph's outputs: the same ``bbox``/``bbox_num`` as Paddle Inference's program.

What Paddle 3's CPU kernel (``paddle/phi/kernels/cpu/multiclass_nms3_kernel.cc``) computes for boxes
``[N, M, 8]`` and scores ``[N, C, M]``, and this module with it, per image:

- per class ``c != background_label``: the boxes scoring ``> score_threshold``, best first (equal scores: lower
  box index first), the first ``nms_top_k`` of them (all for ``nms_top_k < 0``);
- greedy: a box is kept when its IoU with every box kept before it in its class is ``<= threshold``; after each
  kept box, with ``nms_eta < 1`` and the threshold above 0.5, the threshold is multiplied by ``nms_eta``;
- polygon IoU ``inter / (area1 + area2 - inter)``, 0 when any of the three is 0; areas by the shoelace formula,
  without the ``+1`` of ``normalized=False`` (the kernel's ``PolyArea`` ignores ``normalized``);
- with ``keep_top_k >= 0`` and more boxes kept: the ``keep_top_k`` best over all classes (equal scores: lower
  class first, then the earlier kept);
- rows ``[class, score, x1, y1, ..., x4, y4]`` class by class (ascending), in each class in the order kept;
  ``bbox_num [N]`` int32; no detection at all gives ``bbox [0, 10]``.

Arithmetic as the kernel's where it can be: the boxes' areas, IoU and thresholds in float32, in its order. The
intersection differs: the kernel clips in double (GPC, a general polygon clipper), then sums the clipped
polygon's shoelace in float32 from GPC's corners in GPC's order, which cancels to about 1e-7 of ``|x * y|``
(px^2; 0.1 px^2 at 1000 px); here the intersection is clipped and summed in float64 and rounded to float32 once.
So an IoU that close to the threshold (small boxes at large coordinates) can be decided the other way.

GPC clips any polygon; this module clips convex ones -- what PP-YOLOE-R gives (rotated rectangles) -- and refuses
a candidate whose own area falls materially short of its convex hull's (a concave or self-crossing
quadrilateral) or with non-finite corners, in one line: Paddle Inference (``--runtime paddle``) runs those. A
quadrilateral of zero area (IoU 0 with anything) is accepted in any form.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import List, Mapping, Tuple

import numpy as np

from ppfuse.errors import InferenceError

OP = "multiclass_nms3"
BOX_SIZE = 8  # x1, y1, ..., x4, y4
CORNERS = BOX_SIZE // 2
FLOAT32_EPS = float(np.finfo(np.float32).eps)


@dataclass(frozen=True)
class MultiClassNMS:
    """``multiclass_nms3``'s parameters (as ppdet's ``MultiClassNMS`` passes them) on rotated boxes; call it on
    ``boxes [N, M, 8]``, ``scores [N, C, M]`` for ``(bbox [K, 10], bbox_num [N])`` (the module docstring)."""
    score_threshold: float
    nms_top_k: int
    keep_top_k: int
    nms_threshold: float = 0.3
    normalized: bool = True  # read by the op, ignored for polygons (no +1 in their areas)
    nms_eta: float = 1.0
    background_label: int = -1

    def to_report(self) -> dict:
        """The record an export's report keeps (:func:`ppfuse.export_format.nms_after_graph`)."""
        return {"op": OP, "box_size": BOX_SIZE, **asdict(self)}

    @classmethod
    def from_report(cls, record: Mapping, where: str = "the export's report") -> "MultiClassNMS":
        """The NMS a report's record asks for.

        Raises:
            InferenceError: another op or box size, or a parameter missing.
        """
        if record.get("op") != OP or int(record.get("box_size", 0)) != BOX_SIZE:
            raise InferenceError(f"{where}: NMS after the graph is {record.get('op')!r} on boxes of "
                                 f"{record.get('box_size')} coordinates; ppfuse applies {OP} on rotated boxes "
                                 f"({BOX_SIZE} coordinates) only -- export again with this ppfuse")
        names = ("score_threshold", "nms_top_k", "keep_top_k", "nms_threshold", "normalized", "nms_eta",
                 "background_label")
        missing = [n for n in names if n not in record]
        if missing:
            raise InferenceError(f"{where}: the NMS after the graph lacks {', '.join(missing)}; export again")
        return cls(float(record["score_threshold"]), int(record["nms_top_k"]), int(record["keep_top_k"]),
                   float(record["nms_threshold"]), bool(record["normalized"]), float(record["nms_eta"]),
                   int(record["background_label"]))

    def __call__(self, boxes: np.ndarray, scores: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        return multiclass_nms(boxes, scores, self)


# --- polygons ---------------------------------------------------------------------------------------------------


def polygon_area(polygons: np.ndarray) -> np.ndarray:
    """``|shoelace| / 2`` of ``polygons [..., V, 2]`` in float32, summed corner by corner from the first: the
    kernel's ``PolyArea`` (no +1, any orientation)."""
    p = np.asarray(polygons, np.float32)
    x, y = p[..., 0], p[..., 1]
    terms = x * np.roll(y, -1, axis=-1) - y * np.roll(x, -1, axis=-1)
    total = np.zeros(terms.shape[:-1], np.float32)
    for i in range(terms.shape[-1]):  # the kernel's loop order: float32 sums are not associative
        total = total + terms[..., i]
    return np.abs(total / np.float32(2))


def _signed_area64(polygons: np.ndarray) -> np.ndarray:
    x, y = polygons[..., 0], polygons[..., 1]
    return 0.5 * (x * np.roll(y, -1, axis=-1) - y * np.roll(x, -1, axis=-1)).sum(axis=-1)


def counter_clockwise(polygons: np.ndarray) -> np.ndarray:
    """``polygons [K, V, 2]`` in float64, corners reversed where they run clockwise."""
    p = np.asarray(polygons, np.float64)
    return np.where((_signed_area64(p) < 0)[:, None, None], p[:, ::-1], p)


def quadrilateral_hull_area(quads: np.ndarray) -> np.ndarray:
    """The area of the convex hull of each quadrilateral's four corners, ``quads [K, 4, 2]`` (float64).

    Four points' hull is the largest of the three quadrilaterals through them (when all four are on it) or of
    the four triangles (when one lies inside the other three's)."""
    q = np.asarray(quads, np.float64)
    shapes = [(0, 1, 2, 3), (0, 2, 1, 3), (0, 1, 3, 2), (0, 1, 2), (0, 1, 3), (0, 2, 3), (1, 2, 3)]
    return np.max([np.abs(_signed_area64(q[:, list(s)])) for s in shapes], axis=0)


def _cross(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    return u[..., 0] * v[..., 1] - u[..., 1] * v[..., 0]


def _boundary_inside(polygons: np.ndarray, clips: np.ndarray, same_direction_out: bool) -> np.ndarray:
    """``sum cross(start, end)`` over the parts of each polygon's edges that lie inside its clip polygon: half of
    Green's theorem for the intersection's area. ``polygons [K, V, 2]``, ``clips [K, W, 2]``, counter-clockwise.

    Each edge ``s + t (e - s)``, ``t`` in ``[0, 1]``, is cut to the clip's half-planes (Cyrus-Beck). An edge on a
    clip edge's line counts as inside; with ``same_direction_out`` not where both run the same way -- the other
    polygon's pass has counted that stretch already (and running opposite ways, the two cancel: touching
    polygons)."""
    start = polygons[:, :, None, :]
    edge = (np.roll(polygons, -1, axis=1) - polygons)[:, :, None, :]  # [K, V, 1, 2]
    corner = clips[:, None, :, :]
    clip_edge = (np.roll(clips, -1, axis=1) - clips)[:, None, :, :]  # [K, 1, W, 2]
    at_start = _cross(clip_edge, start - corner)  # >= 0: inside that half-plane
    slope = _cross(clip_edge, edge)
    with np.errstate(divide="ignore", invalid="ignore"):
        bound = -at_start / slope
    lower = np.maximum(np.where(slope > 0, bound, 0.0).max(axis=2), 0.0)
    upper = np.minimum(np.where(slope < 0, bound, 1.0).min(axis=2), 1.0)
    out = (slope == 0) & (at_start < 0)
    if same_direction_out:
        out |= (slope == 0) & (at_start == 0) & ((clip_edge * edge).sum(axis=-1) > 0)
    empty = out.any(axis=2) | ~(lower < upper)
    edge = edge[:, :, 0]
    terms = _cross(polygons + lower[..., None] * edge, polygons + upper[..., None] * edge)
    return np.where(empty, 0.0, terms).sum(axis=1)


def intersection_area(clip: np.ndarray, subjects: np.ndarray) -> np.ndarray:
    """Area (float64) of the intersection of the convex polygon ``clip [V, 2]`` with each convex polygon of
    ``subjects [K, V, 2]``, both counter-clockwise (:func:`counter_clockwise`): Green's theorem over the
    intersection's boundary, which is the parts of each polygon's edges inside the other."""
    origin = np.asarray(clip, np.float64)[0]  # coordinates near 0: less cancellation in the cross products
    one = (np.asarray(clip, np.float64) - origin)[None]
    many = np.asarray(subjects, np.float64) - origin
    ones = np.broadcast_to(one, (len(many),) + one.shape[1:])
    twice = _boundary_inside(many, ones, False) + _boundary_inside(ones, many, True)
    return 0.5 * np.abs(twice)


def polygon_iou(polygon: np.ndarray, others: np.ndarray) -> np.ndarray:
    """The kernel's ``PolyIoU`` of one convex quadrilateral ``[4, 2]`` (or 8 coordinates) with each of
    ``others [K, 4, 2]`` (or ``[K, 8]``), float32."""
    one = np.asarray(polygon, np.float32).reshape(1, CORNERS, 2)
    many = np.asarray(others, np.float32).reshape(-1, CORNERS, 2)
    return _iou(counter_clockwise(one)[0], polygon_area(one)[0], counter_clockwise(many), polygon_area(many))


def _iou(kept: np.ndarray, kept_area: np.float32, others: np.ndarray, areas: np.ndarray) -> np.ndarray:
    """IoU (float32) of the counter-clockwise polygon ``kept`` (float32 area ``kept_area``) with ``others``."""
    inter = intersection_area(kept, others).astype(np.float32)
    union = areas + kept_area - inter
    zero = (areas == 0) | (kept_area == 0) | (inter == 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(zero, np.float32(0), inter / np.where(zero, np.float32(1), union)).astype(np.float32)


# --- NMS --------------------------------------------------------------------------------------------------------


def _candidates(scores: np.ndarray, threshold: np.float32, top_k: int) -> np.ndarray:
    """Indices of ``scores > threshold``, best first, equal scores by index; the first ``top_k`` (``top_k > -1``)."""
    index = np.flatnonzero(scores > threshold)
    index = index[np.argsort(-scores[index], kind="stable")]
    return index[:top_k] if top_k > -1 else index


def _check_convex(quads: np.ndarray, areas: np.ndarray, where: str) -> None:
    """Refuse what the convex clipper would get wrong: non-finite corners; a quadrilateral with area whose
    convex hull is larger beyond rounding (concave, self-crossing, or corners out of order)."""
    finite = np.isfinite(quads).all(axis=(1, 2))
    if not finite.all():
        i = int(np.flatnonzero(~finite)[0])
        raise InferenceError(f"{where}: box {i} has non-finite corners {quads[i].reshape(-1).tolist()}; ppfuse's "
                             "rotated NMS has no IoU for it (Paddle's polygon clipper gives none defined) -- run "
                             "this model in Paddle Inference (--runtime paddle)")
    hull = quadrilateral_hull_area(quads)
    perimeter = np.linalg.norm(quads - np.roll(quads, -1, axis=1), axis=2).sum(axis=1)
    scale = np.abs(quads).max(axis=(1, 2)) + 1.0
    tolerance = 1e-4 * hull + 8 * FLOAT32_EPS * scale * perimeter  # float32 corners of a thin rectangle
    own = np.abs(_signed_area64(quads.astype(np.float64)))  # (the float32 area can be off by more: cancellation)
    bad = (areas != 0) & (hull - own > tolerance)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise InferenceError(f"{where}: box {i} {np.round(quads[i].reshape(-1), 3).tolist()} is not a convex "
                             f"quadrilateral with its corners in order (area {own[i]:.4g}, its convex hull "
                             f"{hull[i]:.4g}); ppfuse's rotated NMS clips convex ones (PP-YOLOE-R's rotated "
                             "rectangles) -- run this model in Paddle Inference (--runtime paddle)")


def nms_one_class(quads: np.ndarray, scores: np.ndarray, params: MultiClassNMS, where: str = "rotated NMS"
                  ) -> List[int]:
    """The kernel's ``NMSFast`` for one class: the indices of ``quads [M, 4, 2]`` kept, in the order kept.

    A box is kept when its largest IoU with the boxes kept before it is within the threshold at its turn.
    Computed forward: each kept box raises the running largest IoU of the candidates after it, and a candidate
    above the current threshold is out for good (the threshold never rises). Only candidates whose bounding
    rectangles meet the kept box's are clipped; the others' IoU is 0.
    """
    order = _candidates(np.asarray(scores, np.float32), np.float32(params.score_threshold), params.nms_top_k)
    if len(order) == 0:
        return []
    corners = np.asarray(quads, np.float32)[order]
    areas = polygon_area(corners)
    _check_convex(corners, areas, f"{where}, candidates by score")
    polygons = counter_clockwise(corners)
    low, high = corners.min(axis=1), corners.max(axis=1)  # [k, 2]
    threshold, eta = np.float32(params.nms_threshold), np.float32(params.nms_eta)
    largest = np.full(len(order), -np.inf, np.float32)
    alive = np.ones(len(order), bool)
    kept: List[int] = []
    i = 0
    while True:
        following = np.flatnonzero(alive[i:])
        if len(following) == 0:
            break
        i += int(following[0])
        kept.append(i)  # alive: every IoU with the boxes kept so far is within the current threshold
        if eta < 1 and threshold > 0.5:
            threshold = np.float32(threshold * eta)
        later = i + 1 + np.flatnonzero(alive[i + 1:])
        largest[later] = np.maximum(largest[later], np.float32(0))
        meets = np.all((low[later] <= high[i]) & (high[later] >= low[i]), axis=1)
        touched = later[meets]
        if len(touched):
            iou = _iou(polygons[i], areas[i], polygons[touched], areas[touched])
            largest[touched] = np.maximum(largest[touched], iou)
        alive[later] = largest[later] <= threshold
        i += 1
    return [int(order[k]) for k in kept]


def multiclass_nms(boxes: np.ndarray, scores: np.ndarray, params: MultiClassNMS) -> Tuple[np.ndarray, np.ndarray]:
    """Paddle's ``multiclass_nms3`` on rotated boxes (the module docstring).

    Args:
        boxes: ``[N, M, 8]``, each box's four corners ``x1, y1, ..., x4, y4``.
        scores: ``[N, C, M]``.
        params: the op's parameters.

    Returns:
        ``(bbox [K, 10] float32, bbox_num [N] int32)``: rows ``[class, score, x1, y1, ..., x4, y4]``.

    Raises:
        InferenceError: shapes that are not these; a candidate box that is not a convex quadrilateral.
    """
    boxes, scores = np.asarray(boxes, np.float32), np.asarray(scores, np.float32)
    if boxes.ndim != 3 or boxes.shape[-1] != BOX_SIZE or scores.ndim != 3 or scores.shape[0] != boxes.shape[0] \
            or scores.shape[2] != boxes.shape[1]:
        raise InferenceError(f"rotated NMS takes boxes [N, M, {BOX_SIZE}] and scores [N, C, M]; given boxes "
                             f"{list(boxes.shape)} and scores {list(scores.shape)}")
    rows, counts = [], []
    for n in range(boxes.shape[0]):
        quads = boxes[n].reshape(-1, CORNERS, 2)
        labels, indices = [], []
        for c in range(scores.shape[1]):
            if c == params.background_label:
                continue
            kept = nms_one_class(quads, scores[n, c], params, f"rotated NMS, image {n}, class {c}")
            labels += [c] * len(kept)
            indices += kept
        labels, indices = np.asarray(labels, np.int64), np.asarray(indices, np.int64)
        chosen = scores[n, labels, indices]
        if -1 < params.keep_top_k < len(indices):
            # the best over all classes; kept in class order, each class in its order kept (a stable sort by
            # score keeps that order among a class's boxes, so the positions sorted restore it)
            best = np.sort(np.argsort(-chosen, kind="stable")[:params.keep_top_k])
            labels, indices, chosen = labels[best], indices[best], chosen[best]
        rows.append(np.concatenate([labels[:, None].astype(np.float32), chosen[:, None], boxes[n, indices]],
                                   axis=1))
        counts.append(len(indices))
    bbox = np.concatenate(rows, axis=0) if rows else np.zeros((0, BOX_SIZE + 2), np.float32)
    return bbox.astype(np.float32).reshape(-1, BOX_SIZE + 2), np.asarray(counts, np.int32)
