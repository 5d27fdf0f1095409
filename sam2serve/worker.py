"""One inference worker owns the model; HTTP threads hand it images through a bounded queue.

Why a worker and not a lock: a lock lets every waiting request hold a thread and memory with
no bound and no order, and gives no place to batch. Here a request is a job in a bounded
queue:
- a full queue is refused at once (`Busy`, HTTP 503 with Retry-After: the model's time for the
  work ahead, added up by its kinds, `TimeEstimates`), and so is a request beyond
  `max_queue + batch_size` admitted at once (`admitted()`, which the HTTP layer enters before
  it decodes the image; the HTTP server has received the body by then): each holds an HTTP
  thread, decoding its image, queued, running or between its calls, so that the server's other
  threads stay free for /health;
- a request that waits past its timeout gives up (`TimedOut`, HTTP 504); if it is still
  queued the worker skips it;
- a request whose client has gone (`abandoned()`, asked when its turn comes: the HTTP server
  knows) is skipped too (`Abandoned`): clients that give up (curl --max-time, a proxy's timeout)
  and send again would otherwise have the model run every copy, the ones nobody waits for first;
- segment-everything that is already running stops before its next batch of point prompts once
  every request of its batch has gone (client or timeout): the generator's `should_stop`;
- calls that are not segment-everything (encodings and prompt sets: short, someone clicking
  waits for them) go ahead of the images queued before them, each image letting at most
  `CALLS_AHEAD_OF_AN_IMAGE` pass (`JobQueue`): a click waits for the image being made, not for
  every image queued, and a stream of clicks cannot hold an image back for ever; with
  `decodes_between_batches` (server.py on a CPU, where an image's masks take seconds to minutes),
  prompt sets queued meanwhile are decoded between its batches of point prompts, so a click waits
  for one batch, for as long in all as the image's own work so far (clicks make it twice as slow
  at most);
- the worker takes up to `batch_size` queued jobs at once, only those that are waiting
  (a batch is never padded with duplicated work); it runs the other calls among them first
  (one after another), then the images, with one image-encoder call for those asked for in the
  same form (masks or records) and settings;
- a batch that fails (out of memory, a bad tensor) fails only its own requests: it is retried
  one image at a time so that only the image that fails gets the error, and the worker goes on
  (`generate_each`, which the offline front ends use too);
- `stop()` refuses new requests (`Stopping`, HTTP 503) and lets the worker answer those already
  accepted before it returns: a server told to stop (SIGTERM, Ctrl-C) answers every request it
  accepted, even one that calls the worker twice (`/segment` with an image: encode, then
  decode), since the HTTP layer holds each request's admission (`admitted`) from start to
  answer. (A full queue refuses only a request's first call with `Busy`: its later ones, such as
  the decoding after the encoding, wait for a place, `calls_of_one_request`.)

Which thread: on a CPU, torch runs its parallel operations on an OpenMP thread pool that belongs
to the thread that starts them, and a second thread doing parallel work gets a second pool. With
two pools on a 2-core machine, every parallel operation of the second one paid about 60 us to
wake its pool (3 us on the first), and a request of the micro model took 1.5 s instead of 0.9
(docs/performance.md, "One thread for the model"). So server.py loads the model and then serves
on its main thread (`serve`), the thread that did the model's first parallel work, and the HTTP
threads do none. `start` serves on a thread of its own (tests, embedders): given `load`, it loads
the model on that thread too.

A Ray Serve replica, whose requests Ray queues and batches, runs its model's calls on a
`ModelThread`: the same order (calls ahead of the images queued before them, `JobQueue`) and,
on a CPU, the same prompt sets decoded between batches of point prompts (`BetweenBatches`).
"""

import functools
import logging
import queue
import threading
import time
from collections import Counter
from collections.abc import Iterable
from concurrent.futures import Executor, Future
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch

from .amg import Generator, Interrupted, with_settings
from .cpu import return_freed_memory
from .rle import RLE

log = logging.getLogger(__name__)
STOP_CHECK_S = 0.5  # how often serve() looks whether to stop while the queue is empty
# Idle this long after work, the worker gives the heap's free blocks back to the system where they
# hold more than TRIM_ABOVE_BYTES (cpu.return_freed_memory); less stays for the next request.
TRIM_AFTER_IDLE_S = 5.0
TRIM_ABOVE_BYTES = 2 << 30


