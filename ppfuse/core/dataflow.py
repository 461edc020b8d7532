"""What a traced program proves: which conv feeds which BatchNorm, and nothing else.

A ResNet's ``forward`` calls ``self.bn1(self.conv1(x))``: no layer declares that
``bn1`` consumes ``conv1``. And a structure that *does* declare a pair (a
registered ``conv -> bn`` type, adjacent children of a ``Sequential``) may be
used differently by a parent's ``forward``: it may tap the conv output, call the
BN elsewhere, or do so only inside an ``if``. So every fold is confirmed here
against the model traced with ``paddle.jit.to_static`` into a PIR program,
sub-blocks of ``if``/``while`` ops included:

* a **pair** (conv -> BN) is confirmed when every op using the conv's weight is a
  conv op with it as filter (``deformable_conv`` too: a BN scales its output
  channels alike), every op using the BN's statistics is a
  ``batch_norm`` op, each conv op's output (after the conv's own bias ``add``, and
  Conv1D's ``squeeze``) has exactly one consumer, a ``batch_norm`` op of that BN,
  every such BN op is reached this way, and each BN op normalizes with its running
  statistics in the conv's data format with the layer's epsilon;
* a **block** (a multi-branch layer converted whole) is confirmed when each of its
  parameterized leaf layers is applied the same number of times -- none is also
  called from outside the block -- and its own conv -> BN pairs are confirmed.

Ops are mapped to layers by parameter identity: a conv op's filter and a BN op's
statistics are ``builtin.parameter`` values named after the layer's parameters.
Why a program and not forward hooks: hooks see layers, not functional ops, so they
cannot tell that a conv's output is *also* used by ``x + y``, and they see only the
branch of an ``if`` that one input takes.
"""
from __future__ import annotations

import contextlib
import inspect
import traceback
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import paddle
import paddle.nn as nn

from ppfuse.core import layers, verify
from ppfuse.errors import ConversionError, first_line

CONV_OPS = {"conv1d", "conv2d", "conv3d", "depthwise_conv2d", "conv2d_transpose", "conv3d_transpose",
            "depthwise_conv2d_transpose", "conv1d_transpose", "deformable_conv"}
# operand position of the filter: (x, filter) for a conv op; deformable_conv reads (x, offset, filter, mask)
_FILTER_OPERAND = {"deformable_conv": 2}
BN_OPS = {"batch_norm", "sync_batch_norm"}
# ops a parameter passes through before it reaches its consumer
_PARAM_PATH_OPS = {"assign", "unsqueeze", "reshape", "squeeze", "cast"}
# operand positions of batch_norm: x, mean, variance, scale, bias
_BN_OPERANDS = {"_mean": 1, "_variance": 2, "weight": 3, "bias": 4}


def _op_name(op) -> str:
    return op.name().split(".")[-1].rstrip("_")


def _filter_operand(name: str) -> int:
    return _FILTER_OPERAND.get(name, 1)


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


def _all_ops(block) -> Iterator:
    """Every op of ``block`` and of the blocks nested in its ops (``if``/``while`` bodies)."""
    for op in block.ops:
        yield op
        for inner in op.blocks():
            yield from _all_ops(inner)


# --------------------------------------------------------------------------------------------- tracing
# to_static reads forward's signature and skips a first parameter only when it is named `self`, and it
# rejects *args: so the model is traced through a wrapper with plainly named positional inputs.
class _Inputs1(nn.Layer):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x0):
        return self.model(x0)


class _Inputs2(_Inputs1):
    def forward(self, x0, x1):
        return self.model(x0, x1)


class _Inputs3(_Inputs1):
    def forward(self, x0, x1, x2):
        return self.model(x0, x1, x2)


class _Inputs4(_Inputs1):
    def forward(self, x0, x1, x2, x3):
        return self.model(x0, x1, x2, x3)


_WRAPPERS = {1: _Inputs1, 2: _Inputs2, 3: _Inputs3, 4: _Inputs4}
_CONVERTED: Dict[object, object] = {}
_UNSUPPORTED: Dict[object, bool] = {}


