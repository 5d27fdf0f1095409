"""The HTTP front as a careless or hostile client meets it.

A real server process (waitress, the micro model, a 4x4 grid) for what the HTTP server does
before the app sees a request: stalled clients, bodies over the limit, headers too large. The
Flask app in process, with a stub worker, for each limit's own answer, 405's Allow header, 414,
several files, a client that disconnects, and /metrics read by Prometheus' own parser. A
waitress server in process for what stopping waits for.
"""

import http.client
import io
import json
import logging
import os
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import pytest
from flask import Flask, request
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families
from waitress.adjustments import Adjustments

from sam2serve.preprocess import InvalidImage
from sam2serve.protocol import PAGE_SECURITY_POLICY, Limits, decode_body_image, first_line, not_found_message
from sam2serve.serving import ROUTES, create_app
from sam2serve.worker import InferenceWorker
from sam2serve import wsgi
from sam2serve.wsgi import ConnectionLimits, OncePer, create_http_server, finish_answers, listening_urls
from tools.load_test import post_image

from .conftest import make_scene
from .test_server import MAX_UPLOAD_MB, start_server
from .test_worker import StubGenerator, hold_worker, png_of, submit_in_threads, wait_for

CONNECTION_TIMEOUT_S = 2
TOOL_ORIGIN = "http://tool.example:3000"  # the server's --cors-origin
STALLED_CLIENTS = 200


@pytest.fixture(scope="module")
def server_log(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("front") / "server.log"


@pytest.fixture(scope="module")
def server(server_log):
    process, url = start_server("--points-per-side", "4", "--connection-timeout", str(CONNECTION_TIMEOUT_S),
                                "--max-connections", str(STALLED_CLIENTS + 50), "--access-log", "--cors-origin", TOOL_ORIGIN,
                                log_path=server_log)
    yield process, url
    process.terminate()
    process.wait(timeout=30)


@pytest.fixture(scope="module")
def jpeg():
    buffer = io.BytesIO()
    Image.fromarray(make_scene(96, 128, seed=7)).save(buffer, format="JPEG")
    return buffer.getvalue()


def threads_and_descriptors(pid: int) -> tuple[int, int]:
    return len(os.listdir(f"/proc/{pid}/task")), len(os.listdir(f"/proc/{pid}/fd"))


def connect(url: str) -> socket.socket:
    parsed = urlparse(url)
    return socket.create_connection((parsed.hostname, parsed.port), timeout=10)


def read_until_closed(sock: socket.socket, timeout_s: float) -> bytes:
    """Everything the server sends until it closes the connection (a reset counts as closed)."""
    sock.settimeout(timeout_s)
    received = b""
    try:
        while chunk := sock.recv(65536):
            received += chunk
    except ConnectionResetError:
        pass
    return received


def status_and_json(response: bytes) -> tuple[int, dict, dict]:
    head, _, body = response.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = {name.lower(): value.strip() for name, _, value in (line.partition(":") for line in lines[1:])}
    return int(lines[0].split()[1]), headers, json.loads(body)


def test_a_path_with_no_endpoint_is_told_each_route_with_its_method():
    """The 404 message both fronts build from their routes: by method, the page first and named,
    its files left out, one path alone without "or"."""
    assert not_found_message({"/upload": "POST", "/health": "GET", "/": "GET", "/static/app.js": "GET"}) == (
        "not found: POST /upload; GET / (the web page) or /health")
    assert not_found_message(ROUTES) == ("not found: POST /upload, /upload_rle, /embed or /segment; "
                                         "GET / (the web page), /health or /metrics")


def test_pages_of_the_origins_given_may_read_the_answers():
    """--cors-origin (create_app's cors_origins): a page served elsewhere (a labelling tool) may read
    the answers, Retry-After too, and a preflight before a JSON /segment is told it may send one;
    pages of other origins get no such header, as without the option; a request with no Origin
    (curl, a script) none either."""
    tool, elsewhere = "http://localhost:3000", "http://elsewhere:8080"
    preflight = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "content-type"}
    for origins, origin, allowed in [((), tool, None), ((tool,), tool, tool), ((tool,), elsewhere, None),
                                     (("*",), elsewhere, "*"), ((tool, "*"), tool, "*"), ((tool,), None, None)]:
        client = create_app(InferenceWorker(), cors_origins=origins).test_client()
        sent = {"Origin": origin} if origin else {}
        answer = client.get("/health", headers=sent)  # 503 while the model loads, with Retry-After
        assert answer.status_code == 503 and answer.headers.get("Access-Control-Allow-Origin") == allowed, origins
        assert answer.headers.get("Access-Control-Expose-Headers") == (allowed and "Retry-After")
        assert answer.headers.get("Vary") == ("Origin" if origins == (tool,) else None)  # the answer depends on it
        answer = client.options("/segment", headers={**sent, **preflight})
        assert answer.status_code == 200 and answer.headers.get("Access-Control-Allow-Origin") == allowed
        told = answer.headers.get("Access-Control-Allow-Methods"), answer.headers.get("Access-Control-Allow-Headers")
        assert told == (("GET, POST", "Content-Type") if allowed else (None, None))
        assert "Access-Control-Allow-Methods" not in client.get("/health", headers={**sent, **preflight}).headers


