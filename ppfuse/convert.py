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
  included (:mod:`ppfuse.dataflow`); BatchNorms no structure claimed are paired
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
import inspect
import re
import sys
import textwrap
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import paddle
import paddle.nn as nn

from . import dataflow, layers
from .blocks import ConvBN, QARepVggBlock, RepVggBlock
from .errors import ConversionError, Unconvertible, VerificationError
from .verify import VerificationResult, flatten_outputs, float64_copy, judge


@dataclass
class _Root:
    model: nn.Layer


@dataclass
class Site:
    """Where a layer sits: its parent, its name there, and its dotted path.

    ``places`` lists every ``(parent, name)`` holding the same layer object (a
    layer shared by two parents); ``chain`` the ``(ancestor, child name,
    child)`` steps from the model root down to the layer.
    """
    parent: Optional[nn.Layer]
    name: str
    where: str
    holder: _Root
    places: List[Tuple[nn.Layer, str]] = field(default_factory=list)
    chain: Tuple = ()
    left: Optional[Dict[int, str]] = None

    def replace(self, new: nn.Layer) -> None:
        """Put ``new`` wherever the layer is; the model root is changed in place."""
        if self.parent is None:
            transplant(self.holder.model, new)
            return
        for parent, name in self.places or [(self.parent, self.name)]:
            setattr(parent, name, new)

    def leave(self, batch_norm: nn.Layer, reason: str) -> None:
        """Record why ``batch_norm`` (inside this layer) stays unfolded."""
        if self.left is not None:
            self.left.setdefault(id(batch_norm), reason)


def transplant(layer: nn.Layer, new: nn.Layer) -> None:
    """Make ``layer`` (the same object, wherever it is referenced) become ``new``."""
    if new is layer:
        return
    state = dict(new.__dict__)
    layer.__dict__.clear()
    layer.__dict__.update(state)
    if type(layer) is not type(new):
        layer.__class__ = type(new)


@dataclass
class Rewrite:
    """One planned change: ``apply()`` performs it; nothing is changed before.

    ``folded`` are the BatchNorm layers it removes. The rest says what a trace
    must confirm: ``pairs`` (conv, BN) whose conv output must go to that BN
    alone; ``block``, a layer whose parts must not be used from outside it.
    ``touched`` lists the layers whose attributes ``apply`` changes.
    """
    where: str
    kind: str
    apply: Callable[[], None]
    folded: List[nn.Layer] = field(default_factory=list)
    pairs: List[Tuple[nn.Layer, nn.Layer]] = field(default_factory=list)
    block: Optional[nn.Layer] = None
    touched: List[nn.Layer] = field(default_factory=list)
    confirmed: Optional[bool] = None  # True: by a trace; None: no trace was given


Converter = Callable[[nn.Layer, Site], Optional[List[Rewrite]]]


@dataclass
class _Entry:
    layer_type: type
    converter: Converter
    descend: bool


_CONVERTERS: Dict[type, _Entry] = {}


def register_converter(layer_type: type, converter: Optional[Converter] = None, *,
                       descend: bool = False, replace: bool = False):
    """Register ``converter(layer, site) -> [Rewrite] | None`` for ``layer_type`` (and subclasses).

    ``None`` means "nothing to do" (e.g. already deployed); raising
    :class:`~ppfuse.errors.Unconvertible` leaves the layer as it is with the
    message as the reason. With ``descend`` the walker also visits the layer's
    children. Usable as a decorator. A second registration of the same type is
    an error unless ``replace=True``.
    """
    def add(fn: Converter) -> Converter:
        if layer_type in _CONVERTERS and not replace:
            old = _CONVERTERS[layer_type].converter
            raise ConversionError(f"{layer_type.__module__}.{layer_type.__qualname__} already has converter "
                                  f"{getattr(old, '__qualname__', old)}; pass replace=True to override it")
        _CONVERTERS[layer_type] = _Entry(layer_type, fn, descend)
        return fn
    return add if converter is None else add(converter)


