"""PaddleDetection integration: configs, building models in training or deploy form, weights.

Configs are read by ppdet's own ``load_config`` and models built by ppdet's
``create``; ppfuse adds ``-o key=value`` overrides with clear errors, isolation
of ppdet's process-global config (so two configs can be used in one process),
and the meaning of ``deploy: true``: the model comes out in deploy form --
every re-param block one conv, every Conv+BN pair one conv with bias.

``weights`` may be a training checkpoint (loaded into the training form, then
converted) or a deploy checkpoint written by ppfuse (loaded into the deploy
form); which one is told by its keys. Any key mismatch is an error naming the
keys. With no weights the model gets random weights with randomized BatchNorm
statistics, for trying the tool only.

``ppfuse: {rep_block: qarepvgg}`` in a config builds the model with
:class:`ppfuse.QARepVggBlock` in place of every ppdet ``RepVggBlock``
(:func:`rep_block_switch`, :func:`swap_rep_blocks`): ppdet builds the model, the
blocks are swapped right after, before any weights are loaded or an optimizer is
made. Configs without the key build exactly what ppdet builds.
"""
from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import paddle
import paddle.nn as nn
import yaml

from ppfuse.core import checkpoint, layers

from ppfuse.ppdet import detectors
from ppfuse.core.convert import ConversionReport, convert
from ppfuse.ppdet.detectors import DetectorForInference
from ppfuse.errors import CheckpointError, ConfigError

SUPPORTED_ARCHITECTURES = ("PPYOLOE", "YOLOv3", "PicoDet", "RetinaNet", "DETR")  # examples for messages


def _workspace():
    # ppdet is imported where it is needed: importing it costs seconds
    import ppdet  # noqa: F401  (registers ppdet's modules)
    from ppdet.core import workspace
    return workspace


_PRISTINE: Optional[Dict[str, tuple]] = None


def _reset_ppdet_config() -> None:
    """Put ppdet's process-global config back to the state right after ppdet's import.

    ``load_config`` merges into one global dict, so a second config would
    inherit keys of the first. Registered module schemas stay; their values go.
    Mutable default arguments of the registered modules' ``__init__`` are put back
    in place too: a build may change them (ppdet 2.6.0's ``LCPAN`` appends to its
    default ``spatial_scales`` list when ``num_features`` is 4, so a second PicoDet
    lcnet would get five scales and fail its own forward).
    """
    global _PRISTINE
    ws = _workspace()
    g = ws.global_config
    if _PRISTINE is None:
        _PRISTINE = {}
        for key, schema in g.items():
            if not isinstance(schema, ws.SchemaDict):
                continue
            init = getattr(getattr(getattr(schema, "pymodule", None), key, None), "__init__", None)
            defaults = list(getattr(init, "__defaults__", None) or ())
            defaults += list((getattr(init, "__kwdefaults__", None) or {}).values())
            mutable = [(d, copy.deepcopy(d)) for d in defaults if isinstance(d, (list, dict))]
            _PRISTINE[key] = (schema, copy.deepcopy(dict(schema)), mutable)
    for key in list(g.keys()):
        if key not in _PRISTINE:
            del g[key]
    for key, (schema, items, mutable) in _PRISTINE.items():
        schema.clear()
        schema.update(copy.deepcopy(items))
        g[key] = schema
        for default, pristine in mutable:  # in place: ppdet's schema holds the same objects
            if isinstance(default, list):
                default[:] = copy.deepcopy(pristine)
            else:
                default.clear()
                default.update(copy.deepcopy(pristine))


def parse_overrides(items: Sequence[str]) -> Dict[str, Any]:
    """``["a=1", "B.c=[1, 2]"]`` -> ``{"a": 1, "B": {"c": [1, 2]}}``, values read as YAML."""
    result: Dict[str, Any] = {}
    for item in items or []:
        if "=" not in item or not item.split("=", 1)[0].strip():
            raise ConfigError(f"-o {item!r}: an override is key=value, e.g. -o weights=model.pdparams "
                              "or -o TestReader.batch_size=1")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as exc:
            raise ConfigError(f"-o {item!r}: value is not YAML ({str(exc).splitlines()[0]})") from None
        node = result
        parts = key.strip().split(".")
        if any(not p for p in parts):
            raise ConfigError(f"-o {item!r}: empty part in key {key!r}")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"-o {item!r}: {part} is given a value and a sub-key at once")
        node[parts[-1]] = value
    return result


