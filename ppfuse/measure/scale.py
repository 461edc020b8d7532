"""Batch detection and serving on Ray, measured against a plain loop (``tools/scale_benchmark.py``).

On generated images (:mod:`ppfuse.measure.shapes`), one export, one runtime and precision:

* the plain loop: ``tools/infer.py``'s :class:`~ppfuse.deploy.inference.Detector`, one image after another in
  one process -- the reference detections and the baseline images/s;
* batch detection (:mod:`ppfuse.scale.batch`): images/s end to end (Ray Data's workers start inside it) and
  once the first record is in; records equal to the loop's, and exactly one per image;
* a batch job with one actor killed (SIGKILL) after the first records: every record once, and the cost;
* serving (:mod:`ppfuse.scale.serve`) at 1, 4 and 16 concurrent clients, with and without dynamic batching:
  latency p50/p99, requests/s, requests without an answer (lost), mean batch size, answers equal to the loop's;
* a load run with one replica killed: what the clients saw (failed attempts, retries, requests lost after their
  retries), and the time until a new replica answered.

Every run is bounded in images, requests and seconds, and talks to 127.0.0.1 only.
"""
from __future__ import annotations

import itertools
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np

from ppfuse.deploy import inference
from ppfuse.errors import InferenceError
from ppfuse.measure.results import table
from ppfuse.runtime import RuntimeOptions

BOX_TOLERANCE = 1e-3  # px: the same runtime on the same pixels
SCORE_TOLERANCE = 1e-5


@dataclass
class ScaleSettings:
    """What one benchmark run does; every count and time is a bound."""
    model_dir: str
    runtime: str = "paddle"
    precision: str = "fp32"
    threshold: Optional[float] = None  # None: the export's draw_threshold, as tools/infer.py
    images: int = 1000
    image_size: int = 320
    loop_threads: int = 2  # the plain loop's runtime threads (tools/infer.py's default)
    workers: int = 2  # batch actors
    cpu_threads: int = 1  # per actor and per replica
    batch_size: int = 8
    fault_images: int = 200
    replicas: int = 2
    max_batch_size: int = 8
    batch_wait_ms: float = 10.0
    clients: Sequence[int] = (1, 4, 16)
    requests: int = 64  # per serving level
    level_timeout_s: float = 60.0
    fault_requests: int = 120
    fault_timeout_s: float = 90.0
    port: int = 8000

    def spec(self, threads: int):
        from ppfuse.scale.worker import WorkerSpec
        return WorkerSpec(self.model_dir, self.runtime, RuntimeOptions(precision=self.precision, cpu_threads=threads),
                          self.threshold)


def make_images(directory: str, count: int, size: int) -> List[str]:
    from ppfuse.measure.shapes import write_split
    write_split(directory, "bench", count, seed=0, size=size)
    folder = os.path.join(directory, "bench")
    return sorted(os.path.join(folder, name) for name in os.listdir(folder))


def same_detections(got: Sequence[dict], want: Sequence[dict]) -> Optional[tuple]:
    """``(largest box difference, largest score difference)`` when ``got`` has ``want``'s detections in order
    (same classes, within the tolerances), else None."""
    if len(got) != len(want):
        return None
    box = score = 0.0
    for g, w in zip(got, want):
        if g["class_id"] != w["class_id"]:
            return None
        box = max(box, float(np.max(np.abs(np.subtract(g["box"], w["box"])))))
        score = max(score, abs(g["score"] - w["score"]))
    return (box, score) if box <= BOX_TOLERANCE and score <= SCORE_TOLERANCE else None


@dataclass
class Equality:
    compared: int = 0
    equal: int = 0
    max_box_diff: float = 0.0
    max_score_diff: float = 0.0
    detections: int = 0

    def add(self, got: Sequence[dict], want: Sequence[dict]) -> None:
        self.compared += 1
        self.detections += len(want)
        found = same_detections(got, want)
        if found is not None:
            self.equal += 1
            self.max_box_diff = max(self.max_box_diff, found[0])
            self.max_score_diff = max(self.max_score_diff, found[1])

    def cell(self) -> str:
        return f"{self.equal} of {self.compared}"


# --- the plain loop ---------------------------------------------------------------------------------------------


