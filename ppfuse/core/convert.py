"""Model-wide conversion: a table of converters keyed by layer type, the walker, and the proof.

The walker visits a model top-down. For each layer it looks up the most
specific registered type in the layer's MRO; the converter *plans* the change
(computes every folded kernel, which validates every BatchNorm) and returns
rewrites. Only when the whole model has been planned are the rewrites applied,
on a copy, so a failure never leaves a model half converted.

Structure proposes, dataflow proves. A registered type ("its ``conv`` feeds its
``bn``"), adjacent children of an ``nn.Sequential`` or a block type only
*suggest* a rewrite: a subclass may override ``forward``, a parent may tap the
conv output or call the BN elsewhere, a hook may rebuild a weight. So:

* always: a converter refuses a layer whose ``forward`` is not the registered
  type's, layers with hooks, convs whose weight is rebuilt, BatchNorms that
  normalize with batch statistics in eval mode or in another data format, and
  folds that overflow the dtype -- the BatchNorm is left, with the reason;
* with ``input_spec`` (or ``example_inputs``): the model is traced and every
  planned rewrite is confirmed against the program, ``if``/``while`` bodies
  included (:mod:`ppfuse.core.dataflow`); BatchNorms no structure claimed are paired
  by dataflow; then the converted model's outputs are compared with the
  original's and the conversion is refused beyond tolerance;
* without (or when ``to_static`` cannot trace the model: ``report.trace_error``
  says why): a rewrite is also refused when a parent's code reaches into the
  layer other than by calling it (iterating a ``Sequential`` of conv and BN,
  calling ``.conv`` of a registered layer, ...), and the report lists every
  fold as *not confirmed by a trace*.

Layers are found by identity and by the keys they are registered under, never
by splitting a dotted path: ppdet registers names that contain dots
(``'upsample.0'``).

Pairing by the order in which sublayers happen to be listed is never done
(ppdet's ``fuse_utils`` does, and pairs a bare identity BN with the next
block's conv).
"""
from __future__ import annotations

import copy
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import paddle
import paddle.nn as nn

from ppfuse.core import dataflow, layers
from ppfuse.core.converters import DEFAULT_REGISTRY, batch_norms, convert_by_method, convert_sequential
from ppfuse.core.registry import Entry, PlaceIndex, Registry, Rewrite, Root, Site, fold_rewrite, join, transplant
from ppfuse.core.verify import VerificationResult, flatten_outputs, float64_copy, judge
from ppfuse.core.vouching import unvouched
from ppfuse.errors import ConversionError, PPFuseError, Unconvertible, VerificationError, first_line


# ---------------------------------------------------------------------------------------- planning
@dataclass
class _Plan:
    rewrites: List[Rewrite]
    left: Dict[int, str]  # id(BatchNorm) -> why it stays


def _confirm(rewrite: Rewrite, tr: dataflow.Trace) -> Optional[str]:
    for conv, bn in rewrite.pairs:
        reason = dataflow.confirm_pair(tr, conv, bn)
        if reason is not None:
            return reason
    if rewrite.block is not None:
        return dataflow.confirm_block(tr, rewrite.block)
    return None


def _lookup(registry: Registry, layer: nn.Layer) -> Optional[Entry]:
    entry = registry.lookup(layer)
    if entry is None and callable(getattr(layer, "convert_to_deploy", None)):
        return Entry(type(layer), convert_by_method, False)
    return entry


def _call_converter(entry: Entry, layer: nn.Layer, site: Site) -> List[Rewrite]:
    """``entry``'s converter on ``layer``; an error of a converter's own code is one ConversionError that names
    the layer and the converter (Unconvertible and ppfuse's errors pass unchanged)."""
    try:
        return list(entry.converter(layer, site) or [])
    except PPFuseError:
        raise
    except Exception as exc:
        name = getattr(entry.converter, "__qualname__", repr(entry.converter))
        raise ConversionError(f"{site.where or '<model>'} ({type(layer).__name__}): its converter {name} raised "
                              f"{first_line(exc)}; nothing was converted (fix the converter, or unregister it "
                              "to leave the layer as it is)") from exc


