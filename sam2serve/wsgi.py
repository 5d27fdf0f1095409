"""The HTTP server in front of the Flask app: waitress, started by server.py itself.

Why waitress: it reads every request whole (headers, then the body into memory or a temporary
file) on its event loop before a thread runs the app, so a slow or stalled client costs a
descriptor and a buffer, never a thread; it bounds the open connections (`connection_limit`)
and closes connections that stay idle (`channel_timeout`); it runs in this process, beside the
one inference worker that owns the model. (gunicorn would hand the app the socket while the
body is still arriving: a stalled upload holds a thread.)

Two stalls waitress's idle timer misses are closed here (`close_stalled`), each after the
connection timeout: a client that does not read its answer (waitress keeps the connection and
its buffered answer, and a thread writing a pipelined request's answer waits for the client),
and a client that trickles its request, a byte now and then (each byte resets the idle timer):
a request must arrive at MIN_REQUEST_RATE on average after its first `timeout_s` seconds. A
request that stops part-way is closed here too, before waitress's timer would close it without
a word: it and a trickling one are answered 408 before their connection closes.

A client that closes its connection while its request waits for the model is seen when the
request's turn comes (`JSONErrorChannel.check_client_disconnected`), and the request is not run;
while its masks are being made, before each batch of point prompts, and they stop.

Open files: each connection may take 3 descriptors (`create_http_server` accepts fewer
connections at once where the hard limit is lower), and should the process still run out,
accepting pauses (`accept_unless_out_of_descriptors`): waitress would try the connection
waiting in the backlog again at once, and again, at full CPU and a log line each time.

What waitress refuses itself, before the app sees the request (a body over the upload limit,
announced by Content-Length or sent chunked; headers too large; a malformed request), is
answered as JSON like every other error, and the connection is closed; `on_refusal` counts and
logs it.

Stopping: `finish_answers` stops accepting and waits until no connection has a request being
read, run or sent, so that closing the server cuts no answer off.
"""

import errno
import functools
import logging
import resource
import select
import socket
import time
from dataclasses import dataclass
from typing import Callable

import waitress
from waitress.channel import HTTPChannel
from waitress.parser import HTTPRequestParser, ParsingError
from waitress.server import BaseWSGIServer
from waitress.task import ErrorTask
from waitress.utilities import BadRequest, RequestEntityTooLarge, RequestHeaderFieldsTooLarge, ServerNotImplemented

from .protocol import ANSWER_HEADERS, HeadersTooLarge, RequestStalled, cross_origin_headers, json_text

log = logging.getLogger(__name__)
MAX_CHUNK_LINE = 4096  # a chunk's size line, with its extensions
MIN_REQUEST_RATE = 500  # bytes per second, on average, after the connection timeout (as Apache's mod_reqtimeout)
MIN_CONNECTIONS = 8  # a limit on open files that leaves fewer is refused at start
PEER_CLOSED = getattr(select, "POLLRDHUP", 0)  # Linux's poll flag for a peer that closed (its sending side)
ACCEPT_PAUSE_S = 0.5  # no descriptor left to accept a connection: accepting pauses this long (and up to
# waitress's loop timeout, 1 s, more)


def too_slow_after(started: float, timeout_s: float, received: int) -> float:
    """When a request still arriving, started at `started` with `received` bytes so far, is too
    slow: below MIN_REQUEST_RATE on average after its first timeout_s (the Ray Serve app's rule too)."""
    return started + timeout_s + received / MIN_REQUEST_RATE


def arriving_too_slowly(received: int) -> str:
    return f"its request arriving slower than {MIN_REQUEST_RATE} bytes/s ({received} bytes)"


def nothing_received(timeout_s: float) -> str:
    return f"nothing received for {timeout_s:g} s"


@dataclass(frozen=True)
class ConnectionLimits:
    max_connections: int = 1000  # more wait in the listen backlog until one closes
    timeout_s: int = 60  # a connection idle or stalled this long is closed (waitress counts whole seconds)
    max_header_bytes: int = 64 * 1024  # request line and headers; more gets 431


