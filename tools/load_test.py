"""Load test of a running server on this machine: C concurrent clients, M requests each.

    python server.py --batch-size 4 &
    python -m tools.load_test http://127.0.0.1:5000 examples/*.jpg --clients 8 --per-client 4
    python -m tools.load_test http://127.0.0.1:5000 examples/*.jpg --interactive   # /embed, /segment too

The requests: each image to /upload_rle, and with --interactive also to /embed, and its prompts
(a point at the centre; a box around the middle) to /segment. First GET /health must answer
"ok", then every request is sent once, alone: that answer, checked to be of this service's form
(masks as COCO RLE of the image's size, an image id and size, results with masks), is the reference. Then C clients
send M requests each at the same time (the clients take turns through the list, each in an order
of its own), and every answer must equal the reference for its request, byte for byte: nothing
lost, duplicated or swapped between clients. A 503 (queue full) is retried after its Retry-After
(at least 1 s); any other failure counts, and so does a timeout or a dropped connection. Prints
throughput and latency percentiles (from a request's first sending to its answer: the waits after
a 503 and the images embedded again are in it); exits 1 if any of the C x M answers was wrong or
missing. Ctrl-C stops it with the report so far (status 130), and so does SIGTERM, as `timeout`
sends it (status 143); a second stop does not wait for the requests in flight.
On a terminal, a progress bar per phase (the single requests, then the clients' answers and how
many were wrong).

Loopback only (it is a stress tool, not a benchmark of someone else's server; proxies from
http_proxy are not used), a bounded number of requests (C x M), and a time limit.
"""

import http.client
import ipaddress
import json
import math
import socket
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field, replace
from pathlib import Path
from urllib.parse import urlparse

if not __package__:  # run by its path (python tools/load_test.py): this checkout's packages, as -m has them
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sam2serve.stops import end_as_stopped, stop_in_one_line_while_importing, stopped_by, take_over_stops

if __name__ == "__main__":  # before the seconds of importing torch: a stop then ends the script in one line
    stop_in_one_line_while_importing()

import numpy as np
from tqdm import tqdm

from sam2serve.cli import ScriptParser, error_text, positive_int, seconds
from sam2serve.compare import check_rle, segmentation_of
from sam2serve.preprocess import FILE_MAX_PIXELS, ImageTooLarge, InvalidImage, decode_image

MAX_REQUESTS = 10_000
MAX_EMBEDS_AGAIN = 5  # per request: an id evicted again and again (a cache of room for one image, many clients)


@dataclass
class Report:
    planned: int = 0  # clients x per_client
    requests: int = 0  # sent and answered (or failed)
    in_flight: int = 0  # sent, not yet answered
    correct: int = 0
    wrong: list[str] = field(default_factory=list)  # what went wrong, one line per request
    retries_busy: int = 0
    embedded_again: int = 0  # /segment by an id the cache had evicted (404): the image sent to /embed again
    latencies_s: list[float] = field(default_factory=list)
    seconds: float = 0.0
    stopped: str = ""  # by what: "Ctrl-C" or "SIGTERM"

    @property
    def never_sent(self) -> int:
        """The time limit passed first, or the test was stopped: neither sent nor in flight."""
        return self.planned - self.requests - self.in_flight

    @property
    def ok(self) -> bool:
        return not self.wrong and self.correct == self.requests == self.planned

    def table(self) -> str:
        latencies = np.array(self.latencies_s or [float("nan")]) * 1000
        lines = [
            f"requests        {self.requests} of {self.planned} done ({self.correct} correct, {len(self.wrong)} "
            f"wrong or failed{f', {self.never_sent} never sent' if self.never_sent else ''}"
            f"{f', {self.in_flight} in flight when stopped by {self.stopped}' if self.stopped else ''})",
            f"busy retries    {self.retries_busy}",
            f"embedded again  {self.embedded_again} (ids the cache had evicted)",
            f"throughput      {self.correct / max(self.seconds, 1e-9):.2f} answers/s over {self.seconds:.1f} s",
            f"latency p50     {np.percentile(latencies, 50):.0f} ms (to a correct answer, waits after a 503 included)",
            f"latency p99     {np.percentile(latencies, 99):.0f} ms",
        ]
        more = [f"  and {len(self.wrong) - 20} more"] if len(self.wrong) > 20 else []
        return "\n".join(lines + [f"  {line}" for line in self.wrong[:20]] + more)