@contextlib.contextmanager
def _fast_dy2static():
    """Skip what to_static spends on a trace for analysis that the analysis does not need.

    Most of a trace of a large detector (Paddle 3.3.1) goes to:
    re-transforming every forward on every trace (the function cache is a WeakKeyDictionary keyed by
    bound methods, which die at once) -- kept here per underlying function for the process; asking
    ``is_unsupported`` for each of ~1200 calls, which rebuilds two lists of module functions each
    time -- memoized; maps from generated code back to source lines plus a Python stack per op
    (``traceback.extract_stack``, asked by every PIR op), which serve error messages only, and the
    ``struct_name`` of each op (which lists the whole program at every layer call) -- not built.
    """
    from paddle.jit.dy2static import convert_call_func as calls, program_translator as translator
    saved = (translator.FunctionCache._convert, translator.create_and_update_origin_info_map,
             translator.update_op_callstack_with_origin_info, calls.is_unsupported)
    original_convert, original_unsupported = saved[0], saved[3]

    def convert(cache, func):
        key = inspect.unwrap(func)
        key = getattr(key, "__func__", key)
        if key not in _CONVERTED:
            _CONVERTED[key] = original_convert(cache, func)
        return _CONVERTED[key]

    def unsupported(func):
        try:  # a layer instance is never one of the built-in functions asked about: its type decides
            key = type(func) if isinstance(func, nn.Layer) else getattr(func, "__func__", func)
            if key not in _UNSUPPORTED:
                _UNSUPPORTED[key] = original_unsupported(func)
            return _UNSUPPORTED[key]
        except TypeError:  # unhashable
            return original_unsupported(func)
    translator.FunctionCache._convert = convert
    translator.create_and_update_origin_info_map = lambda *args, **kwargs: None
    translator.update_op_callstack_with_origin_info = lambda program: program
    calls.is_unsupported = unsupported
    from paddle.nn.layer import layers as paddle_layers
    name_struct = paddle_layers.name_struct  # lists every op of the program at each layer call
    paddle_layers.name_struct = lambda prefix=None: contextlib.nullcontext()
    extract_stack = traceback.extract_stack
    traceback.extract_stack = lambda *args, **kwargs: traceback.StackSummary()  # PIR asks one per op
    try:
        yield
    finally:
        (translator.FunctionCache._convert, translator.create_and_update_origin_info_map,
         translator.update_op_callstack_with_origin_info, calls.is_unsupported) = saved
        traceback.extract_stack = extract_stack
        paddle_layers.name_struct = name_struct


@dataclass
class Trace:
    """A traced program, with every (op, operand index) that uses each parameter, and the program's outputs.

    The program may be that of another model object with the same structure (the user's model, when the
    rewrites are planned on a copy of it): ``names`` maps the planned-on model's parameter names to the
    traced model's (:meth:`for_copy`).
    """
    program: object
    uses: Dict[str, List[Tuple[object, int]]]
    outputs: List[object] = field(default_factory=list)
    names: Dict[str, str] = field(default_factory=dict)

    def ops_using(self, param) -> List[Tuple[object, int]]:
        if param is None:
            return []
        return self.uses.get(self.names.get(param.name, param.name), [])

    def parameter_name(self, value) -> Optional[str]:
        """The planned-on model's name of the parameter ``value`` comes from, else None."""
        name = _parameter_name(value)
        back = {traced: own for own, traced in self.names.items()}
        return back.get(name, name)

    def is_output(self, value) -> bool:
        """Whether ``value`` is returned by the program (a use no op shows)."""
        return any(out is not None and out.is_same(value) for out in self.outputs)

    def for_copy(self, traced: nn.Layer, copy: nn.Layer) -> "Trace":
        """This trace of ``traced`` read for ``copy``, a deep copy of it: parameters matched by structure."""
        names = {}
        pairs = list(zip(layers.named_paths(traced), layers.named_paths(copy)))
        if len(pairs) != len(layers.named_paths(traced)) or any(a[0] != b[0] for a, b in pairs):
            raise ConversionError("the model's copy does not have the model's structure; cannot read its trace")
        for (_, original), (_, copied) in pairs:
            for key, param in original._parameters.items():
                twin = copied._parameters.get(key)
                if param is not None and twin is not None:
                    names[twin.name] = param.name
        return Trace(self.program, self.uses, self.outputs, names)


