"""Pairing Conv with BatchNorm by traced dataflow, for models whose structure says nothing.

A ResNet's ``forward`` calls ``self.bn1(self.conv1(x))``: no layer declares that
``bn1`` consumes ``conv1``, and pairing by listing order (ppdet's
``fuse_utils``, PaddleSlim) gets such models wrong. Here the model is traced
with ``paddle.jit.to_static`` into a PIR program and each ``batch_norm`` op is
followed back to the op that produced its input.

Why a static program and not forward hooks: hooks see layers, not functional
ops, so they cannot tell that a conv's output is *also* used by ``x + y`` or
``concat`` -- and folding the BN into that conv would change the other use.
The program shows every consumer of every value.

Ops are mapped back to layers by parameter identity: a conv op's filter and a
BN op's statistics are ``builtin.parameter`` values named after the layer's
parameters. A pair is folded only when the value chain from the conv to the BN
(through the conv's own bias ``add`` and Conv1D's ``squeeze``) has exactly one
consumer at each step, and each of the two layers appears once in the program.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import paddle
import paddle.nn as nn

from . import layers
from .errors import ConversionError

CONV_OPS = {"conv1d", "conv2d", "conv3d", "depthwise_conv2d", "conv2d_transpose", "conv3d_transpose",
            "depthwise_conv2d_transpose", "conv1d_transpose"}
BN_OPS = {"batch_norm", "sync_batch_norm"}
# ops a parameter passes through before it reaches its consumer
_PARAM_PATH_OPS = {"assign", "unsqueeze", "reshape", "squeeze", "cast"}


def _op_name(op) -> str:
    return op.name().split(".")[-1].rstrip("_")


def _parameter_name(value) -> Optional[str]:
    """The parameter a value comes from (through assign/unsqueeze/reshape), else None."""
    for _ in range(8):
        op = value.get_defining_op()
        if op is None:
            return None
        if op.name() == "builtin.parameter":
            return op.attrs().get("parameter_name")
        if _op_name(op) not in _PARAM_PATH_OPS or op.num_operands() == 0:
            return None
        value = op.operand_source(0)
    return None


@dataclass
class Pair:
    conv_path: str
    bn_path: str


def _parameter_owners(model: nn.Layer) -> Dict[str, Tuple[str, nn.Layer]]:
    owners = {}
    for path, layer in [("", model)] + list(model.named_sublayers()):
        for param in list(layer._parameters.values()):
            if param is not None:
                owners[param.name] = (path, layer)
    return owners


def trace(model: nn.Layer, input_spec: Sequence[paddle.static.InputSpec]):
    """The PIR program of ``model``'s forward, traced on a copy (``to_static`` rewrites ``forward``)."""
    traced = copy.deepcopy(model)
    traced.eval()
    static = paddle.jit.to_static(traced, full_graph=True)
    try:
        program = static.forward.get_concrete_program(*input_spec)[0].main_program
    except Exception as exc:
        raise ConversionError(f"dataflow pairing: tracing {type(model).__name__} with to_static failed "
                              f"({type(exc).__name__}: {str(exc).splitlines()[0][:200]}); check input_spec") from None
    return traced, program


def find_pairs(model: nn.Layer, input_spec: Sequence[paddle.static.InputSpec]
               ) -> Tuple[List[Pair], Dict[str, str]]:
    """Conv -> BN pairs found by dataflow, and every other BN with the reason it is not paired."""
    traced, program = trace(model, input_spec)
    owners = _parameter_owners(traced)
    ops = list(program.global_block().ops)
    uses: Dict[str, int] = {}
    for op in ops:
        if _op_name(op) in CONV_OPS | BN_OPS:
            name = _parameter_name(op.operand_source(1))
            if name in owners:
                path = owners[name][0]
                uses[path] = uses.get(path, 0) + 1
    pairs, left = [], {}
    for op in ops:
        if _op_name(op) not in BN_OPS:
            continue
        bn_name = _parameter_name(op.operand_source(1))
        if bn_name not in owners:
            continue
        bn_path = owners[bn_name][0]
        reason, conv_path = _walk_to_conv(op.operand_source(0), owners)
        if reason is None and uses.get(bn_path, 0) > 1:
            reason = f"the BatchNorm is applied at {uses[bn_path]} places"
        if reason is None and uses.get(conv_path, 0) > 1:
            reason = f"its conv {conv_path} is applied at {uses[conv_path]} places"
        if reason is None:
            pairs.append(Pair(conv_path, bn_path))
        else:
            left[bn_path] = reason
    return pairs, left


def _walk_to_conv(value, owners) -> Tuple[Optional[str], Optional[str]]:
    """(None, conv path) when ``value`` is a conv's output used only on the way to this BN; else (reason, None)."""
    bias_owner = None
    for _ in range(4):
        op = value.get_defining_op()
        name = _op_name(op) if op is not None else "data"
        if name == "data":
            return "its input is a model input, not a conv", None
        if name not in CONV_OPS | {"add", "squeeze"}:
            return f"no conv before it (its input comes from '{name}')", None
        if len(value.all_used_ops()) != 1:
            return "the conv output it normalizes is also used elsewhere (folding would change that use)", None
        if name in CONV_OPS:
            conv = owners.get(_parameter_name(op.operand_source(1)))
            if conv is None:
                return "the conv before it has no parameter of the model", None
            if bias_owner is not None and bias_owner != conv[0]:
                return "a bias of another layer is added between conv and BN", None
            return None, conv[0]
        if name == "add":
            params = [_parameter_name(op.operand_source(i)) for i in range(2)]
            if params[1] in owners and params[0] is None:
                bias_owner, value = owners[params[1]][0], op.operand_source(0)
                continue
            return "its input is a sum, not a conv output", None
        # squeeze: Conv1D runs as unsqueeze -> conv2d -> squeeze
        value = op.operand_source(0)
    return "no conv before it", None


def resolve(model: nn.Layer, path: str) -> Tuple[nn.Layer, str, nn.Layer]:
    """``(parent, attribute name, layer)`` of a dotted sublayer path."""
    parent = model
    parts = path.split(".")
    for part in parts[:-1]:
        parent = parent._sub_layers[part]
    return parent, parts[-1], parent._sub_layers[parts[-1]]


def check_pair(model: nn.Layer, pair: Pair) -> None:
    _, _, conv = resolve(model, pair.conv_path)
    _, _, bn = resolve(model, pair.bn_path)
    if not layers.is_conv(conv) or not layers.is_batch_norm(bn):
        raise ConversionError(f"{pair.conv_path} -> {pair.bn_path}: traced pair is not (conv, BatchNorm): "
                              f"({type(conv).__name__}, {type(bn).__name__})")
