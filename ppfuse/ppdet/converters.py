"""Converters for PaddleDetection's own layers, registered on import.

A model built by ppdet needs no code change: its ``RepVggBlock`` and
``MobileOneBlock`` are converted with ppfuse's math (not ppdet's
``convert_to_deploy``, which pads 1x1 kernels with a hard-coded ``[1,1,1,1]``
and tests ``if self.alpha:``), and its ``ConvBNLayer`` / ``ConvNormLayer``
declare which conv feeds which BatchNorm. Blocks are changed in place into
ppdet's own deploy layout (``conv.weight``/``conv.bias``; MobileOne's
``conv1``/``conv2``), so ppdet's ``forward`` takes its deploy path.
"""
from __future__ import annotations

from typing import List, Optional

import paddle

from ppfuse.core import kernels, layers
from ppfuse.core.blocks import RepParamMixin, repvgg_kernel_bias
from ppfuse.core.converters import register_conv_bn, register_conv_wrapper, register_converter
from ppfuse.core.registry import Rewrite, Site, require_forward
from ppfuse.errors import Unconvertible

from ppdet.modeling.backbones.cspresnet import ConvBNLayer as CSPConvBNLayer
from ppdet.modeling.backbones.cspresnet import RepVggBlock as PPDetRepVggBlock
from ppdet.modeling.backbones.mobileone import MobileOneBlock
from ppdet.modeling.layers import ConvNormLayer, DeformableConvV2


def _ppdet_alpha(block, where: str) -> Optional[paddle.Tensor]:
    """The alpha ppdet's forward applies: it runs ``if self.alpha:``, a tensor's truth value, which on
    Paddle 3.x is ``alpha > 0`` -- so for alpha <= 0 or NaN it computes ``conv1 + conv2``. Convert what
    ppdet's layer computes, not what it meant: the same truth value is asked here."""
    alpha = getattr(block, "alpha", None)
    if alpha is None:
        return None
    try:
        applied = bool(alpha)
    except Exception as exc:  # a tensor of several values has no truth value: ppdet's forward fails too
        raise Unconvertible(f"{where}.alpha: shape {list(alpha.shape)} has no truth value, so ppdet's "
                            f"forward (`if self.alpha:`) fails on it ({type(exc).__name__}); left as it is") from None
    return alpha if applied else None


def convert_ppdet_repvgg(block: PPDetRepVggBlock, site: Site) -> Optional[List[Rewrite]]:
    if hasattr(block, "conv"):
        return None
    require_forward(block, PPDetRepVggBlock, site.where)
    kernel, bias = repvgg_kernel_bias(block, block.conv1, block.conv2, None, _ppdet_alpha(block, site.where),
                                      site.where)
    new_conv = layers.conv_like(block.conv1.conv, kernel, bias)
    folded = [block.conv1.bn, block.conv2.bn]
    pairs = [(block.conv1.conv, block.conv1.bn), (block.conv2.conv, block.conv2.bn)]

    def apply():
        block.conv = new_conv
        for name in ("conv1", "conv2", "alpha"):
            if hasattr(block, name):
                delattr(block, name)
        block.alpha = None
    return [Rewrite(site.where, "ppdet.RepVggBlock", apply, folded, pairs=pairs, block=block, touched=[block])]


