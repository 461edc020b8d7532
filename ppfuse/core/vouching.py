"""Vouching without a trace: whether a parent's code may use a layer other than by calling it.

Without ``input_spec`` nothing shows what ``forward`` does with a registered pair, so the
source of every method of each ancestor is read: a rewrite is refused when an ancestor walks
its sublayers generically, looks them up by name, uses a conv or BN other than by calling it,
or when a layer it folds sits at two places in the model. Results are cached per class
(pure caches: a class's source does not change while the process runs).
"""
from __future__ import annotations

import functools
import inspect
import re
import textwrap
from typing import Dict, List, Optional, Tuple

import paddle.nn as nn

from ppfuse.core import layers
from ppfuse.core.registry import PlaceIndex, Rewrite

_CONTAINERS = (nn.Sequential, nn.LayerList, nn.LayerDict)
# ways to reach a layer or its parameters without naming it
_GENERIC_ACCESS = {"_sub_layers", "sublayers", "children", "named_children", "named_sublayers", "__dict__",
                   "parameters", "named_parameters", "_parameters", "buffers", "named_buffers", "_buffers",
                   "state_dict", "to_static_state_dict", "apply"}
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
        for generic in _GENERIC_ACCESS:  # on self or anything else (super(), nn.Layer.parameters(self), ...)
            if re.search(rf"\.\s*{re.escape(generic)}\b", source):
                return f"{type(ancestor).__name__} walks its sublayers or parameters generically (.{generic})"
        if re.search(r"\bvars\(", source):
            return f"{type(ancestor).__name__} reads attributes generically (vars)"
        reason = _getattr_use(source, name, type(ancestor).__name__)
        if reason is not None:
            return reason
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


_GETATTR_LITERAL = re.compile(r"""\bgetattr\(\s*\w+\s*,\s*(['"])([^'"\\]*)\1\s*\)""")


def _getattr_use(source: str, name: str, owner: str) -> Optional[str]:
    """Why a ``getattr`` in ``source`` may reach ``name`` other than by calling it, else None: a name that is
    not a string literal (or a default value) may be any attribute; a literal one is that attribute, used
    like ``self.<name>``."""
    for match in re.finditer(r"\bgetattr\(", source):
        literal = _GETATTR_LITERAL.match(source, match.start())
        if literal is None:
            return f"{owner} looks up its attributes by name (getattr), and may so reach '{name}'"
        if literal.group(2) == name and not re.match(r"\s*\(", source[literal.end():]):
            return f"{owner} uses '{name}' (by getattr) other than by calling it"
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


def unvouched(chain: Tuple, rewrite: Rewrite, index: PlaceIndex) -> Optional[str]:
    """Why a rewrite cannot be vouched for without a trace: a conv or BN it folds sits at two places in
    the model (so it is also applied elsewhere), or an ancestor's code reaches into the layer."""
    for conv, bn in rewrite.pairs:
        for layer in (conv, bn):
            if len(index.of(layer)) > 1:
                return (f"{type(layer).__name__} at {rewrite.where} is also held elsewhere in the model "
                        f"({len(index.of(layer))} places), so it may be applied to something else too")
    for i, (ancestor, name, child) in enumerate(chain):
        if layers.hooks(ancestor):  # a hook can read anything inside the layer it is on
            return f"{type(ancestor).__name__} above it has forward hooks, which may use its layers"
        holder = _callable_reaching_layers(ancestor)
        if holder is not None:
            return (f"{type(ancestor).__name__} holds a callable '{holder}' that refers to layers (a closure, bound "
                    "method or partial), which forward may call to use them other than through the model")
        reason = _reaches_into(ancestor, name, child, holder=(i == len(chain) - 1))
        if reason is not None:
            return reason
    return None


def _callable_reaching_layers(layer: nn.Layer) -> Optional[str]:
    """The name of an attribute of ``layer`` that is a callable referring to a layer (a bound method of one,
    a closure or default argument holding one, a partial with one), else None. Plain functions (an
    activation stored as ``self.act``) refer to none."""
    for attr, value in vars(layer).items():
        if attr in _LAYER_INTERNALS or isinstance(value, nn.Layer) or not callable(value):
            continue
        if _refers_to_layers(value):
            return attr
    return None


def _refers_to_layers(fn, depth: int = 0) -> bool:
    if depth > 3:
        return True  # deeper than anything plain: assume it may
    if inspect.ismethod(fn):
        return isinstance(fn.__self__, nn.Layer) or _refers_to_layers(fn.__func__, depth + 1)
    if isinstance(fn, functools.partial):
        held = list(fn.args) + list(fn.keywords.values())
        return any(isinstance(v, nn.Layer) for v in held) or _refers_to_layers(fn.func, depth + 1)
    if inspect.isfunction(fn):
        held = [cell.cell_contents for cell in fn.__closure__ or () if _filled(cell)]
        held += list(fn.__defaults__ or ()) + list((fn.__kwdefaults__ or {}).values())
        return any(isinstance(v, nn.Layer) or (callable(v) and not isinstance(v, type) and
                                                _refers_to_layers(v, depth + 1)) for v in held)
    return False


def _filled(cell) -> bool:
    try:
        cell.cell_contents
        return True
    except ValueError:  # an empty cell
        return False
