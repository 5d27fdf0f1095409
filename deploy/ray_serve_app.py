"""The server on a Ray cluster: Ray Serve, one replica per GPU, Ray Serve's own request batching.

Same endpoints, request and answer formats as server.py (POST /upload, /upload_rle and /embed
with the multipart field `image` or the image as the body, POST /segment, GET /health), the same
pipeline code and the same limits and error answers. Ray Serve queues, batches (`@serve.batch`)
and spreads requests over replicas; a full queue answers 503, in Ray Serve's own words (plain
text, no Retry-After). The web page too (GET /); not /metrics (Ray exports its own metrics).

    serve run deploy.ray_serve_app:build checkpoint_dir=~/checkpoints/sam2 model_type=large mode=fast
    curl -X POST http://127.0.0.1:8000/upload_rle -F 'image=@examples/shapes.jpg'

Arguments (key=value after the app): checkpoint_dir and model_type (omit both for the default
model), mode (ao), device (cuda where the cluster has GPUs: deploy.cluster_device), batch_size
(4: images per replica batch), batch_wait_ms (20), load_fast, compile_mode (the fast modes'
torch.compile mode, as server.py's --compile-mode), replicas (1, or "auto"), max_replicas (with
replicas=auto: its ceiling, 4), cpus (CPU cores per replica, 1: Ray gives a replica's torch that
many threads; on a CPU give it the machine's cores, e.g. cpus=2 on 2 cores: the micro model's
image 1.3 to 1.5 s instead of 1.6 to 2.0),
embedding_cache_mb (1024, per replica: an image_id is known to the replica that embedded it;
with several replicas send /segment as one multipart request with the image), connection_timeout
(60: seconds a request's body may stop arriving, or trickle in below 500 bytes/s after them,
before its 408, as server.py's), cors_origin (none: the origins, comma-separated, or *, whose web
pages may read the answers, as server.py's --cors-origin),
and server.py's mask-generation options with underscores (points_per_side=16, ...).

Autoscaling ("replicas=auto"): Ray Serve adds replicas, one GPU each, while replicas hold more
than `target_ongoing_requests` (2 x batch_size) requests, up to max_replicas, and removes them
after 5 minutes of less load.
"""

import asyncio
import contextvars
import functools
import io
import math
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qsl

import numpy as np
from ray import serve
from ray.exceptions import TaskCancelledError
from starlette.datastructures import FormData
from starlette.formparsers import MultiPartException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import RedirectResponse, Response

import sam2serve
from deploy import cluster_device
from sam2serve.amg import AMGConfig
from sam2serve.checkpoints import model_size, require_checkpoint_pair
from sam2serve.cli import AMG_OPTIONS, compile_modes, device_problem, option_value
from sam2serve.modes import DEFAULT_MODE, get_mode, load_pipeline, prompt_segmenter
from sam2serve.cpu import on_cpu
from sam2serve.worker import TRIM_AFTER_IDLE_S, Abandoned, BetweenBatches, ModelThread, generate_each, give_back_freed_memory
from sam2serve.interactive import EmbeddingCache
from sam2serve.protocol import (
    ANSWER_HEADERS, EMBEDDING_CACHE_BYTES, NAMELESS_PART, NO_SUCH_PAGE_FILE, PAGE_FILES, PAGE_SECURITY_POLICY,
    UPLOAD_ENDPOINTS, HeadersTooLarge, Limits, RequestStalled, UploadTooLarge, URLTooLong, cached_image_prompts,
    coco_annotations, content_type_parts, cross_origin_headers, decode_body_image, decode_upload, embed_answer,
    embed_image, epilogue_too_large, error_answer, form_limit_error, form_prompts, is_image_body, is_json,
    is_preflight, json_text, not_found_message, read_query, render_answer, require_cache_room, require_segment_form,
    require_segmenter, require_short_url, require_small_urlencoded, segment_answer, segment_coco, share_encodings,
    too_many_parts, unread_body, unreadable_form, upload_prompts, web_origin, wrong_method_message,
)
from sam2serve.wsgi import ConnectionLimits, arriving_too_slowly, nothing_received, too_slow_after