def plain_loop(settings: ScaleSettings, paths: Sequence[str]) -> tuple:
    """tools/infer.py's loop: read, detect, threshold, clip, one image after another. The detections of each
    image, and the run's figures."""
    detector = inference.Detector(settings.model_dir, RuntimeOptions(precision=settings.precision,
                                                                      cpu_threads=settings.loop_threads),
                                  settings.runtime)
    threshold = detector.draw_threshold if settings.threshold is None else settings.threshold
    reference: Dict[str, List[dict]] = {}
    start = time.perf_counter()
    for path in paths:
        image = inference.read_image(path)
        reference[path] = detector.predict(image).above(threshold).clipped(*image.shape[:2]).to_list()
    elapsed = time.perf_counter() - start
    return reference, {"images": len(paths), "elapsed_s": elapsed, "images_per_s": len(paths) / elapsed,
                       "threads": settings.loop_threads, "threshold": threshold,
                       "ran": detector.runtime.settings()}


# --- batch ------------------------------------------------------------------------------------------------------


def batch_run(settings: ScaleSettings, paths: Sequence[str], output_dir: str, cluster, reference: Dict[str, list],
              kill_after: Optional[int] = None) -> dict:
    """One batch job over ``paths``; with ``kill_after``, one actor is killed (SIGKILL, by the pid its records
    carry) once that many records are in."""
    from ppfuse.scale import batch
    job = batch.BatchJob(settings.spec(settings.cpu_threads), settings.workers, settings.batch_size)
    first: List[float] = []
    killed: List[tuple] = []
    start = time.perf_counter()

    def progress(state):
        if not first:
            first.append((time.perf_counter() - start, state.done))
        if kill_after is not None and not killed and state.done >= kill_after:
            victim = sorted(state.workers)[0]
            os.kill(int(victim.rsplit(":", 1)[1]), signal.SIGKILL)
            killed.append((victim, state.done, time.perf_counter() - start))

    summary = batch.run(job, paths, output_dir, cluster, progress=progress)
    elapsed = time.perf_counter() - start  # as a user waits: with the export's check and the actors' start
    records = batch.read_records(output_dir)
    equality = Equality()
    for image_id, path in enumerate(paths, 1):
        record = records.get(image_id)
        if record is None or "error" in record:
            continue
        got = [{"class_id": a["category_id"] - 1, "score": a["score"],
                "box": [a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]]}
               for a in record["annotations"]]
        equality.add(got, reference[path])
    first_s, first_done = first[0] if first else (elapsed, 0)
    steady = (len(paths) - first_done) / (elapsed - first_s) if elapsed > first_s else None
    return {"images": len(paths), "records": summary["records"], "distinct_ids": len(records),
            "errors": summary["errors"], "duplicates_dropped": summary["duplicates_dropped"],
            "passes": summary["passes"], "elapsed_s": elapsed, "images_per_s": len(paths) / elapsed,
            "job_summary_images_per_s": summary["images_per_s"],
            "first_record_s": first_s, "steady_images_per_s": steady, "equality": equality,
            "workers": summary["ran"]["workers"], "workers_seen": summary["ran"]["workers_seen"],
            "killed": {"worker": killed[0][0], "after_records": killed[0][1], "at_s": killed[0][2]} if killed else None}


# --- serving ----------------------------------------------------------------------------------------------------


@dataclass
class LoadResult:
    """What the clients of one load run saw."""
    clients: int
    sent: int = 0
    answered: int = 0  # 200 with detections
    failed: int = 0  # an HTTP error after every retry
    no_answer: int = 0  # no HTTP answer after every retry
    failed_attempts: List[str] = field(default_factory=list)
    retried: int = 0
    latencies_ms: List[float] = field(default_factory=list)
    batch_sizes: List[int] = field(default_factory=list)
    workers: Dict[str, int] = field(default_factory=dict)
    elapsed_s: float = 0.0
    equality: Equality = field(default_factory=Equality)

    @property
    def lost(self) -> int:
        """Requests that did not get their detections."""
        return self.sent - self.answered

    def percentile(self, q: float) -> Optional[float]:
        return float(np.percentile(self.latencies_ms, q)) if self.latencies_ms else None

    def summary(self) -> dict:
        return {"clients": self.clients, "sent": self.sent, "answered": self.answered, "lost": self.lost,
                "failed_with_status": self.failed, "no_answer": self.no_answer, "retried": self.retried,
                "failed_attempts": len(self.failed_attempts),
                "failed_attempt_examples": sorted(set(self.failed_attempts))[:5],
                "p50_ms": self.percentile(50), "p99_ms": self.percentile(99),
                "mean_ms": float(np.mean(self.latencies_ms)) if self.latencies_ms else None,
                "requests_per_s": self.answered / self.elapsed_s if self.elapsed_s else None,
                "mean_batch_size": float(np.mean(self.batch_sizes)) if self.batch_sizes else None,
                "answers_equal": self.equality.cell(), "workers": self.workers, "elapsed_s": self.elapsed_s}


