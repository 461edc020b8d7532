"""The Ray cluster a job runs on: a local one started inside this process, or a running one joined with
``address``; and whether what a job asks for (CPUs, GPUs) fits in it."""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Iterator, Optional

from ppfuse.errors import InferenceError, first_line, require_module


def require_ray(needed_for: str = "ppfuse.scale"):
    """The ``ray`` module, or one line naming the ``scale`` extra that installs it."""
    return require_module("ray", needed_for, "scale", InferenceError)


@dataclass
class ClusterInfo:
    """Where a job runs: ``address`` (``local`` for a cluster this process started) and its resources."""
    address: str
    cpus: float
    gpus: float
    ray_version: str

    def line(self) -> str:
        gpus = f", {self.gpus:g} GPU" if self.gpus else ", no GPU"
        return f"Ray {self.ray_version} cluster {self.address}: {self.cpus:g} CPU{gpus}"


def describe(address: str) -> ClusterInfo:
    ray = require_ray()
    resources = ray.cluster_resources()
    return ClusterInfo(address, float(resources.get("CPU", 0)), float(resources.get("GPU", 0)), ray.__version__)


@contextlib.contextmanager
def connect(address: Optional[str] = None, num_cpus: Optional[int] = None, quiet: bool = True,
            needed_for: str = "ppfuse.scale") -> Iterator[ClusterInfo]:
    """A Ray cluster for the job, for the duration of the ``with`` block.

    Args:
        address: ``None`` starts a local cluster inside this process (stopped at the end); ``auto`` joins
            the cluster ``ray start`` started on this machine; ``ray://host:10001`` or ``host:6379`` joins
            another. A process already connected (``ray.init`` called before) keeps its cluster and leaves
            it running.
        num_cpus: CPUs of a local cluster (default: the machine's).
        quiet: keep Ray's INFO lines and the workers' output off the driver's screen.
        needed_for: what to name in the error when ray is not installed.

    Raises:
        InferenceError: ray is not installed, or no cluster answers at ``address``.
    """
    ray = require_ray(needed_for)
    if ray.is_initialized():
        yield describe(address or "already connected")
        return
    options = dict(include_dashboard=False, log_to_driver=not quiet,
                   logging_level=logging.WARNING if quiet else logging.INFO)
    if address:
        options["address"] = address
    else:
        options["num_cpus"] = num_cpus
    try:
        ray.init(**options)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        where = f"--address {address}" if address else "a local Ray cluster"
        raise InferenceError(f"{where}: Ray could not start or connect ({first_line(exc)})") from None
    try:
        yield describe(address or "local")
    finally:
        ray.shutdown()


def check_fits(what: str, count: int, cpus_each: float, gpus_each: float, cluster: ClusterInfo) -> None:
    """One line when ``count`` workers of ``cpus_each`` CPUs and ``gpus_each`` GPUs cannot all be placed:
    Ray would wait for them forever."""
    if gpus_each and cluster.gpus < count * gpus_each:
        have = f"{cluster.gpus:g} GPU" if cluster.gpus else "no GPU"
        raise InferenceError(f"--device gpu: the Ray cluster has {have} for {count} {what} of {gpus_each:g} GPU "
                             f"each ({cluster.line()}); use --device cpu, fewer {what}, or join a cluster with GPUs "
                             "(--address)")
    if cluster.cpus < count * cpus_each:
        raise InferenceError(f"{count} {what} x {cpus_each:g} CPU (--cpu_threads) need {count * cpus_each:g} CPUs; "
                             f"{cluster.line()}; use fewer {what} or fewer --cpu_threads")
