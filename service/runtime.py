"""onnxruntime sessions: provider choice, thread counts, placement check, IO binding on CUDA.

One ``Runtime`` per loaded bundle, used only by that model's batch threads. The provider list is
resolved explicitly: a requested GPU that is absent is an error, or a logged fallback when the
configuration allows it, never a silent change.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from queue import SimpleQueue
from typing import Literal

import numpy as np
import onnxruntime as ort

from service.aligned import aligned_twin, is_aligned, twin_mismatch
from service.batcher import RunStop
from service.config import PROVIDER_NAMES, RuntimeSettings
from service.cuda_graphs import UNCAPTURED, CudaGraphs
from service.heap import RELEASE_PIXELS, Heap, heap

log = logging.getLogger(__name__)

CPU = PROVIDER_NAMES["cpu"]
CUDA = PROVIDER_NAMES["cuda"]

# Nodes that onnxruntime deliberately keeps on the CPU even under CUDA: shape queries and copies.
# Any other node whose outputs are all int64/bool is shape arithmetic (a handful of values, not
# activations) and is exempt too; see ``misplaced_nodes``.
SHAPE_OPS = frozenset(
    {"Shape", "Size", "ConstantOfShape", "Range", "MemcpyToHost", "MemcpyFromHost"}
)
SHAPE_DTYPES = frozenset({"int64", "bool"})


def _pixels(batch: np.ndarray) -> int:
    return batch.shape[0] * batch.shape[2] * batch.shape[3]


class ProviderUnavailableError(RuntimeError):
    """The configured execution providers cannot serve this model on this machine."""


class PlacementError(RuntimeError):
    """Compute nodes of the graph were placed on the CPU under a GPU provider."""


def started_provider(wanted: str, started: list[str], allow_cpu_fallback: bool) -> str:
    """The provider a session runs on, or ``ProviderUnavailableError`` where it quietly fell
    back from the GPU one it was given: onnxruntime-gpu offers CUDA even when the CUDA libraries
    or the GPU are missing, logs that it could not create it, and runs on the CPU (deploy probe:
    a CUDA image without its libraries served on the CPU with fallback off)."""
    if started[0] != wanted and not allow_cpu_fallback:
        raise ProviderUnavailableError(
            f"{wanted} is offered by onnxruntime but the session could not start it (missing "
            "CUDA/cuDNN libraries or no visible GPU: onnxruntime's log above says which); it "
            f"would run on {started[0]} (set allow_cpu_fallback to allow that)"
        )
    return started[0]


def resolve_providers(
    requested: Iterable[str], available: Iterable[str], allow_cpu_fallback: bool
) -> list[str]:
    """Map short names to onnxruntime providers in preference order, keeping the available ones.

    Raises ``ProviderUnavailableError`` when a GPU provider is requested but absent and fallback is
    not allowed, or when nothing usable remains; logs a warning when it falls back.
    """
    available_set = set(available)
    chosen: list[str] = []
    for short in requested:
        if short not in PROVIDER_NAMES:
            raise ProviderUnavailableError(
                f"unknown provider {short!r}; known: {', '.join(PROVIDER_NAMES)}"
            )
        provider = PROVIDER_NAMES[short]
        if provider in available_set:
            chosen.append(provider)
        elif provider != CPU:
            if not allow_cpu_fallback:
                raise ProviderUnavailableError(
                    f"{provider} requested but onnxruntime here offers only "
                    f"{', '.join(sorted(available_set))} (set allow_cpu_fallback to run on CPU)"
                )
            log.warning("%s requested but unavailable; falling back to the next provider", provider)
    if not chosen and allow_cpu_fallback and CPU in available_set:
        log.warning("no requested provider available; falling back to %s", CPU)
        chosen.append(CPU)
    if not chosen:
        raise ProviderUnavailableError(f"none of {list(requested)} is available")
    return chosen


def default_intra_op_threads() -> int:
    """All cores this process may use: the batch threads' runs never use more threads than that
    together, and pre/post-processing overlaps with them only briefly, so spinning is disabled
    instead of reserving a core for it."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def misplaced_nodes(profile_events: list[dict[str, object]], expected_provider: str) -> list[str]:
    """Compute nodes that an onnxruntime profile shows running outside ``expected_provider``.

    The profile (``SessionOptions.enable_profiling``) records, for every kernel run, the node's
    op type, output types and the provider that executed it; shape arithmetic is exempt.
    """
    misplaced: set[str] = set()
    for event in profile_events:
        args = event.get("args")
        if event.get("cat") != "Node" or not isinstance(args, dict) or "provider" not in args:
            continue
        if args["provider"] == expected_provider or _is_shape_arithmetic(args):
            continue
        name = str(event.get("name", "")).removesuffix("_kernel_time")
        misplaced.add(f"{name} ({args.get('op_name')} on {args['provider']})")
    return sorted(misplaced)


