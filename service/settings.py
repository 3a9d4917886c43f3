"""Server configuration from ``SEGSERVE_*`` environment variables (pydantic-settings).

One object, read once at start-up, so every limit the server enforces is visible in one place.
Engine defaults are written once, in ``service/config.py``; ``EngineConfig.from_settings`` turns
these settings into an engine's configuration. Per-model overrides are a JSON object keyed by
bundle name, e.g. ``SEGSERVE_PER_MODEL='{"segformer-b5": {"max_batch_size": 2}}'``.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from service.config import ENGINE_SETTINGS, PROVIDERS, EngineConfig, Limits, RuntimeSettings

_ENGINE = EngineConfig()
_LIMITS = Limits()
_RUNTIME = RuntimeSettings()


class Settings(BaseSettings):
    """Everything the server can be told; defaults suit a single CPU or GPU box."""

    # Errors leave the values out: a refused key or store URL would otherwise reach the log.
    model_config = SettingsConfigDict(
        env_prefix="SEGSERVE_", extra="ignore", frozen=True, hide_input_in_errors=True
    )

    model_repository: Path = Path("model_repository")
    default_model: str | None = None
    # session (service/runtime.py)
    providers: Annotated[tuple[str, ...], NoDecode] = _RUNTIME.providers
    allow_cpu_fallback: bool = _RUNTIME.allow_cpu_fallback
    intra_op_threads: int = Field(default=_RUNTIME.intra_op_threads, ge=0)
    intra_op_spinning: bool = _RUNTIME.intra_op_spinning
    parallel_runs: int = Field(default=_RUNTIME.parallel_runs, ge=1)
    aligned_twin_max_mib: int = Field(default=_RUNTIME.aligned_twin_max_mib, ge=0)
    allow_cpu_nodes: bool = _RUNTIME.allow_cpu_nodes
    gpu_mem_limit_bytes: int = Field(default=_RUNTIME.gpu_mem_limit_bytes, ge=0)
    cuda_graphs: bool = _RUNTIME.cuda_graphs
    # batching (service/batcher.py)
    max_batch_size: int = Field(default=_ENGINE.max_batch_size, ge=1)
    max_batch_pixels: int = Field(default=_ENGINE.max_batch_pixels, ge=1)
    max_queue_delay_ms: float = Field(default=_ENGINE.max_queue_delay_ms, ge=0)
    max_queue_size: int = Field(default=_ENGINE.max_queue_size, ge=1)
    max_inputs_in_flight: int = Field(default=_ENGINE.max_inputs_in_flight, ge=0)
    inference_timeout_s: float = Field(default=_ENGINE.inference_timeout_s, gt=0)
    postprocess: Literal["auto", "host", "device"] = _ENGINE.postprocess
    # request limits (checked in service/planning.py, except the upload size)
    max_upload_bytes: int = Field(default=20 * 1024 * 1024, ge=1)
    max_pixels: int = Field(default=_LIMITS.max_pixels, ge=1)
    max_scales: int = Field(default=_LIMITS.max_scales, ge=1)
    max_scale_ratio: float = Field(default=_LIMITS.max_scale_ratio, gt=0)
    max_crop: int = Field(default=_LIMITS.max_crop, ge=1)
    max_input_pixels: int = Field(default=_LIMITS.max_input_pixels, ge=1)
    max_tta_inputs: int = Field(default=_LIMITS.max_tta_inputs, ge=1)
    max_inputs_per_request: int = Field(default=_LIMITS.max_inputs_per_request, ge=1)
    max_request_bytes: int = Field(default=_LIMITS.max_request_bytes, ge=1)
    # HTTP admission (service/http/admission.py, uploads.py; uvicorn in __main__.py)
    max_inflight_bytes: int = Field(default=4 << 30, ge=1)
    body_timeout_s: float = Field(default=60.0, gt=0)
    # Seconds a client has to take its answer (service/http/delivery.py); disconnected after.
    answer_timeout_s: float = Field(default=60.0, gt=0)
    # Requests in progress at once, probes not counted (service/http/connections.py).
    max_connections: int = Field(default=64, ge=1)
    # Seconds a connection has to send each request's head (headers), from its opening or its
    # previous answer; closed otherwise.
    head_timeout_s: float = Field(default=10.0, gt=0)
    # HTTP, store, shutdown
    api_key: SecretStr | None = None
    # Fail closed: with this set, a missing or empty key stops the server at start-up instead of
    # silently serving without authentication (service/http/auth.py).
    require_api_key: bool = False
    # Browser origins allowed to call the API cross-origin (comma list); others get 403.
    cors_origins: Annotated[tuple[str, ...], NoDecode] = ()
    mask_store: str = "memory"
    # Redis password for a mask store URL without one (kept out of the URL, e.g. from a Secret).
    mask_store_password: SecretStr | None = None
    mask_store_max_bytes: int = Field(default=256 * 1024 * 1024, ge=1)
    mask_ttl_s: float = Field(default=3600.0, gt=0)
    drain_timeout_s: float = Field(default=30.0, ge=0)
    # After SIGTERM keep the listener open and answering 503 at least this long, so load
    # balancers see the replica leave before connections are refused (like a preStop sleep).
    drain_min_s: float = Field(default=0.0, ge=0)
    worker_threads: int = Field(default=4, ge=1)
    per_model: dict[str, dict[str, Any]] = Field(default_factory=dict)

    @field_validator("providers", mode="before")
    @classmethod
    def _split_providers(cls, value: object) -> object:
        """Accept ``cuda,cpu`` from the environment as well as a sequence."""
        if isinstance(value, str):
            value = [part.strip().lower() for part in value.split(",") if part.strip()]
        return value

    @field_validator("providers")
    @classmethod
    def _known_providers(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        unknown = [p for p in value if p not in PROVIDERS]
        if unknown or not value:
            raise ValueError(f"providers must be a non-empty subset of {PROVIDERS}, got {value}")
        return value

    @field_validator("api_key", "mask_store_password", mode="before")
    @classmethod
    def _empty_secret_is_none(cls, value: object) -> object:
        """Surrounding whitespace (the newline of a key file) dropped; empty means none."""
        if isinstance(value, str):
            value = value.strip() or None
        return value

    @field_validator("api_key")
    @classmethod
    def _sendable_key(cls, value: SecretStr | None) -> SecretStr | None:
        """Clients send the key in a header, which carries printable ASCII: any other character
        is read differently by clients, browsers and the server, so no call would match."""
        if value is not None and not re.fullmatch(r"[\x20-\x7e]+", value.get_secret_value()):
            raise ValueError(
                "api_key must be printable ASCII (clients send it in the X-API-Key header); "
                "the key given has other characters"
            )
        return value

    @field_validator("cors_origins", mode="before")
    @classmethod
    def _split_origins(cls, value: object) -> object:
        """``https://a.example,https://b.example`` from the environment, as exact origins."""
        if isinstance(value, str):
            value = [part.strip().rstrip("/") for part in value.split(",") if part.strip()]
        return value

    @field_validator("cors_origins")
    @classmethod
    def _exact_origins(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        malformed = [o for o in value if not re.fullmatch(r"https?://[^/\s*]+", o)]
        if malformed:
            raise ValueError(
                f"cors_origins must be scheme://host[:port] origins (no paths, no '*'), "
                f"got {malformed}"
            )
        return value

    @field_validator("per_model")
    @classmethod
    def _known_engine_settings(cls, value: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        for model, overrides in value.items():
            unknown = sorted(set(overrides) - ENGINE_SETTINGS)
            if unknown:
                raise ValueError(
                    f"per_model[{model!r}] names unknown engine settings {unknown}; "
                    f"known: {sorted(ENGINE_SETTINGS)}"
                )
        return value

    def engine_config(self, model: str | None = None) -> EngineConfig:
        """The configuration of ``model``'s engine: these settings plus its overrides."""
        return EngineConfig.from_settings(self, self.per_model.get(model or "", {}))
