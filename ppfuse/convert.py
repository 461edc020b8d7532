"""Model-wide conversion: a table of converters keyed by layer type, and the walker.

The walker visits a model top-down. For each layer it looks up the most
specific registered type in the layer's MRO; the converter *plans* the change
(computes every folded kernel, which validates every BatchNorm) and returns
rewrites. Only when the whole model has been planned without error are the
rewrites applied, so a failure never leaves a model half converted.

Conv and BN are paired by declared structure only -- a registered type whose
``conv`` feeds its ``bn`` (:func:`register_conv_bn`), or adjacent children of an
``nn.Sequential`` -- never by the order in which sublayers happen to be listed
(ppdet's ``fuse_utils`` does that, and pairs a bare identity BN with the next
block's conv).

Converters included: ppfuse's :class:`~ppfuse.blocks.RepVggBlock` and
:class:`~ppfuse.blocks.ConvBN`, ``nn.Sequential(Conv, BN, ...)``, any layer
exposing ``convert_to_deploy()`` (run on a copy, then swapped in), and, when
ppdet is imported, ppdet's ``RepVggBlock``, ``MobileOneBlock``, ``ConvBNLayer``
and ``ConvNormLayer`` (see :mod:`ppfuse.ppdet_converters`).
"""
from __future__ import annotations

import copy
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

import paddle.nn as nn

from . import layers
from .blocks import ConvBN, RepVggBlock
from .errors import ConversionError


@dataclass
class Site:
    """Where a layer sits: its parent, its name there, and its dotted path."""
    parent: Optional[nn.Layer]
    name: str
    where: str
    holder: "_Root"

    def replace(self, new: nn.Layer) -> None:
        if self.parent is None:
            self.holder.model = new
        else:
            setattr(self.parent, self.name, new)


@dataclass
class _Root:
    model: nn.Layer


@dataclass
class Rewrite:
    """One planned change: ``apply()`` performs it; nothing is changed before."""
    where: str
    kind: str
    apply: Callable[[], None]
    folded: List[nn.Layer] = field(default_factory=list)  # the BatchNorm layers it removes


Converter = Callable[[nn.Layer, Site], Optional[List[Rewrite]]]


@dataclass
class _Entry:
    converter: Converter
    descend: bool


_CONVERTERS: Dict[type, _Entry] = {}


def register_converter(layer_type: type, converter: Optional[Converter] = None, *,
                       descend: bool = False, replace: bool = False):
    """Register ``converter(layer, site) -> [Rewrite] | None`` for ``layer_type`` (and subclasses).

    ``None`` means "nothing to do" (e.g. already deployed). With ``descend`` the
    walker also visits the layer's children. Usable as a decorator. A second
    registration of the same type is an error unless ``replace=True``.
    """
    def add(fn: Converter) -> Converter:
        if layer_type in _CONVERTERS and not replace:
            old = _CONVERTERS[layer_type].converter
            raise ConversionError(f"{layer_type.__module__}.{layer_type.__qualname__} already has converter "
                                  f"{getattr(old, '__qualname__', old)}; pass replace=True to override it")
        _CONVERTERS[layer_type] = _Entry(fn, descend)
        return fn
    return add if converter is None else add(converter)


def register_conv_bn(layer_type: type, conv: str = "conv", bn: str = "bn", replace: bool = False) -> None:
    """Declare that in ``layer_type`` the sublayer ``conv`` feeds the sublayer ``bn``.

    The converter folds the pair: ``conv`` becomes a conv with bias and ``bn``
    an ``nn.Identity``. A ``bn`` that is not a BatchNorm (GroupNorm, None) is
    left as it is.
    """
    def convert_pair(layer: nn.Layer, site: Site) -> Optional[List[Rewrite]]:
        conv_layer, bn_layer = getattr(layer, conv, None), getattr(layer, bn, None)
        if not (layers.is_conv(conv_layer) and layers.is_batch_norm(bn_layer)):
            return None
        return [_fold_pair_rewrite(layer, conv, bn, site.where)]
    convert_pair.__qualname__ = f"conv_bn[{conv}->{bn}]"
    register_converter(layer_type, convert_pair, replace=replace)


def _join(*parts: str) -> str:
    return ".".join(p for p in parts if p)