@dataclass
class DetectionConfig:
    """A loaded config: its file, overrides, and a snapshot of the merged values."""
    path: str
    overrides: Dict[str, Any] = field(default_factory=dict)
    values: Dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return os.path.splitext(os.path.basename(self.path))[0]

    @property
    def architecture(self) -> str:
        return self.values["architecture"]

    @property
    def deploy(self) -> bool:
        return bool(self.values.get("deploy", False))

    @property
    def weights(self) -> Optional[str]:
        return self.values.get("weights") or None

    def get(self, key, default=None):
        return self.values.get(key, default)

    def __getitem__(self, key):
        return self.values[key]

    def activate(self):
        """Load this config into ppdet's global config (for ``create``); returns it."""
        ws = _workspace()
        _reset_ppdet_config()
        ws.load_config(self.path)
        ws.merge_config(copy.deepcopy(self.overrides))
        return ws.global_config

    def input_size(self) -> List[int]:
        """``[H, W]`` of the exported input: TestReader's image_shape, else eval_size, else 640."""
        shape = (self.get("TestReader") or {}).get("inputs_def", {}).get("image_shape")
        if shape and len(shape) == 3 and all(isinstance(s, int) and s > 0 for s in shape[1:]):
            return [int(shape[1]), int(shape[2])]
        size = self.get("eval_size")
        return [int(size[0]), int(size[1])] if size else [640, 640]


def _with_input_size(parsed: Dict[str, Any], size: Sequence[int]) -> Dict[str, Any]:
    """``parsed`` overrides with the export size ``[H, W]`` set where ppdet reads it: the TestReader's image
    shape and the shared ``eval_size`` (which PP-YOLOE heads precompute anchors for)."""
    if len(size) != 2 or not all(isinstance(s, int) and s > 0 for s in size):
        raise ConfigError(f"--input_size {' '.join(map(str, size))}: give height and width, two positive "
                          "integers (multiples of 32)")
    height, width = (int(s) for s in size)
    result = copy.deepcopy(parsed)
    reader = result.setdefault("TestReader", {})
    reader.setdefault("inputs_def", {})["image_shape"] = [3, height, width]
    result["eval_size"] = [height, width]
    return result


def load_config(path: str, overrides: Optional[Sequence[str]] = None,
                input_size: Optional[Sequence[int]] = None) -> DetectionConfig:
    """Read a PaddleDetection YAML config (with ``_BASE_``) and ``-o`` overrides.

    The export size is set in one place: ``input_size`` (``[H, W]``), or an override of
    ``TestReader.inputs_def.image_shape``; either sets the shared ``eval_size`` too (a head that
    precomputes anchors for another size would fail), unless ``eval_size`` is overridden itself.

    Raises:
        ConfigError: file missing, not YAML, no ``architecture``, or an
            architecture ppdet does not know.
    """
    if not os.path.isfile(path):
        raise ConfigError(f"{path}: config file not found")
    if os.path.splitext(path)[1] not in (".yml", ".yaml"):
        raise ConfigError(f"{path}: a config is a .yml/.yaml file")
    try:
        with open(path) as f:
            yaml.load(f, Loader=yaml.BaseLoader)  # syntax only: ppdet's tags are resolved by ppdet
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}: not valid YAML{where}: {getattr(exc, 'problem', exc)}") from None
    parsed = parse_overrides(overrides or [])
    if input_size is not None:
        parsed = _with_input_size(parsed, input_size)
    config = DetectionConfig(path, parsed)
    ws = _workspace()
    try:
        g = config.activate()
    except ConfigError:
        raise
    except FileNotFoundError as exc:
        raise ConfigError(f"{path}: a file it includes (_BASE_) is missing: {exc.filename}") from None
    except Exception as exc:  # ppdet raises assorted errors for bad configs
        raise ConfigError(f"{path}: ppdet could not read it: {type(exc).__name__}: {exc}") from None
    values = {}
    for key, value in g.items():
        values[key] = copy.deepcopy(dict(value)) if isinstance(value, ws.SchemaDict) else value
    config.values = values
    shape = ((parsed.get("TestReader") or {}).get("inputs_def") or {}).get("image_shape")
    if (input_size is None and shape and "eval_size" not in parsed and values.get("eval_size")
            and list(values["eval_size"]) != list(config.input_size())):
        return load_config(path, overrides, input_size=config.input_size())
    arch = values.get("architecture")
    if not arch:
        raise ConfigError(f"{path}: no 'architecture' key (e.g. architecture: PPYOLOE); is this a "
                          "PaddleDetection model config?")
    if not isinstance(g.get(arch), ws.SchemaDict):
        raise ConfigError(f"{path}: architecture '{arch}' is not known to ppdet; check the spelling "
                          f"(e.g. {', '.join(SUPPORTED_ARCHITECTURES)})")
    return config


