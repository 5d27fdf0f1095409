"""The HTTP layer: server.py's Flask app, in front of the inference worker.

`create_app(worker, ...)` serves whatever generator the worker runs (tests hand it a stub). It
decodes the request, hands the image to the worker, and encodes the answer, with the plain
functions every front shares (protocol.py). Every error is JSON with an "error" message and the
server keeps serving; each error's status is protocol.error_answer's (the README's table lists
them: 400 for what is not one image, 413 for each limit with its own message, 503 with
Retry-After while the model loads or the queue is full, 504 for a request that waited too long,
and the rest). GET /health says whether the model is ready; GET /metrics gives
Prometheus text; GET / is the web page (web/). (wsgi.py answers what the HTTP server refuses
itself.)
"""

import functools
import logging
import time
from collections.abc import Callable
from urllib.parse import quote

import numpy as np
import prometheus_client as prom
import prometheus_client.core as prom_core
from flask import Flask, Response, g, redirect, request
from werkzeug.exceptions import HTTPException, MethodNotAllowed, NotFound, RequestEntityTooLarge

from .interactive import EmbeddingCache
from .protocol import (
    ANSWER_HEADERS, EMBEDDING_CACHE_BYTES, LOADING_RETRY_AFTER_S, NO_SUCH_PAGE_FILE, PAGE_SECURITY_POLICY, Limits,
    UploadTooLarge, cached_image_prompts, coco_annotations, content_type_parts, cross_origin_headers,
    decode_body_image, decode_upload, embed_answer, embed_image, error_answer, form_limit_error, form_prompts,
    is_image_body, is_json, is_preflight, json_text, malformed_form, not_found_message, read_query, render_answer,
    require_cache_room, require_named_parts, require_segment_form, require_segmenter, require_short_url,
    require_small_urlencoded, segment_answer, segment_coco, unread_body, upload_prompts, wrong_method_message,
)
from .worker import Abandoned, InferenceWorker

access = logging.getLogger("access")


def log_access(client: str | None, method: str | None, path: str, status: int, milliseconds: str,
               answered: int) -> None:
    """One access-log line. The path percent-encoded as sent: decoded, a "%0a" in it wrote a line
    of the client's choosing into the log (a forged entry), and other control characters went raw too."""
    access.info("%s %s %s %d %s ms %d bytes", client or "-", method or "-", quote(path, safe="/:@!$&'()*+,;=~"),
                status, milliseconds, answered)