def _plan(model: nn.Layer, tr: Optional[dataflow.Trace], registry: Registry,
          hint: str = "pass input_spec to confirm it") -> _Plan:
    root = Root(model)
    rewrites: List[Rewrite] = []
    left: Dict[int, str] = {}
    index = PlaceIndex(model)
    seen = set()

    def leave_all(layer: nn.Layer, reason: str) -> None:
        for bn in ([layer] if layers.is_batch_norm(layer) else []) + batch_norms(layer):
            left.setdefault(id(bn), reason)

    def visit(layer: nn.Layer, site: Site) -> None:
        if id(layer) in seen:
            return
        seen.add(id(layer))
        entry = _lookup(registry, layer)
        descend = entry is None or entry.descend
        if entry is not None:
            try:
                if layers.hooks(layer) or (entry.converter is not convert_sequential
                                           and any(layers.hooks(s) for s in layer.sublayers())):
                    raise Unconvertible(f"{site.where} ({type(layer).__name__}): it or a part of it has forward "
                                        "hooks, which may change what it computes; left as it is")
                planned = _call_converter(entry, layer, site)
            except Unconvertible as exc:
                leave_all(layer, str(exc))
                planned, descend = [], True
            for rewrite in planned:
                reason = unvouched(site.chain, rewrite, index) if tr is None else _confirm(rewrite, tr)
                if reason is not None:
                    how = "not confirmed by the trace" if tr is not None else \
                        f"not vouched for without a trace ({hint})"
                    for bn in rewrite.folded:
                        left.setdefault(id(bn), f"{rewrite.where}: {how}: {reason}")
                    descend = True
                    continue
                rewrite.confirmed = True if tr is not None else None
                if not rewrite.touched:
                    rewrite.touched = [p for p, _ in site.places] + [layer]
                rewrites.append(rewrite)
        if descend:
            for name, child in list(layer._sub_layers.items()):
                if child is not None:
                    visit(child, Site(layer, name, join(site.where, name), root, index.of(child),
                                      site.chain + ((layer, name, child),), left, index))

    visit(model, Site(None, "", "", root, [], (), left, index))
    if tr is not None:
        rewrites += _dataflow_rewrites(model, tr, rewrites, left, index)
    return _Plan(rewrites, left)


def _dataflow_rewrites(model: nn.Layer, tr: dataflow.Trace, planned: List[Rewrite],
                       left: Dict[int, str], index: PlaceIndex) -> List[Rewrite]:
    claimed = {id(bn) for r in planned for bn in r.folded}
    paths = {id(sub): layers.path_text(keys) for keys, sub in layers.named_paths(model)}
    pairs, reasons = dataflow.find_pairs(tr, model, claimed)
    rewrites = []
    for pair in pairs:
        conv_parent, conv_name = index.of(pair.conv)[0]
        bn_parent, bn_name = index.of(pair.bn)[0]
        try:
            rewrite = fold_rewrite(index, conv_parent, conv_name, bn_parent, bn_name, paths[id(pair.conv)],
                                   paths[id(pair.bn)], "conv+bn (dataflow)")
        except Unconvertible as exc:
            left[id(pair.bn)] = str(exc)
            continue
        rewrite.confirmed = True
        rewrites.append(rewrite)
        left.pop(id(pair.bn), None)
    for bn_id, reason in reasons.items():
        left.setdefault(bn_id, f"dataflow: {reason}")
    return rewrites


def _remaining_batch_norms(model: nn.Layer, planned: List[Rewrite], reasons: Dict[int, str]) -> Dict[str, str]:
    """BatchNorm layers that no planned rewrite removes, with the reason."""
    removed = {id(bn) for r in planned for bn in r.folded}
    default = ("no registered structure pairs it with a conv that feeds it; register its parent with "
               "ppfuse.register_conv_bn, a converter with ppfuse.register_converter, or pass input_spec "
               "to pair by dataflow")
    remaining: Dict[str, str] = {}
    for keys, sub in layers.named_paths(model):
        if layers.is_batch_norm(sub) and id(sub) not in removed:
            where, n = layers.path_text(keys), 2
            while where in remaining:  # 'a.b'/'c' and 'a'/'b.c' read alike: both are listed
                where, n = f"{layers.path_text(keys)} (#{n})", n + 1
            remaining[where] = reasons.get(id(sub), default)
    return remaining