def create_training_model(config: DetectionConfig) -> nn.Layer:
    """The model of the config ppdet has active, built by ppdet's ``create`` (training form, ppdet's initial
    weights, training mode), with the config's ``ppfuse.rep_block`` switch applied (:func:`swap_rep_blocks`).

    Call :meth:`DetectionConfig.activate` first; what was changed in ppdet's config since is kept (as
    :func:`ppfuse.measure.evaluation.train` does to hand ppdet's ``Trainer`` the model)."""
    switch = rep_block_switch(config)
    ws = _workspace()
    try:
        model = ws.create(config.architecture)
    except Exception as exc:
        raise ConfigError(f"{config.path}: ppdet could not build '{config.architecture}': "
                          f"{type(exc).__name__}: {exc}") from None
    swap_rep_blocks(model, switch, config.path)
    return model


def build_training_model(config: DetectionConfig) -> nn.Layer:
    """The model as ppdet builds it (training form, ppdet's initial weights), in eval mode -- with the config's
    ``ppfuse.rep_block`` switch applied."""
    config.activate()
    model = create_training_model(config)
    model.eval()
    return model


# ----------------------------------------------------------------------------- the rep_block switch
REP_BLOCKS = ("repvgg", "qarepvgg")


@dataclass(frozen=True)
class RepBlockSwitch:
    """What a config's ``ppfuse:`` key asks of the model's re-parameterizable blocks.

    ``rep_block: repvgg`` (the default, also with no ``ppfuse`` key) leaves the model as ppdet builds it;
    ``rep_block: qarepvgg`` puts a :class:`ppfuse.QARepVggBlock` in place of every ppdet ``RepVggBlock`` --
    in PP-YOLOE(+) the second conv of each ``BasicBlock`` of the backbone (CSPResNet) and of the neck
    (CustomCSPPAN). ``identity`` and ``avg_pool`` add the QARepVGG branches PP-YOLOE's blocks do not have.
    """
    rep_block: str = "repvgg"
    identity: bool = False
    avg_pool: bool = False

    @property
    def changes_model(self) -> bool:
        return self.rep_block != "repvgg"


def rep_block_switch(config: DetectionConfig) -> RepBlockSwitch:
    """The config's ``ppfuse: {rep_block: ..., identity: ..., avg_pool: ...}``, validated.

    Raises:
        ConfigError: ``ppfuse`` not a mapping, an unknown key or block name, a non-boolean option, or an
            option the chosen block does not have.
    """
    raw = config.get("ppfuse")
    if raw is None:
        return RepBlockSwitch()
    example = "e.g. ppfuse: {rep_block: qarepvgg}"
    if not isinstance(raw, dict):
        raise ConfigError(f"{config.path}: 'ppfuse' is {raw!r}; it is a mapping ({example})")
    fields = [f.name for f in RepBlockSwitch.__dataclass_fields__.values()]
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise ConfigError(f"{config.path}: ppfuse.{unknown[0]} is not a ppfuse key; known: {', '.join(fields)}")
    switch = RepBlockSwitch(**raw)
    if switch.rep_block not in REP_BLOCKS:
        raise ConfigError(f"{config.path}: ppfuse.rep_block is {switch.rep_block!r}; use one of "
                          f"{', '.join(REP_BLOCKS)}")
    for option in ("identity", "avg_pool"):
        value = getattr(switch, option)
        if not isinstance(value, bool):
            raise ConfigError(f"{config.path}: ppfuse.{option} is {value!r}; use true or false")
        if value and not switch.changes_model:
            raise ConfigError(f"{config.path}: ppfuse.{option} is a branch of QARepVggBlock; it needs "
                              "ppfuse.rep_block: qarepvgg")
    return switch


