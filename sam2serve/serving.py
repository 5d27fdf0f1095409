"""The HTTP layer: decode the request, call the generator, encode the answer.

`create_app(generator, ...)` takes any object with `generate(image) -> list of RLE`, so tests
can hand it a stub. Every error is JSON with an "error" message; the server keeps serving.
"""

import io
import json
import logging
import threading
from dataclasses import dataclass

import numpy as np
from flask import Flask, Response, request
from PIL import Image
from werkzeug.exceptions import HTTPException

from .amg import Generator
from .preprocess import ImageTooLarge, InvalidImage, decode_image
from .rle import RLE, answer_text, rles_to_masks

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Limits:
    max_upload_bytes: int = 50 * 1024 * 1024
    max_pixels: int = 40_000_000  # e.g. 8000x5000; checked before the pixels are decoded


def json_response(payload: object, status: int = 200) -> Response:
    # Errors and /health on one line too, like answer_text: an error in an xargs run
    # still takes exactly one line of the output.
    body = json.dumps(payload, separators=(",", ":"))
    return Response(body, status=status, mimetype="application/json")


def draw_masks(image: np.ndarray, rles: list[RLE], alpha: float = 0.35, seed: int = 0) -> bytes:
    """PNG of the image with each mask blended in a random colour, largest mask first."""
    canvas = image.astype(np.float32)
    masks = rles_to_masks(rles)
    colours = np.random.default_rng(seed).uniform(0, 255, size=(len(masks), 3)).astype(np.float32)
    for index in np.argsort([-mask.sum() for mask in masks], kind="stable"):
        mask = masks[index]
        canvas[mask] = (1 - alpha) * canvas[mask] + alpha * colours[index]
    buffer = io.BytesIO()
    Image.fromarray(canvas.round().astype(np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def create_app(generator: Generator, limits: Limits = Limits(), info: dict | None = None) -> Flask:
    """The Flask app around one generator. `info` is shown by GET /health."""
    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = limits.max_upload_bytes
    # The model runs one image at a time: HTTP threads take turns.
    model_lock = threading.Lock()

    def uploaded_image() -> np.ndarray:
        if "image" not in request.files:
            received = sorted(request.files) or "none"
            raise InvalidImage(
                f"expected a multipart form field named 'image' (curl -F 'image=@file.jpg'); "
                f"received file fields: {received}"
            )
        return decode_image(request.files["image"].read(), limits.max_pixels)

    def generate(image: np.ndarray) -> list[RLE]:
        with model_lock:
            return generator.generate(image)

    @app.post("/upload_rle")
    def upload_rle() -> Response:
        """Masks as COCO uncompressed RLE: {"mask_0": {"size": [h, w], "counts": [...]}, ...}."""
        return Response(answer_text(generate(uploaded_image())), mimetype="application/json")

    @app.post("/upload")
    def upload() -> Response:
        """A PNG of the masks drawn over the image."""
        image = uploaded_image()
        return Response(draw_masks(image, generate(image)), mimetype="image/png")

    @app.get("/health")
    def health() -> Response:
        return json_response({"status": "ok", **(info or {})})

    @app.errorhandler(InvalidImage)
    def invalid_image(error: InvalidImage) -> Response:
        return json_response({"error": str(error)}, 400)

    @app.errorhandler(ImageTooLarge)
    def image_too_large(error: ImageTooLarge) -> Response:
        return json_response({"error": str(error)}, 413)

    @app.errorhandler(HTTPException)
    def http_error(error: HTTPException) -> Response:
        message = error.description
        if error.code == 413:
            message = f"upload larger than the limit of {limits.max_upload_bytes} bytes"
        return json_response({"error": message}, error.code or 500)

    @app.errorhandler(Exception)
    def internal_error(error: Exception) -> Response:
        log.exception("request failed")
        return json_response({"error": f"internal error: {type(error).__name__}: {error}"}, 500)

    return app