_CONV_WRAPPERS: Dict[type, str] = {}


def register_conv_wrapper(layer_type: type, conv: str) -> None:
    """Declare that ``layer_type``'s ``forward`` returns the output of its sublayer ``conv`` unchanged.

    ppdet's ``DeformableConvV2`` computes offsets and a mask with one conv and returns what its deformable
    ``conv_dcn`` gives: a BatchNorm after the wrapper folds into ``conv_dcn`` (the offset conv is not
    touched). A subclass that overrides ``forward`` is not taken to do the same.
    """
    _CONV_WRAPPERS[layer_type] = conv


def _wrapper_type(layer: nn.Layer) -> Optional[type]:
    return next((cls for cls in type(layer).__mro__ if cls in _CONV_WRAPPERS), None)


def _output_conv(layer: nn.Layer, name: str, where: str) -> Optional[Tuple[nn.Layer, str, str]]:
    """``(parent, name, path)`` of the conv whose output is what ``layer``'s sublayer ``name`` returns: the
    sublayer itself, or the inner conv of a registered wrapper; None when it is neither.

    Raises:
        Unconvertible: a wrapper whose ``forward`` is not the registered type's.
    """
    child = layer._sub_layers.get(name)
    if layers.is_conv(child):
        return layer, name, _join(where, name)
    wrapper_type = _wrapper_type(child)
    if wrapper_type is None:
        return None
    inner = _CONV_WRAPPERS[wrapper_type]
    if not layers.is_conv(child._sub_layers.get(inner)):
        return None
    require_forward(child, wrapper_type, _join(where, name))
    return child, inner, _join(where, name, inner)


def register_conv_bn(layer_type: type, conv: str = "conv", bn: str = "bn", replace: bool = False,
                     pairs: Optional[Sequence[Tuple[str, str]]] = None,
                     applies: Optional[Callable[[nn.Layer], bool]] = None) -> None:
    """Declare that in ``layer_type`` the sublayer ``conv`` feeds the sublayer ``bn`` (or each ``(conv, bn)``
    of ``pairs``), and nothing else uses the conv's output.

    The converter folds each pair: the conv becomes a conv with bias and the BN an ``nn.Identity``. A
    ``conv`` may also be a layer registered with :func:`register_conv_wrapper` (its inner conv is folded).
    A ``bn`` that is not a BatchNorm (GroupNorm, None) is left as it is, and so is a subclass that
    overrides ``forward``. ``applies(layer)`` says whether this layer's ``forward`` applies the pairs at
    all (e.g. a norm used only for some ``norm_type``); False leaves it.
    """
    declared = list(pairs) if pairs else [(conv, bn)]

    def convert_pairs(layer: nn.Layer, site: Site) -> Optional[List[Rewrite]]:
        found = [(c, b) for c, b in declared if layers.is_batch_norm(layer._sub_layers.get(b))
                 and (layers.is_conv(layer._sub_layers.get(c)) or _wrapper_type(layer._sub_layers.get(c)))]
        if not found:
            return None
        require_forward(layer, layer_type, site.where)
        if applies is not None and not applies(layer):
            raise Unconvertible(f"{site.where} ({type(layer).__name__}): its forward does not apply the "
                                "declared conv -> BatchNorm pair in this configuration; left as it is")
        rewrites = []
        for c, b in found:
            try:
                target = _output_conv(layer, c, site.where)
                if target is not None:
                    conv_parent, conv_name, conv_path = target
                    rewrites.append(fold_rewrite(conv_parent, conv_name, layer, b, conv_path, _join(site.where, b)))
            except Unconvertible as exc:
                site.leave(layer._sub_layers[b], str(exc))
        return rewrites or None
    convert_pairs.__qualname__ = "conv_bn[" + ", ".join(f"{c}->{b}" for c, b in declared) + "]"
    register_converter(layer_type, convert_pairs, replace=replace)


