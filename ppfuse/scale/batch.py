"""Batch detection on Ray: Ray Data reads and preprocesses the images, a pool of actors (each loads the export
once) detects, and this process writes one record per input image.

    from ppfuse.scale import batch, cluster
    from ppfuse.scale.worker import WorkerSpec
    paths = batch.input_paths(image_dir="images/")
    with cluster.connect() as ray_cluster:
        summary = batch.run(batch.BatchJob(WorkerSpec("output_inference/ppyoloe_plus_crn_s_80e_coco")),
                            paths, "output/batch", ray_cluster)

Exactly once: every input gets its id (its position in the input list, from 1) before anything runs, and
travels with its image. The writer (this process, the only one) keeps a bit per id: a record whose id was
written already is dropped, not written twice (Ray retries the batches of an actor that died; a retried batch
that had got through would come twice). After the pass, ids that never came back run again once; any still
missing are written as error records that say so. So every input has exactly one record: its detections, or
one line saying why not (an unreadable or corrupt image, a failed run). Records are staged and the files
moved into place only at the end: a failed job leaves the output directory as it was.
"""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterator, List, Optional, Sequence

import numpy as np

from ppfuse.deploy import inference
from ppfuse.errors import InferenceError, PPFuseError, first_line
from ppfuse.scale.cluster import ClusterInfo, check_fits, require_ray
from ppfuse.scale.worker import BatchDetector, WorkerSpec, preflight

SUMMARY_FILE = "summary.json"
SINGLE_FILE = "detections.json"
SHARD_FILE = "detections-{:05d}-of-{:05d}.json"
# Reading and preprocessing cost little next to detection: the read tasks ask for no CPU of their own (so N
# actors of one CPU fit on N CPUs) and run at most as many at once as there are actors.
READ_CPUS = 0
MAX_BLOCKS = 10_000
ERRORS_LISTED = 20


@dataclass
class BatchJob:
    """One batch detection job: what every actor loads, how many actors, images per batch, records per file
    (``shard_size``; more inputs than that are written as several files)."""
    spec: WorkerSpec
    workers: Optional[int] = None  # None: as many as the cluster's CPUs (GPUs) hold
    batch_size: int = 8
    shard_size: int = 10_000

    def validate(self) -> None:
        if self.workers is not None and self.workers < 1:
            raise InferenceError(f"--workers {self.workers}: use 1 or more")
        if self.batch_size < 1:
            raise InferenceError(f"--batch_size {self.batch_size}: use 1 or more")
        if self.shard_size < 1:
            raise InferenceError(f"--shard_size {self.shard_size}: use 1 or more")


@dataclass
class Progress:
    """Where a running job is: records written of ``total``, how many are errors, which workers sent them
    (``host:pid``; a restarted actor is a new one)."""
    done: int
    total: int
    errors: int
    elapsed_s: float
    workers: Dict[str, str] = field(default_factory=dict)

    def line(self) -> str:
        rate = self.done / self.elapsed_s if self.elapsed_s > 0 else 0.0
        return (f"progress: {self.done}/{self.total} images ({self.errors} error{'s' * (self.errors != 1)}), "
                f"{rate:.1f} images/s, {self.elapsed_s:.0f} s")


# --- inputs -----------------------------------------------------------------------------------------------------


