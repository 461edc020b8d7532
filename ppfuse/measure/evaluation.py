"""Accuracy parity: train a detector briefly with ppdet, then COCO mAP of both forms.

The benchmark question is whether a ppfuse export detects exactly as well as
the model it came from. This module answers it on a model that detects
something (PP-YOLOE+ trained for minutes on the generated shapes dataset of
:mod:`ppfuse.measure.shapes`), with ppdet's own pieces throughout:

* :func:`ensure_shapes_dataset` writes the dataset a config points at, if absent;
* :func:`train` trains with ``ppdet.engine.Trainer`` (from scratch: nothing is
  downloaded) and returns the final checkpoint;
* :func:`evaluate_training_form` runs the training-form dygraph model over
  ppdet's ``EvalReader`` into ppdet's ``COCOMetric``;
* :func:`evaluate_exported` runs an export through a runtime (Paddle
  Inference, ONNX Runtime or OpenVINO, fp32 or bf16: :class:`ppfuse.deploy.inference.Detector`,
  preprocessing from its ``infer_cfg.yml``) over the same images into the same ``COCOMetric``;
* :func:`parity_table` puts the numbers side by side.

Both forms are scored by the same code (``COCOMetric`` -> ``cocoapi_eval``
-> pycocotools), so any difference comes from the models, not the metric.
"""
from __future__ import annotations

import contextlib
import io
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import paddle

from ppfuse.deploy.inference import Detector, read_image
from ppfuse.errors import ConfigError, InferenceError, TrainingError
from ppfuse.measure.results import table
from ppfuse.ppdet.detection import DetectionConfig, build_model, create_training_model, rep_block_switch
from ppfuse.runtime import RuntimeOptions

# the 12 numbers of pycocotools' COCOeval.summarize(), in its order
COCO_STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")

Log = Callable[[str], None]


@contextlib.contextmanager
def _quiet_stdout():
    """Hold back what pycocotools prints ("loading annotations into memory...") unless something fails."""
    buffer = io.StringIO()
    try:
        with contextlib.redirect_stdout(buffer):
            yield buffer
    except BaseException:
        sys.stdout.write(buffer.getvalue())
        raise


# --- data -------------------------------------------------------------------------------------------------------


@dataclass
class DatasetSplit:
    """Where a COCO split of a config lives: ``dataset_dir/image_dir`` and ``dataset_dir/anno_path``."""
    dataset_dir: str
    image_dir: str
    anno_path: str

    @property
    def images(self) -> str:
        return os.path.join(self.dataset_dir, self.image_dir)

    @property
    def annotations(self) -> str:
        return os.path.join(self.dataset_dir, self.anno_path)


def dataset_split(config: DetectionConfig, key: str) -> DatasetSplit:
    """The ``TrainDataset``/``EvalDataset`` of ``config`` as a :class:`DatasetSplit`."""
    dataset = config.get(key)
    for attr in ("dataset_dir", "image_dir", "anno_path"):
        if not getattr(dataset, attr, None):
            raise ConfigError(f"{config.path}: {key} has no {attr}; accuracy parity needs a COCODataSet "
                              "with dataset_dir, image_dir and anno_path")
    return DatasetSplit(dataset.dataset_dir, dataset.image_dir, dataset.anno_path)


def _split_is_complete(split: DatasetSplit, count: int, variant: str = "easy") -> bool:
    if not os.path.isfile(split.annotations):
        return False
    try:
        with open(split.annotations) as f:
            data = json.load(f)
        images = data.get("images", [])
        written = (data.get("info") or {}).get("ppfuse_shapes_variant", "easy")
    except (OSError, ValueError, AttributeError):
        return False
    return written == variant and len(images) == count and all(
        os.path.isfile(os.path.join(split.images, im["file_name"])) for im in images)


