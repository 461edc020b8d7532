"""A small HTTP client of the detection service (:mod:`ppfuse.scale.serve`); standard library only.

    from ppfuse.scale.client import DetectClient
    client = DetectClient("http://127.0.0.1:8000", retries=2)
    result = client.detect("photo.jpg")            # a path, the file's bytes, or a BGR array
    for det in result["detections"]:
        print(det["label"], det["score"], det["box"])

One client holds one keep-alive connection: use one per thread. With ``retries``, a request that met a
connection error or a 5xx (a replica that died) is sent again, after ``backoff_s``, doubling; a 4xx is never
retried. :attr:`DetectClient.retried` and :attr:`DetectClient.failures` count what the client saw.
"""
from __future__ import annotations

import http.client
import json
import mimetypes
import os
import time
import urllib.parse
from typing import List, Optional, Union

import numpy as np

from ppfuse.errors import InferenceError

RETRIED_STATUSES = (500, 502, 503, 504)


class RequestError(InferenceError):
    """The service refused or failed a request: its HTTP status (0: no answer) and its one line."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class DetectClient:
    """``detect(image)`` and ``health()`` against ``url`` (``http://host:port``)."""

    def __init__(self, url: str = "http://127.0.0.1:8000", timeout: float = 60.0, retries: int = 0,
                 backoff_s: float = 0.2):
        parsed = urllib.parse.urlsplit(url)
        if parsed.scheme != "http" or not parsed.hostname:
            raise InferenceError(f"{url}: use http://HOST:PORT")
        self.host, self.port = parsed.hostname, parsed.port or 80
        self.timeout, self.retries, self.backoff_s = timeout, retries, backoff_s
        self._connection: Optional[http.client.HTTPConnection] = None
        self.retried = 0  # requests sent again
        self.failures: List[str] = []  # every failed attempt: "503: ..." or "ConnectionResetError: ..."

    def close(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None

    def __enter__(self) -> "DetectClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _request(self, method: str, path: str, body: Optional[bytes] = None, headers: Optional[dict] = None) -> dict:
        delay = self.backoff_s
        for attempt in range(self.retries + 1):
            if attempt:
                self.retried += 1
                time.sleep(delay)
                delay *= 2
            try:
                if self._connection is None:
                    self._connection = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
                self._connection.request(method, path, body=body, headers=headers or {})
                response = self._connection.getresponse()
                status, text = response.status, response.read().decode("utf-8", "replace")
            except (OSError, http.client.HTTPException) as exc:
                self.close()
                failure = RequestError(0, f"{method} {path}: no answer from {self.host}:{self.port} "
                                          f"({type(exc).__name__}: {exc})")
                self.failures.append(str(failure))
                continue
            if status == 200:
                return json.loads(text)
            try:
                message = json.loads(text)["error"]
            except (ValueError, KeyError, TypeError):
                message = text.strip().splitlines()[0] if text.strip() else response.reason
            failure = RequestError(status, f"{method} {path}: {status} {message}")
            self.failures.append(str(failure))
            if status not in RETRIED_STATUSES:
                raise failure
            self.close()
        raise failure

    def health(self) -> dict:
        """``GET /health`` of the replica that answers: its worker, what ran, batch sizes so far."""
        return self._request("GET", "/health")

    def detect(self, image: Union[str, bytes, np.ndarray], threshold: Optional[float] = None,
               content_type: Optional[str] = None) -> dict:
        """``POST /detect``: ``{"detections": [{"class_id", "label", "score", "box": [x1, y1, x2, y2]}], "height",
        "width", "threshold", "worker", "batch_size"}``.

        Args:
            image: a file path, encoded bytes (JPEG, PNG, ...) or a BGR ``uint8`` array (sent as PNG).
            threshold: the score threshold (default: the export's ``draw_threshold``).
            content_type: the body's type (default: from the file name, else ``application/octet-stream``).

        Raises:
            RequestError: a 4xx (the request is wrong: not retried) or a failure after every retry.
        """
        if isinstance(image, np.ndarray):
            import cv2
            ok, encoded = cv2.imencode(".png", image)
            if not ok:
                raise InferenceError("could not encode the array as PNG")
            body, kind = encoded.tobytes(), "image/png"
        elif isinstance(image, (bytes, bytearray)):
            body, kind = bytes(image), "application/octet-stream"
        else:
            with open(image, "rb") as f:
                body = f.read()
            kind = mimetypes.guess_type(os.fspath(image))[0] or "application/octet-stream"
        path = "/detect" + ("?" + urllib.parse.urlencode({"threshold": threshold}) if threshold is not None else "")
        return self._request("POST", path, body, {"Content-Type": content_type or kind})
