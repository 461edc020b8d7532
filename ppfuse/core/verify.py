"""Equivalence check: run two models on the same inputs and compare every output.

Used by the tests and by export, which refuses to write a model whose
outputs differ from the training form beyond tolerance.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import paddle

from ppfuse.errors import VerificationError


@dataclass
class OutputError:
    """How far one output of the candidate is from the reference's."""
    name: str
    shape: tuple
    max_abs: float
    max_rel: float       # max |a - b| / max |b|: error relative to the output's scale
    worst_ratio: float   # max |a - b| / (atol + rtol |b|): > 1 fails np.allclose-style
    nonfinite: bool = False  # NaN/Inf in other places (or of another sign) than the reference's

    @property
    def ok(self) -> bool:
        return self.worst_ratio <= 1.0


@dataclass
class RoundingCheck:
    """A candidate judged against a float64 evaluation of the original, for models where fp32
    rounding alone exceeds the tolerance: the candidate may deviate from float64 at most
    ``factor`` times as much as the original's own fp32 evaluation does (per output)."""
    original_error: Dict[str, float]   # max |original fp32 - original float64|
    candidate_error: Dict[str, float]  # max |candidate - original float64|
    factor: float = 2.0
    original: str = "the original"     # who computed the fp32 reference, for the messages

    @property
    def ok(self) -> bool:
        # an original whose own fp32 error is unbounded (NaN/Inf where float64 has numbers) decides nothing
        return all(math.isfinite(self.original_error[k])
                   and self.candidate_error[k] <= self.factor * self.original_error[k] + 1e-7
                   for k in self.original_error)

    def summary(self) -> str:
        who = "original" if self.original == "the original" else self.original
        return "; ".join(f"{k}: {self.candidate_error[k]:.3g} from float64 ({who} fp32: "
                         f"{self.original_error[k]:.3g})" for k in self.original_error)


def rounding_check(original32: Dict[str, np.ndarray], candidate: Dict[str, np.ndarray],
                   original64: Dict[str, np.ndarray], factor: float = 2.0,
                   original: str = "the original") -> RoundingCheck:
    """The one criterion for "as close to the exact function as fp32 allows" (see :class:`RoundingCheck`);
    ``original`` names who computed ``original32`` in the messages."""
    def error(values):
        return {k: finite_error(original64[k], values[k].astype(np.float64)) for k in original64}
    return RoundingCheck(error(original32), error(candidate), factor, original)


def same_nonfinite(reference: np.ndarray, candidate: np.ndarray) -> bool:
    """Whether NaN and +-Inf stand in the same places, with the same sign, in both arrays."""
    bad = ~np.isfinite(reference)
    return bool(np.array_equal(bad, ~np.isfinite(candidate))
                and np.array_equal(reference[bad], candidate[bad], equal_nan=True))


def finite_error(reference: np.ndarray, candidate: np.ndarray) -> float:
    """max |candidate - reference| over the reference's finite values; Inf when the NaN/Inf differ in place
    or sign (non-finite values are values: they must be the same, not ignored)."""
    if reference.shape != candidate.shape or not same_nonfinite(reference, candidate):
        return float("inf")
    finite = np.isfinite(reference)
    return float(np.abs(candidate[finite] - reference[finite]).max()) if finite.any() else 0.0