def require_forward(layer: nn.Layer, layer_type: type, where: str) -> None:
    """Refuse a subclass of a registered type whose ``forward`` is its own: the converter knows only
    what ``layer_type.forward`` computes (and ``forward_branches``, where ppfuse's blocks compute it)."""
    if any(getattr(type(layer), name, None) is not getattr(layer_type, name, None)
           for name in ("forward", "forward_branches")):
        raise Unconvertible(f"{where} ({type(layer).__name__}): overrides forward of {layer_type.__name__}, so "
                            f"it may compute something else; register a converter for {type(layer).__name__} "
                            "(ppfuse.register_converter) or pass input_spec to pair its convs by dataflow")


def _join(*parts: str) -> str:
    return ".".join(p for p in parts if p)


_PLACES: Dict[int, List[Tuple[nn.Layer, str]]] = {}


def _places_of(layer: nn.Layer) -> List[Tuple[nn.Layer, str]]:
    return _PLACES.get(id(layer), [])


def fold_rewrite(conv_parent: nn.Layer, conv_name: str, bn_parent: nn.Layer, bn_name: str,
                 conv_path: str, bn_path: str, kind: str = "conv+bn") -> Rewrite:
    """Plan: the conv becomes a conv with bias holding the fold, the BN an ``nn.Identity`` -- wherever
    either layer object sits in the model."""
    conv_layer, bn_layer = conv_parent._sub_layers[conv_name], bn_parent._sub_layers[bn_name]
    kernel, bias = layers.fold_conv_bn(conv_layer, bn_layer, bn_path, conv_path)
    new_conv = layers.conv_like(conv_layer, kernel, bias)
    identity = nn.Identity()
    identity.eval()
    conv_places = _places_of(conv_layer) or [(conv_parent, conv_name)]
    bn_places = _places_of(bn_layer) or [(bn_parent, bn_name)]

    def apply():
        for parent, name in conv_places:
            setattr(parent, name, new_conv)
        for parent, name in bn_places:
            setattr(parent, name, identity)
    return Rewrite(conv_path, kind, apply, [bn_layer], pairs=[(conv_layer, bn_layer)],
                   touched=[p for p, _ in conv_places + bn_places])


def convert_sequential(seq: nn.Sequential, site: Site) -> Optional[List[Rewrite]]:
    """Fold each ``Conv`` directly followed by a ``BatchNorm`` inside a Sequential (whose forward is Paddle's)."""
    names = list(seq._sub_layers.keys())
    rewrites = []
    pairs = [(a, b) for a, b in zip(names, names[1:])
             if layers.is_conv(seq._sub_layers[a]) and layers.is_batch_norm(seq._sub_layers[b])]
    if not pairs:
        return None
    require_forward(seq, nn.Sequential, site.where)
    for first, second in pairs:
        try:
            rewrites.append(fold_rewrite(seq, first, seq, second, _join(site.where, first),
                                         _join(site.where, second)))
        except Unconvertible as exc:
            site.leave(seq._sub_layers[second], str(exc))
    return rewrites or None


def _batch_norms(layer: nn.Layer) -> List[nn.Layer]:
    return [sub for sub in layer.sublayers() if layers.is_batch_norm(sub)]


def convert_repvgg(block: RepVggBlock, site: Site) -> Optional[List[Rewrite]]:
    if block.deployed:
        return None
    require_forward(block, RepVggBlock, site.where)
    kernel, bias = block.get_equivalent_kernel_bias(site.where)
    pairs = [(block.conv1.conv, block.conv1.bn), (block.conv2.conv, block.conv2.bn)]
    return [Rewrite(site.where, "RepVggBlock", lambda: block.deploy_with(kernel, bias), _batch_norms(block),
                    pairs=pairs, block=block, touched=[block])]


def convert_qarepvgg(block: QARepVggBlock, site: Site) -> Optional[List[Rewrite]]:
    if block.deployed:
        return None
    require_forward(block, QARepVggBlock, site.where)
    kernel, bias = block.get_equivalent_kernel_bias(site.where)
    # the 1x1 conv and the identity have no BatchNorm; the one after the sum is fed by an add, not a conv:
    # the trace confirms the 3x3 pair and that no part of the block is used from outside it
    pairs = [(block.conv1.conv, block.conv1.bn)]
    return [Rewrite(site.where, "QARepVggBlock", lambda: block.deploy_with(kernel, bias), _batch_norms(block),
                    pairs=pairs, block=block, touched=[block])]