# -------------------------------------------------------------------------------------- the report
@dataclass
class ConversionReport:
    """What :func:`convert` did. ``model`` is the converted model.

    ``confirmed_by_trace`` tells whether every rewrite was confirmed against a
    traced program and the outputs compared (``verification``); otherwise
    ``unconfirmed`` lists the rewrites made on the strength of structure alone.
    """
    model: nn.Layer
    converted: List[Rewrite] = field(default_factory=list)
    remaining_batch_norms: Dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0
    verification: Optional[VerificationResult] = None
    seconds_confirming: float = 0.0
    trace_error: Optional[str] = None
    traced: bool = False  # a trace was taken (input_spec or example_inputs given, and it succeeded)

    @property
    def counts(self) -> Dict[str, int]:
        return dict(Counter(r.kind for r in self.converted))

    @property
    def batch_norms_folded(self) -> int:
        return sum(len(r.folded) for r in self.converted)

    @property
    def unconfirmed(self) -> List[str]:
        return [r.where for r in self.converted if not r.confirmed]

    @property
    def confirmed_by_trace(self) -> bool:
        return self.traced and self.trace_error is None and not self.unconfirmed

    def summary(self) -> str:
        lines = [f"converted {len(self.converted)} layers in {self.seconds:.3f} s, "
                 f"{self.batch_norms_folded} BatchNorm folded, {len(self.remaining_batch_norms)} left"]
        if self.trace_error is not None:
            lines.append(f"  {self.trace_error}; so only what the layers' structure vouches for was folded, "
                         "as without input_spec")
        if self.converted:
            why = "the trace failed" if self.trace_error is not None else "no input_spec given"
            lines.append(("  every rewrite confirmed by a trace" + (", outputs compared" if self.verification else ""))
                         if self.confirmed_by_trace else
                         f"  {len(self.unconfirmed)} rewrites not confirmed by a trace ({why})")
        lines += [f"  {kind}: {n}" for kind, n in sorted(self.counts.items())]
        lines += [f"  BatchNorm left at {where}: {why}" for where, why in self.remaining_batch_norms.items()]
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {"converted": [{"where": r.where, "kind": r.kind, "confirmed_by_trace": bool(r.confirmed)}
                              for r in self.converted],
                "counts": self.counts, "batch_norms_folded": self.batch_norms_folded,
                "remaining_batch_norms": dict(self.remaining_batch_norms), "seconds": self.seconds,
                "seconds_confirming": self.seconds_confirming, "confirmed_by_trace": self.confirmed_by_trace,
                "trace_error": self.trace_error,
                "verification": self.verification.to_dict() if self.verification else None}


# --------------------------------------------------------------------------------- output check
def _float_dtype(model: nn.Layer) -> str:
    for param in model.parameters():
        if param.dtype in (paddle.float16, paddle.bfloat16, paddle.float32, paddle.float64):
            return str(param.dtype).split(".")[-1]
    return "float32"


# max |converted - original| / max |original| accepted per output, by the model's dtype
CHECK_TOLERANCE = {"float64": 1e-8, "float32": 1e-4, "float16": 1e-2, "bfloat16": 5e-2}


def _run(model: nn.Layer, inputs: Sequence) -> Dict[str, np.ndarray]:
    with paddle.no_grad():
        return {k: v.astype(np.float64) for k, v in flatten_outputs(model(*inputs)).items()
                if np.issubdtype(v.dtype, np.floating) or v.dtype.name == "bfloat16"}


def _run_float64(model: nn.Layer, inputs: Sequence) -> Dict[str, np.ndarray]:
    """``model`` evaluated in float64 on a copy: tells fp32 rounding from a conversion error."""
    cast = [x.astype("float64") if isinstance(x, paddle.Tensor) and x.dtype in (paddle.float32, paddle.float16)
            else x for x in inputs]
    return _run(float64_copy(model), cast)


