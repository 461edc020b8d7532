"""Online detection with Ray Serve: ``POST /detect`` and ``GET /health`` on 127.0.0.1 only, with dynamic
batching (``@serve.batch``) of concurrent requests into one runtime call.

    from ppfuse.scale import cluster, serve
    with cluster.connect():
        url = serve.start(serve.ServeOptions(WorkerSpec(model_dir), replicas=2, max_batch_size=8))
        ...                                   # POST images to url + "/detect"
        serve.stop()

``POST /detect`` takes the image as the body (``Content-Type: image/jpeg``, ``image/png``, ... or
``application/octet-stream``) or as the ``image`` field of a ``multipart/form-data`` form (``curl -F
image=@x.jpg``); ``?threshold=0.3`` overrides the export's score threshold. It answers ``tools/infer.py``'s
detections as JSON. A bad request gets a 4xx and one line (``{"error": "..."}``): an empty body (400), what
is not an image (400), a body over :data:`MAX_BODY_BYTES` or an image over :data:`MAX_PIXELS` (413), another
content type (415), an unknown path (404) or method (405). The replica goes on serving.

Needs the ``scale`` extra (imports ray at import).
"""
from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import os
import socket
import struct
from dataclasses import dataclass
from email.parser import BytesParser
from email.policy import HTTP
from typing import Dict, List, Optional, Tuple

import numpy as np
from ray import serve

from ppfuse.deploy import inference
from ppfuse.errors import InferenceError, first_line
from ppfuse.runtime import check_options, runtime_class
from ppfuse.scale.cluster import ClusterInfo, check_fits
from ppfuse.scale.worker import BatchDetector, WorkerSpec, preflight

HOST = "127.0.0.1"  # never another address: put a proxy of your own in front to serve other machines
APP_NAME = "ppfuse"
DEPLOYMENT_NAME = "ppfuse_detector"
MAX_BODY_BYTES = 20 * 2 ** 20  # 20 MiB of request body
MAX_PIXELS = 40_000_000  # width x height of the decoded image, e.g. 8000 x 5000
IMAGE_TYPES = ("image/jpeg", "image/jpg", "image/png", "image/bmp", "image/webp", "image/tiff", "image/x-ms-bmp",
               "application/octet-stream")
# Serve settings that make it listen elsewhere than the HTTP proxy on HOST
OTHER_LISTENERS = ("RAY_SERVE_ENABLE_HA_PROXY", "RAY_SERVE_ENABLE_DIRECT_INGRESS")


@dataclass
class ServeOptions:
    """A detection service: what each replica loads, how many replicas, the largest dynamic batch (1: no
    batching, each request runs alone) and how long a batch waits to fill, the port, the request limits."""
    spec: WorkerSpec
    replicas: int = 1
    max_batch_size: int = 8
    batch_wait_timeout_s: float = 0.01
    port: int = 8000
    max_body_bytes: int = MAX_BODY_BYTES
    max_pixels: int = MAX_PIXELS

    def validate(self) -> None:
        if self.replicas < 1:
            raise InferenceError(f"--replicas {self.replicas}: use 1 or more")
        if self.max_batch_size < 1:
            raise InferenceError(f"--max_batch_size {self.max_batch_size}: use 1 (no batching) or more")
        if not 0 <= self.batch_wait_timeout_s <= 10:
            raise InferenceError(f"--batch_wait_ms {self.batch_wait_timeout_s * 1000:g}: use 0 to 10000")
        if not 1 <= self.port <= 65535:
            raise InferenceError(f"--port {self.port}: use 1 to 65535")
        if self.max_body_bytes < 1 or self.max_pixels < 1:
            raise InferenceError("the request limits must be positive")


