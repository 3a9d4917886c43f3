"""The batch queue: shape buckets, batch limits, delays, admission, dropping and draining."""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import CancelledError, wait

import numpy as np
import pytest

from service import metrics
from service.batcher import Batcher, BatchStats, RunStop
from service.errors import OverloadedError


class Recorder:
    """A model stand-in: output = 2 * input + 1, records batch shapes, can be held back."""

    def __init__(self) -> None:
        self.shapes: list[tuple[int, ...]] = []
        self.release = threading.Event()
        self.release.set()
        self.started = threading.Event()

    def __call__(self, batch: np.ndarray, alone: bool, stop: RunStop) -> np.ndarray:
        self.started.set()
        self.release.wait(timeout=10)
        self.shapes.append(batch.shape)
        return batch * 2.0 + 1.0


def make_batcher(
    run: Recorder,
    *,
    batch: int = 4,
    pixels: int | None = None,
    delay_s: float = 0.02,
    queue: int = 64,
    name: str = "t",
    runs: int = 1,
) -> Batcher:
    batcher = Batcher(
        run,
        model_name=name,
        max_batch_size=batch,
        max_batch_pixels=pixels,
        max_queue_delay_s=delay_s,
        max_queue_size=queue,
        parallel_runs=runs,
    )
    batcher.start()
    return batcher


def test_groups_by_shape_and_caps_batch_size() -> None:
    run = Recorder()
    run.release.clear()  # hold the thread so everything is queued before the first batch
    batcher = make_batcher(run, batch=4)
    try:
        batcher.admit("a", 13)
        stats = BatchStats()
        rng = np.random.default_rng(0)
        tensors = [rng.normal(size=(3, 8, 8)).astype(np.float32) for _ in range(10)]
        tensors += [rng.normal(size=(3, 8, 12)).astype(np.float32) for _ in range(3)]
        futures = [batcher.submit(t, "a", stats) for t in tensors]
        run.release.set()
        wait(futures, timeout=10)
        for tensor, future in zip(tensors, futures, strict=True):
            np.testing.assert_array_equal(future.result(), tensor * 2.0 + 1.0)
        # The first batch may be taken before the rest arrived; after that batches are full.
        assert all(shape[0] <= 4 for shape in run.shapes)
        assert sum(shape[0] for shape in run.shapes) == 13
        assert {shape[1:] for shape in run.shapes} == {(3, 8, 8), (3, 8, 12)}
        assert stats.inputs == 13 and stats.inference_s > 0
        assert batcher.depth == 0
    finally:
        batcher.stop(drain_timeout_s=0)


def test_big_inputs_batch_fewer_at_a_time() -> None:
    """``max_batch_pixels`` 2.5 inputs of 8x8: two per batch; 4x4 inputs still fill the batch
    of four; a single input over the budget still runs, alone."""
    run = Recorder()
    run.release.clear()
    batcher = make_batcher(run, batch=4, pixels=160)
    try:
        batcher.admit("a", 10)
        shapes = [(3, 8, 8)] * 5 + [(3, 4, 4)] * 4 + [(3, 16, 16)]
        futures = [batcher.submit(np.zeros(s, np.float32), "a", BatchStats()) for s in shapes]
        run.release.set()
        wait(futures, timeout=10)
        sizes = sorted((shape[2:], shape[0]) for shape in run.shapes)
        assert sizes[-1] == ((16, 16), 1)
        assert [n for shape, n in sizes if shape == (8, 8)][-3:] == [1, 2, 2]
        assert max(n for shape, n in sizes if shape == (4, 4)) == 4
    finally:
        batcher.stop(drain_timeout_s=0)


