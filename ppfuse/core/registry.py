"""The converter registry: which converter plans the rewrite of which layer type, and what a rewrite is.

A :class:`Registry` is an object: :func:`ppfuse.core.convert.convert` takes the one to use (by default
:data:`ppfuse.core.converters.DEFAULT_REGISTRY`, which holds ppfuse's own blocks and which
``ppfuse.ppdet`` fills with PaddleDetection's layer types when it is imported). A converter
*plans*: it computes every folded kernel (which validates every BatchNorm) and returns
:class:`Rewrite` objects whose ``apply()`` changes the model; nothing is changed before the
whole model is planned.

Where each layer sits in the model is a :class:`PlaceIndex` built once per conversion and passed
along in each :class:`Site`, so two conversions can run at once.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import paddle.nn as nn

from ppfuse.core import layers
from ppfuse.errors import ConversionError, Unconvertible


def join(*parts: str) -> str:
    """A dotted path from its parts, empty parts left out."""
    return ".".join(p for p in parts if p)


class PlaceIndex:
    """Every ``(parent, name)`` that holds each layer object of one model (a layer may be shared)."""

    def __init__(self, model: nn.Layer):
        self._places: Dict[int, List[Tuple[nn.Layer, str]]] = {}
        for parent in [model] + model.sublayers():
            for name, child in parent._sub_layers.items():
                if child is not None:
                    self._places.setdefault(id(child), []).append((parent, name))

    def of(self, layer: nn.Layer) -> List[Tuple[nn.Layer, str]]:
        return self._places.get(id(layer), [])


@dataclass
class Root:
    """The model being converted (its root is changed in place when a converter replaces it)."""
    model: nn.Layer


@dataclass
class Site:
    """Where a layer sits: its parent, its name there, and its dotted path.

    ``places`` lists every ``(parent, name)`` holding the same layer object (a
    layer shared by two parents); ``chain`` the ``(ancestor, child name,
    child)`` steps from the model root down to the layer; ``index`` where every
    layer of the model sits.
    """
    parent: Optional[nn.Layer]
    name: str
    where: str
    holder: Root
    places: List[Tuple[nn.Layer, str]] = field(default_factory=list)
    chain: Tuple = ()
    left: Optional[Dict[int, str]] = None
    index: Optional[PlaceIndex] = None

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
class Entry:
    layer_type: type
    converter: Converter
    descend: bool


def require_forward(layer: nn.Layer, layer_type: type, where: str) -> None:
    """Refuse a subclass of a registered type whose ``forward`` is its own: the converter knows only
    what ``layer_type.forward`` computes (and ``forward_branches``, where ppfuse's blocks compute it)."""
    if any(getattr(type(layer), name, None) is not getattr(layer_type, name, None)
           for name in ("forward", "forward_branches")):
        raise Unconvertible(f"{where} ({type(layer).__name__}): overrides forward of {layer_type.__name__}, so "
                            f"it may compute something else; register a converter for {type(layer).__name__} "
                            "(ppfuse.register_converter) or pass input_spec to pair its convs by dataflow")


def fold_rewrite(index: Optional[PlaceIndex], conv_parent: nn.Layer, conv_name: str, bn_parent: nn.Layer,
                 bn_name: str, conv_path: str, bn_path: str, kind: str = "conv+bn") -> Rewrite:
    """Plan: the conv becomes a conv with bias holding the fold, the BN an ``nn.Identity`` -- wherever
    either layer object sits in the model (``index``)."""
    conv_layer, bn_layer = conv_parent._sub_layers[conv_name], bn_parent._sub_layers[bn_name]
    kernel, bias = layers.fold_conv_bn(conv_layer, bn_layer, bn_path, conv_path)
    new_conv = layers.conv_like(conv_layer, kernel, bias)
    identity = nn.Identity()
    identity.eval()
    conv_places = (index.of(conv_layer) if index else []) or [(conv_parent, conv_name)]
    bn_places = (index.of(bn_layer) if index else []) or [(bn_parent, bn_name)]

    def apply():
        for parent, name in conv_places:
            setattr(parent, name, new_conv)
        for parent, name in bn_places:
            setattr(parent, name, identity)
    return Rewrite(conv_path, kind, apply, [bn_layer], pairs=[(conv_layer, bn_layer)],
                   touched=[p for p, _ in conv_places + bn_places])


class Registry:
    """Converters keyed by layer type (the most specific type in a layer's MRO wins), and the layer
    types whose ``forward`` returns one inner conv's output unchanged."""

    def __init__(self, name: str = "registry"):
        self.name = name
        self._converters: Dict[type, Entry] = {}
        self._conv_wrappers: Dict[type, str] = {}

    def copy(self, name: Optional[str] = None) -> "Registry":
        new = Registry(name or self.name)
        new._converters = dict(self._converters)
        new._conv_wrappers = dict(self._conv_wrappers)
        return new

    def __contains__(self, layer_type: type) -> bool:
        return layer_type in self._converters

    def register_converter(self, layer_type: type, converter: Optional[Converter] = None, *,
                           descend: bool = False, replace: bool = False):
        """Register ``converter(layer, site) -> [Rewrite] | None`` for ``layer_type`` (and subclasses).

        ``None`` means "nothing to do" (e.g. already deployed); raising
        :class:`~ppfuse.errors.Unconvertible` leaves the layer as it is with the
        message as the reason. With ``descend`` the walker also visits the layer's
        children. Usable as a decorator. A second registration of the same type is
        an error unless ``replace=True``.
        """
        def add(fn: Converter) -> Converter:
            if layer_type in self._converters and not replace:
                old = self._converters[layer_type].converter
                raise ConversionError(f"{layer_type.__module__}.{layer_type.__qualname__} already has converter "
                                      f"{getattr(old, '__qualname__', old)} in {self.name}; pass replace=True "
                                      "to override it")
            self._converters[layer_type] = Entry(layer_type, fn, descend)
            return fn
        return add if converter is None else add(converter)

    def unregister(self, layer_type: type) -> None:
        """Remove ``layer_type``'s converter (no error when there is none)."""
        self._converters.pop(layer_type, None)

    def register_conv_wrapper(self, layer_type: type, conv: str) -> None:
        """Declare that ``layer_type``'s ``forward`` returns the output of its sublayer ``conv`` unchanged.

        ppdet's ``DeformableConvV2`` computes offsets and a mask with one conv and returns what its
        deformable ``conv_dcn`` gives: a BatchNorm after the wrapper folds into ``conv_dcn`` (the offset
        conv is not touched). A subclass that overrides ``forward`` is not taken to do the same.
        """
        self._conv_wrappers[layer_type] = conv

    def lookup(self, layer: nn.Layer) -> Optional[Entry]:
        for cls in type(layer).__mro__:
            if cls in self._converters:
                return self._converters[cls]
        return None

    def wrapper_type(self, layer: nn.Layer) -> Optional[type]:
        return next((cls for cls in type(layer).__mro__ if cls in self._conv_wrappers), None)

    def output_conv(self, layer: nn.Layer, name: str, where: str) -> Optional[Tuple[nn.Layer, str, str]]:
        """``(parent, name, path)`` of the conv whose output is what ``layer``'s sublayer ``name`` returns:
        the sublayer itself, or the inner conv of a registered wrapper; None when it is neither.

        Raises:
            Unconvertible: a wrapper whose ``forward`` is not the registered type's.
        """
        child = layer._sub_layers.get(name)
        if layers.is_conv(child):
            return layer, name, join(where, name)
        wrapper_type = self.wrapper_type(child)
        if wrapper_type is None:
            return None
        inner = self._conv_wrappers[wrapper_type]
        if not layers.is_conv(child._sub_layers.get(inner)):
            return None
        require_forward(child, wrapper_type, join(where, name))
        return child, inner, join(where, name, inner)

    def register_conv_bn(self, layer_type: type, conv: str = "conv", bn: str = "bn", replace: bool = False,
                         pairs: Optional[Sequence[Tuple[str, str]]] = None,
                         applies: Optional[Callable[[nn.Layer], bool]] = None) -> None:
        """Declare that in ``layer_type`` the sublayer ``conv`` feeds the sublayer ``bn`` (or each
        ``(conv, bn)`` of ``pairs``), and nothing else uses the conv's output.

        The converter folds each pair: the conv becomes a conv with bias and the BN an ``nn.Identity``.
        A ``conv`` may also be a layer registered with :meth:`register_conv_wrapper` (its inner conv is
        folded). A ``bn`` that is not a BatchNorm (GroupNorm, None) is left as it is, and so is a
        subclass that overrides ``forward``. ``applies(layer)`` says whether this layer's ``forward``
        applies the pairs at all (e.g. a norm used only for some ``norm_type``); False leaves it.
        """
        declared = list(pairs) if pairs else [(conv, bn)]

        def convert_pairs(layer: nn.Layer, site: Site) -> Optional[List[Rewrite]]:
            found = [(c, b) for c, b in declared if layers.is_batch_norm(layer._sub_layers.get(b))
                     and (layers.is_conv(layer._sub_layers.get(c)) or self.wrapper_type(layer._sub_layers.get(c)))]
            if not found:
                return None
            require_forward(layer, layer_type, site.where)
            if applies is not None and not applies(layer):
                raise Unconvertible(f"{site.where} ({type(layer).__name__}): its forward does not apply the "
                                    "declared conv -> BatchNorm pair in this configuration; left as it is")
            rewrites = []
            for c, b in found:
                try:
                    target = self.output_conv(layer, c, site.where)
                    if target is not None:
                        conv_parent, conv_name, conv_path = target
                        rewrites.append(fold_rewrite(site.index, conv_parent, conv_name, layer, b, conv_path,
                                                     join(site.where, b)))
                except Unconvertible as exc:
                    site.leave(layer._sub_layers[b], str(exc))
            return rewrites or None
        convert_pairs.__qualname__ = "conv_bn[" + ", ".join(f"{c}->{b}" for c, b in declared) + "]"
        self.register_converter(layer_type, convert_pairs, replace=replace)