def require_loopback(url: str) -> None:
    parsed = urlparse(url)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise ValueError(f"{url!r} is not a URL: give the server as http://HOST:PORT, e.g. http://127.0.0.1:5000")
    if parsed.path not in ("", "/") or parsed.query or parsed.fragment:
        raise ValueError(f"{url!r}: give the server's root, http://HOST:PORT, without a path (the test adds "
                         "/upload_rle, /embed and /segment)")
    host = parsed.hostname
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(host, None)}
    except socket.gaierror as error:
        raise ValueError(f"cannot resolve {host!r}: {error}") from None
    if not all(ipaddress.ip_address(address.split("%")[0]).is_loopback for address in addresses):
        raise ValueError(f"{url} is not on this machine: the load test only targets loopback addresses")


def post_image(url: str, data: bytes, filename: str, timeout_s: float) -> tuple[int, dict, bytes]:
    """POSTs one image as the multipart field 'image' (as curl -F image=@file); never raises
    for an HTTP status."""
    return post(url, *image_form(data, filename), timeout_s)


def image_form(data: bytes, filename: str) -> tuple[bytes, str]:
    """(body, content type) of a multipart form with the image in the field 'image'."""
    boundary = uuid.uuid4().hex
    body = b"".join([
        f"--{boundary}\r\n".encode(),
        f'Content-Disposition: form-data; name="image"; filename="{filename}"\r\n'.encode(),
        b"Content-Type: application/octet-stream\r\n\r\n",
        data,
        f"\r\n--{boundary}--\r\n".encode(),
    ])
    return body, f"multipart/form-data; boundary={boundary}"


# Straight to the server: a proxy from http_proxy would take the requests off this machine.
DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def post(url: str, body: bytes, content_type: str, timeout_s: float) -> tuple[int, dict, bytes]:
    """POSTs a body; never raises for an HTTP status."""
    request = urllib.request.Request(url, data=body, method="POST", headers={"Content-Type": content_type})
    try:
        with DIRECT.open(request, timeout=timeout_s) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read()


@dataclass(frozen=True)
class Request:
    name: str  # what the report calls it
    path: str
    body: bytes
    content_type: str
    embed: "Request | None" = None  # a /segment by id: its image's /embed, sent again if the id was evicted
    size: tuple[int, int] | None = None  # its image's (h, w): /upload_rle's decoded here, /segment's as /embed answered


def upright_size(data: bytes) -> tuple[int, int] | None:
    """An image's (h, w) as the server decodes it (its orientation applied), which its masks must
    have; None for a file it cannot decode (the server's answer says why)."""
    try:
        return decode_image(data, FILE_MAX_PIXELS).shape[:2]
    except (InvalidImage, ImageTooLarge):
        return None


def requests_for(url: str, images: dict[str, bytes], interactive: bool, timeout_s: float) -> list[Request]:
    """The test's requests; with `interactive`, each image is embedded here once for its id."""
    requests = []
    for name in sorted(images):
        requests.append(Request(name, "/upload_rle", *image_form(images[name], name), size=upright_size(images[name])))
        if not interactive:
            continue
        embed = Request(f"{name} /embed", "/embed", *image_form(images[name], name))
        requests.append(embed)
        status, _, body = post(url + embed.path, embed.body, embed.content_type, timeout_s)
        problem = answer_problem(embed, body) if status == 200 else None
        if status != 200 or problem:
            raise RuntimeError(f"{name}: /embed answered {status}: {problem or body[:200]!r}")
        embedded = json.loads(body)
        height, width = embedded["size"]
        prompts = [{"points": [[width / 2, height / 2]]},
                   {"box": [width / 4, height / 4, 3 * width / 4, 3 * height / 4]}]
        payload = json.dumps({"image_id": embedded["image_id"], "prompts": prompts}).encode()
        requests.append(Request(f"{name} /segment", "/segment", payload, "application/json", embed, (height, width)))
    return requests