def test_stalled_clients_cost_no_thread_and_are_closed_while_others_are_served(server, jpeg):
    process, url = server
    status, _, reference = post_image(url + "/upload_rle", jpeg, "a.jpg", timeout_s=60)
    assert status == 200
    threads_before, descriptors_before = threads_and_descriptors(process.pid)
    timeouts_before = answers_counted(url, "/upload_rle", "POST", "408")

    stalled = []
    for _ in range(STALLED_CLIENTS):  # headers announce a body that never comes
        sock = connect(url)
        sock.sendall(b"POST /upload_rle HTTP/1.1\r\nHost: test\r\nContent-Type: multipart/form-data; boundary=x\r\n"
                     b"Content-Length: 100000\r\n\r\n--x\r\n")
        stalled.append(sock)
    started = time.monotonic()
    for _ in range(3):
        assert post_image(url + "/upload_rle", jpeg, "a.jpg", timeout_s=60)[::2] == (200, reference)
    threads, descriptors = threads_and_descriptors(process.pid)
    assert threads <= threads_before + 1, "a thread per connection"
    assert descriptors <= descriptors_before + STALLED_CLIENTS + 10

    # Answered 408 and closed by the server after its connection timeout (checked every timeout
    # / 4, at least 1 s).
    deadline = started + CONNECTION_TIMEOUT_S + max(1, CONNECTION_TIMEOUT_S // 4) + 15
    for sock in stalled:
        status, _, answer = status_and_json(read_until_closed(sock, max(0.1, deadline - time.monotonic())))
        assert status == 408 and answer["error"].startswith("request timeout: nothing received for")
        sock.close()
    assert time.monotonic() < deadline
    assert answers_counted(url, "/upload_rle", "POST", "408") == timeouts_before + STALLED_CLIENTS
    time.sleep(0.5)
    assert threads_and_descriptors(process.pid)[1] <= descriptors_before + 5


@pytest.mark.parametrize("expect", [b"", b"Expect: 100-continue\r\n"])  # curl's, for uploads over 1 MB
def test_body_over_the_limit_is_refused_before_it_is_read_and_the_connection_closed(server, expect):
    _, url = server
    limit = MAX_UPLOAD_MB * 2**20
    counted = answers_counted(url, "/upload_rle", "POST", "413")
    sock = connect(url)
    sock.sendall(b"POST /upload_rle HTTP/1.1\r\nHost: test\r\nContent-Type: multipart/form-data; boundary=x\r\n"
                 + expect + f"Content-Length: {limit + 1}\r\n\r\n".encode())
    status, headers, answer = status_and_json(read_until_closed(sock, 10))  # no body sent: closed all the same
    assert status == 413 and headers["content-type"] == "application/json"
    assert answer == {"error": f"upload larger than the limit of {limit} bytes"}
    assert answers_counted(url, "/upload_rle", "POST", "413") == counted + 1  # the HTTP server's answer, in /metrics


@pytest.mark.parametrize("start, piece", [(b"1;a=", b"b" * 8192), (b"1\r\nx\r\n0\r\nX-A: ", b"b" * 8192),
                                          (b"", b"\r\n" * 4096)], ids=["size line", "trailer", "lines between chunks"])
def test_a_chunked_body_s_framing_is_held_to_a_limit_of_its_own(start, piece):
    """A chunked body is held to the upload limit by its own bytes, and its framing apart: a size
    line, a trailer or empty lines between chunks that never end were taken without end (memory
    and the event loop's time, searched again at each read). Chunks of one byte, the most framing
    a body can have, still take a body of the limit."""
    limit = 50_000
    adjustments = Adjustments(max_request_body_size=limit + 1, max_request_header_size=65536)
    head = b"POST /upload_rle HTTP/1.1\r\nHost: test\r\nTransfer-Encoding: chunked\r\n\r\n"
    parser = wsgi.RequestParser(adjustments)
    parser.received(head)
    one_byte_chunks = b"1\r\nx\r\n" * limit
    for offset in range(0, len(one_byte_chunks), 8192):  # as waitress reads: 8 kB at a time
        parser.received(one_byte_chunks[offset:offset + 8192])
    parser.received(b"0\r\n\r\n")
    assert parser.completed and parser.error is None and parser.headers["CONTENT_LENGTH"] == str(limit)
    parser = wsgi.RequestParser(adjustments)
    parser.received(head)
    fed = parser.received(start)
    while not parser.completed and fed < 2**22:
        fed += parser.received(piece)
    assert parser.completed and "framing is too long" in parser.error.body, fed
    assert fed <= 5 * limit + 2**16 + 2 * 8192


def test_a_request_without_a_body_that_expects_100_continue_is_answered_at_once(server):
    """`Expect: 100-continue` on a request that has no body: waitress sent "100 Continue" and
    then waited for a body until the connection timeout's 408."""
    _, url = server
    for request_line, status in [(b"GET /health HTTP/1.1\r\n", 200),
                                 (b"POST /upload_rle HTTP/1.1\r\nContent-Length: 0\r\n", 400)]:
        sock = connect(url)
        sock.sendall(request_line + b"Host: test\r\nExpect: 100-continue\r\nConnection: close\r\n\r\n")
        answer = read_until_closed(sock, CONNECTION_TIMEOUT_S + 30)
        sock.close()
        # (waitress's "100 Continue", then a 408 after the connection timeout, where the answer is due)
        assert status_and_json(answer)[0] == status and b"100 Continue" not in answer, answer[:200]


def metric_samples(url: str, name: str) -> list:
    with urllib.request.urlopen(url + "/metrics", timeout=10) as response:
        text = response.read().decode()
    return [sample for family in text_string_to_metric_families(text) for sample in family.samples
            if sample.name == name]


def answers_counted(url: str, endpoint: str, method: str, status: str) -> float:
    labels = {"endpoint": endpoint, "method": method, "status": status}
    return sum(s.value for s in metric_samples(url, "sam2_requests_total") if s.labels == labels)


def test_an_upload_cut_short_never_reaches_the_app_nor_its_metrics(server):
    """The HTTP server reads each request whole before the app sees it: a client that leaves
    mid-upload is dropped there, not counted as a bad request."""
    _, url = server
    before = metric_samples(url, "sam2_requests_total")
    sock = connect(url)
    sock.sendall(b"POST /upload_rle HTTP/1.1\r\nHost: test\r\nContent-Type: multipart/form-data; boundary=x\r\n"
                 b"Content-Length: 5000\r\n\r\n--x\r\nContent-Disposition: form-data; name=\"image\"\r\n\r\nabc")
    sock.close()
    time.sleep(0.5)
    after = [s for s in metric_samples(url, "sam2_requests_total") if s.labels["endpoint"] != "/metrics"]
    assert after == [s for s in before if s.labels["endpoint"] != "/metrics"]  # not counted, as a 400 or else


def test_server_py_lets_the_pages_of_its_cors_origin_read_its_answers(server):
    """--cors-origin reaches the app and the HTTP server: an answer to a page of that origin says it
    may read it, the app's and the refusals the HTTP server gives itself (a 413 was a failed fetch)."""
    _, url = server
    request = urllib.request.Request(url + "/health", headers={"Origin": TOOL_ORIGIN})
    with urllib.request.urlopen(request, timeout=30) as answer:
        assert answer.headers["Access-Control-Allow-Origin"] == TOOL_ORIGIN
    sock = connect(url)
    sock.sendall(b"POST /upload_rle HTTP/1.1\r\nHost: test\r\nContent-Type: multipart/form-data; boundary=x\r\n"
                 + f"Origin: {TOOL_ORIGIN}\r\nContent-Length: {MAX_UPLOAD_MB * 2**20 + 1}\r\n\r\n".encode())
    status, headers, _ = status_and_json(read_until_closed(sock, 10))
    assert status == 413 and headers["access-control-allow-origin"] == TOOL_ORIGIN
    sock = connect(url)  # a body that stops arriving: the 408 the HTTP server writes by hand
    sock.sendall(b"POST /upload_rle HTTP/1.1\r\nHost: test\r\nContent-Type: multipart/form-data; boundary=x\r\n"
                 + f"Origin: {TOOL_ORIGIN}\r\nContent-Length: 100\r\n\r\n".encode())
    status, headers, _ = status_and_json(read_until_closed(sock, 10 * CONNECTION_TIMEOUT_S))
    assert status == 408 and headers["access-control-allow-origin"] == TOOL_ORIGIN


def test_headers_too_large_get_json_431_and_no_server_header(server):
    _, url = server
    counted = answers_counted(url, "other", "other", "431")  # its request line is not read
    sock = connect(url)
    sock.sendall(b"GET /health HTTP/1.1\r\nHost: test\r\nX-Padding: " + b"a" * 70_000 + b"\r\n\r\n")
    status, headers, answer = status_and_json(read_until_closed(sock, 10))
    assert status == 431 and "headers larger than the limit of 65536 bytes" in answer["error"]
    assert answers_counted(url, "other", "other", "431") == counted + 1
    assert "server" not in headers
    assert headers["x-content-type-options"] == "nosniff"  # as every answer of the app's
    with urllib.request.urlopen(url + "/health", timeout=10) as response:
        assert response.headers.get("Server") is None
        assert response.headers["X-Content-Type-Options"] == "nosniff"
        model = json.load(response)["model"]
    assert "sam2.1_hiera_micro.pt" in model and "/" not in model  # the file name, not the path


def test_requests_waitress_would_misread_or_wait_on_are_refused_at_once(server):
    """A request with both Transfer-Encoding and Content-Length: waitress read it as chunked and
    went on reading the connection (behind a proxy that frames by the length, the rest of the
    body was a request of the client's choosing). A TLS handshake and LF-only lines: waited
    for the connection timeout, then "nothing received"."""
    _, url = server
    smuggled = b"0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: test\r\n\r\n"
    for sent, status, message in [
        (b"POST /health HTTP/1.1\r\nHost: test\r\nTransfer-Encoding: chunked\r\n"
         b"Content-Length: %d\r\n\r\n" % len(smuggled) + smuggled, 400,
         "malformed HTTP request: Transfer-Encoding and Content-Length both given; send one"),
        (b"POST /health HTTP/1.0\r\nConnection: keep-alive\r\nTransfer-Encoding: chunked\r\n"
         b"Content-Length: %d\r\n\r\n" % len(smuggled) + smuggled, 400,
         "malformed HTTP request: Transfer-Encoding on an HTTP/1.0 request, which has none; send HTTP/1.1"),
        (b"POST /health HTTP/1.2\r\nConnection: keep-alive\r\nTransfer-Encoding: chunked\r\n\r\n" + smuggled, 400,
         "malformed HTTP request: Transfer-Encoding on an HTTP/1.2 request, which has none; send HTTP/1.1"),
        (b"POST /health\r\nTransfer-Encoding: chunked\r\n\r\n" + smuggled, 400,  # no version: HTTP/0.9's line
         "malformed HTTP request: Transfer-Encoding on an HTTP/0.9 request, which has none; send HTTP/1.1"),
        (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", 400,  # a TLS ClientHello's first bytes
         "this server speaks plain HTTP: use http://, not https://"),
        (b"GET /health HTTP/1.1\nHost: test\n\n", 400,
         "the request's lines end in LF alone: HTTP's end in CRLF (\\r\\n)"),
    ]:
        sock = connect(url)
        sock.sendall(sent)
        started = time.monotonic()
        answer = read_until_closed(sock, 20)  # one answer, then closed: nothing after it
        sock.close()
        assert time.monotonic() - started < 5 and answer.count(b"\r\n\r\n") == 1, answer  # one answer
        assert status_and_json(answer)[::2] == (status, {"error": message})
        assert status_and_json(answer)[1]["connection"] == "close"
    with urllib.request.urlopen(url + "/health", timeout=10) as response:
        assert response.status == 200


def test_an_upload_of_exactly_the_limit_is_taken_and_one_byte_more_refused_as_too_large(server):
    """waitress takes a body of the limit; werkzeug then refused it when the form's parser read on
    to its end (413, blaming a text field of the form over 500000 bytes). Sent chunked, the same:
    waitress counted the chunks' size lines as the body's, and refused the limit as too large."""
    _, url = server
    limit = MAX_UPLOAD_MB * 2**20
    image = png_of(200, (20, 20))
    head = (b'--b\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\n'
            b"Content-Type: image/png\r\n\r\n" + image)
    tail = b"\r\n--b--\r\n"
    for size in (limit - 1, limit):
        body = head + b"\0" * (size - len(head) - len(tail)) + tail  # zeros after the PNG's end: still the PNG
        request = urllib.request.Request(url + "/upload_rle", data=body, method="POST",
                                         headers={"Content-Type": "multipart/form-data; boundary=b"})
        with urllib.request.urlopen(request, timeout=60) as response:
            assert response.status == 200 and "mask_0" in json.load(response), size
        for extra in (0, 1):  # chunked, 16 kB at a time: the limit taken, one byte more refused
            connection = http.client.HTTPConnection(urlparse(url).hostname, urlparse(url).port, timeout=60)
            chunks = [body[start:start + 2**14] for start in range(0, len(body), 2**14)] + [b"\0"] * extra
            connection.request("POST", "/upload_rle", body=iter(chunks), encode_chunked=True,
                               headers={"Content-Type": "multipart/form-data; boundary=b"})
            answer = connection.getresponse()
            assert (answer.status, size + extra > limit) in ((200, False), (413, True)), (size, extra, answer.status)
            assert (b"mask_0" if answer.status == 200 else b"upload larger than the limit") in answer.read()
            connection.close()
    sock = connect(url)  # one byte more: refused as it is declared, before the body is sent
    sock.sendall(f"POST /upload_rle HTTP/1.1\r\nHost: test\r\nContent-Length: {limit + 1}\r\n"
                 "Content-Type: multipart/form-data; boundary=b\r\n\r\n".encode())
    status, _, answer = status_and_json(read_until_closed(sock, 10))
    sock.close()
    assert status == 413 and answer["error"] == f"upload larger than the limit of {limit} bytes"


def test_the_access_log_has_one_line_per_request_the_server_refused_and_none_a_client_wrote(server, server_log):
    """A "%0a" in the path wrote the rest of the path as a log line of its own (a forged entry);
    what waitress answers itself (headers too large, malformed HTTP) was counted, never logged."""
    _, url = server
    with pytest.raises(urllib.error.HTTPError):
        urllib.request.urlopen(url + "/health%0a2026-01-01%2000:00:00,000%20INFO%20access:%20forged", timeout=10)
    sock = connect(url)
    sock.sendall(b"GET /health HTTP/1.1\r\nHost: test\r\nX-Padding: " + b"a" * 70_000 + b"\r\n\r\n")
    assert status_and_json(read_until_closed(sock, 10))[0] == 431
    sock.close()
    sock = connect(url)
    sock.sendall(b"POST /upload_rle HTTP/1.1\r\nHost: test\r\nContent-Length: abc\r\n\r\n")
    assert status_and_json(read_until_closed(sock, 10))[0] == 400
    sock.close()
    sock = connect(url)  # a path of other letters, refused: as the app logs it, not encoded twice
    sock.sendall(b"POST /h%C3%A9llo HTTP/1.1\r\nHost: test\r\nContent-Length: 99999999\r\n\r\n")
    assert status_and_json(read_until_closed(sock, 10))[0] == 413
    sock.close()
    wait_for(lambda: " 400 - ms " in server_log.read_text())
    log = server_log.read_text().splitlines()
    assert not any(line.startswith("2026-01-01 00:00:00,000 INFO access: forged") for line in log)
    assert any("access: 127.0.0.1 GET /health%0A2026-01-01%2000:00:00,000%20INFO%20access:%20forged 404 " in line
               for line in log)
    assert any(re.search(r"access: 127\.0\.0\.1 - - 431 - ms \d+ bytes$", line) for line in log), log[-5:]
    assert any(re.search(r"access: 127\.0\.0\.1 POST /upload_rle 400 - ms \d+ bytes$", line) for line in log), log[-5:]
    wait_for(lambda: "POST /h%C3%A9llo 413 - ms" in server_log.read_text())


@pytest.fixture()
def client():
    worker = InferenceWorker(batch_size=1, max_queue=2, timeout_s=5)
    worker.start(StubGenerator())
    return create_app(worker, Limits(max_upload_bytes=2**20, max_pixels=10_000)).test_client()


def multipart(parts: list[tuple[str | None, str | None, bytes]]) -> tuple[bytes, str]:
    """(body, content type) of a multipart form: (field name or None, file name or None, content)."""
    body = b""
    for name, filename, content in parts:
        disposition = ("form-data" + (f'; name="{name}"' if name is not None else "")
                       + (f'; filename="{filename}"' if filename else ""))
        body += f"--b\r\nContent-Disposition: {disposition}\r\n\r\n".encode() + content + b"\r\n"
    return body + b"--b--\r\n", "multipart/form-data; boundary=b"


def test_a_form_sent_as_a_raw_body_is_told_so_and_an_image_is_not():
    """A multipart form whose Content-Type made it a raw body (an image's type, octet-stream or
    none) is told that its type is wrong, whatever ends its lines and with blank lines before its
    first boundary; bodies that only look alike are not an image, as before."""
    photo = (Path(__file__).resolve().parents[1] / "examples" / "shapes.jpg").read_bytes()
    form = multipart([("image", "a.jpg", photo)])[0]
    for body in (form, b"\r\n\r\n" + form, form.replace(b"\r\n", b"\n")):
        with pytest.raises(InvalidImage, match="a multipart form, but its Content-Type is not multipart/form-data"):
            decode_body_image(body, Limits())
    for body in (b"garbage", b"--x\r\nfoo", b"content-disposition: form-data\r\n--b"):
        with pytest.raises(InvalidImage, match="not an image in one of the formats read"):
            decode_body_image(body, Limits())
    assert decode_body_image(photo, Limits()).shape == (240, 320, 3)


@pytest.mark.parametrize("case, status, message", [
    ("too many parts", 413, "the form has more than 1000 parts"),
    ("text field too large", 413, "the form's text field 'note' is larger than the limit of 500000 bytes; send the "
                                  "image as a file (curl -F 'image=@file.jpg')"),
    ("prompts too large", 413, "the form's text field 'prompts' is larger than the limit of 500000 bytes; 64 prompt "
                               "sets of 64 points fit in under 200 kB as compact JSON"),
    ("prompts too large, another field longer as text", 413, "the form's text field 'prompts' is larger than"),
    ("prompts too large, another name given twice", 413, "the form's text field 'prompts' is larger than"),
    ("upload too large", 413, "upload larger than the limit of 1048576 bytes"),
    # Read again without a limit, a part's headers of 50 MB took 30 s, and were called a text field.
    ("file name too long", 413, "a part's headers (its file name, say) are larger than the limit of 500000 bytes"),
    ("too many pixels", 413, "pixels; the limit is 10000 pixels"),
    ("two images", 400, "one file in the field 'image', received 2"),
])
def test_each_limit_answers_with_its_own_message(client, case, status, message):
    image = ("image", "a.png", png_of(1))
    parts = {
        "too many parts": [image] + [(f"f{i}", None, b"x") for i in range(1200)],
        "text field too large": [image, ("note", None, b"x" * 600_000)],
        "prompts too large": [image, ("format", None, b"rle"), ("prompts", None, "é".encode() * 250_001)],  # 500,002 bytes
        # 200 kB that are not UTF-8: decoded, each byte is a 3-byte replacement character.
        "prompts too large, another field longer as text": [image, ("note", None, b"\xff" * 200_000),
                                                             ("prompts", None, b"x" * 500_001)],
        # Two parts of one name, each under the limit (together over it): the limit is a part's.
        "prompts too large, another name given twice": [image, ("note", None, b"x" * 260_000),
                                                         ("note", None, b"x" * 260_000),
                                                         ("prompts", None, b"x" * 500_001)],
        "upload too large": [("image", "big.png", b"x" * (2**20 + 1))],
        "file name too long": [("image", "a" * 600_000 + ".png", png_of(1))],
        "too many pixels": [("image", "big.png", png_of(1, size=(101, 100)))],
        "two images": [image, image],
    }[case]
    body, content_type = multipart(parts)
    assert len(body) < 2**20 or case == "upload too large"
    response = client.post("/upload_rle", data=body, content_type=content_type)
    assert response.status_code == status and response.mimetype == "application/json"
    assert message in response.get_json()["error"]
    assert client.get("/health").status_code == 200  # still serving


def test_405_says_allow_and_414_is_json(client):
    response = client.get("/upload_rle")
    assert response.status_code == 405 and response.mimetype == "application/json"
    assert set(response.headers["Allow"].replace(" ", "").split(",")) >= {"POST"}
    segment = "takes POST, with JSON (image_id and prompts) or a form (image and prompts)"
    for method, path, words in [("PUT", "/segment", segment), ("POST", "/health", "takes GET"),
                                ("DELETE", "/static/app.js", "takes GET")]:
        wrong = client.open(path, method=method)
        assert wrong.status_code == 405 and wrong.get_json()["error"] == f"{method} {path}: this endpoint {words}"
    long_url = client.get("/health?" + "a" * 10_000)
    assert long_url.status_code == 414 and long_url.mimetype == "application/json"
    assert "URL longer than the limit of 8192 bytes" in long_url.get_json()["error"]
    encoded = client.get("/x" + "%41" * 3000)  # 9002 bytes as sent, 3002 once decoded
    assert encoded.status_code == 414, encoded.get_json()
    for answer in (response, long_url, client.get("/health"), client.get("/")):  # no answer sniffed
        assert answer.headers["X-Content-Type-Options"] == "nosniff"


def test_the_page_is_at_one_address_with_its_security_policy(client):
    """The page at /; as the static file it is, sent there (its links are relative: none would
    answer under /static/)."""
    response = client.get("/")
    assert response.status_code == 200 and response.mimetype == "text/html"
    assert response.headers["Content-Security-Policy"] == PAGE_SECURITY_POLICY
    assert "Content-Security-Policy" not in client.get("/static/app.js").headers
    for path in ("/static/index.html", "/static/index.html/", "/static/index.html//"):  # Flask takes a / after it
        moved = client.get(path)
        assert moved.status_code == 308, path
        assert urllib.parse.urljoin("http://host" + path, moved.headers["Location"]) == "http://host/", path


def test_a_failed_precondition_on_a_page_file_is_json_without_the_file(client):
    """werkzeug answers a failed If-Match with its 412 and the whole file."""
    for path in ("/", "/static/app.js"):
        etag = client.get(path).headers["ETag"]
        assert client.get(path, headers={"If-Match": etag}).status_code == 200
        assert client.get(path, headers={"If-Match": "*"}).status_code == 200  # any version: werkzeug's 412
        failed = client.get(path, headers={"If-Match": '"another"'})
        assert failed.status_code == 412 and failed.mimetype == "application/json", path
        assert "If-Match" in failed.get_json()["error"]


@pytest.mark.parametrize("body, why", [
    (b'--b\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\n\r\nxyz',
     "it ends before its last line, '--b--'"),
    (b'--c\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\n\r\nxyz\r\n--c--\r\n',
     "no line of it is '--b', the boundary its Content-Type names"),
    # No boundary line in over 500 kB (a file sent raw with a multipart Content-Type): a 413 of "a text field".
    (b"x" * 600_000, "no line of its first 500000 bytes is '--b', the boundary its Content-Type names"),
    (b'--b\r\nContent-Type: image/png\r\n\r\nxyz\r\n--b--\r\n', "a part has no Content-Disposition header"),
    (b'--b\r\nContent-Disposition: form-data; name="\xff"; filename="a.png"\r\n\r\nxyz\r\n--b--\r\n',
     "a part's headers are not UTF-8: a file name in another encoding? curl -F 'image=@FILE;filename=a.jpg' "
     "sends the file under another name"),
])
def test_a_malformed_form_is_told_what_is_wrong_with_it(client, body, why):
    """werkzeug's parser drops a malformed form's error: "received file fields: none" said nothing of it."""
    answer = client.post("/upload_rle", data=body, content_type="multipart/form-data; boundary=b")
    assert answer.status_code == 400 and answer.get_json()["error"] == (
        f"the body is not a multipart form that can be read ({why}); send the image as curl -F 'image=@file.jpg'")
    empty = client.post("/upload_rle", data=b"--b--\r\n", content_type="multipart/form-data; boundary=b")
    assert empty.get_json()["error"].endswith("received file fields: none")  # a whole form, with no part


def test_text_after_a_form_over_the_limit_is_told_so(client):
    body, content_type = multipart([("image", "a.png", png_of(1))])
    answer = client.post("/upload_rle", data=body + b"x" * 600_000, content_type=content_type)
    assert answer.status_code == 413
    assert answer.get_json()["error"] == "more than 500000 bytes follow the form's last line"


def test_metrics_parse_count_methods_apart_and_say_charset_once(client):
    body, content_type = multipart([("image", "a.png", png_of(1))])
    assert client.post("/upload_rle", data=body, content_type=content_type).status_code == 200
    assert client.options("/upload_rle").status_code == 200
    for number in range(3):  # made-up methods and paths add no series of their own
        assert client.open(f"/nowhere{number}", method=f"MADEUP{number}").status_code == 404
    response = client.get("/metrics")
    assert response.headers["Content-Type"].count("charset") == 1
    families = {family.name: family for family in text_string_to_metric_families(response.get_data(as_text=True))}
    requests = {(s.labels["endpoint"], s.labels["method"], s.labels["status"]): s.value
                for s in families["sam2_requests"].samples if s.name == "sam2_requests_total"}
    assert requests[("/upload_rle", "POST", "200")] == 1
    assert requests[("/upload_rle", "OPTIONS", "200")] == 1
    assert requests[("other", "other", "404")] == 3
    latency = [s for s in families["sam2_request_seconds"].samples
               if s.name == "sam2_request_seconds_count" and s.labels["endpoint"] == "/upload_rle"]
    assert [s.value for s in latency] == [1]  # the upload only
    # Every route of the app has its own label, with its method (a route added later is not "other").
    routes = {rule.rule: sorted(rule.methods - {"HEAD", "OPTIONS"}) for rule in client.application.url_map.iter_rules()
              if rule.endpoint != "static"}
    assert routes == {path: [method] for path, method in ROUTES.items()}


def test_timeout_message_names_the_limit():
    stub = StubGenerator()
    worker = InferenceWorker(batch_size=1, max_queue=2, timeout_s=0.3)
    worker.start(stub)
    stub.gate.clear()
    try:
        response = create_app(worker).test_client().post(
            "/upload_rle", data={"image": (io.BytesIO(png_of(1)), "a.png")})
    finally:
        stub.gate.set()
    assert response.status_code == 504
    assert "request timeout of 0.3 s" in response.get_json()["error"]


def test_an_internal_error_answers_its_first_line_and_logs_the_rest(caplog):
    """A 500 tells the client what failed, not the traceback TorchScript appends (the server's
    file paths); the log keeps all of it."""
    class Failing(StubGenerator):
        def generate_batch(self, images):
            raise RuntimeError("The following operation failed in the TorchScript interpreter.\n"
                               'Traceback of TorchScript (most recent call last):\n  File "/srv/app/model.py", line 7')

    worker = InferenceWorker(batch_size=1, max_queue=2, timeout_s=5)
    worker.start(Failing())
    with caplog.at_level(logging.ERROR):
        response = create_app(worker).test_client().post("/upload_rle", data={"image": (io.BytesIO(png_of(1)), "a.png")})
    assert response.status_code == 500
    assert response.get_json() == {"error": "internal error: RuntimeError: The following operation failed in the "
                                            "TorchScript interpreter."}
    assert "/srv/app/model.py" in caplog.text
    assert first_line(RuntimeError("\n  \nthe message\nmore")) == "the message"  # its first line with words


def test_tiny_images_get_the_baselines_answer(trained_micro_checkpoint):
    """sam2's box NMS cannot tell apart masks whose boxes have no area: a 1x1 image gives one
    identical mask per candidate. ao answers as the baseline does, duplicates included."""
    from sam2serve.amg import AMGConfig, MaskGenerator, ReferenceMaskGenerator
    from sam2serve.checkpoints import load_model

    model = load_model(trained_micro_checkpoint, "micro", "cpu").model
    config = AMGConfig(points_per_side=4)
    rng = np.random.default_rng(0)
    for height, width in [(1, 1), (1, 500), (3, 3)]:
        image = rng.integers(0, 255, (height, width, 3), dtype=np.uint8)
        baseline = ReferenceMaskGenerator(model, config).generate(image)
        assert MaskGenerator(model, config).generate(image) == baseline
        if (height, width) == (1, 1):
            assert len(baseline) > 1 and all(mask == baseline[0] for mask in baseline)


def test_stopping_waits_until_answers_are_made_and_sent_not_for_idle_connections():
    """server.py closes the HTTP server only once finish_answers says no connection has a
    request being run or an answer being sent (closing earlier would cut the answer off); new
    connections are no longer served meanwhile."""
    answer_size = 32 * 2**20  # far more than the sockets' buffers hold
    entered, release = threading.Event(), threading.Event()
    app = Flask(__name__)

    @app.get("/slow")
    def slow():
        entered.set()
        release.wait(timeout=30)
        return b"x" * answer_size

    server = create_http_server(app, "127.0.0.1", 0, max_upload_bytes=2**20, threads=2)  # a port of its own
    port = int(server.effective_port)  # (waitress gives it as text)
    threading.Thread(target=server.run, daemon=True).start()
    idle = socket.create_connection(("127.0.0.1", port), timeout=10)  # a keep-alive client with nothing to ask
    client = socket.socket()
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)  # before connecting: a slow reader
    client.connect(("127.0.0.1", port))
    late = None
    try:
        client.sendall(b"GET /slow HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n")
        assert entered.wait(timeout=10)
        assert finish_answers(server, 0.3) == 1  # being run by the app
        release.set()
        time.sleep(0.5)
        assert finish_answers(server, 0.3) == 1  # made, not yet sent: the client has not read it
        received = []
        reader = threading.Thread(target=lambda: received.append(read_until_closed(client, 30)), daemon=True)
        reader.start()
        assert finish_answers(server, 30) == 0  # sent; the idle connection does not count
        reader.join(timeout=30)
        assert received[0].endswith(b"x" * 1000) and len(received[0].partition(b"\r\n\r\n")[2]) == answer_size
        late = socket.create_connection(("127.0.0.1", port), timeout=10)  # the kernel's backlog takes it
        late.sendall(b"GET /slow HTTP/1.1\r\nHost: test\r\n\r\n")
        late.settimeout(1.5)
        with pytest.raises(TimeoutError):  # never accepted, never answered
            late.recv(1)
    finally:
        release.set()
        for sock in (idle, client, late):
            if sock is not None:
                sock.close()
        server.close()