def convert_by_method(layer: nn.Layer, site: Site) -> Optional[List[Rewrite]]:
    """Any layer with ``convert_to_deploy()``: run it on a copy, swap the copy in when all is planned.

    A layer with no BatchNorm inside is taken as converted already (there is nothing to fold, and
    third-party ``convert_to_deploy`` methods are often not safe to call twice)."""
    if not _batch_norms(layer):
        return None
    converted = copy.deepcopy(layer)
    try:
        converted.convert_to_deploy()
    except Exception as exc:  # third-party code: report where it failed
        raise ConversionError(f"{site.where} ({type(layer).__name__}): convert_to_deploy() failed: "
                              f"{type(exc).__name__}: {exc}") from exc
    converted.eval()  # layers it created start in training mode
    # matched by the keys that lead to each layer (a joined path would confuse 'a.b'/'c' with 'a'/'b.c')
    kept = {keys for keys, sub in layers.named_paths(converted) if layers.is_batch_norm(sub)}
    folded = [sub for keys, sub in layers.named_paths(layer) if layers.is_batch_norm(sub) and keys not in kept]
    return [Rewrite(site.where, f"{type(layer).__name__}.convert_to_deploy", lambda: transplant(layer, converted),
                    folded, block=layer, touched=[layer])]


register_converter(RepVggBlock, convert_repvgg)
register_converter(QARepVggBlock, convert_qarepvgg)
register_converter(nn.Sequential, convert_sequential, descend=True)
register_conv_bn(ConvBN, "conv", "bn")


def _lookup(layer: nn.Layer) -> Optional[_Entry]:
    for cls in type(layer).__mro__:
        if cls in _CONVERTERS:
            return _CONVERTERS[cls]
    if callable(getattr(layer, "convert_to_deploy", None)):
        return _Entry(type(layer), convert_by_method, False)
    return None


def _load_plugins() -> None:
    # ppdet's types are registered only when ppdet is in use: importing it costs seconds.
    if "ppdet" in sys.modules:
        from . import ppdet_converters  # noqa: F401  (registers on import)


# ------------------------------------------------------------------------- vouching without a trace
_CONTAINERS = (nn.Sequential, nn.LayerList, nn.LayerDict)
_GENERIC_ACCESS = {"_sub_layers", "sublayers", "children", "named_children", "named_sublayers", "__dict__"}
_SOURCES: Dict[type, Optional[List[Tuple[str, str]]]] = {}


def _method_sources(cls: type) -> Optional[List[Tuple[str, str]]]:
    """``(self name, source)`` of every method the class defines or inherits (not ``__init__``, not
    Paddle's own layers); None when some source cannot be read."""
    if cls in _SOURCES:
        return _SOURCES[cls]
    found: Optional[List[Tuple[str, str]]] = []
    for klass in cls.__mro__:
        if klass is object or klass.__module__.startswith("paddle.nn"):
            continue
        for name, fn in vars(klass).items():
            fn = getattr(fn, "__func__", fn)
            if name == "__init__" or not inspect.isfunction(fn):
                continue
            try:
                source = textwrap.dedent(inspect.getsource(fn))
                params = list(inspect.signature(fn).parameters)
            except (OSError, TypeError, ValueError):
                found = None
                break
            found.append((params[0] if params else "self", source))
        if found is None:
            break
    _SOURCES[cls] = found
    return found


_REACHES: Dict[tuple, Optional[str]] = {}
_LAYER_INTERNALS = frozenset(vars(nn.Layer()))  # _sub_layers, _parameters, hooks, ...: Paddle's own


