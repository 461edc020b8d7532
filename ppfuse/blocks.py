"""Re-parameterizable blocks and the mixin they share.

:class:`RepParamMixin` gives any block the three methods users of RepVGG-style
code know -- ``_fuse_bn_tensor``, ``_pad_1x1_to_3x3_tensor`` and alpha-weighted
merging -- as thin wrappers over :mod:`ppfuse.kernels` (via
:mod:`ppfuse.layers`), so no block re-derives ``gamma / sqrt(var + eps)``.

:class:`RepVggBlock` has exactly PaddleDetection's parameter layout
(``conv1.conv.weight``, ``conv1.bn.{weight,bias,_mean,_variance}``,
``conv2...``, ``alpha``) so ppdet checkpoints load unchanged, and after
``convert_to_deploy()`` ppdet's deploy layout (``conv.weight``, ``conv.bias``).
Unlike ppdet's block it tests ``alpha is not None`` -- never the truth value of
a tensor, which treats alpha = 0 as "no alpha" and becomes an ``if`` op under
``paddle.jit.to_static`` -- and it can carry an identity-BN branch (RepVGG) and
stride 2.
"""
from __future__ import annotations

import functools
from typing import Callable, Optional, Sequence, Union

import numpy as np
import paddle
import paddle.nn as nn
import paddle.nn.functional as F
from paddle import ParamAttr
from paddle.nn.initializer import Constant
from paddle.regularizer import L2Decay

from . import kernels, layers
from .errors import CheckpointError, ConversionError, Unconvertible

Activation = Union[None, str, dict, Callable]

_ACTIVATIONS = {"swish": F.swish, "silu": F.silu, "relu": F.relu, "relu6": F.relu6,
                "leaky": F.leaky_relu, "leaky_relu": F.leaky_relu, "mish": F.mish,
                "hardswish": F.hardswish, "hard_swish": F.hardswish, "gelu": F.gelu,
                "sigmoid": F.sigmoid}


def _identity(x):
    return x


def resolve_activation(act: Activation) -> Callable:
    """Activation by name (as ppdet's ``get_act_fn``), a ``{'name': ..., **kwargs}`` dict, or a callable."""
    if act is None or act == "":
        return _identity
    if callable(act):
        return act
    if isinstance(act, dict):
        kwargs = dict(act)
        fn = resolve_activation(kwargs.pop("name"))
        return functools.partial(fn, **kwargs)
    if act in _ACTIVATIONS:
        return _ACTIVATIONS[act]
    if hasattr(F, act):
        return getattr(F, act)
    raise ValueError(f"unknown activation '{act}'; use one of {sorted(_ACTIVATIONS)} or a callable")


class ConvBN(nn.Layer):
    """conv (no bias) -> BatchNorm -> activation, laid out as ppdet's ``ConvBNLayer``."""

    def __init__(self, ch_in: int, ch_out: int, filter_size: int = 3, stride: int = 1,
                 groups: int = 1, padding: int = 0, act: Activation = None):
        super().__init__()
        self.conv = nn.Conv2D(ch_in, ch_out, filter_size, stride=stride, padding=padding,
                              groups=groups, bias_attr=False)
        self.bn = nn.BatchNorm2D(ch_out, weight_attr=ParamAttr(regularizer=L2Decay(0.0)),
                                 bias_attr=ParamAttr(regularizer=L2Decay(0.0)))
        self.act = resolve_activation(act)

    def forward(self, x):
        return self.act(self.bn(self.conv(x)))