@dataclass
class VerificationResult:
    outputs: List[OutputError]
    atol: float
    rtol: float
    # set when the outputs exceed atol/rtol and the original was also run in float64
    rounding: Optional[RoundingCheck] = None
    # set when the compared runs made the original's top-k choices (:class:`TopKReplay`): what was replayed
    replayed: str = ""
    # the criterion that passed this result, to judge further candidates the same way (set by convert)
    judged: Optional[Callable[[Dict[str, np.ndarray]], "VerificationResult"]] = field(default=None, repr=False,
                                                                                      compare=False)

    @property
    def within_tolerance(self) -> bool:
        return all(o.ok for o in self.outputs)

    @property
    def ok(self) -> bool:
        return self.within_tolerance or (self.rounding is not None and self.rounding.ok)

    @property
    def max_abs(self) -> float:
        return max((o.max_abs for o in self.outputs), default=0.0)

    @property
    def max_rel(self) -> float:
        return max((o.max_rel for o in self.outputs), default=0.0)

    def summary(self) -> str:
        """:meth:`brief`, then one line per output; outputs beyond atol/rtol are marked by what
        decided: passed or failed by the float64 criterion."""
        def mark(o: OutputError) -> str:
            if o.ok:
                return ""
            if self.rounding is None:
                return "  <-- above tolerance"
            if self.rounding.ok:
                return "  (above atol/rtol; passed by the float64 criterion)"
            return "  <-- above atol/rtol and failed the float64 criterion"
        rows = [f"  {o.name} {list(o.shape)}: " + ("NaN/Inf in other places than the original's"
                                                   if o.nonfinite else
                                                   f"max abs {o.max_abs:.3g}, max rel {o.max_rel:.3g}") + mark(o)
                for o in self.outputs]
        return self.brief() + "\n" + "\n".join(rows)

    def brief(self) -> str:
        """One line: the largest errors, which criterion decided, and why."""
        errors = f"max abs error {self.max_abs:.3g}, max rel error {self.max_rel:.3g}"
        if self.replayed:
            errors = f"{self.replayed}: {errors}"
        tolerance = f"atol {self.atol:g}, rtol {self.rtol:g}"
        if self.within_tolerance:
            return f"{errors}: within tolerance ({tolerance})"
        if self.rounding is None:
            return f"{errors}: above tolerance ({tolerance})"
        factor, who = f"{self.rounding.factor:g}x", self.rounding.original
        if self.rounding.ok:
            return (f"{errors}: above the fixed tolerance ({tolerance}), passed by the float64 criterion: "
                    f"no further from a float64 evaluation of {'the model' if who != 'the original' else who} "
                    f"than {factor} {who}'s own fp32 error, so the difference is fp32 rounding that this model "
                    f"amplifies, not the conversion ({self.rounding.summary()})")
        return (f"{errors}: above the fixed tolerance ({tolerance}) and failed the float64 criterion: "
                f"BEYOND {factor} {who}'s own fp32 error from a float64 evaluation "
                f"({self.rounding.summary()})")

    def to_dict(self) -> dict:
        return {"atol": self.atol, "rtol": self.rtol, "max_abs": self.max_abs, "max_rel": self.max_rel,
                "outputs": [vars(o) | {"shape": list(o.shape)} for o in self.outputs],
                "float64_check": vars(self.rounding) if self.rounding else None}


class TopKReplay:
    """``paddle.topk``'s choices recorded in one run and replayed in the others, so that compared forms of a
    model make the same discrete choices.

    A model that selects by top-k (RT-DETR picks its decoder queries from the encoder's scores) turns an
    fp32-rounding difference of two near-tied scores into another selection, and its outputs then differ by
    whole rows -- between the original and its float64 evaluation as much as between the original and the
    converted model. Replayed, every run gathers the values at the original's indices (the values are still
    each run's own) and the comparison sees the continuous function again; :attr:`changed` counts the indices
    a run would have chosen otherwise. The runs must call ``paddle.topk`` in the same order with the same
    shapes; otherwise :meth:`replay` raises :class:`VerificationError`.
    """

    def __init__(self):
        self.indices: List[np.ndarray] = []
        self.changed = 0
        self.total = 0

    @contextlib.contextmanager
    def _topk(self, replacement):
        original = paddle.topk

        def topk(x, k, axis=None, largest=True, sorted=True, name=None):
            values, index = original(x, k, axis=axis, largest=largest, sorted=sorted)
            return replacement(x, -1 if axis is None else axis, values, index)
        paddle.topk = topk
        try:
            yield self
        finally:
            paddle.topk = original

    def record(self):
        """While active, each ``paddle.topk`` call's indices are kept (in call order)."""
        def keep(x, axis, values, index):
            self.indices.append(index.numpy())
            return values, index
        self.indices = []
        return self._topk(keep)

    def replay(self):
        """While active, the i-th ``paddle.topk`` call returns the i-th recorded indices and the values of its
        own input there."""
        calls = iter(range(len(self.indices)))

        def replayed(x, axis, values, index):
            i = next(calls, None)
            if i is None or tuple(self.indices[i].shape) != tuple(index.shape):
                raise VerificationError(
                    f"paddle.topk call {len(self.indices) + 1 if i is None else i + 1} of the compared run does not "
                    f"match the original's ({len(self.indices)} calls recorded): the forms take different paths, "
                    "their outputs cannot be compared choice for choice")
            chosen = paddle.to_tensor(self.indices[i]).astype(index.dtype)
            self.changed += int((index.numpy() != self.indices[i]).sum())
            self.total += int(self.indices[i].size)
            return paddle.take_along_axis(x, chosen, axis=axis), chosen
        self.changed = self.total = 0
        return self._topk(replayed)

    def describe(self) -> str:
        return (f"with the original's top-k choices replayed ({len(self.indices)} paddle.topk calls; {self.changed} "
                f"of {self.total} chosen indices would differ)")


