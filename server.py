"""SAM2 "segment everything" server.

    python server.py                                   # the project's trained micro model, ao mode
    python server.py ~/checkpoints/sam2 large          # official checkpoint, downloaded if missing
    python server.py ~/checkpoints/sam2 large --baseline --port 5000
    python server.py ~/checkpoints/sam2 large --fast --furious --save-fast exported/large_furious
    python server.py ~/checkpoints/sam2 large --fast --furious --load-fast exported/large_furious
    python server.py ~/checkpoints/sam2 large --batch-size 4 --max-queue 64

Flags -> one config -> HTTP server listening (waitress, sam2serve/wsgi.py; GET /health answers
503) -> model and generator for the mode (compiled kernels warmed up) -> the main thread serves the model
(/health answers 200), the thread that loaded it. The HTTP server ending by itself (an error)
ends the process with status 1, a model still loading at once (by a stop signal; where each was
ignored from the start, once it has loaded).

Stopping (SIGTERM, Ctrl-C, SIGHUP): new requests get 503 and /health says "stopping"; those
accepted are answered and sent, then the process exits 0 and frees what it holds (exported
kernels unpack into a temporary folder that only a clean exit removes). A second signal, a
second or more after the first, stops at once.
"""

import argparse
import logging
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def handle_stop_signals(handler) -> None:
    """Sets handler for the stop signals, but for those the server was started with ignored
    (`nohup` ignores SIGHUP, a shell's background job SIGINT): they stay ignored."""
    for signum in STOP_SIGNALS:
        if signal.getsignal(signum) is not signal.SIG_IGN:
            signal.signal(signum, handler)


def exit_while_starting(signum: int, _frame) -> None:
    # Nothing to clean up yet; os._exit, since an exception could land in a finaliser and be lost.
    print(f"stopped by {signal.Signals(signum).name} while starting", file=sys.stderr, flush=True)
    os._exit(1)


if __name__ == "__main__":
    # Before the seconds of importing torch (hence the imports below come after code): as PID 1
    # in a container, a signal with no handler is ignored, and `docker stop` would wait out its
    # timeout and kill. stop_on_signals takes over once the server listens.
    handle_stop_signals(exit_while_starting)

from sam2serve.cpu import on_cpu, set_up_cpu_process
from sam2serve.checkpoints import DOWNLOAD_BASE_URL, CheckpointError
from sam2serve.cli import (
    ScriptParser, add_amg_options, add_checkpoint_arguments, add_cpu_target_option, add_device_option, add_option,
    add_threads_option, amg_config, check_checkpoint_arguments, check_threads, compile_modes, non_negative_float,
    number_type, positive_int, seconds, require_cpu_target, require_one_fast_folder, require_output_folder,
    set_up_logging,
)
from sam2serve.fast import PackageMismatch
from sam2serve.modes import DEFAULT_MODE, MODES, get_mode, load_pipeline, prompt_segmenter
from sam2serve.interactive import EmbeddingCache
from sam2serve.preprocess import PILLOW_MAX_PIXELS
from sam2serve.protocol import EMBEDDING_CACHE_BYTES, Limits, share_encodings, web_origin
from sam2serve.serving import create_app
from sam2serve.worker import InferenceWorker
from sam2serve.wsgi import ConnectionLimits, create_http_server, finish_answers, listening_urls

log = logging.getLogger("server")
ANSWERS_SENT_WITHIN_S = 10.0  # after the last queued request ran, how long its answer may take to send
SAME_STOP_WITHIN_S = 1.0  # a second signal this soon after the first is the same stop, not "at once"


# Under 10 KiB few photographs fit, and a limit of 1e-9 (a typo) refused every upload: the
# smallest limit taken.
upload_megabytes = number_type(float, "a number of MiB", lambda value: 0.01 <= value < math.inf,
                               "a finite number, at least 0.01 (10 KiB)")


