"""Name -> constructor registry for every architecture variant (timm style).

Architecture files register their variants with ``@register_model("segformer-b0")``; callers
build models with ``create_model(name, num_classes=...)`` and never import a class directly.
Every model built here exposes ``arch`` ("segformer" | "setr"), ``variant`` (the registry name),
``num_classes`` and ``output_stride`` (input size / logits size), and maps normalised float32
NCHW pixels to logits at that stride.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

from torch import nn

ModelFactory = Callable[..., nn.Module]

_REGISTRY: dict[str, ModelFactory] = {}
# Modules whose import registers variants; imported lazily so `models` stays cheap to import.
_ARCH_MODULES = ("models.segformer", "models.setr")


def register_model(name: str) -> Callable[[ModelFactory], ModelFactory]:
    def decorator(factory: ModelFactory) -> ModelFactory:
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} registered twice")
        _REGISTRY[name] = factory
        return factory

    return decorator


def _import_architectures() -> None:
    for module in _ARCH_MODULES:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name != module:
                raise


def list_models() -> list[str]:
    _import_architectures()
    return sorted(_REGISTRY)


def create_model(name: str, num_classes: int, **kwargs: object) -> nn.Module:
    """Build a registered variant with random weights, in eval mode."""
    _import_architectures()
    if name not in _REGISTRY:
        raise KeyError(f"unknown model {name!r}; known: {', '.join(sorted(_REGISTRY))}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be positive, got {num_classes}")
    model = _REGISTRY[name](num_classes=num_classes, **kwargs)
    return model.eval()