class TraceError(ConversionError):
    """``paddle.jit.to_static`` could not trace the model.

    ``cause`` is the original error as ``"Type: first line of its message"`` (to_static wraps it in a page of
    transformed code); ``layer`` the innermost layer of the model whose ``forward`` was running when it was
    raised (None when it was raised outside any).
    """

    def __init__(self, model: nn.Layer, exc: BaseException):
        original = _original_error(exc)
        self.cause = first_line(original)
        self.layer = _failing_layer(original, model)
        self.model_type = type(model).__name__
        super().__init__(f"tracing {self.model_type}.forward with paddle.jit.to_static failed: {self.cause}")


def _original_error(exc: BaseException) -> BaseException:
    """The error raised in the model: to_static re-raises it as a new one of the same type ``from None``."""
    from paddle.jit.dy2static import error as dy2static_error
    context = exc.__context__
    if exc.__suppress_context__ and context is not None and hasattr(context, dy2static_error.ERROR_DATA):
        return context
    return exc


def _failing_layer(exc: BaseException, model: nn.Layer) -> Optional[nn.Layer]:
    """The innermost layer of ``model`` (or ``model`` itself) whose method was running when ``exc`` was raised."""
    inside = {id(model)} | {id(sub) for sub in model.sublayers()}
    found, tb = None, exc.__traceback__
    while tb is not None:
        owner = tb.tb_frame.f_locals.get("self")
        if isinstance(owner, nn.Layer) and id(owner) in inside:
            found = owner
        tb = tb.tb_next
    return found


@contextlib.contextmanager
def _attributes_kept(model: nn.Layer):
    """Put every layer's plain attributes back as they were: a forward that keeps what it computed
    (ppdet's ``BaseArch`` keeps ``self.inputs``, heads cache anchors) would otherwise leave the model holding
    values of the traced program, which a later copy or eager run cannot use."""
    layers_ = [model] + model.sublayers()
    saved = [(layer, dict(vars(layer))) for layer in layers_]
    try:
        yield
    finally:
        for layer, before in saved:
            now = vars(layer)
            for key in [k for k in now if k not in before]:
                del now[key]
            for key, value in before.items():
                if now.get(key, None) is not value:
                    now[key] = value


def trace(model: nn.Layer, input_spec: Sequence[paddle.static.InputSpec]) -> Trace:
    """The PIR program of ``model``'s forward for ``input_spec``; ``model`` itself is not changed.

    Raises:
        TraceError: tracing failed; it gives to_static's own cause and the layer where it arose.
        ConversionError: an ``input_spec`` of no or more than four inputs.
    """
    if not 1 <= len(input_spec) <= len(_WRAPPERS):
        raise ConversionError(f"input_spec has {len(input_spec)} inputs; ppfuse traces models of 1 to "
                              f"{len(_WRAPPERS)} tensor inputs (wrap the model in a layer taking fewer)")
    wrapper = _WRAPPERS[len(input_spec)](model)
    static = paddle.jit.to_static(wrapper, full_graph=True)
    try:
        with _fast_dy2static(), _attributes_kept(model):
            concrete = static.forward.get_concrete_program(*input_spec)[0]
            program = concrete.main_program
    except Exception as exc:
        raise TraceError(model, exc) from None
    uses: Dict[str, List[Tuple[object, int]]] = defaultdict(list)
    for op in _all_ops(program.global_block()):
        if op.name() == "builtin.parameter" or _op_name(op) in _PARAM_PATH_OPS:
            continue
        for i in range(op.num_operands()):
            name = _parameter_name(op.operand_source(i))
            if name is not None:
                uses[name].append((op, i))
    return Trace(program, dict(uses), [v for v in _flat(concrete.outputs) if v is not None])


def _flat(values) -> list:
    """The program values in a traced forward's output, in whatever container it returned them."""
    return list(verify.leaves(values, lambda v: hasattr(v, "is_same") and hasattr(v, "get_defining_op")).values())


