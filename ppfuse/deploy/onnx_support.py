"""ONNX: convert an export with paddle2onnx and check it; fold BatchNormalization in any ONNX model.

Many deployments go through ONNX (TensorRT, ONNX Runtime, OpenVINO), where
Paddle Inference's passes never run and paddle2onnx does not fold BatchNorm.
A ppfuse export has no BatchNorm left, so its ONNX model has none either;
:func:`fold_batch_norms` does the same for an ONNX model ppfuse did not write
(the idea of the onnx optimizer's ``fuse_bn_into_conv``), with the one fold
formula of :func:`ppfuse.core.kernels.fold_bn`.

Optional dependencies: ``pip install -e ".[onnx]"`` (paddle2onnx, onnx, onnxruntime).
"""
from __future__ import annotations

import os
import subprocess
import sys
from collections import Counter
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import paddle

from ppfuse.core import kernels
from ppfuse.errors import ExportError, VerificationError, require_module
from ppfuse.export_format import ONNX_FILE, PARAMS_FILE, program_file
from ppfuse.runtime.onnx_runtime import create_session
from ppfuse.runtime.paddle_inference import PaddleInference
from ppfuse.core.verify import compare, judge, pair_detections
from ppfuse.deploy.program import count_ops

__all__ = ["ONNX_FILE", "to_onnx", "unconvertible_ops", "repair_group_norm_epsilons",
           "repair_deform_conv_offset_groups", "integer_max_in_int64", "node_counts", "session",
           "run_onnx", "check_against_paddle", "check_extra_outputs", "check_raw_outputs", "compare_relative",
           "order_tied_rows", "name_outputs", "fold_batch_norms", "random_inputs", "verify_fold"]
# the scores' tolerance when raw rows are paired across a top-k's near ties (the export's tenfold check of them)
RAW_SCORE_ATOL = 1e-3
DEFAULT_OPSET = 13  # Max on int64 shapes (the exact upsample's expand) needs opset >= 12


# Paddle 3's program op names that paddle2onnx (2.x) knows under their legacy name
LEGACY_NAMES = {"add": "elementwise_add", "subtract": "elementwise_sub", "multiply": "elementwise_mul",
                "divide": "elementwise_div", "maximum": "elementwise_max", "minimum": "elementwise_min",
                "floor_divide": "elementwise_floordiv", "remainder": "elementwise_mod", "arange": "range",
                "expand": "expand_v2", "flatten": "flatten_contiguous_range", "unsqueeze": "unsqueeze2",
                "topk": "top_k_v2", "nonzero": "where_index", "matmul": "matmul_v2", "max": "reduce_max",
                "min": "reduce_min", "sum": "reduce_sum", "mean": "reduce_mean", "prod": "reduce_prod",
                "all": "reduce_all", "any": "reduce_any", "elementwise_pow": "pow", "argmax": "arg_max",
                "argmin": "arg_min", "full_batch_size_like": "fill_constant_batch_size_like"}
# a program's own structure, not operators paddle2onnx converts
STRUCTURAL_OPS = ("data", "fetch", "parameter", "p", "add_tensors", "combine", "split", "builtin", "shadow_output",
                  "if", "while", "yield", "cond_yield", "has_elements", "increment", "select_input", "pylayer")


def unconvertible_ops(model_dir: str) -> List[str]:
    """The operators of ``model_dir``'s program that paddle2onnx has no converter for, by its own list
    (``get_all_supported_operators_pir``); ``[]`` when that list cannot be read."""
    try:
        from paddle2onnx.paddle2onnx_cpp2py_export import get_all_supported_operators_pir
        supported = set(get_all_supported_operators_pir())
    except (ImportError, AttributeError):
        return []
    return sorted(op for op in count_ops(model_dir) if op not in STRUCTURAL_OPS and op not in supported
                  and LEGACY_NAMES.get(op) not in supported)


def _paddle2onnx(program: str, params: str, onnx_path: str, opset: int) -> None:
    import paddle2onnx
    # optimize_tool: paddle2onnx's default, polygraphy, runs with POLYGRAPHY_AUTOINSTALL_DEPS=1 and
    # pip-installs onnx_graphsurgeon at run time, which upgraded numpy to 2.x and broke cv2 here.
    paddle2onnx.export(program, params, save_file=onnx_path, opset_version=opset, enable_onnx_checker=True,
                       enable_optimize=True, optimize_tool="onnxoptimizer")


