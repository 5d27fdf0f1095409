"""The HTTP layer: decode the request, hand the image to the inference worker, encode the answer.

`create_app(worker, ...)` serves whatever generator the worker runs (tests hand it a stub).
Every error is JSON with an "error" message and the server keeps serving: 400 for what is not
an image, 413 for uploads or images over the limits, 503 while the model loads or when the
queue is full (with Retry-After), 504 when a request waited too long, 500 when inference
failed for that image. GET /health says whether the model is ready; GET /metrics gives
Prometheus text.

The request and answer formats (decode_upload, render_answer, error_answer, rle_lines) are
plain functions, shared with the Ray Serve app, the Ray Data job and the Modal app, so every
way of running the model answers byte for byte alike.
"""

import json
import logging
import time
from dataclasses import dataclass

import numpy as np
import prometheus_client as prom
import torch
from flask import Flask, Response, g, request
from werkzeug.exceptions import HTTPException

from .amg import Generator
from .preprocess import ImageTooLarge, InvalidImage, decode_image
from .overlay import draw_masks
from .rle import RLE, answer_text
from .worker import Busy, InferenceWorker, NotReady, TimedOut, generate_each

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Limits:
    max_upload_bytes: int = 50 * 1024 * 1024
    max_pixels: int = 40_000_000  # e.g. 8000x5000; checked before the pixels are decoded


UPLOAD_ENDPOINTS = ("/upload", "/upload_rle")
ENDPOINTS = (*UPLOAD_ENDPOINTS, "/health", "/metrics")
LOADING_RETRY_AFTER_S = 5


class UploadTooLarge(ValueError):
    def __init__(self, limits: Limits) -> None:
        super().__init__(f"upload larger than the limit of {limits.max_upload_bytes} bytes")


def json_text(payload: object) -> str:
    # Errors and /health on one line too, like answer_text: an error in an xargs run
    # still takes exactly one line of the output.
    return json.dumps(payload, separators=(",", ":"))


def decode_upload(data: bytes | None, file_fields: list[str], limits: Limits) -> np.ndarray:
    """The image of the multipart field 'image' (None when there is none), checked and decoded."""
    if data is None:
        raise InvalidImage(
            f"expected a multipart form field named 'image' (curl -F 'image=@file.jpg'); "
            f"received file fields: {file_fields or 'none'}"
        )
    return decode_image(data, limits.max_pixels)


def render_answer(endpoint: str, image: np.ndarray, rles: list[RLE]) -> tuple[bytes | str, str]:
    """(body, mimetype) of an upload endpoint's answer."""
    if endpoint == "/upload_rle":
        return answer_text(rles), "application/json"
    return draw_masks(image, rles), "image/png"


def error_answer(error: Exception) -> tuple[int, str, dict[str, str]]:
    """(status, JSON body, headers) for an error, the same in every front end."""
    retry_after = None
    if isinstance(error, InvalidImage):
        status = 400
    elif isinstance(error, (ImageTooLarge, UploadTooLarge)):
        status = 413
    elif isinstance(error, NotReady):
        status, retry_after = 503, LOADING_RETRY_AFTER_S
    elif isinstance(error, Busy):
        status, retry_after = 503, error.retry_after_s
    elif isinstance(error, TimedOut):
        status = 504
    elif isinstance(error, torch.OutOfMemoryError):
        log.error("out of memory: %s", error)
        return 500, json_text({"error": "inference ran out of memory for this image; try a smaller image"}), {}
    else:
        log.error("request failed", exc_info=error)
        return 500, json_text({"error": f"internal error: {type(error).__name__}: {error}"}), {}
    return status, json_text({"error": str(error)}), {} if retry_after is None else {"Retry-After": str(retry_after)}


def rle_lines(generator: Generator, files: list[bytes | None], limits: Limits = Limits()) -> list[str]:
    """One /upload_rle answer per image file (None: unreadable), as the xargs/curl workflow
    writes them: the RLE JSON, or the server's error JSON. The decodable images run as one batch;
    if it fails, one by one (generate_each, as the worker)."""
    lines: list[str | None] = [None] * len(files)
    images = {}
    for index, data in enumerate(files):
        try:
            if data is None:
                raise InvalidImage("the image file could not be read")
            images[index] = decode_image(data, limits.max_pixels)
        except (InvalidImage, ImageTooLarge) as error:
            lines[index] = error_answer(error)[1]
    answers = generate_each(generator, list(images.values())) if images else []
    for index, answer in zip(images, answers):
        lines[index] = error_answer(answer)[1] if isinstance(answer, Exception) else answer_text(answer)
    return lines