def test_stopping_waits_for_a_request_arriving_not_for_one_stalled_part_way(caplog):
    """A request still arriving is waited for (its answer is the stop's 503, not a reset); one
    whose client sent nothing for a second held every stop for the whole 10 s."""
    caplog.set_level(logging.INFO, logger="sam2serve.wsgi")
    app = Flask(__name__)
    app.post("/upload_rle")(lambda: b"ok")
    server, port = serve_in_process(app, timeout_s=30)
    arriving = socket.create_connection(("127.0.0.1", port), timeout=10)
    try:
        arriving.sendall(b"POST /upload_rle HTTP/1.1\r\nHost: test\r\nContent-Length: 1000\r\n\r\nxxxxxx")
        wait_for(lambda: any(getattr(c, "request", None) is not None for c in list(server._map.values())))
        assert finish_answers(server, 0.3) == 1  # part-way in, just now
        time.sleep(wsgi.RECEIVING_PAUSE_S)
        started = time.monotonic()
        assert finish_answers(server, 10) == 0 and time.monotonic() - started < 1  # stalled: not waited for
        assert "stopping: 1 connection(s) whose request stalled part-way are closed" in caplog.text
    finally:
        arriving.close()
        server.close()


def serve_in_process(app: Flask, timeout_s: int, threads: int = 1, max_connections: int = 1000) -> tuple:
    """A waitress server of the app with `threads`, serving on a thread of its own: (server, port)."""
    server = create_http_server(app, "127.0.0.1", 0, max_upload_bytes=2**20, threads=threads,  # a port of its own
                                limits=ConnectionLimits(max_connections, timeout_s))
    threading.Thread(target=server.run, daemon=True).start()
    return server, int(server.effective_port)  # (waitress gives it as text)