def ensure_shapes_dataset(config: DetectionConfig, train_images: int, val_images: int, train_seed: int = 0,
                          val_seed: int = 1, log: Log = print) -> None:
    """Write the generated shapes splits the config's Train/EvalDataset point at, unless already there.

    A split is rewritten when its annotation file is missing, unreadable, holds
    another number of images, or names an image that is not on disk; the
    images are drawn from the seed, so a rewrite gives the same data.

    The config's ``shapes_variant`` (``easy``, the default, or ``hard``: eight classes, small, overlapping,
    low-contrast objects) says which data; a split written as another variant is rewritten.

    Raises:
        ConfigError: a dataset path that is not the layout ``ppfuse.measure.shapes``
            writes (``<dir>/<split>/`` and ``<dir>/annotations/instances_<split>.json``), an unknown
            variant, or a ``num_classes`` that is not the variant's.
    """
    from ppfuse.measure.shapes import VARIANTS, write_split
    variant = config.get("shapes_variant", "easy")
    if variant not in VARIANTS:
        raise ConfigError(f"{config.path}: shapes_variant is {variant!r}; use one of {', '.join(VARIANTS)}")
    if config.get("num_classes") not in (None, len(VARIANTS[variant])):
        raise ConfigError(f"{config.path}: num_classes is {config.get('num_classes')}, but the {variant} shapes "
                          f"data has {len(VARIANTS[variant])} classes; set num_classes: {len(VARIANTS[variant])}")
    for key, count, seed in (("TrainDataset", train_images, train_seed), ("EvalDataset", val_images, val_seed)):
        if count < 1:
            raise ConfigError(f"{key}: {count} images asked for; give at least 1 (--train_images/--val_images)")
        split = dataset_split(config, key)
        expected = f"annotations/instances_{split.image_dir}.json"
        if os.path.normpath(split.anno_path) != os.path.normpath(expected):
            raise ConfigError(f"{config.path}: {key}.anno_path is {split.anno_path!r}, but a generated shapes "
                              f"split '{split.image_dir}' has {expected!r}; fix the config or point it at "
                              "another dataset")
        if _split_is_complete(split, count, variant):
            log(f"dataset: {split.annotations} ({count} {variant} images) is there")
            continue
        start = time.perf_counter()
        write_split(split.dataset_dir, split.image_dir, count, seed, variant=variant)
        log(f"dataset: wrote {count} {variant} images to {split.images}/ and {split.annotations} (seed {seed}, "
            f"{time.perf_counter() - start:.1f} s)")


# --- training ---------------------------------------------------------------------------------------------------


def cast_gt_class_to_int64(layer, inputs):
    """Forward pre-hook: the batch's ``gt_class`` as int64.

    ppdet 2.6.0's COCO loader and ``PadGT`` make ``gt_class`` int32, and on
    Paddle 3.x the assigners then fail (``TypeError: ... x: int64, y: int32``
    in ``ATSSAssigner``/``TaskAlignedAssigner``), as Paddle no longer promotes
    integer types implicitly. Casting where the batch enters the model is the
    smallest change that leaves ppdet's files alone.
    """
    data = inputs[0] if inputs else None
    if isinstance(data, dict) and isinstance(data.get("gt_class"), paddle.Tensor) \
            and data["gt_class"].dtype != paddle.int64:
        data["gt_class"] = data["gt_class"].astype("int64")
    return None


def set_epochs(cfg, epochs: int) -> Dict[str, object]:
    """Make ``cfg`` (ppdet's global config) train ``epochs`` epochs, the schedule stretched to match.

    Keys measured in epochs of the schedule scale with it, so ``--epochs`` keeps
    the schedule's shape: the cosine decay's ``max_epochs`` and PP-YOLOE's
    ``static_assigner_epoch`` (ATSS before TAL) keep their ratio to ``epoch``.
    The warmup stays as configured. Returns what was set.
    """
    if epochs < 1:
        raise ConfigError(f"--epochs {epochs}: train at least 1 epoch")
    old = int(cfg.get("epoch") or epochs)
    changed: Dict[str, object] = {"epoch": epochs}
    cfg["epoch"] = epochs
    for scheduler in (cfg.get("LearningRate") or {}).get("schedulers", []):
        # a scheduler is an object (YAML tag) or a dict with 'name' (ppdet accepts both)
        if isinstance(scheduler, dict) and "max_epochs" in scheduler:
            scheduler["max_epochs"] = max(epochs, int(round(scheduler["max_epochs"] * epochs / old)))
            changed[f"{scheduler.get('name', 'scheduler')}.max_epochs"] = scheduler["max_epochs"]
        elif hasattr(scheduler, "max_epochs"):
            scheduler.max_epochs = max(epochs, int(round(scheduler.max_epochs * epochs / old)))
            changed[f"{type(scheduler).__name__}.max_epochs"] = scheduler.max_epochs
    head = cfg.get("PPYOLOEHead")
    if head is not None and "static_assigner_epoch" in head:
        configured = head["static_assigner_epoch"]
        # at least one ATSS epoch when the config has any: TAL needs predictions that are somewhat good
        head["static_assigner_epoch"] = max(int(configured > 0), int(round(configured * epochs / old)))
        changed["PPYOLOEHead.static_assigner_epoch"] = head["static_assigner_epoch"]
    return changed


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and Paddle: ppdet's augmentations draw from ``random`` and ``np.random``."""
    random.seed(seed)
    np.random.seed(seed)
    paddle.seed(seed)