class RepParamMixin:
    """Kernel helpers for re-parameterizable blocks, over the pure math."""

    def _fuse_bn_tensor(self, branch: Optional[nn.Layer], kernel_size=3, groups: int = 1,
                        where: str = "") -> kernels.KernelBias:
        """Kernel and bias of one branch: a conv+BN pair (``.conv``/``.bn`` or ``.norm``) or a bare BN.

        A bare BN becomes an identity kernel of ``kernel_size`` (for ``groups``)
        folded with the BN. ``None`` is not a branch: leave it out of the merge.
        """
        if branch is None:
            raise ConversionError(f"{where}: no branch to fuse (None); leave absent branches out of the merge")
        if layers.is_batch_norm(branch):
            return layers.bn_as_kernel(branch, where, groups=groups, kernel_size=kernel_size)
        # ppdet names the BN `bn` in ConvBNLayer and `norm` in ConvNormLayer
        bn_name = "bn" if hasattr(branch, "bn") else "norm"
        if not layers.is_conv(getattr(branch, "conv", None)) or getattr(branch, bn_name, None) is None:
            raise Unconvertible(f"{where} ({type(branch).__name__}): a branch is neither a BatchNorm nor a conv "
                                "with a norm ('conv' and 'bn'/'norm'); left as it is")
        if layers.hooks(branch):
            raise Unconvertible(f"{where}: has forward hooks, which may change what it computes; "
                                       "left as it is")
        return layers.fold_conv_bn(branch.conv, getattr(branch, bn_name), f"{where}.{bn_name}")

    def _pad_1x1_to_3x3_tensor(self, kernel: paddle.Tensor, size=3) -> paddle.Tensor:
        """Centre a small kernel (1x1, 1x3, 3x1) in a ``size`` kernel (3x3 by default)."""
        return kernels.pad_kernel(kernel, size)

    def _merge_branches(self, branches: Sequence[kernels.KernelBias],
                        scales: Optional[Sequence] = None) -> kernels.KernelBias:
        """Add branch kernels, each times its scale (``None`` = 1, a tensor = a learnable alpha)."""
        return kernels.merge_parallel(branches, scales)


def repvgg_kernel_bias(block: nn.Layer, conv3x3: nn.Layer, conv1x1: nn.Layer,
                       identity_bn: Optional[nn.Layer], alpha: Optional[paddle.Tensor],
                       where: str) -> kernels.KernelBias:
    """The one 3x3 kernel of ``conv3x3(x) + alpha * conv1x1(x) [+ identity_bn(x)]``.

    ``block`` supplies the mixin methods (any object, the mixin's methods are
    used unbound). Shared by ppfuse's :class:`RepVggBlock` and the converter
    of ppdet's ``RepVggBlock``.
    """
    mixin = RepParamMixin
    branches = [mixin._fuse_bn_tensor(block, conv3x3, where=f"{where}.conv1"),
                mixin._fuse_bn_tensor(block, conv1x1, where=f"{where}.conv2")]
    size = branches[0][0].shape[2:]
    branches[1] = (mixin._pad_1x1_to_3x3_tensor(block, branches[1][0], size), branches[1][1])
    if alpha is not None:
        if not bool(paddle.isfinite(alpha).all()):
            raise ConversionError(f"{where}.alpha: is NaN or Inf, so the block outputs NaN; the checkpoint is "
                                  "broken (retrain or restore it)")
        alpha = layers.channel_scale(alpha, branches[0][0].shape[0], f"{where}.alpha")
    scales = [None, alpha]
    if identity_bn is not None:
        branches.append(mixin._fuse_bn_tensor(block, identity_bn, kernel_size=size, where=f"{where}.identity_bn"))
        scales.append(None)
    return layers.checked_kernel(mixin._merge_branches(block, branches, scales), where)