def input_paths(image_dir: Optional[str] = None, image_list: Optional[str] = None) -> List[str]:
    """The images of a job, in order: a folder's images (sorted, :func:`ppfuse.deploy.inference.list_images`),
    or the lines of a list file (one path a line; blank lines and ``#`` comments skipped; a relative path is
    relative to the list's folder). A path that does not exist is kept: its record will say so.

    Raises:
        InferenceError: no such folder or list, or nothing in it.
    """
    if image_dir is not None:
        if not os.path.isdir(image_dir):
            raise InferenceError(f"--image_dir {image_dir}: not a directory")
        return [os.path.abspath(p) for p in inference.list_images(image_dir)]
    if image_list is None:
        raise InferenceError("give --image_dir or --image_list")
    try:
        with open(image_list, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise InferenceError(f"--image_list {image_list}: cannot read it ({getattr(exc, 'strerror', None) or exc})")
    base = os.path.dirname(os.path.abspath(image_list))
    paths = [os.path.normpath(os.path.join(base, line.strip())) for line in lines
             if line.strip() and not line.strip().startswith("#")]
    if not paths:
        raise InferenceError(f"--image_list {image_list}: no image paths in it")
    return paths


# --- the two stages (run in Ray workers) ------------------------------------------------------------------------


def read_and_preprocess(batch: Dict[str, np.ndarray], preprocess: inference.Preprocess) -> Dict[str, list]:
    """Ray Data stage 1: read each image and preprocess it as ``infer_cfg.yml`` says; an image that cannot be
    read becomes a row with its error and no pixels."""
    rows: Dict[str, list] = {k: [] for k in ("image_id", "path", "height", "width", "error", "image", "image_shape",
                                             "scale_factor", "im_shape")}
    for image_id, path in zip(batch["image_id"], batch["path"]):
        path = str(path)
        try:
            image = inference.read_image(path)
            feed = preprocess(image)
            height, width, error = int(image.shape[0]), int(image.shape[1]), ""
        except Exception as exc:  # noqa: BLE001  -- a bad image is a record, never a crashed job
            message = str(exc) if isinstance(exc, PPFuseError) else f"{path}: {first_line(exc)}"
            feed, height, width, error = None, 0, 0, message
        rows["image_id"].append(int(image_id))
        rows["path"].append(path)
        rows["height"].append(height)
        rows["width"].append(width)
        rows["error"].append(error)
        image = feed["image"][0] if feed else np.zeros((0, 0, 0), "float32")
        rows["image"].append(np.ascontiguousarray(image, "float32").tobytes())
        rows["image_shape"].append(np.array(image.shape, "int64"))
        rows["scale_factor"].append(feed["scale_factor"][0].astype("float32") if feed else np.zeros(2, "float32"))
        rows["im_shape"].append(feed["im_shape"][0].astype("float32") if feed else np.zeros(2, "float32"))
    return {key: np.array(values) if key not in ("image", "path", "error") else values
            for key, values in rows.items()}


class DetectStage:
    """Ray Data stage 2, an actor: loads the export once, detects each batch of preprocessed images."""

    def __init__(self, spec: WorkerSpec):
        self.worker = BatchDetector(spec)
        self.reported = False

    def __call__(self, batch: Dict[str, np.ndarray]) -> Dict[str, list]:
        count = len(batch["image_id"])
        valid = [i for i in range(count) if not batch["error"][i]]
        feeds = [{"image": np.frombuffer(batch["image"][i], "float32").reshape(1, *batch["image_shape"][i]),
                  "scale_factor": np.asarray(batch["scale_factor"][i], "float32")[None],
                  "im_shape": np.asarray(batch["im_shape"][i], "float32")[None]} for i in valid]
        results = dict(zip(valid, self.worker.detect(feeds, [(batch["height"][i], batch["width"][i])
                                                             for i in valid])))
        ran = ""
        if feeds and not self.reported:
            ran, self.reported = self.worker.what_ran(feeds[0]), True
        out: Dict[str, list] = {k: [] for k in ("image_id", "path", "height", "width", "error", "detections",
                                                "worker", "ran")}
        for i in range(count):
            result = results.get(i, {"error": str(batch["error"][i])})
            out["image_id"].append(int(batch["image_id"][i]))
            out["path"].append(str(batch["path"][i]))
            out["height"].append(int(batch["height"][i]))
            out["width"].append(int(batch["width"][i]))
            out["error"].append(result.get("error", ""))
            out["detections"].append(json.dumps(result.get("detections", [])))
            out["worker"].append(self.worker.name)
            out["ran"].append(ran if i == 0 else "")
        return out


# --- the writer: every input once -------------------------------------------------------------------------------


class RecordWriter:
    """Records keyed by image id, each written once, staged in ``staging`` (JSON lines, one file per shard)
    and turned into the COCO-style files by :meth:`finish`."""

    MAX_OPEN = 64

    def __init__(self, staging: str, total: int, shard_size: int, labels: Sequence[str]):
        self.staging, self.total, self.shard_size, self.labels = staging, total, shard_size, list(labels)
        self.shards = max(1, math.ceil(total / shard_size))
        self.seen = bytearray(total + 1)
        self.written = self.errors = self.detections = self.duplicates = 0
        self.error_examples: List[dict] = []
        self._open: Dict[int, object] = {}

    def add(self, record: dict) -> bool:
        """Write ``record`` unless its image id was written already; whether it was written."""
        image_id = int(record["image_id"])
        if not 1 <= image_id <= self.total:
            raise InferenceError(f"a worker returned image id {image_id} of {self.total} inputs")
        if self.seen[image_id]:
            self.duplicates += 1
            return False
        self.seen[image_id] = 1
        shard = (image_id - 1) // self.shard_size
        handle = self._open.get(shard)
        if handle is None:
            if len(self._open) >= self.MAX_OPEN:
                self.close()
            handle = self._open[shard] = open(os.path.join(self.staging, f"shard-{shard:05d}.jsonl"), "a")
        handle.write(json.dumps(record) + "\n")
        self.written += 1
        if record.get("error"):
            self.errors += 1
            if len(self.error_examples) < ERRORS_LISTED:
                self.error_examples.append({"image_id": image_id, "file_name": record["path"],
                                            "error": record["error"]})
        else:
            self.detections += len(record["detections"])
        return True

    def missing(self) -> List[int]:
        return [i for i in range(1, self.total + 1) if not self.seen[i]]

    def close(self) -> None:
        for handle in self._open.values():
            handle.close()
        self._open.clear()

    def finish(self, output_dir: str) -> List[str]:
        """Write each shard as COCO-style detection JSON into the staging folder, then move them into
        ``output_dir`` (replacing a previous run's files); the paths written."""
        self.close()
        if self.written != self.total:
            raise InferenceError(f"internal: {self.written} records for {self.total} inputs")
        names = [SINGLE_FILE] if self.shards == 1 else [SHARD_FILE.format(s, self.shards) for s in range(self.shards)]
        categories = [{"id": i + 1, "name": name} for i, name in enumerate(self.labels)]
        annotation_id = 0
        for shard, name in enumerate(names):
            with open(os.path.join(self.staging, f"shard-{shard:05d}.jsonl")) as f:
                records = sorted((json.loads(line) for line in f), key=lambda r: r["image_id"])
            images, annotations = [], []
            for record in records:
                entry = {"id": record["image_id"], "file_name": record["path"]}
                if record.get("error"):
                    entry["error"] = record["error"]
                else:
                    entry.update(height=record["height"], width=record["width"],
                                 detections=len(record["detections"]))
                images.append(entry)
                for det in record["detections"]:
                    x1, y1, x2, y2 = det["box"]
                    annotation_id += 1
                    annotations.append({"id": annotation_id, "image_id": record["image_id"],
                                        "category_id": det["class_id"] + 1, "label": det["label"],
                                        "bbox": [x1, y1, x2 - x1, y2 - y1], "score": det["score"],
                                        "area": (x2 - x1) * (y2 - y1)})
            with open(os.path.join(self.staging, name), "w") as f:
                json.dump({"info": {"shard": shard, "shards": self.shards, "images": len(images)},
                           "images": images, "annotations": annotations, "categories": categories}, f)
        _remove_previous_files(output_dir)
        paths = []
        for name in names:
            paths.append(os.path.join(output_dir, name))
            os.replace(os.path.join(self.staging, name), paths[-1])
        return paths


def _remove_previous_files(output_dir: str) -> None:
    """A previous run's detection files (another shard count would leave some behind) and its summary."""
    previous = os.path.join(output_dir, SUMMARY_FILE)
    names = [SINGLE_FILE]
    if os.path.isfile(previous):
        try:
            with open(previous) as f:
                names += [os.path.basename(p) for p in json.load(f).get("files", [])]
        except (OSError, ValueError, AttributeError):
            pass
    for name in set(names):
        path = os.path.join(output_dir, name)
        if os.path.isfile(path):
            os.remove(path)


# --- the job ----------------------------------------------------------------------------------------------------


def _ppfuse_error(exc: BaseException) -> PPFuseError:
    """The ppfuse error inside a Ray error (an actor that could not load the export), or one line for it."""
    seen, todo = set(), [exc]
    while todo:
        current = todo.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, PPFuseError):
            return current
        todo += [getattr(current, "cause", None), current.__cause__, current.__context__]
    # an actor whose constructor raised reaches the driver as ActorDiedError, with the traceback as text
    raised = re.findall(r"^ppfuse\.errors\.\w+: (.+)$", str(exc), re.MULTILINE)
    if raised:
        return InferenceError(raised[-1].strip())
    return InferenceError(f"the Ray job failed: {first_line(exc)}")


