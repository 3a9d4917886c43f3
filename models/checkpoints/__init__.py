"""Checkpoint on disk -> one of our models, strictly and safely.

* ``reading``: bytes -> (state dict, metadata) without running code from the file;
* ``metadata``: class names, palette and config text a checkpoint carries;
* one key-map module per architecture (``segformer_keys``, ``setr_keys``), each owning its
  formats: recognising them (``detect``), and building and filling the model (``load``), the way
  timm keeps a ``checkpoint_filter_fn`` beside each architecture.

``docs/models.md`` lists each format's key layout.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

from torch import nn

from models.checkpoints import segformer_keys, setr_keys
from models.checkpoints.errors import CheckpointError
from models.checkpoints.metadata import RGB, class_metadata, test_settings
from models.checkpoints.reading import read_checkpoint, sha256_of, weights_file

# Asked in this order: a SETR class token would also match SegFormer's ``backbone.layers.``.
ARCHITECTURES: tuple[ModuleType, ...] = (setr_keys, segformer_keys)
FORMATS: tuple[str, ...] = tuple(fmt for arch in ARCHITECTURES for fmt in arch.FORMATS)

__all__ = [
    "FORMATS",
    "CheckpointError",
    "LoadedCheckpoint",
    "detect_format",
    "load_checkpoint",
    "read_checkpoint",
]


@dataclass(frozen=True)
class LoadedCheckpoint:
    model: nn.Module
    model_name: str
    format: str
    classes: tuple[str, ...] | None
    palette: tuple[RGB, ...] | None
    sha256: str
    source_name: str
    # The test settings of the checkpoint's own config (metadata.test_settings); may be empty.
    test_settings: dict[str, object]


def detect_format(state_dict: Mapping[str, object], meta: Mapping[str, object]) -> str:
    """Name the layout from tell-tale keys; raise when none matches."""
    for arch in ARCHITECTURES:
        fmt = arch.detect(state_dict, meta)
        if fmt is not None:
            return str(fmt)
    sample = ", ".join(sorted(state_dict)[:8])
    raise CheckpointError(f"no known checkpoint layout matches the keys (first keys: {sample})")


def _architecture(fmt: str) -> ModuleType:
    return next(arch for arch in ARCHITECTURES if fmt in arch.FORMATS)


def load_checkpoint(
    path: str | Path,
    model_name: str | None = None,
    format: str = "auto",
    read_classes: bool = True,
) -> LoadedCheckpoint:
    """Load a checkpoint into an eval-mode model; ``format`` forces one of ``FORMATS``.

    ``read_classes=False`` where the caller names the classes itself: the checkpoint's class
    names and palette are then neither read nor checked against its classifier (metadata that
    disagrees with it is what a caller's names replace)."""
    path = Path(path)
    where = str(path)
    if format != "auto" and format not in FORMATS:
        raise CheckpointError(f"{where}: unknown format {format!r}; known: {', '.join(FORMATS)}")
    state_dict, meta = read_checkpoint(path)
    try:
        fmt = detect_format(state_dict, meta) if format == "auto" else format
    except CheckpointError as exc:  # name the file, as every other loading error does
        raise CheckpointError(f"{where}: {exc}") from None
    model = _architecture(fmt).load(state_dict, meta, fmt, model_name, where)
    num_classes = model.num_classes
    assert isinstance(num_classes, int), "our models expose num_classes: int"
    classes = class_metadata(meta if read_classes else {})
    for what, listed in (("class names", classes.names), ("palette colours", classes.palette)):
        if listed is not None and len(listed) != num_classes:
            raise CheckpointError(
                f"{where}: the classifier has {num_classes} outputs but the metadata lists "
                f"{len(listed)} {what} (format assumed: {fmt})"
            )
    if classes.hf_label_count not in (None, num_classes):
        raise CheckpointError(
            f"{where}: config.json declares {classes.hf_label_count} labels but the classifier "
            f"has {num_classes} outputs (format assumed: {fmt})"
        )
    return LoadedCheckpoint(
        model=model.eval(),
        model_name=str(model.variant),
        format=fmt,
        classes=classes.names,
        palette=classes.palette,
        sha256=sha256_of(weights_file(path)),
        source_name=path.name,
        test_settings=test_settings(meta),
    )