# The web page's files, as server.py serves them: path -> (file in sam2serve/web, media type).
WEB_FOLDER = Path(sam2serve.__file__).parent / "web"
WEB_FILES = {"/": ("index.html", "text/html"), PAGE_FILES[0]: ("app.js", "text/javascript"),
             PAGE_FILES[1]: ("style.css", "text/css")}
ROUTES = {"/upload": "POST", "/upload_rle": "POST", "/embed": "POST", "/segment": "POST", "/health": "GET",
          **{path: "GET" for path in WEB_FILES}}


def json_error(error: Exception) -> Response:
    status, body, headers = error_answer(error)
    if isinstance(error, (UploadTooLarge, RequestStalled)):  # the rest of the body is not read: as server.py,
        headers = {**headers, "Connection": "close"}          # the connection ends
    return Response(body, status_code=status, media_type="application/json", headers=headers)


# Ray Serve's request batching: images per replica batch, and how long a batch waits to fill.
BATCH_SIZE = 4
BATCH_WAIT_S = 0.02
# Requests a replica holds at once (the rest wait in Ray's queue): at least a batch, or batches
# could never fill.
MAX_ONGOING_REQUESTS = 16


@serve.deployment(max_ongoing_requests=MAX_ONGOING_REQUESTS, max_queued_requests=64)
class SegmentEverything:
    """One replica: the pipeline loaded once, requests answered as server.py answers them.

    The model is loaded and run on one thread of its own, as server.py runs it on the thread that
    loaded it (sam2serve/worker.py says why: on a CPU, torch's thread pool belongs to the thread
    that starts parallel work); that thread also runs one model call at a time, off the event
    loop, so requests keep arriving (and batching) while the model runs. As in server.py, calls
    that are not segment-everything (/embed, /segment) go ahead of the images queued on that thread
    before them (worker.ModelThread; @serve.batch hands it one batch at a time, ?format=coco's
    images one by one), and on a CPU a /segment's prompt sets (by image_id) are decoded between the
    batches of point prompts of the images being made, a part a turn: a click waits for one batch
    of points."""

    def __init__(self, options: dict, batch_size: int, batch_wait_s: float,
                 embedding_cache_bytes: int = EMBEDDING_CACHE_BYTES,
                 connection_timeout_s: float = ConnectionLimits.timeout_s, cors_origins: tuple[str, ...] = ()) -> None:
        self.connection_timeout_s = connection_timeout_s  # a body that stops arriving this long: 408
        self.cors_origins = cors_origins  # whose web pages may read the answers (as server.py's --cors-origin)
        self.model_thread = ModelThread("model")
        # off_the_model_thread's threads, one for each request the replica holds (build's max_ongoing_requests):
        # the event loop's default executor (cores + 4 threads) let six clicks waiting for the model hold up an
        # /embed of an image already encoded. Started as needed.
        self.request_threads = ThreadPoolExecutor(max(MAX_ONGOING_REQUESTS, batch_size), thread_name_prefix="request")
        self.model_calls, self.idle_trim = 0, None  # calls under way or waiting; the trim once idle
        self.pipeline = self.model_thread.submit(load_pipeline, **options, batch_size=batch_size).result()
        self.limits = Limits()
        # Prompts (/embed, /segment) as server.py runs them; each replica has its own cache. Built on
        # the model's thread too (worker.py, "Which thread"): built on this one, its parallel torch work
        # gave the process a second OpenMP pool, and the micro model's images took 1.9 s instead of 1.2.
        self.segmenter = self.model_thread.submit(prompt_segmenter, self.pipeline).result()
        self.cache = EmbeddingCache(embedding_cache_bytes)
        share_encodings(self.pipeline.generator, self.segmenter, self.cache)  # the page's clicks after its masks
        self.segment.set_max_batch_size(batch_size)
        self.segment.set_batch_wait_timeout_s(batch_wait_s)
        self.waiting = 0  # image requests waiting for their masks, GET /health's "queued"
        info = self.pipeline.info  # GET /health's, in server.py's order
        self.info = {"mode": info["mode"], "device": info["device"], "batch_size": batch_size, "amg": info["amg"], **info}
        self.decodes_between_batches = on_cpu(info["device"])  # as server.py's worker (sam2serve/worker.py)

    @serve.batch(max_batch_size=BATCH_SIZE, batch_wait_timeout_s=BATCH_WAIT_S)
    async def segment(self, requests: list["ImageRequest"]) -> list:
        # A batch that fails runs again image by image, as server.py's worker does: one bad
        # image (or a batch too large for the GPU's memory) fails only its own request. Once
        # every request of the batch is cancelled (Ray cancels those whose clients disconnect),
        # its masks stop before the next batch of point prompts, as in server.py.
        # Requests with settings of their own (?pred_iou_thresh=...) run apart from the others.
        groups: dict[tuple, list[ImageRequest]] = {}
        for r in requests:
            groups.setdefault(r.settings, []).append(r)
        answers = {}
        for settings, group in groups.items():
            answers.update(zip(map(id, group), await self.on_model_thread(
                self.make_masks, [r.image for r in group], False,
                lambda group=group: all(r.cancelled for r in group), dict(settings), kind="image")))  # bound now
        return [answers[id(r)] for r in requests]

    async def masks(self, image, annotate: bool = False, settings: dict[str, float] | None = None) -> list:
        """The image's masks (with annotate, their records: one image per call, as sam2 makes
        them image by image), under the request's own settings; a request cancelled meanwhile
        stops them."""
        self.waiting += 1
        request = ImageRequest(image, tuple(sorted((settings or {}).items())))
        try:
            if annotate:
                [answer] = await self.on_model_thread(self.make_masks, [image], True, lambda: request.cancelled,
                                                      settings, kind="image")
            else:
                answer = await self.segment(request)
        except asyncio.CancelledError:
            request.cancelled = True
            raise
        finally:
            self.waiting -= 1
        if isinstance(answer, Exception):
            raise answer
        return answer

    def make_masks(self, images: list, annotate: bool, nobody_waits, settings: dict[str, float] | None) -> list:
        """generate_each, on the model's thread: stopped once nobody_waits(), and on a CPU with the
        prompt sets queued meanwhile decoded between its batches of point prompts."""
        decode_waiting = self.model_thread.run_waiting_decodes if self.decodes_between_batches else None
        return generate_each(self.pipeline.generator, images, annotate, BetweenBatches(nobody_waits, decode_waiting),
                             settings)

    async def on_model_thread(self, function, *arguments, kind: str = "call"):
        """The call on the model's thread, in its turn for its kind (worker.ModelThread: "image"
        for segment-everything, "decode" for prompt sets, "encode" for an image's encoding); once
        that thread is idle TRIM_AFTER_IDLE_S after it, the freed memory it leaves is given back as
        server.py's worker gives it back (a burst of large images held it for good). Idle from the
        end of the thread's work: a call whose request was cancelled runs on (its masks stop at
        their next batch of points)."""
        loop = asyncio.get_running_loop()
        if self.idle_trim is not None:
            self.idle_trim.cancel()
        self.model_calls += 1
        work = self.model_thread.submit_as(kind, function, *arguments)
        work.add_done_callback(lambda _: loop.is_closed() or loop.call_soon_threadsafe(self.model_call_ended, loop))
        return await asyncio.wrap_future(work, loop=loop)

    async def off_the_model_thread(self, function, *arguments):
        """function(*arguments, run) on a thread of its own, as server.py's HTTP threads run protocol's
        embed_image and segment_answer: what needs no model (the image's id, the cache's look-up) there,
        each model call (run(call, kind)) queued on the model's thread in its turn. An /embed of an image
        already encoded (the web page's, after its masks) waited for the image batch being made. Once
        the request is cancelled (its client gone), none of its calls runs from its turn on: a /segment
        stops before its next part, as in server.py."""
        loop = asyncio.get_running_loop()
        cancelled = threading.Event()

        def unless_cancelled(call):  # asked on the model's thread, when the call's turn comes
            if cancelled.is_set():
                raise Abandoned("the client closed its connection before its answer")
            return call()

        def run(call, kind: str = "call"):
            return asyncio.run_coroutine_threadsafe(self.on_model_thread(unless_cancelled, call, kind=kind),
                                                    loop).result()

        try:  # (with the request's context variables, as asyncio.to_thread runs a function)
            return await loop.run_in_executor(self.request_threads, functools.partial(
                contextvars.copy_context().run, function, *arguments, run))
        except asyncio.CancelledError:
            cancelled.set()
            raise

    def model_call_ended(self, loop: asyncio.AbstractEventLoop) -> None:
        self.model_calls -= 1
        if not self.model_calls:
            self.idle_trim = loop.call_later(TRIM_AFTER_IDLE_S, self.trim_if_idle)

    def trim_if_idle(self) -> None:
        if not self.model_calls and not self.waiting:  # (waiting: images in @serve.batch's queue too)
            self.model_thread.submit(give_back_freed_memory)

    async def __call__(self, request: Request) -> Response:
        response = await self.answer(request)
        response.headers.update(ANSWER_HEADERS)
        response.headers.update(cross_origin_headers(
            request.headers.get("origin"), self.cors_origins,
            preflight=is_preflight(request.method, request.headers)))
        return response

    async def answer(self, request: Request) -> Response:
        scope = request.scope
        query = scope.get("query_string", b"")
        try:  # in server.py's order: its HTTP server reads the headers whole first
            require_small_headers(scope, ConnectionLimits.max_header_bytes)
            # the URL as sent (raw_path, where the server gives it) and decoded, as server.py counts it
            require_short_url(len(scope.get("raw_path") or scope["path"].encode()) + (len(query) + 1 if query else 0),
                              len(scope["path"].encode()) + len(query), self.limits)
            require_declared_size(request, self.limits)  # on every route and method, as server.py's
        except (URLTooLong, UploadTooLarge, HeadersTooLarge) as error:
            return json_error(error)
        path = route(scope)
        if not path:  # the application's route prefix without its slash: the page's links are relative
            return RedirectResponse(request.scope["root_path"] + "/", status_code=301)
        # The page is at /, its links relative: from /static/index.html (and each / after it) up, as server.py.
        page_again = path.rstrip("/") == "/static/index.html"
        if path not in ROUTES and not page_again:
            missing = NO_SUCH_PAGE_FILE if path.startswith("/static/") else not_found_message(ROUTES)
            return Response(json_text({"error": missing}), status_code=404, media_type="application/json")
        takes = ROUTES.get(path, "GET")  # and HEAD where it takes GET, as Flask (the HTTP server sends headers alone)
        allow = "GET, HEAD, OPTIONS" if takes == "GET" else f"{takes}, OPTIONS"  # Flask's methods, in another order
        if request.method == "OPTIONS":  # as Flask answers it (a CORS preflight too)
            return Response(status_code=200, headers={"Allow": allow}, media_type="text/html")
        if request.method != takes and not (request.method == "HEAD" and takes == "GET"):
            return Response(json_text({"error": wrong_method_message(request.method, path, takes)}), status_code=405,
                            media_type="application/json", headers={"Allow": allow})
        if page_again:
            return RedirectResponse("../" * (path.count("/") - 1), status_code=308)
        if path == "/health":
            return Response(json_text({"status": "ok", "queued": self.waiting, **self.info}),
                            media_type="application/json")
        if path in WEB_FILES:
            name, media_type = WEB_FILES[path]
            headers = {"Content-Security-Policy": PAGE_SECURITY_POLICY} if path == "/" else {}
            return Response((WEB_FOLDER / name).read_bytes(), media_type=media_type, headers=headers)
        try:
            request = await with_body_read(request, self.limits, self.connection_timeout_s)
            asked, settings = read_query(path, request.query_params.multi_items())
            if path in UPLOAD_ENDPOINTS:
                image = await self.uploaded_image(request)
                if asked == "coco":
                    records = await self.masks(image, annotate=True, settings=settings)
                    body, media_type = json_text(coco_annotations(records)), "application/json"
                else:
                    body, media_type = render_answer(path, image, await self.masks(image, settings=settings))
            else:
                answer = await self.prompts(request, path)
                body, media_type = json_text(segment_coco(answer) if asked == "coco" else answer), "application/json"
        except Exception as error:  # noqa: BLE001 - every error is a JSON answer, as in server.py
            if isinstance(error, TaskCancelledError):  # Ray cancelled it: its client left (no failure to log)
                error = Abandoned("the client closed its connection before its answer")
            return json_error(error)
        return Response(body, media_type=media_type)

    async def uploaded_image(self, request: Request, form=None, fields_too: tuple[str, ...] = ()):
        """The upload's image: the body itself (is_image_body, as server.py), or a form's file 'image'
        (form: the request's, where already read), with fields besides it: fields_too (decode_upload)."""
        content_type, body = request.headers.get("content-type", ""), await request.body()  # read (with_body_read)
        body_bytes = len(body)  # a chunked body declares no length: as waitress gives server.py the one it read
        if form is None and not fields_too and is_image_body(content_type, body_bytes):
            return decode_body_image(body, self.limits)
        form = form or await read_form(request, self.limits)
        files = [await upload.read() for upload in form.getlist("image") if is_file(upload)]
        file_names, text_fields = form_fields(form)
        return decode_upload(files, sorted(set(file_names)), self.limits, [name for name, _ in text_fields],
                             unread_body(content_type, body_bytes, body[:2048]), fields_too)

    async def prompts(self, request: Request, path: str) -> dict:
        """/embed and /segment, answered by protocol.py's functions, as server.py's app answers them."""
        require_segmenter(self.segmenter, self.pipeline.mode.name)
        mimetype = content_type_parts(request.headers.get("content-type", ""))[0]  # as werkzeug reads it for Flask
        if path == "/embed":
            require_cache_room(self.cache)
            image = await self.uploaded_image(request)
            image_id, embedding = await self.off_the_model_thread(embed_image, image, self.segmenter, self.cache)
            return embed_answer(image_id, embedding, self.cache)
        if is_json(mimetype):
            image_id, embedding, prompts, mask_inputs = cached_image_prompts(await request.body(), self.cache,
                                                                             self.limits)
        else:
            require_segment_form(mimetype, (await request.body())[:2048])
            form = await read_form(request, self.limits)
            file_names, text_fields = form_fields(form)
            prompts = form_prompts(text_fields, file_names)
            image = await self.uploaded_image(request, form, fields_too=("prompts",))
            prompts, mask_inputs = upload_prompts(prompts, image, self.segmenter, self.cache)
            image_id, embedding = await self.off_the_model_thread(embed_image, image, self.segmenter, self.cache)
        # Each part of the prompt sets (one of server.py's turns on the model) queued on the model's thread
        # as a "decode" of its own, the next once it is decoded: between an image batch's batches of points
        # a click's parts are decoded one a turn, and the images wait one part at most.
        return await self.off_the_model_thread(
            segment_answer, image_id, embedding, prompts, mask_inputs, self.segmenter, self.cache)