def _traced_values(model) -> Dict[int, None]:
    """A ``deepcopy`` memo that copies as None the attributes holding values of a trace (PIR ``Value``s, alone
    or in a dict, list or tuple): ppdet's ``BaseArch.forward`` keeps its inputs as ``self.inputs``, which after
    ``to_static`` are the trace's, and ``deepcopy`` cannot copy those. Its next forward sets them again."""
    def traced(value):
        items = value.values() if isinstance(value, dict) else value if isinstance(value, (list, tuple)) else [value]
        return any(isinstance(item, paddle.pir.Value) for item in items)
    return {id(value): None for layer in [model] + model.sublayers() for value in vars(layer).values()
            if traced(value)}


def float64_copy(model):
    """A copy of ``model`` computing in float64 -- the reference that tells fp32 rounding from a conversion
    error. Parameters and buffers are cast by ``Layer.to``; tensors a layer keeps as plain attributes
    (PP-YOLOE's precomputed ``anchor_points``, ``stride_tensor``) too; values a trace left in attributes are
    not copied (:func:`_traced_values`). ``model`` is left as it is."""
    model64 = copy.deepcopy(model, _traced_values(model))
    kept = {}  # Layer.to casts every buffer; masks and indices keep their dtype
    for layer in [model64] + model64.sublayers():
        for key, value in layer._buffers.items():
            if value is not None and value.dtype not in (paddle.float32, paddle.float16, paddle.bfloat16):
                kept[(id(layer), key)] = value.dtype
    model64.to(dtype="float64")
    for layer in [model64] + model64.sublayers():
        for key, value in list(layer._buffers.items()):
            if (id(layer), key) in kept and value.dtype != kept[(id(layer), key)]:
                layer._buffers[key] = value.astype(kept[(id(layer), key)])
    for layer in [model64] + model64.sublayers():
        for key, value in list(vars(layer).items()):
            if isinstance(value, paddle.Tensor) and value.dtype in (paddle.float32, paddle.float16):
                setattr(layer, key, value.astype("float64"))
    return model64


_SCALARS = (str, bytes, bool, int, float, complex, np.generic, type(None))


def leaves(out: Any, is_leaf: Callable[[Any], bool], prefix: str = "out",
           _seen: Optional[set] = None) -> Dict[str, Any]:
    """``{path: leaf}`` of every value ``is_leaf`` accepts in a nested output, in any container: a mapping, a
    list or tuple (a namedtuple too), a set, a dataclass, or any other object by its attributes (``vars`` and
    ``__slots__``) -- an output nothing is read from would make a comparison compare nothing."""
    if is_leaf(out):
        return {prefix: out}
    if isinstance(out, _SCALARS) or callable(out) and not hasattr(out, "__dict__"):
        return {}
    seen = set() if _seen is None else _seen
    if id(out) in seen:
        return {}
    seen.add(id(out))
    if isinstance(out, Mapping):
        items = list(out.items())
    elif isinstance(out, (list, tuple)):
        items = list(enumerate(out))
    elif isinstance(out, (set, frozenset)):
        items = list(enumerate(sorted(out, key=repr)))
    elif dataclasses.is_dataclass(out):
        items = [(f.name, getattr(out, f.name)) for f in dataclasses.fields(out)]
    else:
        attributes = dict(vars(out)) if hasattr(out, "__dict__") else {}
        for klass in type(out).__mro__:
            for slot in getattr(klass, "__slots__", ()):
                if isinstance(slot, str) and hasattr(out, slot):
                    attributes.setdefault(slot, getattr(out, slot))
        items = sorted(attributes.items())
    flat = {}
    for key, value in items:
        flat.update(leaves(value, is_leaf, f"{prefix}.{key}", seen))
    return flat


def flatten_outputs(out: Any, prefix: str = "out") -> Dict[str, np.ndarray]:
    """Every tensor of a nested output (in any container, see :func:`leaves`) as ``{path: array}``."""
    return {path: value.numpy() if isinstance(value, paddle.Tensor) else value
            for path, value in leaves(out, lambda v: isinstance(v, (paddle.Tensor, np.ndarray)), prefix).items()}


def compare(reference: Dict[str, np.ndarray], candidate: Dict[str, np.ndarray],
            atol: float, rtol: float) -> VerificationResult:
    """Compare two ``{name: array}`` sets output by output."""
    if reference.keys() != candidate.keys():
        raise VerificationError(f"outputs differ: reference has {sorted(reference)}, candidate {sorted(candidate)}")
    rows = []
    for name, ref in reference.items():
        got = candidate[name]
        if ref.shape != got.shape:
            raise VerificationError(f"output {name}: shape {list(got.shape)} differs from the reference's "
                                    f"{list(ref.shape)}")
        ref64, got64 = ref.astype(np.float64), got.astype(np.float64)
        if not same_nonfinite(ref64, got64):
            rows.append(OutputError(name, ref.shape, float("inf"), float("inf"), float("inf"), nonfinite=True))
            continue
        finite = np.isfinite(ref64)
        ref64, got64 = ref64[finite], got64[finite]
        if ref64.size == 0:
            rows.append(OutputError(name, ref.shape, 0.0, 0.0, 0.0))
            continue
        diff = np.abs(ref64 - got64)
        scale = float(np.abs(ref64).max()) or 1.0
        rows.append(OutputError(name, ref.shape, float(diff.max()), float(diff.max()) / scale,
                                float((diff / (atol + rtol * np.abs(ref64))).max())))
    return VerificationResult(rows, atol, rtol)