def answer_problem(request: Request, body: bytes) -> str | None:
    """What makes a 200 answer not of this service's form, or None: the references are checked,
    so that a server answering the same wrong thing every time (another service on the port, an
    error page sent with 200) does not pass the test."""

    def masks_problem(masks: list) -> str | None:
        """Each mask COCO RLE (uncompressed, or compressed), all of one size: the image's, where known."""
        sizes = set()
        for index, mask in enumerate(masks):
            if not isinstance(mask, dict):
                return f"mask {index}: not COCO RLE: {str(mask)[:100]}"
            try:
                rle = segmentation_of({"segmentation": mask}, f"mask {index}")
                check_rle(rle, f"mask {index}")
            except ValueError as error:
                return str(error)
            sizes.add(tuple(rle["size"]))
        image = request.size or (min(sizes) if sizes else None)  # (a file the test could not decode: one size)
        if sizes - {image}:
            return f"masks of sizes {sorted(sizes)}, not all the image's {list(image)}"
        return None

    try:
        answer = json.loads(body)
    except ValueError:
        return f"not JSON: {body[:100]!r}"
    if not isinstance(answer, dict):
        return f"not a JSON object: {body[:100]!r}"
    if request.path == "/upload_rle":
        if list(answer) != [f"mask_{index}" for index in range(len(answer))]:
            return f"not masks mask_0, mask_1, ...: {body[:100]!r}"
        return masks_problem(list(answer.values()))
    if request.path == "/embed":
        if not isinstance(answer.get("image_id"), str) or not is_size(answer.get("size")):
            return f"not an image id and size: {body[:100]!r}"
        return None
    results, prompt_sets = answer.get("results"), len(json.loads(request.body)["prompts"])
    if not isinstance(results, list) or len(results) != prompt_sets:
        return f"not {prompt_sets} results, one per prompt set: {body[:100]!r}"
    for result in results:
        masks = result.get("masks") if isinstance(result, dict) else None
        scores = result.get("iou_predictions") if isinstance(result, dict) else None
        if not (isinstance(masks, list) and masks and isinstance(scores, list) and len(scores) == len(masks)
                and all(type(score) in (int, float) for score in scores)):
            return f"a result is not masks with their predicted IoU: {str(result)[:100]}"
        if problem := masks_problem(masks):
            return problem
    return None


def is_size(value: object) -> bool:
    """Whether a value is an image's [height, width]."""
    return isinstance(value, list) and len(value) == 2 and all(isinstance(side, int) and side > 0 for side in value)


def require_health_ok(url: str, timeout_s: float) -> None:
    """GET /health answers {"status": "ok", ...}: the server is this service, and ready."""
    try:
        with DIRECT.open(url + "/health", timeout=timeout_s) as response:
            status, body = response.status, response.read()
    except urllib.error.HTTPError as error:
        status, body = error.code, error.read()
    try:
        healthy = status == 200 and json.loads(body).get("status") == "ok"
    except (ValueError, AttributeError):
        healthy = False
    if not healthy:
        raise RuntimeError(f"GET /health answered {status}, not {{\"status\": \"ok\"}}: {body[:200]!r}")


def run_load_test(
    url: str, images: dict[str, bytes], clients: int, per_client: int, time_limit_s: float = 600.0,
    interactive: bool = False,
) -> Report:
    """Sends each request alone, then clients x per_client requests at once; checks every answer."""
    require_loopback(url)
    if clients * per_client > MAX_REQUESTS:
        raise ValueError(f"at most {MAX_REQUESTS} requests, asked for {clients * per_client}")
    url = url.rstrip("/")
    deadline = time.monotonic() + time_limit_s

    def remaining_s() -> float:
        left = deadline - time.monotonic()
        if left <= 0:
            raise RuntimeError(f"the time limit ({time_limit_s:g} s) passed before the single requests were answered")
        return left

    try:
        require_health_ok(url, remaining_s())
        requests = requests_for(url, images, interactive, remaining_s())
    except (OSError, http.client.HTTPException) as error:
        raise RuntimeError(f"the server did not answer: {error}") from None
    reference = {}
    for request in tqdm(requests, desc="single requests (the references)", unit="request", file=sys.stderr,
                        disable=None, leave=False):
        try:
            status, _, body = post(url + request.path, request.body, request.content_type, remaining_s())
        except (OSError, http.client.HTTPException) as error:
            raise RuntimeError(f"{request.name}: the single request failed: {error}") from None
        problem = answer_problem(request, body) if status == 200 else None
        if status != 200 or problem:
            raise RuntimeError(f"{request.name}: the single request answered {status}: {problem or body[:200]!r}")
        reference[request.name] = body

    report, lock, stop = Report(planned=clients * per_client), threading.Lock(), threading.Event()
    progress = tqdm(total=report.planned, desc=f"{clients} clients", unit="answer", file=sys.stderr, disable=None)

    def embed_again(embed: Request) -> None:
        """The image sent to /embed again, until it is taken (a 503: after its Retry-After) or
        the time is up; the /segment sent after it says what went wrong, if anything did."""
        while (remaining := deadline - time.monotonic()) > 0 and not stop.is_set():
            try:
                status, headers, _ = post(url + embed.path, embed.body, embed.content_type, remaining)
            except (OSError, http.client.HTTPException):
                return
            if status != 503:
                return
            with lock:
                report.retries_busy += 1
            time.sleep(min(retry_after_s(headers), max(deadline - time.monotonic(), 0)))

    def client(index: int) -> None:
        for position in client_order(index, len(requests), per_client):
            request = requests[position]
            name = request.name
            started = time.monotonic()
            sent = False
            embeds_left = MAX_EMBEDS_AGAIN
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or stop.is_set():
                    ended = "stop" if stop.is_set() else "time limit"
                    outcome = f"{name}: not answered before the {ended} (the server was busy)"
                    break
                if not sent:
                    sent = True
                    with lock:
                        report.in_flight += 1
                try:
                    status, headers, body = post(url + request.path, request.body, request.content_type, remaining)
                except (OSError, http.client.HTTPException) as error:  # timeout, connection refused or dropped
                    outcome = f"{name}: no answer: {error or type(error).__name__}"
                    break
                if status == 503:
                    with lock:
                        report.retries_busy += 1
                    time.sleep(min(retry_after_s(headers), max(remaining, 0)))
                    continue
                if status == 404 and request.embed is not None and embeds_left:  # evicted: as the README says
                    embeds_left -= 1
                    with lock:
                        report.embedded_again += 1
                    embed_again(request.embed)
                    continue
                outcome = None if status == 200 and body == reference[name] else (
                    f"{name}: status {status}, " + ("answer differs from the single request's" if status == 200
                                                    else body[:200].decode(errors="replace"))
                )
                break
            if not sent:
                continue
            with lock:
                report.in_flight -= 1
                report.requests += 1
                if outcome is None:
                    report.correct += 1
                    report.latencies_s.append(time.monotonic() - started)
                else:
                    report.wrong.append(outcome)
                progress.set_postfix(wrong=len(report.wrong), busy_retries=report.retries_busy, refresh=False)
                progress.update()

    started = time.monotonic()
    # Daemon threads: a request in flight when the test is stopped does not hold the process.
    threads = [threading.Thread(target=client, args=(index,), daemon=True) for index in range(clients)]
    for thread in threads:
        thread.start()
    try:
        for thread in threads:
            thread.join()
    except KeyboardInterrupt as interrupt:  # Ctrl-C, or SIGTERM (main's Terminated)
        stop.set()  # the clients send nothing more; a request in flight may take its time limit
        grace = time.monotonic() + 2
        try:
            for thread in threads:
                thread.join(timeout=max(0.0, grace - time.monotonic()))
        except KeyboardInterrupt:  # a second stop: the report without waiting more
            pass
        report.stopped = stopped_by(interrupt)
    progress.close()
    with lock:  # a copy: clients still waiting on an answer must not change what is printed
        return replace(report, seconds=time.monotonic() - started, wrong=list(report.wrong),
                       latencies_s=list(report.latencies_s))


