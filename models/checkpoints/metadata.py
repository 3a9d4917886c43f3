"""What a checkpoint says about itself besides its tensors: class names, palette, config text.

Class names and colours come from mmengine's ``dataset_meta`` (mmseg 1.x), the top-level
``CLASSES``/``PALETTE`` of mmcv 1.x checkpoints (mmseg 0.x, the NVlabs SegFormer releases) or a
HuggingFace ``config.json``'s ``id2label``. Config text (``meta['cfg']`` in mmengine,
``meta['config']`` in mmcv 1.x) is read with ``ast.parse`` and never executed.
"""

from __future__ import annotations

import ast
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

RGB = tuple[int, int, int]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ClassMetadata:
    names: tuple[str, ...] | None
    palette: tuple[RGB, ...] | None
    hf_label_count: int | None = None  # config.json's id2label / num_labels, even if generic


def _as_palette(value: object) -> tuple[RGB, ...] | None:
    if not isinstance(value, list | tuple):
        return None
    colours = []
    for colour in value:
        if not isinstance(colour, list | tuple) or len(colour) != 3:
            return None
        colours.append((int(colour[0]), int(colour[1]), int(colour[2])))
    return tuple(colours)


def _hf_labels(config: Mapping[str, Any]) -> tuple[str, ...] | None:
    id2label = config.get("id2label") or {}
    labels = tuple(str(id2label[k]) for k in sorted(id2label, key=int))
    generic = all(label == f"LABEL_{i}" for i, label in enumerate(labels))
    return None if generic or not labels else labels


def class_metadata(meta: Mapping[str, Any]) -> ClassMetadata:
    """Names and palette from whichever of the known places holds them."""
    hf_config = meta.get("hf_config")
    if isinstance(hf_config, dict):
        declared = len(hf_config.get("id2label") or {}) or hf_config.get("num_labels")
        count = declared if isinstance(declared, int) else None
        return ClassMetadata(_hf_labels(hf_config), None, count)
    dataset_meta = meta.get("dataset_meta")
    if not isinstance(dataset_meta, dict):
        dataset_meta = {}
    classes = dataset_meta.get("classes", meta.get("CLASSES"))
    palette = dataset_meta.get("palette", meta.get("PALETTE"))
    names = tuple(str(c) for c in classes) if isinstance(classes, list | tuple) else None
    return ClassMetadata(names, _as_palette(palette))


class _Unparsed:
    """Marks a config value that is not a plain literal (never evaluated)."""


UNPARSED = _Unparsed()


def _literal(node: ast.expr, names: dict[str, Any]) -> Any:
    """Converts ``dict(...)``, literals, tuples, lists and names bound earlier in the same text;
    everything else becomes ``UNPARSED``. Nothing is executed."""
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        inner = _literal(node.operand, names)
        return -inner if isinstance(inner, int | float) else UNPARSED
    if isinstance(node, ast.Tuple | ast.List):
        items = [_literal(item, names) for item in node.elts]
        return tuple(items) if isinstance(node, ast.Tuple) else items
    if isinstance(node, ast.Dict):
        return {
            _literal(k, names): _literal(v, names)
            for k, v in zip(node.keys, node.values, strict=True)
            if k is not None
        }
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "dict":
        if node.args:
            return UNPARSED
        return {kw.arg: _literal(kw.value, names) for kw in node.keywords if kw.arg is not None}
    if isinstance(node, ast.Name):
        return names.get(node.id, UNPARSED)
    return UNPARSED


def parse_config_text(text: str) -> dict[str, Any]:
    """Top-level assignments of an mmengine/mmcv config dump (``meta['cfg']`` / ``meta['config']``)
    as plain data, read with ``ast.parse`` only, never executed."""
    names: dict[str, Any] = {}
    for statement in ast.parse(text).body:
        if isinstance(statement, ast.Assign):
            value = _literal(statement.value, names)
            for target in statement.targets:
                if isinstance(target, ast.Name):
                    names[target.id] = value
    return names


def model_config(meta: Mapping[str, Any]) -> dict[str, Any]:
    """``model`` dict from the checkpoint's config text; empty when absent or unreadable."""
    text = meta.get("cfg", meta.get("config"))
    if not isinstance(text, str):
        return {}
    try:
        model = parse_config_text(text).get("model")
    except (SyntaxError, ValueError, RecursionError) as exc:
        log.warning("ignoring unreadable config text in checkpoint meta: %s", exc)
        return {}
    return model if isinstance(model, dict) else {}


def test_settings(meta: Mapping[str, Any]) -> dict[str, Any]:
    """The test settings of the checkpoint's own config text, in ``service.bundle.TestConfig``'s
    keys: ``model.test_cfg``'s mode, crop and stride, and the test pipeline's ``Resize`` (scale,
    keep ratio). mmseg's ``inference_model`` runs exactly these; a dataset's published defaults
    are SegFormer's (SETR's ADE20K configs slide 512 / 341 where SegFormer's run whole). Empty
    where absent or unreadable."""
    text = meta.get("cfg", meta.get("config"))
    if not isinstance(text, str):
        return {}
    try:
        names = parse_config_text(text)
    except (SyntaxError, ValueError, RecursionError):
        return {}  # model_config has warned about it
    found: dict[str, Any] = {}
    test_cfg = section(section(names, "model"), "test_cfg")
    if test_cfg.get("mode") in ("whole", "slide"):
        found["mode"] = test_cfg["mode"]
    for ours, theirs in (("crop", "crop_size"), ("stride", "stride")):
        if (size := _pair(test_cfg.get(theirs))) is not None:
            found[ours] = size
    pipeline = names.get("test_pipeline")
    for step in pipeline if isinstance(pipeline, list) else []:
        if isinstance(step, dict) and step.get("type") == "Resize":
            if (scale := _pair(step.get("scale"))) is not None:
                found["resize_scale"] = scale
            if isinstance(step.get("keep_ratio"), bool):
                found["keep_ratio"] = step["keep_ratio"]
    return found


def _pair(value: Any) -> tuple[int, int] | None:
    """A size as mmseg writes it: an int, or two positive ints."""
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value, value
    if (
        isinstance(value, (tuple, list))
        and len(value) == 2
        and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)
    ):
        return int(value[0]), int(value[1])
    return None


def section(config: Mapping[str, Any], name: str) -> dict[str, Any]:
    value = config.get(name)
    return value if isinstance(value, dict) else {}


def pick(config: Mapping[str, Any], key: str, kind: type | tuple[type, ...], default: Any) -> Any:
    """``config[key]`` when it is a ``kind``, else ``default`` (absent, unparsed, wrong type)."""
    value = config.get(key, default)
    return value if isinstance(value, kind) else default