def swap_rep_blocks(model: nn.Layer, switch: RepBlockSwitch, where: str = "") -> int:
    """Put the block ``switch`` asks for in place of every ppdet ``RepVggBlock`` of ``model``; returns how many.

    A new block has the replaced one's channels, activation and alpha (PP-YOLOE+: ``use_alpha``) and fresh
    initial weights, as ppdet's would have: this is for training, not for converting trained weights. The
    parameter names stay under the same parent (``...blocks.0.conv2.conv1.conv.weight``, ``...conv2.bn.*``).

    Raises:
        ConfigError: the switch asks for a block but ``model`` has no ppdet ``RepVggBlock`` in training form.
    """
    if not switch.changes_model:
        return 0
    from ppdet.modeling.backbones.cspresnet import RepVggBlock as PPDetRepVggBlock

    from ppfuse.core.blocks import QARepVggBlock
    replaced: Dict[int, nn.Layer] = {}  # a block held by two parents is replaced by one block
    for parent in [model] + model.sublayers():
        for name, block in list(parent._sub_layers.items()):
            if not isinstance(block, PPDetRepVggBlock) or hasattr(block, "conv"):
                continue
            if id(block) not in replaced:
                replaced[id(block)] = QARepVggBlock(block.ch_in, block.ch_out, act=block.act,
                                                    alpha=block.alpha is not None, identity=switch.identity,
                                                    avg_pool=switch.avg_pool)
            setattr(parent, name, replaced[id(block)])
    if not replaced:
        raise ConfigError(f"{where or type(model).__name__}: ppfuse.rep_block: {switch.rep_block} replaces "
                          f"ppdet's RepVggBlock, and {type(model).__name__} has none in training form "
                          "(PP-YOLOE and PP-YOLOE+ have them in CSPResNet and CustomCSPPAN)")
    return len(replaced)


def raw_outputs_float64(model: nn.Layer, image, scale_factor):
    """Boxes and scores (before NMS) of a PP-YOLOE-style ``model`` evaluated in float64 on a copy: the
    reference that tells fp32 rounding from conversion error. ``model`` itself is left as it is."""
    from ppfuse.core.verify import float64_copy
    with paddle.no_grad():
        boxes, scores = DetectorForInference(float64_copy(model), with_nms=False)(image.astype("float64"),
                                                                      scale_factor.astype("float64"))
    return boxes.numpy(), scores.numpy()


@dataclass
class BuiltModel:
    """What :func:`build_model` made.

    ``model`` is in the form the config asks for; ``training_model`` is the
    training form with the same weights (None when the weights were already
    deployed); ``weights_form`` is ``train``, ``deploy`` or ``random``.
    """
    model: nn.Layer
    training_model: Optional[nn.Layer]
    weights_form: str
    conversion: Optional[ConversionReport] = None


def checkpoint_form(config: DetectionConfig, state: Dict[str, np.ndarray], source: str,
                    training_model: nn.Layer) -> Tuple[str, Optional[nn.Layer]]:
    """Which form's keys the checkpoint has: ``("train", None)``, or ``("deploy", model)`` with ``model`` the
    deploy form of ``training_model`` (converted once here, for its key names, and used as the model); else a
    CheckpointError naming keys. A training checkpoint costs no conversion."""
    train_mismatch = checkpoint.key_mismatch(training_model, state)
    if not any(train_mismatch.values()):
        return "train", None
    deploy_model = convert_detector(config, training_model, check=False).model
    deploy_mismatch = checkpoint.key_mismatch(deploy_model, state)
    if not any(deploy_mismatch.values()):
        return "deploy", deploy_model
    t = sum(map(len, train_mismatch.values()))
    d = sum(map(len, deploy_mismatch.values()))
    form, mismatch = ("training", train_mismatch) if t <= d else ("deploy", deploy_mismatch)
    raise CheckpointError(f"{source}: does not fit {config.name} (closest to its {form} form): "
                          f"{checkpoint.describe_mismatch(mismatch)}; use the config the checkpoint was "
                          "trained with")