class OncePer(logging.Filter):
    """Lets one record through per `seconds`, saying how many it held back since the last (the
    last burst's count is said with the next warning, if one comes)."""

    def __init__(self, seconds: float) -> None:
        super().__init__()
        self.seconds, self.next_s, self.held_back = seconds, 0.0, 0

    def filter(self, record: logging.LogRecord) -> bool:
        now = time.monotonic()
        if now < self.next_s:
            self.held_back += 1
            return False
        if self.held_back:
            record.msg = f"{record.msg} ({self.held_back} such warnings held back since the last one)"
        self.next_s, self.held_back = now + self.seconds, 0
        return True


# waitress warns once per request while more requests wait for a thread than it has threads
# (an overload, which /metrics counts as 503s): one line per 10 s says it as well as thousands.
QUEUE_WARNINGS = OncePer(10.0)
DESCRIPTOR_LOG = logging.getLogger(__name__ + ".descriptors")  # at most a line per 10 s, as waitress's queue
DESCRIPTOR_LOG.addFilter(OncePer(10.0))


def refusal_message(error: BadRequest, max_body_bytes: int, max_header_bytes: int) -> str:
    """The JSON error message for what the HTTP server refused before the app saw it."""
    if isinstance(error, RequestEntityTooLarge):
        return f"upload larger than the limit of {max_body_bytes} bytes"
    if isinstance(error, RequestHeaderFieldsTooLarge):
        return str(HeadersTooLarge(max_header_bytes))
    if isinstance(error, (NotHTTP, ServerNotImplemented)):  # not malformed: what it asks is not served
        return error.body
    return f"malformed HTTP request: {error.body}"


class NotHTTP(BadRequest):
    """Bytes that no HTTP/1.1 request starts with, or lines that end as none does: answered at
    once (waitress waited for a CRLF CRLF that never came, then said "nothing received")."""


class RequestParser(HTTPRequestParser):
    """waitress's parser, stricter where waitress 3.0.2 is lenient (RFC 9112):
    - a request with both Transfer-Encoding and Content-Length is refused (400, the connection
      closed): waitress read its body as chunked and went on reading the connection, so behind
      a proxy that frames by the length, the rest of the body was a request of the client's
      choosing; so is a request of another version than 1.1 with Transfer-Encoding (waitress
      reads it for 1.1 alone, and framed the body by its length);
    - a TLS handshake (an https:// URL to this plain HTTP port) or headers whose lines end in LF
      alone (netcat's) are told so at once, not after the connection timeout;
    - a chunked body is held to the upload limit by its own bytes: waitress counted the chunks'
      size lines too, and refused bodies a few kB under the limit that the same body with a
      Content-Length was allowed. The framing is held apart: a size line, a trailer, or framing
      out of proportion to the body (waitress kept each growing, and searched it again at each
      read) is refused as malformed."""

    framing_bytes = 0  # a chunked body's bytes as sent, less the body's own

    def received(self, data: bytes) -> int:
        if self.body_rcv is None and not self.header_plus and data[:1] == b"\x16":  # TLS's handshake record
            return self.refuse(NotHTTP("this server speaks plain HTTP: use http://, not https://"), len(data))
        if self.chunked and self.body_rcv is not None and not self.completed:
            self.body_bytes_received = 0  # waitress's count, of the bytes as sent; the body's own is below
            receiver, before = self.body_rcv, len(self.body_rcv)
            consumed = super().received(data)
            self.framing_bytes += consumed - (len(receiver) - before)
            max_body = self.adj.max_request_body_size
            if self.error is None and len(receiver) >= max_body:
                self.error, self.completed = RequestEntityTooLarge(f"exceeds max_body of {max_body}"), True
            elif self.error is None and not self.completed and (
                    len(receiver.control_line) > MAX_CHUNK_LINE
                    or len(receiver.trailer) > self.adj.max_request_header_size
                    or self.framing_bytes > 5 * max_body + 2**16):  # 1-byte chunks: 5 bytes of framing each
                self.error = BadRequest(f"the chunked body's framing is too long: a chunk's size line over "
                                        f"{MAX_CHUNK_LINE} bytes, a trailer over the header limit, or more "
                                        "framing than chunks of one byte have")
                self.completed = True
            return consumed
        consumed = super().received(data)
        if not self.headers_finished and not self.completed and b"\n\n" in self.header_plus:
            return self.refuse(NotHTTP("the request's lines end in LF alone: HTTP's end in CRLF (\\r\\n)"), consumed)
        return consumed

    def refuse(self, error: NotHTTP, consumed: int) -> int:
        self.parse_header(b"GET / HTTP/1.0\r\n")  # the fields an answer needs, as waitress does for a 431
        self.error, self.completed = error, True
        return consumed

    def parse_header(self, header_plus: bytes) -> None:
        super().parse_header(header_plus)
        if self.chunked and "CONTENT_LENGTH" in self.headers:
            raise ParsingError("Transfer-Encoding and Content-Length both given; send one")
        if self.version != "1.1" and "TRANSFER_ENCODING" in self.headers:  # waitress framed it by Content-Length
            raise ParsingError(f"Transfer-Encoding on an HTTP/{self.version or '0.9'} request, which has none; "
                               "send HTTP/1.1")