def test_max_connections_clients_are_served_at_once_and_one_more_waits():
    """waitress's connection limit counts its listener and trigger too: --max-connections 2
    accepted no client at all."""
    app = Flask(__name__)
    app.add_url_rule("/small", "small", lambda: b"ok")
    server, port = serve_in_process(app, timeout_s=30, threads=2, max_connections=2)
    clients = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(3)]
    try:
        def answer(sock: socket.socket, timeout_s: float) -> bytes:
            sock.settimeout(timeout_s)
            received = b""
            try:
                while not received.endswith(b"\r\n\r\nok"):
                    received += sock.recv(65536)
            except TimeoutError:
                pass
            return received

        for sock in clients:
            sock.sendall(b"GET /small HTTP/1.1\r\nHost: test\r\n\r\n")  # kept alive: the connection stays
        assert answer(clients[0], 5).endswith(b"ok") and answer(clients[1], 5).endswith(b"ok")
        assert answer(clients[2], 1) == b""  # waits to be accepted
        clients[0].close()
        assert answer(clients[2], 5).endswith(b"\r\n\r\nok")  # accepted once one closed
    finally:
        for sock in clients:
            sock.close()
        server.close()


def test_a_client_that_reads_no_answer_is_closed_and_frees_its_thread(caplog):
    """waitress waits, on the thread that writes it, for a client to read a large answer (over
    its 16 MiB high watermark), and its idle timer never closes a connection with an answer
    unsent: such a client, two requests pipelined, held the thread for good."""
    app = Flask(__name__)
    app.add_url_rule("/big", "big", lambda: b"x" * 40 * 2**20)
    app.add_url_rule("/small", "small", lambda: b"ok")
    server, port = serve_in_process(app, timeout_s=1)
    stalled = socket.socket()
    stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
    stalled.connect(("127.0.0.1", port))
    other = None
    try:
        with caplog.at_level(logging.INFO, logger="sam2serve.wsgi"):
            stalled.sendall(b"GET /big HTTP/1.1\r\nHost: test\r\n\r\n" * 2)  # and never reads
            time.sleep(0.5)  # the only thread writes the first answer, waiting for the client
            started = time.monotonic()
            other = socket.create_connection(("127.0.0.1", port), timeout=10)
            other.sendall(b"GET /small HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n")
            assert read_until_closed(other, 15).endswith(b"\r\n\r\nok")
            assert time.monotonic() - started < 10
            assert len(read_until_closed(stalled, 5)) < 40 * 2**20  # closed, the answer cut off
        assert "its answer unread for 1 s" in caplog.text
    finally:
        for sock in (stalled, other):
            if sock is not None:
                sock.close()
        server.close()