def convert_mobileone(block: MobileOneBlock, site: Site) -> Optional[List[Rewrite]]:
    """MobileOne: ``act(pw(act(dw(x))))`` with each of dw, pw a sum of branches."""
    if hasattr(block, "conv1") and hasattr(block, "conv2"):
        return None
    require_forward(block, MobileOneBlock, site.where)
    where, mixin = site.where, RepParamMixin
    k = block.kernel_size
    depthwise = [mixin._fuse_bn_tensor(block, b, where=f"{where}.depth_conv.{i}") for i, b in
                 enumerate(block.depth_conv)]
    scale_kernel, scale_bias = mixin._fuse_bn_tensor(block, block.rbr_1x1, where=f"{where}.rbr_1x1")
    depthwise.append((mixin._pad_1x1_to_3x3_tensor(block, scale_kernel, k), scale_bias))
    if block.rbr_identity_st1 is not None:
        depthwise.append(mixin._fuse_bn_tensor(block, block.rbr_identity_st1, kernel_size=k,
                                               groups=block.ch_in, where=f"{where}.rbr_identity_st1"))
    layers.check_centred_merge(block.depth_conv[0].conv, f"{where}.depth_conv",
                               small=[b.conv for b in list(block.depth_conv)[1:]] + [block.rbr_1x1.conv],
                               identity=block.rbr_identity_st1 is not None)
    pointwise = [mixin._fuse_bn_tensor(block, b, where=f"{where}.point_conv.{i}") for i, b in
                 enumerate(block.point_conv)]
    layers.check_centred_merge(block.point_conv[0].conv, f"{where}.point_conv",
                               small=[b.conv for b in list(block.point_conv)[1:]],
                               identity=block.rbr_identity_st2 is not None)
    if block.rbr_identity_st2 is not None:
        pointwise.append(mixin._fuse_bn_tensor(block, block.rbr_identity_st2, kernel_size=1,
                                               where=f"{where}.rbr_identity_st2"))
    conv1 = layers.conv_like(block.depth_conv[0].conv, *layers.checked_kernel(
        kernels.merge_parallel(depthwise), f"{where}.depth_conv"))
    conv2 = layers.conv_like(block.point_conv[0].conv, *layers.checked_kernel(
        kernels.merge_parallel(pointwise), f"{where}.point_conv"))
    folded = [sub for sub in block.sublayers() if layers.is_batch_norm(sub)]
    pairs = [(branch.conv, getattr(branch, 'bn', None) or branch.norm)
             for branch in list(block.depth_conv) + list(block.point_conv) + [block.rbr_1x1]]

    def apply():
        block.conv1, block.conv2 = conv1, conv2
        for name in ("depth_conv", "point_conv", "rbr_1x1", "rbr_identity_st1", "rbr_identity_st2"):
            if hasattr(block, name):
                delattr(block, name)
    return [Rewrite(where, "ppdet.MobileOneBlock", apply, folded, pairs=pairs, block=block, touched=[block])]


register_converter(PPDetRepVggBlock, convert_ppdet_repvgg)
register_converter(MobileOneBlock, convert_mobileone)
register_conv_bn(CSPConvBNLayer, "conv", "bn")
# DeformableConvV2 returns its deformable conv_dcn's output (offsets and mask come from conv_offset, which
# is not touched): ConvNormLayer(use_dcn=True)'s norm and ttf_fpn.Upsample's bn fold into conv_dcn
register_conv_wrapper(DeformableConvV2, "conv_dcn")
register_conv_bn(ConvNormLayer, "conv", "norm")

# ppdet's other conv-norm layers, each read for what its forward does: conv, then that norm, then an
# activation (module, class, (conv, norm) pairs, and when the forward applies them)
PPDET_CONV_NORM_LAYERS = [
    ("backbones.resnet", "ConvNormLayer", [("conv", "norm")],
     lambda layer: layer.norm_type in ("bn", "sync_bn")),  # dcn_v2: a DeformConv2D, folded the same way
    ("backbones.hrnet", "ConvNormLayer", [("conv", "norm")], None),
    ("backbones.darknet", "ConvBNLayer", [("conv", "batch_norm")], None),
    ("backbones.csp_darknet", "BaseConv", [("conv", "bn")], None),
    ("backbones.mobilenet_v3", "ConvBNLayer", [("conv", "bn")], None),
    ("backbones.lite_hrnet", "ConvNormLayer", [("conv", "norm")], None),
    ("backbones.mobilenet_v1", "ConvBNLayer", [("_conv", "_batch_norm")], None),
    ("backbones.blazenet", "ConvBNLayer", [("_conv", "_batch_norm")], None),
    ("backbones.shufflenet_v2", "ConvBNLayer", [("_conv", "_batch_norm")], None),
    ("backbones.lcnet", "ConvBNLayer", [("conv", "bn")], None),
    ("necks.csp_pan", "ConvBNLayer", [("conv", "bn")], None),
    ("necks.csp_pan", "DPModule", [("dwconv", "bn1"), ("pwconv", "bn2")], None),
    ("necks.blazeface_fpn", "ConvBNLayer", [("_conv", "_batch_norm")], None),
    ("heads.ssd_head", "SepConvLayer", [("dw_conv", "bn")], None),
    ("necks.ttf_fpn", "Upsample", [("dcn", "bn")], None),  # DeformableConvV2 -> BN -> relu -> interpolate
]


def _register_ppdet_conv_norm_layers() -> None:
    import importlib
    for module, name, pairs, applies in PPDET_CONV_NORM_LAYERS:
        try:
            layer_type = getattr(importlib.import_module(f"ppdet.modeling.{module}"), name)
        except (ImportError, AttributeError):  # another ppdet version: pair those by dataflow
            continue
        register_conv_bn(layer_type, pairs=pairs, applies=applies, replace=True)


_register_ppdet_conv_norm_layers()