def give_back_freed_memory() -> None:
    """What a model's thread calls once idle TRIM_AFTER_IDLE_S after work (server.py's worker, a
    Ray Serve replica's model thread)."""
    if freed := return_freed_memory(TRIM_ABOVE_BYTES):
        log.info("idle: %.1f GiB of freed memory given back to the system", freed / 2**30)
FIRST_GUESS_S = 1.0  # the model's time on a kind of work the worker has not timed yet
CALLS_AHEAD_OF_AN_IMAGE = 16  # calls queued after an image that may run before it (JobQueue)


class NotReady(RuntimeError):
    """The model is still loading or warming up."""


class Busy(RuntimeError):
    """The queue is full, or as many requests as the server admits are in progress;
    `retry_after_s` estimates when there will be room."""

    def __init__(self, message: str, retry_after_s: int) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class TimedOut(RuntimeError):
    """The request waited longer than the worker's timeout."""


class Stopping(RuntimeError):
    """The server is stopping: it answers the requests it has accepted and takes no more."""


class Abandoned(RuntimeError):
    """The request went (its client, or its timeout) before its turn, or while its masks were
    being made: the model did not run it, or stopped. (Its caller, if still there, has had
    TimedOut for a timeout: this answer is only the job's own.)"""


class TimeEstimates:
    """The model's time on each kind of work, a moving average per kind (each new time weighs
    0.2), for Retry-After: the work ahead is added up by its kinds, since one segment-everything
    image can cost the model as much as a hundred prompt decodes, and an average over both would
    say one wrong by as much. A kind not timed yet counts FIRST_GUESS_S."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    def observe(self, kind: str, seconds: float) -> None:
        before = self.seconds.get(kind)
        self.seconds[kind] = seconds if before is None else 0.8 * before + 0.2 * seconds

    def total(self, kinds: Iterable[str]) -> float:
        return sum(self.seconds.get(kind, FIRST_GUESS_S) for kind in kinds)


@dataclass
class Job:
    """An image to segment everything in, or another call on the model (interactive prompts)."""

    kind: str = "image"  # or the call's kind ("encode", "decode"): its time estimate (TimeEstimates)
    image: np.ndarray | None = None
    annotate: bool = False  # the image's mask records (Generator.annotate) instead of its RLE masks
    settings: dict[str, float] = field(default_factory=dict)  # the request's own (amg.with_settings)
    call: Callable[[], Any] | None = None
    abandoned: Callable[[], bool] | None = None  # whether nobody waits for the answer any more
    timed_out: bool = False  # its request gave up waiting
    seconds: float = 0.0  # the model's time on it (its share of its batch's), set before its answer
    future: Future = field(default_factory=Future)
    calls_ahead: int = 0  # an image's: calls queued after it that ran before it (JobQueue)


class JobQueue(queue.Queue):
    """queue.Queue (bounded, FIFO), except that the first call queued (a job that is not an image)
    is taken ahead of the images queued before it, unless the first of those has let
    CALLS_AHEAD_OF_AN_IMAGE calls pass already. (queue.Queue calls _get under its own lock.)"""

    def _get(self) -> Job:
        first_call = next((index for index, job in enumerate(self.queue) if job.kind != "image"), 0)
        if first_call == 0 or self.queue[0].calls_ahead >= CALLS_AHEAD_OF_AN_IMAGE:
            return self.queue.popleft()
        for index in range(first_call):  # images, the first of them the oldest, which has let the most pass
            self.queue[index].calls_ahead += 1
        job = self.queue[first_call]
        del self.queue[first_call]
        return job

    def take_call(self, kind: str) -> Job | None:
        """The first queued call of this kind, or None: taken while an image's masks are made, which
        the images queued could not start before anyway (it counts against none of them)."""
        with self.mutex:
            for index, job in enumerate(self.queue):
                if job.kind == kind:
                    del self.queue[index]
                    self.not_full.notify()  # as get(): a place for a request that waits for one
                    return job
            return None

    def run_waiting(self, kind: str, budget_s: float, run: Callable[[Job], float]) -> float:
        """Runs the calls of this kind queued now (not those queued meanwhile), each by run (which
        gives the seconds it took), until they have taken budget_s; the seconds they took."""
        seconds = 0.0
        for _ in range(self.qsize()):
            job = self.take_call(kind) if seconds < budget_s else None
            if job is None:
                break
            seconds += run(job)
        return seconds


class BetweenBatches:
    """The generator's should_stop while images' masks are made (generate_each's stop): first, where
    given decode_waiting(budget_s) (which runs the prompt sets queued and gives the seconds they
    took), prompt sets are decoded, for no longer in all than the images' own work so far (clicks
    make an image's masks twice as slow at most); then whether nobody waits for the images any
    more. Made where the images start, on the model's thread: `began` is their start."""

    def __init__(self, nobody_waits: Callable[[], bool],
                 decode_waiting: Callable[[float], float] | None = None) -> None:
        self.nobody_waits = nobody_waits
        self.decode_waiting = decode_waiting
        self.began = time.perf_counter()
        self.decoding_s = 0.0  # of the prompt sets decoded between batches (not the images' time)

    def __call__(self) -> bool:
        if self.decode_waiting is not None:
            self.decoding_s += self.decode_waiting(time.perf_counter() - self.began - 2 * self.decoding_s)
        return self.nobody_waits()


class ModelThread(Executor):
    """An executor of one thread for a model's calls, which runs them in JobQueue's order: calls
    that are not segment-everything (encodings, prompt sets) go ahead of the images queued before
    them. A Ray Serve replica's model thread, and a Ray Data bulk worker's (server.py's
    InferenceWorker queues, times and batches jobs of its own). submit_as(kind, ...) queues a call
    of a kind: "image" for segment-everything, "decode" for prompt sets, which run_waiting_decodes
    runs between an image's batches of point prompts (BetweenBatches); submit's calls are of the
    kind "call". Unbounded: its caller bounds the requests it holds."""

    def __init__(self, name: str = "model") -> None:
        self.jobs = JobQueue()
        self._shut_down = False
        self._shutdown_lock = threading.Lock()  # no job queued after the end's mark
        self._thread = threading.Thread(target=self._run_forever, name=name, daemon=True)
        self._thread.start()

    def submit(self, function: Callable, /, *arguments, **keywords) -> Future:
        return self.submit_as("call", function, *arguments, **keywords)

    def submit_as(self, kind: str, function: Callable, /, *arguments, **keywords) -> Future:
        job = Job(kind=kind, call=functools.partial(function, *arguments, **keywords))
        with self._shutdown_lock:
            if self._shut_down:
                raise RuntimeError("cannot queue a call after shutdown")
            self.jobs.put(job)
        return job.future

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Runs what is queued (with cancel_futures, cancels it), then ends the thread (an image
        without a call marks the end: every call queued before it runs first, as every image)."""
        with self._shutdown_lock:
            if not self._shut_down:
                self._shut_down = True
                if cancel_futures:
                    with self.jobs.mutex:
                        for job in self.jobs.queue:
                            job.future.cancel()
                self.jobs.put(Job())
        if wait:
            self._thread.join()

    def run_waiting_decodes(self, budget_s: float) -> float:
        """On the model's thread: the prompt sets queued ("decode"), run until they have taken
        budget_s (JobQueue.run_waiting); the seconds they took."""
        return self.jobs.run_waiting("decode", budget_s, self._run)

    def _run_forever(self) -> None:
        while (job := self.jobs.get()).call is not None:
            self._run(job)

    @staticmethod
    def _run(job: Job) -> float:
        """The job run, unless its future was cancelled while it was queued; the seconds it took."""
        if not job.future.set_running_or_notify_cancel():
            return 0.0
        began = time.perf_counter()
        try:
            answer = job.call()
        except BaseException as error:  # noqa: BLE001 - goes back to its caller, as an executor's
            job.future.set_exception(error)
        else:
            job.future.set_result(answer)
        return time.perf_counter() - began


class InferenceWorker:
    """Runs a generator on one thread, fed by a bounded queue of jobs.

    `observe_batch(batch_size, masks_per_image)` is called after each batch of images run together
    (one per group of the same settings) that gave any image its masks (for metrics).
    `decodes_between_batches`: prompt sets ("decode" calls) queued while images' masks are made
    run between their batches of point prompts (the module's docstring).
    """

    def __init__(self, batch_size: int = 1, max_queue: int = 16, timeout_s: float = 300.0,
                 observe_batch=None, decodes_between_batches: bool = False) -> None:
        if batch_size < 1 or max_queue < 1 or not 0 < timeout_s <= threading.TIMEOUT_MAX:
            raise ValueError("batch_size and max_queue must be >= 1, and timeout_s > 0 and at most threading.TIMEOUT_MAX")
        self.batch_size = batch_size
        self.timeout_s = timeout_s
        self.jobs = JobQueue(max_queue)
        self.observe_batch = observe_batch or (lambda batch_size, masks: None)
        self.decodes_between_batches = decodes_between_batches
        self.generator: Generator | None = None
        self.segmenter = None
        self.max_admitted = max_queue + batch_size  # requests admitted at once (admitted())
        # For Retry-After, the model's time per kind of job (an image, an encoding, a part of
        # prompt sets), and per kind of request (all its jobs: a /segment may make many).
        self.job_seconds = TimeEstimates()
        self.request_seconds = TimeEstimates()
        self._ready = threading.Event()
        self._started = False  # by start (serve holds its caller's thread)
        self._stopping = threading.Event()
        # Held while a request is admitted or joins the queue, and while the worker decides it is
        # done: nothing can join after the worker's last look (it would wait for nobody).
        self._admission = threading.Lock()
        self._admitted = 0  # requests between admitted()'s start and end (the outermost, for one nested)
        self._admitted_kinds: Counter[str] = Counter()  # of those requests
        # .depth: admitted() calls this thread is inside; .model_seconds: its request's jobs' time
        self._this_thread = threading.local()

    @property
    def ready(self) -> bool:
        return self._ready.is_set()

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    @property
    def queue_depth(self) -> int:
        return self.jobs.qsize()

    @property
    def admitted_requests(self) -> int:
        return self._admitted

    def stop(self) -> None:
        """No new requests from now on; the worker answers those accepted (admitted or queued),
        then serve() returns. Safe in a signal handler: it only sets an event."""
        self._stopping.set()

    def start(self, generator: Generator | None = None, segmenter=None, *,
              load: Callable[[], tuple[Generator, Any]] | None = None) -> None:
        """Serves with this generator (and this interactive.PromptSegmenter, if any) from now on,
        on a thread of its own. Or give `load`, a function that loads the model and answers
        (generator, segmenter): it runs on that thread, which then serves with them, and start
        returns once it has loaded (raising its error). On a CPU, a model loaded and warmed up on
        another thread than the one that serves costs a second OpenMP pool (the module's
        docstring, "Which thread"): embedders load through `load` or call `serve`."""
        if load is not None and (generator is not None or segmenter is not None):
            raise ValueError("give start a generator (and segmenter) or load, not both")
        if self._started:  # a second serving thread would take the same jobs, with a model of its own
            raise RuntimeError("the worker is already started")
        self._started = True
        loaded: Future = Future()

        def load_and_serve() -> None:
            try:
                self.generator, self.segmenter = load() if load is not None else (generator, segmenter)
            except BaseException as error:  # noqa: BLE001 - raised by start, on its caller's thread
                loaded.set_exception(error)
                return
            loaded.set_result(None)
            self._serve_forever()

        threading.Thread(target=load_and_serve, name="inference-worker", daemon=True).start()
        try:
            loaded.result()
        except BaseException:
            if loaded.done():  # the loading failed and its thread has ended: a later start may try again
                self._started = False
            raise
        self._ready.set()

    def serve(self, generator: Generator, segmenter=None, until: threading.Event | None = None) -> None:
        """As start, but serves on the calling thread (the one that loaded the model, see the
        module's docstring), until `until` is set."""
        self.generator = generator
        self.segmenter = segmenter
        self._ready.set()
        self._serve_forever(until)

    @contextmanager
    def admitted(self, kind: str = "request"):
        """One request's use of the worker, from its first look to its answer: its calls are run
        even after stop(), and the worker serves until it ends. Raises as require_ready, and
        Busy when max_admitted requests are admitted already. kind: the request's (its
        endpoint), whose model time is estimated for Retry-After."""
        outermost = not getattr(self._this_thread, "depth", 0)  # not the same request again
        with self._admission:
            self.require_ready()
            if outermost and self._admitted >= self.max_admitted:
                raise self.busy(f"{self._admitted} requests in progress",
                                self.request_seconds.total(self._admitted_kinds.elements()))
            self._admitted += outermost
            self._admitted_kinds[kind] += outermost
        if outermost:
            self._this_thread.model_seconds = 0.0
        self._this_thread.depth = getattr(self._this_thread, "depth", 0) + 1
        try:
            yield
        finally:
            self._this_thread.depth -= 1
            with self._admission:
                self._admitted -= outermost
                self._admitted_kinds[kind] -= outermost
                if outermost and self._this_thread.model_seconds > 0:
                    self.request_seconds.observe(kind, self._this_thread.model_seconds)

    def require_ready(self) -> None:
        if self.stopping and not getattr(self._this_thread, "depth", 0):
            raise Stopping("the server is stopping; send the request again to another one, or once it is back")
        if not self.ready:
            raise NotReady("the model is loading; try again when GET /health answers 200")

    def submit(self, image: np.ndarray, annotate: bool = False,
               abandoned: Callable[[], bool] | None = None,
               settings: dict[str, float] | None = None) -> list[RLE] | list[dict]:
        """The image's masks (with annotate, their records: Generator.annotate), once the worker
        has run it, under the request's own settings where given (amg.with_settings). Raises
        NotReady, Stopping, Busy or TimedOut, Abandoned if abandoned() says so when its turn
        comes, or the generator's own error for this image."""
        return self._wait_for(Job(image=image, annotate=annotate, abandoned=abandoned, settings=settings or {}))

    def call(self, function: Callable[[], Any], deadline: float | None = None,
             abandoned: Callable[[], bool] | None = None, continues: bool = False, kind: str = "call") -> Any:
        """function() run on the worker's thread, in its turn (calls on the model that are not
        segment-everything: encoding an image, decoding prompts; among the jobs the worker takes
        at once, such calls run before the images). Raises as submit.
        deadline (time.monotonic()): the request's, for one that calls more than once, so that
        its calls together wait no longer than the timeout. continues: a later part of a request
        the model has begun (its prompt sets after the first part), which waits for room in a
        full queue, until the deadline, instead of Busy: the model time spent on it is not lost.
        kind: the call's ("encode", "decode"), whose time is estimated for Retry-After."""
        return self._wait_for(Job(kind=kind, call=function, abandoned=abandoned), deadline, continues)

    def calls_of_one_request(self, abandoned: Callable[[], bool] | None = None) -> Callable[..., Any]:
        """call, for a request that makes several (a one-shot /segment encodes its image, then
        decodes its prompt sets in parts): its calls share one deadline, the timeout from now,
        and each after the first continues the request, waiting for room in a full queue."""
        deadline = time.monotonic() + self.timeout_s
        calls_made = 0

        def run(function: Callable[[], Any], kind: str = "call") -> Any:
            nonlocal calls_made
            answer = self.call(function, deadline, abandoned, continues=calls_made > 0, kind=kind)
            calls_made += 1
            return answer
        return run

    def _wait_for(self, job: Job, deadline: float | None = None, continues: bool = False) -> Any:
        deadline = time.monotonic() + self.timeout_s if deadline is None else min(
            deadline, time.monotonic() + self.timeout_s)
        if deadline <= time.monotonic():  # spent by the request's earlier calls
            raise self.timed_out()
        with self._admission:
            self.require_ready()
            if not continues:
                try:
                    self.jobs.put_nowait(job)
                except queue.Full:
                    raise self.busy(self.queued_text(), self.job_seconds.total(self.queued_kinds())) from None
        if continues:  # admitted already: a stop waits for it (admitted()), outside the lock
            try:
                self.jobs.put(job, timeout=max(0.0, deadline - time.monotonic()))
            except queue.Full:
                raise self.timed_out() from None
        try:
            return job.future.result(timeout=max(0.0, deadline - time.monotonic()))
        except TimeoutError:
            job.timed_out = True  # already running: stopped at the next batch of point prompts
            job.future.cancel()  # still queued: the worker skips it
            raise self.timed_out() from None
        finally:  # the request's model time (admitted() times its kind of request from it)
            self._this_thread.model_seconds = getattr(self._this_thread, "model_seconds", 0.0) + job.seconds

    def busy(self, why: str, model_seconds_ahead: float) -> Busy:
        """Busy, its Retry-After the time the work ahead takes the model (an image's time is its
        share of its batch's already)."""
        return Busy(f"the server is busy ({why})", max(1, round(model_seconds_ahead)))

    def timed_out(self) -> TimedOut:
        return TimedOut(f"no answer within the request timeout of {self.timeout_s:g} s; {self.queued_text()}")

    def queued_kinds(self) -> list[str]:
        """The kinds of the queued jobs the worker will run: not those whose request timed out."""
        with self.jobs.mutex:  # queue.Queue's own lock, held while it changes its deque
            return [job.kind for job in self.jobs.queue if not job.timed_out]

    def queued_text(self) -> str:
        depth = self.queue_depth
        return f"{depth} {'request' if depth == 1 else 'requests'} queued"

    def _next_batch(self, wait_s: float) -> list[Job]:
        """The next job (waiting for one, at most wait_s), and up to batch_size - 1 more that are
        already queued."""
        try:
            batch = [self.jobs.get(timeout=wait_s)]
        except queue.Empty:
            return []
        while len(batch) < self.batch_size:
            try:
                batch.append(self.jobs.get_nowait())
            except queue.Empty:
                break
        return [job for job in batch if started(job)]

    def _serve_forever(self, until: threading.Event | None = None) -> None:
        last_work = None  # when the last work ended, until its freed memory is looked at
        while (until is None or not until.is_set()) and not self._done():
            batch = self._next_batch(STOP_CHECK_S)
            if batch:
                self._run(batch)
                last_work = time.monotonic()
            elif last_work is not None and time.monotonic() - last_work >= TRIM_AFTER_IDLE_S:
                last_work = None
                give_back_freed_memory()

    def _done(self) -> bool:
        """Stopping, and every accepted request answered."""
        with self._admission:
            return self.stopping and self.jobs.empty() and self._admitted == 0

    def _run(self, jobs: list[Job]) -> None:
        for job in jobs:
            if job.call is not None:
                self._run_call(job)
        # Masks, then mask records, each request's settings apart, run as batches of their own
        # (one image-encoder call each).
        batches: dict[tuple, list[Job]] = {}
        for job in jobs:
            if job.call is None:
                batches.setdefault((job.annotate, tuple(sorted(job.settings.items()))), []).append(job)
        for (annotate, _), batch in sorted(batches.items(), key=lambda kind_and_batch: kind_and_batch[0][0]):
            self._run_images(batch, annotate, batch[0].settings)

    def _run_call(self, job: Job) -> None:
        if job.timed_out or gone(job):  # went while the calls before it ran
            job.future.set_exception(Abandoned("the request went (its client or its timeout) before its turn"))
            return
        began = time.perf_counter()  # (not `started`: the function that marks a job running)
        answer, failure = None, None
        try:
            answer = job.call()
        except Exception as error:  # noqa: BLE001 - goes back to its request
            release_cached_memory(error, self.generator)
            failure = error
        job.seconds = time.perf_counter() - began
        if failure is not None:  # as images: a failure's time says nothing of the next call's
            job.future.set_exception(failure)
        else:
            self.job_seconds.observe(job.kind, job.seconds)
            job.future.set_result(answer)

    def _decode_waiting(self, budget_s: float) -> float:
        """Runs the prompt sets queued now (not those queued meanwhile), until they have taken
        budget_s; the seconds they took."""
        return self.jobs.run_waiting("decode", budget_s, self._run_started_call)

    def _run_started_call(self, job: Job) -> float:
        """A call taken out of the queue run, unless its request has gone; the seconds it took."""
        if not started(job):
            return 0.0
        self._run_call(job)
        return job.seconds

    def _run_images(self, batch: list[Job], annotate: bool, settings: dict[str, float]) -> None:
        between_batches = BetweenBatches(lambda: all(job.timed_out or gone(job) for job in batch),
                                         self._decode_waiting if self.decodes_between_batches else None)
        answers = generate_each(self.generator, [job.image for job in batch], annotate, stop=between_batches,
                                settings=settings)
        if any(isinstance(answer, Interrupted) for answer in answers):
            log.info("stopped segment-everything of %d image(s): their requests have gone", len(batch))
            answers = [Abandoned("the request went (its client or its timeout) while its masks were being made")
                       for _ in batch]
        masks = [len(answer) for answer in answers if not isinstance(answer, Exception)]
        # the prompt sets' time is theirs
        share = (time.perf_counter() - between_batches.began - between_batches.decoding_s) / len(batch)
        for job in batch:
            job.seconds = share
        if masks:
            self.job_seconds.observe("image", share)
            self.observe_batch(len(batch), masks)
        for job, answer in zip(batch, answers):
            if isinstance(answer, Exception):
                job.future.set_exception(answer)
            else:
                job.future.set_result(answer)


def started(job: Job) -> bool:
    """Marks a job taken from the queue running; False for one whose request gave up (its timeout:
    dropped) or whose client has gone (answered Abandoned)."""
    if not job.future.set_running_or_notify_cancel():
        return False
    if gone(job):
        job.future.set_exception(Abandoned("the client closed its connection before the request's turn"))
        return False
    return True


def gone(job: Job) -> bool:
    """Whether the job's client has gone; a check that fails counts as not gone (the job runs,
    and the worker goes on) and is not asked again (it is asked before each batch of points)."""
    try:
        return job.abandoned is not None and bool(job.abandoned())
    except Exception:  # noqa: BLE001 - the HTTP server's check, not the model's
        log.exception("could not tell whether a client has gone; running its request")
        job.abandoned = None
        return False


def generate_each(generator: Generator, images: list[np.ndarray], annotate: bool = False,
                  stop: Callable[[], bool] | None = None,
                  settings: dict[str, float] | None = None) -> list[list[RLE] | list[dict] | Exception]:
    """Each image's masks (with annotate, their records), or the error of that image alone: the
    images run as one batch, and if the batch fails (out of memory, a bad tensor), one by one.
    stop, where given, is the generator's should_stop meanwhile: once it says so, before a batch
    of point prompts, the images not done answer Interrupted (nobody waits for them any more; run
    one by one after a failed batch, those done before keep their masks).
    settings: the requests' own (amg.with_settings), the same for every image."""
    try:
        generator = with_settings(generator, settings or {})
    except Exception as error:  # noqa: BLE001 - every image's answer, the worker goes on
        return [error for _ in images]
    if stop is not None:
        generator.should_stop = stop
    try:
        return generator.annotate_batch(images) if annotate else generator.generate_batch(images)
    except Interrupted as error:  # not tried again
        return [error for _ in images]
    except Exception as error:  # noqa: BLE001 - returned, to become that image's answer
        release_cached_memory(error, generator)
        if len(images) == 1:
            log.error("inference failed", exc_info=error)
            return [error]
        log.warning("a batch of %d failed (%s); running its images one by one", len(images), error)
        return [generate_each(generator, [image], annotate, stop)[0] for image in images]
    finally:
        if stop is not None:
            generator.should_stop = None


def out_of_memory(error: BaseException) -> bool:
    """Whether an error is memory run out: a GPU's (torch.OutOfMemoryError), or a CPU's (torch's
    allocator raises a RuntimeError, Python's a MemoryError)."""
    return isinstance(error, (torch.OutOfMemoryError, MemoryError)) or (
        isinstance(error, RuntimeError) and "DefaultCPUAllocator: can't allocate memory" in str(error))


def release_cached_memory(error: Exception, generator: Generator | None) -> None:
    """After running out of memory, drops what is kept only in case it is wanted (the generator's
    on_out_of_memory) and returns torch's cached GPU blocks, so that the next batch can fit."""
    if not out_of_memory(error):
        return
    if getattr(generator, "on_out_of_memory", None) is not None:
        log.warning("out of memory: freed %.1f MiB kept in case it was wanted", generator.on_out_of_memory() / 2**20)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
