"""Re-parameterizable blocks and the mixin they share.

:class:`RepParamMixin` gives any block the three methods users of RepVGG-style
code know -- ``_fuse_bn_tensor``, ``_pad_1x1_to_3x3_tensor`` and alpha-weighted
merging -- as thin wrappers over :mod:`ppfuse.core.kernels` (via
:mod:`ppfuse.core.layers`), so no block re-derives ``gamma / sqrt(var + eps)``.

:class:`OneConvBlock` is the base of the blocks that deploy as one 3x3 conv: :class:`RepVggBlock` and
:class:`QARepVggBlock`.

:class:`RepVggBlock` has exactly PaddleDetection's parameter layout
(``conv1.conv.weight``, ``conv1.bn.{weight,bias,_mean,_variance}``,
``conv2...``, ``alpha``) so ppdet checkpoints load unchanged, and after
``convert_to_deploy()`` ppdet's deploy layout (``conv.weight``, ``conv.bias``).
Unlike ppdet's block it tests ``alpha is not None`` -- never the truth value of
a tensor, which treats alpha = 0 as "no alpha" and becomes an ``if`` op under
``paddle.jit.to_static`` -- and it can carry an identity-BN branch (RepVGG) and
stride 2.

:class:`QARepVggBlock` is QARepVGG (Chu et al., AAAI 2024): RepVGG with the
BatchNorm moved from the 1x1 and identity branches to after the sum: no branch
BatchNorm puts outlier weights into the deployed kernel, which costs RepVGG its
accuracy in int8.
"""
from __future__ import annotations

import functools
from typing import Callable, Dict, Optional, Sequence, Union

import numpy as np
import paddle
import paddle.nn as nn
import paddle.nn.functional as F
from paddle import ParamAttr
from paddle.nn.initializer import Constant
from paddle.regularizer import L2Decay

from ppfuse.core import kernels, layers
from ppfuse.errors import CheckpointError, ConversionError, Unconvertible

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


def alpha_scale(alpha: Optional[paddle.Tensor], channels: int, where: str) -> Optional[paddle.Tensor]:
    """A block's learnable ``alpha`` as the scale :func:`ppfuse.core.kernels.merge_parallel` takes (None stays None)."""
    if alpha is None:
        return None
    if not bool(paddle.isfinite(alpha).all()):
        raise ConversionError(f"{where}.alpha: is NaN or Inf, so the block outputs NaN; the checkpoint is "
                              "broken (retrain or restore it)")
    return layers.channel_scale(alpha, channels, f"{where}.alpha")


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
    layers.check_centred_merge(conv3x3.conv, where, small=[conv1x1.conv], identity=identity_bn is not None)
    size = branches[0][0].shape[2:]
    branches[1] = (mixin._pad_1x1_to_3x3_tensor(block, branches[1][0], size), branches[1][1])
    scales = [None, alpha_scale(alpha, branches[0][0].shape[0], where)]
    if identity_bn is not None:
        branches.append(mixin._fuse_bn_tensor(block, identity_bn, kernel_size=size, groups=conv3x3.conv._groups,
                                              where=f"{where}.identity_bn"))
        scales.append(None)
    return layers.checked_kernel(mixin._merge_branches(block, branches, scales), where)


_DROPPED = object()  # a training part with no value in the deployed form


class OneConvBlock(nn.Layer, RepParamMixin):
    """Base of the blocks whose deployed form is one 3x3 conv (``conv``, with bias) and the activation.

    A subclass builds its branches in ``__init__`` unless ``deploy``, computes their sum in
    ``forward_branches`` (what comes before the activation) and their kernel in
    ``get_equivalent_kernel_bias``, and lists in ``_TRAINING_PARTS`` the attributes the deployed form
    drops, each with the value it has there.
    """

    _TRAINING_PARTS: Dict[str, object] = {}

    def __init__(self, ch_in: int, ch_out: int, act: Activation, stride: int, deploy: bool):
        super().__init__()
        self.ch_in, self.ch_out, self.stride = ch_in, ch_out, stride
        self.act = resolve_activation(act)
        self.alpha = None
        if deploy:
            self.conv = nn.Conv2D(ch_in, ch_out, 3, stride=stride, padding=1)

    def _add_alpha(self) -> None:
        """The learnable scale of the 1x1 branch (PP-YOLOE+), initialised to 1."""
        self.alpha = self.create_parameter(shape=[1], attr=ParamAttr(initializer=Constant(1.0)), dtype="float32")

    @property
    def deployed(self) -> bool:
        return "conv" in self._sub_layers

    def forward(self, x):
        if self.deployed:
            return self.act(self.conv(x))
        return self.act(self.forward_branches(x))

    def forward_branches(self, x):
        raise NotImplementedError

    def get_equivalent_kernel_bias(self, where: str = "") -> kernels.KernelBias:
        raise NotImplementedError

    def deploy_with(self, kernel: paddle.Tensor, bias: paddle.Tensor) -> None:
        """Replace the training form by one conv holding ``kernel`` and ``bias``, with the geometry, dtype and
        trainability of the 3x3 branch's conv (``conv1.conv``)."""
        self.conv = layers.conv_like(self.conv1.conv, kernel, bias)
        for name, value in self._TRAINING_PARTS.items():
            if hasattr(self, name):
                delattr(self, name)
            if value is not _DROPPED:
                setattr(self, name, value)

    def convert_to_deploy(self) -> None:
        """Turn the block into its deployed form in place; a second call changes nothing."""
        if self.deployed:
            return
        layers.check_eval(self, self.full_name())
        self.deploy_with(*self.get_equivalent_kernel_bias())


