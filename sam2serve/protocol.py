"""What every front answers alike: server.py's Flask app (serving.py), the Ray Serve app, the
Ray Data job and the Modal app share these plain functions, so that every way of running the
model answers byte for byte alike. No Flask here: the other fronts load this module without it.

In the order of the file:
- the limits (`Limits`) and the headers every answer or the page carries;
- the errors of a request too large, each limit with its own message (413, 414: the fronts and
  their HTTP servers check the limits, `form_limit_error` says which one a form broke);
- an upload decoded into one image (`decode_upload`: 400 for what is not one image, 413 for
  too many pixels), and a request's `format` and own settings (`request_settings`);
- answers encoded (`render_answer`, `coco_annotations`) and each error's status and JSON
  message (`error_answer`: 503 with Retry-After while the model loads or the queue is full, 504
  for a request that waited too long, 500 when inference failed); the bulk jobs' lines
  (`rle_lines`);
- /embed and /segment: an image encoded once and cached (`embed_image`, `share_encodings` for
  the encodings segment-everything makes), prompts read from JSON or a form and answered
  (`segment_answer`).
"""

import functools
import json
import logging
import math
import os
import re
import sys
import urllib.parse
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import numpy as np
import torch
from pycocotools import mask as mask_utils
from sam2.utils.amg import coco_encode_rle
from werkzeug.exceptions import RequestEntityTooLarge
from werkzeug.sansio.multipart import Data, Epilogue, Field, File, MultipartDecoder, NeedData, Preamble, State
from werkzeug.http import parse_options_header

from .amg import REQUEST_SETTINGS, AMGConfig, Generator
from .interactive import (
    MAX_POINTS, MAX_PROMPT_SETS, EmbeddingCache, InvalidPrompt, Prompt, UnknownId, mask_id, names_shown, parse_prompts,
    shown,
)
from .overlay import draw_masks
from .preprocess import ImageTooLarge, InvalidImage, decode_image
from .rle import RLE, answer_text, masks_to_rle_vectorized
from .worker import Abandoned, Busy, NotReady, Stopping, TimedOut, generate_each, out_of_memory

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Limits:
    """What one request may send, each checked before the work it bounds (413, 414)."""

    max_upload_bytes: int = 50 * 1024 * 1024
    max_pixels: int = 40_000_000  # e.g. 8000x5000; checked before the pixels are decoded
    max_form_parts: int = 1000  # multipart parts (Flask's default)
    max_form_field_bytes: int = 500_000  # a text field of the form (Flask's default); files may be larger
    max_url_bytes: int = 8192  # path and query string