def _progress_callback(trainer, log: Log, start: float):
    from ppdet.engine.callbacks import Callback

    class Progress(Callback):
        """One line per epoch (ppdet's own log lines are off in the command lines); stops on a NaN loss."""

        def __init__(self, model):
            super().__init__(model)
            self.losses: List[float] = []

        def on_step_end(self, status):
            if status.get("mode") != "train":
                return
            meter = status["training_staus"].meters["loss"]
            loss = float(np.asarray(meter.value).reshape(-1)[0])
            if not math.isfinite(loss):
                raise TrainingError(f"training diverged at epoch {status['epoch_id'] + 1}, step "
                                    f"{status['step_id'] + 1}: loss is {loss}; lower LearningRate.base_lr "
                                    "(-o LearningRate.base_lr=...) or lengthen the warmup")
            self.losses.append(loss)

        def on_epoch_end(self, status):
            if status.get("mode") != "train":
                return
            epoch, total = status["epoch_id"] + 1, self.model.cfg.epoch
            mean = float(np.mean(self.losses)) if self.losses else float("nan")
            self.losses = []
            log(f"epoch {epoch}/{total}: mean loss {mean:.4f}, lr {status.get('learning_rate', 0.0):.6f}, "
                f"{time.perf_counter() - start:.0f} s")

    return Progress(trainer)


@dataclass
class TrainResult:
    """The final checkpoint (training form) and how long training took."""
    weights: str
    epochs: int
    seconds: float
    schedule: Dict[str, object] = field(default_factory=dict)


def train(config: DetectionConfig, save_dir: str, epochs: Optional[int] = None, seed: int = 0,
          log: Log = print) -> TrainResult:
    """Train the config's model from scratch with ``ppdet.engine.Trainer`` on CPU.

    Writes ``save_dir/train/model_final.pdparams`` (and ppdet's ``.pdopt``).
    ``pretrain_weights`` is honoured only as a local file: nothing is
    downloaded at run time.

    Raises:
        ConfigError: a pretrain_weights URL or missing file, or no full batch in the data.
        TrainingError: the loss became NaN/Inf.
    """
    from ppdet.engine import Trainer
    cfg = config.activate()
    schedule = set_epochs(cfg, epochs) if epochs is not None else {"epoch": cfg.get("epoch")}
    cfg["save_dir"] = save_dir
    cfg["filename"] = "train"  # ppdet's Checkpointer writes to save_dir/filename/
    pretrain = cfg.get("pretrain_weights")
    if pretrain and (str(pretrain).startswith(("http://", "https://")) or not os.path.exists(
            pretrain if str(pretrain).endswith(".pdparams") else f"{pretrain}.pdparams")):
        raise ConfigError(f"{config.path}: pretrain_weights {pretrain!r} is not a local file; nothing is "
                          "downloaded here -- remove the key to train from scratch, or give a local .pdparams")
    if cfg.get("use_gpu") and paddle.is_compiled_with_cuda():
        paddle.set_device("gpu")
    else:
        paddle.set_device("cpu")
    seed_everything(seed)
    if rep_block_switch(config).changes_model:  # ppdet's Trainer would build ppdet's own RepVggBlock
        cfg["model"] = create_training_model(config)
    with _quiet_stdout():
        trainer = Trainer(cfg, mode="train")
    if len(trainer.loader) < 1:
        raise ConfigError(f"{config.path}: TrainReader.batch_size {cfg.TrainReader['batch_size']} is more than "
                          f"the {len(trainer.dataset)} training images (drop_last); use more images or a "
                          "smaller batch")
    if pretrain:  # what Trainer.load_weights does, which skips a model handed to the Trainer
        from ppdet.utils.checkpoint import load_pretrain_weight
        load_pretrain_weight(trainer.model, pretrain)
    trainer.model.register_forward_pre_hook(cast_gt_class_to_int64)
    start = time.perf_counter()
    trainer.register_callbacks([_progress_callback(trainer, log, start)])
    trainer.train(validate=False)
    seconds = time.perf_counter() - start
    weights = os.path.join(save_dir, "train", "model_final.pdparams")
    if not os.path.isfile(weights):
        raise TrainingError(f"training ended but {weights} was not written; check that {save_dir} is writable")
    return TrainResult(weights, int(cfg.epoch), seconds, schedule)