def _scale(values: np.ndarray) -> float:
    """The largest finite magnitude of an output (1 when it has none): what its errors are relative to."""
    finite = values[np.isfinite(values)]
    return float(np.abs(finite).max()) if finite.size and np.abs(finite).max() > 0 else 1.0


def _scaled(outputs: Dict[str, np.ndarray], scales: Dict[str, float]) -> Dict[str, np.ndarray]:
    return {k: v / scales[k] for k, v in outputs.items()}


def _check_outputs(original: nn.Layer, work: nn.Layer, inputs: Sequence, reference: Dict[str, np.ndarray],
                   rewrites: List[Rewrite], before: List[Tuple[nn.Layer, dict]], tolerance: float
                   ) -> VerificationResult:
    """Compare the converted model's outputs with the original's, relative to each output's scale; beyond
    ``tolerance``, against a float64 evaluation of the original (fp32 rounding of an ill-conditioned model is
    no conversion error). Raises :class:`VerificationError` naming the first differing output and the first
    rewrite after which the outputs differ."""
    scales = {k: _scale(v) for k, v in reference.items()}
    original64: Dict[str, np.ndarray] = {}

    def truth():
        if not original64:
            try:
                original64.update(_scaled(_run_float64(original, inputs), scales))
            except Exception:  # a layer without float64 kernels: the plain tolerance decides
                original64.update({k: np.full_like(v, np.nan) for k, v in _scaled(reference, scales).items()})
        return original64

    def judged(candidate):
        return judge(_scaled(reference, scales), _scaled(candidate, scales), tolerance, 0.0, truth)

    result = judged(_run(work, inputs))
    if result.ok:
        result.judged = judged
        return result
    worst = next(o for o in result.outputs if not o.ok)
    culprit = _first_bad_rewrite(work, inputs, rewrites, before, judged)
    raise VerificationError(
        f"the converted model differs from the original beyond tolerance, so nothing was converted: output "
        f"{worst.name} {list(worst.shape)} is off by {worst.max_rel:.3g} of its scale (tolerance {tolerance:g}); "
        f"{culprit}. This is a ppfuse bug or a layer used in a way ppfuse does not see: please report it")


def _snapshot(layers_: List[nn.Layer]) -> List[Tuple[nn.Layer, dict]]:
    unique = {id(layer): layer for layer in layers_}
    return [(layer, {k: (copy.copy(v) if isinstance(v, (dict, set, list)) else v)
                     for k, v in layer.__dict__.items()}) for layer in unique.values()]


def _restore(snapshot: List[Tuple[nn.Layer, dict]]) -> None:
    for layer, state in snapshot:
        layer.__dict__.clear()
        layer.__dict__.update({k: (copy.copy(v) if isinstance(v, (dict, set, list)) else v)
                               for k, v in state.items()})


def _first_bad_rewrite(work: nn.Layer, inputs, rewrites: List[Rewrite], before: List[Tuple[nn.Layer, dict]],
                       judged) -> str:
    """Bisect: the first rewrite whose application makes the outputs differ (``before`` restores the
    touched layers to their state before any rewrite)."""
    if not rewrites:
        return "no rewrite was applied"
    low, high = 0, len(rewrites)  # outputs fine after `low` rewrites, off after `high`
    while high - low > 1:
        middle = (low + high) // 2
        _restore(before)
        for rewrite in rewrites[:middle]:
            rewrite.apply()
        if judged(_run(work, inputs)).ok:
            low = middle
        else:
            high = middle
    bad = rewrites[high - 1]
    return f"the first rewrite after which they differ: {bad.where or '<model>'} ({bad.kind})"