class BadRequest(Exception):
    """A request the service refuses: its HTTP status and one line."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


# --- requests: pure functions -----------------------------------------------------------------------------------


def image_size(data: bytes) -> Optional[Tuple[int, int]]:
    """``(width, height)`` from a PNG, JPEG, GIF or BMP header without decoding it, or None (another format,
    or a header that does not say) -- so a small file of a huge image is refused before it is decoded."""
    if data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) >= 24:
        return struct.unpack(">II", data[16:24])
    if data[:6] in (b"GIF87a", b"GIF89a") and len(data) >= 10:
        return struct.unpack("<HH", data[6:10])
    if data[:2] == b"BM" and len(data) >= 26:
        width, height = struct.unpack("<ii", data[18:26])
        return abs(width), abs(height)
    if data[:2] == b"\xff\xd8":
        position = 2
        while position + 9 <= len(data):
            if data[position] != 0xFF:
                return None
            marker = data[position + 1]
            if marker == 0xFF:  # fill byte
                position += 1
                continue
            if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:  # no length
                position += 2
                continue
            length = struct.unpack(">H", data[position + 2:position + 4])[0]
            if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):  # start of frame
                height, width = struct.unpack(">HH", data[position + 5:position + 9])
                return width, height
            position += 2 + length
    return None


def image_from_body(content_type: str, body: bytes, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """The image (BGR) a ``POST /detect`` carries, or :class:`BadRequest`.

    Args:
        content_type: the request's ``Content-Type`` (an image type, ``application/octet-stream`` or
            ``multipart/form-data`` with the image in its ``image`` field or its only file).
        body: the whole body (its size is checked before it is read).
        max_pixels: the largest width x height decoded.
    """
    kind = (content_type or "").split(";")[0].strip().lower()
    if kind == "multipart/form-data":
        body = _multipart_image(content_type, body)
    elif kind not in IMAGE_TYPES:
        raise BadRequest(415, f"Content-Type {kind or '(none)'}: send the image as the body with an image/* type "
                              "or application/octet-stream, or as the 'image' field of multipart/form-data")
    if not body:
        raise BadRequest(400, "empty body: send an image (JPEG, PNG, BMP, WebP, TIFF)")
    size = image_size(body)
    if size and size[0] * size[1] > max_pixels:
        raise BadRequest(413, f"image of {size[0]} x {size[1]} pixels: the limit is {max_pixels} pixels")
    import cv2
    try:
        image = cv2.imdecode(np.frombuffer(body, np.uint8), cv2.IMREAD_COLOR)
    except cv2.error:
        image = None
    if image is None:
        raise BadRequest(400, f"not an image OpenCV can decode ({len(body)} bytes), or over {max_pixels} pixels")
    if image.shape[0] * image.shape[1] > max_pixels:
        raise BadRequest(413, f"image of {image.shape[1]} x {image.shape[0]} pixels: the limit is {max_pixels} "
                              "pixels")
    return image


def _multipart_image(content_type: str, body: bytes) -> bytes:
    message = BytesParser(policy=HTTP).parsebytes(b"Content-Type: " + content_type.encode("latin-1") +
                                                  b"\r\n\r\n" + body)
    if not message.is_multipart():
        raise BadRequest(400, "multipart/form-data without parts (or without its boundary)")
    files = []
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        data = part.get_payload(decode=True) or b""
        if name == "image":
            return data
        if part.get_param("filename", header="content-disposition") is not None:
            files.append(data)
    if len(files) == 1:
        return files[0]
    raise BadRequest(400, "multipart/form-data: put the image in a field named 'image' (curl -F image=@photo.jpg)")


def threshold_from_query(query: Dict[str, str]) -> Optional[float]:
    if "threshold" not in query:
        return None
    try:
        value = float(query["threshold"])
    except ValueError:
        value = float("nan")
    if not 0 <= value <= 1:
        raise BadRequest(400, f"threshold={query['threshold']}: use a number from 0 to 1")
    return value


def _error(status: int, message: str):
    from starlette.responses import JSONResponse
    return JSONResponse({"error": message}, status_code=status)


# --- the replica ------------------------------------------------------------------------------------------------


@serve.deployment(name=DEPLOYMENT_NAME)
class DetectorDeployment:
    """One replica: the export loaded once (:class:`~ppfuse.scale.worker.BatchDetector`); decoding and
    preprocessing on one thread, the runtime on another, so the event loop keeps taking requests (and
    filling the next batch) while a batch runs."""

    def __init__(self, spec: WorkerSpec, max_batch_size: int, batch_wait_timeout_s: float, max_body_bytes: int,
                 max_pixels: int):
        # OpenCV's own decoder limit, read at its first decode in this process: also for formats whose header
        # image_size does not read
        os.environ["OPENCV_IO_MAX_IMAGE_PIXELS"] = str(max_pixels)
        self.worker = BatchDetector(spec)
        self.preprocess = self.worker.detector.preprocess
        self.max_body_bytes, self.max_pixels = max_body_bytes, max_pixels
        self.batching = max_batch_size > 1
        if self.batching:
            self._detect_batch.set_max_batch_size(max_batch_size)
            self._detect_batch.set_batch_wait_timeout_s(batch_wait_timeout_s)
        self.max_batch_size = max_batch_size
        self.runtime_thread = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="ppfuse-runtime")
        self.decode_thread = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="ppfuse-decode")
        self.batch_sizes: collections.Counter = collections.Counter()
        self.served = 0
        sample = self.preprocess(np.full((64, 64, 3), 127, np.uint8))
        self.ran = self.worker.what_ran(sample)  # also the first run, before any request waits on it

    async def __call__(self, request):
        from starlette.responses import JSONResponse
        path = request.url.path.rstrip("/") or "/"
        if path == "/health":
            if request.method != "GET":
                return _allow("GET", path)
            return JSONResponse(self.health())
        if path != "/detect":
            return _error(404, f"{path}: not found; POST an image to /detect, GET /health")
        if request.method != "POST":
            return _allow("POST", path)
        try:
            threshold = threshold_from_query(dict(request.query_params))
            body = await self._body(request)
            loop = asyncio.get_running_loop()
            image, feed = await loop.run_in_executor(self.decode_thread, self._decode, request.headers.get(
                "content-type", ""), body)
        except BadRequest as exc:
            return _error(exc.status, str(exc))
        except Exception as exc:  # noqa: BLE001  -- an image the preprocessing cannot take
            return _error(400, f"cannot preprocess the image: {first_line(exc)}")
        item = (feed, image.shape[:2], threshold)
        try:
            result, batch_size = await (self._detect_batch(item) if self.batching else self._detect_one(item))
        except Exception as exc:  # noqa: BLE001  -- a 500 with one line, the replica stays
            return _error(500, f"detection failed: {first_line(exc)}")
        self.served += 1
        if "error" in result:
            return _error(500, result["error"])
        return JSONResponse({"height": int(image.shape[0]), "width": int(image.shape[1]),
                             "threshold": self.worker.threshold if threshold is None else threshold,
                             "detections": result["detections"], "worker": self.worker.name,
                             "batch_size": batch_size})

    async def _body(self, request) -> bytes:
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
            raise BadRequest(413, f"body of {int(declared)} bytes: the limit is {self.max_body_bytes} bytes")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > self.max_body_bytes:
                raise BadRequest(413, f"body over {self.max_body_bytes} bytes: the limit is {self.max_body_bytes} "
                                      "bytes")
            chunks.append(chunk)
        return b"".join(chunks)

    def _decode(self, content_type: str, body: bytes):
        image = image_from_body(content_type, body, self.max_pixels)
        return image, self.preprocess(image)

    async def _detect_one(self, item):
        loop = asyncio.get_running_loop()
        results = await loop.run_in_executor(self.runtime_thread, self._detect, [item])
        return results[0], 1

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def _detect_batch(self, items: List[tuple]) -> List[tuple]:
        loop = asyncio.get_running_loop()
        results = await loop.run_in_executor(self.runtime_thread, self._detect, items)
        return [(result, len(items)) for result in results]

    def _detect(self, items: List[tuple]) -> List[dict]:
        self.batch_sizes[len(items)] += 1
        try:
            return self.worker.detect([i[0] for i in items], [i[1] for i in items], [i[2] for i in items])
        except Exception as exc:  # noqa: BLE001  -- a 500 with one line, the replica stays
            return [{"error": f"detection failed: {first_line(exc)}"}] * len(items)

    def health(self) -> dict:
        spec = self.worker.spec
        return {"status": "ok", "worker": self.worker.name, "model_dir": os.path.abspath(spec.model_dir),
                "runtime": spec.runtime, "precision": spec.options.precision, "ran": self.ran,
                "max_batch_size": self.max_batch_size, "served": self.served,
                "batches": {str(k): v for k, v in sorted(self.batch_sizes.items())}}


def _allow(method: str, path: str):
    response = _error(405, f"{path}: use {method}")
    response.headers["Allow"] = method
    return response


# --- start and stop ---------------------------------------------------------------------------------------------


def _check_port_free(port: int) -> None:
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((HOST, port))
        except OSError as exc:
            raise InferenceError(f"--port {port}: {HOST}:{port} is not free ({exc.strerror}); choose another "
                                 "--port") from None


def _check_listening(port: int) -> None:
    """Serve keeps the HTTP settings of an instance already running on a joined cluster (and only warns):
    refuse to deploy behind one that listens elsewhere."""
    try:
        from ray.serve.context import _get_global_client  # not public: the settings Serve really runs with
        config = _get_global_client().http_config
        host, port_used = config.host, config.port
    except Exception:  # noqa: BLE001  -- another Ray version: the settings cannot be read back
        return
    if (host, port_used) != (HOST, port):
        raise InferenceError(f"Ray Serve already runs on this cluster with HTTP on {host}:{port_used}, not "
                             f"{HOST}:{port}; stop it (serve shutdown) or use that cluster's own settings")


def check(options: ServeOptions, cluster: ClusterInfo) -> None:
    """Everything that can be refused before a replica starts, in one line each."""
    options.validate()
    spec = options.spec
    for name in OTHER_LISTENERS:
        if os.environ.get(name, "0") == "1":
            raise InferenceError(f"{name}=1 makes Ray Serve listen on other addresses than {HOST}; unset it")
    runtime_class(spec.runtime)
    gpu = spec.options.device == "gpu"
    check_fits("replicas", options.replicas, 1 if gpu else spec.options.cpu_threads, 1 if gpu else 0, cluster)
    check_options(spec.options, spec.runtime)
    if not os.path.isdir(spec.model_dir):
        raise InferenceError(f"--model_dir {spec.model_dir}: not a directory")
    inference.Preprocess.from_infer_cfg(spec.model_dir)
    preflight(spec)


def start(options: ServeOptions, cluster: ClusterInfo) -> str:
    """Deploy the detector on the connected cluster and wait until every replica is up; the service's URL.

    Raises:
        InferenceError: options refused by :func:`check`, a port in use, replicas that cannot start.
    """
    check(options, cluster)
    _check_port_free(options.port)
    spec = options.spec
    gpu = spec.options.device == "gpu"
    serve.start(proxy_location="HeadOnly", http_options={"host": HOST, "port": options.port},
                logging_config={"enable_access_log": False, "log_level": "WARNING"})
    _check_listening(options.port)
    deployment = DetectorDeployment.options(
        num_replicas=options.replicas,
        ray_actor_options={"num_cpus": 1 if gpu else spec.options.cpu_threads, "num_gpus": 1 if gpu else 0},
        # a batch fills only from requests the replica has already taken
        max_ongoing_requests=max(4, 2 * options.max_batch_size),
        max_constructor_retry_count=2, health_check_period_s=2.0, graceful_shutdown_timeout_s=5.0)
    app = deployment.bind(spec, options.max_batch_size, options.batch_wait_timeout_s, options.max_body_bytes,
                          options.max_pixels)
    try:
        serve.run(app, name=APP_NAME, route_prefix="/", blocking=False)
    except Exception as exc:  # noqa: BLE001  -- Serve's deployment failure, in one line
        with contextlib.suppress(Exception):
            serve.delete(APP_NAME)
        raise InferenceError(f"the detection service did not start: {first_line(exc)}") from None
    return f"http://{HOST}:{options.port}"


def stop() -> None:
    """Remove the service and stop Serve on this cluster."""
    with contextlib.suppress(Exception):
        serve.shutdown()


def status_line(url: str, options: ServeOptions) -> str:
    batching = (f"dynamic batching up to {options.max_batch_size} requests, {options.batch_wait_timeout_s * 1000:g} "
                "ms wait" if options.max_batch_size > 1 else "no dynamic batching")
    return (f"serving {options.spec.model_dir} at {url} (POST /detect, GET /health): {options.replicas} "
            f"replica{'s' * (options.replicas != 1)}, {options.spec.runtime} {options.spec.options.precision}, "
            f"{batching}")