def client_order(index: int, count: int, per_client: int) -> np.ndarray:
    """Client index's per_client requests (of count), in an order of its own: the clients take
    turns through the list, so that every request is sent at the same time as others even when
    each client sends fewer than count."""
    positions = (index * per_client + np.arange(per_client)) % count
    return np.random.default_rng(index).permutation(positions)


def retry_after_s(headers: dict) -> float:
    """A 503's Retry-After in seconds, at least 1 (a 0 would send the request again at once, over
    and over); 1 where it is absent, an HTTP date or not a finite number."""
    try:
        wait_s = float(headers.get("Retry-After", 1))
    except ValueError:
        return 1.0
    return max(wait_s, 1.0) if math.isfinite(wait_s) else 1.0


def main() -> None:
    parser = ScriptParser(description=__doc__)
    parser.add_argument("url", help="the server, e.g. http://127.0.0.1:5000 (loopback only)")
    parser.add_argument("images", nargs="+", help="image files to send")  # as given: Path("") is "."
    parser.add_argument("--clients", type=positive_int, default=4, help="concurrent clients")
    parser.add_argument("--per-client", type=positive_int, default=4, help="requests each client sends")
    parser.add_argument("--time-limit", type=seconds, default=600.0, help="seconds for the whole test")
    parser.add_argument("--interactive", action="store_true", help="mix in /embed and /segment requests")
    args = parser.parse_args()
    take_over_stops()  # SIGTERM as Ctrl-C (`timeout` sends it): the report so far
    try:
        require_loopback(args.url)  # first: the arguments swapped read the URL as an image file
        if "" in (name.strip() for name in args.images):  # an unset variable
            raise ValueError("an image file's name is empty")
        images = {name: Path(name).read_bytes() for name in args.images}
        report = run_load_test(args.url, images, args.clients, args.per_client, args.time_limit, args.interactive)
    except (OSError, ValueError, RuntimeError) as error:
        sys.exit(f"error: {error_text(error)}")
    except KeyboardInterrupt as interrupt:  # while the single requests were sent: nothing to report yet
        print(f"stopped ({stopped_by(interrupt)})", file=sys.stderr)
        end_as_stopped(stopped_by(interrupt))
    print(report.table())
    if report.stopped:
        end_as_stopped(report.stopped)
    sys.exit(0 if report.ok else 1)


if __name__ == "__main__":
    main()
