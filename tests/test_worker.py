"""Serving under load, with stub generators whose timing the tests control: batching, the
bounded queue, timeouts, failure isolation, /health and /metrics.

The stubs answer one "mask" whose counts encode the image's first pixel, so every answer
says which image it was computed from (a swapped answer would show).
"""

import contextlib
import copy
import io
import json
import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sam2serve.amg import AMGConfig, Interrupted, stop_if_asked
from sam2serve.preprocess import InvalidImage
from sam2serve.protocol import Limits, file_as_upload, rle_lines
from sam2serve.serving import create_app
from sam2serve.worker import Abandoned, Busy, InferenceWorker, Job, ModelThread, NotReady, Stopping, TimedOut, gone

from .conftest import counts_native_threads, native_threads_added

REPO = Path(__file__).resolve().parents[1]
POISON = 13  # a stub fails on images whose first pixel is this value


def image_of(value: int, size: tuple[int, int] = (8, 6)) -> np.ndarray:
    return np.full((*size, 3), value, dtype=np.uint8)


def png_of(value: int, size: tuple[int, int] = (8, 6)) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image_of(value, size)).save(buffer, format="PNG")
    return buffer.getvalue()


class StubGenerator:
    """Records its batches; blocks while `gate` is closed; fails on POISON images."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []
        self.gate = threading.Event()
        self.gate.set()
        self.oom_once = False
        self.running = threading.Event()  # set once a batch has started

    def generate_batch(self, images):
        self.running.set()
        self.gate.wait(timeout=30)
        values = [int(image[0, 0, 0]) for image in images]
        self.batches.append(values)
        if self.oom_once:
            self.oom_once = False
            raise torch.OutOfMemoryError("stub: out of memory")
        if POISON in values:
            raise RuntimeError("stub: a bad tensor")
        return [[{"size": list(image.shape[:2]), "counts": [value, 1]}] for image, value in zip(images, values)]

    def generate(self, image):
        return self.generate_batch([image])[0]

    def annotate_batch(self, images):
        """Records as Generator.annotate; the batch is recorded with its values negated."""
        masks = self.generate_batch(images)
        self.batches[-1] = [-value for value in self.batches[-1]]
        return [[{"segmentation": rle, "area": 1} for rle in image_masks] for image_masks in masks]


class StoppableStub(StubGenerator):
    """Holds while its gate is closed, asking should_stop() meanwhile, as a generator asks it
    between batches of point prompts; records the batches it stopped."""

    def __init__(self) -> None:
        super().__init__()
        self.should_stop = None
        self.stopped: list[list[int]] = []

    def generate_batch(self, images):
        self.running.set()
        while not self.gate.wait(timeout=0.01):
            if self.should_stop is not None and self.should_stop():
                self.stopped.append([int(image[0, 0, 0]) for image in images])
                raise Interrupted("stub: stopped")
        return super().generate_batch(images)


def submit_in_threads(worker, values, gone: dict | None = None, answers: dict | None = None):
    """Submits each value's image from its own thread; returns ({value: answer or exception},
    threads), answers added to the given dict, if any. gone[value], where given, says whether the
    value's client has gone."""
    answers, threads = {} if answers is None else answers, []

    def request(value):
        try:
            answers[value] = worker.submit(image_of(value), abandoned=None if gone is None else lambda: gone[value])
        except Exception as error:  # noqa: BLE001 - the test inspects it
            answers[value] = error

    for value in values:
        threads.append(threading.Thread(target=request, args=(value,), daemon=True))
        threads[-1].start()
    return answers, threads


def hold_worker(worker, stub):
    """Starts the worker on the stub and sends image 1, which runs and holds the model (the gate
    closed) while the test queues more: ({1: answer or error}, [its thread])."""
    worker.start(stub)
    stub.gate.clear()
    answers, threads = submit_in_threads(worker, [1])
    wait_for(stub.running.is_set)
    return answers, threads