def test_a_request_trickling_in_is_closed():
    """A byte every 0.3 s resets waitress's idle timer for good; a request must arrive at 500
    bytes/s on average once the connection timeout has passed."""
    app = Flask(__name__)
    app.post("/upload_rle")(lambda: b"ok")
    server, port = serve_in_process(app, timeout_s=1)
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    started, closed, received = time.monotonic(), False, b""
    try:
        sock.sendall(b"POST /upload_rle HTTP/1.1\r\nHost: test\r\nContent-Length: 100000\r\n\r\n")
        wait_for(lambda: server.active_channels)
        [channel] = server.active_channels.values()
        sock.settimeout(0.3)
        while not closed and time.monotonic() - started < 12:
            try:
                sock.sendall(b"x")
                chunk = sock.recv(65536)
                received += chunk
                closed = chunk == b""
            except TimeoutError:
                continue
            except (BrokenPipeError, ConnectionResetError):
                closed = True
        assert closed and time.monotonic() - started < 6
        status, headers, answer = status_and_json(received)  # told why, where it had only seen the close
        assert status == 408 and headers["connection"] == "close"
        assert answer["error"].startswith("request timeout: its request arriving slower than 500 bytes/s")
        # Closed during the event loop's pass over its connections: never polled again (its
        # descriptor number may already be a new connection's).
        wait_for(lambda: channel.socket is None)  # the client may see the close a moment before
        assert not channel.readable() and not channel.writable()
    finally:
        sock.close()
        server.close()