TRAINING_RECORD = "ppfuse_training.json"


def train_once(config: DetectionConfig, save_dir: str, epochs: Optional[int], seed: int, data: Dict[str, object],
               retrain: bool = False, log: Log = print) -> TrainResult:
    """:func:`train`, or the checkpoint a previous run with the same settings left in ``save_dir/train/``.

    ``save_dir/train/ppfuse_training.json`` records the config, epochs, seed and
    ``data`` (e.g. the number of generated images) of a finished training; any
    difference, a missing checkpoint or ``retrain`` trains again.
    """
    key = {"config": os.path.abspath(config.path), "overrides": repr(config.overrides), "epochs": epochs,
           "seed": seed, "data": data}
    record_path = os.path.join(save_dir, "train", TRAINING_RECORD)
    weights = os.path.join(save_dir, "train", "model_final.pdparams")
    if not retrain and os.path.isfile(weights) and os.path.isfile(record_path):
        with open(record_path) as f:
            record = json.load(f)
        if record.get("key") == key:
            log(f"training: reusing {weights} ({record['epochs']} epochs, {record['seconds'] / 60:.1f} min; "
                "--retrain trains again)")
            return TrainResult(weights, record["epochs"], record["seconds"], record.get("schedule", {}))
    result = train(config, save_dir, epochs=epochs, seed=seed, log=log)
    with open(record_path, "w") as f:
        json.dump({"key": key, "epochs": result.epochs, "seconds": result.seconds,
                   "schedule": {k: str(v) for k, v in result.schedule.items()}}, f, indent=2)
    return result


# --- evaluation -------------------------------------------------------------------------------------------------


@dataclass
class CocoResult:
    """COCO bbox evaluation of one model form: the 12 COCOeval numbers and what produced them."""
    form: str
    stats: List[float]
    images: int
    detections: int
    seconds: float
    settings: str = ""
    summary: str = ""

    @property
    def map(self) -> float:
        """mAP@[.5:.95]"""
        return self.stats[0]

    @property
    def map50(self) -> float:
        """mAP@.5"""
        return self.stats[1]

    def to_dict(self) -> dict:
        return {"form": self.form, "stats": dict(zip(COCO_STAT_NAMES, self.stats)), "images": self.images,
                "detections": self.detections, "seconds": round(self.seconds, 2), "settings": self.settings}


def _coco_metric(anno_file: str, output_eval: str):
    from ppdet.metrics import COCOMetric
    os.makedirs(output_eval, exist_ok=True)  # COCOMetric writes bbox.json there
    with _quiet_stdout():
        return COCOMetric(anno_file=anno_file, output_eval=output_eval, IouType="bbox")