# -------------------------------------------------------------------------------------- convert
def convert(model: nn.Layer, inplace: bool = False, strict: bool = False,
            input_spec: Optional[Sequence] = None, example_inputs: Optional[Sequence] = None,
            check: bool = True, tolerance: Optional[float] = None,
            forward_with: Optional[Callable[[nn.Layer], nn.Layer]] = None,
            registry: Optional[Registry] = None) -> ConversionReport:
    """Convert every re-parameterizable block and every Conv+BN pair of ``model`` that is proven safe.

    With ``input_spec`` or ``example_inputs``, every fold is confirmed against the traced program and the
    converted model's outputs must equal the original's (refused otherwise); without, only what the layers'
    code vouches for is folded, and the report says which folds no trace confirmed. When ``to_static``
    cannot trace the model, the conversion goes on as without ``input_spec`` and ``report.trace_error``
    says why (the original error and the layer where it arose).

    Args:
        model: any ``paddle.nn.Layer``, in eval mode.
        inplace: change ``model`` itself (the same object); otherwise a converted copy is returned and
            ``model`` is left untouched.
        strict: raise when any BatchNorm is left unfolded.
        input_spec: ``paddle.static.InputSpec`` list of ``forward``'s (1-4 tensor) inputs.
        example_inputs: tensors to check outputs on (and to derive ``input_spec`` from when not given);
            default: random inputs of the spec's shapes (unknown batch 2, other unknown sizes 32).
        check: compare outputs after the conversion (with a spec or examples).
        tolerance: largest accepted ``max |converted - original| / max |original|`` per output; default
            by dtype (float32 1e-4, float16 1e-2). Beyond it the converted model still passes when it is no
            further from a float64 evaluation of the original than twice the original's own error.
        forward_with: wraps the model into the layer that is traced and run for the check, when ``model``'s
            own forward is not the function to prove (a detector's forward ends in NMS, say); the spec and
            example inputs are that layer's.
        registry: the converters to use; default :data:`ppfuse.core.converters.DEFAULT_REGISTRY`.

    Returns:
        A :class:`ConversionReport`; ``report.model`` is the converted model.

    Raises:
        ConversionError: a layer in training mode, broken BN statistics, a failing ``convert_to_deploy``,
            or (``strict``) BatchNorm left.
        VerificationError: the converted model's outputs differ (with a spec or examples).
        The model is unchanged when either is raised.
    """
    start = time.perf_counter()
    layers.check_eval(model, "")
    input_spec = _spec_list(input_spec)
    if input_spec is None and example_inputs is not None:
        input_spec = dataflow.spec_from_inputs(example_inputs)
    job = _Job(inplace, strict, input_spec, example_inputs, check, tolerance,
               forward_with or (lambda layer: layer), registry or DEFAULT_REGISTRY)
    report = _convert(model, job)
    report.seconds = time.perf_counter() - start
    return report


def _spec_list(input_spec) -> Optional[List]:
    """``input_spec`` as a flat list of ``InputSpec`` (one bare spec is a list of one), else one ConversionError."""
    if input_spec is None:
        return None
    if isinstance(input_spec, (paddle.static.InputSpec, paddle.Tensor)):
        return [input_spec]
    items = list(input_spec) if isinstance(input_spec, (list, tuple)) else None
    if not items or not all(isinstance(s, (paddle.static.InputSpec, paddle.Tensor)) for s in items):
        got = type(input_spec).__name__ if items is None else ", ".join(type(s).__name__ for s in items) or "nothing"
        raise ConversionError(f"input_spec: give a flat list of paddle.static.InputSpec, one per input of forward "
                              f"(got {got})")
    return items


@dataclass
class _Job:
    """What :func:`convert` was asked to do (its arguments, defaults resolved)."""
    inplace: bool
    strict: bool
    input_spec: Optional[Sequence]
    example_inputs: Optional[Sequence]
    check: bool
    tolerance: Optional[float]
    wrap: Callable[[nn.Layer], nn.Layer]
    registry: Registry