def wait_for(condition, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


def test_worker_batches_queued_images_and_answers_each_its_own():
    stub = StubGenerator()
    worker = InferenceWorker(batch_size=3, max_queue=10)
    answers, threads = hold_worker(worker, stub)  # while the others queue up
    more, more_threads = submit_in_threads(worker, [2, 3, 4, 5])
    wait_for(lambda: worker.queue_depth == 4)
    stub.gate.set()
    for thread in threads + more_threads:
        thread.join(timeout=30)
    answers.update(more)
    # Batches of up to 3 from what was queued, never padded: [1], then 3 + 1 of the other four.
    assert stub.batches[0] == [1]
    assert sorted(len(batch) for batch in stub.batches[1:]) == [1, 3]
    assert sorted(sum(stub.batches, [])) == [1, 2, 3, 4, 5]
    for value, answer in answers.items():
        assert answer == [{"size": [8, 6], "counts": [value, 1]}]


def test_mask_records_are_batched_apart_from_masks_and_counted():
    stub = StubGenerator()
    observed = []
    worker = InferenceWorker(batch_size=4, max_queue=10,
                             observe_batch=lambda size, masks: observed.append((size, masks)))
    first, first_threads = hold_worker(worker, stub)
    records = {}

    def annotate(value):
        records[value] = worker.submit(image_of(value), annotate=True)

    threads = [threading.Thread(target=annotate, args=(value,), daemon=True) for value in (2, 3)]
    for thread in threads:
        thread.start()
    wait_for(lambda: worker.queue_depth == 2)
    plain, plain_threads = submit_in_threads(worker, [4])
    wait_for(lambda: worker.queue_depth == 3)
    stub.gate.set()
    for thread in first_threads + threads + plain_threads:
        thread.join(timeout=30)
    # The three queued jobs in one take: the plain image, then the two annotated ones together.
    assert stub.batches == [[1], [4], [-2, -3]]
    assert records == {value: [{"segmentation": {"size": [8, 6], "counts": [value, 1]}, "area": 1}]
                       for value in (2, 3)}
    assert plain[4] == [{"size": [8, 6], "counts": [4, 1]}]
    assert observed == [(1, [1]), (1, [1]), (2, [1, 1])]


class SettingsStub(StubGenerator):
    """A StubGenerator under settings (Generator.with_config): the pred_iou_thresh each batch ran
    under is recorded too."""

    config = AMGConfig()

    def __init__(self) -> None:
        super().__init__()
        self.thresholds: list[float] = []  # each batch's

    def with_config(self, config):
        variant = copy.copy(self)  # the same batches, gate and events
        variant.config = config
        return variant

    def generate_batch(self, images):
        self.thresholds.append(self.config.pred_iou_thresh)
        return super().generate_batch(images)


def test_requests_with_settings_of_their_own_run_in_batches_apart():
    stub = SettingsStub()
    worker = InferenceWorker(batch_size=4, max_queue=10)
    first, threads = hold_worker(worker, stub)
    answers = {}

    def request(value, settings, annotate=False):
        answers[value] = worker.submit(image_of(value), annotate=annotate, settings=settings)

    for value, settings, annotate in ((2, {}, False), (3, {"pred_iou_thresh": 0.5}, False), (4, {}, False),
                                      (5, {"pred_iou_thresh": 0.5}, False), (6, {"pred_iou_thresh": 0.5}, True)):
        threads.append(threading.Thread(target=request, args=(value, settings, annotate), daemon=True))
        threads[-1].start()
        wait_for(lambda: worker.queue_depth == value - 1)
    stub.gate.set()
    for thread in threads:
        thread.join(timeout=30)
    # Masks first, each settings' apart; then the records (?format=coco), the same way.
    assert list(zip(stub.thresholds, stub.batches)) == [(0.8, [1]), (0.8, [2, 4]), (0.5, [3, 5]), (0.5, [-6])]
    assert answers == {**{value: [{"size": [8, 6], "counts": [value, 1]}] for value in (2, 3, 4, 5)},
                       6: [{"segmentation": {"size": [8, 6], "counts": [6, 1]}, "area": 1}]}
    assert stub.config.pred_iou_thresh == 0.8  # the server's own, untouched


def test_failure_in_a_batch_fails_only_the_bad_image_and_the_worker_goes_on():
    stub = StubGenerator()
    released = []  # out of memory: what is kept in case it is wanted is let go (the cache's spares)
    stub.on_out_of_memory = lambda: released.append(1) or 0
    worker = InferenceWorker(batch_size=4, max_queue=10)
    first, first_threads = hold_worker(worker, stub)
    answers, threads = submit_in_threads(worker, [2, POISON, 4])
    wait_for(lambda: worker.queue_depth == 3)
    stub.gate.set()
    for thread in first_threads + threads:
        thread.join(timeout=30)
    assert isinstance(answers[POISON], RuntimeError)
    assert answers[2] == [{"size": [8, 6], "counts": [2, 1]}]
    assert answers[4] == [{"size": [8, 6], "counts": [4, 1]}]
    # The failed batch of three was retried image by image.
    assert [2, POISON, 4] in stub.batches and [POISON] in stub.batches
    # Out of memory once: that request fails, the next one is served.
    assert released == []  # not for other errors
    stub.oom_once = True
    with pytest.raises(torch.OutOfMemoryError):
        worker.submit(image_of(7))
    assert worker.submit(image_of(8)) == [{"size": [8, 6], "counts": [8, 1]}]

    def out_of_memory():
        raise torch.OutOfMemoryError("CUDA out of memory")

    with pytest.raises(torch.OutOfMemoryError):  # in a call on the model (/embed, /segment)
        worker.call(out_of_memory)
    assert released == [1, 1]
    # A CPU's: torch's allocator raises a RuntimeError, Python's a MemoryError (an "internal error" before).
    from sam2serve.protocol import error_answer

    for error in (RuntimeError("[enforce fail at alloc_cpu.cpp:127] data. DefaultCPUAllocator: can't allocate "
                               "memory: you tried to allocate 30695040000 bytes."), MemoryError()):
        def cpu_out_of_memory(error=error):
            raise error

        with pytest.raises(type(error)):
            worker.call(cpu_out_of_memory)
        status, body, _ = error_answer(error)
        assert status == 500 and "inference ran out of memory for this image" in body
    assert released == [1, 1, 1, 1]
    assert error_answer(RuntimeError("a bad tensor"))[1].startswith('{"error":"internal error')


def test_start_with_load_loads_on_the_thread_that_serves_and_raises_its_error():
    """start(load=...) runs the loading on the worker's own thread, which then serves with what
    it answered; a loading that fails is raised by start, and the worker never becomes ready."""
    stub, loaded_on = StubGenerator(), []
    worker = InferenceWorker()
    worker.start(load=lambda: loaded_on.append(threading.current_thread()) or (stub, "segmenter"))
    assert loaded_on[0] is not threading.current_thread() and loaded_on[0].name == "inference-worker"
    assert worker.ready and worker.segmenter == "segmenter"
    assert worker.submit(image_of(4)) == [{"size": [8, 6], "counts": [4, 1]}]
    with pytest.raises(RuntimeError, match="already started"):  # not a second thread taking the same jobs
        worker.start(load=lambda: loaded_on.append(threading.current_thread()) or (stub, "segmenter"))
    assert len(loaded_on) == 1
    failing = InferenceWorker()
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        failing.start(load=lambda: (_ for _ in ()).throw(FileNotFoundError("no checkpoint")))
    assert not failing.ready
    failing.start(load=lambda: (stub, None))  # tried again once the loading is mended
    assert failing.ready and failing.submit(image_of(5)) == [{"size": [8, 6], "counts": [5, 1]}]
    for both in ({"generator": stub}, {"segmenter": "segmenter"}):
        with pytest.raises(ValueError, match="or load, not both"):
            InferenceWorker().start(**both, load=lambda: (stub, None))


@counts_native_threads
def test_the_readmes_worker_started_with_load_makes_one_openmp_pool():
    """README's worker in a program of one's own, as pasted: the default model loaded through
    start(load=...) and run by the worker, one thread that Python did not start (the worker
    thread's pool). Loaded on the caller's thread and run by the worker, two pools: on 2 cores,
    1.4 to 1.6 s an image instead of 0.8 to 0.9 (docs/performance.md)."""
    block = next(part for part in (REPO / "README.md").read_text().split("```python\n")
                 if "worker.start(load=load)" in part).split("```")[0]
    imports = [line for line in block.splitlines() if line.startswith(("from ", "import "))]
    setup = [line for line in block.splitlines() if line not in imports]
    assert native_threads_added("\n".join(imports), "\n".join(setup + ["assert len(masks) > 1"])) == 1


def test_the_worker_idle_after_work_gives_freed_memory_back_once(monkeypatch):
    from sam2serve import worker as worker_module

    asked, ours = [], []  # (the workers of earlier tests still serve: this one's thread alone is counted)
    monkeypatch.setattr(worker_module, "TRIM_AFTER_IDLE_S", 0.2)
    monkeypatch.setattr(worker_module, "return_freed_memory",
                        lambda above: threading.current_thread() in ours and asked.append(above) or 0)
    worker = InferenceWorker()
    started = set(threading.enumerate())
    worker.start(StubGenerator())
    ours += [thread for thread in threading.enumerate() if thread not in started]
    time.sleep(1.2)
    assert asked == []  # no work yet: nothing freed to look at
    assert worker.submit(image_of(3)) == [{"size": [8, 6], "counts": [3, 1]}]
    time.sleep(1.5)
    assert asked == [worker_module.TRIM_ABOVE_BYTES]  # once after the work, not on every idle tick


def test_full_queue_is_refused_and_waiting_too_long_times_out():
    stub = StubGenerator()
    worker = InferenceWorker(batch_size=1, max_queue=1, timeout_s=0.5)
    with pytest.raises(NotReady):
        worker.submit(image_of(1))
    running, running_threads = hold_worker(worker, stub)
    queued, queued_threads = submit_in_threads(worker, [2])  # fills the queue of one
    wait_for(lambda: worker.queue_depth == 1)
    with pytest.raises(Busy) as busy:
        worker.submit(image_of(3))
    assert busy.value.retry_after_s >= 1
    # A request whose deadline its earlier calls spent times out, full queue or not.
    with pytest.raises(TimedOut):
        worker.call(lambda: None, deadline=time.monotonic())
    for thread in running_threads + queued_threads:
        thread.join(timeout=5)
    assert isinstance(running[1], TimedOut) and isinstance(queued[2], TimedOut)
    stub.gate.set()
    wait_for(lambda: worker.queue_depth == 0)
    # The timed-out queued job is skipped, not run; the worker serves the next request.
    assert worker.submit(image_of(4)) == [{"size": [8, 6], "counts": [4, 1]}]
    assert [2] not in stub.batches


def requests_in_progress(worker, count: int, nested: bool = False, kind: str = "request"):
    """count requests (of this kind) admitted, each on a thread of its own, holding their
    admission (as between a /segment's calls) until the returned function lets them go. nested:
    each enters admitted() twice, as the same request."""
    release, inside = threading.Event(), []

    def hold():
        with worker.admitted(kind), worker.admitted(kind) if nested else contextlib.nullcontext():
            inside.append(1)
            release.wait(timeout=10)

    holders = [threading.Thread(target=hold, daemon=True) for _ in range(count)]
    for holder in holders:
        holder.start()
    wait_for(lambda: len(inside) == count)

    def let_go():
        release.set()
        for holder in holders:
            holder.join(timeout=10)
    return let_go


def test_requests_beyond_the_queue_and_the_batch_are_refused_before_their_image_is_read():
    """Each admitted request holds an HTTP thread, reading its image, queued, running, or
    between its calls (a /segment's parts, outside the queue): at most max_queue + batch_size
    are admitted, so that the server's other threads stay free for /health. One more gets 503
    before its upload is read (a body that is no image: 503, not 400)."""
    worker = InferenceWorker(batch_size=1, max_queue=1, timeout_s=30)
    client = create_app(worker).test_client()
    worker.start(StubGenerator())
    release = requests_in_progress(worker, 2, nested=True)
    not_an_image = lambda: {"image": (io.BytesIO(b"not an image"), "a.png")}  # noqa: E731
    refused = client.post("/upload_rle", data=not_an_image())
    assert refused.status_code == 503 and worker.queue_depth == 0
    assert refused.get_json() == {"error": "the server is busy (2 requests in progress)"}
    assert int(refused.headers["Retry-After"]) >= 1
    assert client.get("/health").status_code == 200
    release()
    assert worker.admitted_requests == 0
    assert client.post("/upload_rle", data=not_an_image()).status_code == 400  # read, now


def test_an_upload_whose_client_has_gone_is_not_read():
    """A client that gave up while its request waited for a thread: 499 (in the log and
    /metrics), its image neither decoded (a body that is no image: not 400) nor run."""
    stub = StubGenerator()
    worker = InferenceWorker()
    worker.start(stub, segmenter=object())  # never called
    client = create_app(worker).test_client()
    for endpoint in ("/upload_rle", "/embed", "/segment"):
        answer = client.post(endpoint, data={"image": (io.BytesIO(b"not an image"), "a.png"),
                                             "prompts": '[{"points": [[1, 1]]}]'},
                             environ_base={"waitress.client_disconnected": lambda: True})
        assert answer.status_code == 499, endpoint
    assert stub.batches == []


def test_retry_after_adds_up_the_work_ahead_by_its_kinds():
    """Retry-After is the model's time for the work ahead, each kind of work timed apart (a
    segment-everything image costs the model far more than a prompt decode: a mean over both
    would say either wrong). For a full queue, the time of each queued job's kind; for the
    requests in progress, that of each one's kind of request, all its calls (a /segment of many
    prompt sets makes many), not per call."""
    stub = StubGenerator()
    worker = InferenceWorker(batch_size=1, max_queue=2, timeout_s=30)
    worker.start(stub)
    generate_batch = stub.generate_batch
    stub.generate_batch = lambda images: time.sleep(0.3) or generate_batch(images)
    with worker.admitted("/upload_rle"):
        worker.submit(image_of(1))  # 0.3 s or more
    stub.generate_batch = generate_batch
    with worker.admitted("/segment"):
        for _ in range(5):
            worker.call(lambda: time.sleep(0.1), kind="decode")
    learnt_jobs, learnt_requests = worker.job_seconds.seconds, worker.request_seconds.seconds
    assert learnt_jobs["image"] >= 0.3 and learnt_jobs["decode"] >= 0.1
    assert learnt_requests["/upload_rle"] >= 0.3 and learnt_requests["/segment"] >= 0.5  # its five calls
    decode_seconds = learnt_jobs["decode"]
    with pytest.raises(ZeroDivisionError):  # a call that fails at once: no time of a decode
        worker.call(lambda: 1 / 0, kind="decode")
    assert learnt_jobs["decode"] == decode_seconds

    learnt_requests.update({"/upload_rle": 3.0, "/segment": 0.8})
    release = [requests_in_progress(worker, 1, kind="/upload_rle"),  # a request entering admitted() twice is one
               requests_in_progress(worker, 2, nested=True, kind="/segment")]
    with pytest.raises(Busy) as busy:
        with worker.admitted("/segment"):
            pass
    assert busy.value.retry_after_s == 5  # 3.0 + 2 x 0.8 s
    for let_go in release:
        let_go()

    learnt_jobs.update({"image": 4.0, "decode": 0.01, "encode": 0.9})
    stub.running.clear()
    stub.gate.clear()
    held, threads = submit_in_threads(worker, [1])
    wait_for(stub.running.is_set)
    queued, queued_threads = submit_in_threads(worker, [2])
    waiting = threading.Thread(target=lambda: worker.call(lambda: None, kind="encode"), daemon=True)
    waiting.start()
    wait_for(lambda: worker.queue_depth == 2)
    with pytest.raises(Busy) as busy:
        worker.call(lambda: None, kind="decode")
    assert busy.value.retry_after_s == 5  # an image and an encoding queued: 4.0 + 0.9 s
    stub.gate.set()
    for thread in [*threads, *queued_threads, waiting]:
        thread.join(timeout=10)


def test_retry_after_counts_each_image_at_its_share_of_a_batch_and_not_the_jobs_given_up():
    """An image's time is its share of its batch's already: with batches of two, two queued images
    of 3 s each are 6 s ahead, not 3. A queued job whose request timed out is skipped when its
    turn comes: it is not counted."""
    stub = StubGenerator()
    worker = InferenceWorker(batch_size=2, max_queue=2, timeout_s=30)
    held, threads = hold_worker(worker, stub)
    worker.job_seconds.seconds.update({"image": 3.0, "encode": 5.0})
    queued, queued_threads = submit_in_threads(worker, [2, 3])
    wait_for(lambda: worker.queue_depth == 2)
    with pytest.raises(Busy) as busy:
        worker.call(lambda: None, kind="encode")
    assert busy.value.retry_after_s == 6

    gave_up = []

    def give_up() -> None:
        try:
            worker.call(lambda: None, deadline=time.monotonic() + 0.3, kind="encode")
        except TimedOut:
            gave_up.append(True)

    stub.gate.set()
    for thread in threads + queued_threads:
        thread.join(timeout=10)
    stub.running.clear()
    stub.gate.clear()
    held, threads = submit_in_threads(worker, [4])
    wait_for(stub.running.is_set)
    late = threading.Thread(target=give_up, daemon=True)
    late.start()
    late.join(timeout=10)
    worker.job_seconds.seconds.update({"image": 3.0, "encode": 5.0})  # as before the images that ran since
    queued, queued_threads = submit_in_threads(worker, [5])
    wait_for(lambda: worker.queue_depth == 2)  # the encoding whose request timed out, and an image
    with pytest.raises(Busy) as busy:
        worker.call(lambda: None, kind="decode")
    assert gave_up and busy.value.retry_after_s == 3
    stub.gate.set()
    for thread in threads + queued_threads:
        thread.join(timeout=10)


def test_a_call_whose_request_timed_out_while_others_of_its_batch_ran_is_not_run():
    """Calls taken in one batch run one after another: one whose request gave up meanwhile (its
    timeout) is skipped, as a queued one is, instead of running for nobody."""
    stub = StubGenerator()
    worker = InferenceWorker(batch_size=3, max_queue=4, timeout_s=30)
    running, running_threads = hold_worker(worker, stub)
    ran, answers = [], {}

    def request(name, seconds, deadline_s):
        try:
            answers[name] = worker.call(lambda: ran.append(name) or time.sleep(seconds) or name,
                                        deadline=time.monotonic() + deadline_s)
        except Exception as error:  # noqa: BLE001 - the test inspects it
            answers[name] = error

    threads = [threading.Thread(target=request, args=("slow", 1.5, 30), daemon=True),
               threading.Thread(target=request, args=("impatient", 0, 0.7), daemon=True)]
    for thread in threads:
        thread.start()
        wait_for(lambda: worker.queue_depth == threads.index(thread) + 1)
    stub.gate.set()  # both calls are taken in one batch; the slow one runs first
    for thread in threads + running_threads:
        thread.join(timeout=10)
    assert answers["slow"] == "slow" and isinstance(answers["impatient"], TimedOut)
    assert ran == ["slow"]
    assert worker.call(lambda: "next") == "next"  # the worker goes on


def test_only_the_first_of_a_requests_calls_can_find_the_queue_full():
    """A one-shot /segment encodes its image (its first call), then decodes its prompts: should
    the queue fill up meanwhile, the decoding waits for a place instead of losing the encoding."""
    stub = StubGenerator()
    worker = InferenceWorker(batch_size=1, max_queue=1, timeout_s=30)
    worker.start(stub)
    run = worker.calls_of_one_request()
    assert run(lambda: "encoded") == "encoded"
    stub.gate.clear()
    running, running_threads = submit_in_threads(worker, [1])
    wait_for(stub.running.is_set)
    queued, queued_threads = submit_in_threads(worker, [2])  # fills the queue of one
    wait_for(lambda: worker.queue_depth == 1)
    with pytest.raises(Busy):  # another request's first call
        worker.calls_of_one_request()(lambda: "first call")
    assert waits_for_a_place(lambda: run(lambda: "decoded"), stub, running_threads + queued_threads) == "decoded"
    assert stub.batches == [[1], [2]]


def test_a_later_part_of_a_request_waits_for_room_in_a_full_queue_instead_of_busy():
    """A /segment's later parts (continues): refused with Busy once the model has run its first
    part, the request would lose that time; it waits for a place, until its deadline."""
    stub = StubGenerator()
    worker = InferenceWorker(batch_size=1, max_queue=1, timeout_s=30)
    running, running_threads = hold_worker(worker, stub)
    queued, queued_threads = submit_in_threads(worker, [2])  # fills the queue of one
    wait_for(lambda: worker.queue_depth == 1)
    with pytest.raises(Busy):
        worker.call(lambda: "first part")
    with pytest.raises(TimedOut):  # no room before its deadline
        worker.call(lambda: "later part", deadline=time.monotonic() + 0.3, continues=True)
    later_part = lambda: stub.batches.append(["later"]) or "later part"  # noqa: E731
    assert waits_for_a_place(lambda: worker.call(later_part, continues=True), stub,
                             running_threads + queued_threads) == "later part"
    assert stub.batches == [[1], [2], ["later"]]  # in the queue's order


def waits_for_a_place(call, stub, threads) -> object:
    """call() made from a thread of its own while the queue is full and the model held: it
    waits for a place instead of Busy; its answer once the model is let go (threads: those
    holding the queue, joined)."""
    answers = []
    later = threading.Thread(target=lambda: answers.append(call()), daemon=True)
    later.start()
    time.sleep(0.3)
    assert answers == [] and later.is_alive()  # waiting for a place, not refused
    stub.gate.set()
    later.join(timeout=10)
    for thread in threads:
        thread.join(timeout=5)
    assert len(answers) == 1
    return answers[0]


def queue_in_order(worker, stub, entries, seconds: float = 0.0) -> tuple[dict, list]:
    """Queues each entry from a thread of its own, one after another: an int is an image of that
    value, a str a call that records its name in stub.batches (of kind "encode" where the name
    starts so, else "decode"; taking `seconds`). Each is queued before the next is sent, or has
    started (a prompt set decoded between an image's batches may leave the queue at once).
    ({entry: answer}, threads)."""
    answers, threads, started = {}, [], set()
    for entry in entries:
        if isinstance(entry, int):
            more, more_threads = submit_in_threads(worker, [entry], answers=answers)
            threads += more_threads
        else:
            def call(name=entry):
                started.add(name)
                time.sleep(seconds)
                stub.batches.append([name])
                return name

            def request(name=entry):
                answers[name] = worker.call(lambda: call(name),
                                            kind="encode" if name.startswith("encode") else "decode")
            threads.append(threading.Thread(target=request, daemon=True))
            threads[-1].start()
        wait_for(lambda: worker.queue_depth + len(started) == len(threads))
    return answers, threads


def test_calls_go_ahead_of_the_images_queued_before_them():
    """Someone clicking waits for the image being made, not for every image queued; the calls
    keep their order among themselves, as the images do."""
    stub = StubGenerator()
    worker = InferenceWorker(batch_size=1, max_queue=10, timeout_s=30)
    running, running_threads = hold_worker(worker, stub)
    answers, threads = queue_in_order(worker, stub, [2, 3, "click", 4, "encode"])
    stub.gate.set()
    for thread in running_threads + threads:
        thread.join(timeout=10)
    assert stub.batches == [[1], ["click"], ["encode"], [2], [3], [4]]
    assert answers["click"] == "click" and answers[3] == [{"size": [8, 6], "counts": [3, 1]}]


@pytest.mark.parametrize("between_batches", [True, False])
def test_prompt_sets_are_decoded_between_an_images_batches_of_point_prompts(between_batches):
    """With decodes_between_batches (server.py on a CPU), a click waits for one batch of the
    image being made, not for the whole image; encodings wait for the image's end. The image's
    time for Retry-After leaves out the prompt sets' time."""
    stub = StoppableStub()  # asks should_stop every 10 ms while its gate is closed, as between batches
    image_seconds = []  # the image's time for Retry-After after each image
    worker = InferenceWorker(
        batch_size=1, max_queue=10, timeout_s=30, decodes_between_batches=between_batches,
        observe_batch=lambda size, masks: image_seconds.append(worker.job_seconds.seconds["image"]))
    running, running_threads = hold_worker(worker, stub)
    answers, threads = queue_in_order(worker, stub, [2, "encode", "click"], seconds=0.5)
    if between_batches:
        wait_for(lambda: "click" in answers)  # the image still held
        assert stub.batches == [["click"]] and worker.queue_depth == 2
    stub.gate.set()
    for thread in running_threads + threads:
        thread.join(timeout=10)
    if between_batches:
        assert stub.batches == [["click"], [1], ["encode"], [2]]
        assert image_seconds[0] < worker.job_seconds.seconds["decode"]  # image 1's: the 0.5 s click left out
    else:
        assert stub.batches == [[1], ["encode"], ["click"], [2]]
    assert running[1] == [{"size": [8, 6], "counts": [1, 1]}] and answers["click"] == "click"


class BatchedStub(StubGenerator):
    """An image's masks in `batches` batches of point prompts of `batch_s` each, should_stop asked
    before each, as MaskGenerator asks it."""

    def __init__(self, batches: int, batch_s: float) -> None:
        super().__init__()
        self.should_stop = None
        self.batches_of_points, self.batch_s = batches, batch_s

    def generate_batch(self, images):
        self.running.set()
        for _ in range(self.batches_of_points):
            stop_if_asked(self.should_stop)
            time.sleep(self.batch_s)
        return super().generate_batch(images)


def test_clicks_decoded_between_batches_make_an_image_twice_as_slow_at_most():
    """Four users clicking without a pause (0.05 s a decode) while an image of 0.5 s is made: the
    decodes between its batches take no longer in all than its own work so far (10 decodes, and
    the one that passes it), where every decode queued ran at every batch (80). Counted, not
    timed against a timeout: a busy machine slows the decodes and the batches alike."""
    stub = BatchedStub(batches=20, batch_s=0.025)
    image, generate_batch = {}, stub.generate_batch

    def timed_generate_batch(images):  # when the image's masks were made
        image.setdefault("began", time.monotonic())
        answers = generate_batch(images)
        image.setdefault("ended", time.monotonic())
        return answers

    stub.generate_batch = timed_generate_batch
    worker = InferenceWorker(batch_size=1, max_queue=16, timeout_s=60, decodes_between_batches=True)
    worker.start(stub)
    done, decoded = threading.Event(), []

    def user():
        while not done.is_set():
            worker.call(lambda: time.sleep(0.05) or decoded.append(time.monotonic()), kind="decode")

    for _ in range(4):
        threading.Thread(target=user, daemon=True).start()
    wait_for(lambda: len(decoded) >= 4)
    try:
        answer = worker.submit(image_of(1))
    finally:
        done.set()
    assert answer == [{"size": [8, 6], "counts": [1, 1]}], answer
    during = sum(image["began"] <= t <= image["ended"] for t in decoded)
    assert 0 < during <= 50, during  # 10 on a quiet machine; a busy one lengthens the batches too (up to 41 seen)


def test_a_click_waits_for_one_batch_while_other_images_are_queued():
    """Decodes run between the batches of the image being made count against none of the images
    queued (they could not start before it anyway): the 17th click waited for the rest of the
    image, once the image queued had let 16 pass."""
    stub = BatchedStub(batches=60, batch_s=0.05)  # 3 s an image, 0.05 s a batch
    worker = InferenceWorker(batch_size=1, max_queue=16, timeout_s=60, decodes_between_batches=True)
    worker.start(stub)
    images = [threading.Thread(target=worker.submit, args=(image_of(value),), daemon=True) for value in (1, 2)]
    images[0].start()
    wait_for(stub.running.is_set)
    images[1].start()
    wait_for(lambda: worker.queue_depth == 1)
    waits = []
    for _ in range(20):  # one user clicking, each click once the last is answered
        sent = time.monotonic()
        worker.call(lambda: None, kind="decode")
        waits.append(time.monotonic() - sent)
    assert max(waits) < 1.0 and stub.batches == [], [round(wait, 2) for wait in waits]  # image 1 still being made


def test_an_image_lets_a_bounded_number_of_calls_pass(monkeypatch):
    """A stream of calls cannot hold an image back for ever: the oldest image runs once
    CALLS_AHEAD_OF_AN_IMAGE calls queued after it have run before it."""
    from sam2serve import worker as worker_module
    monkeypatch.setattr(worker_module, "CALLS_AHEAD_OF_AN_IMAGE", 2)
    stub = StubGenerator()
    worker = InferenceWorker(batch_size=1, max_queue=10, timeout_s=30)
    running, running_threads = hold_worker(worker, stub)
    answers, threads = queue_in_order(worker, stub, [2, "a", 3, "b", "c", "d", "e"])
    stub.gate.set()
    for thread in running_threads + threads:
        thread.join(timeout=10)
    # 2 lets a and b pass; then 3, passed by b alone so far, lets c pass too.
    assert stub.batches == [[1], ["a"], ["b"], [2], ["c"], [3], ["d"], ["e"]]
    assert len(answers) == 7


def test_a_model_thread_runs_calls_ahead_of_the_images_queued_before_them():
    """worker.ModelThread (a Ray Serve replica's) takes its jobs in InferenceWorker's order: calls
    ahead of the images queued before them. As an executor's: a call cancelled while queued is not
    run, a call's error goes to its caller, shutdown runs what was queued (or cancels it, with
    cancel_futures) and refuses more."""
    model_thread, gate, ran = ModelThread("model-thread-test"), threading.Event(), []
    held = model_thread.submit_as("image", gate.wait, 10)
    wait_for(lambda: model_thread.jobs.empty())  # the first image runs, held
    queued = [model_thread.submit_as("image", ran.append, 2), model_thread.submit(ran.append, "call"),
              model_thread.submit_as("decode", ran.append, "decode"), model_thread.submit_as("image", ran.append, 3)]
    cancelled, failing = model_thread.submit(ran.append, "cancelled"), model_thread.submit(divmod, 1, 0)
    assert cancelled.cancel()
    gate.set()
    model_thread.shutdown()
    assert ran == ["call", "decode", 2, 3] and held.result() is True and all(f.result() is None for f in queued)
    with pytest.raises(ZeroDivisionError):
        failing.result()
    with pytest.raises(RuntimeError, match="after shutdown"):
        model_thread.submit(ran.append, 4)
    model_thread, gate = ModelThread("model-thread-test"), threading.Event()  # with cancel_futures: cancelled
    held, queued = model_thread.submit(gate.wait, 10), model_thread.submit(ran.append, "cancelled")
    wait_for(lambda: model_thread.jobs.qsize() == 1)
    threading.Timer(0.2, gate.set).start()
    model_thread.shutdown(cancel_futures=True)
    assert held.result() is True and queued.cancelled() and ran == ["call", "decode", 2, 3]


def test_a_request_whose_client_has_gone_is_skipped_when_its_turn_comes():
    stub = StubGenerator()
    worker = InferenceWorker(batch_size=3, max_queue=10)
    running, threads = hold_worker(worker, stub)
    gone = {2: True, 3: False}  # asked when the turn comes, not when queued; 4's check fails (KeyError): it runs
    answers, calls = {}, []

    def call():
        try:
            answers["call"] = worker.call(lambda: calls.append("ran"), abandoned=lambda: True)
        except Exception as error:  # noqa: BLE001 - the test inspects it
            answers["call"] = error

    for value in (2, 3, "call", 4):
        if value == "call":
            threads.append(threading.Thread(target=call, daemon=True))
            threads[-1].start()
        else:
            threads += submit_in_threads(worker, [value], gone, answers)[1]
        wait_for(lambda: worker.queue_depth == len(threads) - 1)  # in this order
    stub.gate.set()
    for thread in threads:
        thread.join(timeout=30)
    assert stub.batches == [[1], [3], [4]] and calls == []  # 2, 3 and the call were taken as one batch
    assert isinstance(answers[2], Abandoned) and isinstance(answers["call"], Abandoned)
    for value, answer in [*answers.items(), *running.items()]:
        if value in (1, 3, 4):
            assert answer == [{"size": [8, 6], "counts": [value, 1]}]


def test_masks_being_made_stop_once_every_request_of_their_batch_has_gone():
    """Segment-everything that runs when its client goes (or its request times out) stops before
    its next batch of point prompts: the model moves on to the requests still waited for."""
    stub = StoppableStub()
    worker = InferenceWorker(batch_size=2, max_queue=10, timeout_s=30)
    worker.start(stub)
    stub.gate.clear()
    gone = {1: False, 2: False, 3: False}
    answers, threads = {}, []
    for value in (1, 2, 3):  # 1 runs; 2 and 3 queue, then run together
        threads += submit_in_threads(worker, [value], gone, answers)[1]
        wait_for(lambda: stub.running.is_set() and worker.queue_depth == value - 1)
    gone[1] = True
    wait_for(lambda: stub.stopped == [[1]] and worker.queue_depth == 0)
    gone[2] = True  # 3 is still waited for: the batch runs on
    time.sleep(0.3)
    assert stub.stopped == [[1]]
    gone[3] = True
    wait_for(lambda: stub.stopped == [[1], [2, 3]])
    for thread in threads:
        thread.join(timeout=10)
    assert all(isinstance(answers[value], Abandoned) for value in (1, 2, 3))
    # A request that times out while its masks are made stops them too; the next one is served.
    worker.timeout_s = 0.3
    with pytest.raises(TimedOut):
        worker.submit(image_of(4))
    wait_for(lambda: stub.stopped[-1] == [4])
    stub.gate.set()
    assert worker.submit(image_of(5)) == [{"size": [8, 6], "counts": [5, 1]}]
    assert stub.batches == [[5]]  # the stopped ones never reached their masks
    assert stub.should_stop is None  # not left to a later call


def test_a_check_that_fails_counts_as_not_gone_and_is_asked_no_more(caplog):
    """It is asked before each batch of point prompts: one failure logged, not one per batch."""
    calls = []
    job = Job(image=image_of(1), abandoned=lambda: calls.append(1) or {}["no such key"])
    assert not gone(job) and not gone(job)
    assert len(calls) == 1 and caplog.text.count("could not tell whether a client has gone") == 1


def test_http_status_codes_health_and_metrics():
    stub = StubGenerator()
    worker = InferenceWorker(batch_size=2, max_queue=1, timeout_s=5)
    info = {"mode": "stub"}
    client = create_app(worker, info=info).test_client()

    health = client.get("/health")
    assert health.status_code == 503 and health.get_json()["status"] == "loading"
    loading = client.post("/upload_rle", data={"image": (io.BytesIO(png_of(1)), "a.png")})
    assert loading.status_code == 503 and "Retry-After" in loading.headers

    worker.start(stub)
    assert client.get("/health").status_code == 200
    ok = client.post("/upload_rle", data={"image": (io.BytesIO(png_of(5)), "a.png")})
    assert ok.status_code == 200 and ok.get_json() == {"mask_0": {"size": [8, 6], "counts": [5, 1]}}
    failed = client.post("/upload_rle", data={"image": (io.BytesIO(png_of(POISON)), "a.png")})
    assert failed.status_code == 500 and "bad tensor" in failed.get_json()["error"]
    stub.oom_once = True
    oom = client.post("/upload", data={"image": (io.BytesIO(png_of(6)), "a.png")})
    assert oom.status_code == 500 and "out of memory" in oom.get_json()["error"]
    assert client.post("/upload", data={"image": (io.BytesIO(png_of(6)), "a.png")}).status_code == 200

    metrics = client.get("/metrics").get_data(as_text=True)
    assert 'sam2_requests_total{endpoint="/upload_rle",method="POST",status="200"} 1.0' in metrics
    assert 'sam2_requests_total{endpoint="/upload_rle",method="POST",status="500"} 1.0' in metrics
    assert 'sam2_requests_total{endpoint="/health",method="GET",status="503"} 1.0' in metrics
    assert 'sam2_request_seconds_count{endpoint="/upload"} 2.0' in metrics
    assert "sam2_queue_depth 0.0" in metrics
    assert 'sam2_batch_size_bucket{le="1.0"} 2.0' in metrics  # the successful batches
    assert 'sam2_masks_per_image_bucket{le="1.0"} 2.0' in metrics


def test_http_busy_and_timeout():
    stub = StubGenerator()
    worker = InferenceWorker(batch_size=1, max_queue=1, timeout_s=0.5)
    app = create_app(worker)
    worker.start(stub)
    stub.gate.clear()
    statuses = []

    def post(value):
        response = app.test_client().post("/upload_rle", data={"image": (io.BytesIO(png_of(value)), "a.png")})
        statuses.append((response.status_code, response.headers.get("Retry-After")))

    threads = [threading.Thread(target=post, args=(value,), daemon=True) for value in (1, 2, 3)]
    threads[0].start()
    wait_for(stub.running.is_set)  # 1 runs (blocked)
    threads[1].start()
    wait_for(lambda: worker.queue_depth == 1)  # 2 waits
    threads[2].start()  # 3 finds the queue full
    for thread in threads:
        thread.join(timeout=5)
    stub.gate.set()
    assert sorted(status for status, _ in statuses) == [503, 504, 504]
    assert all(retry is not None for status, retry in statuses if status == 503)


def test_bulk_lines_isolate_the_image_that_fails():
    """rle_lines (the Ray Data job's and the Modal app's answers): one line per file, in order."""
    lines = rle_lines(StubGenerator(), [png_of(1), png_of(POISON), b"not an image",
                                        InvalidImage("the image file could not be read"), png_of(2)])
    assert [json.loads(line) for line in (lines[0], lines[4])] == [
        {"mask_0": {"size": [8, 6], "counts": [value, 1]}} for value in (1, 2)
    ]
    assert "bad tensor" in json.loads(lines[1])["error"]
    assert "not an image" in json.loads(lines[2])["error"]
    assert json.loads(lines[3]) == {"error": "the image file could not be read"}


def test_files_are_read_as_the_server_takes_uploads(tmp_path):
    """file_as_upload (the Ray Data job's reader): the server's 400 and 413 answers, and a file
    over the limit read no further than it."""
    limits = Limits(max_upload_bytes=len(png_of(1)))
    (tmp_path / "fits.png").write_bytes(png_of(1))
    with open(tmp_path / "huge.png", "wb") as huge:  # sparse: 1 TiB on disk costs nothing
        huge.write(png_of(1))
        huge.truncate(2**40)
    os.mkfifo(tmp_path / "pipe.png")  # opened, it would wait for a writer for good
    names = ("fits.png", "huge.png", "missing.png", "pipe.png", "nul\0.png", "")
    files = [file_as_upload(tmp_path / name, limits) for name in names]
    assert files[0] == png_of(1)
    lines = rle_lines(StubGenerator(), files, limits)
    assert json.loads(lines[0]) == {"mask_0": {"size": [8, 6], "counts": [1, 1]}}
    assert json.loads(lines[1]) == {"error": f"upload larger than the limit of {limits.max_upload_bytes} bytes"}
    for line in lines[2:]:  # missing, a named pipe, a NUL in the path (ValueError ended the Ray job), a folder
        assert json.loads(line) == {"error": "the image file could not be read"}


def test_serve_runs_jobs_on_the_calling_thread_until_told_to_stop():
    # server.py serves on the thread that loaded the model (sam2serve/worker.py says why).
    worker, stop, serving_thread = InferenceWorker(), threading.Event(), {}

    def serve():
        serving_thread["id"] = threading.get_ident()
        worker.serve(StubGenerator(), until=stop)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    for _ in range(100):
        if worker.ready:
            break
        time.sleep(0.05)
    assert worker.call(threading.get_ident) == serving_thread["id"] != threading.get_ident()
    assert worker.submit(image_of(7)) == [{"size": [8, 6], "counts": [7, 1]}]
    stop.set()
    thread.join(timeout=5)
    assert not thread.is_alive()


def test_stop_answers_the_queued_requests_refuses_new_ones_and_ends_serving():
    """What server.py does on SIGTERM: the running and the queued requests are answered, a new
    one gets 503 ("stopping", no Retry-After), /health says so, and serve() returns."""
    stub, stop = StubGenerator(), threading.Event()
    worker = InferenceWorker(batch_size=1, max_queue=4)
    client = create_app(worker).test_client()
    serving = threading.Thread(target=worker.serve, args=(stub,), kwargs={"until": stop}, daemon=True)
    serving.start()
    wait_for(lambda: worker.ready)
    stub.gate.clear()
    answers, threads = submit_in_threads(worker, [1])
    wait_for(stub.running.is_set)
    more, more_threads = submit_in_threads(worker, [2, 3])
    wait_for(lambda: worker.queue_depth == 2)

    worker.stop()
    with pytest.raises(Stopping):
        worker.submit(image_of(4))
    refused = client.post("/upload_rle", data={"image": (io.BytesIO(png_of(4)), "a.png")})
    assert refused.status_code == 503 and "stopping" in refused.get_json()["error"]
    assert "Retry-After" not in refused.headers
    health = client.get("/health")
    assert health.status_code == 503 and health.get_json() == {"status": "stopping", "queued": 2}
    assert serving.is_alive()  # still answering what it accepted
    stub.gate.set()
    for thread in threads + more_threads:
        thread.join(timeout=10)
    serving.join(timeout=10)
    assert not serving.is_alive() and not stop.is_set()  # it ended because the queue was done
    answers.update(more)
    assert answers == {value: [{"size": [8, 6], "counts": [value, 1]}] for value in (1, 2, 3)}
    assert sum(stub.batches, []) == [1, 2, 3]


def test_a_full_queue_says_retry_after_the_time_of_every_job_queued():
    """4 images queued, of a kind not timed yet (1 s each): 4 s, not one job's."""
    stub = StubGenerator()
    worker = InferenceWorker(batch_size=1, max_queue=4, timeout_s=30)
    first, threads = hold_worker(worker, stub)
    queued, more = submit_in_threads(worker, [2, 3, 4, 5])
    wait_for(lambda: worker.queue_depth == 4)
    try:
        with pytest.raises(Busy) as busy:
            worker.submit(image_of(6))
    finally:
        stub.gate.set()
        for thread in threads + more:
            thread.join(timeout=30)
    assert busy.value.retry_after_s == 4 and "4 requests queued" in str(busy.value)


def test_requests_refused_before_the_model_ran_do_not_shorten_retry_after():
    """Only a request that used the model times its kind: a flood of bad uploads (400, no model
    time) would bring the estimate towards 0, and Retry-After to 1 s, with the model as slow."""
    worker = InferenceWorker(batch_size=1, max_queue=1, timeout_s=30)
    client = create_app(worker).test_client()
    worker.start(StubGenerator())
    for _ in range(10):
        answer = client.post("/upload_rle", data={"image": (io.BytesIO(b"not an image"), "a.png")})
        assert answer.status_code == 400
    assert worker.request_seconds.seconds == {}
    release = requests_in_progress(worker, 2, kind="/upload_rle")
    try:
        refused = client.post("/upload_rle", data={"image": (io.BytesIO(b"not an image"), "a.png")})
    finally:
        release()
    assert refused.status_code == 503 and refused.headers["Retry-After"] == "2"  # 2 requests not timed yet: 1 s each


@pytest.mark.parametrize("timeout_s", [threading.TIMEOUT_MAX * 2, 0, -1])
def test_a_timeout_python_cannot_wait_is_refused(timeout_s):
    """Refused when the worker is made: an embedder's InferenceWorker(timeout_s=1e10) would answer
    every request 500 (OverflowError). server.py's --request-timeout checks its own."""
    with pytest.raises(ValueError, match="timeout_s"):
        InferenceWorker(timeout_s=timeout_s)