def create_app(worker: InferenceWorker, limits: Limits = Limits(), info: dict | None = None,
               cache: EmbeddingCache | None = None, access_log: bool = False,
               cors_origins: tuple[str, ...] = ()) -> Flask:
    """The Flask app in front of one inference worker.

    `info` is shown by GET /health; the server fills it in once the model is loaded. `cache`
    keeps encoded images and mask logits for /embed and /segment. `access_log`: one log line per
    request (client, method, path, status, milliseconds, bytes answered). `cors_origins`: the
    origins (or *) whose web pages may read the answers (protocol.cross_origin_headers).
    """
    # The web page (GET /) and its script and style, shipped in the package: no build step.
    app = Flask(__name__, static_folder="web", static_url_path="/static")
    # One more than the limit: werkzeug refuses a body that reaches its limit, when the form's
    # parser reads on to find the end (an upload of exactly the limit got 413); the limit itself
    # is waitress's (wsgi.py), and start_clock's where the body's length is declared.
    app.config["MAX_CONTENT_LENGTH"] = limits.max_upload_bytes + 1
    app.config["MAX_FORM_PARTS"] = limits.max_form_parts
    app.config["MAX_FORM_MEMORY_SIZE"] = limits.max_form_field_bytes
    info = {} if info is None else info
    cache = EmbeddingCache(EMBEDDING_CACHE_BYTES) if cache is None else cache
    metrics = Metrics(worker, cache)
    worker.observe_batch = metrics.observe_batch

    def refused(client: str | None, method: str | None, path: str | None, status: int, answered: int) -> None:
        """An answer the HTTP server gave by itself, before the app saw the request (a body over
        the limit, headers too large, malformed HTTP, a stalled upload: wsgi.py): counted, and
        logged as every answer is, with no milliseconds to tell."""
        metrics.observe_request(path, method, status)
        if access_log:  # waitress's path is WSGI's, its bytes as Latin-1; Flask's is decoded as UTF-8
            path = path.encode("latin-1", "replace").decode("utf-8", "replace") if path else "-"
            log_access(client, method, path, status, "-", answered)

    app.extensions["sam2serve.refused"] = refused  # create_http_server's on_refusal

    def uses_worker(endpoint: Callable[[], Response]) -> Callable[[], Response]:
        """An endpoint that calls the worker: admitted before it reads the upload (refused while
        the model loads or once stopping), and answered even if the server is told to stop."""
        @functools.wraps(endpoint)
        def admitted() -> Response:
            with worker.admitted(request.path):  # the kind of request, for Retry-After
                return endpoint()
        return admitted

    def client_gone_check() -> Callable[[], bool] | None:
        """A check of whether this request's client has closed its connection: waitress's own (the
        HTTP server's, wsgi.py; None in Flask's test client). The worker asks it when the
        request's turn comes, and before each batch of point prompts, and stops there if so."""
        return request.environ.get("waitress.client_disconnected")

    def require_readable_form() -> None:
        """The form as werkzeug read it: each part named; a multipart body it read no part of (a
        malformed one: its parser drops the error, and the form is empty) refused, saying why."""
        require_named_parts([*request.files, *request.form])
        if (not request.files and not request.form and request.mimetype == "multipart/form-data"
                and request.content_length != 0 and content_type_parts(request.content_type or "")[1].get("boundary")):
            if (error := malformed_form(request.environ["wsgi.input"], request.content_type or "", limits)) is not None:
                raise error

    def uploaded_image(fields_too: tuple[str, ...] = ()) -> np.ndarray:
        """The upload's image: the body itself (is_image_body: where a form's fields_too are not
        expected), or a form's file 'image', with fields besides it: fields_too (decode_upload)."""
        gone = client_gone_check()
        if gone is not None and gone():  # its client gave up while the upload waited for a thread
            raise Abandoned("the client closed its connection before its image was read")
        if not fields_too and is_image_body(request.content_type or "", request.content_length or 0):
            return decode_body_image(request.get_data(cache=False), limits)
        require_small_urlencoded(request.content_type or "", request.content_length or 0, limits)
        # The first bytes of a body not read as a multipart form, to tell a form sent under another
        # type: a URL-encoded one (small, checked above) kept, as werkzeug parses its fields from
        # the copy; another type's left unread by werkzeug.
        urlencoded = request.mimetype == "application/x-www-form-urlencoded"
        head = request.get_data(cache=True)[:2048] if urlencoded else b""
        require_readable_form()
        uploads = request.files.getlist("image")
        if not urlencoded and not request.files and not request.form:
            head = request.stream.read(2048)
        return decode_upload([upload.read() for upload in uploads], sorted(request.files), limits, request.form,
                             unread_body(request.content_type or "", request.content_length or 0, head), fields_too)

    @app.before_request
    def start_clock() -> None:
        g.started = time.perf_counter()
        environ = request.environ  # the URL as sent: REQUEST_URI, where the server gives it
        require_short_url(len(environ.get("REQUEST_URI", "")),
                          len(environ.get("PATH_INFO", "")) + len(environ.get("QUERY_STRING", "")), limits)
        if (request.content_length or 0) > limits.max_upload_bytes:  # declared: refused before it is read
            raise UploadTooLarge(limits)

    @app.after_request
    def answer_headers(response: Response) -> Response:
        response.headers.update(ANSWER_HEADERS)
        response.headers.update(cross_origin_headers(
            request.headers.get("Origin"), cors_origins,
            preflight=is_preflight(request.method, request.headers)))
        if response.mimetype == "text/html":  # the page (and a redirect's note)
            response.headers["Content-Security-Policy"] = PAGE_SECURITY_POLICY
        return response

    @app.after_request
    def count(response: Response) -> Response:
        seconds = time.perf_counter() - g.get("started", 0.0)
        metrics.observe_request(request.path, request.method, response.status_code, seconds)
        if access_log:
            log_access(request.remote_addr, request.method, request.path, response.status_code, f"{seconds * 1000:.0f}",
                       response.content_length or 0)
        return response

    @app.post("/upload_rle")
    @uses_worker
    def upload_rle() -> Response:
        """Masks as COCO uncompressed RLE: {"mask_0": {"size": [h, w], "counts": [...]}, ...}."""
        return answer("/upload_rle")

    @app.post("/upload")
    @uses_worker
    def upload() -> Response:
        """A PNG of the masks drawn over the image."""
        return answer("/upload")

    def answer(endpoint: str) -> Response:
        asked, settings = read_query(endpoint, request.args.items(multi=True))
        image = uploaded_image()
        if asked == "coco":
            records = worker.submit(image, annotate=True, abandoned=client_gone_check(), settings=settings)
            return json_response(coco_annotations(records))
        masks = worker.submit(image, abandoned=client_gone_check(), settings=settings)
        body, mimetype = render_answer(endpoint, image, masks)
        return Response(body, mimetype=mimetype)

    @app.post("/embed")
    @uses_worker
    def embed() -> Response:
        """Encodes the image once: {"image_id": ..., "size": [h, w]} for /segment."""
        read_query("/embed", request.args.items(multi=True))
        require_segmenter(worker.segmenter, info.get("mode"))
        require_cache_room(cache)
        run = functools.partial(worker.call, abandoned=client_gone_check())
        image_id, embedding = embed_image(uploaded_image(), worker.segmenter, cache, run)
        return json_response(embed_answer(image_id, embedding, cache))

    @app.post("/segment")
    @uses_worker
    def segment() -> Response:
        """Prompt sets on an embedded image (JSON with image_id) or on an uploaded one (multipart
        with image and a JSON prompts field): their masks as RLE, best first (format=coco: as COCO
        annotations)."""
        asked = read_query("/segment", request.args.items(multi=True))[0]
        require_segmenter(worker.segmenter, info.get("mode"))
        # An uploaded image is encoded, then decoded: one request timeout (counted from here,
        # reading the upload included), and only the first call may find the queue full.
        run = worker.calls_of_one_request(abandoned=client_gone_check())
        if is_json(request.mimetype):
            image_id, embedding, prompts, mask_inputs = cached_image_prompts(request.get_data(), cache, limits)
        else:
            # (a body of another type is refused: its first bytes alone read, to tell a form under it)
            require_segment_form(request.mimetype, b"" if request.mimetype == "multipart/form-data"
                                 else request.stream.read(2048))
            require_readable_form()
            prompts = form_prompts(request.form.items(multi=True), request.files.keys())
            image = uploaded_image(fields_too=("prompts",))
            prompts, mask_inputs = upload_prompts(prompts, image, worker.segmenter, cache)
            image_id, embedding = embed_image(image, worker.segmenter, cache, run)
        answer = segment_answer(image_id, embedding, prompts, mask_inputs, worker.segmenter, cache, run)
        return json_response(segment_coco(answer) if asked == "coco" else answer)

    add_web_page(app)

    @app.get("/health")
    def health() -> Response:
        if worker.stopping:  # load balancers send no more; the queued requests are still answered
            return json_response({"status": "stopping", "queued": worker.queue_depth, **info}, 503)
        if not worker.ready:
            return json_response({"status": "loading", **info}, 503, {"Retry-After": str(LOADING_RETRY_AFTER_S)})
        return json_response({"status": "ok", "queued": worker.queue_depth, **info})

    @app.get("/metrics")
    def prometheus_metrics() -> Response:
        return Response(metrics.text(), content_type=prom.CONTENT_TYPE_LATEST)  # carries its charset

    @app.errorhandler(HTTPException)
    def http_error(error: HTTPException) -> Response:
        if isinstance(error, RequestEntityTooLarge):  # Flask's limits on the form (the upload's: start_clock)
            return error_response(form_limit_error(request.environ["wsgi.input"], request.content_type or "", limits))
        if isinstance(error, NotFound) and request.path.startswith("/static/"):  # no file of the page: say which are
            return json_response({"error": NO_SUCH_PAGE_FILE}, 404)
        if isinstance(error, NotFound) and request.url_rule is None:  # a path of no endpoint: say which there are
            return json_response({"error": NO_SUCH_ENDPOINT}, 404)
        message = error.description
        if isinstance(error, MethodNotAllowed):
            message = wrong_method_message(request.method, request.path, ROUTES.get(request.path, "GET"))
        # Headers such as 405's Allow stay; the body becomes JSON.
        headers = {name: value for name, value in error.get_headers() if name.lower() != "content-type"}
        return json_response({"error": message}, error.code or 500, headers)

    app.register_error_handler(Exception, error_response)

    return app