def _stream(items: List[dict], job: BatchJob, workers: int, preprocess: inference.Preprocess) -> Iterator[dict]:
    """The records of one pass over ``items``, as the actors send them back."""
    ray = require_ray()
    data = ray.data
    context = data.DataContext.get_current()
    context.enable_progress_bars = False  # the driver prints its own progress lines
    context.print_on_execution_start = False
    blocks = max(1, min(MAX_BLOCKS, math.ceil(len(items) / job.batch_size)))
    dataset = data.from_items(items, override_num_blocks=blocks)
    dataset = dataset.map_batches(read_and_preprocess, fn_kwargs={"preprocess": preprocess},
                                  batch_size=job.batch_size, batch_format="numpy", num_cpus=READ_CPUS,
                                  compute=data.TaskPoolStrategy(size=workers))
    gpu = job.spec.options.device == "gpu"
    dataset = dataset.map_batches(DetectStage, fn_constructor_kwargs={"spec": job.spec}, batch_size=job.batch_size,
                                  batch_format="numpy", compute=data.ActorPoolStrategy(size=workers),
                                  num_cpus=job.spec.options.cpu_threads if not gpu else 1,
                                  num_gpus=1 if gpu else None)
    try:
        for batch in dataset.iter_batches(batch_size=None, batch_format="numpy"):
            for i in range(len(batch["image_id"])):
                detections = json.loads(str(batch["detections"][i]))
                yield {"image_id": int(batch["image_id"][i]), "path": str(batch["path"][i]),
                       "height": int(batch["height"][i]), "width": int(batch["width"][i]),
                       "error": str(batch["error"][i]), "detections": detections,
                       "worker": str(batch["worker"][i]), "ran": str(batch["ran"][i])}
    except PPFuseError:
        raise
    except Exception as exc:  # noqa: BLE001  -- Ray's errors become one line
        raise _ppfuse_error(exc) from None