def is_file(value) -> bool:
    """Whether a value of a Starlette form is a file (an UploadFile), not a text field."""
    return hasattr(value, "read")


def form_fields(form: FormData) -> tuple[list[str], list[tuple[str, str]]]:
    """A form's file fields' names and its text fields (name, value), each in the form's order."""
    items = form.multi_items()
    files = [name for name, value in items if is_file(value)]
    texts = [(name, value) for name, value in items if not is_file(value)]
    return files, texts


@dataclass
class ImageRequest:
    """An image in a replica batch, and whether its request was cancelled meanwhile."""

    image: np.ndarray
    settings: tuple[tuple[str, float], ...] = ()  # the request's own, as sorted items
    cancelled: bool = False


def require_small_headers(scope: dict, max_bytes: int) -> None:
    """Request line and headers over server.py's limit are its 431 (Ray's proxy has read them
    whole by now: it sets no limit of its own), counted as sent."""
    target = len(scope.get("raw_path") or scope["path"].encode()) + len(scope.get("query_string", b""))
    headers = sum(len(name) + len(value) + 4 for name, value in scope["headers"])  # "name: value\r\n"
    if len(scope["method"]) + target + 16 + headers > max_bytes:  # 16: " ", "?", " HTTP/1.1\r\n", "\r\n"
        raise HeadersTooLarge(max_bytes)