def json_response(payload: object, status: int = 200, retry_after_s: int | None = None) -> Response:
    headers = {} if retry_after_s is None else {"Retry-After": str(retry_after_s)}
    return Response(json_text(payload), status=status, mimetype="application/json", headers=headers)


class Metrics:
    """The server's Prometheus metrics, in a registry of their own (one per app)."""

    def __init__(self, worker: InferenceWorker) -> None:
        self.registry = prom.CollectorRegistry()
        self.requests = prom.Counter(
            "sam2_requests", "HTTP requests by endpoint and status", ["endpoint", "status"], registry=self.registry
        )
        self.latency = prom.Histogram(
            "sam2_request_seconds", "Time from request to answer", ["endpoint"], registry=self.registry,
            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600),
        )
        queue_depth = prom.Gauge("sam2_queue_depth", "Images waiting for the worker", registry=self.registry)
        queue_depth.set_function(lambda: worker.queue_depth)
        self.batch_sizes = prom.Histogram(
            "sam2_batch_size", "Images per worker batch", registry=self.registry, buckets=(1, 2, 4, 8, 16, 32, 64)
        )
        self.masks = prom.Histogram(
            "sam2_masks_per_image", "Masks answered per image", registry=self.registry,
            buckets=(0, 1, 5, 10, 25, 50, 100, 200, 500, 1000),
        )

    def observe_batch(self, batch_size: int, masks_per_image: list[int]) -> None:
        self.batch_sizes.observe(batch_size)
        for count in masks_per_image:
            self.masks.observe(count)

    def observe_request(self, endpoint: str, status: int, seconds: float) -> None:
        self.requests.labels(endpoint, str(status)).inc()
        self.latency.labels(endpoint).observe(seconds)

    def text(self) -> bytes:
        return prom.generate_latest(self.registry)


def create_app(worker: InferenceWorker, limits: Limits = Limits(), info: dict | None = None) -> Flask:
    """The Flask app in front of one inference worker.

    `info` is shown by GET /health; the server fills it in once the model is loaded.
    """
    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = limits.max_upload_bytes
    info = {} if info is None else info
    metrics = Metrics(worker)
    worker.observe_batch = metrics.observe_batch

    def uploaded_image() -> np.ndarray:
        worker.require_ready()  # refuse before reading the upload
        upload = request.files.get("image")
        return decode_upload(None if upload is None else upload.read(), sorted(request.files), limits)

    @app.before_request
    def start_clock() -> None:
        g.started = time.perf_counter()

    @app.after_request
    def count(response: Response) -> Response:
        endpoint = request.path if request.path in ENDPOINTS else "other"
        metrics.observe_request(endpoint, response.status_code, time.perf_counter() - g.get("started", 0.0))
        return response

    @app.post("/upload_rle")
    def upload_rle() -> Response:
        """Masks as COCO uncompressed RLE: {"mask_0": {"size": [h, w], "counts": [...]}, ...}."""
        return answer("/upload_rle")

    @app.post("/upload")
    def upload() -> Response:
        """A PNG of the masks drawn over the image."""
        return answer("/upload")

    def answer(endpoint: str) -> Response:
        image = uploaded_image()
        body, mimetype = render_answer(endpoint, image, worker.submit(image))
        return Response(body, mimetype=mimetype)

    @app.get("/health")
    def health() -> Response:
        if not worker.ready:
            return json_response({"status": "loading", **info}, 503, retry_after_s=LOADING_RETRY_AFTER_S)
        return json_response({"status": "ok", "queued": worker.queue_depth, **info})

    @app.get("/metrics")
    def prometheus_metrics() -> Response:
        return Response(metrics.text(), mimetype=prom.CONTENT_TYPE_LATEST)

    @app.errorhandler(HTTPException)
    def http_error(error: HTTPException) -> Response:
        if error.code == 413:  # Flask's MAX_CONTENT_LENGTH
            return json_response({"error": str(UploadTooLarge(limits))}, 413)
        return json_response({"error": error.description}, error.code or 500)

    @app.errorhandler(Exception)
    def any_error(error: Exception) -> Response:
        status, body, headers = error_answer(error)
        return Response(body, status=status, mimetype="application/json", headers=headers)

    return app