def run(job: BatchJob, paths: Sequence[str], output_dir: str, cluster: ClusterInfo,
        progress: Optional[Callable[[Progress], None]] = None) -> dict:
    """Detect every image of ``paths`` on the connected Ray cluster; write the records into ``output_dir``.

    Writes ``detections.json`` (or ``detections-NNNNN-of-NNNNN.json`` for more than ``job.shard_size``
    inputs): COCO-style, ``images`` (one entry per input: ``id``, ``file_name`` and ``height``/``width``/
    ``detections`` or ``error``), ``annotations`` (``image_id``, ``category_id`` = class index + 1 of
    ``infer_cfg.yml``'s ``label_list``, ``bbox`` [x, y, w, h] in pixels, ``score``, ``label``) and
    ``categories``; then ``summary.json``.

    Args:
        job: what to load and how many actors.
        paths: the images (:func:`input_paths`); record ``i`` is ``paths[i - 1]``.
        output_dir: created if needed; nothing is written into it before the job has every record.
        cluster: the connected cluster (:func:`ppfuse.scale.cluster.connect`).
        progress: called with a :class:`Progress` after every batch that comes back.

    Returns:
        The summary (also ``summary.json``): counts, errors, images/s, what ran where.

    Raises:
        InferenceError: options the cluster cannot run (GPUs it does not have, more CPUs than it has), an
            export the actors cannot load, an output directory that cannot be written.
    """
    job.validate()
    spec = job.spec
    if not paths:
        raise InferenceError("no images to detect")
    gpu = spec.options.device == "gpu"
    cpus_each = 1 if gpu else spec.options.cpu_threads
    if gpu and not cluster.gpus:
        check_fits("workers", job.workers or 1, cpus_each, 1, cluster)
    workers = job.workers or max(1, int(cluster.gpus if gpu else cluster.cpus // cpus_each))
    check_fits("workers", workers, cpus_each, 1 if gpu else 0, cluster)
    if not os.path.isdir(spec.model_dir):
        raise InferenceError(f"--model_dir {spec.model_dir}: not a directory")
    preprocess = inference.Preprocess.from_infer_cfg(spec.model_dir)  # refused here, before any worker starts
    preflight(spec)
    labels = _labels(spec.model_dir)
    created = not os.path.isdir(output_dir)
    try:
        os.makedirs(output_dir, exist_ok=True)
        staging = tempfile.mkdtemp(prefix=".batch_infer-", dir=output_dir)
    except OSError as exc:
        raise InferenceError(f"--output_dir {output_dir}: cannot write there ({exc.strerror or exc})") from None
    try:
        return _run(job, paths, output_dir, staging, workers, preprocess, labels, cluster, progress)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if created and not os.listdir(output_dir):
            os.rmdir(output_dir)
        raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _labels(model_dir: str) -> List[str]:
    import yaml
    from ppfuse.export_format import INFER_CFG
    with open(os.path.join(model_dir, INFER_CFG)) as f:
        return list((yaml.safe_load(f) or {}).get("label_list") or [])


def _run(job: BatchJob, paths: Sequence[str], output_dir: str, staging: str, workers: int,
         preprocess: inference.Preprocess, labels: List[str], cluster: ClusterInfo,
         progress: Optional[Callable[[Progress], None]]) -> dict:
    writer = RecordWriter(staging, len(paths), job.shard_size, labels)
    ran: Dict[str, str] = {}
    start = time.perf_counter()
    items = [{"image_id": i + 1, "path": path} for i, path in enumerate(paths)]
    passes = []
    for attempt in (1, 2):
        if attempt == 2:
            missing = set(writer.missing())
            if not missing:
                break
            items = [item for item in items if item["image_id"] in missing]
        passes.append(len(items))
        for record in _stream(items, job, workers, preprocess):
            if record["ran"] or record["worker"] not in ran:
                ran[record["worker"]] = record["ran"] or ran.get(record["worker"], "")
            writer.add({key: record[key] for key in ("image_id", "path", "height", "width", "error", "detections")})
            if progress is not None:
                progress(Progress(writer.written, writer.total, writer.errors, time.perf_counter() - start, ran))
    lost = writer.missing()
    for image_id in lost:  # after two passes: said, never silently skipped
        writer.add({"image_id": image_id, "path": paths[image_id - 1], "height": 0, "width": 0, "detections": [],
                    "error": f"{paths[image_id - 1]}: no worker returned a result in two passes"})
    elapsed = time.perf_counter() - start
    files = writer.finish(output_dir)
    spec = job.spec
    summary = {
        "inputs": writer.total, "records": writer.written, "ok": writer.written - writer.errors,
        "errors": writer.errors, "detections": writer.detections, "duplicates_dropped": writer.duplicates,
        "passes": passes, "lost_after_two_passes": len(lost), "error_examples": writer.error_examples,
        "elapsed_s": round(elapsed, 3), "images_per_s": round(writer.total / elapsed, 3) if elapsed > 0 else None,
        "threshold": spec.threshold, "files": [os.path.basename(p) for p in files],
        "ran": {"model_dir": os.path.abspath(spec.model_dir), "runtime": spec.runtime,
                "precision": spec.options.precision, "device": spec.options.device, "workers": workers,
                "cpu_threads_per_worker": spec.options.cpu_threads, "batch_size": job.batch_size,
                "cluster": cluster.line(), "workers_seen": ran},
    }
    _write_json(os.path.join(output_dir, SUMMARY_FILE), summary)
    return summary


def _write_json(path: str, data: dict) -> None:
    staged = path + ".tmp"
    with open(staged, "w") as f:
        json.dump(data, f, indent=1)
    os.replace(staged, path)


def read_records(output_dir: str) -> Dict[int, dict]:
    """The records of a finished job by image id: ``images`` entries with their ``annotations`` under
    ``"annotations"`` (for tests and comparisons)."""
    with open(os.path.join(output_dir, SUMMARY_FILE)) as f:
        files = json.load(f)["files"]
    records: Dict[int, dict] = {}
    for name in files:
        with open(os.path.join(output_dir, name)) as f:
            data = json.load(f)
        for image in data["images"]:
            if image["id"] in records:
                raise InferenceError(f"{name}: image id {image['id']} twice")
            records[image["id"]] = dict(image, annotations=[])
        for annotation in data["annotations"]:
            records[annotation["image_id"]]["annotations"].append(annotation)
    return records

