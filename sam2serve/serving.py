"""The HTTP layer: decode the request, hand the image to the inference worker, encode the answer.

`create_app(worker, ...)` serves whatever generator the worker runs (tests hand it a stub).
Every error is JSON with an "error" message and the server keeps serving: 400 for what is not
one image, 413 for each limit with its own message (the upload, the form's parts, a text field,
the image's pixels), 414 for a URL too long, 503 while
the model loads or when the queue is full (with Retry-After), 504 when a request waited too
long, 500 when inference failed for that image. GET /health says whether the model is ready;
GET /metrics gives Prometheus text. (wsgi.py answers what the HTTP server refuses itself.)

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
from flask import Flask, Response, abort, g, request
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge
from werkzeug.formparser import FormDataParser

from .amg import Generator
from .overlay import draw_masks
from .preprocess import ImageTooLarge, InvalidImage, decode_image
from .rle import RLE, answer_text
from .worker import Busy, InferenceWorker, NotReady, TimedOut, generate_each

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Limits:
    max_upload_bytes: int = 50 * 1024 * 1024
    max_pixels: int = 40_000_000  # e.g. 8000x5000; checked before the pixels are decoded
    max_form_parts: int = 1000  # multipart parts (Flask's default)
    max_form_field_bytes: int = 500_000  # a text field of the form (Flask's default); files may be larger
    max_url_bytes: int = 8192  # path and query string


UPLOAD_ENDPOINTS = ("/upload", "/upload_rle")
ROUTES = {"/upload": "POST", "/upload_rle": "POST", "/health": "GET", "/metrics": "GET"}  # path -> method
LOADING_RETRY_AFTER_S = 5


class UploadTooLarge(ValueError):
    def __init__(self, limits: Limits) -> None:
        super().__init__(f"upload larger than the limit of {limits.max_upload_bytes} bytes")


class FormTooLarge(ValueError):
    """The multipart form breaks one of its limits; the message says which."""


def form_limit_error(environ: dict, limits: Limits) -> FormTooLarge:
    """Which of the form's limits the form parser hit (werkzeug raises one error for both): the
    body, buffered by the HTTP server and at most the upload limit, is parsed again with the
    part limit alone."""
    too_many_parts = FormTooLarge(
        f"the form has more than {limits.max_form_parts} parts; send one multipart field named 'image'")
    field_too_large = FormTooLarge(
        f"a text field of the form is larger than the limit of {limits.max_form_field_bytes} bytes; "
        "send the image as a file (curl -F 'image=@file.jpg')")
    try:
        environ["wsgi.input"].seek(0)
    except (AttributeError, OSError, ValueError):  # not seekable: say both
        return FormTooLarge(f"{too_many_parts}, or {field_too_large}")
    parser = FormDataParser(max_form_parts=limits.max_form_parts, max_content_length=limits.max_upload_bytes)
    try:
        parser.parse_from_environ(environ)
    except RequestEntityTooLarge:
        return too_many_parts
    return field_too_large


def json_text(payload: object) -> str:
    # Errors and /health on one line too, like answer_text: an error in an xargs run
    # still takes exactly one line of the output.
    return json.dumps(payload, separators=(",", ":"))


def decode_upload(files: list[bytes], file_fields: list[str], limits: Limits) -> np.ndarray:
    """The image of the multipart field 'image' (`files`: the contents of every file sent in that
    field), checked and decoded."""
    if not files:
        raise InvalidImage(
            f"expected a multipart form field named 'image' (curl -F 'image=@file.jpg'); "
            f"received file fields: {file_fields or 'none'}"
        )
    if len(files) > 1:
        raise InvalidImage(f"expected one file in the field 'image', received {len(files)}; send one image per request")
    return decode_image(files[0], limits.max_pixels)


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
    elif isinstance(error, (ImageTooLarge, UploadTooLarge, FormTooLarge)):
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


def json_response(payload: object, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(json_text(payload), status=status, mimetype="application/json", headers=headers or {})


class Metrics:
    """The server's Prometheus metrics, in a registry of their own (one per app)."""

    def __init__(self, worker: InferenceWorker) -> None:
        self.registry = prom.CollectorRegistry()
        self.requests = prom.Counter(
            "sam2_requests", "HTTP requests by endpoint, method and status", ["endpoint", "method", "status"],
            registry=self.registry,
        )
        self.latency = prom.Histogram(
            "sam2_request_seconds", "Time from request to answer, of each endpoint's own method", ["endpoint"],
            registry=self.registry,
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

    def observe_request(self, path: str, method: str, status: int, seconds: float) -> None:
        endpoint = path if path in ROUTES else "other"
        self.requests.labels(endpoint, method, str(status)).inc()
        if ROUTES.get(path) == method:
            self.latency.labels(endpoint).observe(seconds)

    def text(self) -> bytes:
        return prom.generate_latest(self.registry)


def create_app(worker: InferenceWorker, limits: Limits = Limits(), info: dict | None = None) -> Flask:
    """The Flask app in front of one inference worker.

    `info` is shown by GET /health; the server fills it in once the model is loaded.
    """
    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = limits.max_upload_bytes
    app.config["MAX_FORM_PARTS"] = limits.max_form_parts
    app.config["MAX_FORM_MEMORY_SIZE"] = limits.max_form_field_bytes
    info = {} if info is None else info
    metrics = Metrics(worker)
    worker.observe_batch = metrics.observe_batch

    def uploaded_image() -> np.ndarray:
        worker.require_ready()  # refuse before reading the upload
        uploads = request.files.getlist("image")
        return decode_upload([upload.read() for upload in uploads], sorted(request.files), limits)

    @app.before_request
    def start_clock() -> None:
        g.started = time.perf_counter()
        if len(request.environ.get("PATH_INFO", "")) + len(request.environ.get("QUERY_STRING", "")) > limits.max_url_bytes:
            abort(414, description=f"URL longer than the limit of {limits.max_url_bytes} bytes")

    @app.after_request
    def count(response: Response) -> Response:
        metrics.observe_request(request.path, request.method, response.status_code,
                                time.perf_counter() - g.get("started", 0.0))
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
            return json_response({"status": "loading", **info}, 503, {"Retry-After": str(LOADING_RETRY_AFTER_S)})
        return json_response({"status": "ok", "queued": worker.queue_depth, **info})

    @app.get("/metrics")
    def prometheus_metrics() -> Response:
        return Response(metrics.text(), content_type=prom.CONTENT_TYPE_LATEST)  # carries its charset

    @app.errorhandler(HTTPException)
    def http_error(error: HTTPException) -> Response:
        if isinstance(error, RequestEntityTooLarge):  # Flask's limits on the request and its form
            if (request.content_length or 0) > limits.max_upload_bytes:
                return json_response({"error": str(UploadTooLarge(limits))}, 413)
            return json_response({"error": str(form_limit_error(request.environ, limits))}, 413)
        # Headers such as 405's Allow stay; the body becomes JSON.
        headers = {name: value for name, value in error.get_headers() if name.lower() != "content-type"}
        return json_response({"error": error.description}, error.code or 500, headers)

    @app.errorhandler(Exception)
    def any_error(error: Exception) -> Response:
        status, body, headers = error_answer(error)
        return Response(body, status=status, mimetype="application/json", headers=headers)

    return app