def _is_shape_arithmetic(args: dict[str, object]) -> bool:
    if args.get("op_name") in SHAPE_OPS:
        return True
    outputs = args.get("output_type_shape")
    if not isinstance(outputs, list) or not outputs:
        return False
    dtypes = {dtype for output in outputs if isinstance(output, dict) for dtype in output}
    return bool(dtypes) and dtypes <= SHAPE_DTYPES


@dataclass(frozen=True)
class _Sessions:
    """A session of the graph, and one of its aligned twin (service/aligned.py) where there is
    one: the same threads, the twin for inputs whose sides are multiples of ``side``."""

    graph: ort.InferenceSession
    twin: ort.InferenceSession | None = None

    def pick(self, shape: tuple[int, ...], side: int) -> ort.InferenceSession:
        if self.twin is not None and is_aligned(shape, side):
            return self.twin
        return self.graph


class Runtime:
    """onnxruntime sessions for one bundle, fed NCHW batches by its batch threads.

    A run *alone* (nothing else in flight) uses the session with every intra-op thread. On the
    CPU, up to ``parallel_runs`` runs beside each other use sessions with an equal share of the
    threads instead: onnxruntime splits each operator of one forward across its threads and
    waits for the slowest, so two single-thread forwards at once get through more images than
    one two-thread forward after another (docs/engine.md). One session serves every run at once
    when a share is one thread (no thread pool to share); with more, each run has its own, since
    runs at once in one session contend for its pool. On the CPU each of these sessions has an
    aligned twin where ``aligned_side`` is given and the twin pays (service/aligned.py).
    """

    def __init__(
        self,
        model_path: Path,
        input_name: str,
        output_name: str,
        input_dtype: str,
        settings: RuntimeSettings,
        aligned_side: int = 0,
    ) -> None:
        self.input_name = input_name
        self.output_name = output_name
        self.input_dtype = np.dtype(input_dtype)
        self.settings = settings
        self.intra_op_threads = settings.intra_op_threads or default_intra_op_threads()
        providers = resolve_providers(
            settings.providers, ort.get_available_providers(), settings.allow_cpu_fallback
        )
        # Before the session starts its threads, so that they allocate from the one kept heap
        # (the server sets it up before any thread: service/__main__.py).
        self._heap: Heap | None = heap()
        self._session = ort.InferenceSession(
            str(model_path),
            sess_options=self._session_options(profile=False, cpu=providers[0] == CPU),
            providers=[(p, self._provider_options(p, settings.cuda_graphs)) for p in providers],
        )
        self.provider = started_provider(
            providers[0], self._session.get_providers(), settings.allow_cpu_fallback
        )
        self.device: Literal["cpu", "cuda"] = "cuda" if self.provider == CUDA else "cpu"
        self._model_path = model_path
        self._twin_graph: bytes | None = None
        self.aligned_side = 0  # inputs whose sides are multiples of it run in the twin; 0: none
        twin = None
        if self.provider == CPU and aligned_side:
            twin = self._aligned_twin(aligned_side, settings.aligned_twin_max_mib)
        self._alone = _Sessions(self._session, twin)
        # Sessions for runs beside others, one per run that may be in flight (the same one
        # repeated where a share is one thread); none under CUDA.
        self.parallel_runs = 1
        self._beside: SimpleQueue[_Sessions] = SimpleQueue()
        self._beside_sessions = 0  # distinct ones
        if self.provider == CPU:
            self.parallel_runs = max(1, min(settings.parallel_runs, self.intra_op_threads))
        if self.parallel_runs > 1:
            share = self.intra_op_threads // self.parallel_runs
            sessions = [
                self._cpu_sessions(share) for _ in range(1 if share == 1 else self.parallel_runs)
            ]
            self._beside_sessions = len(sessions)
            for index in range(self.parallel_runs):
                self._beside.put(sessions[index % len(sessions)])
        self._twin_graph = None  # made into sessions; kept, a copy of the model (100 MB for B2)
        self._providers = providers
        # Captured graphs keep their buffers: no shrinking, and every other run says uncaptured.
        self._graphs: CudaGraphs | None = None
        if self.provider == CUDA and settings.cuda_graphs:
            self._graphs = CudaGraphs(self._session, input_name, output_name)

    def _aligned_twin(self, side: int, max_mib: int) -> ort.InferenceSession | None:
        """The twin session beside the main one, checked against it; None without one."""
        mib = self._model_path.stat().st_size / (1 << 20)
        if mib > max_mib:
            log.info(
                "%s: %.0f MiB, over aligned_twin_max_mib (%d): no aligned twin",
                self._model_path,
                mib,
                max_mib,
            )
            return None
        graph = aligned_twin(self._model_path, self.input_dtype, side)
        if graph is None:
            log.info(
                "%s: no aligned twin (no upsampling to make constant, or external weights)",
                self._model_path,
            )
            return None
        twin = self._cpu_session(self.intra_op_threads, graph)
        mismatch = twin_mismatch(twin, self._session, self.input_name, self.input_dtype, side)
        if mismatch:
            log.warning("%s: aligned twin not used: %s", self._model_path, mismatch)
            return None
        log.info(
            "%s: inputs with sides in multiples of %d run in its aligned twin",
            self._model_path,
            side,
        )
        self._twin_graph = graph
        self.aligned_side = side
        return twin

    def _cpu_sessions(self, threads: int) -> _Sessions:
        graph = self._cpu_session(threads, str(self._model_path))
        if self._twin_graph is None:
            return _Sessions(graph)
        return _Sessions(graph, self._cpu_session(threads, self._twin_graph))

    def _cpu_session(self, threads: int, model: str | bytes) -> ort.InferenceSession:
        return ort.InferenceSession(
            model,
            sess_options=self._session_options(profile=False, threads=threads),
            providers=[CPU],
        )

    def _session_options(
        self, profile: bool, threads: int = 0, cpu: bool = True
    ) -> ort.SessionOptions:
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or self.intra_op_threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # Spinning threads steal the cores that other requests' decode and labels need, and on
        # shared cores other processes' too; where the cores are the server's, spinning during
        # a run only (it stops when the run ends) makes the forward ~5 % faster (docs/engine.md).
        spinning = "1" if self.settings.intra_op_spinning else "0"
        options.add_session_config_entry("session.intra_op.allow_spinning", spinning)
        options.add_session_config_entry("session.force_spinning_stop", "1")
        # The CPU arena keeps its high-water mark for good and fragments; without it freed buffers
        # go back to the heap, which keeps them between runs and gives them back after a burst of
        # big batches (service/heap.py).
        options.enable_cpu_mem_arena = False
        # Nor one block per input shape (onnxruntime's memory pattern) on the CPU: that block is
        # the sum of the forward's activations (93 MB for the aligned twin of B0 at 512x512, more
        # for bigger inputs), over what the heap keeps, so it was mapped afresh and page-faulted
        # every run (~22000 faults, 95 instead of 70 ms); tensor by tensor, the heap reuses them.
        options.enable_mem_pattern = not cpu
        options.enable_profiling = profile
        if profile:  # the profile is written next to this prefix; keep it out of the cwd
            options.profile_file_prefix = str(Path(tempfile.gettempdir()) / "segserve_placement")
        return options

    def _provider_options(self, provider: str, cuda_graph: bool = False) -> dict[str, str]:
        if provider != CUDA:
            return {}
        options = {
            "arena_extend_strategy": "kSameAsRequested",
            "cudnn_conv_algo_search": "HEURISTIC",
        }
        if cuda_graph:
            options["enable_cuda_graph"] = "1"
        if self.settings.gpu_mem_limit_bytes:
            options["gpu_mem_limit"] = str(self.settings.gpu_mem_limit_bytes)
        return options

    def run(self, batch: np.ndarray, alone: bool = True, stop: RunStop | None = None) -> np.ndarray:
        """Logits (N, C, h, w) float32 on the host for an (N, 3, H, W) batch in the bundle's
        input dtype; ``alone=False`` for a run beside others (one thread's share on the CPU);
        ``stop`` ends the run early (onnxruntime raises) when the batcher says so."""
        count = batch.shape[0]
        batch, run_options = self._prepare(batch, stop)
        with self._session_for(alone, batch.shape) as session:
            if self.provider == CUDA:
                binding, _ = self._run_bound(session, batch, run_options)
                output = np.asarray(binding.copy_outputs_to_cpu()[0])[:count]  # a graph pads
            else:
                inputs = {self.input_name: batch}
                output = session.run([self.output_name], inputs, run_options)[0]
        self._ran(batch)
        return output if output.dtype == np.float32 else output.astype(np.float32)

    def run_on_device(
        self, batch: np.ndarray, alone: bool = True, stop: RunStop | None = None
    ) -> ort.OrtValue:
        """Logits (N, C, h, w) in the graph's output dtype, left in the session's device memory
        (``device``) for post-processing there (``service/device_postprocess.py``)."""
        batch, run_options = self._prepare(batch, stop)
        with self._session_for(alone, batch.shape) as session:
            binding, captured = self._run_bound(session, batch, run_options)
        self._ran(batch)
        output = binding.get_outputs()[0]
        if captured:  # the graph's own buffer, which its next replay overwrites
            assert self._graphs is not None and self._graphs.copy is not None
            output = self._graphs.copy(output)
        return output

    def capture_cuda_graphs(self, shapes: list[tuple[int, ...]]) -> None:
        """Capture a CUDA graph per (N, 3, H, W) input shape (``cuda_graphs`` setting; see
        ``service/cuda_graphs.py``); logged and skipped when the model is not on CUDA."""
        if self._graphs is None:
            log.warning("cuda_graphs is set but the model runs on %s: none captured", self.provider)
            return
        self._graphs.capture(shapes, self.input_dtype)

    def postprocess_providers(self) -> list[tuple[str, dict[str, str]]]:
        """The provider (and options) this session runs on, for post-processing sessions that
        must read its outputs where they are."""
        return [(self.provider, self._provider_options(self.provider))]

    def _prepare(
        self, batch: np.ndarray, stop: RunStop | None = None
    ) -> tuple[np.ndarray, ort.RunOptions]:
        """The batch in the input dtype, and the run's own options: uncaptured under CUDA graphs,
        the arena shrunk after a big GPU run (only the GPU has one: the CPU arena is off, see
        _session_options, and the heap keeps freed activations, service/heap.py), and the
        ``terminate`` flag ``stop`` sets (one run's: a shared flag would stop every run)."""
        if batch.dtype != self.input_dtype:
            batch = batch.astype(self.input_dtype)
        options = ort.RunOptions()
        if self._graphs is not None:  # captured graphs keep their buffers: no shrinking
            options.add_run_config_entry("gpu_graph_id", UNCAPTURED)
        elif self.provider == CUDA and _pixels(batch) > RELEASE_PIXELS:
            options.add_run_config_entry("memory.enable_memory_arena_shrinkage", "gpu:0")
        if stop is not None:
            stop.on_stop(partial(setattr, options, "terminate", True))
        return batch, options

    def _ran(self, batch: np.ndarray) -> None:
        """Tell the heap (service/heap.py) that a run of ``batch`` ended."""
        if self._heap is not None:
            self._heap.ran(_pixels(batch))

    def warm_up(self, sample: np.ndarray) -> None:
        """Run ``sample`` once in every session, so that no request pays a session's first run;
        grown by edge pixels to the sides each session serves where there is an aligned twin."""
        samples = [sample]
        if self.aligned_side:
            side = self.aligned_side
            height, width = sample.shape[-2:]
            aligned = (-height % side, -width % side)
            samples = [_grown(sample, *aligned), _grown(sample, aligned[0] + 1, aligned[1] + 1)]
        for each in samples:
            self.run(each)
            for _ in range(self._beside_sessions):  # the queue hands each distinct one in turn
                self.run(each, alone=False)

    @contextmanager
    def _session_for(self, alone: bool, shape: tuple[int, ...]) -> Iterator[ort.InferenceSession]:
        if alone or self.parallel_runs == 1:
            yield self._alone.pick(shape, self.aligned_side)
            return
        sessions = self._beside.get_nowait()  # never empty: at most parallel_runs runs beside
        try:
            yield sessions.pick(shape, self.aligned_side)
        finally:
            self._beside.put(sessions)

    def _run_bound(
        self, session: ort.InferenceSession, batch: np.ndarray, run_options: ort.RunOptions | None
    ) -> tuple[ort.IOBinding, bool]:
        """IO binding: the batch is copied to the device once and the logits are allocated there
        by onnxruntime (no staging buffers), or a captured graph is replayed (then True); the
        caller copies the logits back or leaves them."""
        if self._graphs is not None:
            replayed = self._graphs.run(batch)
            if replayed is not None:
                return replayed, True
        binding = session.io_binding()
        if self.device == "cuda":
            device_input = ort.OrtValue.ortvalue_from_numpy(batch, "cuda", 0)
            binding.bind_ortvalue_input(self.input_name, device_input)
        else:
            binding.bind_cpu_input(self.input_name, batch)
        binding.bind_output(self.output_name, self.device, 0)
        session.run_with_iobinding(binding, run_options)
        return binding, False

    def node_placements(self, sample: np.ndarray) -> list[dict[str, object]]:
        """Profile events of one run of ``sample`` in a profiling twin of the session."""
        session = ort.InferenceSession(
            str(self._model_path),
            sess_options=self._session_options(profile=True, cpu=self.provider == CPU),
            providers=[(p, self._provider_options(p)) for p in self._providers],
        )
        session.run([self.output_name], {self.input_name: sample.astype(self.input_dtype)})
        profile_path = Path(session.end_profiling())
        try:
            events: list[dict[str, object]] = json.loads(profile_path.read_text(encoding="utf-8"))
        finally:
            profile_path.unlink(missing_ok=True)
        return events

    def check_placement(self, sample: np.ndarray) -> list[str]:
        """Compute nodes placed off the session's provider when running ``sample``.

        Under CUDA a non-empty answer raises ``PlacementError`` unless ``allow_cpu_nodes``.
        """
        misplaced = misplaced_nodes(self.node_placements(sample), self.provider)
        if misplaced and self.provider == CUDA:
            message = f"{len(misplaced)} compute nodes run on the CPU: {', '.join(misplaced[:10])}"
            if not self.settings.allow_cpu_nodes:
                raise PlacementError(message)
            log.warning("%s (allowed by configuration)", message)
        return misplaced


def _grown(batch: np.ndarray, rows: int, columns: int) -> np.ndarray:
    """``batch`` with ``rows`` and ``columns`` of edge pixels appended at the bottom and right."""
    return np.pad(batch, ((0, 0), (0, 0), (0, rows), (0, columns)), mode="edge")
