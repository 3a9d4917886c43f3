"""The batch queue of one model: bounded, grouped by input shape, drained by its batch threads.

Requests submit single model inputs (a window or a whole image, CHW) and get a
``concurrent.futures.Future`` per input. Inputs of several requests share a batch; one request's
inputs may span several batches. A request first reserves queue places (``admit``), which is
where a full queue refuses it; ``release`` (or cancelling a future) drops its inputs that have not
run yet, and stops a running batch that no other request waits for (``RunStop``: onnxruntime's
terminate flag, so a timed-out request's forward does not run on holding the cores and memory).

Invariant (continuous batching, oldest first): whenever a batch thread is free it takes the
oldest queued input and up to ``max_batch_size - 1`` more of the same shape, in arrival order (fewer
for big inputs: at most ``max_batch_pixels`` pixels in all, at least one input), and runs them.
With ``max_queue_delay_s = 0`` (the default) an idle server therefore adds no queue delay, and a
busy one batches what arrived while the previous batch ran. A positive delay lets the
oldest input wait up to that long for its batch to fill; meanwhile a full batch of another shape
may go first, but never once the oldest input has waited the delay. So no input waits longer than
the delay, plus the batch running when that delay ran out, plus the runs of the inputs that
arrived before it: one shape's steady load cannot starve another.

Parallel runs (``parallel_runs`` > 1, the CPU): that many threads take batches by this rule. A
batch that starts with no other in flight runs *alone*, on every intra-op thread, and no other
starts until it ends, unless two or more requests are in flight and more is queued behind it:
then it, and every batch that starts while another runs, runs *beside* the others on a share of
the threads (``runtime.Runtime``), and leaves the idle threads their part of its bucket. So the
cores are never oversubscribed; under load from several requests, several forwards at once get
through more images than one after another on all the cores; and one request's inputs (a lone
image, a slide request's windows) run on all the cores, where single-thread runs would leave one
idle behind the last of them. Only the first thread starts a batch while none runs, so runs
alone always have the same calling thread: onnxruntime keeps per-thread buffers, and threads
taking turns at sequential requests held ~200 MB more and ran slower (docs/engine.md).
``max_batch_pixels`` bounds the pixels of all the batches running at once, so parallel runs do
not add to onnxruntime's working memory: a batch that would pass it waits for a run to end (a
first batch always has at least one input).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Hashable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np

from service import metrics
from service.errors import OverloadedError

log = logging.getLogger(__name__)

ShapeKey = tuple[int, ...]


@dataclass
class BatchStats:
    """Where a request's inputs spent their time (filled in by the batch threads)."""

    queue_wait_s: float = 0.0  # summed over the request's inputs
    inputs: int = 0
    # batch id -> (start, end) of its run
    batch_runs: dict[int, tuple[float, float]] = field(default_factory=dict)

    @property
    def inference_s(self) -> float:
        """Wall time during which a batch carrying this request's inputs ran: parallel runs
        overlap, so each instant is counted once."""
        total, reached = 0.0, float("-inf")
        for start, end in sorted(self.batch_runs.values()):
            total += max(0.0, end - max(start, reached))
            reached = max(reached, end)
        return total


@dataclass
class _Item:
    tensor: np.ndarray
    owner: Hashable
    stats: BatchStats
    future: Future[Any]  # an output row, or a device_postprocess.DeviceTensor
    enqueued_at: float