def _accumulate(metric, form: str, images: int, seconds: float, settings: str) -> CocoResult:
    """Run COCOeval on what ``metric`` collected; its printed summary is kept in ``output_eval/coco_eval.txt``."""
    detections = len(metric.results["bbox"])
    if detections == 0:
        # COCOMetric evaluates nothing without detections; mAP is 0 by definition
        summary = "no detections above the NMS score threshold\n"
        stats = [0.0] * len(COCO_STAT_NAMES)
    else:
        with _quiet_stdout() as text:
            metric.accumulate()
        summary = text.getvalue()
        stats = [float(v) for v in metric.get_results()["bbox"]]
    with open(os.path.join(metric.output_eval, "coco_eval.txt"), "w") as f:
        f.write(summary)
    return CocoResult(form, stats, images, detections, seconds, settings, summary)


def evaluate_training_form(config: DetectionConfig, weights: str, output_eval: str,
                           log: Log = print) -> CocoResult:
    """COCO bbox mAP of the training-form dygraph model: ppdet's EvalReader, model and ``COCOMetric``."""
    from ppdet.core.workspace import create
    built = build_model(config, weights=weights, deploy=False)
    model = built.model
    model.eval()
    cfg = config.activate()
    with _quiet_stdout():
        dataset = create("EvalDataset")()
        sampler = paddle.io.BatchSampler(dataset, batch_size=cfg.EvalReader["batch_size"])
        loader = create("EvalReader")(dataset, cfg.worker_num, sampler)
    metric = _coco_metric(dataset.get_anno(), output_eval)
    images = 0
    start = time.perf_counter()
    with paddle.no_grad():
        for data in loader:
            metric.update(data, model(data))
            images += int(data["im_id"].shape[0])
    seconds = time.perf_counter() - start
    log(f"training form (dygraph): {images} images in {seconds:.1f} s")
    return _accumulate(metric, "training form (ppdet dygraph)", images, seconds, "paddle dygraph, ppdet EvalReader")


def _check_repeatable(model_dir: str, call, settings: str) -> None:
    """Run the same input twice; a runtime whose second run differs from its first cannot be scored."""
    first = [o.copy() for o in call()]
    second = call()
    same = len(first) == len(second) and all(
        a.shape == b.shape and np.allclose(a, b, rtol=1e-5, atol=1e-5) for a, b in zip(first, second))
    if not same:
        nan = any(np.isnan(o).any() for o in second if o.dtype.kind == "f")
        raise InferenceError(f"{model_dir}: {settings} gives different outputs when the same "
                             f"image is run twice{' (NaN on the second run)' if nan else ''}; its detections "
                             "cannot be scored. Keep every pass (Paddle 3.3.1 with oneDNN goes wrong after the "
                             "first run when constant_folding_pass is deleted) or use --onednn off")


def evaluate_exported(model_dir: str, split: DatasetSplit, output_eval: str,
                      options: Optional[RuntimeOptions] = None, log: Log = print,
                      runtime: str = "paddle") -> CocoResult:
    """COCO bbox mAP of an export run through a runtime on every image of a COCO split.

    Images are read and preprocessed as ``infer_cfg.yml`` says (for the shapes
    config: Resize 320 keep_ratio False interp 2, /255 -- the EvalReader's
    transforms); detections go into the same ``COCOMetric`` as the training
    form's. ``runtime``: ``paddle``, ``onnxruntime`` or ``openvino`` (the last two
    read ``model.onnx``, or ``model_int8.onnx`` for int8); ``options``: a
    :class:`ppfuse.runtime.RuntimeOptions` (precision fp32, bf16 or int8
    among them), default ppfuse's CPU settings on one thread. The runtime is
    first checked to give the same outputs when run twice
    on one image, and the precision it ran is read back into the settings.

    Raises:
        InferenceError: no images, an export without NMS, a runtime whose
            repeated runs differ, or options the runtime or CPU cannot run.
    """
    options = options or RuntimeOptions(cpu_threads=1)
    detector = Detector(model_dir, options, runtime)
    settings = f"{detector.runtime.settings()}, {options.cpu_threads} thread(s)"
    with open(split.annotations) as f:
        images = sorted(json.load(f)["images"], key=lambda im: im["id"])
    if not images:
        raise InferenceError(f"{split.annotations}: no images to evaluate")

    def path(image: dict) -> str:
        return os.path.join(split.images, image["file_name"])

    first = read_image(path(images[0]))
    _check_repeatable(model_dir, lambda: detector.run(first), settings)
    precision = detector.runtime.confirm_precision(detector.preprocess(first))
    settings += f"; {precision.ran} ran ({precision.detail})"
    metric = _coco_metric(split.annotations, output_eval)
    start = time.perf_counter()
    for image in images:
        outputs = detector.run(read_image(path(image)))
        if len(outputs) != 2:
            raise InferenceError(f"{model_dir}: expected (bbox, bbox_num) outputs, got {len(outputs)}; export "
                                 "with NMS (no --no_nms) to evaluate")
        bbox, bbox_num = outputs
        metric.update({"im_id": np.array([[image["id"]]], "int64")}, {"bbox": bbox, "bbox_num": bbox_num})
    seconds = time.perf_counter() - start
    form = f"ppfuse export, {detector.runtime.title} {precision.ran}"
    log(f"{form} ({settings}): {len(images)} images in {seconds:.1f} s")
    return _accumulate(metric, form, len(images), seconds, settings)


