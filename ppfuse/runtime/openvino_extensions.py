"""ONNX operators OpenVINO's ONNX front end has no conversion rule for, given to ``openvino.convert_model``
as front-end extensions (:func:`onnx_extensions`).

``DeformConv`` (opset 19; paddle2onnx writes Paddle's ``deformable_conv`` as it: TTFNet, CenterNet) becomes
OpenVINO's ``DeformableConvolution`` (opset 8), plus an ``Add`` of the bias::

    DeformConv(X, W, offset[, B][, mask]; strides, pads, dilations, group, offset_group)
      -> DeformableConvolution(X, offset, W[, mask]; strides, pads_begin = pads[:2], pads_end = pads[2:],
                               dilations, group, deformable_group = offset_group,
                               bilinear_interpolation_pad = true)  [+ B as [1, C_out, 1, 1]]

Both read ``offset`` as ``[N, offset_group, kH, kW, (dy, dx), oH, oW]`` and ``mask`` as ``[N, offset_group,
kH, kW, oH, oW]``. ``bilinear_interpolation_pad = true`` is ONNX's sampling: a point within one pixel of the
image interpolates against zeros, a point further out is zero (``false`` samples points near the border
otherwise and fails tests/test_openvino_extensions.py against ONNX Runtime and Paddle).
A node the mapping does not handle (not 2-D, offset or mask channels that do not fit ``offset_group`` and the
kernel, a ``kernel_shape`` that is not W's) is refused in one line rather than guessed.
"""
from __future__ import annotations

from typing import Callable, List, Optional, Sequence

import numpy as np

__all__ = ["onnx_extensions", "deform_conv"]


def _static(output) -> Optional[List[int]]:
    """An OpenVINO output's shape as a list of ints, or ``None`` when any dimension is dynamic."""
    shape = output.get_partial_shape()
    return [d.get_length() for d in shape] if shape.is_static else None


def _rank(output) -> Optional[int]:
    rank = output.get_partial_shape().rank
    return None if rank.is_dynamic else rank.get_length()


def _attribute(context, name: str, default):
    """An ONNX attribute, or ``default`` when the node has none (OpenVINO's own default must be a value)."""
    return context.get_attribute(name) if context.has_attribute(name) else default


def _present(context, index: int) -> bool:
    """Whether optional input ``index`` is given (an empty ONNX input name arrives as a ``NullNode``)."""
    return context.get_input_size() > index and \
        context.get_input(index).get_node().get_type_name() != "NullNode"


def deform_conv(context, refuse: Callable[[str], Exception]):
    """OpenVINO outputs of one ONNX ``DeformConv`` node (``context``: OpenVINO's ``NodeContext``).

    Raises:
        the exception ``refuse(line)`` returns, for a node the mapping does not handle.
    """
    import openvino.opset8 as ops

    if context.get_input_size() < 3:
        raise refuse(f"DeformConv with {context.get_input_size()} inputs: it needs X, W and offset")
    data, weight, offset = (context.get_input(i) for i in range(3))
    weight_shape = _static(weight)
    kernel = list(_attribute(context, "kernel_shape", weight_shape[2:] if weight_shape else []))
    ranks = {"X": _rank(data), "W": _rank(weight)}
    spatial = {name: rank - 2 for name, rank in ranks.items() if rank is not None}
    for name in ("kernel_shape", "strides", "dilations", "pads"):
        if context.has_attribute(name):
            spatial[name] = len(context.get_attribute(name)) // (2 if name == "pads" else 1)
    if any(n != 2 for n in spatial.values()):
        wrong = next(n for n in spatial.values() if n != 2)
        raise refuse(f"DeformConv of {wrong}-D input (ranks and attribute "
                     f"lengths {spatial}): OpenVINO's DeformableConvolution is 2-D only; run it in ONNX Runtime")
    strides = [int(v) for v in _attribute(context, "strides", [1, 1])]
    dilations = [int(v) for v in _attribute(context, "dilations", [1, 1])]
    pads = [int(v) for v in _attribute(context, "pads", [0, 0, 0, 0])]
    group = int(_attribute(context, "group", 1))
    offset_group = int(_attribute(context, "offset_group", 1))
    if group < 1 or offset_group < 1 or min(strides + dilations) < 1 or min(pads) < 0:
        raise refuse(f"DeformConv group {group}, offset_group {offset_group}, strides {strides}, dilations "
                     f"{dilations}, pads {pads}: not a valid DeformConv; fix the exporter's attributes")
    if weight_shape and kernel != weight_shape[2:]:
        raise refuse(f"DeformConv kernel_shape {kernel} but W is {weight_shape}: which kernel is meant is not "
                     "known; fix the exporter's kernel_shape")
    mask = context.get_input(4) if _present(context, 4) else None
    if kernel:
        points = offset_group * kernel[0] * kernel[1]
        for name, value, per_point in (("offset", offset, 2), ("mask", mask, 1)):
            shape = value.get_partial_shape() if value is not None else None
            if shape is not None and shape.rank.is_static and shape.rank.get_length() == 4 and shape[1].is_static \
                    and shape[1].get_length() != points * per_point:
                raise refuse(f"DeformConv offset_group {offset_group}: its {name} has {shape[1].get_length()} "
                             f"channels, not offset_group x kH x kW{' x 2' if per_point == 2 else ''} = "
                             f"{points * per_point} (paddle2onnx 2.1 drops deformable_groups: re-export with "
                             "ppfuse, which puts offset_group back)")
    output = ops.deformable_convolution(data, offset, weight, strides, pads[:2], pads[2:], dilations, mask=mask,
                                        group=group, deformable_group=offset_group,
                                        bilinear_interpolation_pad=True)
    if _present(context, 3):
        bias = ops.unsqueeze(context.get_input(3), ops.constant(np.array([0, 2, 3], dtype=np.int64)))
        output = ops.add(output, bias)
    return [output.output(0)]


def onnx_extensions(refusals: List[str]) -> Sequence[object]:
    """The front-end extensions for ``openvino.convert_model(path, extension=...)``. A node the mappings do
    not handle appends one line to ``refusals`` (the caller raises it: OpenVINO's own message for a failed
    conversion buries the converter's reason under its traceback) and fails the conversion."""
    from openvino.frontend.onnx import ConversionExtension

    def refuse(line: str) -> Exception:
        refusals.append(line)
        return RuntimeError(line)

    return [ConversionExtension("DeformConv", lambda context: deform_conv(context, refuse))]