def _aliases(ancestor: nn.Layer, child: nn.Layer) -> Tuple[str, ...]:
    """Attributes of ``ancestor`` other than Paddle's own that hold ``child`` in a list, tuple or dict:
    a layer registered under a name that is no identifier (ppdet's TTFFPN adds ``'upsample.0'``) is
    reached through such a list (``self.upsample_list[i]``)."""
    found = []
    for attr, value in vars(ancestor).items():
        if attr in _LAYER_INTERNALS or not isinstance(value, (list, tuple, dict)):
            continue
        items = value.values() if isinstance(value, dict) else value
        if any(item is child for item in items):
            found.append(attr)
    return tuple(sorted(found))


def _reaches_into(ancestor: nn.Layer, name: str, child: nn.Layer, holder: bool) -> Optional[str]:
    """Why ``ancestor``'s code may use ``child`` other than by calling it, else None (cached per classes)."""
    aliases = _aliases(ancestor, child)
    key = (type(ancestor), name, type(child), holder, aliases,
           frozenset(child._sub_layers) | frozenset(child._parameters) | frozenset(child._buffers))
    if key not in _REACHES:
        _REACHES[key] = _reaches_into_uncached(ancestor, name, child, holder, aliases)
    return _REACHES[key]


def _reaches_into_uncached(ancestor: nn.Layer, name: str, child: nn.Layer, holder: bool,
                           aliases: Tuple[str, ...] = ()) -> Optional[str]:
    sources = _method_sources(type(ancestor))
    if sources is None:
        return f"the source of {type(ancestor).__name__} cannot be read to see how it uses '{name}'"
    for self_name, source in sources:
        for generic in _GENERIC_ACCESS:
            if re.search(rf"\b{self_name}\.{generic}\b", source):
                return f"{type(ancestor).__name__} walks its sublayers generically ({self_name}.{generic})"
        if not name.isidentifier() and re.search(rf"\bgetattr\(\s*{self_name}\s*,", source):
            # 'up.0' can be reached only by getattr, the generic walkers above, or an alias (below)
            return f"{type(ancestor).__name__} looks up its attributes by name (getattr), and may so reach '{name}'"
        uses = [re.escape(name)] if name.isidentifier() else []
        uses += [rf"{re.escape(alias)}\s*\[[^\]]*\]" for alias in aliases]  # self.upsample_list[i]
        for use in uses:
            for match in re.finditer(rf"\b{self_name}\.{use}", source):
                reason = _use_of(source, match, name, child, holder, type(ancestor).__name__)
                if reason is not None:
                    return reason
        for alias in aliases:  # the list itself, not one item: iterated, passed on, kept
            bare = [m for m in re.finditer(rf"\b{self_name}\.{re.escape(alias)}\b", source)
                    if not re.match(r"\s*\[", source[m.end():])]
            if bare and holder:  # as for a container: items of composite layers are called, their code read
                return (f"{type(ancestor).__name__} uses its list '{alias}', which holds '{name}', other than "
                        "by calling one item of it")
    return None


def _use_of(source: str, match, name: str, child: nn.Layer, holder: bool, owner: str) -> Optional[str]:
    """Why the use of ``child`` at ``match`` in ``source`` may do more than call it, else None."""
    before, after = source[:match.start()], source[match.end():]
    if re.match(r"\s*\(", after) or _only_tested(before, after):
        return None
    attribute = re.match(r"\s*\.\s*(\w+)", after)
    if attribute is not None:
        attribute = attribute.group(1)
        if (attribute in child._sub_layers or attribute in child._parameters or attribute in child._buffers
                or attribute in _GENERIC_ACCESS):
            return f"{owner} uses {name}.{attribute} directly"
        if holder and attribute != "forward" and _own_method(type(child), attribute):
            return (f"{owner} calls {name}.{attribute}(), a method of "
                    f"{type(child).__name__} that may return what forward keeps inside")
        return None
    if isinstance(child, _CONTAINERS) and not holder:
        return None  # iterating / indexing a container of composite layers, whose items it calls
    return f"{owner} uses '{name}' other than by calling it (iterates, indexes or keeps it)"