def load(url: str, paths: Sequence[str], reference: Dict[str, list], clients: int, requests: int,
         timeout_s: float, retries: int = 0, keep_going: Optional[Callable[[LoadResult], bool]] = None,
         on_answer: Optional[Callable[[LoadResult, dict], None]] = None) -> LoadResult:
    """``clients`` threads, each with its own connection, send images one request after another until
    ``requests`` are sent (and ``keep_going`` says stop) or ``timeout_s`` passed; bounded in both."""
    from ppfuse.scale.client import DetectClient, RequestError
    result = LoadResult(clients)
    counter, lock = itertools.count(), threading.Lock()
    deadline = time.monotonic() + timeout_s
    hard_cap = max(requests, 1) * 50  # keep_going may extend a run, never without bound

    def more(index: int) -> bool:
        if time.monotonic() >= deadline or index >= hard_cap:
            return False
        if index < requests:
            return True
        return keep_going is not None and keep_going(result)

    def client_thread():
        with DetectClient(url, timeout=60, retries=retries, backoff_s=0.25) as client:
            while True:
                with lock:
                    index = next(counter)
                    if not more(index):
                        return
                    result.sent += 1
                path = paths[index % len(paths)]
                start = time.perf_counter()
                try:
                    answer = client.detect(path)
                except RequestError as exc:
                    with lock:
                        if exc.status:
                            result.failed += 1
                        else:
                            result.no_answer += 1
                    continue
                finally:
                    with lock:
                        result.failed_attempts += client.failures
                        result.retried += client.retried
                        client.failures, client.retried = [], 0
                latency = (time.perf_counter() - start) * 1000
                with lock:
                    result.answered += 1
                    result.latencies_ms.append(latency)
                    result.batch_sizes.append(answer["batch_size"])
                    result.workers[answer["worker"]] = result.workers.get(answer["worker"], 0) + 1
                    result.equality.add(answer["detections"], reference[path])
                    if on_answer is not None:
                        on_answer(result, answer)

    threads = [threading.Thread(target=client_thread, name=f"load-{i}", daemon=True) for i in range(clients)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=timeout_s + 120)
    result.elapsed_s = time.perf_counter() - start
    return result


def serving_levels(settings: ScaleSettings, cluster, paths: Sequence[str], reference: Dict[str, list],
                   log: Callable[[str], None]) -> List[dict]:
    """Latency and throughput at each client count, without and with dynamic batching."""
    from ppfuse.scale import serve
    rows = []
    for max_batch in (1, settings.max_batch_size):
        options = serve.ServeOptions(settings.spec(settings.cpu_threads), settings.replicas, max_batch,
                                     settings.batch_wait_ms / 1000, settings.port)
        url = serve.start(options, cluster)
        try:
            load(url, paths, reference, 2, 2 * settings.replicas, settings.level_timeout_s)  # warm-up, not counted
            for clients in settings.clients:
                result = load(url, paths, reference, clients, settings.requests, settings.level_timeout_s)
                row = dict(result.summary(), max_batch_size=max_batch)
                rows.append(row)
                log(f"serving, max batch {max_batch}, {clients} clients: {row['requests_per_s']:.1f} requests/s, "
                    f"p50 {row['p50_ms']:.0f} ms, p99 {row['p99_ms']:.0f} ms, lost {row['lost']}")
        finally:
            serve.stop()
    return rows