class JSONErrorTask(ErrorTask):
    """waitress's error answer (status kept, connection closed) with a JSON body."""

    def execute(self) -> None:
        error = self.request.error
        adj = self.channel.server.adj
        # waitress refuses a body of max_request_body_size bytes or more: the limit is one less.
        message = refusal_message(error, adj.max_request_body_size - 1, adj.max_request_header_size)
        body = json_text({"error": message}).encode()
        self.status = f"{error.code} {error.reason}"
        self.response_headers += [("Content-Type", "application/json"), *ANSWER_HEADERS.items(),
                                  *cross_origin_headers_of(self.request, self.channel.server).items()]
        self.set_close_on_finish()
        # An HTTP/1.0 keep-alive request's refusal said "Connection: Keep-Alive" beside "close".
        self.request.headers.pop("CONNECTION", None)
        self.content_length = len(body)
        self.write(body)
        on_refusal = getattr(self.channel.server, "on_refusal", None)
        if on_refusal is not None:
            # The path and method where the request line was read (for headers too large,
            # waitress puts "GET /" in its place).
            path, method = ((None, None) if isinstance(error, (RequestHeaderFieldsTooLarge, NotHTTP))
                            else (getattr(self.request, "path", None), getattr(self.request, "command", None)))
            on_refusal(client_address(self.channel.addr), method, path, error.code, len(body))


def cross_origin_headers_of(request, server) -> dict[str, str]:
    """The CORS headers of an answer the HTTP server gives itself, as the app's (--cors-origin: the
    server's cors_origins): a labelling tool's page reads a 413 or a 408, not a failed fetch."""
    return cross_origin_headers(request.headers.get("ORIGIN"), getattr(server, "cors_origins", ()), preflight=False)