def _own_method(cls: type, name: str) -> bool:
    """``name`` is a method defined by ``cls`` or a base of it that is not one of Paddle's own layers."""
    return any(name in vars(klass) and inspect.isfunction(vars(klass)[name]) for klass in cls.__mro__
               if klass is not object and not klass.__module__.startswith("paddle.nn"))


def _only_tested(before: str, after: str) -> bool:
    """``self.x is None``, ``if self.x:`` -- uses that only test whether the layer is there."""
    if re.match(r"\s+is\b|\s*[!=]=\s*None\b", after):
        return True
    return bool(re.search(r"\b(if|elif|while|and|or|not)\s+$", before) and re.match(r"\s*(:|and\b|or\b)", after))


def _unvouched(chain: Tuple, rewrite: Rewrite) -> Optional[str]:
    """Why a rewrite cannot be vouched for without a trace: a conv or BN it folds sits at two places in
    the model (so it is also applied elsewhere), or an ancestor's code reaches into the layer."""
    for conv, bn in rewrite.pairs:
        for layer in (conv, bn):
            if len(_places_of(layer)) > 1:
                return (f"{type(layer).__name__} at {rewrite.where} is also held elsewhere in the model "
                        f"({len(_places_of(layer))} places), so it may be applied to something else too")
    for i, (ancestor, name, child) in enumerate(chain):
        reason = _reaches_into(ancestor, name, child, holder=(i == len(chain) - 1))
        if reason is not None:
            return reason
    return None


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


def _plan(model: nn.Layer, tr: Optional[dataflow.Trace], hint: str = "pass input_spec to confirm it") -> _Plan:
    root = _Root(model)
    rewrites: List[Rewrite] = []
    left: Dict[int, str] = {}
    _PLACES.clear()
    for parent in [model] + model.sublayers():
        for name, child in parent._sub_layers.items():
            if child is not None:
                _PLACES.setdefault(id(child), []).append((parent, name))
    seen = set()

    def leave_all(layer: nn.Layer, reason: str) -> None:
        for bn in ([layer] if layers.is_batch_norm(layer) else []) + _batch_norms(layer):
            left.setdefault(id(bn), reason)

    def visit(layer: nn.Layer, site: Site) -> None:
        if id(layer) in seen:
            return
        seen.add(id(layer))
        entry = _lookup(layer)
        descend = entry is None or entry.descend
        if entry is not None:
            try:
                if layers.hooks(layer) or (entry.converter is not convert_sequential
                                           and any(layers.hooks(s) for s in layer.sublayers())):
                    raise Unconvertible(f"{site.where} ({type(layer).__name__}): it or a part of it has forward "
                                        "hooks, which may change what it computes; left as it is")
                planned = entry.converter(layer, site) or []
            except Unconvertible as exc:
                leave_all(layer, str(exc))
                planned, descend = [], True
            for rewrite in planned:
                reason = _unvouched(site.chain, rewrite) if tr is None else _confirm(rewrite, tr)
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
                    visit(child, Site(layer, name, _join(site.where, name), root, _places_of(child),
                                      site.chain + ((layer, name, child),), left))

    visit(model, Site(None, "", "", root, [], (), left))
    if tr is not None:
        rewrites += _dataflow_rewrites(model, tr, rewrites, left)
    return _Plan(rewrites, left)