def require_declared_size(request: Request, limits: Limits) -> None:
    """A body whose Content-Length is over the upload limit is refused before it is read."""
    if int(request.headers.get("content-length") or 0) > limits.max_upload_bytes:
        raise UploadTooLarge(limits)


async def with_body_read(request: Request, limits: Limits, timeout_s: float) -> Request:
    """The request with its body read, at most the upload limit: a chunked upload has no
    Content-Length to check beforehand (server.py's HTTP server counts the same way). A body
    that stops arriving for `timeout_s`, or that trickles in slower than MIN_REQUEST_RATE on
    average after its first `timeout_s`, is a 408, as server.py's (Ray's proxy waited for it
    without end, and each such upload holds one of the replica's MAX_ONGOING_REQUESTS: sixteen
    trickling clients left it answering nothing); a client that leaves while it is read, a 499
    (it was logged as a failure). The caller has checked a declared Content-Length already
    (require_declared_size)."""
    body = bytearray()
    chunks = request.stream().__aiter__()
    started = time.monotonic()
    while True:
        trickle_s = too_slow_after(started, timeout_s, len(body)) - time.monotonic()
        try:
            if trickle_s <= 0:
                raise asyncio.TimeoutError
            chunk = await asyncio.wait_for(anext(chunks), min(timeout_s, trickle_s))
        except StopAsyncIteration:
            break
        except asyncio.TimeoutError:
            if trickle_s < timeout_s:
                raise RequestStalled(arriving_too_slowly(len(body))) from None
            raise RequestStalled(nothing_received(timeout_s)) from None
        except ClientDisconnect:
            raise Abandoned("the client closed its connection before its request was read") from None
        body += chunk
        if len(body) > limits.max_upload_bytes:
            raise UploadTooLarge(limits)

    async def replay() -> dict:
        return {"type": "http.request", "body": bytes(body), "more_body": False}

    return Request(request.scope, receive=replay)


