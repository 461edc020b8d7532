"""ppfuse's own converters (its blocks, ``nn.Sequential`` Conv -> BN, any ``convert_to_deploy()``)
and the default registry that holds them.

``register_converter``, ``register_conv_bn`` and ``register_conv_wrapper`` here add to
:data:`DEFAULT_REGISTRY`, the one :func:`ppfuse.convert` uses unless given another.
"""
from __future__ import annotations

import copy
from typing import List, Optional

import paddle.nn as nn

from ppfuse.core import layers
from ppfuse.core.blocks import ConvBN, QARepVggBlock, RepVggBlock
from ppfuse.core.registry import Registry, Rewrite, Site, fold_rewrite, join, require_forward, transplant
from ppfuse.errors import ConversionError, Unconvertible


def batch_norms(layer: nn.Layer) -> List[nn.Layer]:
    return [sub for sub in layer.sublayers() if layers.is_batch_norm(sub)]


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
            rewrites.append(fold_rewrite(site.index, seq, first, seq, second, join(site.where, first),
                                         join(site.where, second)))
        except Unconvertible as exc:
            site.leave(seq._sub_layers[second], str(exc))
    return rewrites or None


def convert_repvgg(block: RepVggBlock, site: Site) -> Optional[List[Rewrite]]:
    if block.deployed:
        return None
    require_forward(block, RepVggBlock, site.where)
    kernel, bias = block.get_equivalent_kernel_bias(site.where)
    pairs = [(block.conv1.conv, block.conv1.bn), (block.conv2.conv, block.conv2.bn)]
    return [Rewrite(site.where, "RepVggBlock", lambda: block.deploy_with(kernel, bias), batch_norms(block),
                    pairs=pairs, block=block, touched=[block])]


def convert_qarepvgg(block: QARepVggBlock, site: Site) -> Optional[List[Rewrite]]:
    if block.deployed:
        return None
    require_forward(block, QARepVggBlock, site.where)
    kernel, bias = block.get_equivalent_kernel_bias(site.where)
    # the 1x1 conv and the identity have no BatchNorm; the one after the sum is fed by an add, not a conv:
    # the trace confirms the 3x3 pair and that no part of the block is used from outside it
    pairs = [(block.conv1.conv, block.conv1.bn)]
    return [Rewrite(site.where, "QARepVggBlock", lambda: block.deploy_with(kernel, bias), batch_norms(block),
                    pairs=pairs, block=block, touched=[block])]


def convert_by_method(layer: nn.Layer, site: Site) -> Optional[List[Rewrite]]:
    """Any layer with ``convert_to_deploy()``: run it on a copy, swap the copy in when all is planned.

    A layer with no BatchNorm inside is taken as converted already (there is nothing to fold, and
    third-party ``convert_to_deploy`` methods are often not safe to call twice)."""
    if not batch_norms(layer):
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


def builtin_registry(name: str = "registry") -> Registry:
    """A new registry holding ppfuse's own converters."""
    registry = Registry(name)
    registry.register_converter(RepVggBlock, convert_repvgg)
    registry.register_converter(QARepVggBlock, convert_qarepvgg)
    registry.register_converter(nn.Sequential, convert_sequential, descend=True)
    registry.register_conv_bn(ConvBN, "conv", "bn")
    return registry


DEFAULT_REGISTRY = builtin_registry("ppfuse's default registry")

register_converter = DEFAULT_REGISTRY.register_converter
register_conv_bn = DEFAULT_REGISTRY.register_conv_bn
register_conv_wrapper = DEFAULT_REGISTRY.register_conv_wrapper