# --- report -----------------------------------------------------------------------------------------------------


def parity_table(results: Sequence[CocoResult]) -> str:
    """A Markdown table: model form | mAP@[.5:.95] | mAP@.5 | absolute difference to the first form (the
    training form), one row per form."""
    first = results[0] if results else None
    rows = [[r.form, f"{r.map:.4f}", f"{r.map50:.4f}",
             "-" if r is first else f"{_difference(first.map, r.map)} / {_difference(first.map50, r.map50)}"]
            for r in results]
    return table(["model form", "mAP@[.5:.95]", "mAP@.5",
                  "absolute difference to the training form (mAP@[.5:.95] / mAP@.5)"], rows)


def bf16_costs(results: Sequence[CocoResult], precisions: Sequence[str] = ("bf16", "int8")) -> List[str]:
    """One line per runtime scored in fp32 and a lower precision (bf16, int8): what it costs in mAP (fp32 minus
    it)."""
    by_form = {r.form: r for r in results}
    lines = []
    for form, r in by_form.items():
        for low in precisions:
            if form.endswith(f" {low}") and form[:-len(low)] + "fp32" in by_form:
                fp32 = by_form[form[:-len(low)] + "fp32"]
                runtime = form[:-len(f" {low}")].replace("ppfuse export, ", "")
                lines.append(f"{low} in {runtime}: mAP@[.5:.95] {r.map:.4f} vs fp32 {fp32.map:.4f} ({low} - fp32 = "
                             f"{r.map - fp32.map:+.4f}), mAP@.5 {r.map50:.4f} vs {fp32.map50:.4f} "
                             f"({r.map50 - fp32.map50:+.4f})")
    return lines


def _difference(a: float, b: float) -> str:
    # below the table's 4 decimals a difference would print as 0.0000: show it in full instead
    d = abs(a - b)
    return "0" if d == 0 else f"{d:.4f}" if d >= 1e-4 else f"{d:.1e}"


def report_markdown(results: Sequence[CocoResult], notes: Sequence[str]) -> str:
    """:func:`parity_table` and the notes under it, one bullet each."""
    return parity_table(results) + "\n\n" + "".join(f"- {n}\n" for n in notes)


def write_report(output_dir: str, results: Sequence[CocoResult], notes: Sequence[str], record: dict) -> str:
    """Write ``accuracy.md`` (:func:`report_markdown`) and ``accuracy.json`` (``record`` with every
    COCO number of ``results``) to ``output_dir``; returns the path of ``accuracy.md``."""
    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(output_dir, "accuracy.md")
    with open(path, "w") as f:
        f.write("# Accuracy parity\n\n" + report_markdown(results, notes))
    with open(os.path.join(output_dir, "accuracy.json"), "w") as f:
        json.dump(dict(record, results=[r.to_dict() for r in results]), f, indent=2)
    return path


def set_cpu_threads(threads: int) -> None:
    """Threads of Paddle's CPU math (dygraph training and evaluation); Paddle Inference has its own setting."""
    if threads < 1:
        raise ConfigError(f"--cpu_threads {threads}: use 1 or more")
    paddle.base.core.set_num_threads(threads)  # no public API for this in Paddle 3.3