async def read_form(request: Request, limits: Limits):
    """The multipart form, under server.py's limits and with its answers: too many parts or a
    text field too large is a 413, a body that is not a form a 400. A URL-encoded body is read as
    werkzeug reads it for server.py, up to a text field's limit (more is refused unread, in both):
    its names say what came (each '&' of a photo sent with curl --data-binary started a part for
    Starlette, a 413 "more than 1000 parts")."""
    body = await request.body()  # kept: the form is parsed from it, and again to name a field over its limit
    content_type = request.headers.get("content-type", "")
    mimetype, options = content_type_parts(content_type)
    boundary = options.get("boundary", "")
    if mimetype == "application/x-www-form-urlencoded":  # at most a text field's limit, off the event loop
        require_small_urlencoded(content_type, len(body), limits)
        return FormData(await asyncio.to_thread(parse_qsl, body.decode(errors="replace"), keep_blank_values=True))
    if mimetype == "multipart/form-data" and after_last_line(body, boundary) > limits.max_form_field_bytes:
        raise epilogue_too_large(limits)  # as werkzeug's limit: Starlette reads any amount there
    try:
        form = await request.form(max_files=limits.max_form_parts, max_fields=limits.max_form_parts,
                                  max_part_size=limits.max_form_field_bytes)
        if len(form.multi_items()) > limits.max_form_parts:  # Starlette counts files and fields apart
            raise too_many_parts(limits)
        return form
    except MultiPartException as error:
        if error.message.startswith("Too many"):
            raise too_many_parts(limits) from None
        if "exceeded maximum size" in error.message:  # which field, as server.py says it
            raise form_limit_error(io.BytesIO(body), content_type, limits) from None
        if '"name" must be provided' in error.message:  # as server.py says it
            raise unreadable_form(NAMELESS_PART) from None
        raise unreadable_form(error.message) from None