def _fold_pair_rewrite(parent: nn.Layer, conv_name: str, bn_name: str, where: str) -> Rewrite:
    return _fold_rewrite(parent, conv_name, parent, bn_name, _join(where, conv_name), _join(where, bn_name))


def _fold_rewrite(conv_parent: nn.Layer, conv_name: str, bn_parent: nn.Layer, bn_name: str,
                  conv_path: str, bn_path: str, kind: str = "conv+bn") -> Rewrite:
    """Plan: the conv becomes a conv with bias holding the fold, the BN an ``nn.Identity``."""
    conv_layer, bn_layer = getattr(conv_parent, conv_name), getattr(bn_parent, bn_name)
    kernel, bias = layers.fold_conv_bn(conv_layer, bn_layer, bn_path)
    new_conv = layers.conv_like(conv_layer, kernel, bias)
    identity = nn.Identity()
    identity.eval()

    def apply():
        setattr(conv_parent, conv_name, new_conv)
        setattr(bn_parent, bn_name, identity)
    return Rewrite(conv_path, kind, apply, [bn_layer])


def convert_sequential(seq: nn.Sequential, site: Site) -> Optional[List[Rewrite]]:
    """Fold each ``Conv`` directly followed by a ``BatchNorm`` inside a Sequential."""
    names = list(seq._sub_layers.keys())
    rewrites = []
    for first, second in zip(names, names[1:]):
        if layers.is_conv(seq._sub_layers[first]) and layers.is_batch_norm(seq._sub_layers[second]):
            rewrites.append(_fold_pair_rewrite(seq, first, second, site.where))
    return rewrites or None


def convert_repvgg(block: RepVggBlock, site: Site) -> Optional[List[Rewrite]]:
    if block.deployed:
        return None
    kernel, bias = block.get_equivalent_kernel_bias(site.where)
    return [Rewrite(site.where, "RepVggBlock", lambda: block.deploy_with(kernel, bias), _batch_norms(block))]


def convert_by_method(layer: nn.Layer, site: Site) -> Optional[List[Rewrite]]:
    """Any layer with ``convert_to_deploy()``: run it on a copy, swap the copy in when all is planned."""
    converted = copy.deepcopy(layer)
    try:
        converted.convert_to_deploy()
    except Exception as exc:  # third-party code: report where it failed
        raise ConversionError(f"{site.where} ({type(layer).__name__}): convert_to_deploy() failed: "
                              f"{type(exc).__name__}: {exc}") from exc
    kept = {name for name, sub in converted.named_sublayers() if layers.is_batch_norm(sub)}
    folded = [sub for name, sub in layer.named_sublayers() if layers.is_batch_norm(sub) and name not in kept]
    return [Rewrite(site.where, f"{type(layer).__name__}.convert_to_deploy", lambda: site.replace(converted),
                    folded)]


register_converter(RepVggBlock, convert_repvgg)
register_converter(nn.Sequential, convert_sequential, descend=True)
register_conv_bn(ConvBN, "conv", "bn")


def _batch_norms(layer: nn.Layer) -> List[nn.Layer]:
    return [sub for sub in layer.sublayers() if layers.is_batch_norm(sub)]


def _lookup(layer: nn.Layer) -> Optional[_Entry]:
    for cls in type(layer).__mro__:
        if cls in _CONVERTERS:
            return _CONVERTERS[cls]
    if callable(getattr(layer, "convert_to_deploy", None)):
        return _Entry(convert_by_method, False)
    return None


def _load_plugins() -> None:
    # ppdet's types are registered only when ppdet is in use: importing it costs seconds.
    if "ppdet" in sys.modules:
        from . import ppdet_converters  # noqa: F401  (registers on import)


@dataclass
class ConversionReport:
    """What :func:`convert` did. ``model`` is the converted model."""
    model: nn.Layer
    converted: List[Rewrite] = field(default_factory=list)
    remaining_batch_norms: Dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def counts(self) -> Dict[str, int]:
        return dict(Counter(r.kind for r in self.converted))

    @property
    def batch_norms_folded(self) -> int:
        return sum(len(r.folded) for r in self.converted)

    def summary(self) -> str:
        lines = [f"converted {len(self.converted)} layers in {self.seconds:.3f} s, "
                 f"{self.batch_norms_folded} BatchNorm folded, {len(self.remaining_batch_norms)} left"]
        lines += [f"  {kind}: {n}" for kind, n in sorted(self.counts.items())]
        lines += [f"  BatchNorm left at {where}: {why}" for where, why in self.remaining_batch_norms.items()]
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {"converted": [{"where": r.where, "kind": r.kind} for r in self.converted],
                "counts": self.counts, "batch_norms_folded": self.batch_norms_folded,
                "remaining_batch_norms": dict(self.remaining_batch_norms), "seconds": self.seconds}


