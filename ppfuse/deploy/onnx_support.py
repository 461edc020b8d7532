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
from collections import Counter
from typing import Dict, List, Optional

import numpy as np
import paddle

from ppfuse.core import kernels
from ppfuse.errors import ExportError, require_module
from ppfuse.export_format import ONNX_FILE, PARAMS_FILE, program_file
from ppfuse.runtime.onnx_runtime import create_session
from ppfuse.runtime.paddle_inference import PaddleInference
from ppfuse.core.verify import compare, compare_detections

__all__ = ["ONNX_FILE", "to_onnx", "node_counts", "session", "run_onnx", "check_against_paddle",
           "fold_batch_norms", "random_inputs", "verify_fold"]
DEFAULT_OPSET = 13  # Max on int64 shapes (the exact upsample's expand) needs opset >= 12


def to_onnx(model_dir: str, onnx_path: str, opset: int = DEFAULT_OPSET) -> str:
    """Convert ``model_dir``'s ``model.json``/``model.pdiparams`` to ``onnx_path`` with paddle2onnx."""
    paddle2onnx = require_module("paddle2onnx", "ONNX support", "onnx", ExportError)
    program = program_file(model_dir)
    params = os.path.join(model_dir, PARAMS_FILE)
    try:
        # optimize_tool: paddle2onnx's default, polygraphy, runs with POLYGRAPHY_AUTOINSTALL_DEPS=1 and
        # pip-installs onnx_graphsurgeon at run time, which upgraded numpy to 2.x and broke cv2 here.
        paddle2onnx.export(program, params, save_file=onnx_path, opset_version=opset, enable_onnx_checker=True,
                           enable_optimize=True, optimize_tool="onnxoptimizer")
    except Exception as exc:
        raise ExportError(f"{model_dir}: paddle2onnx failed: {type(exc).__name__}: {str(exc)[:300]}") from None
    if not os.path.exists(onnx_path):
        raise ExportError(f"{model_dir}: paddle2onnx wrote no {onnx_path}")
    onnx = require_module("onnx", "ONNX support", "onnx", ExportError)
    model = onnx.load(onnx_path)
    if fuse_conv_bias_adds(model):
        onnx.checker.check_model(model)
        onnx.save(model, onnx_path)
    return onnx_path


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
        used = {name for n in keep for name in n.input} | graph_outputs
        for _ in range(3):  # the bias's Reshape, then its Identity and Constant inputs, lose their last use
            keep = [n for n in keep
                    if n.op_type not in ("Reshape", "Identity", "Constant") or any(o in used for o in n.output)]
            used = {name for n in keep for name in n.input} | graph_outputs
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


def check_against_paddle(model_dir: str, onnx_path: str, inputs: Dict[str, np.ndarray], box_atol: float,
                         with_nms: bool = True):
    """ONNX Runtime's detections against Paddle Inference's on the same inputs: ``(ok, description)``.

    Raw exports (``--no_nms``) are compared output by output with ``box_atol``.
    """
    paddle_out = list(PaddleInference(model_dir).run(inputs).values())
    onnx_out = run_onnx(session(onnx_path), inputs)
    if with_nms:
        return compare_detections(paddle_out, onnx_out, box_atol)
    result = compare({f"out{i}": v for i, v in enumerate(paddle_out)},
                     {f"out{i}": v for i, v in enumerate(onnx_out)}, box_atol, 1e-4)
    return result.ok, result.summary().splitlines()[0]


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