def test_an_error_of_the_stalled_connections_check_is_logged_and_the_server_goes_on(monkeypatch, caplog):
    """The check runs in waitress's event loop, where nothing handles an error: one ended the HTTP
    server's thread, and server.py with it."""
    checks = []

    def failing_check(listener, now):
        checks.append(now)
        raise RuntimeError("the check broke")

    monkeypatch.setattr(wsgi, "close_stalled", failing_check)
    app = Flask(__name__)
    app.get("/ping")(lambda: b"pong")
    server, port = serve_in_process(app, timeout_s=1)  # checked about once a second
    try:
        wait_for(lambda: len(checks) >= 2, timeout=15)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=10) as answer:
            assert answer.read() == b"pong"
        assert "closing stalled connections failed" in caplog.text and "the check broke" in caplog.text
    finally:
        server.close()


@pytest.mark.parametrize("sent", [b"POST /upload_rle HTTP/1.1\r\nHost: test\r\nContent-Length: 100\r\n\r\nxx",
                                  b"POST /upload_rle HTTP/1.1\r\nHost: te"])
def test_a_request_stalled_part_way_is_answered_408_then_closed(sent):
    """A body or headers cut off part-way: after the connection timeout, a 408 that says so, where
    the client saw the connection close with no answer; an idle connection is closed as before."""
    app = Flask(__name__)
    app.post("/upload_rle")(lambda: b"ok")
    server, port = serve_in_process(app, timeout_s=1)
    stalled, idle = (socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(2))
    try:
        stalled.sendall(sent)
        started = time.monotonic()
        status, headers, answer = status_and_json(read_until_closed(stalled, 10))
        assert status == 408 and answer == {"error": "request timeout: nothing received for 1 s"}
        assert headers["content-type"] == "application/json" and time.monotonic() - started < 8
        assert read_until_closed(idle, 10) == b""
    finally:
        stalled.close()
        idle.close()
        server.close()