def _dataflow_rewrites(model: nn.Layer, tr: dataflow.Trace, planned: List[Rewrite],
                       left: Dict[int, str]) -> List[Rewrite]:
    claimed = {id(bn) for r in planned for bn in r.folded}
    paths = {id(sub): layers.path_text(keys) for keys, sub in layers.named_paths(model)}
    pairs, reasons = dataflow.find_pairs(tr, model, claimed)
    rewrites = []
    for pair in pairs:
        conv_parent, conv_name = _places_of(pair.conv)[0]
        bn_parent, bn_name = _places_of(pair.bn)[0]
        try:
            rewrite = fold_rewrite(conv_parent, conv_name, bn_parent, bn_name, paths[id(pair.conv)],
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
        return self.trace_error is None and not self.unconfirmed

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


def _scaled(outputs: Dict[str, np.ndarray], scales: Dict[str, float]) -> Dict[str, np.ndarray]:
    return {k: v / scales[k] for k, v in outputs.items()}


def _check_outputs(original: nn.Layer, work: nn.Layer, inputs: Sequence, reference: Dict[str, np.ndarray],
                   rewrites: List[Rewrite], before: List[Tuple[nn.Layer, dict]], tolerance: float
                   ) -> VerificationResult:
    """Compare the converted model's outputs with the original's, relative to each output's scale; beyond
    ``tolerance``, against a float64 evaluation of the original (fp32 rounding of an ill-conditioned model is
    no conversion error). Raises :class:`VerificationError` naming the first differing output and the first
    rewrite after which the outputs differ."""
    scales = {k: float(np.abs(v).max()) or 1.0 for k, v in reference.items()}
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
            forward_with: Optional[Callable[[nn.Layer], nn.Layer]] = None) -> ConversionReport:
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

    Returns:
        A :class:`ConversionReport`; ``report.model`` is the converted model.

    Raises:
        ConversionError: a layer in training mode, broken BN statistics, a failing ``convert_to_deploy``,
            or (``strict``) BatchNorm left.
        VerificationError: the converted model's outputs differ (with a spec or examples).
        The model is unchanged when either is raised.
    """
    start = time.perf_counter()
    _load_plugins()
    layers.check_eval(model, "")
    if input_spec is None and example_inputs is not None:
        input_spec = dataflow.spec_from_inputs(example_inputs)
    try:
        return _convert(model, inplace, strict, input_spec, example_inputs, check, tolerance, forward_with, start)
    finally:
        _PLACES.clear()  # it refers to the working copy


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


def _convert(model, inplace, strict, input_spec, example_inputs, check, tolerance, forward_with, start):
    work = copy.deepcopy(model)
    wrap = forward_with or (lambda layer: layer)
    confirming = 0.0
    tr, trace_error = None, None
    if input_spec is not None:
        tick = time.perf_counter()
        try:
            tr = dataflow.trace(wrap(work), list(input_spec))
        except dataflow.TraceError as exc:
            # what structure vouches for is still folded, as without input_spec; the report says why not more
            trace_error = _trace_failure(exc, work)
        confirming += time.perf_counter() - tick
    plan = _plan(work, tr, "the trace failed, see the report's trace_error" if trace_error else
                 "pass input_spec to confirm it")
    remaining = _remaining_batch_norms(work, plan.rewrites, plan.left)
    if strict and remaining:
        where, why = next(iter(remaining.items()))
        failed = f" ({trace_error})" if trace_error else ""
        raise ConversionError(f"{len(remaining)} BatchNorm would stay unfolded (strict), first {where}: {why}{failed}")
    # outputs are compared whenever a trace was asked for: after a failed trace too, on the example inputs
    checking = check and plan.rewrites and (tr is not None or (trace_error is not None and example_inputs is not None))
    if checking:
        tick = time.perf_counter()
        inputs = list(example_inputs) if example_inputs is not None else dataflow.inputs_from_spec(input_spec)
        reference = _run(wrap(work), inputs)
        before = _snapshot([layer for r in plan.rewrites for layer in r.touched])
        confirming += time.perf_counter() - tick
    for rewrite in plan.rewrites:
        rewrite.apply()
    verification = None
    if checking:
        tick = time.perf_counter()
        verification = _check_outputs(wrap(model), wrap(work), inputs, reference, plan.rewrites, before,
                                      tolerance or CHECK_TOLERANCE.get(_float_dtype(model), 1e-4))
        confirming += time.perf_counter() - tick
    result = work
    if inplace:
        transplant(model, work)
        result = model
    report = ConversionReport(result, plan.rewrites, remaining, verification=verification, trace_error=trace_error)
    report.seconds = time.perf_counter() - start
    report.seconds_confirming = confirming
    return report