def cors_origin(text: str) -> str:
    try:
        return web_origin(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = ScriptParser(description="Serve SAM2 automatic mask generation over HTTP: /upload, /upload_rle, "
                                      "/embed and /segment, and a web page at /.")
    add_checkpoint_arguments(parser)
    modes = parser.add_mutually_exclusive_group()  # one way to name the mode: the last would win unseen
    # No default here: argparse would not count `--mode ao` (the default's own value) as given.
    modes.add_argument("--mode", choices=sorted(MODES), help=f"(default: {DEFAULT_MODE}) " + "; ".join(
        f"{m.name}: {m.description}" for m in MODES.values()))
    modes.add_argument("--baseline", dest="mode", action="store_const", const="baseline",
                       help="same as --mode baseline")
    modes.add_argument("--fast", dest="mode", action="store_const", const="fast", help="same as --mode fast")
    parser.add_argument("--furious", action="store_true", help="with --fast: half precision (fast_furious)")
    add_option(parser, "save_fast", metavar="DIR",
               help="fast modes: export the compiled kernels to DIR (torch.export + AOTInductor)")
    add_cpu_target_option(parser, "with --save-fast: the CPU the kernels' C++ is compiled for: this one (native), or "
                          "an x86-64 level, for kernels copied to other machines (x86-64-v3: any CPU with AVX2 and its "
                          "companions, Intel's since Haswell, AMD's since Zen)")
    add_option(parser, "load_fast", metavar="DIR",
               help="fast modes: load kernels exported with --save-fast instead of compiling")
    add_option(parser, "compile_mode", choices=compile_modes(), help="fast modes: torch.compile's mode (default: max-autotune on CUDA, "
               "whose search takes many minutes on large; reduce-overhead keeps CUDA graphs without it). On a "
               "CPU the fast modes run ao's eager kernels in their precision unless this is given")
    add_amg_options(parser)
    add_option(parser, "checkpoint_url", default=DOWNLOAD_BASE_URL,
               help="where missing checkpoints are downloaded from")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    parser.add_argument("--port", type=int, default=5000, help="port to listen on (0: any free one, logged)")
    add_device_option(parser)
    add_threads_option(parser)
    add_option(parser, "max_upload_mb", type=upload_megabytes, default=Limits.max_upload_bytes / 2**20,
               help="larger uploads get 413")
    add_option(parser, "max_pixels", type=int, default=Limits.max_pixels,
               help="images with more pixels get 413")
    add_option(parser, "batch_size", type=positive_int, default=1,
               help="images the worker takes from the queue at once (one image-encoder call)")
    add_option(parser, "max_queue", type=positive_int, default=16,
               help="requests waiting for the worker (images, encodings, prompt sets); more get 503 with Retry-After, "
                    "as do requests beyond --max-queue + --batch-size in progress at once")
    add_option(parser, "request_timeout", type=seconds, default=600.0,
               help="seconds a request may wait for its answer before 504")
    add_option(parser, "embedding_cache_mb", type=non_negative_float, default=EMBEDDING_CACHE_BYTES / 2**20,
               help="memory on the model's device for encoded images (/embed, /segment) and kept mask logits; "
                    "0 keeps none (/embed answers 507)")
    add_option(parser, "max_connections", type=positive_int, default=ConnectionLimits.max_connections,
               help="open connections at most; more wait to be accepted")
    add_option(parser, "connection_timeout", type=positive_int, default=ConnectionLimits.timeout_s,
               help="seconds after which an idle or stalled connection is closed")
    add_option(parser, "access_log", action="store_true",
               help="log one line per request: client, method, path, status, milliseconds, bytes answered")
    add_option(parser, "cors_origin", type=cors_origin, action="append", metavar="ORIGIN",
               help="let web pages of this origin (scheme://host[:port], or * for any) read the answers, for a "
                    "labelling tool served elsewhere (CORS); repeat it for several")
    args = parser.parse_args(argv)

    check_checkpoint_arguments(parser, args)
    args.cors_origin = args.cors_origin or []  # (a default of [] would be shown by --help)
    args.mode = args.mode or DEFAULT_MODE
    if args.furious:
        if args.mode not in ("fast", "fast_furious"):
            parser.error("--furious goes with --fast")
        args.mode = "fast_furious"
    mode = get_mode(args.mode)
    if (args.save_fast is not None or args.load_fast is not None or args.compile_mode) and not mode.compiled:
        parser.error("--save-fast, --load-fast and --compile-mode go with --fast")
    if not 0 <= args.port <= 65535:
        parser.error("--port must be between 0 (any free port) and 65535")
    require_one_fast_folder(parser, args.save_fast, args.load_fast, args.compile_mode)
    if args.save_fast:
        require_output_folder(parser, args.save_fast, "--save-fast")
    require_cpu_target(parser, args.cpu_target, args.save_fast)
    if args.batch_size > args.max_queue + 1:
        parser.error(f"--batch-size {args.batch_size} is never reached with --max-queue {args.max_queue}: a batch is "
                     f"the request the worker waits for and those queued behind it; raise --max-queue to "
                     f"{args.batch_size - 1} or more")
    check_threads(parser, args.threads)
    if not 1 <= args.max_pixels <= PILLOW_MAX_PIXELS:
        parser.error(f"--max-pixels must be between 1 and {PILLOW_MAX_PIXELS} (the most Pillow opens)")
    args.amg = amg_config(parser, args, mode)
    return args


def main(argv: list[str] | None = None) -> None:
    set_up_logging()
    args = parse_args(argv)
    # Before any thread starts: they share the main heap, flush denormals, and use these threads.
    set_up_cpu_process(args.device, args.threads)
    mode = get_mode(args.mode)
    # On a CPU an image's masks take seconds to minutes: clicks are decoded between their batches.
    worker = InferenceWorker(args.batch_size, args.max_queue, args.request_timeout,
                             decodes_between_batches=on_cpu(args.device))
    info = {"mode": mode.name, "device": args.device, "batch_size": args.batch_size, "amg": asdict(args.amg)}
    limits = Limits(int(args.max_upload_mb * 2**20), args.max_pixels)
    cache = EmbeddingCache(int(args.embedding_cache_mb * 2**20))
    app = create_app(worker, limits, info, cache, args.access_log, tuple(args.cors_origin))

    # Listen first, so that /health tells load balancers and scripts the model is loading.
    # Threads for the app: every request the worker admits (max_queue + batch_size in progress,
    # InferenceWorker.admitted), and a few for /health and /metrics.
    threads = args.max_queue + args.batch_size + 4
    try:
        http = create_http_server(app, args.host, args.port, limits.max_upload_bytes, threads=threads,
                                  limits=ConnectionLimits(args.max_connections, args.connection_timeout),
                                  on_refusal=app.extensions["sam2serve.refused"], cors_origins=tuple(args.cors_origin))
    except (OSError, ValueError) as error:  # ValueError: a host name that does not resolve
        sys.exit(f"error: cannot listen on {args.host}:{args.port}: {error}")
    except RuntimeError as error:  # the system's limit on threads (or on memory for their stacks)
        sys.exit(f"error: cannot start {threads} threads for the requests admitted at once (--max-queue "
                 f"{args.max_queue} + --batch-size {args.batch_size} + 4): {error}; lower --max-queue")
    url = " and ".join(listening_urls(http))
    http_failed = threading.Event()  # the HTTP server ended by itself: so does the process
    closing = threading.Event()  # this thread closes the HTTP server: its end is no failure
    # Before the HTTP server runs, so that its end stops a model still loading (minutes, where a
    # fast mode compiles) at once, not when the loading is over.
    stop_loading = stop_on_signals(worker, http_failed)

    def listen() -> None:
        try:
            http.run()
        except BaseException:  # noqa: BLE001 - logged once; the main thread exits with an error
            log.exception("the HTTP server failed")
        finally:
            if not closing.is_set():
                http_failed.set()
                if not worker.ready:
                    stop_loading()

    log.info("listening on %s; /health answers 503 until the model is ready", url)
    try:  # from the HTTP server's start, whose end may stop this thread (stop_loading)
        threading.Thread(target=listen, name="http", daemon=True).start()
        try:
            pipeline = load_pipeline(args.checkpoint_dir, args.model_type, mode.name, args.device, config=args.amg,
                                     save_fast=args.save_fast, load_fast=args.load_fast,
                                     checkpoint_url=args.checkpoint_url, batch_size=args.batch_size,
                                     compile_mode=args.compile_mode, cpu_target=args.cpu_target)
        except (CheckpointError, PackageMismatch) as error:
            sys.exit(f"error: {error}")
        if http_failed.is_set():  # where stop_loading could not stop the loading (stop signals ignored)
            sys.exit(http_stopped(while_loading=True))
        info.update(pipeline.info)  # the model, its weights, whether it runs prompts
        log.info("ready: serving %s in mode %s on %s at %s", pipeline.loaded.description, mode.name, args.device, url)
        # The model runs on this thread, which loaded it (sam2serve/worker.py says why), until
        # the HTTP server ends or a signal stops the worker and the accepted requests are answered.
        segmenter = prompt_segmenter(pipeline)
        share_encodings(pipeline.generator, segmenter, cache)  # the page's clicks after its masks encode nothing
        worker.serve(pipeline.generator, segmenter, until=http_failed)
        if not worker.stopping:  # the HTTP server ended by itself
            sys.exit(http_stopped(while_loading=False))
        if unsent := finish_answers(http, ANSWERS_SENT_WITHIN_S):
            log.warning("stopped: every accepted request answered; %d connections still busy after %g s are "
                        "closed", unsent, ANSWERS_SENT_WITHIN_S)
        else:
            log.info("stopped: every accepted request answered")
    finally:
        closing.set()
        http.close()


def http_stopped(while_loading: bool) -> str:
    """Why the server exits when its HTTP server ended by itself (an error, for a supervisor to restart it)."""
    if while_loading:
        return "error: the HTTP server stopped while the model was loading (the log says why)"
    return "error: the HTTP server stopped (the log says why); the requests it accepted are not answered"


def stop_on_signals(worker: InferenceWorker, http_failed: threading.Event) -> Callable[[], None]:
    """SIGTERM, SIGINT (Ctrl-C) and SIGHUP (the terminal closed) stop the worker (see the
    module's docstring); a second one, or one while the model loads, raises SystemExit at once.
    The handler runs on the main thread between the model's operations, and can run again inside
    itself when signals come together: it decides on its own list (no lock) before it stops the
    worker (an event) and logs.

    Returns stop_loading(), for another thread: a stop signal sent to the main thread, which
    ends a model's loading with an error once http_failed is set (nothing where every stop
    signal is ignored, or off the main thread: the loading ends, then the server exits)."""
    stopping_since: list[float] = []

    def on_signal(signum: int, _frame) -> None:
        name = signal.Signals(signum).name
        if http_failed.is_set() and not worker.stopping:  # stop_loading's signal, or one that came soon after
            raise SystemExit(http_stopped(while_loading=not worker.ready))
        if not worker.ready:
            raise SystemExit(f"stopped by {name} while the model was loading")
        if stopping_since:
            if time.monotonic() - stopping_since[0] < SAME_STOP_WITHIN_S:
                return  # the same stop, sent twice (say, by `timeout` and to the process group)
            raise SystemExit(f"stopped at once by a second {name}: accepted requests were not all answered")
        stopping_since.append(time.monotonic())
        worker.stop()
        log.info("%s: stopping; accepted requests are answered first (send it again to stop at once)", name)

    def stop_loading() -> None:
        # A signal to the main thread itself: it ends a wait there (a compile waits on its workers).
        for signum in STOP_SIGNALS:
            if signal.getsignal(signum) is on_signal:
                signal.pthread_kill(threading.main_thread().ident, signum)
                return

    if threading.current_thread() is threading.main_thread():  # the only thread that may set handlers
        handle_stop_signals(on_signal)
    return stop_loading


if __name__ == "__main__":
    main()