def after_last_line(body: bytes, boundary: str) -> int:
    """How many bytes follow a multipart body's last line (--BOUNDARY--, at its start or after a
    CRLF); 0 where it has none."""
    last_line = b"--" + boundary.encode(errors="replace") + b"--"
    if not boundary:
        return 0
    if body.startswith(last_line):
        end = len(last_line)
    elif (at := body.find(b"\r\n" + last_line)) >= 0:
        end = at + 2 + len(last_line)
    else:
        return 0
    return len(body) - end - (2 if body.startswith(b"\r\n", end) else 0)  # its line's end is no part of what follows


def route(scope: dict) -> str:
    """The request's path within the application: under a route_prefix such as /sam2 (in the
    config file), Ray Serve passes the whole path and the prefix as the ASGI root_path."""
    path, root = scope["path"], scope.get("root_path", "")
    return path[len(root):] if path.startswith(root) else path


def build(args: dict[str, str]) -> serve.Application:
    """The application for `serve run deploy.ray_serve_app:build key=value ...`; every argument
    is checked here, before Ray starts a replica (a replica that fails to start is tried again
    and again, with a traceback each time)."""
    args = dict(args)

    def number(key: str, kind: type, default, minimum: float = 0, above: bool = False):
        text = args.pop(key, None)
        try:
            value = default if text is None else kind(text)
        except ValueError:
            raise ValueError(f"{key}={text}: expected a number") from None
        if not math.isfinite(value):
            raise ValueError(f"{key}={text}: expected a finite number")
        if value < minimum or (above and value == minimum):
            raise ValueError(f"{key}={text}: must be {'above' if above else 'at least'} {minimum}")
        return value

    device = args.pop("device", None) or cluster_device()
    if problem := device_problem(device, here=False):  # the cluster's machines, not this one, have the GPUs
        raise ValueError(f"device={device}: {problem}")
    batch_size = number("batch_size", int, BATCH_SIZE, 1)
    batch_wait_s = number("batch_wait_ms", float, BATCH_WAIT_S * 1000) / 1000
    replicas = str(args.pop("replicas", "1"))  # (a YAML config's 2 is a number)
    if "max_replicas" in args and replicas != "auto":
        raise ValueError(f"max_replicas goes with replicas=auto (autoscaling), not replicas={replicas}")
    max_replicas = number("max_replicas", int, 4, 1)
    cpus = number("cpus", float, 1, above=True)
    cache_bytes = int(number("embedding_cache_mb", float, EMBEDDING_CACHE_BYTES / 2**20) * 2**20)
    connection_timeout_s = number("connection_timeout", float, ConnectionLimits.timeout_s, above=True)
    cors_origins = tuple(web_origin(origin) for origin in args.pop("cors_origin", "").split(",") if origin)
    amg = {name: option_value(name, args.pop(name)) for name in AMG_OPTIONS if name in args}
    AMGConfig(**amg)  # its own checks (points_per_side >= 1, ...)
    options = dict(
        checkpoint_dir=os.path.expanduser(args.pop("checkpoint_dir")) if "checkpoint_dir" in args else None,
        model_type=args.pop("model_type", None),
        mode=get_mode(args.pop("mode", DEFAULT_MODE)).name,
        device=device,
        amg=amg,
        load_fast=args.pop("load_fast", None),
        compile_mode=args.pop("compile_mode", None),
    )
    if options["load_fast"] is not None and not options["load_fast"].strip():
        raise ValueError("load_fast=: an empty folder name; give the folder --save-fast wrote, or leave it out")
    require_checkpoint_pair(options["checkpoint_dir"], options["model_type"])
    if options["model_type"] is not None:
        model_size(options["model_type"])  # a size sam2 has
    if (options["load_fast"] or options["compile_mode"]) and not get_mode(options["mode"]).compiled:
        raise ValueError(f"load_fast and compile_mode need a fast mode, not mode={options['mode']}")
    if options["load_fast"] and options["compile_mode"]:
        raise ValueError("give compile_mode or load_fast, not both: load_fast loads exported kernels and compiles "
                         "nothing with torch.compile")
    if options["compile_mode"] not in (None, *compile_modes()):
        raise ValueError(f"compile_mode={options['compile_mode']}: one of {compile_modes()}")
    if args:
        raise ValueError(f"unknown arguments {sorted(args)}; see the docstring of deploy/ray_serve_app.py")
    if replicas != "auto" and not (replicas.isascii() and replicas.isdigit() and int(replicas) >= 1):  # not ²
        raise ValueError(f"replicas={replicas}: a number of 1 or more, or auto")
    scaling = (
        dict(autoscaling_config=dict(min_replicas=1, max_replicas=max_replicas,
                                     target_ongoing_requests=2 * batch_size, downscale_delay_s=300))
        if replicas == "auto" else dict(num_replicas=int(replicas))
    )
    deployment = SegmentEverything.options(
        ray_actor_options={"num_gpus": 1 if device.startswith("cuda") else 0, "num_cpus": cpus},
        max_ongoing_requests=max(MAX_ONGOING_REQUESTS, batch_size), **scaling
    )
    return deployment.bind(options, batch_size, batch_wait_s, cache_bytes, connection_timeout_s, cors_origins)