def add_web_page(app: Flask) -> None:
    """GET / (the web page: drop an image, see every mask, click to segment) and /static/FILE,
    its script and style (sam2serve/web/)."""

    @app.get("/")
    def page() -> Response:
        return web_file("index.html")  # with its Content-Security-Policy (create_app's answer_headers)

    def web_file(filename: str) -> Response:
        """A file of the page, as Flask serves static files (ETag, Last-Modified, Range), but for a
        failed If-Match: werkzeug answers its 412 with the whole file, here JSON as every error
        (and If-Match: *, which any file there matches, is no failure)."""
        if request.environ.get("HTTP_IF_MATCH", "").strip() == "*":
            del request.environ["HTTP_IF_MATCH"]
        response = app.send_static_file(filename)
        if response.status_code != 412:
            return response
        response.close()
        return json_response({"error": "precondition failed: the file is not the version that If-Match names"},
                             412)

    def static_file(filename: str) -> Response:
        """/static/FILE. The page itself is at /: its links (static/app.js, upload_rle...) are
        relative to where it is, and at /static/index.html none of them would answer."""
        if filename.rstrip("/") == "index.html":  # up from /static/index.html, and from each / after it
            return redirect("../" * (1 + filename.count("/")), 308)
        return web_file(filename)

    app.view_functions["static"] = static_file