def weights_path(weights: str) -> str:
    """The checkpoint file ``weights`` names: itself, or with ``.pdparams`` added (ppdet's convention)."""
    return weights if weights.endswith(".pdparams") or os.path.exists(weights) else weights + ".pdparams"


def weights_file_exists(weights: str) -> bool:
    """Is there a checkpoint at ``weights`` (with or without its ``.pdparams``)?"""
    return os.path.isfile(weights_path(weights))


def build_model(config: DetectionConfig, weights: Optional[str] = None, deploy: Optional[bool] = None,
                seed: int = 0, strict: bool = False, check: bool = True) -> BuiltModel:
    """Build the model of ``config`` with its weights, in deploy form when ``deploy: true``.

    Args:
        config: from :func:`load_config`.
        weights: checkpoint path; default ``config.weights``; none -> random
            weights: gamma, beta, alpha and zero-initialized convs randomized
            (:func:`ppfuse.core.layers.randomize`), then BatchNorm statistics set
            from generated images, so they are far from the defaults yet keep
            activations O(1) as in a trained model; seeded.
        deploy: override the config's ``deploy`` key.
        seed: seed of the random weights.
        strict: fail when the conversion would leave any BatchNorm unfolded.
        check: compare the deployed model's raw outputs with the training form's inside
            :func:`ppfuse.core.convert` (every fold is confirmed by a trace either way); the export
            passes False because it verifies the deployed model itself.
    """
    deploy = config.deploy if deploy is None else deploy
    weights = weights if weights is not None else config.weights
    paddle.seed(seed)
    training_model = build_training_model(config)
    if not weights:
        layers.randomize(training_model, seed)
        inputs = detectors.sample_inputs(config.input_size(), 2, seed, detectors.input_names(training_model))
        detector = detectors.wrapper_for(training_model, with_nms=False)
        with detectors.ppdet_failures(training_model, config.input_size()):
            layers.calibrate_batch_norms(training_model, lambda: detector(*inputs))
        form = "random"
    else:
        path = weights_path(weights)
        state = checkpoint.safe_load(path)
        form, deploy_model = checkpoint_form(config, state, path, training_model)
        if form == "deploy":
            if not deploy:
                raise CheckpointError(f"{path}: is a deploy checkpoint (written by ppfuse export); load it "
                                      "with deploy: true (-o deploy=true)")
            model = deploy_model
            checkpoint.load_strict(model, state, path)
            return BuiltModel(model, None, form)
        checkpoint.load_strict(training_model, state, path)
    if not deploy:
        return BuiltModel(training_model, training_model, form)
    report = convert_detector(config, training_model, check=check, strict=strict, seed=seed)
    return BuiltModel(report.model, training_model, form, report)


def convert_detector(config: DetectionConfig, training_model: nn.Layer, check: bool = True, strict: bool = False,
                     seed: int = 0, inplace: bool = False) -> ConversionReport:
    """The deploy form of a detector (a converted copy, or ``training_model`` itself with ``inplace``): every
    fold confirmed against the trace of its raw outputs at the config's input size, and (``check``) those
    outputs compared. The one way a detector is converted, so a deploy checkpoint's keys are those of what the
    export writes."""
    size = config.input_size()
    with detectors.traceable(training_model):
        return convert(training_model, inplace=inplace, strict=strict,
                       input_spec=detectors.input_spec(training_model, size),
                       example_inputs=detectors.sample_inputs(size, 1, seed, detectors.input_names(training_model)),
                       check=check, forward_with=lambda model: detectors.wrapper_for(model, with_nms=False))


def detector_input_spec(size: List[int]) -> List[paddle.static.InputSpec]:
    """The inputs of :class:`DetectorForInference` at ``size`` = ``[H, W]``."""
    return detectors.input_spec(None, size, ("image", "scale_factor"))