class RepVggBlock(nn.Layer, RepParamMixin):
    """RepVGG block: ``act(conv3x3_bn(x) + alpha * conv1x1_bn(x) [+ bn(x)])``, one 3x3 conv once deployed.

    Args:
        ch_in, ch_out: channels.
        act: activation (name, dict or callable), applied after the sum.
        alpha: add a learnable scale on the 1x1 branch (PP-YOLOE+), initialised to 1.
        stride: 1 or 2 (both branches use it).
        identity: add the identity-BN branch of the original RepVGG; allowed only
            when ``stride == 1`` and ``ch_in == ch_out``.
        deploy: build the deployed form directly (one 3x3 conv with bias).
    """

    def __init__(self, ch_in: int, ch_out: int, act: Activation = "relu", alpha: bool = False,
                 stride: int = 1, identity: bool = False, deploy: bool = False):
        super().__init__()
        if identity and (stride != 1 or ch_in != ch_out):
            raise ValueError(f"identity branch needs stride 1 and ch_in == ch_out "
                             f"(got stride {stride}, {ch_in} -> {ch_out})")
        self.ch_in, self.ch_out, self.stride = ch_in, ch_out, stride
        self.act = resolve_activation(act)
        self.identity_bn = None
        self.alpha = None
        if deploy:
            self.conv = nn.Conv2D(ch_in, ch_out, 3, stride=stride, padding=1)
            return
        self.conv1 = ConvBN(ch_in, ch_out, 3, stride=stride, padding=1, act=None)
        self.conv2 = ConvBN(ch_in, ch_out, 1, stride=stride, padding=0, act=None)
        if identity:
            self.identity_bn = nn.BatchNorm2D(ch_out)
        if alpha:
            self.alpha = self.create_parameter(shape=[1], attr=ParamAttr(initializer=Constant(1.0)),
                                               dtype="float32")

    @property
    def deployed(self) -> bool:
        return "conv" in self._sub_layers

    def forward(self, x):
        if self.deployed:
            return self.act(self.conv(x))
        y = self.conv1(x)
        branch = self.conv2(x)
        y = y + (branch if self.alpha is None else self.alpha * branch)
        if self.identity_bn is not None:
            y = y + self.identity_bn(x)
        return self.act(y)

    def set_state_dict(self, state_dict, use_structured_name=True):
        """Load weights, refusing an ``alpha`` that PaddleDetection's block would compute differently.

        ppdet's ``RepVggBlock`` runs ``if self.alpha:``, which on Paddle 3.x is
        ``alpha > 0``: for alpha <= 0 (or NaN) it computes ``conv1 + conv2``,
        while this block computes ``conv1 + alpha * conv2``. The same checkpoint
        would give two different functions, so it is refused.
        """
        alpha = state_dict.get("alpha") if hasattr(state_dict, "get") else None
        if alpha is not None and self.alpha is not None:
            values = np.asarray(alpha.numpy() if isinstance(alpha, paddle.Tensor) else alpha, dtype=np.float64)
            if values.size == 1 and not values.reshape([-1])[0] > 0:
                raise CheckpointError(
                    f"{self.full_name()}: alpha = {values.reshape([-1])[0]:g} is not > 0: PaddleDetection's "
                    "RepVggBlock ignores such an alpha on Paddle 3.x (computes conv1 + conv2) while ppfuse's "
                    "applies it, so a ppdet checkpoint would compute something else here. Load the checkpoint "
                    "into ppdet's model and convert that (ppfuse.convert reproduces ppdet), or, for a checkpoint "
                    "of ppfuse's own block, set block.alpha directly")
        return super().set_state_dict(state_dict, use_structured_name)

    set_dict = set_state_dict
    load_dict = set_state_dict

    def get_equivalent_kernel_bias(self, where: str = "") -> kernels.KernelBias:
        """Kernel and bias of the deployed 3x3 conv (validates the BN statistics)."""
        return repvgg_kernel_bias(self, self.conv1, self.conv2, self.identity_bn, self.alpha,
                                  where or self.full_name())

    def deploy_with(self, kernel: paddle.Tensor, bias: paddle.Tensor) -> None:
        """Replace the branches by one 3x3 conv holding ``kernel`` and ``bias``."""
        self.conv = layers.make_conv(kernel, bias, stride=self.stride, padding=1)
        for name in ("conv1", "conv2", "identity_bn", "alpha"):
            if hasattr(self, name):
                delattr(self, name)
        self.identity_bn = None
        self.alpha = None

    def convert_to_deploy(self) -> None:
        """Turn the block into its deployed form in place; a second call changes nothing."""
        if self.deployed:
            return
        layers.check_eval(self, self.full_name())
        self.deploy_with(*self.get_equivalent_kernel_bias())