class JSONErrorChannel(HTTPChannel):
    error_task_class = JSONErrorTask
    parser_class = RequestParser
    request_started = 0.0  # when the request being received began
    request_bytes = 0  # bytes received since then
    output_progress = 0.0  # when an answer was last written to the buffer or sent from it
    read_paused = False  # waitress stopped reading to answer, at the last check

    def received(self, data: bytes) -> bool:
        if self.request is None:  # a request's first bytes
            self.request_started, self.request_bytes = time.time(), 0
        self.request_bytes += len(data)
        return super().received(data)

    def write_soon(self, data) -> int:
        self.output_progress = time.time()  # before waitress may wait here for the client to read
        return super().write_soon(data)

    def _flush_some(self, *args, **kwargs) -> bool:  # waitress's own, where it sends from the buffer
        sent = super()._flush_some(*args, **kwargs)
        if sent:
            self.output_progress = time.time()
        return sent

    @property
    def reading(self) -> bool:
        """Whether waitress reads this connection: not while it answers one of its requests."""
        return not (self.requests or self.total_outbufs_len)

    def readable(self) -> bool:
        # Closed by close_stalled during the event loop's pass: never polled again (its file
        # descriptor may be a new connection's by then).
        return self.socket is not None and super().readable()

    def writable(self) -> bool:
        return self.socket is not None and super().writable()

    def check_client_disconnected(self) -> bool:
        """Whether the client has closed its connection (the app's
        environ["waitress.client_disconnected"]; the worker skips such a request when its turn
        comes). waitress's own only knows once it reads the connection again, which it does not
        while it answers (unless it reads pipelined requests ahead): here the socket is peeked,
        without reading. A client that closed only its sending side counts as gone, as nginx
        counts it (such a client, netcat's, is answered 499); HTTP clients (curl, browsers,
        Python's) do not do that while they wait for an answer. On Linux the socket is polled for
        the peer's close (POLLRDHUP), which a peek misses where a request pipelined behind this
        one lies unread before it."""
        sock = self.socket
        if not self.connected or sock is None:
            return True
        if PEER_CLOSED:
            try:  # (a socket closed meanwhile by waitress's thread: fileno() -1, a ValueError)
                poller = select.poll()
                poller.register(sock.fileno(), PEER_CLOSED)
                return bool(poller.poll(0))  # POLLRDHUP, or POLLHUP/POLLERR (always reported): gone
            except (OSError, ValueError):
                return True
        try:
            return sock.recv(1, socket.MSG_PEEK) == b""  # waitress's sockets do not block
        except (BlockingIOError, InterruptedError):  # nothing to read: still there
            return False
        except OSError:  # reset, or closed meanwhile
            return True

    def stall(self, now: float, timeout_s: float) -> str | None:
        """Why this connection is to be closed now, if it is: its answer unread, or its request
        stopped part-way (waitress's idle timer would close it without a word), or trickling in."""
        if self.total_outbufs_len and self.output_progress < now - timeout_s:
            return f"its answer unread for {timeout_s} s"
        if self.reading and self.request is not None and self.last_activity < now - timeout_s:
            return nothing_received(timeout_s)
        if self.reading and self.request is not None and now > too_slow_after(self.request_started, timeout_s,
                                                                              self.request_bytes):
            return arriving_too_slowly(self.request_bytes)
        return None

    def tell_timed_out(self, why: str) -> None:
        """A request cut off part-way (stalled, or trickling in) gets a 408 saying why before its
        connection is closed, where it had only seen the connection close. Best effort: the
        answer is small and sent at once, without waiting for the client to read it."""
        request = self.request
        if self.socket is None or request is None or not self.reading or self.will_close:
            return
        body = json_text({"error": str(RequestStalled(why))}).encode()
        head = "".join(f"{name}: {value}\r\n" for name, value in [
            ("Content-Type", "application/json"), ("Content-Length", len(body)), *ANSWER_HEADERS.items(),
            *cross_origin_headers_of(request, self.server).items(), ("Connection", "close")])
        try:
            self.socket.send(f"HTTP/1.1 408 Request Timeout\r\n{head}\r\n".encode() + body)
        except OSError:  # gone, or its buffer full: closed all the same
            pass
        on_refusal = getattr(self.server, "on_refusal", None)
        if on_refusal is not None:
            method, path = getattr(request, "command", None), getattr(request, "path", None)
            on_refusal(client_address(self.addr), method, path, 408, len(body))

    def send_continue(self) -> None:
        """No "100 Continue" for a request already refused (a declared body over the limit):
        waitress would send one and read the body up to the limit before its 413; curl sends
        `Expect: 100-continue` with every upload over 1 MB. Nor for one already whole (no body):
        waitress would mark it incomplete again, and it waited for a body until its 408."""
        if self.request.error is not None or self.request.completed:
            self.request.expect_continue = False
            return
        super().send_continue()


