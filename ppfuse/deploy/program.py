"""What a traced or saved Paddle program holds: op counts of an export's ``model.json``, inputs its
outputs depend on."""
from __future__ import annotations

import json
from collections import Counter
from typing import Dict, Sequence

from ppfuse.export_format import program_file

COUNTED_OPS = ("conv2d", "depthwise_conv2d", "deformable_conv", "conv2d_transpose", "batch_norm", "add",
               "add_tensors", "if", "nearest_interp", "multiclass_nms3", "matrix_nms")


def inputs_used(concrete, names: Sequence[str] = ("image", "im_shape", "scale_factor")) -> tuple:
    """Names of the traced inputs some output depends on (ops inside if/loop regions count as using
    everything they read)."""
    needed, stack, seen = set(), list(concrete.outputs), set()
    while stack:
        value = stack.pop()
        if value is None or not value.initialized() or value.id in seen:  # (an optional operand left out)
            continue
        seen.add(value.id)
        op = value.get_defining_op()
        if op is None:
            continue
        if op.name() == "pd_op.data":
            needed.add(op.attrs().get("name"))
            continue
        ops = [op]
        while ops:
            current = ops.pop()
            stack.extend(current.operands_source())
            for block in current.blocks():
                ops.extend(block.ops)
    return tuple(name for name in names if name in needed)


def count_ops(model_dir: str) -> Dict[str, int]:
    """Op counts of a saved PIR program (``model.json``), ops inside ``if``/loop regions included.

    Names lose their dialect prefix and the trailing ``_`` of in-place variants
    (``pd_op.batch_norm_`` counts as ``batch_norm``). ``add_tensors`` counts the
    adds whose two inputs both depend on the model's inputs -- residual
    shortcuts and re-param branch sums, as opposed to a conv's bias add (one
    input a parameter): a converted model has as many as the plain network has
    shortcuts.
    """
    path = program_file(model_dir)
    if not path.endswith(".json"):
        return {}
    with open(path) as f:
        program = json.load(f)
    counts: Counter = Counter()
    from_inputs = set()  # ids of values computed from the feeds

    def ids(values):
        values = values if isinstance(values, list) else [values]
        return [v["%"] for v in values if isinstance(v, dict) and "%" in v]

    def walk_regions(regions):
        for region in regions or []:
            for block in region.get("blocks", []):
                for op in block.get("ops", []):
                    name = op["#"].split(".")[-1].rstrip("_")
                    counts[name] += 1
                    inputs = ids(op.get("I", []))
                    if name == "data" or any(i in from_inputs for i in inputs):
                        from_inputs.update(ids(op.get("O", [])))
                    if name == "add" and len(inputs) == 2 and all(i in from_inputs for i in inputs):
                        counts["add_tensors"] += 1
                    walk_regions(op.get("regions"))
    walk_regions(program["program"]["regions"])
    return dict(counts)