def test_a_request_pipelined_behind_a_long_one_is_not_taken_for_a_trickle():
    """waitress stops reading a connection while it answers one of its requests: a request
    pipelined behind, partly read, waits through no fault of its client."""
    app = Flask(__name__)
    app.add_url_rule("/slow", "slow", lambda: time.sleep(3) or b"slow")
    app.add_url_rule("/echo", "echo", lambda: str(len(request.get_data())), methods=["POST"])
    server, port = serve_in_process(app, timeout_s=1)
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    try:
        second = b"POST /echo HTTP/1.1\r\nHost: test\r\nConnection: close\r\nContent-Length: 100000\r\n\r\n" + b"x" * 100000
        sock.sendall(b"GET /slow HTTP/1.1\r\nHost: test\r\n\r\n" + second[:100])  # read with the first
        time.sleep(0.5)
        sock.sendall(second[100:])  # read once the first is answered
        answers = read_until_closed(sock, 15)
        assert answers.count(b"HTTP/1.1 200") == 2 and answers.endswith(b"\r\n\r\n100000"), answers[-300:]
    finally:
        sock.close()
        server.close()


def test_descriptors_allowed_cover_a_connections_temporary_files(monkeypatch, caplog):
    """A connection may hold its socket, a large body's temporary file and a large answer's; where
    the hard limit on open files allows fewer, fewer connections are accepted at once (at the
    limit, waitress would call accept() again and again, each failing for want of a descriptor)."""
    asked = []
    monkeypatch.setattr(wsgi, "allow_descriptors", lambda needed: asked.append(needed) or needed)
    server = create_http_server(Flask(__name__), "127.0.0.1", 0, max_upload_bytes=2**20, threads=5,
                                limits=ConnectionLimits(max_connections=100))
    server.close()
    assert asked[0] >= 3 * 100 + 5 and server.adj.connection_limit == 100 + 2  # beside the listener and trigger
    monkeypatch.undo()
    raised_to = []
    monkeypatch.setattr(wsgi.resource, "getrlimit", lambda kind: (256, 400))  # soft, hard
    monkeypatch.setattr(wsgi.resource, "setrlimit", lambda kind, limits: raised_to.append(limits))
    with caplog.at_level(logging.WARNING, logger="sam2serve.wsgi"):
        server = create_http_server(Flask(__name__), "127.0.0.1", 0, max_upload_bytes=2**20, threads=5,
                                    limits=ConnectionLimits(max_connections=1000))
    server.close()
    assert raised_to == [(400, 400)]
    clients = server.adj.connection_limit - 2
    assert 50 < clients and 3 * clients + 5 < 400
    assert f"allows {clients} connections at once, not 1000" in caplog.text
    create_http_server(Flask(__name__), "127.0.0.1", 0, max_upload_bytes=2**20, threads=5,
                       limits=ConnectionLimits(max_connections=2)).close()  # a few asked for, and room for them
    monkeypatch.setattr(wsgi.resource, "getrlimit", lambda kind: (64, 64))  # too few to serve: said at start
    with pytest.raises(OSError, match=r"limit on open files \(64: ulimit -Hn\) leaves room for 0 connections"):
        create_http_server(Flask(__name__), "127.0.0.1", 0, max_upload_bytes=2**20, threads=5)


# A server whose process runs out of descriptors (its limit lowered after it started listening);
# told to stop, it prints how many times it called accept().
OUT_OF_DESCRIPTORS_SERVER = """
import logging, os, resource, signal, sys
from flask import Flask
from sam2serve import wsgi
logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
app = Flask(__name__)
app.add_url_rule("/", "ok", lambda: "ok")
server = wsgi.create_http_server(app, "127.0.0.1", 0, max_upload_bytes=2**20, threads=2)
accepts, accept = [], server.accept
server.accept = lambda: accepts.append(1) or accept()
signal.signal(signal.SIGTERM, lambda *_: (print(len(accepts), flush=True), os._exit(0)))
resource.setrlimit(resource.RLIMIT_NOFILE, (48, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
print(server.effective_port, flush=True)
server.run()
"""


def test_a_server_out_of_descriptors_pauses_accepting_instead_of_spinning():
    """With no descriptor left, waitress would try the connection waiting in the backlog again at
    once, and again: a loop at full CPU and a warning line each time. Accepting pauses instead,
    and resumes once connections close."""
    server = subprocess.Popen([sys.executable, "-c", OUT_OF_DESCRIPTORS_SERVER], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    clients = []
    try:
        port = int(server.stdout.readline())
        clients = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(60)]  # over the 48
        time.sleep(2)
        for client in clients:
            client.close()
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10) as answer:
            assert answer.read() == b"ok"
    finally:
        for client in clients:
            client.close()
        server.terminate()
        accepts, errors = server.communicate(timeout=10)
    assert "no file descriptor left to accept a connection" in errors
    assert errors.count("accept() threw") == 0 and errors.count("no file descriptor left") == 1, errors[-2000:]
    assert int(accepts) < 100  # 61 connections, and a try now and then: not thousands


def test_the_logged_address_is_the_real_one():
    """Port 0 gets a free port, and the log says which; an IPv6 address is written in brackets."""
    app = Flask(__name__)
    for host, written in [("127.0.0.1", "127.0.0.1"), ("::1", "[::1]")]:
        try:
            server = create_http_server(app, host, 0, max_upload_bytes=2**20, threads=1)
        except OSError:
            assert host == "::1", "IPv4 loopback must be there"
            continue  # no IPv6 on this machine
        try:
            [url] = listening_urls(server)
            port = int(url.rpartition(":")[2])
            assert url == f"http://{written}:{port}" and port > 0
        finally:
            server.close()


def test_overload_warnings_are_one_line_per_interval():
    """waitress warns of its task queue once per request under overload; one line per interval
    gets through, with how many were held back."""
    once = OncePer(0.3)
    records = [logging.LogRecord("waitress.queue", logging.WARNING, __file__, 1, "Task queue depth is %d", (n,), None)
               for n in range(6)]
    passed = [record for record in records[:5] if once.filter(record)]
    time.sleep(0.4)
    assert once.filter(records[5])
    assert [record.getMessage() for record in passed] == ["Task queue depth is 0"]
    assert records[5].getMessage() == "Task queue depth is 5 (4 such warnings held back since the last one)"


def test_access_log_gives_one_line_per_request_when_asked(caplog):
    worker = InferenceWorker(batch_size=1, max_queue=2, timeout_s=5)
    worker.start(StubGenerator())
    body, content_type = multipart([("image", "a.png", png_of(1))])
    with caplog.at_level(logging.INFO, logger="access"):
        for access_log in (False, True):
            client = create_app(worker, access_log=access_log).test_client()
            assert client.post("/upload_rle", data=body, content_type=content_type).status_code == 200
            assert client.get("/nowhere").status_code == 404
    lines = [record.getMessage() for record in caplog.records if record.name == "access"]
    assert len(lines) == 2, lines  # from the second app only
    assert re.fullmatch(r"127\.0\.0\.1 POST /upload_rle 200 \d+ ms \d+ bytes", lines[0]), lines[0]
    assert re.fullmatch(r"127\.0\.0\.1 GET /nowhere 404 \d+ ms \d+ bytes", lines[1]), lines[1]