def serving_fault(settings: ScaleSettings, cluster, paths: Sequence[str], reference: Dict[str, list],
                  log: Callable[[str], None]) -> dict:
    """A load run with retries in which one replica is killed (SIGKILL) after a quarter of the requests; the
    load goes on until a replica that was not there before the kill has answered (bounded)."""
    from ppfuse.scale import serve
    options = serve.ServeOptions(settings.spec(settings.cpu_threads), settings.replicas, settings.max_batch_size,
                                 settings.batch_wait_ms / 1000, settings.port)
    url = serve.start(options, cluster)
    state = {"before": set(), "killed": None, "killed_at": None, "recovered_s": None, "answers_after": 0}
    start = time.monotonic()

    def on_answer(result: LoadResult, answer: dict) -> None:
        worker = answer["worker"]
        if state["killed"] is None:
            state["before"].add(worker)
            if result.answered >= settings.fault_requests // 4 and len(state["before"]) >= min(2, settings.replicas):
                state["killed"], state["killed_at"] = worker, time.monotonic()
                os.kill(int(worker.rsplit(":", 1)[1]), signal.SIGKILL)
        elif worker not in state["before"]:
            if state["recovered_s"] is None:
                state["recovered_s"] = time.monotonic() - state["killed_at"]
            state["answers_after"] += 1

    def keep_going(result: LoadResult) -> bool:  # until the new replica has answered a few requests
        return state["killed"] is None or state["answers_after"] < 4

    try:
        load(url, paths, reference, 2, 2 * settings.replicas, settings.level_timeout_s)  # warm-up
        result = load(url, paths, reference, 4, settings.fault_requests, settings.fault_timeout_s, retries=4,
                      keep_going=keep_going, on_answer=on_answer)
    finally:
        serve.stop()
    row = dict(result.summary(), killed=state["killed"], killed_after_s=(state["killed_at"] or start) - start,
               new_replica_answered_after_s=state["recovered_s"], answers_by_new_replica=state["answers_after"])
    recovered = "never" if state["recovered_s"] is None else f"after {state['recovered_s']:.1f} s"
    log(f"serving fault: killed {state['killed']}; {result.retried} retries, {len(result.failed_attempts)} failed "
        f"attempts, {result.lost} lost; a new replica answered {recovered}")
    return row


# --- the whole run ----------------------------------------------------------------------------------------------