def test_waits_for_a_batch_to_fill_but_not_longer_than_the_delay() -> None:
    run = Recorder()
    batcher = make_batcher(run, batch=8, delay_s=0.2)
    try:
        batcher.admit("a", 8)
        started = time.perf_counter()
        lone = batcher.submit(np.zeros((1, 2, 2), np.float32), "a", BatchStats())
        lone.result(timeout=5)
        lone_latency = time.perf_counter() - started
        assert 0.18 <= lone_latency < 2.0  # held for the delay, hoping for company

        started = time.perf_counter()
        full = [batcher.submit(np.ones((1, 2, 2), np.float32), "a", BatchStats()) for _ in range(8)]
        wait(full, timeout=5)
        assert time.perf_counter() - started < 0.15  # a full batch does not wait
        assert run.shapes[-1][0] == 8
    finally:
        batcher.stop(drain_timeout_s=0)


def test_idle_runner_dispatches_at_once_and_a_busy_one_batches_what_arrived() -> None:
    run = Recorder()
    batcher = make_batcher(run, batch=8, delay_s=0.0)
    try:
        batcher.admit("a", 8)
        started = time.perf_counter()
        batcher.submit(np.zeros((1, 2, 2), np.float32), "a", BatchStats()).result(timeout=5)
        assert time.perf_counter() - started < 0.1  # nothing to wait for: no queue delay
        run.release.clear()
        run.started.clear()
        first = batcher.submit(np.zeros((1, 2, 2), np.float32), "a", BatchStats())
        assert run.started.wait(5)
        rest = [batcher.submit(np.ones((1, 2, 2), np.float32), "a", BatchStats()) for _ in range(5)]
        run.release.set()
        wait([first, *rest], timeout=5)
        assert [shape[0] for shape in run.shapes] == [1, 1, 5]  # gathered while one ran
    finally:
        batcher.stop(drain_timeout_s=0)


@pytest.mark.parametrize("delay_s", [0.0, 0.02])
def test_one_shape_under_steady_load_does_not_starve_another(delay_s: float) -> None:
    """Slide windows keep a full bucket of one shape queued; a whole-image input of another
    shape still runs after the inputs queued before it, not when the load stops."""

    def model(batch: np.ndarray, alone: bool, stop: RunStop) -> np.ndarray:
        time.sleep(0.005)
        return batch

    batcher = Batcher(
        model, model_name="fair", max_batch_size=4, max_queue_delay_s=delay_s, max_queue_size=32
    )
    batcher.start()
    in_flight = threading.Semaphore(16)  # four full batches of windows always waiting
    load_until = time.perf_counter() + 3.0
    whole_done = threading.Event()

    def slide_load() -> None:
        while time.perf_counter() < load_until and not whole_done.is_set():
            if not in_flight.acquire(timeout=1):
                continue
            future = batcher.submit(np.zeros((3, 8, 8), np.float32), "slide", BatchStats())
            future.add_done_callback(lambda _: in_flight.release())

    try:
        batcher.admit("slide", 16)
        batcher.admit("whole", 1)
        feeder = threading.Thread(target=slide_load)
        feeder.start()
        time.sleep(0.1)  # the load is steady
        assert batcher.depth >= 8
        started = time.perf_counter()
        whole = batcher.submit(np.ones((3, 8, 12), np.float32), "whole", BatchStats())
        np.testing.assert_array_equal(whole.result(timeout=5), np.ones((3, 8, 12)))
        latency = time.perf_counter() - started
        whole_done.set()
        feeder.join()
        # At most the delay, the batch running, and the 16 windows queued before it (4 batches):
        # ~50 ms of model time; starved, it would wait for the 3 s of load to end.
        assert latency < 0.5
    finally:
        whole_done.set()
        batcher.stop(drain_timeout_s=0)


def test_admission_is_bounded() -> None:
    batcher = make_batcher(Recorder(), queue=4, name="bounded")
    try:
        batcher.admit("a", 3)
        with pytest.raises(OverloadedError, match="queue is full") as info:
            batcher.admit("b", 2)
        assert info.value.retry_after_s > 0 and info.value.reason == "queue_full"
        batcher.release("a")
        batcher.admit("b", 2)  # room again once a's reservation is freed
        with pytest.raises(RuntimeError, match="submit before admit"):
            batcher.submit(np.zeros((1,)), "nobody", BatchStats())
    finally:
        batcher.stop(drain_timeout_s=0)


