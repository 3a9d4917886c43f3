"""What an engine is configured with, and the one path from ``Settings`` to it.

Every engine default is written once, here; ``Settings`` reads its defaults from these classes,
and ``EngineConfig.from_settings`` is the only translation from the environment to an engine
(per-model overrides included). No onnxruntime import: settings and planning stay light.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from service.settings import Settings

# Short provider names, in the default preference order, and onnxruntime's names for them.
PROVIDER_NAMES = {"cuda": "CUDAExecutionProvider", "cpu": "CPUExecutionProvider"}
PROVIDERS = tuple(PROVIDER_NAMES)


@dataclass(frozen=True)
class RuntimeSettings:
    """How one onnxruntime session is made (``service/runtime.py``)."""

    providers: tuple[str, ...] = PROVIDERS  # preference order; absent GPUs skipped if allowed
    allow_cpu_fallback: bool = True  # False: a requested GPU that is absent fails the load
    intra_op_threads: int = 0  # 0: every core this process may use
    # onnxruntime's threads spin between a run's parallel steps, and stop when it ends: ~5 %
    # faster forwards on cores the server has to itself, much slower ones on shared cores.
    intra_op_spinning: bool = False
    # CPU: forwards that may run at once under load from several requests, each on an equal
    # share of the intra-op threads; otherwise one runs at a time on all of them (batcher.py).
    parallel_runs: int = 2
    # CPU: a twin of the graph with its upsamplings at constant scales serves inputs whose sides
    # are multiples of the model's stride (service/aligned.py), for model files up to this size.
    # It doubles the CPU sessions' memory (~3x the file): B0 (14 MB) +48 MiB for a forward ~12 %
    # faster, B2 (100 MB) +340 MiB for ~9 %, B5 (330 MB) ~+1 GiB for ~3 %. 0: no twin.
    aligned_twin_max_mib: int = 128
    # Under CUDA, accept a graph whose compute nodes run on the CPU (logged) instead of failing.
    allow_cpu_nodes: bool = False
    gpu_mem_limit_bytes: int = 0  # CUDA arena cap (0: onnxruntime's default, the whole GPU)
    # Under CUDA, capture a graph per fixed input shape (service/cuda_graphs.py); never yet run.
    cuda_graphs: bool = False


@dataclass(frozen=True)
class Limits:
    """What one request may ask for; checked in one place, ``planning.plan_request``."""

    max_pixels: int = 40_000_000  # the image, and each rescaled pass
    max_scales: int = 8  # TTA ratios per request
    max_scale_ratio: float = 4.0  # largest TTA ratio
    max_crop: int = 2048  # slide window side
    # One model input's pixels (a whole-mode pass, a slide window): onnxruntime's working memory
    # grows with it, ~470 bytes a pixel for SegFormer-B0 on the CPU (1.9 GB at 2048x2048, not in
    # peak_bytes), so a 12 MP photo at scale 1 in whole mode is refused: slide mode takes it.
    max_input_pixels: int = 2048 * 2048
    max_tta_inputs: int = 64  # passes (scales x flips) per request
    max_inputs_per_request: int = 1024  # model inputs (windows x passes) per request
    # Estimated peak memory of one request (planning.peak_bytes): image, logits, class planes.
    max_request_bytes: int = 2 << 30


@dataclass(frozen=True)
class EngineConfig:
    """One engine's batching, timing, limits and session options."""

    max_batch_size: int = 8
    # Model-input pixels per run (at least one input): onnxruntime's working memory grows with
    # them, ~200 MB per 1024x1024 window for SegFormer-B0, so big windows batch fewer at a time.
    max_batch_pixels: int = 4 << 20
    max_queue_delay_ms: float = 0.0  # 0: continuous batching (see service/batcher.py)
    max_queue_size: int = 256  # inputs waiting; beyond -> OverloadedError
    inference_timeout_s: float = 60.0
    # Inputs one request may have queued, running or being merged at once (0: 2 x batch size),
    # at most max_queue_size.
    max_inputs_in_flight: int = 0
    # Where resize/merge/argmax run: "device" as ONNX graphs on the model's provider (logits
    # stay on the GPU), "host" in NumPy/Numba on the CPU, "auto" device under CUDA, host on CPU.
    postprocess: Literal["auto", "host", "device"] = "auto"
    limits: Limits = field(default_factory=Limits)
    runtime: RuntimeSettings = field(default_factory=RuntimeSettings)

    @classmethod
    def from_settings(
        cls, settings: Settings, overrides: Mapping[str, Any] | None = None
    ) -> EngineConfig:
        """The engine configuration ``settings`` describe, with per-model ``overrides`` (keys
        are setting names, e.g. ``max_batch_size``) applied on top."""
        values = settings.model_dump()
        unknown = sorted(set(overrides or {}) - set(ENGINE_SETTINGS))
        if unknown:
            raise ValueError(
                f"per-model settings name unknown engine settings {unknown}; "
                f"known: {sorted(ENGINE_SETTINGS)}"
            )
        values.update(overrides or {})

        def pick(kind: type) -> dict[str, Any]:
            return {f.name: values[f.name] for f in fields(kind) if f.name in values}

        runtime = pick(RuntimeSettings)
        runtime["providers"] = tuple(runtime["providers"])
        return cls(
            **{k: v for k, v in pick(cls).items() if k not in ("limits", "runtime")},
            limits=Limits(**pick(Limits)),
            runtime=RuntimeSettings(**runtime),
        )


# Settings that configure an engine (and may be overridden per model).
ENGINE_SETTINGS = frozenset(
    f.name
    for kind in (EngineConfig, Limits, RuntimeSettings)
    for f in fields(kind)
    if f.name not in ("limits", "runtime")
)