def judge(original: Dict[str, np.ndarray], candidate: Dict[str, np.ndarray], atol: float, rtol: float,
          original64: Callable[[], Dict[str, np.ndarray]], name: str = "the original") -> VerificationResult:
    """:func:`compare`, and beyond tolerance the float64 check (``original64`` is called only then);
    ``name`` says who computed ``original`` in the messages."""
    result = compare(original, candidate, atol, rtol)
    if not result.within_tolerance:
        result.rounding = rounding_check(original, candidate, original64(), original=name)
    return result


def verify(original: Callable, converted: Callable, inputs: List[Any], atol: float = 1e-5,
           rtol: float = 1e-5, what: str = "converted model", raise_on_error: bool = True,
           output_names: Optional[Callable[[Any], Any]] = None) -> VerificationResult:
    """Run ``original`` and ``converted`` on each of ``inputs`` and compare all outputs.

    Args:
        original, converted: callables (usually layers in eval mode).
        inputs: a list of argument tuples (or single arguments) to call both with.
        atol, rtol: tolerance, as ``np.allclose``: ``|a - b| <= atol + rtol |b|``.
        what: named in the error message.
        raise_on_error: raise :class:`VerificationError` above tolerance.
        output_names: optional function mapping a raw output to the structure compared.

    Returns:
        A :class:`VerificationResult` with the max abs / rel error per output.
    """
    pick = output_names or (lambda out: out)
    reference, candidate = {}, {}
    with paddle.no_grad():
        for i, args in enumerate(inputs):
            args = args if isinstance(args, tuple) else (args,)
            reference.update(flatten_outputs(pick(original(*args)), f"input{i}"))
            candidate.update(flatten_outputs(pick(converted(*args)), f"input{i}"))
    result = compare(reference, candidate, atol, rtol)
    if raise_on_error and not result.ok:
        raise VerificationError(f"{what} differs from the original beyond tolerance: {result.summary()}")
    return result


def pair_detections(reference: Sequence[np.ndarray], candidate: Sequence[np.ndarray], box_atol: float,
                    score_atol: float = 1e-4, rtol: float = 1e-4) -> Tuple[bool, str]:
    """Two ppdet-style NMS outputs ``(bbox [K, 6 or 10], bbox_num [N])``: the same detections in any order?

    Per image the same count; each reference row, best score first, pairs with one unpaired candidate row of
    its class whose score is within ``score_atol`` and coordinates within ``box_atol + rtol * |value|``.
    (Paddle's NMS lists detections class by class below ``keep_top_k``, ONNX's by score.) Returns
    ``(ok, description)``.
    """
    ref_bbox, ref_num = np.asarray(reference[0]), np.asarray(reference[1]).reshape(-1)
    bbox, num = np.asarray(candidate[0]), np.asarray(candidate[1]).reshape(-1)
    if not np.array_equal(num, ref_num):
        return False, f"different count ({num.tolist()} vs {ref_num.tolist()})"
    box_diff = score_diff = 0.0
    start = 0
    for n in ref_num:
        want, got = ref_bbox[start:start + int(n)], bbox[start:start + int(n)]
        start += int(n)
        free = np.ones(len(got), bool)
        for i in np.argsort(-want[:, 1], kind="stable"):
            row = want[i]
            limit = box_atol + rtol * np.abs(row[2:])
            fits = free & (got[:, 0] == row[0]) & (np.abs(got[:, 1] - row[1]) <= score_atol) & \
                np.all(np.abs(got[:, 2:] - row[2:]) <= limit, axis=1)
            if not fits.any():
                return False, (f"differ: reference detection class {int(row[0])}, score {row[1]:.4g}, box "
                               f"{np.round(row[2:], 2).tolist()} has no counterpart")
            j = int(np.flatnonzero(fits)[np.argmin(np.abs(got[fits, 2:] - row[2:]).max(axis=1))])
            free[j] = False
            box_diff = max(box_diff, float(np.abs(got[j, 2:] - row[2:]).max()))
            score_diff = max(score_diff, float(abs(got[j, 1] - row[1])))
    return True, f"same detections (box diff {box_diff:.2g} px, score diff {score_diff:.2g})"