UPLOAD_ENDPOINTS = ("/upload", "/upload_rle")
# The page's Content-Security-Policy (GET /), sent by every front that serves it: its own
# script, style and requests alone (its favicon is an empty data: URL), and no other site may
# frame it.
PAGE_SECURITY_POLICY = ("default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src data:; "
                        "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
# Sent with every answer, by every front: a browser takes the answer's media type as given, so a
# JSON error that quotes the request is never sniffed and shown as HTML.
ANSWER_HEADERS = {"X-Content-Type-Options": "nosniff"}
EMBEDDING_CACHE_BYTES = 1024 * 2**20  # 64 images of an official model (16 MiB of features each)
LOADING_RETRY_AFTER_S = 5


PAGE_FILES = ("/static/app.js", "/static/style.css")  # the web page's script and style (sam2serve/web/)
NO_SUCH_PAGE_FILE = f"not found: the web page's files are {' and '.join(PAGE_FILES)}"  # another path under /static/


def not_found_message(routes: Mapping[str, str]) -> str:
    """The 404 message of a path with no endpoint: each of a front's routes (path -> method)
    named with its method, / as the web page, the page's files (/static/) left out."""
    def listed(paths: list[str]) -> str:
        return ", ".join(paths[:-1]) + " or " + paths[-1] if len(paths) > 1 else "".join(paths)

    posts = [path for path, method in routes.items() if method == "POST"]
    gets = sorted((path for path, method in routes.items() if method == "GET" and not path.startswith("/static/")),
                  key=lambda path: path != "/")  # the page first, the others as the front lists them
    gets = [path + " (the web page)" if path == "/" else path for path in gets]
    return f"not found: POST {listed(posts)}; GET {listed(gets)}"


# What a POST endpoint takes, for the 405 of another method (a browser's address bar sends GET).
POST_BODIES = {**dict.fromkeys(UPLOAD_ENDPOINTS + ("/embed",), "the image, as curl -F 'image=@file.jpg' sends it"),
               "/segment": "JSON (image_id and prompts) or a form (image and prompts)"}


def wrong_method_message(method: str, path: str, allowed: str) -> str:
    """A 405's message, the same from every front: the method the endpoint takes (`allowed`),
    and for a POST endpoint what to send."""
    with_what = f", with {POST_BODIES[path]}" if path in POST_BODIES else ""
    return f"{method} {path}: this endpoint takes {allowed}{with_what}"


def web_origin(text: str) -> str:
    """A --cors-origin checked: * (any origin), or one as a browser sends it in its Origin header,
    scheme://host[:port], written as browsers write it: lower case, the host in punycode, no port
    80 for http nor 443 for https (a path or a trailing / would match no request)."""
    if text == "*":
        return text
    problem = ValueError(f"{text!r} is not an origin: * or scheme://host[:port] as a browser sends it "
                         "(http://localhost:3000), without a path or a trailing /")
    if not re.fullmatch(r"https?://[^/?#@\s]+", text, re.IGNORECASE):
        raise problem
    parts = urllib.parse.urlsplit(text)
    try:
        port, host = parts.port, parts.hostname.encode("idna").decode("ascii")
    except (ValueError, UnicodeError):  # a port that is no number, a host IDNA cannot write
        raise problem from None
    scheme = parts.scheme.lower()
    host = f"[{host}]" if ":" in host else host  # an IPv6 address
    return f"{scheme}://{host}" + ("" if port in (None, {"http": 80, "https": 443}[scheme]) else f":{port}")


def is_preflight(method: str, headers: Mapping[str, str]) -> bool:
    """Whether a request is a browser's CORS preflight (OPTIONS asking Access-Control-Request-Method).
    `headers` must look names up without regard to case, as Flask's and Starlette's do."""
    return method == "OPTIONS" and "Access-Control-Request-Method" in headers


def cross_origin_headers(origin: str | None, allowed: Iterable[str], preflight: bool) -> dict[str, str]:
    """The CORS headers of an answer to a request from a browser's page at `origin` (None: no
    page's), where `allowed` (the --cors-origin values) has it: that page may read the answer,
    Retry-After too; a preflight (OPTIONS asking Access-Control-Request-Method, before a JSON
    /segment) is told it may POST with a Content-Type of its own. None for other origins: their
    pages cannot read the answers (as without the option; a form they POST is still answered)."""
    allowed = set(allowed)
    headers = {"Vary": "Origin"} if allowed and "*" not in allowed else {}  # the answer depends on the Origin
    if not origin or not allowed & {origin, "*"}:
        return headers
    headers |= {"Access-Control-Allow-Origin": "*" if "*" in allowed else origin,
                "Access-Control-Expose-Headers": "Retry-After"}
    if preflight:
        headers |= {"Access-Control-Allow-Methods": "GET, POST", "Access-Control-Allow-Headers": "Content-Type",
                    "Access-Control-Max-Age": "600"}
    return headers


def json_text(payload: object) -> str:
    # Errors and /health on one line too, like answer_text: an error in an xargs run
    # still takes exactly one line of the output.
    return json.dumps(payload, separators=(",", ":"))


def first_line(error: Exception, limit: int = 300) -> str:
    """An error's first line (not blank), cut at limit characters: what a client is told of an error of the
    server's own (TorchScript's messages go on with a traceback naming the server's files)."""
    lines = [line for line in str(error).splitlines() if line.strip()]
    return lines[0][:limit] if lines else ""


class BadRequest(ValueError):
    """A request that cannot be taken as sent (its form, query or format), 400; an image that
    cannot be decoded is preprocess.InvalidImage's, 400 too."""


class UploadTooLarge(ValueError):
    def __init__(self, limits: Limits) -> None:
        super().__init__(f"upload larger than the limit of {limits.max_upload_bytes} bytes")


class HeadersTooLarge(ValueError):
    def __init__(self, max_bytes: int) -> None:
        super().__init__(f"request line and headers larger than the limit of {max_bytes} bytes")


class URLTooLong(ValueError):
    def __init__(self, limits: Limits) -> None:
        super().__init__(f"URL longer than the limit of {limits.max_url_bytes} bytes")


def require_short_url(as_sent: int, decoded: int, limits: Limits) -> None:
    """The URL's length in bytes as sent (%41 is three) and after percent-decoding: the longer counts."""
    if max(as_sent, decoded) > limits.max_url_bytes:
        raise URLTooLong(limits)


class InteractiveUnavailable(RuntimeError):
    """This server does not run prompts (a half-precision mode)."""


class CacheTooSmall(RuntimeError):
    """The embedding cache cannot hold one encoded image: /embed's id could never be used."""


class RequestStalled(ValueError):
    """A request's body stopped arriving, or trickles in (the HTTP server's connection timeout
    and least rate): 408, in the words of server.py's HTTP server (wsgi.py), which answers it
    there itself."""

    def __init__(self, why: str) -> None:
        super().__init__(f"request timeout: {why}")


class FormTooLarge(ValueError):
    """The multipart form breaks one of its limits; the message says which."""


def too_many_parts(limits: Limits) -> FormTooLarge:
    return FormTooLarge(f"the form has more than {limits.max_form_parts} parts; send one multipart field named 'image'")


# Why a text field's limit (and a JSON /segment body's) is room enough for the most prompts allowed.
PROMPTS_FIT = f"{MAX_PROMPT_SETS} prompt sets of {MAX_POINTS} points fit in under 200 kB as compact JSON"


def field_too_large(limits: Limits, name: str | None = None) -> FormTooLarge:
    """A text field over the limit, named where it is known, with what to send instead."""
    what = f"the form's text field {shown(name)}" if name is not None else "a text field of the form"
    instead = PROMPTS_FIT if name == "prompts" else "send the image as a file (curl -F 'image=@file.jpg')"
    return FormTooLarge(f"{what} is larger than the limit of {limits.max_form_field_bytes} bytes; {instead}")


def form_limit_error(stream: IO[bytes], content_type: str, limits: Limits) -> FormTooLarge | BadRequest:
    """Which of the form's limits the form parser hit (werkzeug raises one error for both, and
    Starlette names no field): the body, buffered and at most the upload limit, is read again,
    its parts counted and each text field's bytes as sent (the limit counts those: a field's
    text, decoded, can be longer or shorter). A body of no form at all, over a text field's
    limit before its first boundary line, is a BadRequest saying so."""
    too_many = too_many_parts(limits)
    if not rewound(stream):  # say both
        return FormTooLarge(f"{too_many}, or {field_too_large(limits)}")
    parts, field, size = 0, None, 0  # the limit is each part's: a name given twice is two parts
    try:
        for event in form_events(stream, content_type, limits):
            if isinstance(event, (Field, File)):
                parts += 1
                field, size = (event.name if isinstance(event, Field) else None), 0
                if parts > limits.max_form_parts:
                    return too_many
            elif isinstance(event, Data) and field is not None:
                size += len(event.data)
                if size > limits.max_form_field_bytes:
                    return field_too_large(limits, field)
    except FormTooLarge as error:  # form_events': a part's headers, or what follows the form
        return error
    except ValueError as error:  # a malformed form, before any limit was passed
        return unreadable_form(str(error))
    return field_too_large(limits)


def malformed_form(stream: IO[bytes], content_type: str, limits: Limits) -> BadRequest | None:
    """Why a multipart body that werkzeug's form parser read no part of is no form (the parser
    drops its error and gives an empty form): the body read again (form_events); None where it
    is a whole form without parts, or cannot be read again."""
    try:
        if rewound(stream):
            for _ in form_events(stream, content_type, limits):
                pass
    except ValueError as error:
        return unreadable_form(str(error))
    return None


def rewound(stream: IO[bytes]) -> bool:
    """Whether a request's body (buffered whole by the HTTP server) is back at its start."""
    try:
        stream.seek(0)
        return True
    except (AttributeError, OSError, ValueError):
        return False


def form_events(stream: IO[bytes], content_type: str, limits: Limits) -> Iterator[object]:
    """A multipart body's events (werkzeug's decoder), read from where the stream is, up to the
    Epilogue that ends a whole form. Its buffer holds at most a text field's limit: a part's
    headers longer than that are RequestEntityTooLarge (parsed, they cost seconds a megabyte).
    A body that is no whole form is a ValueError that says why, in a client's terms; a part's
    headers, or what follows the form's last line, over a text field's limit a FormTooLarge."""
    boundary = parse_options_header(content_type)[1].get("boundary", "")
    decoder = MultipartDecoder(boundary.encode(), max_form_memory_size=limits.max_form_field_bytes)
    started = False  # the boundary seen
    try:
        while True:
            # Up to the limit, then a chunk over it: the decoder refuses a chunk that would pass it.
            chunk = stream.read(min(1 << 16, limits.max_form_field_bytes - len(decoder.buffer)) or 1 << 16)
            decoder.receive_data(chunk or None)  # None: the body's end
            while not isinstance(event := decoder.next_event(), NeedData):
                started = started or isinstance(event, Preamble)
                yield event
                if isinstance(event, Epilogue):
                    return
    except RequestEntityTooLarge:  # the decoder's buffer, over the limit: where was it?
        limit = limits.max_form_field_bytes
        if not started:
            raise ValueError(f"no line of its first {limit} bytes is {shown('--' + boundary)}, the boundary "
                             "its Content-Type names") from None
        if decoder.state == State.EPILOGUE:
            raise epilogue_too_large(limits) from None
        raise FormTooLarge(f"a part's headers (its file name, say) are larger than the limit of {limit} "
                           "bytes") from None
    except UnicodeDecodeError:
        raise ValueError("a part's headers are not UTF-8: a file name in another encoding? curl "
                         "-F 'image=@FILE;filename=a.jpg' sends the file under another name") from None
    except ValueError as error:  # the decoder's; at the body's end, "cannot parse beyond" its state
        if "Content-Disposition" in str(error):
            raise ValueError("a part has no Content-Disposition header") from None
        if not started:
            raise ValueError(f"no line of it is {shown('--' + boundary)}, the boundary its Content-Type "
                             "names") from None
        raise ValueError(f"it ends before its last line, {shown('--' + boundary + '--')}") from None


def epilogue_too_large(limits: Limits) -> FormTooLarge:
    return FormTooLarge(f"more than {limits.max_form_field_bytes} bytes follow the form's last line")


def decode_upload(files: list[bytes], file_fields: list[str], limits: Limits, text_fields: Iterable[str] = (),
                  unread_body: str = "", fields_too: Iterable[str] = ()) -> np.ndarray:
    """The image of the multipart field 'image' (`files`: the contents of every file sent in that
    field), checked and decoded. Without one, the message says what came instead: `text_fields`
    (an 'image' text field: curl -F without its @), or `unread_body`, why the body was not read
    as a form (a raw image posted as the body, say). Fields other than 'image' and `fields_too`
    are refused, as a query parameter the endpoint does not take is: a setting sent as a form
    field (curl -F pred_iou_thresh=0.6) would be ignored without a word."""
    text_fields = list(text_fields)
    if not files:
        if "image" in text_fields:
            raise BadRequest("the field 'image' holds text, not a file: put @ before the file's path "
                             "(curl -F 'image=@file.jpg')")
        raise missing_image(unread_body or f"received file fields: {file_fields or 'none'}")
    if len(files) > 1:
        raise BadRequest(f"expected one file in the field 'image', received {len(files)}; send one image per request")
    if "image" in text_fields:
        raise BadRequest("the field 'image' was sent as a file and as text: send the file alone")
    if unknown := sorted((set(file_fields) | set(text_fields)) - {"image", *fields_too}):
        settings = any(name in ("format", *REQUEST_SETTINGS) for name in unknown)
        raise BadRequest(f"unknown form fields {names_shown(unknown)}; the form has the file "
                         f"'image'" + "".join(f" and the field {shown(name)}" for name in fields_too)
                         + (" (settings and format go in the URL's query: /upload_rle?pred_iou_thresh=0.6)"
                            if settings else ""))
    if not files[0]:
        raise InvalidImage("the file is empty (0 bytes; from a browser's form: was a file chosen?)")
    return decode_image(files[0], limits.max_pixels)


SEND_AS_FORM = "in the multipart field 'image' (curl -F 'image=@file.jpg')"
SEND_AS_BODY = "as the body with its type (curl --data-binary @file.jpg -H 'Content-Type: image/jpeg')"


def missing_image(received: str) -> BadRequest:
    return BadRequest(f"expected the image {SEND_AS_FORM}, or {SEND_AS_BODY}; {received}")


def is_form_body(head: bytes) -> bool:
    """Whether a body's first bytes are a multipart form's (a boundary line, then a part's
    Content-Disposition), whatever its Content-Type says: curl -F with -H 'Content-Type: ...'
    sends a form under that type, a client library's files= with that header too."""
    head = head[:2048].lstrip(b"\r\n").lower()  # (a preamble's blank lines before the boundary)
    return head.startswith(b"--") and re.search(rb"\r?\ncontent-disposition:", head) is not None


MISLABELLED_FORM = ("the body is a multipart form, but its Content-Type is not multipart/form-data: send the form "
                    "as such (curl -F 'image=@file.jpg', without -H 'Content-Type: ...')")


def is_image_body(content_type: str, body_bytes: int) -> bool:
    """Whether a body is an image sent as it is, not in a form (curl --data-binary @file.jpg -H
    'Content-Type: image/jpeg', or a client library's raw bytes): its Content-Type is image/* or
    application/octet-stream, or it has none and holds something. The image's own bytes say its
    format, whatever type was sent."""
    mimetype = content_type_parts(content_type)[0]
    return mimetype.startswith("image/") or mimetype == "application/octet-stream" or (not mimetype and body_bytes > 0)


def decode_body_image(body: bytes, limits: Limits) -> np.ndarray:
    """The image sent as the whole body (is_image_body), checked and decoded as a form's file is."""
    if not body:
        raise BadRequest(f"the body is empty: send the image's bytes {SEND_AS_BODY}, or {SEND_AS_FORM}")
    try:
        return decode_image(body, limits.max_pixels)
    except InvalidImage as error:
        if is_form_body(body):  # curl -F with -H 'Content-Type: image/jpeg' (curl adds the boundary)
            raise InvalidImage(f"{MISLABELLED_FORM}, or the image alone {SEND_AS_BODY}") from error
        raise


def require_small_urlencoded(content_type: str, body_bytes: int, limits: Limits) -> None:
    """A URL-encoded body (curl -d or --data-binary) holds no file: one over a text field's limit
    is refused unread, as no form (parsed, a 10 MB photo sent so cost 8 s of a thread and 420 MB,
    each '&' of it a field; at the upload limit a minute and 2 GB)."""
    urlencoded = content_type_parts(content_type)[0] == "application/x-www-form-urlencoded"
    if body_bytes > limits.max_form_field_bytes and urlencoded:
        raise missing_image(unread_body(content_type, body_bytes))


def content_type_parts(content_type: str) -> tuple[str, dict[str, str]]:
    """A Content-Type header's media type, lower case (werkzeug's parse_options_header keeps the
    case sent), and its options (boundary, charset)."""
    mimetype, options = parse_options_header(content_type)
    return mimetype.lower(), options


NAMELESS_PART = "a part has no name in its Content-Disposition"


def unreadable_form(why: str) -> BadRequest:
    """The answer to a multipart body that cannot be read as a form, in both fronts' words."""
    return BadRequest(f"the body is not a multipart form that can be read ({why}); "
                      "send the image as curl -F 'image=@file.jpg'")


def require_named_parts(names: Iterable[object]) -> None:
    """Every part of a form names its field: werkzeug files a nameless one under None (which
    ended in a TypeError, a 500); Starlette, Ray Serve's, refuses it."""
    if None in names:
        raise unreadable_form(NAMELESS_PART)


def unread_body(content_type: str, body_bytes: int, head: bytes = b"") -> str:
    """decode_upload's `unread_body`: why a body (`content_type`: its whole Content-Type header;
    `head`: its first bytes, where they were not read as a form) is no multipart form to read
    (an empty one too), or "" where it is one."""
    if not body_bytes:
        return "the body is empty"
    mimetype, options = content_type_parts(content_type)
    if mimetype != "multipart/form-data":
        if is_form_body(head):
            return MISLABELLED_FORM
        return f"the body is {mimetype or 'of no media type'}, not a multipart form"
    if not options.get("boundary"):
        return "the Content-Type multipart/form-data names no boundary (let curl -F write that header)"
    return ""


# Each POST endpoint's answer formats (its `format` query parameter), the default first.
ANSWER_FORMATS = {"/upload": ("png",), "/upload_rle": ("rle", "coco"), "/embed": ("json",),
                  "/segment": ("json", "coco")}


def format_advice(endpoint: str, asked: str) -> str:
    """Where a format an endpoint does not answer in is had: the PNG at /upload, the masks as
    RLE in JSON (/upload_rle's, /segment's answers; /embed answers none), COCO annotations at
    /upload_rle and /segment."""
    if asked == "png":
        return "/upload answers the PNG of the masks"
    if asked in ("rle", "json") and endpoint in ("/upload_rle", "/segment"):
        return f"{endpoint} answers JSON without it (leave format out)"
    if asked in ("rle", "json"):
        return "/upload_rle answers the masks as RLE in JSON (/segment those of prompts)"
    if endpoint in ("/upload_rle", "/segment"):  # (an unknown format: the message lists its own)
        return "leave format out for its default"
    return "/upload_rle and /segment take format=coco for COCO annotations"


def answer_format(endpoint: str, asked: list[str]) -> str:
    """The format an endpoint answers in, from its `format` query parameter's values (none, or
    one of ANSWER_FORMATS[endpoint]): /upload_rle's "coco" is COCO annotations."""
    formats = ANSWER_FORMATS[endpoint]
    if len(asked) > 1:  # empty or not, as a setting given twice (request_settings)
        raise BadRequest(f"format: given {'twice' if len(asked) == 2 else f'{len(asked)} times'}; give it once")
    asked = [value for value in asked if value]  # ?format= (empty): the default, as before
    if asked and asked[0] not in formats:
        raise BadRequest(f"format: {shown(asked[0])} is not a format of {endpoint}, which answers "
                         f"{' or '.join(formats)}; {format_advice(endpoint, asked[0])}")
    return asked[0] if asked else formats[0]


PLAIN_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?", re.ASCII)  # 0.6, .6, 6e-1, 1.


def request_settings(endpoint: str, query: Iterable[tuple[str, str]]) -> dict[str, float]:
    """A request's own settings (amg.REQUEST_SETTINGS) from its query parameters, checked as the
    server's options are; /upload and /upload_rle take them. Any other parameter but `format` is
    refused: a misspelt setting would otherwise be ignored without a word."""
    takes = ("format", *REQUEST_SETTINGS) if endpoint in UPLOAD_ENDPOINTS else ("format",)
    settings: dict[str, float] = {}
    given: set[str] = set()
    for name, value in query:
        if name not in takes:
            raise BadRequest(f"query parameter {shown(name)} is not one {endpoint} takes: {', '.join(takes)}")
        if name == "format":
            continue
        if name in given:
            raise BadRequest(f"{name}: given twice; give it once")
        given.add(name)
        if value == "":  # ?pred_iou_thresh= : the server's, as an empty format is its default
            continue
        if not PLAIN_NUMBER.fullmatch(value):  # Python's float() reads 0_5 as 5, and digits of any script
            plus = " (a + in a URL's query stands for a space: write the number without it, or + as %2B)"
            raise BadRequest(f"{name}: {shown(value)} is not a number" + (plus if " " in value else ""))
        settings[name] = client_float(value)
        if not math.isfinite(settings[name]):  # (a long run of digits reads as inf)
            raise BadRequest(f"{name}: {shown(value)} is not a finite number")
    try:
        AMGConfig(**settings)  # the options' checks: thresholds within [0, 1], an offset above 0
    except ValueError as error:
        raise BadRequest(str(error)) from None
    return settings


def read_query(endpoint: str, query: Iterable[tuple[str, str]]) -> tuple[str, dict[str, float]]:
    """A POST endpoint's query parameters, checked: (its answer format, the request's own
    settings), as answer_format and request_settings read them, in that order."""
    query = list(query)
    return (answer_format(endpoint, [value for name, value in query if name == "format"]),
            request_settings(endpoint, query))


def render_answer(endpoint: str, image: np.ndarray, rles: list[RLE]) -> tuple[bytes | str, str]:
    """(body, mimetype) of an upload endpoint's answer."""
    if endpoint == "/upload_rle":
        return answer_text(rles), "application/json"
    return draw_masks(image, rles), "image/png"


def coco_annotations(records: list[dict]) -> list[dict]:
    """Mask records (Generator.annotate) as COCO annotations: segmentation as compressed RLE,
    the string pycocotools reads, and bbox as COCO's [x, y, width, height], pycocotools' toBbox
    (sam2's record counts its last column and row out: a box one pixel short, none for a mask
    one pixel wide). A stability score of 0/0 (a mask empty at both of its levels, kept only
    with the stability filter off) is null: NaN is no JSON."""
    annotations = []
    for record in records:
        stability = record.get("stability_score")
        annotations.append({**record, **coco_mask(record["segmentation"]),
                            "stability_score": stability if stability is None or math.isfinite(stability) else None})
    return annotations


def coco_mask(rle: RLE) -> dict:
    """A mask's COCO fields: segmentation as compressed RLE, area, and bbox as [x, y, width,
    height], pycocotools' toBbox."""
    segmentation = coco_encode_rle(rle)
    compressed = {**segmentation, "counts": segmentation["counts"].encode()}
    return {"segmentation": segmentation, "area": int(mask_utils.area(compressed)),
            "bbox": [int(value) for value in mask_utils.toBbox(compressed)]}


def segment_coco(answer: dict) -> dict:
    """A /segment answer (segment_answer) in format=coco: each prompt set's masks as COCO
    annotations, best first, each with its predicted IoU (and its mask_input_id where kept)."""
    results = []
    for result in answer["results"]:
        ids = result.get("mask_input_ids", [])
        results.append({"annotations": [
            {**coco_mask(rle), "predicted_iou": iou, **({"mask_input_id": ids[rank]} if ids else {})}
            for rank, (rle, iou) in enumerate(zip(result["masks"], result["iou_predictions"]))]})
    return {**answer, "results": results}


# Each error's status (the README's table), the first kind it is of; any other error is a 500.
ERROR_STATUSES: tuple[tuple[type[Exception] | tuple[type[Exception], ...], int], ...] = (
    ((BadRequest, InvalidImage, InvalidPrompt), 400),
    (UnknownId, 404),
    (InteractiveUnavailable, 501),
    (CacheTooSmall, 507),
    ((ImageTooLarge, UploadTooLarge, FormTooLarge), 413),
    (URLTooLong, 414),
    (HeadersTooLarge, 431),
    (RequestStalled, 408),
    ((NotReady, Busy), 503),  # with Retry-After
    (Stopping, 503),  # no Retry-After: whether it comes back is not its to say
    (TimedOut, 504),
    (Abandoned, 499),  # nginx's code for a client gone before its answer: seen in logs and /metrics
)


def error_answer(error: Exception) -> tuple[int, str, dict[str, str]]:
    """(status, JSON body, headers) for an error, the same in every front end."""
    for kinds, status in ERROR_STATUSES:
        if isinstance(error, kinds):
            return status, json_text({"error": str(error)}), retry_after(error)
    if out_of_memory(error):  # a GPU's or a CPU's (it was an "internal error" there)
        log.error("out of memory: %s", error)
        return 500, json_text({"error": "inference ran out of memory for this image; try a smaller image"}), {}
    log.error("request failed", exc_info=error)  # the whole of it: the answer has its first line
    return 500, json_text({"error": f"internal error: {type(error).__name__}: {first_line(error)}"}), {}


def retry_after(error: Exception) -> dict[str, str]:
    """The Retry-After header of a 503 that passes: the model loading, or a full queue."""
    if isinstance(error, NotReady):
        return {"Retry-After": str(LOADING_RETRY_AFTER_S)}
    if isinstance(error, Busy):
        return {"Retry-After": str(error.retry_after_s)}
    return {}


def file_as_upload(path: str | os.PathLike, limits: Limits) -> bytes | ValueError:
    """A file's bytes as the server takes an upload, or the server's error for it: one it cannot
    read, or one over the upload limit (read no further: a stray video in a list of paths is
    refused as a 413 would, not read into memory). Not a regular file (a named pipe would block the
    read for good), or a path no file can have (a NUL in it): cannot be read."""
    try:
        if not Path(path).is_file():
            raise FileNotFoundError(path)
        with open(path, "rb") as file:
            data = file.read(limits.max_upload_bytes + 1)
    except (OSError, ValueError):
        return InvalidImage("the image file could not be read")
    return UploadTooLarge(limits) if len(data) > limits.max_upload_bytes else data


def rle_lines(generator: Generator, files: list[bytes | ValueError], limits: Limits = Limits()) -> list[str]:
    """One /upload_rle answer per image file (file_as_upload's), as the xargs/curl workflow
    writes them: the RLE JSON, or the server's error JSON. The decodable images run as one batch;
    if it fails, one by one (generate_each, as the worker)."""
    lines: list[str | None] = [None] * len(files)
    images = {}
    for index, data in enumerate(files):
        try:
            if isinstance(data, ValueError):
                raise data
            images[index] = decode_image(data, limits.max_pixels)
        except (InvalidImage, ImageTooLarge, UploadTooLarge) as error:
            lines[index] = error_answer(error)[1]
    answers = generate_each(generator, list(images.values())) if images else []
    for index, answer in zip(images, answers):
        lines[index] = error_answer(answer)[1] if isinstance(answer, Exception) else answer_text(answer)
    return lines


def require_segmenter(segmenter, mode: str | None) -> None:
    """Refuses /embed and /segment on a server that runs no prompts (a half-precision mode)."""
    if segmenter is None:
        raise InteractiveUnavailable(
            f"this server's mode ({mode or 'unknown'}) does not run prompts: /embed and /segment need a float32 "
            "mode (baseline, ao or fast)")


# The cache holds images and mask logits under keys of their own kind: an id of one kind is
# unknown as the other, and a mask's logits are found only with the image they were made on.
def image_key(image_id: str) -> str:
    return f"image:{image_id}"


def mask_key(image_id: str, mask_input: str) -> str:
    return f"mask:{image_id}:{mask_input}"


def embed_image(image: np.ndarray, segmenter, cache: EmbeddingCache, run: Callable):
    """(image_id, Embedding) of an image: from the cache, or through run(function, kind="encode"),
    which runs function on the model's thread (server.py: InferenceWorker.call, or a request's
    calls_of_one_request; the Ray Serve app: its ModelThread), where the first request for the
    image encodes it and the others, queued meanwhile, find it cached. Each takes its place in the worker's queue
    (503 when it is full): none waits for another's encoding outside it, holding one of the
    threads sized for the queue. The caller has checked require_segmenter() before reading the
    upload."""
    image_id = segmenter.image_id(image)
    key = image_key(image_id)
    if cache.holds(key):
        try:
            return image_id, cache.get(key)
        except UnknownId:  # evicted meanwhile
            pass
    embedding = run(lambda: cache.get_or_compute(key, lambda: segmenter.embed(image), lambda value: value.nbytes),
                    kind="encode")
    return image_id, embedding


def share_encodings(generator: Generator, segmenter, cache: EmbeddingCache) -> bool:
    """Keeps each image that segment-everything encodes in the cache as a spare
    (EmbeddingCache.put_spare), for an /embed of the same image to find: the web page asks for
    one right after its masks, to click on them. Only where the generator's encoder gives the
    segmenter's features bit for bit (MaskGenerator.encodes_as_sam2: ao's, float32), so that
    /segment answers the same either way. Returns whether it does."""
    if segmenter is None or cache.max_bytes == 0 or not getattr(generator, "encodes_as_sam2", False):
        return False

    def keep(image: np.ndarray, features) -> None:
        if features.nbytes > cache.room_for_spares():  # before any work on the model's thread
            return
        try:
            embedding = segmenter.embedding_of(image, features)
            cache.put_spare(image_key(segmenter.image_id(image)), embedding, embedding.nbytes)
        except Exception as error:  # noqa: BLE001 - a spare lost, never the masks' answer
            log.warning("could not keep an image's encoding for /embed: %s", error)

    generator.on_features = keep
    generator.on_out_of_memory = cache.drop_spares
    return True


def require_cache_room(cache: EmbeddingCache, nbytes: int | None = None) -> None:
    """Refuses an /embed whose image the cache cannot hold (one of nbytes, or, before encoding,
    any at all), as its id would then be unknown to every /segment."""
    if cache.max_bytes == 0 or (nbytes is not None and nbytes > cache.max_bytes):
        size = "" if nbytes is None else f" ({nbytes / 2**20:.1f} MiB)"
        megabytes = cache.max_bytes / 2**20  # --embedding-cache-mb 0.3 is 314572 bytes: 0.3, not 0.299999
        room = f"{round(megabytes, 3):g} MiB" if megabytes >= 0.001 else f"{cache.max_bytes} bytes"
        raise CacheTooSmall(
            f"the embedding cache ({room}) cannot hold one encoded image of this model{size}, so an "
            "/embed id could not be used: start the server with a larger cache (--embedding-cache-mb), or send the "
            "image with each /segment (a multipart form)")


def embed_answer(image_id: str, embedding, cache: EmbeddingCache) -> dict:
    """The /embed answer (the caller checked require_cache_room() before encoding)."""
    require_cache_room(cache, embedding.nbytes)
    return {"image_id": image_id, "size": list(embedding.size)}


def is_json(mimetype: str) -> bool:
    """application/json, or a JSON type such as application/vnd.api+json (as Flask reads them)."""
    return mimetype == "application/json" or (mimetype.startswith("application/") and mimetype.endswith("+json"))


def json_int(digits: str) -> int | float:
    """A JSON whole number as Python reads it; one of more digits than Python converts (4300) as
    an infinity of its sign, which the field that holds it refuses by name (Python's own error
    advised the client to call sys.set_int_max_str_digits)."""
    try:
        return int(digits)
    except ValueError:
        return -math.inf if digits.startswith("-") else math.inf


def client_float(text: str) -> float:
    """A number a client sent, subnormal ones (below 2.2e-308) read as 0: as every thread of
    server.py reads them, where cpu.py flushes them, and not only the threads that flush (a
    Ray Serve replica's event loop read 1e-310 as above 0, its model thread as 0: a 500)."""
    value = float(text)
    return 0.0 if abs(value) < sys.float_info.min else value  # the same comparison flushed or not


class RepeatedKey(Exception):
    """A name given twice in one JSON object (not a ValueError: json.loads would take it for its own)."""


def unique_keys(pairs: list[tuple[str, object]]) -> dict:
    """A JSON object whose names are each given once: json.loads keeps the last of two, and a
    first value that would be refused ({"points": [[9999, 1]], "points": [[1, 1]]}) went unread,
    where a field, a setting or a format given twice elsewhere is refused."""
    found = dict(pairs)
    if len(found) < len(pairs):
        seen = set()
        raise RepeatedKey(next(key for key, _ in pairs if key in seen or seen.add(key)))
    return found


def parse_json(text: str | bytes, what: str) -> object:
    """JSON sent by a client, or InvalidPrompt naming `what` ("the body", "prompts") and why not."""
    try:
        return json.loads(text, parse_int=json_int, parse_float=client_float, object_pairs_hook=unique_keys)
    except RepeatedKey as error:
        raise InvalidPrompt(f"{what}: {shown(error.args[0])} is given twice in one object; give it once") from None
    except ValueError as error:  # also bytes that are not text
        raise InvalidPrompt(f"{what}: not valid JSON: {error}") from None
    except RecursionError:
        raise InvalidPrompt(f"{what}: the JSON is nested too deeply") from None


def json_payload(body: bytes) -> object:
    """A JSON request body, or InvalidPrompt saying what is wrong with it."""
    if not body.strip():
        raise InvalidPrompt("the body is empty: expected a JSON object with image_id and prompts")
    if is_form_body(body):  # curl -F with -H 'Content-Type: application/json'
        raise InvalidPrompt(f"{MISLABELLED_FORM}, or JSON with image_id and prompts")
    return parse_json(body, "the body")


SEGMENT_FIELDS = ("image_id", "prompts")


def segment_payload(payload: object) -> tuple[str, object]:
    """(image_id, prompts) of a /segment JSON body."""
    if not isinstance(payload, dict):
        raise InvalidPrompt("the body is not a JSON object with image_id and prompts")
    if unknown := sorted(set(payload) - set(SEGMENT_FIELDS)):
        format_hint = " (format goes in the URL's query: /segment?format=coco)" if "format" in unknown else ""
        raise InvalidPrompt(f"unknown fields {names_shown(unknown)}; a /segment body has {list(SEGMENT_FIELDS)}"
                            + format_hint)
    image_id = payload.get("image_id")
    if not isinstance(image_id, str):
        raise InvalidPrompt("image_id: expected the id that /embed answered")
    return image_id, payload.get("prompts")


def require_segment_form(mimetype: str, head: bytes) -> None:
    """/segment takes JSON or a multipart form; anything else (curl -d without a JSON
    Content-Type sends a URL-encoded form) is told which, and a form under another type (`head`:
    the body's first bytes) that its type is wrong."""
    if mimetype != "multipart/form-data" and is_form_body(head):
        raise InvalidPrompt(f"{MISLABELLED_FORM}, or a JSON body with image_id and prompts")
    if mimetype != "multipart/form-data":
        raise InvalidPrompt(
            f"/segment takes a JSON body with image_id and prompts (Content-Type: application/json; curl -H "
            f"'Content-Type: application/json' -d ...) or a multipart form with image and prompts (curl -F); "
            f"this request's Content-Type is {mimetype or 'missing'}")


def form_prompts(fields: Iterable[tuple[str, str]], file_names: Iterable[str]) -> object:
    """The prompts of a one-shot multipart /segment: its one text field, a JSON list of prompt
    sets. Other fields, text or file, are refused, as a JSON body's are."""
    fields, file_names = list(fields), set(file_names)
    if "prompts" in file_names:
        raise InvalidPrompt("prompts: sent as a file (curl -F prompts=@...); send it as a text field: "
                            "curl -F 'prompts=<prompts.json' reads the file into one")
    # A text field named image (curl -F image=path, without the @) is the upload's to refuse.
    if unknown := sorted(({name for name, _ in fields} | file_names) - {"prompts", "image"}):
        raise InvalidPrompt(f"unknown form fields {names_shown(unknown)}; a multipart /segment "
                            "has the file 'image' and the field 'prompts'"
                            + (" (image_id goes in a JSON body)" if "image_id" in unknown else ""))
    texts = [text.removeprefix("\ufeff") for name, text in fields if name == "prompts"]  # a file's byte-order mark,
    # as a JSON body may have one
    if len(texts) > 1:
        raise InvalidPrompt(f"prompts: sent {len(texts)} times; send one field with every prompt set in its list")
    if not texts or not texts[0].strip():
        raise InvalidPrompt("prompts: expected a form field with a JSON list of prompt sets")
    return parse_json(texts[0], "prompts")


def cached_embedding(cache: EmbeddingCache, image_id: str):
    try:
        return cache.get(image_key(image_id))
    except UnknownId:
        raise UnknownId(f"unknown image_id {shown(image_id)} (never embedded, or evicted from the cache): "
                        "POST the image to /embed again") from None


def cached_image_prompts(body: bytes, cache: EmbeddingCache,
                         limits: Limits) -> tuple[str, object, list[Prompt], dict[str, torch.Tensor]]:
    """A JSON /segment's image id, its encoding from the cache, its prompts, checked, and their
    mask_inputs' logits from the cache (cached_mask_inputs). The body
    is held to a form field's limit, as the same prompts sent in a form are: the most prompts
    allowed take under 200 kB as compact JSON, and parsing megabytes would cost seconds."""
    if len(body) > limits.max_form_field_bytes:
        raise FormTooLarge(f"the JSON body is larger than the limit of {limits.max_form_field_bytes} bytes; "
                           + PROMPTS_FIT)
    image_id, prompts = segment_payload(json_payload(body))
    embedding = cached_embedding(cache, image_id)
    prompts = parse_prompts(prompts, embedding.size)
    return image_id, embedding, prompts, cached_mask_inputs(image_id, prompts, cache)


# The most mask pixels one call on the model makes before they become RLE. A /segment's prompt
# sets run in parts of at most this many (3 masks a set where multimask, else 1): 64 sets on a
# 40-megapixel image would otherwise hold 7.7 billion pixels of masks at once. In server.py each
# part is its own turn on the model's thread, so a request whose client has gone, or whose time
# is up, stops between parts (the worker runs no call of theirs), and other requests take their
# turns; a later part waits for room in a full queue (InferenceWorker.calls_of_one_request).
SEGMENT_PART_PIXELS = 100_000_000


def prompt_parts(prompts: list[Prompt], size: tuple[int, int]) -> list[list[Prompt]]:
    """Consecutive prompt sets, in parts of at most SEGMENT_PART_PIXELS of masks (one set at least)."""
    parts: list[list[Prompt]] = []
    pixels = SEGMENT_PART_PIXELS
    for prompt in prompts:
        cost = (3 if prompt.multimask else 1) * size[0] * size[1]
        if pixels + cost > SEGMENT_PART_PIXELS:
            parts.append([])
            pixels = 0
        parts[-1].append(prompt)
        pixels += cost
    return parts


def upload_prompts(prompts: object, image: np.ndarray, segmenter,
                   cache: EmbeddingCache) -> tuple[list[Prompt], dict[str, torch.Tensor]]:
    """A one-shot /segment's prompts checked before its image costs an encoding: their form
    (parse_prompts), and their mask_input ids, which only an image encoded already can hold.
    Returns the prompts and their mask_inputs' logits, taken now: the image's encoding, stored
    next, may evict them."""
    prompts = parse_prompts(prompts, image.shape[:2])
    if not any(prompt.mask_input is not None for prompt in prompts):
        return prompts, {}
    return prompts, cached_mask_inputs(segmenter.image_id(image), prompts, cache)


def cached_mask_inputs(image_id: str, prompts: list[Prompt], cache: EmbeddingCache) -> dict[str, torch.Tensor]:
    """The logits of the prompts' mask_input ids on the image, from the cache."""
    mask_inputs = {}
    for index, prompt in enumerate(prompts):
        if prompt.mask_input is not None and prompt.mask_input not in mask_inputs:
            try:
                mask_inputs[prompt.mask_input] = cache.get(mask_key(image_id, prompt.mask_input))
            except UnknownId:
                raise unknown_mask_input(prompt.mask_input, index) from None
    return mask_inputs


def unknown_mask_input(mask_input: str, index: int) -> UnknownId:
    return UnknownId(f"prompts[{index}].mask_input: unknown mask_input {shown(mask_input)} (evicted from the "
                     "cache, or not an id answered with keep_logits on this image): send the prompt without it")


def segment_answer(image_id: str, embedding, prompts: list[Prompt], mask_inputs: dict[str, torch.Tensor],
                   segmenter, cache: EmbeddingCache, run: Callable) -> dict:
    """The /segment answer to prompts (checked by parse_prompts): each prompt set's masks as RLE
    with their predicted IoUs, best first, and with keep_logits the ids of their logits for a
    later mask_input on the same image (null for logits a cache too small for them all dropped).
    mask_inputs maps the prompts' mask_input ids to their logits (cached_mask_inputs). Each part
    of the prompt sets is decoded through run(function, kind="decode"), as in embed_image."""

    def decode(part: list[Prompt]) -> list[tuple[list[RLE], list[float], list[torch.Tensor]]]:
        # Masks to RLE on the model's thread too: torch work on an HTTP thread would start a
        # thread pool of its own there (sam2serve/worker.py says why that costs).
        return [(masks_to_rle_vectorized(answer.masks), answer.iou_predictions.tolist(),
                 [logits.clone() for logits in answer.low_res_logits] if prompt.keep_logits else [])
                for prompt, answer in zip(part, segmenter.segment(embedding, part, mask_inputs))]

    decoded = [answer for part in prompt_parts(prompts, embedding.size)
               for answer in run(functools.partial(decode, part), kind="decode")]
    results, kept = [], []
    for prompt, (masks, iou_predictions, kept_logits) in zip(prompts, decoded):
        result = {"masks": masks, "iou_predictions": iou_predictions}
        if prompt.keep_logits:
            result["mask_input_ids"] = [mask_id(image_id, prompt, rank) for rank in range(len(masks))]
            kept += [(rank, key, logits)
                     for rank, (key, logits) in enumerate(zip(result["mask_input_ids"], kept_logits))]
        results.append(result)
    # Never evicting their image; every set's worst masks' first, its best ones' last (a cache too
    # small for all keeps those: the ones a client refines).
    for _, key, logits in sorted(kept, key=lambda item: -item[0]):  # stable: the sets' order within a rank
        cache.put(mask_key(image_id, key), logits, logits.numel() * logits.element_size(), keep=image_key(image_id))
    for result in results:  # checked once all are stored: a later prompt set's may evict an earlier one's
        if "mask_input_ids" in result:
            result["mask_input_ids"] = [key if cache.holds(mask_key(image_id, key)) else None
                                        for key in result["mask_input_ids"]]
    return {"image_id": image_id, "results": results}