def test_a_connection_closed_meanwhile_is_a_client_gone():
    """waitress's thread may close the socket between the check of `connected` and the poll (its
    descriptor then -1): that client is gone, not a ValueError (a 500, or a gone client's job run)."""
    from sam2serve.wsgi import JSONErrorChannel

    ours, theirs = socket.socketpair()
    channel = JSONErrorChannel.__new__(JSONErrorChannel)  # the state alone, no server
    channel.socket, channel.connected = ours, True
    try:
        assert not channel.check_client_disconnected()
        theirs.close()
        assert channel.check_client_disconnected()
        ours.close()
        assert channel.check_client_disconnected()
    finally:
        ours.close()


def test_a_request_whose_client_has_gone_is_not_run():
    """Clients that give up (curl --max-time, a proxy's timeout) and send again had the model run
    every copy, the abandoned ones first: waitress does not read a connection while it answers,
    so it never knew; the socket is asked when the request's turn comes. A client that had sent a
    second request behind the first (pipelined), unread, is gone too (a peek saw its bytes, not
    the close behind them)."""
    stub = StubGenerator()
    worker = InferenceWorker(batch_size=1, max_queue=4, timeout_s=30)
    worker.start(stub)
    server, port = serve_in_process(create_app(worker), timeout_s=60, threads=4)
    stub.gate.clear()
    clients = []
    try:
        for value in (1, 2, 3):  # 1 runs and holds the model; 2 and 3 queue behind it
            body, content_type = multipart([("image", "a.png", png_of(value))])
            request = (f"POST /upload_rle HTTP/1.1\r\nHost: test\r\nConnection: close\r\n"
                       f"Content-Type: {content_type}\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
            if value == 2:  # a request pipelined behind, more than waitress reads at once (8 kB): the first kept alive
                request = (request.replace(b"Connection: close\r\n", b"", 1)
                           + b"POST /upload_rle HTTP/1.1\r\nHost: test\r\nContent-Length: 65536\r\n\r\n" + b"x" * 65536)
            clients.append(socket.create_connection(("127.0.0.1", port), timeout=10))
            clients[-1].sendall(request)
            wait_for(lambda: stub.running.is_set() and worker.queue_depth == value - 1)
        clients[1].close()  # gives up while queued
        time.sleep(0.2)
        stub.gate.set()
        for value in (1, 3):
            status, _, answer = status_and_json(read_until_closed(clients[value - 1], 15))
            assert status == 200 and answer == {"mask_0": {"size": [8, 6], "counts": [value, 1]}}
        assert stub.batches == [[1], [3]]
        assert answers_counted(f"http://127.0.0.1:{port}", "/upload_rle", "POST", "499") == 1
    finally:
        stub.gate.set()
        for sock in clients:
            sock.close()
        server.close()


def test_a_url_of_exactly_the_limit_is_served_one_byte_more_is_414():
    worker = InferenceWorker(batch_size=1, max_queue=2, timeout_s=5)
    worker.start(StubGenerator())
    client = create_app(worker, Limits()).test_client()
    limit = Limits().max_url_bytes
    at_limit = "/health?" + "a" * (limit - len("/health?"))
    assert len(at_limit) == limit and client.get(at_limit).status_code == 200
    over = client.get(at_limit + "a")
    assert over.status_code == 414 and f"limit of {limit} bytes" in over.get_json()["error"]


def test_a_500_tells_at_most_300_characters_of_the_error():
    """One long line (a tensor printed whole, say) is not sent whole."""
    class Failing(StubGenerator):
        def generate_batch(self, images):
            raise RuntimeError("x" * 5000)

    worker = InferenceWorker(batch_size=1, max_queue=2, timeout_s=5)
    worker.start(Failing())
    response = create_app(worker).test_client().post("/upload_rle", data={"image": (io.BytesIO(png_of(1)), "a.png")})
    assert response.status_code == 500
    assert response.get_json() == {"error": "internal error: RuntimeError: " + "x" * 300}


def test_health_while_loading_says_when_to_ask_again():
    """503 with Retry-After while the model loads, as the endpoints that use the model answer."""
    worker = InferenceWorker(batch_size=1, max_queue=2, timeout_s=5)
    health = create_app(worker, info={"mode": "stub"}).test_client().get("/health")
    assert health.status_code == 503 and health.headers.get("Retry-After") == "5"
    assert health.get_json() == {"status": "loading", "mode": "stub"}


def test_a_post_without_a_body_is_told_it_is_empty_not_a_media_type():
    """An empty body (curl -X POST without -F) is told so, not "the body is of no media type",
    which would blame a header."""
    worker = InferenceWorker(batch_size=1, max_queue=2, timeout_s=5)
    worker.start(StubGenerator())
    answer = create_app(worker).test_client().post("/upload_rle")
    assert answer.status_code == 400
    assert answer.get_json()["error"].endswith("; the body is empty"), answer.get_json()


def test_metrics_tell_the_queue_depth_and_every_image_of_a_batch():
    stub = StubGenerator()
    worker = InferenceWorker(batch_size=2, max_queue=4, timeout_s=30)
    client = create_app(worker).test_client()
    first, threads = hold_worker(worker, stub)  # image 1 runs; 2 and 3 queue, then run as one batch
    queued, more = submit_in_threads(worker, [2, 3])
    wait_for(lambda: worker.queue_depth == 2)
    try:
        assert "sam2_queue_depth 2.0" in client.get("/metrics").get_data(as_text=True)
    finally:
        stub.gate.set()
        for thread in threads + more:
            thread.join(timeout=30)
    assert stub.batches == [[1], [2, 3]]
    metrics = client.get("/metrics").get_data(as_text=True)
    assert "sam2_queue_depth 0.0" in metrics
    assert "sam2_batch_size_count 2.0" in metrics  # two batches ...
    assert "sam2_masks_per_image_count 3.0" in metrics  # ... of three images in all, one mask each


def test_an_upload_arriving_steadily_for_longer_than_the_timeout_is_answered():
    """The connection timeout allows request_bytes / MIN_REQUEST_RATE seconds more: a steady
    upload that takes longer than the timeout (a large image on a slow link) is read and
    answered, not cut off with a 408."""
    app = Flask(__name__)
    app.add_url_rule("/echo", "echo", lambda: str(len(request.get_data())), methods=["POST"])
    server, port = serve_in_process(app, timeout_s=1)
    body = b"x" * 90_000  # 3 s at 30 kB/s: 60 times the slowest rate allowed
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    try:
        sock.sendall(b"POST /echo HTTP/1.1\r\nHost: test\r\nConnection: close\r\n"
                     + f"Content-Length: {len(body)}\r\n\r\n".encode())
        started = time.monotonic()
        try:
            for offset in range(0, len(body), 3000):
                sock.sendall(body[offset:offset + 3000])
                time.sleep(0.1)
        except (BrokenPipeError, ConnectionResetError):  # closed mid-upload: its answer says why
            pass
        sending_s = time.monotonic() - started
        answer = read_until_closed(sock, 10)
        assert answer.startswith(b"HTTP/1.1 200") and answer.endswith(b"\r\n\r\n90000"), answer[:300]
        assert sending_s > 2.5  # past the timeout and at least one check of it
    finally:
        sock.close()
        server.close()

