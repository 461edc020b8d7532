"""One loaded export running batches of preprocessed images: what a Ray Data actor and a Serve replica hold.

Preprocessing is :class:`ppfuse.deploy.inference.Preprocess` (``infer_cfg.yml``, the code ``tools/infer.py``
runs) and happens before the worker; post-processing is ``tools/infer.py``'s (score threshold, boxes clipped
to the image), so a record here holds the detections ``tools/infer.py`` prints for the same image.
"""
from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import numpy as np

from ppfuse.deploy import inference
from ppfuse.errors import InferenceError, first_line
from ppfuse.export_format import read_report
from ppfuse.runtime.base import RuntimeOptions

# Runtimes whose export runs a batch of N images in one call. paddle2onnx writes PP-YOLOE's NMS
# (multiclass_nms3) for batch size 1 only, so ONNX Runtime and OpenVINO take one image per call.
BATCHED_RUNTIMES = ("paddle",)
NO_NMS = "{}: expected (bbox, bbox_num) outputs; export with NMS (no --no_nms) to run on images"


@dataclass
class WorkerSpec:
    """What every worker loads: the export, the runtime, its options and the score threshold (None: the
    export's ``draw_threshold``, as ``tools/infer.py``)."""
    model_dir: str
    runtime: str = "paddle"
    options: Optional[RuntimeOptions] = None
    threshold: Optional[float] = None

    def __post_init__(self):
        if self.options is None:
            self.options = RuntimeOptions()


def preflight(spec: WorkerSpec) -> None:
    """Load the export once in this process, as a worker will, so that what would fail in every worker (a
    missing file or extra, a precision this CPU cannot run) is one line here, before any worker starts. A GPU
    export is left to the workers, which have the GPUs.

    Raises:
        InferenceError: what the worker would have raised.
    """
    if spec.options.device != "gpu":
        BatchDetector(spec)


def worker_name() -> str:
    """``host:pid`` of this process: which worker produced a record (a restarted actor has a new pid)."""
    return f"{socket.gethostname()}:{os.getpid()}"


class BatchDetector:
    """An export loaded once (:class:`ppfuse.deploy.inference.Detector`), running lists of preprocessed
    inputs: images of one shape are stacked into one call where the runtime takes batches."""

    def __init__(self, spec: WorkerSpec):
        self.spec = spec
        if read_report(spec.model_dir).get("with_nms") is False:
            raise InferenceError(NO_NMS.format(spec.model_dir))
        self.detector = inference.Detector(spec.model_dir, spec.options, runtime=spec.runtime)
        self.threshold = self.detector.draw_threshold if spec.threshold is None else float(spec.threshold)
        self.batched = spec.runtime in BATCHED_RUNTIMES
        self.name = worker_name()
        self._ran: Optional[str] = None

    def what_ran(self, sample: Dict[str, np.ndarray]) -> str:
        """The runtime's settings and the precision it read back, once per worker (it may run ``sample``)."""
        if self._ran is None:
            runtime = self.detector.runtime
            self._ran = f"{runtime.settings()}: {runtime.confirm_precision(sample).line()}"
        return self._ran

    def _run(self, feeds: Sequence[Dict[str, np.ndarray]]) -> List[inference.Detections]:
        if len(feeds) == 1 or not self.batched:
            return [self.detector.detections(feed)[0] for feed in feeds]
        stacked = {key: np.concatenate([feed[key] for feed in feeds]) for key in feeds[0]}
        found = self.detector.detections(stacked)
        if len(found) != len(feeds):
            raise RuntimeError(f"the runtime returned {len(found)} results for {len(feeds)} images")
        return found

    def detect(self, feeds: Sequence[Dict[str, np.ndarray]], sizes: Sequence[Sequence[int]],
               thresholds: Optional[Sequence[Optional[float]]] = None) -> List[dict]:
        """Detections for each preprocessed input (``image``, ``scale_factor``, ``im_shape`` of batch 1), with
        the original image ``(height, width)`` of each for clipping.

        Args:
            feeds: the inputs, as :class:`ppfuse.deploy.inference.Preprocess` gives them.
            sizes: each image's ``(height, width)`` before preprocessing.
            thresholds: a score threshold per input (None: the worker's).

        Returns:
            One dict per input: ``detections`` (:meth:`Detections.to_list`, score >= the threshold, boxes
            clipped to the image) or ``error`` (one line) when the runtime failed on that image.
        """
        results: List[Optional[dict]] = [None] * len(feeds)
        groups: Dict[tuple, List[int]] = {}
        for index, feed in enumerate(feeds):
            groups.setdefault(tuple(feed["image"].shape), []).append(index)
        for indices in groups.values():
            try:
                found = self._run([feeds[i] for i in indices])
            except Exception:  # noqa: BLE001  -- one image may be what fails: run them one by one to say which
                found = None
            for position, index in enumerate(indices):
                try:
                    detections = found[position] if found is not None else self._run([feeds[index]])[0]
                except Exception as exc:  # noqa: BLE001  -- a failed image is a record, never a crashed job
                    results[index] = {"error": f"detection failed: {first_line(exc)}"}
                    continue
                threshold = thresholds[index] if thresholds and thresholds[index] is not None else self.threshold
                height, width = (int(v) for v in sizes[index])
                results[index] = {"detections": detections.above(threshold).clipped(height, width).to_list()}
        return results