def convert(model: nn.Layer, inplace: bool = False, strict: bool = False,
            input_spec: Optional[Sequence] = None) -> ConversionReport:
    """Convert every re-parameterizable block and every declared Conv+BN pair of ``model``.

    Args:
        model: any ``paddle.nn.Layer``, in eval mode.
        inplace: change ``model`` itself; otherwise a deep copy is converted
            and ``model`` is left untouched.
        strict: raise when any BatchNorm is left unfolded.
        input_spec: ``paddle.static.InputSpec`` list of ``forward``'s inputs; given,
            Conv -> BN pairs that no structure declares are found by tracing
            the model (:mod:`ppfuse.dataflow`) and folded too.

    Returns:
        A :class:`ConversionReport`; ``report.model`` is the converted model.

    Raises:
        ConversionError: a layer in training mode, broken BN statistics, a
            failing ``convert_to_deploy``, or (``strict``) BatchNorm left. The
            model is unchanged when this is raised.
    """
    start = time.perf_counter()
    _load_plugins()
    layers.check_eval(model, "")
    root = _Root(model if inplace else copy.deepcopy(model))
    rewrites: List[Rewrite] = []
    seen = set()

    def visit(layer: nn.Layer, site: Site) -> None:
        if id(layer) in seen:
            return
        seen.add(id(layer))
        entry = _lookup(layer)
        if entry is not None:
            planned = entry.converter(layer, site)
            rewrites.extend(planned or [])
            if not entry.descend:
                return
        for name, child in list(layer._sub_layers.items()):
            if child is not None:
                visit(child, Site(layer, name, _join(site.where, name), root))

    visit(root.model, Site(None, "", "", root))
    reasons: Dict[str, str] = {}
    if input_spec is not None:
        rewrites += _dataflow_rewrites(root.model, input_spec, rewrites, reasons)
    remaining = _remaining_batch_norms(root.model, rewrites, reasons)
    if strict and remaining:
        where, why = next(iter(remaining.items()))
        raise ConversionError(f"{len(remaining)} BatchNorm would stay unfolded (strict), first {where}: {why}")
    for rewrite in rewrites:
        rewrite.apply()
    report = ConversionReport(root.model, rewrites)
    report.remaining_batch_norms = remaining
    report.seconds = time.perf_counter() - start
    return report


def _dataflow_rewrites(model: nn.Layer, input_spec, planned: List[Rewrite], reasons: Dict[str, str]) -> List[Rewrite]:
    from . import dataflow
    removed = {id(bn) for r in planned for bn in r.folded}
    pairs, left = dataflow.find_pairs(model, input_spec)
    reasons.update(left)
    rewrites = []
    for pair in pairs:
        dataflow.check_pair(model, pair)
        conv_parent, conv_name, _ = dataflow.resolve(model, pair.conv_path)
        bn_parent, bn_name, bn = dataflow.resolve(model, pair.bn_path)
        if id(bn) not in removed:
            rewrites.append(_fold_rewrite(conv_parent, conv_name, bn_parent, bn_name, pair.conv_path,
                                          pair.bn_path, "conv+bn (dataflow)"))
    return rewrites


def _remaining_batch_norms(model: nn.Layer, planned: List[Rewrite],
                           reasons: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    """BatchNorm layers that no planned rewrite removes, with the reason."""
    removed = {id(bn) for r in planned for bn in r.folded}
    default = ("no registered structure pairs it with a conv that feeds it; register its parent with "
               "ppfuse.register_conv_bn, a converter with ppfuse.register_converter, or pass input_spec "
               "to pair by dataflow")
    return {name: (reasons or {}).get(name, default)
            for name, sub in model.named_sublayers()
            if layers.is_batch_norm(sub) and id(sub) not in removed}