def inputs_from_spec(input_spec: Sequence[paddle.static.InputSpec], seed: int = 0) -> List[paddle.Tensor]:
    """Random inputs of the spec's shapes: unknown batch -> 2, other unknown sizes -> 32."""
    rng = np.random.RandomState(seed)
    inputs = []
    for spec in input_spec:
        shape = [(2 if i == 0 else 32) if (s is None or s < 0) else int(s) for i, s in enumerate(spec.shape)]
        dtype = str(spec.dtype).split(".")[-1]
        if "int" in dtype or "bool" in dtype:
            values = rng.randint(0, 2, shape)
        else:
            values = rng.normal(0, 1, shape)
        inputs.append(paddle.to_tensor(values.astype(dtype if dtype != "bfloat16" else "float32")).astype(dtype))
    return inputs


def spec_from_inputs(inputs: Sequence) -> List[paddle.static.InputSpec]:
    """InputSpecs of example tensors (batch left open)."""
    specs = []
    for i, x in enumerate(inputs):
        if not isinstance(x, paddle.Tensor):
            raise ConversionError(f"example input {i} is a {type(x).__name__}; give tensors")
        specs.append(paddle.static.InputSpec([None] + list(x.shape[1:]), x.dtype, f"x{i}"))
    return specs


# ----------------------------------------------------------------------------------------- confirmation
def _global_statistics(op) -> bool:
    attrs = op.attrs()
    test_mode = bool(attrs.get("is_test", False)) and not bool(attrs.get("trainable_statistics", False))
    return test_mode or bool(attrs.get("use_global_stats", False))


def _single_use(value) -> Optional[object]:
    used = value.all_used_ops()
    return used[0] if len(used) == 1 else None


def confirm_pair(tr: Trace, conv: nn.Layer, bn: nn.Layer) -> Optional[str]:
    """None when the trace proves ``bn`` consumes ``conv``'s output alone (see the module doc), else why not."""
    conv_uses = tr.ops_using(conv.weight)
    for op, index in conv_uses:
        if _op_name(op) not in CONV_OPS or index != _filter_operand(_op_name(op)):
            return f"the conv's weight is also used by a '{_op_name(op)}' op, not only as a conv filter"
    bn_params = {key: getattr(bn, key, None) for key in _BN_OPERANDS}
    bn_ops = {op.id(): op for op, index in tr.ops_using(bn_params["_mean"])}
    for key, param in bn_params.items():
        for op, index in tr.ops_using(param):
            if _op_name(op) not in BN_OPS or index != _BN_OPERANDS[key] or op.id() not in bn_ops:
                return f"the BatchNorm's {key.strip('_')} is also used by a '{_op_name(op)}' op"
    if not conv_uses and not bn_ops:
        return None  # neither is used by forward: folding changes nothing
    if len(conv_uses) != len(bn_ops):
        return (f"the conv is applied {len(conv_uses)} times and the BatchNorm {len(bn_ops)} times in forward "
                "(a layer reused elsewhere, or only one of them inside a branch)")
    bias_ops = {op.id() for op, _ in tr.ops_using(conv.bias)}
    reached = set()
    one_d = isinstance(conv, (nn.Conv1D, nn.Conv1DTranspose))
    for conv_op, _ in conv_uses:
        value, steps, bias_added = conv_op.result(0), 0, False
        while True:
            if tr.is_output(value):
                return "the conv's output is also an output of the model (folding would change it)"
            consumer = _single_use(value)
            if consumer is None:
                return "the conv's output is also used elsewhere in forward (folding would change that use)"
            name = _op_name(consumer)
            if name in BN_OPS:
                break
            if name == "add" and consumer.id() in bias_ops and steps < 2 and not bias_added:
                bias_ops.discard(consumer.id())
                bias_added = True
            elif name == "squeeze" and one_d and steps < 2:
                pass
            else:
                return f"the conv's output goes to a '{name}' op before the BatchNorm"
            value, steps = consumer.result(0), steps + 1
        if consumer.id() not in bn_ops or not consumer.operand_source(0).is_same(value):
            return "the conv's output is normalized by another BatchNorm"
        attrs = consumer.attrs()
        if not _global_statistics(consumer):
            return "the BatchNorm normalizes with batch statistics in forward"
        if (attrs.get("data_format", "NCHW") in layers.CHANNEL_LAST) != (conv_op.attrs().get("data_format", "NCHW")
                                                                    in layers.CHANNEL_LAST):
            return (f"the BatchNorm's data format {attrs.get('data_format')} differs from the conv's "
                    f"{conv_op.attrs().get('data_format')}")
        if not np.isclose(float(attrs.get("epsilon", bn._epsilon)), float(bn._epsilon), rtol=1e-6):
            return f"forward uses epsilon {attrs.get('epsilon')}, the layer holds {bn._epsilon}"
        reached.add(consumer.id())
    if bias_ops:
        return "the conv's bias is also used elsewhere in forward"
    if reached != set(bn_ops):
        return "the BatchNorm is also applied to something that is not this conv's output"
    return None