class RunStop:
    """Stops one batch's run from another thread once no request waits for its outputs (they
    all ended: timed out, or their clients left). The runtime says how when the run starts
    (onnxruntime: ``RunOptions.terminate``, checked between nodes); a run stopped before that
    is stopped as soon as it says."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._how: Callable[[], None] | None = None
        self.stopped = False

    def on_stop(self, how: Callable[[], None]) -> None:
        with self._lock:
            self._how = how
            if self.stopped:
                how()

    def stop(self) -> None:
        with self._lock:
            self.stopped = True
            if self._how is not None:
                self._how()


class _Batch(NamedTuple):
    items: list[_Item]
    id: int
    alone: bool  # on every intra-op thread, nothing beside it
    pixels: int  # input pixels, counted against max_batch_pixels while it runs


class Batcher:
    """Bounded multi-request batch queue in front of ``run_batch(batch, alone, stop)``, called
    from ``parallel_runs`` threads."""

    def __init__(
        self,
        run_batch: Callable[[np.ndarray, bool, RunStop], Any],  # outputs per input (N, ...)
        *,
        model_name: str,
        max_batch_size: int,
        max_batch_pixels: int | None = None,
        max_queue_delay_s: float,
        max_queue_size: int,
        parallel_runs: int = 1,
    ) -> None:
        if min(max_batch_size, max_queue_size, parallel_runs) < 1 or max_queue_delay_s < 0:
            raise ValueError(
                "batch size, queue size and parallel runs must be positive, delay non-negative"
            )
        self._run_batch = run_batch
        self.parallel_runs = parallel_runs
        self._model = model_name
        self.max_batch_size = max_batch_size
        self.max_batch_pixels = max_batch_pixels
        self.max_queue_delay_s = max_queue_delay_s
        self.max_queue_size = max_queue_size
        self._buckets: OrderedDict[ShapeKey, deque[_Item]] = OrderedDict()
        self._depth = 0
        self._reserved = 0
        self._reservations: dict[Hashable, int] = {}
        self._condition = threading.Condition()
        self._accepting = False
        self._running = False
        self._threads: list[threading.Thread] = []
        self._batch_counter = 0
        self._runs = 0  # batches running
        self._running_pixels = 0  # their input pixels
        self._alone = False  # one of them runs alone
        # batch id -> the requests still waiting for it, and how to stop it once none is
        self._waiting_for: dict[int, tuple[set[Hashable], RunStop]] = {}

    @property
    def depth(self) -> int:
        """Inputs waiting to run."""
        return self._depth

    def start(self) -> None:
        with self._condition:
            if self._threads:
                return
            self._accepting = True
            self._running = True
            self._threads = [
                threading.Thread(
                    target=self._loop,
                    args=(n == 0,),
                    name=f"batcher-{self._model}-{n}",
                    daemon=True,
                )
                for n in range(self.parallel_runs)
            ]
            for thread in self._threads:
                thread.start()

    def admit(self, owner: Hashable, slots: int) -> None:
        """Reserve ``slots`` queue places for a request, or refuse it with ``OverloadedError``.

        A request never has more inputs queued or running than it reserved, so the queue never
        holds more than ``max_queue_size`` inputs.
        """
        with self._condition:
            if not self._accepting:
                raise OverloadedError(
                    f"model {self._model!r} is shutting down", "draining", retry_after_s=5.0
                )
            if self._reserved + slots > self.max_queue_size:
                raise OverloadedError(
                    f"model {self._model!r} queue is full ({self._depth} inputs waiting)",
                    "queue_full",
                )
            self._reservations[owner] = self._reservations.get(owner, 0) + slots
            self._reserved += slots

    def submit(self, tensor: np.ndarray, owner: Hashable, stats: BatchStats) -> Future[Any]:
        """Queue one input of an admitted request; the future resolves to its output."""
        with self._condition:
            if not self._running:
                raise OverloadedError(
                    f"model {self._model!r} has stopped", "stopped", retry_after_s=5.0
                )
            if owner not in self._reservations:
                raise RuntimeError("submit before admit")
            future: Future[Any] = Future()
            item = _Item(tensor, owner, stats, future, time.perf_counter())
            self._buckets.setdefault(tuple(tensor.shape), deque()).append(item)
            self._depth += 1
            metrics.QUEUE_DEPTH.labels(self._model).set(self._depth)
            self._condition.notify_all()  # the batch threads and a draining stop() all wait
        return future

    def release(self, owner: Hashable) -> int:
        """End a request: drop its queued inputs, free its reservation, stop a running batch that
        no other request waits for; returns inputs dropped."""
        dropped = 0
        with self._condition:
            for owners, stop in self._waiting_for.values():
                owners.discard(owner)
                if not owners:
                    stop.stop()
            for key in list(self._buckets):
                bucket = self._buckets[key]
                kept = deque(item for item in bucket if item.owner != owner)
                for item in bucket:
                    if item.owner == owner:
                        item.future.cancel()
                        dropped += 1
                if kept:
                    self._buckets[key] = kept
                else:
                    del self._buckets[key]
            self._depth -= dropped
            self._reserved -= self._reservations.pop(owner, 0)
            metrics.QUEUE_DEPTH.labels(self._model).set(self._depth)
            self._condition.notify_all()
        return dropped

    def stop(self, drain_timeout_s: float = 10.0) -> None:
        """Refuse new requests, let admitted ones finish for up to ``drain_timeout_s``, then
        cancel what is still queued and join the thread."""
        with self._condition:
            self._accepting = False
            self._condition.notify_all()
        deadline = time.monotonic() + drain_timeout_s
        with self._condition:
            while (self._depth or self._reservations) and time.monotonic() < deadline:
                self._condition.wait(timeout=min(0.05, max(0.0, deadline - time.monotonic())))
            for bucket in self._buckets.values():
                for item in bucket:
                    item.future.cancel()
            self._buckets.clear()
            self._depth = 0
            self._reservations.clear()
            self._reserved = 0
            metrics.QUEUE_DEPTH.labels(self._model).set(0)
            self._running = False
            self._condition.notify_all()
        for thread in self._threads:
            thread.join()
        self._threads = []

    def _batch_size(self, key: ShapeKey) -> int:
        """Inputs of shape ``key`` (C, H, W) per batch: ``max_batch_size``, fewer where their
        pixels would pass ``max_batch_pixels``, at least one."""
        if self.max_batch_pixels is None:
            return self.max_batch_size
        pixels = math.prod(key[-2:])
        return max(1, min(self.max_batch_size, self.max_batch_pixels // pixels))

    def _next_batch(self, primary: bool) -> _Batch | None:
        """Under the lock: wait for a runnable batch (see the module invariant) and count it as
        running; ``None`` once stopped. Only the ``primary`` thread starts one while none runs."""
        while True:
            if not self._running:
                return None
            if not self._buckets or self._alone or not (primary or self._runs):
                self._condition.wait()
                continue
            oldest_key = min(self._buckets, key=lambda k: self._buckets[k][0].enqueued_at)
            waited = time.perf_counter() - self._buckets[oldest_key][0].enqueued_at
            if waited >= self.max_queue_delay_s or not self._accepting:
                key = oldest_key
            else:
                full = [k for k, b in self._buckets.items() if len(b) >= self._batch_size(k)]
                if not full:
                    self._condition.wait(timeout=self.max_queue_delay_s - waited)
                    continue
                key = min(full, key=lambda k: self._buckets[k][0].enqueued_at)
            bucket = self._buckets[key]
            # Runs beside others only under load from several requests (see the module doc).
            loaded = self.parallel_runs > 1 and len(self._reservations) > 1
            size = min(self._batch_size(key), len(bucket))
            if loaded:  # leave the idle threads (this one included) their part
                size = min(size, -(-len(bucket) // (self.parallel_runs - self._runs)))
            pixels = math.prod(key[-2:])
            if self._runs and self.max_batch_pixels is not None:
                size = min(size, (self.max_batch_pixels - self._running_pixels) // pixels)
            if size == 0:  # no room beside the batches running: wait for one to end
                self._condition.wait()
                continue
            items = [bucket.popleft() for _ in range(size)]
            if not bucket:
                del self._buckets[key]
            self._depth -= size
            metrics.QUEUE_DEPTH.labels(self._model).set(self._depth)
            self._alone = self._runs == 0 and (self._depth == 0 or not loaded)
            self._runs += 1
            self._running_pixels += size * pixels
            self._batch_counter += 1
            self._condition.notify_all()
            return _Batch(items, self._batch_counter, self._alone, size * pixels)

    def _loop(self, primary: bool) -> None:
        while True:
            with self._condition:
                batch = self._next_batch(primary)
            if batch is None:
                return
            try:
                # Claim the futures; ones cancelled meanwhile (request gone) are skipped.
                live = [item for item in batch.items if item.future.set_running_or_notify_cancel()]
                if live:
                    self._execute(live, batch.id, batch.alone)
            finally:
                with self._condition:
                    self._runs -= 1
                    self._running_pixels -= batch.pixels
                    self._alone = False  # a batch alone was the only one running
                    self._condition.notify_all()

    def _execute(self, items: list[_Item], batch_id: int, alone: bool) -> None:
        started = time.perf_counter()
        with self._condition:  # a request's inputs may be in batches running at once
            for item in items:
                wait = started - item.enqueued_at
                item.stats.queue_wait_s += wait
                item.stats.inputs += 1
                metrics.QUEUE_WAIT.labels(self._model).observe(wait)
            stop = RunStop()
            waiting = {item.owner for item in items if item.owner in self._reservations}
            self._waiting_for[batch_id] = (waiting, stop)
            if not waiting:  # released between being taken and now
                stop.stop()
        metrics.BATCH_SIZE.labels(self._model).observe(len(items))
        if not alone:
            metrics.RUNS_BESIDE.labels(self._model).inc()
        try:
            outputs = self._run_batch(np.stack([item.tensor for item in items]), alone, stop)
        except Exception as exc:
            if stop.stopped:  # every request it ran for had ended: nobody reads the error
                log.info("batch of %d inputs stopped: no request waits for it", len(items))
            else:
                log.exception("batch of %d inputs failed", len(items))
            for item in items:
                item.future.set_exception(exc)
            return
        finally:
            with self._condition:
                del self._waiting_for[batch_id]
        ended = time.perf_counter()
        with self._condition:
            for item in items:
                item.stats.batch_runs[batch_id] = (started, ended)
        for index, item in enumerate(items):
            item.future.set_result(outputs[index])