def json_response(payload: object, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(json_text(payload), status=status, mimetype="application/json", headers=headers or {})


def error_response(error: Exception) -> Response:
    """An error's JSON answer (protocol.error_answer)."""
    status, body, headers = error_answer(error)
    return Response(body, status=status, mimetype="application/json", headers=headers)


class CacheCollector:
    """The embedding cache's counters, read when /metrics is asked."""

    def __init__(self, cache: EmbeddingCache) -> None:
        self.cache = cache

    def collect(self):
        stats = self.cache.stats()
        for name, text, value in [("hits", "Cache lookups answered from the cache", stats.hits),
                                  ("misses", "Cache lookups that found nothing", stats.misses),
                                  ("evictions", "Entries dropped to stay within the cache's bytes", stats.evictions)]:
            yield prom_core.CounterMetricFamily(f"sam2_embedding_cache_{name}", text, value=value)
        yield prom_core.GaugeMetricFamily("sam2_embedding_cache_bytes", "Bytes held by the cache", value=stats.bytes)
        yield prom_core.GaugeMetricFamily("sam2_embedding_cache_entries", "Entries in the cache", value=stats.entries)
        yield prom_core.GaugeMetricFamily("sam2_embedding_cache_spares",
                                          "Images segment-everything encoded, kept for an /embed of them", value=stats.spares)


# /metrics labels: the app's paths and their methods; other paths and methods count as "other",
# so clients cannot add series without end.
ROUTES = {"/": "GET", "/upload": "POST", "/upload_rle": "POST", "/embed": "POST", "/segment": "POST", "/health": "GET",
          "/metrics": "GET"}  # path -> method
NO_SUCH_ENDPOINT = not_found_message(ROUTES)
HTTP_METHODS = {"GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH"}


class Metrics:
    """The server's Prometheus metrics, in a registry of their own (one per app)."""

    def __init__(self, worker: InferenceWorker, cache: EmbeddingCache) -> None:
        self.registry = prom.CollectorRegistry()
        self.registry.register(CacheCollector(cache))
        self.requests = prom.Counter(
            "sam2_requests", "HTTP requests by endpoint, method and status", ["endpoint", "method", "status"],
            registry=self.registry,
        )
        self.latency = prom.Histogram(
            "sam2_request_seconds", "Time from request to answer, of each endpoint's own method", ["endpoint"],
            registry=self.registry,
            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600),
        )
        queue_depth = prom.Gauge("sam2_queue_depth", "Requests waiting for the worker (images, encodings, prompt sets)",
                                 registry=self.registry)
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

    def observe_request(self, path: str | None, method: str | None, status: int, seconds: float | None = None) -> None:
        """One answer; `seconds` is None for one the HTTP server gave before the app saw the
        request (a body over the limit, headers too large, malformed HTTP): no latency to tell."""
        endpoint = path if path in ROUTES else "other"
        self.requests.labels(endpoint, method if method in HTTP_METHODS else "other", str(status)).inc()
        if seconds is not None and ROUTES.get(path) == method:
            self.latency.labels(endpoint).observe(seconds)

    def text(self) -> bytes:
        return prom.generate_latest(self.registry)