def leaf_layers(layer: nn.Layer) -> List[Tuple[str, nn.Layer]]:
    """Sublayers of ``layer`` that hold parameters of their own."""
    return [(layers.path_text(keys), sub) for keys, sub in layers.named_paths(layer)
            if any(p is not None for p in sub._parameters.values())]


def confirm_block(tr: Trace, block: nn.Layer) -> Optional[str]:
    """None when no parameterized part of ``block`` is applied more or less often than the others."""
    counts = {}
    for name, sub in leaf_layers(block):
        key = next(p for p in sub._parameters.values() if p is not None)
        counts[name if name not in counts else f"{name} (#{len(counts)})"] = len(
            {op.id() for op, _ in tr.ops_using(key)})
    if len(set(counts.values())) > 1:
        most = max(counts, key=counts.get)
        least = min(counts, key=counts.get)
        return (f"its part {most} is applied {counts[most]} times but {least} {counts[least]} times in forward "
                "(a part also used outside the block)")
    return None


# ----------------------------------------------------------------------------------------- discovery
@dataclass
class Pair:
    conv: nn.Layer
    bn: nn.Layer


def find_pairs(tr: Trace, model: nn.Layer, skip: set) -> Tuple[List[Pair], Dict[int, str]]:
    """Conv -> BN pairs of BatchNorms no structure claimed (ids in ``skip`` are claimed), confirmed;
    and, by id of the BatchNorm, why each other BatchNorm is not paired."""
    owners: Dict[str, nn.Layer] = {}
    for layer in [model] + model.sublayers():
        for param in layer._parameters.values():
            if param is not None:
                owners[param.name] = layer
    pairs, left = [], {}
    for op in _all_ops(tr.program.global_block()):
        if _op_name(op) not in BN_OPS:
            continue
        bn = owners.get(tr.parameter_name(op.operand_source(1)))
        if bn is None or id(bn) in skip or not layers.is_batch_norm(bn):
            continue
        conv, reason = _producer_conv(tr, op.operand_source(0), owners)
        if conv is not None:
            reason = confirm_pair(tr, conv, bn)
        if reason is None:
            if all(p.bn is not bn for p in pairs):
                pairs.append(Pair(conv, bn))
        else:
            left.setdefault(id(bn), reason)
    for pair in pairs:
        left.pop(id(pair.bn), None)
    return pairs, left


def _producer_conv(tr: Trace, value, owners) -> Tuple[Optional[nn.Layer], Optional[str]]:
    """The conv layer whose output (after its bias add / squeeze) ``value`` is, else (None, reason)."""
    for _ in range(3):
        op = value.get_defining_op()
        name = _op_name(op) if op is not None else "data"
        if name == "data":
            return None, "its input is a model input, not a conv"
        if name in CONV_OPS:
            conv = owners.get(tr.parameter_name(op.operand_source(_filter_operand(name))))
            if conv is None or not layers.is_conv(conv):
                return None, "the conv before it has no weight parameter of the model (a computed weight)"
            return conv, None
        if name not in ("add", "squeeze"):
            return None, f"no conv before it (its input comes from '{name}')"
        value = op.operand_source(0)
    return None, "no conv before it"