class RepVggBlock(OneConvBlock):
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

    _TRAINING_PARTS = {"conv1": _DROPPED, "conv2": _DROPPED, "identity_bn": None, "alpha": None}

    def __init__(self, ch_in: int, ch_out: int, act: Activation = "relu", alpha: bool = False,
                 stride: int = 1, identity: bool = False, deploy: bool = False):
        if identity and (stride != 1 or ch_in != ch_out):
            raise ValueError(f"identity branch needs stride 1 and ch_in == ch_out "
                             f"(got stride {stride}, {ch_in} -> {ch_out})")
        super().__init__(ch_in, ch_out, act, stride, deploy)
        self.identity_bn = None
        if deploy:
            return
        self.conv1 = ConvBN(ch_in, ch_out, 3, stride=stride, padding=1, act=None)
        self.conv2 = ConvBN(ch_in, ch_out, 1, stride=stride, padding=0, act=None)
        if identity:
            self.identity_bn = nn.BatchNorm2D(ch_out)
        if alpha:
            self._add_alpha()

    def forward_branches(self, x):
        y = self.conv1(x)
        branch = self.conv2(x)
        y = y + (branch if self.alpha is None else self.alpha * branch)
        if self.identity_bn is not None:
            y = y + self.identity_bn(x)
        return y

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
                    "into ppdet's model and convert that (ppfuse.core.convert reproduces ppdet), or, for a checkpoint "
                    "of ppfuse's own block, set block.alpha directly")
        return super().set_state_dict(state_dict, use_structured_name)

    set_dict = set_state_dict
    load_dict = set_state_dict

    def get_equivalent_kernel_bias(self, where: str = "") -> kernels.KernelBias:
        """Kernel and bias of the deployed 3x3 conv (validates the BN statistics)."""
        return repvgg_kernel_bias(self, self.conv1, self.conv2, self.identity_bn, self.alpha,
                                  where or self.full_name())


def _no_decay() -> ParamAttr:
    # ppdet's convention (ConvBNLayer): BatchNorm weight and bias are exempt from the optimizer's L2 regularizer
    return ParamAttr(regularizer=L2Decay(0.0))