@pytest.mark.parametrize("runs", [1, 2])
def test_release_drops_queued_inputs_of_that_request_only(runs: int) -> None:
    run = Recorder()
    run.release.clear()
    batcher = make_batcher(run, batch=1, delay_s=0.0, runs=runs)
    try:
        batcher.admit("a", 4)
        batcher.admit("b", 2)
        first = batcher.submit(np.zeros((2,), np.float32), "a", BatchStats())
        assert run.started.wait(5)  # the thread now holds `first`, blocked in the model
        queued_a = [batcher.submit(np.zeros((2,), np.float32), "a", BatchStats()) for _ in range(3)]
        queued_b = [batcher.submit(np.ones((2,), np.float32), "b", BatchStats()) for _ in range(2)]
        assert batcher.depth == 5
        assert batcher.release("a") == 3
        assert batcher.depth == 2
        run.release.set()
        np.testing.assert_array_equal(first.result(timeout=5), [1.0, 1.0])  # already running
        for future in queued_a:
            with pytest.raises(CancelledError):
                future.result(timeout=5)
        for future in queued_b:
            np.testing.assert_array_equal(future.result(timeout=5), [3.0, 3.0])
        assert len(run.shapes) == 3  # first + b's two: a's queued inputs never ran
    finally:
        batcher.stop(drain_timeout_s=0)


@pytest.mark.parametrize("runs", [1, 2])
def test_cancelled_future_is_skipped_by_the_thread(runs: int) -> None:
    run = Recorder()
    run.release.clear()
    batcher = make_batcher(run, batch=1, delay_s=0.0, runs=runs)
    try:
        batcher.admit("a", 2)
        blocker = batcher.submit(np.zeros((2,), np.float32), "a", BatchStats())
        assert run.started.wait(5)
        dropped = batcher.submit(np.zeros((2,), np.float32), "a", BatchStats())
        assert dropped.cancel()
        run.release.set()
        blocker.result(timeout=5)
        time.sleep(0.1)
        assert len(run.shapes) == 1
    finally:
        batcher.stop(drain_timeout_s=0)


@pytest.mark.parametrize("runs", [1, 2])
def test_stop_drains_queued_work_then_refuses(runs: int) -> None:
    run = Recorder()
    batcher = make_batcher(run, batch=2, delay_s=0.05, runs=runs)
    batcher.admit("a", 5)
    futures = [batcher.submit(np.full((2,), i, np.float32), "a", BatchStats()) for i in range(5)]

    def request_finishes() -> None:  # what the engine does: wait for its outputs, then release
        wait(futures, timeout=5)
        batcher.release("a")

    finisher = threading.Thread(target=request_finishes)
    finisher.start()
    started = time.perf_counter()
    batcher.stop(drain_timeout_s=5)
    assert time.perf_counter() - started < 2  # returned when the request released, not at 5 s
    finisher.join()
    assert [f.result(timeout=0)[0] for f in futures] == [1.0, 3.0, 5.0, 7.0, 9.0]
    with pytest.raises(OverloadedError, match="shutting down"):
        batcher.admit("b", 1)


@pytest.mark.parametrize("runs", [1, 2])
def test_model_errors_reach_every_input_of_the_batch(runs: int) -> None:
    def broken(batch: np.ndarray, alone: bool, stop: RunStop) -> np.ndarray:
        raise ValueError("graph exploded")

    batcher = Batcher(
        broken,
        model_name="broken",
        max_batch_size=4,
        max_queue_delay_s=0.01,
        max_queue_size=8,
        parallel_runs=runs,
    )
    batcher.start()
    try:
        for client in "ab":  # two requests: with parallel runs, batches may run beside
            batcher.admit(client, 2)
        futures = [batcher.submit(np.zeros((2,)), c, BatchStats()) for c in "aabb"]
        for future in futures:
            with pytest.raises(ValueError, match="graph exploded"):
                future.result(timeout=5)
    finally:
        batcher.stop(drain_timeout_s=0)