def to_onnx(model_dir: str, onnx_path: str, opset: int = DEFAULT_OPSET) -> str:
    """Convert ``model_dir``'s ``model.json``/``model.pdiparams`` to ``onnx_path`` with paddle2onnx, conv biases
    put back into their convs (:func:`fuse_conv_bias_adds`), what paddle2onnx loses put back (``group_norm``'s
    epsilon: :func:`repair_group_norm_epsilons`; ``deformable_conv``'s groups of offsets:
    :func:`repair_deform_conv_offset_groups`), its float64 maximum of integers computed in int64 so that OpenVINO
    knows every rank (:func:`integer_max_in_int64`), nodes in topological order.

    paddle2onnx ends the whole process (``abort``) on an operator it cannot convert, without naming it. So a
    program with an operator outside its list (:func:`unconvertible_ops`) is converted in a child process, and
    a failure names those operators.

    Raises:
        ExportError: one line naming the operators paddle2onnx cannot convert, or its failure; a
            ``deformable_conv`` without a mask; a ``group_norm`` epsilon or ``deformable_conv`` groups that
            cannot be put back.
    """
    require_module("paddle2onnx", "ONNX support", "onnx", ExportError)
    program = program_file(model_dir)
    params = os.path.join(model_dir, PARAMS_FILE)
    if deformable_convs_without_mask(program):
        raise ExportError(f"{model_dir}: {deformable_convs_without_mask(program)} deformable_conv op(s) without a "
                          "mask, which paddle2onnx 2.1 cannot convert (it fails on the missing input); give "
                          "deform_conv2d a mask of ones (the same function), or export without --onnx for Paddle "
                          "Inference")
    suspects = unconvertible_ops(model_dir)
    if suspects:
        code = ("import sys; sys.path.insert(0, sys.argv[5]); from ppfuse.deploy.onnx_support import _paddle2onnx; "
                "_paddle2onnx(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]))")
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        done = subprocess.run([sys.executable, "-c", code, program, params, onnx_path, str(opset), root],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        if done.returncode != 0 or not os.path.exists(onnx_path):
            raise ExportError(f"paddle2onnx cannot convert {', '.join('pd_op.' + op for op in suspects)} (not among "
                              "its operators); export without --onnx for Paddle Inference")
    else:
        try:
            _paddle2onnx(program, params, onnx_path, opset)
        except SystemExit as exc:  # paddle2onnx logs its error, then calls sys.exit
            raise ExportError(f"{model_dir}: paddle2onnx failed (it logged why above and exited with code "
                              f"{exc.code})") from None
        except Exception as exc:
            raise ExportError(f"{model_dir}: paddle2onnx failed: {type(exc).__name__}: {str(exc)[:300]}") from None
    if not os.path.exists(onnx_path):
        raise ExportError(f"{model_dir}: paddle2onnx wrote no {onnx_path}")
    onnx = require_module("onnx", "ONNX support", "onnx", ExportError)
    model = onnx.load(onnx_path)
    repaired = repair_group_norm_epsilons(model, program) + repair_deform_conv_offset_groups(model, program) + \
        integer_max_in_int64(model)
    if fuse_conv_bias_adds(model) or repaired:
        topological_sort(model.graph)
        try:
            onnx.checker.check_model(model)
        except onnx.checker.ValidationError as exc:
            # paddle2onnx's Loop bodies (ppdet's per-image loop after NMS) read values the checker places
            # after them; ONNX Runtime runs them, and the export's check that follows is the judge
            if "topologically sorted" not in str(exc) or "sub_block" not in str(exc):
                raise ExportError(f"{onnx_path}: not a valid ONNX model after fusing conv biases and repairing "
                                  "paddle2onnx's graph: "
                                  f"{str(exc).splitlines()[0][:200]}") from None
        onnx.save(model, onnx_path)
    return onnx_path


def _program_ops(program: str, op_name: str) -> List[Dict[str, object]]:
    """Every ``op_name`` op of a saved PIR program (``model.json``) as serialized, in program order, ops inside
    ``if``/loop regions included; ``[]`` for an older program format."""
    if not program.endswith(".json"):
        return []
    import json
    with open(program) as f:
        data = json.load(f)
    found: List[Dict[str, object]] = []

    def walk(regions):
        for region in regions or []:
            for block in region.get("blocks", []):
                for op in block.get("ops", []):
                    if op["#"].split(".")[-1].rstrip("_") == op_name:
                        found.append(op)
                    walk(op.get("regions"))
    walk(data["program"]["regions"])
    return found


def program_attributes(program: str, op_name: str) -> List[Dict[str, object]]:
    """The attributes (name -> value) of every ``op_name`` op of a saved PIR program (``model.json``), in
    program order, ops inside ``if``/loop regions included; ``[]`` for an older program format."""
    return [{a["N"]: a.get("AT", {}).get("D") for a in op.get("A", []) if isinstance(a, dict) and "N" in a}
            for op in _program_ops(program, op_name)]


def deformable_convs_without_mask(program: str) -> int:
    """How many ``deformable_conv`` ops of a saved PIR program have no mask (their mask operand is the null
    value, ``%0``: ``deform_conv2d(..., mask=None)``, deformable conv v1)."""
    return sum(1 for op in _program_ops(program, "deformable_conv")
               if len(op.get("I", [])) > 3 and isinstance(op["I"][3], dict) and op["I"][3].get("%") == 0)


def _all_nodes(graph):
    """Every node of ``graph`` and of its subgraphs (If and Loop bodies)."""
    for node in graph.node:
        yield node
        for attribute in node.attribute:
            for sub in ([attribute.g] if attribute.HasField("g") else []) + list(attribute.graphs):
                yield from _all_nodes(sub)


def repair_group_norm_epsilons(model, program: str) -> int:
    """Give every InstanceNormalization that paddle2onnx wrote for a ``group_norm`` the op's ``epsilon``;
    returns how many nodes it rewrote.

    paddle2onnx 2.1.0 writes ``group_norm(x, G, eps)`` as ``Reshape(x, [0, G, -1])`` ->
    ``InstanceNormalization(scale 1, bias 0, epsilon)`` -> ``Reshape`` back -> ``Mul`` weight -> ``Add`` bias,
    which is group normalization by definition -- but it reads ``epsilon`` as a float32 attribute, while
    Paddle 3 stores it as a float64 one, so the ONNX attribute is left uninitialized (seen: 2.8e22, which
    divides every normalized value by ~1.7e11: FCOS's and GFL's heads). Put back, the graph computes what
    Paddle's kernel computes (which also reads ``epsilon`` as a float).

    Which InstanceNormalization came from which ``group_norm`` is not recorded, so this repairs only when
    that does not matter: every ``group_norm`` of the program has the same ``epsilon``, and any
    ``instance_norm`` (which paddle2onnx converts with its own epsilon, correctly) has that one too.

    Raises:
        ExportError: the program's normalizations have different epsilons, or the graph does not have one
            InstanceNormalization per ``group_norm`` and ``instance_norm``.
    """
    group = [float(a["epsilon"]) for a in program_attributes(program, "group_norm")]
    if not group:
        return 0
    instance = [float(a.get("epsilon", 1e-5)) for a in program_attributes(program, "instance_norm")]
    nodes = [n for n in _all_nodes(model.graph) if n.op_type == "InstanceNormalization"]
    if len(set(group) | set(instance)) > 1:
        raise ExportError(f"paddle2onnx loses group_norm's epsilon, and the program's group_norm/instance_norm "
                          f"ops have different ones ({sorted(set(group) | set(instance))}), so they cannot be put "
                          "back; export without --onnx for Paddle Inference")
    if len(nodes) != len(group) + len(instance):
        raise ExportError(f"paddle2onnx wrote {len(nodes)} InstanceNormalization nodes for {len(group)} group_norm "
                          f"and {len(instance)} instance_norm ops; cannot repair group_norm's epsilon")
    from onnx import helper
    epsilon = group[0]
    for node in nodes:
        kept = [a for a in node.attribute if a.name != "epsilon"]
        del node.attribute[:]
        node.attribute.extend(kept + [helper.make_attribute("epsilon", epsilon)])
    return len(nodes)


def repair_deform_conv_offset_groups(model, program: str) -> int:
    """Give every DeformConv that paddle2onnx wrote for a ``deformable_conv`` the op's ``deformable_groups`` as
    ``offset_group``; returns how many nodes it rewrote.

    paddle2onnx 2.1.0 writes ``deformable_conv(x, offset, filter, mask; deformable_groups = G)`` as
    ``DeformConv(x, filter, offset, 0, mask)`` without ``offset_group``, which ONNX reads as 1: with G > 1 the
    offset's ``2 G kH kW`` channels do not fit, and ONNX Runtime refuses the node (``Offset channel count must
    be offset_group * 2 * kH * kW``). Both read the offset as ``[N, G, kH, kW, (dy, dx), oH, oW]``, so
    ``offset_group = G`` is the op.

    Which DeformConv came from which ``deformable_conv`` is not recorded, so this repairs only when that does
    not matter: every ``deformable_conv`` of the program has the same ``deformable_groups``.

    Raises:
        ExportError: the program's deformable convs have different ``deformable_groups``, or the graph does not
            have one DeformConv per ``deformable_conv``.
    """
    groups = sorted({int(a.get("deformable_groups", 1)) for a in program_attributes(program, "deformable_conv")})
    nodes = [n for n in _all_nodes(model.graph) if n.op_type == "DeformConv"]
    if not nodes or groups == [1]:
        return 0
    if len(groups) > 1:
        raise ExportError(f"paddle2onnx loses deformable_conv's deformable_groups, and the program's deformable "
                          f"convs have different ones ({groups}), so they cannot be put back; export without "
                          "--onnx for Paddle Inference")
    if len(nodes) != len(program_attributes(program, "deformable_conv")):
        raise ExportError(f"paddle2onnx wrote {len(nodes)} DeformConv nodes for "
                          f"{len(program_attributes(program, 'deformable_conv'))} deformable_conv ops; cannot put "
                          "back their deformable_groups")
    from onnx import helper
    for node in nodes:
        kept = [a for a in node.attribute if a.name != "offset_group"]
        del node.attribute[:]
        node.attribute.extend(kept + [helper.make_attribute("offset_group", groups[0])])
    return len(nodes)


# 2 ** 53: every integer up to it in magnitude is a float64 exactly
EXACT_IN_DOUBLE = 2 ** 53


def integer_max_in_int64(model) -> int:
    """Compute paddle2onnx's float64 maximum of integers in int64; returns how many ``Max`` nodes it rewrote.

    Before: ``Cast(n, to=DOUBLE) -> Max(., c) -> Cast(to=INT64)``, ``n`` an integer tensor, ``c`` a float64
    constant. After: ``Cast(n, to=INT64) -> Max(., int64(c)) -> Cast(to=INT64)``.

    paddle2onnx writes ``tile`` with repeats given as a list of tensors (DETR's queries, tiled to the batch) so:
    the count of leading ones it pads the repeats with is ``max(rank - len(repeats), 0)`` in float64.
    OpenVINO cannot evaluate a float64 ``Maximum`` while it reads the file, so the length of the repeats, the
    rank of the tiled tensor and of everything after it are unknown to it, and it fails on the first node that
    needs a rank (``ArgMax``: ``Normalized axis of TopK is unknown``; its CPU plugin then on ``Softmax``). In
    int64 it folds the count to a constant and every rank is known.

    Conditions, all checked: ``n``'s type is a known integer type, each rewritten Cast feeds only the Max, the
    Max feeds only Casts to INT64 (no graph output), every other Max input is a float64 constant holding
    integers of magnitude <= 2**53, the model's opset is >= 12 (Max on int64). Exact: both compute
    ``max(n, c)`` for every ``|n| <= 2**53`` (shape arithmetic; beyond that the float64 form rounds ``n``).
    """
    from onnx import TensorProto, numpy_helper, shape_inference
    graph = model.graph
    opset = max([o.version for o in model.opset_import if o.domain in ("", "ai.onnx")] or [0])
    producers = {out: node for node in graph.node for out in node.output}
    consumers: Dict[str, list] = {}
    for node in graph.node:
        for name in node_inputs(node):
            consumers.setdefault(name, []).append(node)
    outputs = {o.name for o in graph.output}
    constants = {t.name: t for t in graph.initializer}
    constants.update({n.output[0]: n.attribute[0].t for n in graph.node
                      if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value"})

    def to_double(name):
        node = producers.get(name)
        single = len(consumers.get(name, [])) == 1 and name not in outputs
        return node if single and node is not None and node.op_type == "Cast" and \
            node.attribute[0].i == TensorProto.DOUBLE else None

    def integral(name):
        if name not in constants or constants[name].data_type != TensorProto.DOUBLE:
            return None
        value = numpy_helper.to_array(constants[name])
        return value if np.all(value == np.round(value)) and np.all(np.abs(value) <= EXACT_IN_DOUBLE) else None

    candidates = []
    for node in graph.node:
        if node.op_type != "Max" or opset < 12 or node.output[0] in outputs:
            continue
        users = consumers.get(node.output[0], [])
        if not users or any(u.op_type != "Cast" or u.attribute[0].i != TensorProto.INT64 for u in users):
            continue
        casts = [to_double(name) for name in node.input]
        values = [integral(name) if cast is None else None for name, cast in zip(node.input, casts)]
        if any(c is None and v is None for c, v in zip(casts, values)) or all(c is None for c in casts):
            continue
        candidates.append((node, casts, values))
    if not candidates:
        return 0
    typed = shape_inference.infer_shapes(model)
    types = {v.name: v.type.tensor_type.elem_type for v in list(typed.graph.value_info) + list(typed.graph.input)}
    types.update({t.name: t.data_type for t in graph.initializer})
    integers = (TensorProto.INT8, TensorProto.INT16, TensorProto.INT32, TensorProto.INT64, TensorProto.UINT8,
                TensorProto.UINT16, TensorProto.UINT32)
    rewritten, added, replaced = 0, set(), set()
    for node, casts, values in candidates:
        if any(c is not None and types.get(c.input[0]) not in integers for c in casts):
            continue
        for index, (cast, value) in enumerate(zip(casts, values)):
            if cast is not None:
                cast.attribute[0].i = TensorProto.INT64
            else:
                replaced.add(node.input[index])
                name = f"{node.input[index]}.int64"
                if name not in added:
                    graph.initializer.append(numpy_helper.from_array(value.astype(np.int64), name))
                    added.add(name)
                node.input[index] = name
        rewritten += 1
    if rewritten:  # a float64 Constant node the rewrite left without a reader goes
        used = {name for n in graph.node for name in node_inputs(n)} | outputs
        keep = [n for n in graph.node
                if n.op_type != "Constant" or n.output[0] not in replaced or n.output[0] in used]
        del graph.node[:]
        graph.node.extend(keep)
    return rewritten


def node_inputs(node) -> List[str]:
    """A node's inputs and the outer values its subgraphs (If and Loop bodies) read."""
    names = list(node.input)
    for attribute in node.attribute:
        for sub in ([attribute.g] if attribute.HasField("g") else []) + list(attribute.graphs):
            inner = {o for n in sub.node for o in n.output} | {i.name for i in sub.input} | \
                {t.name for t in sub.initializer}
            names += [name for n in sub.node for name in node_inputs(n) if name not in inner]
    return names


def topological_sort(graph) -> None:
    """Order ``graph``'s nodes so that each comes after the producers of its inputs (a fused conv takes its
    add's place in the data flow, which can be later in the list than the conv)."""
    produced = {name for name in [i.name for i in graph.input] + [t.name for t in graph.initializer]}
    pending, ordered = list(graph.node), []
    while pending:
        ready = [n for n in pending if all(not i or i in produced for i in node_inputs(n))]
        if not ready:  # a cycle or an input from outside (a subgraph's): keep the rest as it was
            ordered += pending
            break
        chosen = {id(n) for n in ready}
        ordered += ready
        produced.update(o for n in ready for o in n.output)
        pending = [n for n in pending if id(n) not in chosen]
    del graph.node[:]
    graph.node.extend(ordered)


def fuse_conv_bias_adds(model) -> int:
    """Put each conv bias that paddle2onnx writes as ``Add(Conv(x, W), Reshape(b, [1, C, 1, 1]))`` back into
    the Conv's bias input; returns how many. Exact (the same sum); fewer nodes for every ONNX runtime.

    paddle2onnx's own clean-up (onnxoptimizer) fails on these models, so the Reshape+Add pairs of every
    folded conv (94 in PP-YOLOE+ s) would stay. Only an Add that is the conv output's one consumer, with
    a constant per-output-channel operand, is fused.
    """
    from onnx import numpy_helper
    graph = model.graph
    constants = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            constants[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    producers = {out: node for node in graph.node for out in node.output}
    consumers: Dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    graph_outputs = {o.name for o in graph.output}

    def constant(name, depth=0):
        """The value of ``name`` when it is a constant, through Identity and Reshape of constants."""
        if name in constants:
            return constants[name]
        node = producers.get(name)
        if node is None or depth > 4:
            return None
        if node.op_type == "Identity":
            return constant(node.input[0], depth + 1)
        if node.op_type == "Reshape":
            data, shape = constant(node.input[0], depth + 1), constant(node.input[1], depth + 1)
            if data is not None and shape is not None:
                return data.reshape([int(d) for d in shape])
        return None

    fused, dead = 0, set()
    for conv in [n for n in graph.node if n.op_type == "Conv" and len(n.input) >= 2]:
        out = conv.output[0]
        users = consumers.get(out, [])
        if out in graph_outputs or len(users) != 1 or users[0].op_type != "Add":
            continue
        add = users[0]
        other = add.input[1] if add.input[0] == out else add.input[0]
        value = constant(other)
        weight = constant(conv.input[1])
        if value is None or weight is None or value.ndim > 4 or value.size != weight.shape[0]:
            continue
        padded = [1] * (4 - value.ndim) + list(value.shape)
        if padded != [1, weight.shape[0], 1, 1]:
            continue  # not one value per output channel
        bias = value.reshape([-1]).astype(weight.dtype)
        if len(conv.input) > 2 and conv.input[2]:
            old = constant(conv.input[2])
            if old is None:
                continue
            bias = bias + old
        name = f"{conv.output[0]}.bias"
        graph.initializer.append(numpy_helper.from_array(bias, name))
        del conv.input[2:]
        conv.input.append(name)
        conv.output[0] = add.output[0]
        dead.add(id(add))
        fused += 1
    if fused:
        keep = [n for n in graph.node if id(n) not in dead]
        used = {name for n in keep for name in node_inputs(n)} | graph_outputs
        for _ in range(3):  # the bias's Reshape, then its Identity and Constant inputs, lose their last use
            keep = [n for n in keep
                    if n.op_type not in ("Reshape", "Identity", "Constant") or any(o in used for o in n.output)]
            used = {name for n in keep for name in node_inputs(n)} | graph_outputs
        del graph.node[:]
        graph.node.extend(keep)
    return fused


def node_counts(onnx_path: str) -> Dict[str, int]:
    """Node counts by op type, subgraphs (If/Loop bodies) included."""
    onnx = require_module("onnx", "ONNX support", "onnx", ExportError)
    model = onnx.load(onnx_path, load_external_data=False)
    counts: Counter = Counter()

    def walk(graph):
        for node in graph.node:
            counts[node.op_type] += 1
            for attribute in node.attribute:
                if attribute.g is not None and attribute.g.node:
                    walk(attribute.g)
                for sub in attribute.graphs:
                    walk(sub)
    walk(model.graph)
    return dict(counts)


def session(onnx_path: str, threads: int = 2):
    """An ONNX Runtime CPU session (:func:`ppfuse.runtime.onnx_runtime.create_session`)."""
    require_module("onnxruntime", "ONNX support", "onnx", ExportError)
    return create_session(onnx_path, threads)


def run_onnx(sess, inputs: Dict[str, np.ndarray]) -> List[np.ndarray]:
    names = [i.name for i in sess.get_inputs()]
    return sess.run(None, {n: inputs[n] for n in names})


def order_tied_rows(reference: Sequence[np.ndarray], candidate: Sequence[np.ndarray], atol: Sequence[float],
                    rtol: float, most: int = 512) -> Tuple[List[np.ndarray], int]:
    """``candidate``'s raw ``(boxes [N, M, 4], scores [N, C, M])`` with the rows (a box and its class scores) that
    are another order of the reference's near-tied rows put in the reference's order; returns ``(candidate,
    rows moved)``. Anything else comes back as it was, for the comparison that follows to judge.

    A top-k before NMS (RetinaNet's and YOLOF's ``nms_pre``: each level's best anchors by their best class score)
    lists anchors whose scores tie to fp32 rounding in whichever order each runtime's rounding gives; NMS takes
    them as a set. A row within tolerance (``atol`` per output, absolute, plus ``rtol`` of the reference's value)
    of the reference's row at its position stays. The others (at most ``most`` per image) are paired one to one
    with a reference row they fit at another such position -- and only where the reference's best scores at the
    two positions tie within the scores' tolerance, so that either order is the top-k's. Values beyond 1e30 or
    not finite (exp() overflowing differently in each runtime) count as fitting, as in the comparison.
    """
    if len(reference) != 2 or len(candidate) != 2:
        return list(candidate), 0
    ref_boxes, ref_scores = (np.asarray(a, np.float64) for a in reference)
    boxes, scores = (np.asarray(a, np.float64) for a in candidate)
    if (ref_boxes.ndim != 3 or ref_boxes.shape[-1] != 4 or ref_scores.ndim != 3 or boxes.shape != ref_boxes.shape
            or scores.shape != ref_scores.shape or ref_scores.shape[2] != ref_boxes.shape[1]):
        return list(candidate), 0

    def rows(b, sc):  # [M, 4 + C], clipped as the comparison leaves such values out
        values = np.concatenate([b, sc.T], axis=1)
        return np.clip(np.nan_to_num(values, nan=0.0, posinf=1e30, neginf=-1e30), -1e30, 1e30)
    width = np.array([atol[0]] * 4 + [atol[1]] * ref_scores.shape[1])
    moved = 0
    out_boxes, out_scores = boxes.copy(), scores.copy()
    for n in range(ref_boxes.shape[0]):
        want, got = rows(ref_boxes[n], ref_scores[n]), rows(boxes[n], scores[n])
        limit = width + rtol * np.abs(want)  # [M, D]
        bad = np.flatnonzero((np.abs(got - want) > limit).any(axis=1))
        if len(bad) == 0 or len(bad) > most:
            continue
        misfit = (np.abs(got[bad][None, :, :] - want[bad][:, None, :]) / limit[bad][:, None, :]).max(axis=2)
        best = want[bad, 4:].max(axis=1)  # the reference's best score at each such position
        tie = atol[1] + rtol * np.abs(best)
        free, source = np.ones(len(bad), bool), np.empty(len(bad), int)
        for a in range(len(bad)):  # reference position bad[a] takes the candidate row at bad[b]
            fits = free & (misfit[a] <= 1.0) & (np.abs(best - best[a]) <= tie[a])
            if not fits.any():
                break
            b = int(np.flatnonzero(fits)[np.argmin(misfit[a][fits])])
            free[b], source[a] = False, b
        else:
            out_boxes[n, bad] = boxes[n, bad[source]]
            out_scores[n][:, bad] = scores[n][:, bad[source]]
            moved += len(bad)
    if not moved:
        return list(candidate), 0
    return [out_boxes.astype(np.asarray(candidate[0]).dtype), out_scores.astype(np.asarray(candidate[1]).dtype)], moved


def check_extra_outputs(model_dir: str, onnx_path: str, inputs: Dict[str, np.ndarray], atol: float = 1e-4,
                        rtol: float = 1e-4, keep: int = 2,
                        exact: Optional[Callable[[], Sequence[np.ndarray]]] = None) -> Optional[Tuple[bool, str]]:
    """The outputs after the first ``keep`` of ``model_dir``'s program (Paddle Inference) and of ``onnx_path``
    (ONNX Runtime) compared (:func:`compare_relative`); then ``onnx_path`` keeps only its first ``keep``
    outputs. None when there are no extra outputs.

    Beyond tolerance, with ``exact`` (the same outputs evaluated in float64, called only then), the float64
    criterion decides (:func:`ppfuse.core.verify.rounding_check`): ONNX Runtime passes when it is no further
    from float64 than twice Paddle Inference's own fp32 error: a model that amplifies fp32 rounding (PP-YOLO
    ResNet50-vd-DCN on random weights, in both runtimes alike) is not a wrong conversion."""
    onnx = require_module("onnx", "ONNX support", "onnx", ExportError)
    model = onnx.load(onnx_path)
    if len(model.graph.output) <= keep:
        return None
    paddle_out = list(PaddleInference(model_dir).run(inputs).values())[keep:]
    onnx_out = run_onnx(session(onnx_path), inputs)[keep:]
    result = compare_relative(paddle_out, onnx_out, atol, rtol, exact)  # exact: the extra outputs' values
    del model.graph.output[keep:]
    onnx.save(model, onnx_path)
    return result


def check_raw_outputs(model_dir: str, onnx_path: str, inputs: Dict[str, np.ndarray], atol: float = 1e-4,
                      rtol: float = 1e-4) -> Tuple[bool, str]:
    """Every output of ``model_dir``'s program (Paddle Inference) and of ``onnx_path`` (ONNX Runtime) compared
    (:func:`compare_relative`): a program that ends at the boxes and scores NMS takes."""
    paddle_out = list(PaddleInference(model_dir).run(inputs).values())
    onnx_out = run_onnx(session(onnx_path), inputs)
    if len(paddle_out) != len(onnx_out):
        return False, f"{len(onnx_out)} outputs, Paddle Inference gives {len(paddle_out)}"
    return compare_relative(paddle_out, onnx_out, atol, rtol)


def compare_relative(paddle_out: Sequence[np.ndarray], onnx_out: Sequence[np.ndarray], atol: float,
                     rtol: float, exact: Optional[Callable[[], Sequence[np.ndarray]]] = None) -> Tuple[bool, str]:
    """Outputs each divided by the reference's largest magnitude, compared with ``atol``/``rtol`` -- rows of a
    top-k's near-tied scores in the reference's order (:func:`order_tied_rows`) -- and beyond them, given
    ``exact`` (the outputs in float64), by the float64 criterion (:func:`_judged`): ``(ok, description)``."""
    onnx_out, moved = order_tied_rows(paddle_out, onnx_out, [atol * _largest(v) for v in paddle_out], rtol)
    reference, candidate, kept, skipped = {}, {}, [], 0
    for i, (want, got) in enumerate(zip(paddle_out, onnx_out)):
        want, got = np.asarray(want, np.float64), np.asarray(got, np.float64)
        # random weights overflow exp() to inf in one runtime and to 3e38 (then NaN) in the other: values
        # beyond 1e30 on either side are left out, and counted
        finite = np.isfinite(want) & np.isfinite(got) & (np.abs(want) < 1e30) & (np.abs(got) < 1e30)
        skipped += int((~finite).sum())
        scale = max(float(np.abs(want[finite]).max()), 1e-12) if finite.any() else 1.0
        reference[f"out{i}"], candidate[f"out{i}"] = want[finite] / scale, got[finite] / scale
        kept.append((finite, scale))
    result = _judged(reference, candidate, atol, rtol, exact, kept)
    note = f" ({skipped} values beyond 1e30 or not finite left out)" if skipped else ""
    if moved:
        note += f" ({moved} rows of near-tied best scores compared in Paddle Inference's order)"
    return result.ok, "relative to each output's largest value: " + result.summary().splitlines()[0] + note


def _judged(reference: Dict[str, np.ndarray], candidate: Dict[str, np.ndarray], atol: float, rtol: float,
            exact: Optional[Callable[[], Sequence[np.ndarray]]],
            kept: Sequence[Tuple[Optional[np.ndarray], float]]):
    """ONNX Runtime's ``candidate`` against Paddle Inference's ``reference`` (``{out<i>: values}``, each output's
    values selected by a mask (None: all, in their shape) and divided by a scale, ``kept[i]``): within
    ``atol``/``rtol``, or beyond them by the float64 criterion when ``exact`` gives the outputs in float64
    (selected and scaled the same way)."""
    if exact is None:
        return compare(reference, candidate, atol, rtol)

    def float64_outputs():
        values = list(exact())
        if len(values) != len(kept):
            raise VerificationError(f"the float64 evaluation gave {len(values)} outputs for {len(kept)} compared")
        outputs = {}
        for i, (value, (mask, scale)) in enumerate(zip(values, kept)):
            value = np.asarray(value, np.float64)
            shape = list(reference[f"out{i}"].shape if mask is None else mask.shape)
            if list(value.shape) != shape:
                raise VerificationError(f"the float64 evaluation's output {i} has the shape {list(value.shape)}, "
                                        f"the programs' {shape}")
            outputs[f"out{i}"] = (value if mask is None else value[mask]) / scale
        return outputs
    return judge(reference, candidate, atol, rtol, float64_outputs, name="Paddle Inference")


def _largest(values) -> float:
    """The largest finite magnitude below 1e30 of ``values`` (1.0 when there is none), as outputs are scaled."""
    values = np.asarray(values, np.float64)
    finite = np.isfinite(values) & (np.abs(values) < 1e30)
    return max(float(np.abs(values[finite]).max()), 1e-12) if finite.any() else 1.0


def name_outputs(onnx_path: str, names: Sequence[str]) -> None:
    """Give the graph's outputs ppfuse's names (``bbox``, ``bbox_num`` / ``boxes``, ``scores``) through Identity
    nodes, so a reader of the file sees them; nothing when ``names`` does not fit the output count."""
    onnx = require_module("onnx", "ONNX support", "onnx", ExportError)
    model = onnx.load(onnx_path)
    outputs = model.graph.output
    if len(names) != len(outputs) or [o.name for o in outputs] == list(names):
        return
    for output, name in zip(outputs, names):
        model.graph.node.append(onnx.helper.make_node("Identity", [output.name], [name]))
        output.name = name
    onnx.save(model, onnx_path)


def check_against_paddle(model_dir: str, onnx_path: str, inputs: Dict[str, np.ndarray], box_atol: float,
                         with_nms: bool = True, relative: bool = False, nms_after: Optional[Callable] = None,
                         score_atol: float = 1e-4, exact: Optional[Callable[[], Sequence[np.ndarray]]] = None):
    """ONNX Runtime's detections against Paddle Inference's on the same inputs (each takes the ones it has):
    ``(ok, description)``; detections by :func:`pair_detections` (scores within ``score_atol``). ``nms_after``:
    the NMS that follows the ONNX graph (``(boxes, scores) -> (bbox, bbox_num)``,
    :class:`ppfuse.runtime.rotated_nms.MultiClassNMS`), applied to its outputs first.

    Raw exports (``--no_nms``) are compared output by output with ``box_atol`` (and rtol 1e-4), rows of a
    top-k's near-tied scores in Paddle Inference's order (:func:`order_tied_rows`), or with ``relative`` each
    output divided by the reference's largest magnitude first (a head's outputs); beyond that, with ``exact``
    (the raw outputs in float64), by the float64 criterion as in :func:`check_extra_outputs`.
    """
    paddle_out = list(PaddleInference(model_dir).run(inputs).values())
    onnx_out = run_onnx(session(onnx_path), inputs)
    if nms_after is not None:
        onnx_out = list(nms_after(*onnx_out))
    if with_nms:
        return pair_detections(paddle_out, onnx_out, box_atol, score_atol)
    if len(paddle_out) != len(onnx_out):
        return False, f"{len(onnx_out)} outputs, Paddle Inference gives {len(paddle_out)}"
    moved = 0
    if not relative:  # the boxes and scores NMS would take: a top-k's near ties in Paddle Inference's order
        onnx_out, moved = order_tied_rows(paddle_out, onnx_out, [box_atol, RAW_SCORE_ATOL], 1e-4)
    scales = [max(float(np.abs(v).max()), 1e-12) if relative and v.size else 1.0 for v in paddle_out]
    result = _judged({f"out{i}": v / s for i, (v, s) in enumerate(zip(paddle_out, scales))},
                     {f"out{i}": np.asarray(v) / s for i, (v, s) in enumerate(zip(onnx_out, scales))},
                     1e-4 if relative else box_atol, 1e-4, exact,
                     [(None, s) for s in scales])
    note = f" ({moved} rows of near-tied best scores compared in Paddle Inference's order)" if moved else ""
    return result.ok, result.summary().splitlines()[0] + note


def fold_batch_norms(onnx_path: str, out_path: str) -> Dict[str, object]:
    """Fold every BatchNormalization fed only by a Conv (initializer weights) into that Conv.

    Returns ``{"folded": n, "left": {bn node name: reason}}``. The graph is
    otherwise unchanged; the folded Conv takes the BN's output name.
    """
    onnx = require_module("onnx", "ONNX support", "onnx", ExportError)
    from onnx import numpy_helper
    model = onnx.load(onnx_path)
    graph = model.graph
    constants = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    # paddle2onnx writes weights as Constant nodes, other exporters as initializers
    constants.update({node.output[0]: numpy_helper.to_array(attr.t) for node in graph.node
                      if node.op_type == "Constant" for attr in node.attribute if attr.name == "value"})
    producers = {out: node for node in graph.node for out in node.output}
    consumers: Counter = Counter(name for node in graph.node for name in node.input)
    consumers.update(o.name for o in graph.output)
    folded, left, drop = 0, {}, []
    for bn in list(graph.node):
        if bn.op_type != "BatchNormalization":
            continue
        name = bn.name or bn.output[0]
        conv = producers.get(bn.input[0])
        if conv is None or conv.op_type != "Conv":
            left[name] = "no Conv before it"
            continue
        if consumers[bn.input[0]] != 1:
            left[name] = "the Conv output is also used elsewhere"
            continue
        if len(bn.output) > 1 and any(bn.output[1:]):
            left[name] = "training-mode BatchNormalization (extra outputs)"
            continue
        params = [conv.input[1]] + list(bn.input[1:5]) + ([conv.input[2]] if len(conv.input) > 2 else [])
        if not all(p in constants for p in params):
            left[name] = "weights or statistics are not constants"
            continue
        epsilon = next((a.f for a in bn.attribute if a.name == "epsilon"), 1e-5)
        group = next((a.i for a in conv.attribute if a.name == "group"), 1)
        arrays = {p: constants[p] for p in params}
        scale, beta, mean, var = (paddle.to_tensor(arrays[p]) for p in bn.input[1:5])
        weight = paddle.to_tensor(arrays[conv.input[1]])
        bias = paddle.to_tensor(arrays[conv.input[2]]) if len(conv.input) > 2 else None
        kernel, new_bias = kernels.fold_bn(weight, bias, mean, var, scale, beta, epsilon, groups=group)
        weight_name, bias_name = conv.input[1] + "_bnfolded", (bn.name or bn.output[0]) + "_bias_bnfolded"
        graph.initializer.append(numpy_helper.from_array(kernel.numpy(), weight_name))
        graph.initializer.append(numpy_helper.from_array(new_bias.numpy(), bias_name))
        new_inputs = [conv.input[0], weight_name, bias_name]
        del conv.input[:]
        conv.input.extend(new_inputs)
        conv.output[0] = bn.output[0]
        drop.append(bn)
        folded += 1
    for node in drop:
        graph.node.remove(node)
    # drop the constants only the folded nodes read
    used = {name for node in graph.node for name in node.input} | {o.name for o in graph.output}
    for node in [n for n in graph.node if n.op_type == "Constant" and n.output[0] not in used]:
        graph.node.remove(node)
    keep = [i for i in graph.initializer if i.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep)
    onnx.checker.check_model(model)
    onnx.save(model, out_path)
    return {"folded": folded, "left": left}


def random_inputs(sess, shapes: Optional[Dict[str, List[int]]] = None, seed: int = 0) -> Dict[str, np.ndarray]:
    """Generated float inputs for every input of an ONNX session; dynamic dims from ``shapes`` or 1."""
    rng = np.random.RandomState(seed)
    feeds = {}
    for spec in sess.get_inputs():
        shape = (shapes or {}).get(spec.name) or [d if isinstance(d, int) and d > 0 else 1 for d in spec.shape]
        dtype = {"tensor(float)": "float32", "tensor(double)": "float64"}.get(spec.type)
        if dtype is None:
            raise ExportError(f"input {spec.name}: type {spec.type} -- give real inputs for non-float models")
        feeds[spec.name] = rng.uniform(0, 1, shape).astype(dtype)
    return feeds


def verify_fold(original_path: str, folded_path: str, shapes=None, atol: float = 1e-5, rtol: float = 1e-5):
    """ONNX Runtime outputs of the folded model against the unfused one, relative to each output's scale."""
    before, after = session(original_path), session(folded_path)
    feeds = random_inputs(before, shapes)
    reference = {f"out{i}": v / max(float(np.abs(v).max()), 1e-12) for i, v in enumerate(run_onnx(before, feeds))}
    scales = {f"out{i}": max(float(np.abs(v).max()), 1e-12) for i, v in enumerate(run_onnx(before, feeds))}
    candidate = {k: v / scales[k] for k, v in zip(reference, run_onnx(after, feeds))}
    return compare(reference, candidate, atol, rtol)