class QARepVggBlock(OneConvBlock):
    """QARepVGG block: RepVGG made friendly to int8; one 3x3 conv once deployed.

    From Chu, Li, Zhang, "Make RepVGG Greater Again: A Quantization-aware
    Approach" (AAAI 2024, arXiv 2212.01593)::

        y = act(bn(conv1(x) + alpha * conv2(x) [+ x] [+ avg_pool(x)]))

    ``conv1`` is a 3x3 conv with its BatchNorm, ``conv2`` a 1x1 conv with *no*
    BatchNorm (and no bias: the BatchNorm after the sum subtracts any constant),
    the identity is ``x`` itself with *no* BatchNorm, and ``bn`` normalizes the
    sum. The paper traces RepVGG's int8 collapse to its branch BatchNorms: an
    identity or 1x1 BatchNorm with a small running variance puts a large
    ``gamma / sqrt(var + eps)`` on the kernel's centre taps (outlier weights that
    stretch the per-channel int8 range), and three separately normalized
    branches add up to an output of enlarged, uncontrolled variance. Dropping
    those two BatchNorms removes the outliers; the BatchNorm after the sum keeps
    the output's variance in hand (and training stable).

    Weight decay: the paper trains with *normal* L2 -- plain weight decay on the
    conv kernels -- not RepVGG's custom L2, which decays the merged kernel
    divided by the branch BatchNorms' scales and so rewards growing those
    scales. The authors' code (github.com/cxxgtxy/QARepVGG, ``train.py``) and
    YOLOv6 (``yolov6/solver/build.py``) exempt every BatchNorm weight and bias
    from decay; so here, as in ppdet's ``ConvBNLayer``, both BatchNorms carry
    ``L2Decay(0.0)`` and the two conv kernels take the optimizer's regularizer
    (ppdet's ``OptimizerBuilder.regularizer``, with Momentum/SGD). AdamW's
    decoupled ``weight_decay`` ignores per-parameter regularizers and decays
    every parameter, BatchNorms included, for this block as for ppdet's.

    ``alpha`` (PP-YOLOE+'s learnable scalar on the 1x1 branch, initialised to 1)
    is optional. With no BatchNorm after the 1x1 conv it is redundant as a
    function (``alpha * W1`` is just another 1x1 kernel) but not as training:
    it keeps the parameters of ppdet's ``RepVggBlock(alpha=True)`` it replaces,
    so a comparison of the two differs only in where the BatchNorms sit. It is
    applied for every value (``alpha is not None``), 0 and negative included.

    ``identity`` defaults to the paper's choice: on wherever the shapes allow
    (stride 1, ``ch_in == ch_out``). PP-YOLOE's blocks have no identity branch
    (their ``BasicBlock`` adds its own shortcut), so the config switch
    (:mod:`ppfuse.ppdet.detection`) turns it off unless asked. ``avg_pool`` adds the
    3x3 average-pool branch of YOLOv6's ``QARepVGGBlockV2`` (zero padding
    counted, as PyTorch's ``AvgPool2d`` default), also only where the identity
    fits; YOLOv6's published ``-qa`` models use it.

    YOLOv6 keeps the post-sum BatchNorm in its deploy form for quantization-aware
    training; :meth:`convert_to_deploy` folds it, leaving ``conv.weight`` and
    ``conv.bias`` as :class:`RepVggBlock` does.

    Args:
        ch_in, ch_out: channels.
        act: activation (name, dict or callable), applied after the BatchNorm.
        alpha: add the learnable scale on the 1x1 branch.
        stride: 1 or 2 (both convs use it).
        identity: the identity branch; None = where the shapes allow; True
            requires stride 1 and ``ch_in == ch_out``.
        avg_pool: the 3x3 average-pool branch (same condition as ``identity``).
        deploy: build the deployed form directly (one 3x3 conv with bias).

    Raises:
        ValueError: ``identity=True`` or ``avg_pool=True`` where the shapes do not allow it.
    """

    _TRAINING_PARTS = {"conv1": _DROPPED, "conv2": _DROPPED, "bn": _DROPPED, "identity": False,
                       "avg_pool": None, "alpha": None}

    def __init__(self, ch_in: int, ch_out: int, act: Activation = "relu", alpha: bool = False,
                 stride: int = 1, identity: Optional[bool] = None, avg_pool: bool = False,
                 deploy: bool = False):
        same_shape = stride == 1 and ch_in == ch_out
        for name, wanted in (("identity", identity), ("avg_pool", avg_pool)):
            if wanted and not same_shape:
                raise ValueError(f"{name} branch needs stride 1 and ch_in == ch_out "
                                 f"(got stride {stride}, {ch_in} -> {ch_out})")
        super().__init__(ch_in, ch_out, act, stride, deploy)
        self.identity = not deploy and (same_shape if identity is None else bool(identity))
        self.avg_pool = None
        if deploy:
            return
        self.conv1 = ConvBN(ch_in, ch_out, 3, stride=stride, padding=1, act=None)
        self.conv2 = nn.Conv2D(ch_in, ch_out, 1, stride=stride, padding=0, bias_attr=False)
        if avg_pool:
            self.avg_pool = nn.AvgPool2D(3, stride=1, padding=1, exclusive=False)
        self.bn = nn.BatchNorm2D(ch_out, weight_attr=_no_decay(), bias_attr=_no_decay())
        if alpha:
            self._add_alpha()

    def forward_branches(self, x):
        branch = self.conv2(x)
        y = self.conv1(x) + (branch if self.alpha is None else self.alpha * branch)
        if self.identity:
            y = y + x
        if self.avg_pool is not None:
            y = y + self.avg_pool(x)
        return self.bn(y)

    def get_equivalent_kernel_bias(self, where: str = "") -> kernels.KernelBias:
        """Kernel and bias of the deployed 3x3 conv (validates both BatchNorms' statistics)."""
        where = where or self.full_name()
        branches = [self._fuse_bn_tensor(self.conv1, where=f"{where}.conv1")]
        kernel3x3 = branches[0][0]
        size, channels, dtype = kernel3x3.shape[2:], kernel3x3.shape[0], kernel3x3.dtype
        layers.check_conv(self.conv2, f"{where}.conv2")
        groups = self.conv1.conv._groups
        if self.avg_pool is not None and groups != 1:
            raise Unconvertible(f"{where}: an average-pool branch beside a grouped conv (groups {groups}) is no "
                                "one conv of that grouping; left as it is")
        layers.check_centred_merge(self.conv1.conv, where, small=[self.conv2], identity=bool(self.identity),
                                   pool=self.avg_pool)
        kernel1x1, bias1x1 = layers.conv_kernel_bias(self.conv2)
        branches.append((self._pad_1x1_to_3x3_tensor(kernel1x1, size), bias1x1))
        scales = [None, alpha_scale(self.alpha, channels, where)]
        if self.identity:
            branches.append((kernels.identity_kernel(channels, groups, kernel_size=size, dtype=dtype), None))
            scales.append(None)
        if self.avg_pool is not None:
            branches.append((kernels.avg_pool_kernel(channels, size, dtype=dtype), None))
            scales.append(None)
        merged = layers.checked_kernel(self._merge_branches(branches, scales), where)
        return layers.fold_into(merged, self.bn, f"{where}.bn")