def run(settings: ScaleSettings, workdir: str, cluster, log: Callable[[str], None] = print) -> tuple:
    """Every measurement in order, on the connected Ray cluster; ``(markdown body, data)`` for
    :func:`ppfuse.measure.results.write`. Images and batch outputs go to ``workdir``."""
    from ppfuse.export_format import read_report
    if settings.images < 1 or not 1 <= settings.fault_images <= settings.images:
        raise InferenceError("--images must be 1 or more, --fault_images from 1 to --images")
    load_before = os.getloadavg()
    started = time.perf_counter()
    paths = make_images(os.path.join(workdir, "images"), settings.images, settings.image_size)
    log(f"generated {len(paths)} images of {settings.image_size} x {settings.image_size}")
    reference, loop = plain_loop(settings, paths)
    log(f"plain loop: {loop['images_per_s']:.2f} images/s ({loop['ran']}, {settings.loop_threads} threads)")
    batched = batch_run(settings, paths, os.path.join(workdir, "batch"), cluster, reference)
    log(f"Ray batch: {batched['images_per_s']:.2f} images/s end to end, "
        f"{batched['steady_images_per_s'] or 0:.2f} after the first record; equal {batched['equality'].cell()}")
    subset = paths[:settings.fault_images]
    faulted = batch_run(settings, subset, os.path.join(workdir, "batch_fault"), cluster, reference,
                        kill_after=max(1, settings.fault_images // 10))
    log(f"Ray batch with an actor killed: {faulted['records']} records for {len(subset)} images "
        f"({faulted['distinct_ids']} distinct); equal {faulted['equality'].cell()}")
    levels = serving_levels(settings, cluster, paths, reference, log)
    fault = serving_fault(settings, cluster, paths, reference, log)
    report = read_report(settings.model_dir)
    data = {"settings": settings, "cluster": cluster.line(), "random_weights": bool(report.get("random_weights")),
            "load_average_before": load_before, "load_average_after": os.getloadavg(),
            "duration_s": time.perf_counter() - started, "plain_loop": loop, "batch": batched,
            "batch_fault": faulted, "serving": levels, "serving_fault": fault}
    return markdown(data), data


def _f(value, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def markdown(data: dict) -> str:
    s: ScaleSettings = data["settings"]
    loop, batched, faulted = data["plain_loop"], data["batch"], data["batch_fault"]
    lines = [f"Export `{s.model_dir}`, {s.runtime} {s.precision}, score threshold {loop['threshold']:g}; "
             f"{s.images} generated shapes images of {s.image_size} x {s.image_size}; {data['cluster']}, started "
             "inside the benchmark's process; everything on 127.0.0.1.",
             f"Load average (1, 5, 15 min) before: {', '.join(f'{v:.2f}' for v in data['load_average_before'])}; "
             f"after: {', '.join(f'{v:.2f}' for v in data['load_average_after'])} -- other work on the machine "
             "shows here. The whole run took {:.0f} s.".format(data["duration_s"])]
    if data["random_weights"]:
        lines.append("**Random weights**: detections are compared number for number, not for meaning.")
    lines += ["", "## Batch detection", "",
              "Images/s end to end includes starting the actors (each loads the export once); \"after the first "
              "record\" is the rate once the first record is in. Equal: images whose detections match the plain "
              f"loop's (same classes, boxes within {BOX_TOLERANCE} px, scores within {SCORE_TOLERANCE}).", ""]
    rows = [["plain loop, tools/infer.py's Detector, one process", loop["images"], f"1 x {loop['threads']}", 1,
             _f(loop["images_per_s"], 2), "-", "-", loop["images"], "-", "reference"]]
    killed = faulted["killed"]
    for name, run in (("Ray Data + actor pool", batched),
                      (f"same, one actor killed after {killed['after_records'] if killed else '?'} records", faulted)):
        rows.append([name, run["images"], f"{run['workers']} x {s.cpu_threads}", s.batch_size,
                     _f(run["images_per_s"], 2), _f(run["steady_images_per_s"], 2), _f(run["first_record_s"]),
                     f"{run['records']} ({run['distinct_ids']} distinct)", run["duplicates_dropped"],
                     run["equality"].cell()])
    lines.append(table(["run", "images", "workers x threads", "batch", "images/s end to end",
                        "images/s after the first record", "first record after (s)", "records", "duplicates dropped",
                        "equal to the loop"], rows, "lrlrrrrrrl"))
    if killed:
        lines += ["", f"Killed: actor `{killed['worker']}` (SIGKILL) after {killed['after_records']} "
                  f"records. Workers that sent records: {', '.join(sorted(faulted['workers_seen']))} (a restarted "
                  f"actor is a new pid). Passes: {faulted['passes']} (a second pass runs only for ids that never "
                  "came back)."]
    lines += ["", "## Serving", "",
              f"{s.replicas} replicas x {s.cpu_threads} thread(s); each level sends {s.requests} requests (bounded "
              f"to {s.level_timeout_s:g} s) from N client threads, each on its own keep-alive connection, one request "
              "after another, no retries. Lost: requests without their detections. Latency is the client's, "
              "request to answer.", ""]
    rows = [["off" if r["max_batch_size"] == 1 else f"up to {r['max_batch_size']}", r["clients"], r["sent"], r["lost"],
             _f(r["p50_ms"]), _f(r["p99_ms"]), _f(r["requests_per_s"], 2), _f(r["mean_batch_size"], 2),
             r["answers_equal"]] for r in data["serving"]]
    lines.append(table(["dynamic batching", "clients", "requests", "lost", "p50 ms", "p99 ms", "requests/s",
                        "mean batch", "answers equal to the loop"], rows, "lrrrrrrrl"))
    f = data["serving_fault"]
    lines += ["", "## Fault: one replica killed during a load run", "",
              f"4 clients with up to 4 retries each (0.25 s backoff, doubling; 5xx and no-answer are retried, 4xx "
              f"never); dynamic batching up to {s.max_batch_size}; one replica killed (SIGKILL) after a quarter of "
              f"{s.fault_requests} requests; the load goes on until a new replica has answered (bounded to "
              f"{s.fault_timeout_s:g} s).", ""]
    lines.append(table(["requests sent", "answered", "lost", "failed attempts the clients saw", "retries",
                        "killed after (s)", "a new replica answered after (s)", "p50 ms", "p99 ms"],
                       [[f["sent"], f["answered"], f["lost"], f["failed_attempts"], f["retried"],
                         _f(f["killed_after_s"]), _f(f["new_replica_answered_after_s"]), _f(f["p50_ms"]),
                         _f(f["p99_ms"])]], "rrrrrrrrr"))
    if f["failed_attempt_examples"]:
        lines += ["", "What the clients saw (distinct failed attempts):", ""]
        lines += [f"- `{example}`" for example in f["failed_attempt_examples"]]
    lines += ["", f"Answers by replica: {f['workers']} (killed: `{f['killed']}`)."]
    return "\n".join(lines) + "\n"