def close_stalled(listener: BaseWSGIServer, now: float) -> None:
    """Closes the listener's connections that stall (JSONErrorChannel.stall): on the event loop,
    as waitress's own maintenance; a thread waiting to write to one is released."""
    for channel in list(listener.active_channels.values()):
        if not isinstance(channel, JSONErrorChannel):
            continue
        if not channel.reading:
            # A request pipelined behind the one being answered, partly read, waits through no
            # fault of its client: its clock restarts at the first check after reading resumes.
            channel.read_paused = True
        elif channel.read_paused:
            channel.read_paused = False
            channel.request_started, channel.request_bytes = now, 0
        why = channel.stall(now, listener.adj.channel_timeout)
        if why is not None:
            log.info("closed a connection from %s: %s", channel.addr[0] if channel.addr else "?", why)
            channel.tell_timed_out(why)
            channel.handle_close()


def allow_descriptors(needed: int) -> int:
    """Raises this process's soft limit on open files towards `needed` (the hard limit caps it):
    the default soft limit, often 1024, would stop accepting before max_connections. Returns the
    descriptors now allowed (at most `needed`)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        soft = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    return needed if soft == resource.RLIM_INFINITY else min(soft, needed)


def client_address(addr) -> str | None:
    """A connection's client, as Flask's request.remote_addr gives it (None on a Unix socket)."""
    return addr[0] if isinstance(addr, tuple) and addr else None


def create_http_server(app, host: str, port: int, max_upload_bytes: int, threads: int,
                       limits: ConnectionLimits = ConnectionLimits(),
                       on_refusal: Callable[[str | None, str | None, str | None, int, int], None] | None = None,
                       cors_origins: tuple[str, ...] = ()):
    """A waitress server bound to host:port (OSError if it cannot listen); `.run()` serves,
    `.close()` stops. `threads` run the app: enough for every request the inference worker
    may hold (its queue and batch) plus a few for /health and /metrics. `on_refusal(client,
    method, path, status, bytes answered)` is called for each request the server answers itself
    (method and path are None where the request line could not be read); those answers carry the
    CORS headers of `cors_origins`, as the app's (protocol.cross_origin_headers)."""
    # Per connection: its socket, and temporary files for a large request body and a large answer;
    # beside them, the process's own. Where the hard limit on open files is lower, fewer.
    others = threads + 64
    allowed = allow_descriptors(3 * limits.max_connections + others)
    room = (allowed - others) // 3
    if room < min(MIN_CONNECTIONS, limits.max_connections):  # allowed is then the hard limit
        raise OSError(f"the limit on open files ({allowed}: ulimit -Hn) leaves room for {max(0, room)} "
                      f"connections beside the server's own descriptors; raise it, or lower --max-queue")
    max_connections = min(limits.max_connections, room)
    if max_connections < limits.max_connections:
        log.warning("the limit on open files (ulimit -Hn) allows %d connections at once, not %d; the others wait "
                    "to be accepted", max_connections, limits.max_connections)
    logging.getLogger("waitress.queue").addFilter(QUEUE_WARNINGS)  # once: the same filter is not added twice
    servers: dict = {}
    server = waitress.create_server(
        app,
        map=servers,
        host=host,
        port=port,
        threads=threads,
        connection_limit=max_connections,
        channel_timeout=limits.timeout_s,
        cleanup_interval=max(1, limits.timeout_s // 4),  # how often stalled connections are looked for
        max_request_body_size=max_upload_bytes + 1,
        max_request_header_size=limits.max_header_bytes,
        ident="",  # no Server header
        asyncore_use_poll=True,  # select() stops at 1024 descriptors
    )
    for listener in servers.values():
        if isinstance(listener, BaseWSGIServer):
            listener.channel_class = JSONErrorChannel
            listener.on_refusal = on_refusal
            listener.cors_origins = cors_origins
            listener.maintenance = functools.partial(maintenance, listener, listener.maintenance)
            listener.accept = functools.partial(accept_unless_out_of_descriptors, listener, listener.accept)
            listener.readable = functools.partial(readable_unless_paused, listener, listener.readable)
    # waitress's limit counts everything in its map: the listeners and its trigger too.
    server.adj.connection_limit = max_connections + len(servers)
    return server


def accept_unless_out_of_descriptors(listener: BaseWSGIServer, waitress_accept: Callable):
    """waitress's accept(), which, when the process has no descriptor left, pauses accepting
    for ACCEPT_PAUSE_S instead of failing: waitress would log the error and, the connection
    still waiting in the backlog, try again at once, and again."""
    try:
        return waitress_accept()
    except OSError as error:
        if error.errno not in (errno.EMFILE, errno.ENFILE):
            raise
        listener.accept_paused_until = time.monotonic() + ACCEPT_PAUSE_S
        DESCRIPTOR_LOG.warning("no file descriptor left to accept a connection (%d open); accepting pauses for "
                               "about a second at a time", len(listener.active_channels))
        return None  # as waitress takes an accept() that found nothing


def readable_unless_paused(listener: BaseWSGIServer, waitress_readable: Callable[[], bool]) -> bool:
    """waitress's readable() (which also runs its maintenance), and not while accepting pauses."""
    return waitress_readable() and time.monotonic() >= getattr(listener, "accept_paused_until", 0.0)


def maintenance(listener: BaseWSGIServer, waitress_maintenance: Callable[[float], None], now: float) -> None:
    """close_stalled (whose 408 goes first), then waitress's: idle connections marked to close.
    It runs in waitress's loop, outside any handler there: an error of close_stalled is logged, not
    let end the HTTP server."""
    try:
        close_stalled(listener, now)
    except Exception:  # noqa: BLE001 - logged with its traceback; the server goes on listening
        log.exception("closing stalled connections failed")
    waitress_maintenance(now)


def listening_urls(server) -> list[str]:
    """http://HOST:PORT of each address the server listens on: the port it got when given 0, and
    an IPv6 address in brackets."""
    addresses = getattr(server, "effective_listen", None) or [(server.effective_host, server.effective_port)]
    return [f"http://[{host}]:{port}" if ":" in str(host) else f"http://{host}:{port}" for host, port, *_ in addresses]


RECEIVING_PAUSE_S = 1.0  # a request part-way in, nothing more of it for this long: not waited for at a stop


def finish_answers(server, timeout_s: float) -> int:
    """Stops accepting connections, then waits, at most timeout_s, until no connection of the
    server (create_http_server's) has a request being received, run by the app or sent back;
    returns how many still had one. Idle keep-alive connections do not count, nor a request
    part-way in whose client has sent nothing for RECEIVING_PAUSE_S (a stalled client held every
    stop for the whole timeout: longer than `docker stop` waits before it kills)."""
    connections = server.map if hasattr(server, "map") else server._map  # several addresses, or one
    for listener in list(connections.values()):
        if isinstance(listener, BaseWSGIServer):
            listener.accepting = False  # its readable() turns False: the event loop accepts no more
    deadline = time.monotonic() + timeout_s
    while True:
        arriving = time.time() - RECEIVING_PAUSE_S  # waitress's clock for last_activity
        channels = [channel for channel in list(connections.values()) if isinstance(channel, HTTPChannel)]
        busy = [channel for channel in channels if channel.requests or channel.total_outbufs_len
                or (channel.request is not None and channel.last_activity > arriving)]
        if not busy or time.monotonic() >= deadline:
            if stalled := sum(channel.request is not None and channel not in busy for channel in channels):
                log.info("stopping: %d connection(s) whose request stalled part-way are closed", stalled)
            return len(busy)
        time.sleep(0.05)