def _trace_failure(exc: dataflow.TraceError, model: nn.Layer) -> str:
    """Why the trace failed, as the report gives it: the original error and where in ``model`` it arose."""
    where = ""
    if exc.layer is model:
        where = f" in {type(model).__name__}.forward"
    elif exc.layer is not None:
        paths = {id(sub): layers.path_text(keys) for keys, sub in layers.named_paths(model)}
        where = (f" in {paths[id(exc.layer)]} ({type(exc.layer).__name__})" if id(exc.layer) in paths
                 else f" in {type(exc.layer).__name__}.forward")
    return f"tracing {exc.model_type}.forward with paddle.jit.to_static failed{where}: {exc.cause}"


def _convert(model: nn.Layer, job: _Job) -> ConversionReport:
    work = copy.deepcopy(model)
    wrap = job.wrap
    confirming = 0.0
    tr, trace_error = None, None
    if job.input_spec is not None:
        tick = time.perf_counter()
        try:
            # the model itself is traced, not the copy the rewrites are planned on: a callable the model holds
            # (a closure over it, a bound method of it) reaches the model's own layers even from the copy
            tr = dataflow.trace(wrap(model), list(job.input_spec)).for_copy(model, work)
        except dataflow.TraceError as exc:
            # what structure vouches for is still folded, as without input_spec; the report says why not more
            trace_error = _trace_failure(exc, model)
        confirming += time.perf_counter() - tick
    plan = _plan(work, tr, job.registry, "the trace failed, see the report's trace_error" if trace_error else
                 "pass input_spec to confirm it")
    remaining = _remaining_batch_norms(work, plan.rewrites, plan.left)
    if job.strict and remaining:
        where, why = next(iter(remaining.items()))
        failed = f" ({trace_error})" if trace_error else ""
        raise ConversionError(f"{len(remaining)} BatchNorm would stay unfolded (strict), first {where}: {why}{failed}")
    # outputs are compared whenever a trace was asked for: after a failed trace too, on the example inputs
    checking = job.check and plan.rewrites and (
        tr is not None or (trace_error is not None and job.example_inputs is not None))
    if checking:
        tick = time.perf_counter()
        inputs = (list(job.example_inputs) if job.example_inputs is not None
                  else dataflow.inputs_from_spec(job.input_spec))
        try:
            reference = _run(wrap(work), inputs)
        except PPFuseError:
            raise
        except Exception as exc:
            given = "example_inputs" if job.example_inputs is not None else "inputs of input_spec's shapes"
            raise ConversionError(f"{type(model).__name__}: running it on {given} "
                                  f"({', '.join(str(list(x.shape)) for x in inputs)}) failed: {first_line(exc)}; "
                                  "check that they are the inputs forward takes") from None
        if not reference:
            raise ConversionError(f"{type(model).__name__}: its forward returned no floating-point tensor ppfuse can "
                                  "find, so the conversion cannot be checked; nothing was converted (return the "
                                  "tensors, or pass check=False)")
        before = _snapshot([layer for r in plan.rewrites for layer in r.touched])
        confirming += time.perf_counter() - tick
    for rewrite in plan.rewrites:
        rewrite.apply()
    verification = None
    if checking:
        tick = time.perf_counter()
        verification = _check_outputs(wrap(model), wrap(work), inputs, reference, plan.rewrites, before,
                                      job.tolerance or CHECK_TOLERANCE.get(_float_dtype(model), 1e-4))
        confirming += time.perf_counter() - tick
    result = work
    if job.inplace:
        state, cls = dict(model.__dict__), type(model)
        transplant(model, work)
        result = model
        if checking and not verification.judged(_run(wrap(model), inputs)).ok:
            # the model reaches layers other than through its sublayers (a callable it holds closes over the
            # layers it had), so the converted model computes something else in place than as a copy
            model.__dict__.clear()
            model.__dict__.update(state)
            model.__class__ = cls
            raise VerificationError(f"{type(model).__name__}: converted in place, the model computes something else "
                                    "than its converted copy did (it reaches layers other than through its "
                                    "sublayers, e.g. a closure or bound method it holds); nothing was converted -- "
                                    "convert with inplace=False and use report.model")
    report = ConversionReport(result, plan.rewrites, remaining, verification=verification, trace_error=trace_error,
                              traced=tr is not None)
    report.seconds_confirming = confirming
    return report