def test_a_running_batch_is_stopped_once_no_request_waits_for_it(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A request that ends (timed out, its client gone) while its batch runs stops that run, as
    long as no other request waits for it: the model's threads are free for the next request
    (a 504's forward ran on for 30 s and held its memory). A batch another request still waits
    for runs to the end."""
    started, stopped = threading.Event(), threading.Event()

    def model(batch: np.ndarray, alone: bool, stop: RunStop) -> np.ndarray:
        stop.on_stop(stopped.set)  # the runtime's way: onnxruntime's terminate flag
        started.set()
        if not stopped.wait(timeout=10):
            return batch
        raise RuntimeError("Exiting due to terminate flag being set to true.")

    batcher = Batcher(
        model, model_name="stops", max_batch_size=4, max_queue_delay_s=0.05, max_queue_size=8
    )
    batcher.start()
    try:
        batcher.admit("gone", 1)
        batcher.admit("stays", 1)
        gone = batcher.submit(np.zeros((2,)), "gone", BatchStats())
        stays = batcher.submit(np.ones((2,)), "stays", BatchStats())  # the same batch
        assert started.wait(timeout=5)
        batcher.release("gone")
        assert not stopped.wait(timeout=0.2)  # "stays" still waits: the run goes on
        with caplog.at_level(logging.INFO, logger="service.batcher"):
            batcher.release("stays")
            assert stopped.wait(timeout=5)
            with pytest.raises(RuntimeError, match="terminate flag"):
                stays.result(timeout=5)
        assert "batch of 2 inputs stopped: no request waits for it" in caplog.text
        assert "failed" not in caplog.text  # an expected stop is not logged as a failure
        with pytest.raises(RuntimeError):
            gone.result(timeout=5)
        # The thread is free again: the next request's batch starts at once.
        started.clear()
        stopped.clear()
        batcher.admit("next", 1)
        following = batcher.submit(np.full((2,), 3.0), "next", BatchStats())
        assert started.wait(timeout=5)
        batcher.release("next")
        with pytest.raises(RuntimeError):
            following.result(timeout=5)
    finally:
        batcher.stop(drain_timeout_s=0)


def test_metrics_count_batches_and_waits() -> None:
    batch_sizes = metrics.BATCH_SIZE.labels("metered")
    waits = metrics.QUEUE_WAIT.labels("metered")
    count_before = batch_sizes._sum.get()
    waits_before = sum(b.get() for b in waits._buckets)
    run = Recorder()
    run.release.clear()
    batcher = make_batcher(run, batch=3, delay_s=0.01, name="metered")
    try:
        batcher.admit("a", 3)
        futures = [batcher.submit(np.zeros((2,)), "a", BatchStats()) for _ in range(3)]
        run.release.set()
        wait(futures, timeout=5)
        assert batch_sizes._sum.get() - count_before == 3  # sum of observed batch sizes
        assert sum(b.get() for b in waits._buckets) - waits_before == 3
        assert metrics.QUEUE_DEPTH.labels("metered")._value.get() == 0
    finally:
        batcher.stop(drain_timeout_s=0)


class Timeline:
    """A model stand-in recording each run's (start, end, alone, size); holds runs back on
    demand and sleeps ``seconds`` in each, so that runs that may overlap do."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.runs: list[tuple[float, float, bool, int]] = []
        self.threads: list[str] = []  # the calling thread of each run
        self.release = threading.Event()
        self.release.set()
        self.started = threading.Event()
        self._lock = threading.Lock()

    def __call__(self, batch: np.ndarray, alone: bool, stop: RunStop) -> np.ndarray:
        start = time.perf_counter()
        self.started.set()
        self.release.wait(timeout=10)
        time.sleep(self.seconds)
        with self._lock:
            self.runs.append((start, time.perf_counter(), alone, batch.shape[0]))
            self.threads.append(threading.current_thread().name)
        return batch * 2.0 + 1.0

    def overlapping(self) -> list[tuple[bool, bool]]:
        """(alone, alone) of every two runs that overlapped in time."""
        runs = sorted(self.runs)
        return [
            (a[2], b[2])
            for i, a in enumerate(runs)
            for b in runs[i + 1 :]
            if b[0] < a[1]  # b started before a ended
        ]


def parallel_batcher(
    model: Timeline, runs: int = 2, batch: int = 8, pixels: int | None = None
) -> Batcher:
    batcher = Batcher(
        model,
        model_name="parallel",
        max_batch_size=batch,
        max_batch_pixels=pixels,
        max_queue_delay_s=0.0,
        max_queue_size=256,
        parallel_runs=runs,
    )
    batcher.start()
    return batcher


def test_a_lone_input_runs_alone_and_a_backlog_splits_across_parallel_runs() -> None:
    """Requests from four clients queued behind a run alone: two halves beside each other."""
    model = Timeline(seconds=0.1)
    batcher = parallel_batcher(model)
    try:
        batcher.admit("a", 2)
        batcher.submit(np.zeros((1, 2, 2), np.float32), "a", BatchStats()).result(timeout=5)
        model.release.clear()
        model.started.clear()
        held = batcher.submit(np.zeros((1, 2, 2), np.float32), "a", BatchStats())
        assert model.started.wait(5)  # it runs alone: nothing else was queued
        stats = BatchStats()  # shared, as one request's would be
        backlog = []
        for client in "bcde":
            batcher.admit(client, 1)
            backlog.append(batcher.submit(np.ones((1, 2, 2), np.float32), client, stats))
        time.sleep(0.05)
        assert batcher.depth == 4  # nothing starts beside a run alone
        model.release.set()
        wait([held, *backlog], timeout=5)
        assert [f.result()[0, 0, 0] for f in backlog] == [3.0] * 4
        assert [(alone, size) for _, _, alone, size in sorted(model.runs)] == [
            (True, 1),
            (True, 1),
            (False, 2),  # the idle threads' parts of the bucket
            (False, 2),
        ]
        assert model.overlapping() == [(False, False)]  # the two halves ran at once
        # Both halves carried inputs with these stats; their overlap counts once.
        first, second = sorted(model.runs)[2:]
        assert stats.inputs == 4
        assert stats.inference_s == pytest.approx(max(first[1], second[1]) - first[0], abs=0.005)
        assert stats.inference_s < (first[1] - first[0]) + (second[1] - second[0])
    finally:
        batcher.stop(drain_timeout_s=0)


def most_at_once(runs: list[tuple[float, float, bool, int]]) -> tuple[int, int]:
    """The most runs, and the most inputs, running at one time."""
    events = sorted(
        [(end, -1, -size) for _, end, _, size in runs]
        + [(start, 1, size) for start, _, _, size in runs]
    )
    return (
        int(np.cumsum([step for _, step, _ in events]).max()),
        int(np.cumsum([size for *_, size in events]).max()),
    )


def test_sequential_requests_run_alone_on_one_thread() -> None:
    """onnxruntime keeps per-thread buffers: runs alone never take turns between threads."""
    model = Timeline(seconds=0.002)
    batcher = parallel_batcher(model, runs=3)
    try:
        for n in range(12):
            batcher.admit(n, 1)
            batcher.submit(np.zeros((1, 2, 2), np.float32), n, BatchStats()).result(timeout=5)
            batcher.release(n)
        assert all(alone for *_, alone, _ in model.runs)
        assert len(set(model.threads)) == 1
    finally:
        batcher.stop(drain_timeout_s=0)


def test_one_requests_inputs_run_alone_in_full_batches() -> None:
    """One request's backlog (a slide request's windows) runs on all the threads, batched: a
    single-thread run would leave a core idle behind its last window."""
    model = Timeline(seconds=0.05)
    batcher = parallel_batcher(model, batch=4)
    try:
        batcher.admit("slide", 9)
        model.release.clear()
        held = batcher.submit(np.zeros((1, 2, 2), np.float32), "slide", BatchStats())
        assert model.started.wait(5)
        windows = [
            batcher.submit(np.ones((1, 2, 2), np.float32), "slide", BatchStats()) for _ in range(8)
        ]
        model.release.set()
        wait([held, *windows], timeout=5)
        assert [(alone, size) for *_, alone, size in sorted(model.runs)] == [
            (True, 1),
            (True, 4),
            (True, 4),
        ]
        assert model.overlapping() == []
    finally:
        batcher.stop(drain_timeout_s=0)


def test_parallel_runs_keep_within_the_pixel_budget_together() -> None:
    """``max_batch_pixels`` 4 inputs of 8x8: a backlog of 6 from six clients splits 3 + 1
    beside, then 2, never more than 4 inputs running at once."""
    model = Timeline(seconds=0.1)
    batcher = parallel_batcher(model, batch=8, pixels=4 * 64)
    try:
        batcher.admit("a", 1)
        model.release.clear()
        held = batcher.submit(np.zeros((1, 8, 8), np.float32), "a", BatchStats())
        assert model.started.wait(5)
        backlog = []
        for client in range(6):
            batcher.admit(client, 1)
            backlog.append(batcher.submit(np.ones((1, 8, 8), np.float32), client, BatchStats()))
        model.release.set()
        wait([held, *backlog], timeout=5)
        assert [size for *_, size in sorted(model.runs)][:3] == [1, 3, 1]
        assert most_at_once(model.runs) == (2, 4)
    finally:
        batcher.stop(drain_timeout_s=0)


def test_parallel_runs_never_oversubscribe_under_random_load() -> None:
    """Inputs from several clients at random moments: a run alone never overlaps another, no
    more than ``parallel_runs`` run at once, nor more inputs than the pixel budget, and every
    output is its own input's."""
    model = Timeline(seconds=0.004)
    batcher = parallel_batcher(model, runs=3, batch=2, pixels=4 * 4)  # 4 inputs of 2x2
    errors: list[str] = []

    def client(seed: int) -> None:
        rng = np.random.default_rng(seed)
        for n in range(25):
            owner = (seed, n)
            batcher.admit(owner, 3)
            values = rng.normal(size=int(rng.integers(1, 4))).astype(np.float32)
            futures = [
                batcher.submit(np.full((1, 2, 2), v, np.float32), owner, BatchStats())
                for v in values
            ]
            for value, future in zip(values, futures, strict=True):
                if not np.all(future.result(timeout=10) == value * 2.0 + 1.0):
                    errors.append(f"client {seed}: wrong output")
            batcher.release(owner)
            time.sleep(float(rng.uniform(0, 0.02)))

    try:
        clients = [threading.Thread(target=client, args=(seed,)) for seed in range(6)]
        for thread in clients:
            thread.start()
        for thread in clients:
            thread.join(timeout=30)
        assert not errors
        overlaps = model.overlapping()
        assert overlaps and all(pair == (False, False) for pair in overlaps)
        assert any(alone for _, _, alone, _ in model.runs)
        runs, inputs = most_at_once(model.runs)
        assert runs <= 3 and inputs <= 4
    finally:
        batcher.stop(drain_timeout_s=0)


def test_inference_time_counts_overlapping_runs_once() -> None:
    stats = BatchStats(batch_runs={1: (0.0, 1.0), 2: (0.5, 2.0), 3: (3.0, 4.0), 4: (3.2, 3.5)})
    assert stats.inference_s == pytest.approx(3.0)
