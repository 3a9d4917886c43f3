"""Every bundle of a model repository, each behind its own engine, and one readiness state.

The state is the single answer to "can this replica serve models?": ``loading`` until every
bundle is loaded and warm (and the default model exists), then ``ready``; ``failed`` with the
reason when loading failed; ``stopped`` once ``stop`` began.
"""

from __future__ import annotations

import enum
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from service.bundle import BundleError, discover_bundles, load_bundle
from service.config import EngineConfig
from service.engine import Engine
from service.errors import OverloadedError, UnknownModelError
from service.settings import Settings


class ModelsState(enum.Enum):
    LOADING = "loading"
    READY = "ready"
    FAILED = "failed"
    STOPPED = "stopped"


class ModelManager:
    """Loads, serves and stops the engines of one repository."""

    def __init__(
        self,
        repository: Path,
        config: EngineConfig,
        per_model: dict[str, EngineConfig] | None = None,
        default_model: str | None = None,
    ) -> None:
        self.repository = Path(repository)
        self.config = config
        self.per_model = dict(per_model or {})
        self.default_name = default_model
        self.state = ModelsState.LOADING
        self.failure: str | None = None
        self._engines: dict[str, Engine] = {}

    @classmethod
    def from_settings(cls, settings: Settings) -> ModelManager:
        return cls(
            settings.model_repository,
            settings.engine_config(),
            {name: settings.engine_config(name) for name in settings.per_model},
            settings.default_model,
        )

    @property
    def ready(self) -> bool:
        return self.state is ModelsState.READY

    def require_ready(self) -> None:
        """Raise the retryable error a request gets while models are not servable."""
        if self.state is ModelsState.READY:
            return
        reason = self.failure if self.state is ModelsState.FAILED else f"models {self.state.value}"
        raise OverloadedError(reason or "models are not ready", "not_ready", retry_after_s=5)

    def load_all(self) -> None:
        """Load and warm every bundle; a missing or invalid one fails the whole start-up (the
        state says why)."""
        try:
            self._load_all()
        except Exception as exc:
            self.failure = f"model loading failed: {exc}"
            self.state = ModelsState.FAILED
            raise
        self.state = ModelsState.READY

    def _load_all(self) -> None:
        paths = discover_bundles(self.repository)
        if not paths:
            raise BundleError(
                f"{self.repository}: no model bundles (directories with segserve.json)"
            )
        unknown = set(self.per_model) - {p.name for p in paths}
        if unknown:
            raise BundleError(
                f"settings name models that are not in the repository: {sorted(unknown)}"
            )
        names = [p.name for p in paths]
        if self.default_name is not None and self.default_name not in names:
            raise UnknownModelError(
                f"no model named {self.default_name!r}; loaded: {', '.join(names)}"
            )
        for bundle in (load_bundle(path) for path in paths):
            engine = Engine(bundle, self.per_model.get(bundle.name, self.config))
            engine.start()
            self._engines[bundle.name] = engine
        self.default_name = self.default_name or names[0]

    def get(self, name: str | None) -> Engine:
        key = name if name is not None else self.default_name
        if key is None or key not in self._engines:
            known = ", ".join(self._engines) or "none"
            raise UnknownModelError(f"no model named {name!r}; loaded: {known}")
        return self._engines[key]

    def names(self) -> list[str]:
        return list(self._engines)

    def stop(self, drain_timeout_s: float) -> None:
        """Drain and stop every engine (each gets up to ``drain_timeout_s``)."""
        self.state = ModelsState.STOPPED
        engines = list(self._engines.values())
        if engines:  # drain side by side so the total wait is one drain time, not one per model
            with ThreadPoolExecutor(max_workers=len(engines)) as pool:
                list(pool.map(lambda engine: engine.stop(drain_timeout_s), engines))
