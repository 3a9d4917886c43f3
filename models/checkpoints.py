"""Checkpoint on disk -> one of our models, strictly and safely.

Three SegFormer layouts are understood (plus SETR, delegated to ``models.setr``):

* ``hf``: a HuggingFace ``transformers`` directory (``config.json`` + ``model.safetensors`` or
  ``pytorch_model.bin``), keys ``segformer.encoder.*`` / ``decode_head.linear_c.*``;
* ``nvlabs``: the official NVlabs release, keys ``backbone.block1.0.attn.kv.weight``,
  ``decode_head.linear_c4.proj.weight``;
* ``mmseg``: mmsegmentation 1.x, keys ``backbone.layers.0.1.0.attn.attn.in_proj_weight``,
  ``decode_head.convs.0.conv.weight``, ``decode_head.conv_seg.weight``.

Loading is strict: every source key must be consumed, every model key filled, every shape must
match; the error names the keys and the format assumed. Two documented exceptions are dropped by
name: ``auxiliary_head.*`` (training-only heads) and, for NVlabs, ``decode_head.conv_seg.*`` (a
classifier its base class creates but ``SegFormerHead`` never uses; ``linear_pred`` is the real
one).

Loading is safe: ``.safetensors`` needs no unpickling at all; ``.pth``/``.bin`` go through
``torch.load`` with a restricted unpickler that materialises only tensors, storages, dtypes and
plain containers. Objects from known framework namespaces (mmengine's message hub and history
buffers, numpy arrays in training metadata) become inert ``OpaqueObject`` placeholders: their
classes are never imported and nothing of theirs runs. Any other global (``os.system``,
``builtins.exec``...) refuses the whole file.
"""

from __future__ import annotations

import _compat_pickle
import hashlib
import importlib
import io
import json
import pickle
import re
import types
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from models.registry import create_model
from models.segformer import PATCH_SIZES, SR_RATIOS, VARIANTS, SegFormer

FORMATS = ("hf", "nvlabs", "mmseg", "mmseg-setr")
HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
# Objects from these top-level packages are tolerated as inert placeholders (never imported).
TOLERATED_NAMESPACES = frozenset({"mmengine", "mmcv", "mmseg", "mmdet", "numpy"})
DROPPED_PREFIXES: dict[str, tuple[str, ...]] = {
    "hf": ("auxiliary_head.",),
    "nvlabs": ("auxiliary_head.", "decode_head.conv_seg."),
    "mmseg": ("auxiliary_head.",),
}


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded exactly; the message names file, format and keys."""


@dataclass(frozen=True)
class LoadedCheckpoint:
    model: nn.Module
    model_name: str
    format: str
    classes: tuple[str, ...] | None
    palette: tuple[tuple[int, int, int], ...] | None
    sha256: str
    source_name: str


# --------------------------------------------------------------------------- safe reading


class OpaqueObject:
    """Stands in for an object of a tolerated class: records what was pickled, runs nothing."""

    qualified_name = "?"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args = args
        self.kwargs = kwargs
        self.state: Any = None

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __repr__(self) -> str:
        return f"<opaque {self.qualified_name}>"


class _UnsafeGlobal(pickle.UnpicklingError):
    def __init__(self, qualified_name: str) -> None:
        super().__init__(qualified_name)
        self.qualified_name = qualified_name


_SAFE_TORCH_FUNCTIONS = frozenset(
    {
        "torch._utils._rebuild_tensor",
        "torch._utils._rebuild_tensor_v2",
        "torch._utils._rebuild_tensor_v3",
        "torch._utils._rebuild_parameter",
        "torch._utils._rebuild_parameter_with_state",
        "torch.nn.parameter.Parameter",
        "torch.Size",
        "torch.device",
        "torch.storage.UntypedStorage",
        "torch.storage.TypedStorage",
    }
)
_SAFE_BUILTINS: dict[str, object] = {
    "collections.OrderedDict": OrderedDict,
    "builtins.set": set,
    "builtins.frozenset": frozenset,
    "builtins.slice": slice,
    "builtins.complex": complex,
    "builtins.bytearray": bytearray,
    "_codecs.encode": __import__("codecs").encode,  # protocol-2 pickles spell bytes this way
}


def _resolve_safe_global(module: str, name: str) -> object:
    qualified = f"{module}.{name}"
    if qualified in _SAFE_BUILTINS:
        return _SAFE_BUILTINS[qualified]
    if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
        return getattr(torch, name)
    if module == "torch" and name.endswith("Storage") and hasattr(torch, name):
        return getattr(torch, name)
    if qualified in _SAFE_TORCH_FUNCTIONS:
        return getattr(importlib.import_module(module), name)
    if module.split(".")[0] in TOLERATED_NAMESPACES:
        return type(name, (OpaqueObject,), {"qualified_name": qualified})
    raise _UnsafeGlobal(qualified)


class RestrictedUnpickler(pickle.Unpickler):
    """Resolves only the globals a weights file needs; see the module docstring."""

    def find_class(self, module: str, name: str) -> Any:
        # Protocol-2 pickles (torch.save's default) spell builtins with Python 2 names.
        module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        return _resolve_safe_global(module, name)


def _restricted_load(file: io.IOBase, **kwargs: Any) -> Any:
    return RestrictedUnpickler(file, **kwargs).load()


# torch.load takes a pickle *module*; this one exposes the restricted Unpickler and load.
_restricted_pickle = types.ModuleType("segserve_restricted_pickle")
_restricted_pickle.Unpickler = RestrictedUnpickler  # type: ignore[attr-defined]
_restricted_pickle.load = _restricted_load  # type: ignore[attr-defined]


def _weights_file(path: Path) -> Path:
    if not path.is_dir():
        return path
    for name in HF_WEIGHT_FILES:
        if (path / name).is_file():
            return path / name
    raise CheckpointError(
        f"{path}: directory holds none of {', '.join(HF_WEIGHT_FILES)} (format assumed: hf)"
    )


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    try:
        with safe_open(str(path), framework="pt") as handle:
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
            metadata = handle.metadata() or {}
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from exc
    return tensors, {"safetensors_metadata": dict(metadata)}


def _read_pickle(path: Path) -> object:
    try:
        return torch.load(
            path, map_location="cpu", pickle_module=_restricted_pickle, weights_only=False
        )
    except _UnsafeGlobal as exc:
        raise CheckpointError(
            f"{path}: refused, the pickle references {exc.qualified_name!r}, which could run "
            "code; only tensors, plain containers and inert framework metadata are accepted"
        ) from exc
    except Exception as exc:  # a malformed pickle can fail in any way; all mean "unreadable"
        raise CheckpointError(
            f"{path}: not a readable PyTorch checkpoint ({type(exc).__name__}: {exc})"
        ) from exc


def _plain_meta(meta: object) -> dict[str, Any]:
    return dict(meta) if isinstance(meta, dict) else {}


def _unwrap_pickled(path: Path, loaded: object) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    if not isinstance(loaded, dict):
        raise CheckpointError(
            f"{path}: holds a {type(loaded).__name__}, not a checkpoint dictionary"
        )
    meta = _plain_meta(loaded.get("meta"))
    for wrapper in ("state_dict", "model"):
        if isinstance(loaded.get(wrapper), dict):
            state_dict = loaded[wrapper]
            break
    else:
        state_dict = loaded
    not_tensors = sorted(k for k, v in state_dict.items() if not isinstance(v, torch.Tensor))
    if not state_dict or not_tensors:
        raise CheckpointError(
            f"{path}: no state dict of tensors found (top-level keys: "
            f"{', '.join(map(str, list(loaded)[:10]))}; non-tensor entries: "
            f"{', '.join(map(str, not_tensors[:10]))})"
        )
    return dict(state_dict), meta


def read_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read (state_dict, meta) from a weights file or a HuggingFace directory, running no code.

    ``meta`` holds what was readable: mmengine's ``dataset_meta`` (classes, palette) and ``cfg``
    text, NVlabs-era ``CLASSES``/``PALETTE``, ``hf_config`` for a HuggingFace directory,
    ``safetensors_metadata`` for safetensors files.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or directory")
    weights = _weights_file(path)
    if weights.suffix == ".safetensors":
        state_dict, meta = _read_safetensors(weights)
    else:
        state_dict, meta = _unwrap_pickled(weights, _read_pickle(weights))
    if path.is_dir():
        meta["hf_config"] = _read_hf_config(path)
    return state_dict, meta


def _read_hf_config(directory: Path) -> dict[str, Any]:
    config_file = directory / "config.json"
    try:
        config = json.loads(config_file.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{config_file}: unreadable HuggingFace config ({exc})") from exc
    if not isinstance(config, dict):
        raise CheckpointError(f"{config_file}: not a JSON object")
    return config


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


# --------------------------------------------------------------------------- format detection


def detect_format(state_dict: dict[str, torch.Tensor], meta: dict[str, Any]) -> str:
    """Name the layout from tell-tale keys; raise when none matches."""
    keys = state_dict.keys()
    if "backbone.cls_token" in keys:
        return "mmseg-setr"
    if "hf_config" in meta or any(k.startswith("segformer.encoder.") for k in keys):
        return "hf"
    if any(k.startswith("backbone.block1.") for k in keys):
        return "nvlabs"
    if any(k.startswith("backbone.layers.") for k in keys):
        return "mmseg"
    sample = ", ".join(sorted(keys)[:8])
    raise CheckpointError(f"no known checkpoint layout matches the keys (first keys: {sample})")


# --------------------------------------------------------------------------- key mapping

Combine = Callable[[list[torch.Tensor]], torch.Tensor]


@dataclass(frozen=True)
class KeyRule:
    """One model key filled from one or more source keys."""

    target: str
    sources: tuple[str, ...]
    combine: Combine
    optional: bool = False


def _same(tensors: list[torch.Tensor]) -> torch.Tensor:
    return tensors[0]


def _concat(tensors: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat(tensors, dim=0)


def _as_1x1_conv(tensors: list[torch.Tensor]) -> torch.Tensor:
    return tensors[0][:, :, None, None]


def _from_1x1_conv(tensors: list[torch.Tensor]) -> torch.Tensor:
    return tensors[0].flatten(1)


def _rows(start: int, stop: int) -> Combine:
    def take(tensors: list[torch.Tensor]) -> torch.Tensor:
        return tensors[0][start:stop]

    return take


def _param_rules(target: str, source: str, reshape_weight: Combine = _same) -> Iterator[KeyRule]:
    """weight (reshaped when a Linear meets a 1×1 conv) and bias, one to one."""
    yield KeyRule(f"{target}.weight", (f"{source}.weight",), reshape_weight)
    yield KeyRule(f"{target}.bias", (f"{source}.bias",), _same)


def _bn_rules(target: str, source: str) -> Iterator[KeyRule]:
    for name in ("weight", "bias", "running_mean", "running_var"):
        yield KeyRule(f"{target}.{name}", (f"{source}.{name}",), _same)
    # Absent from checkpoints saved before PyTorch 0.4.1; only used in training.
    yield KeyRule(
        f"{target}.num_batches_tracked", (f"{source}.num_batches_tracked",), _same, optional=True
    )


def _hf_rules(variant: str) -> Iterator[KeyRule]:
    spec = VARIANTS[variant]
    for i in range(4):
        ours, theirs = f"encoder.stages.{i}", "segformer.encoder"
        yield from _param_rules(f"{ours}.patch_embed.proj", f"{theirs}.patch_embeddings.{i}.proj")
        yield from _param_rules(
            f"{ours}.patch_embed.norm", f"{theirs}.patch_embeddings.{i}.layer_norm"
        )
        for j in range(spec.depths[i]):
            block, src = f"{ours}.blocks.{j}", f"{theirs}.block.{i}.{j}"
            yield from _param_rules(f"{block}.norm1", f"{src}.layer_norm_1")
            yield from _param_rules(f"{block}.attn.q", f"{src}.attention.self.query")
            for name in ("weight", "bias"):
                yield KeyRule(
                    f"{block}.attn.kv.{name}",
                    (f"{src}.attention.self.key.{name}", f"{src}.attention.self.value.{name}"),
                    _concat,
                )
            if SR_RATIOS[i] > 1:
                yield from _param_rules(f"{block}.attn.sr", f"{src}.attention.self.sr")
                yield from _param_rules(f"{block}.attn.sr_norm", f"{src}.attention.self.layer_norm")
            yield from _param_rules(f"{block}.attn.proj", f"{src}.attention.output.dense")
            yield from _param_rules(f"{block}.norm2", f"{src}.layer_norm_2")
            yield from _param_rules(f"{block}.ffn.fc1", f"{src}.mlp.dense1")
            yield from _param_rules(f"{block}.ffn.dwconv", f"{src}.mlp.dwconv.dwconv")
            yield from _param_rules(f"{block}.ffn.fc2", f"{src}.mlp.dense2")
        yield from _param_rules(f"{ours}.norm", f"{theirs}.layer_norm.{i}")
        yield from _param_rules(
            f"decode_head.linear.{i}", f"decode_head.linear_c.{i}.proj", _as_1x1_conv
        )
    yield KeyRule("decode_head.fuse.weight", ("decode_head.linear_fuse.weight",), _same)
    yield from _bn_rules("decode_head.fuse_bn", "decode_head.batch_norm")
    yield from _param_rules("decode_head.classifier", "decode_head.classifier")


def _nvlabs_rules(variant: str) -> Iterator[KeyRule]:
    spec = VARIANTS[variant]
    for i in range(4):
        ours, n = f"encoder.stages.{i}", i + 1
        yield from _param_rules(f"{ours}.patch_embed.proj", f"backbone.patch_embed{n}.proj")
        yield from _param_rules(f"{ours}.patch_embed.norm", f"backbone.patch_embed{n}.norm")
        for j in range(spec.depths[i]):
            block, src = f"{ours}.blocks.{j}", f"backbone.block{n}.{j}"
            yield from _param_rules(f"{block}.norm1", f"{src}.norm1")
            yield from _param_rules(f"{block}.attn.q", f"{src}.attn.q")
            yield from _param_rules(f"{block}.attn.kv", f"{src}.attn.kv")
            if SR_RATIOS[i] > 1:
                yield from _param_rules(f"{block}.attn.sr", f"{src}.attn.sr")
                yield from _param_rules(f"{block}.attn.sr_norm", f"{src}.attn.norm")
            yield from _param_rules(f"{block}.attn.proj", f"{src}.attn.proj")
            yield from _param_rules(f"{block}.norm2", f"{src}.norm2")
            yield from _param_rules(f"{block}.ffn.fc1", f"{src}.mlp.fc1")
            yield from _param_rules(f"{block}.ffn.dwconv", f"{src}.mlp.dwconv.dwconv")
            yield from _param_rules(f"{block}.ffn.fc2", f"{src}.mlp.fc2")
        yield from _param_rules(f"{ours}.norm", f"backbone.norm{n}")
        yield from _param_rules(
            f"decode_head.linear.{i}", f"decode_head.linear_c{n}.proj", _as_1x1_conv
        )
    yield KeyRule("decode_head.fuse.weight", ("decode_head.linear_fuse.conv.weight",), _same)
    yield from _bn_rules("decode_head.fuse_bn", "decode_head.linear_fuse.bn")
    yield from _param_rules("decode_head.classifier", "decode_head.linear_pred")


def _mmseg_rules(variant: str) -> Iterator[KeyRule]:
    spec = VARIANTS[variant]
    for i in range(4):
        ours, stage, dim = f"encoder.stages.{i}", f"backbone.layers.{i}", spec.embed_dims[i]
        yield from _param_rules(f"{ours}.patch_embed.proj", f"{stage}.0.projection")
        yield from _param_rules(f"{ours}.patch_embed.norm", f"{stage}.0.norm")
        for j in range(spec.depths[i]):
            block, src = f"{ours}.blocks.{j}", f"{stage}.1.{j}"
            yield from _param_rules(f"{block}.norm1", f"{src}.norm1")
            # nn.MultiheadAttention packs q, k, v row-wise in in_proj_{weight,bias}.
            for name in ("weight", "bias"):
                packed = (f"{src}.attn.attn.in_proj_{name}",)
                yield KeyRule(f"{block}.attn.q.{name}", packed, _rows(0, dim))
                yield KeyRule(f"{block}.attn.kv.{name}", packed, _rows(dim, 3 * dim))
            if SR_RATIOS[i] > 1:
                yield from _param_rules(f"{block}.attn.sr", f"{src}.attn.sr")
                yield from _param_rules(f"{block}.attn.sr_norm", f"{src}.attn.norm")
            yield from _param_rules(f"{block}.attn.proj", f"{src}.attn.attn.out_proj")
            yield from _param_rules(f"{block}.norm2", f"{src}.norm2")
            # MixFFN is Sequential(fc1 1×1 conv, depthwise conv, GELU, Dropout, fc2 1×1 conv, ...).
            yield from _param_rules(f"{block}.ffn.fc1", f"{src}.ffn.layers.0", _from_1x1_conv)
            yield from _param_rules(f"{block}.ffn.dwconv", f"{src}.ffn.layers.1")
            yield from _param_rules(f"{block}.ffn.fc2", f"{src}.ffn.layers.4", _from_1x1_conv)
        yield from _param_rules(f"{ours}.norm", f"{stage}.2")
        yield KeyRule(
            f"decode_head.convs.{i}.conv.weight", (f"decode_head.convs.{i}.conv.weight",), _same
        )
        yield from _bn_rules(f"decode_head.convs.{i}.bn", f"decode_head.convs.{i}.bn")
    yield KeyRule("decode_head.fusion.conv.weight", ("decode_head.fusion_conv.conv.weight",), _same)
    yield from _bn_rules("decode_head.fusion.bn", "decode_head.fusion_conv.bn")
    yield from _param_rules("decode_head.classifier", "decode_head.conv_seg")


RULES: dict[str, Callable[[str], Iterator[KeyRule]]] = {
    "hf": _hf_rules,
    "nvlabs": _nvlabs_rules,
    "mmseg": _mmseg_rules,
}


def _names(keys: list[str], limit: int = 12) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f" ... ({len(keys)} in all)" if len(keys) > limit else "")


def convert_state_dict(
    state_dict: dict[str, torch.Tensor], fmt: str, model: SegFormer, where: str
) -> dict[str, torch.Tensor]:
    """Map a source state dict onto ``model``'s keys, checking every key and shape."""
    expected = model.state_dict()
    dropped = DROPPED_PREFIXES[fmt]
    rules = list(RULES[fmt](model.variant))
    converted: dict[str, torch.Tensor] = {}
    consumed: set[str] = set()
    missing: list[str] = []
    misshaped: list[str] = []
    for rule in rules:
        absent = [key for key in rule.sources if key not in state_dict]
        if absent:
            if not rule.optional:
                missing.extend(k for k in absent if k not in missing)
            continue
        consumed.update(rule.sources)
        sources = [state_dict[key] for key in rule.sources]
        target_shape = tuple(expected[rule.target].shape)
        try:
            tensor = rule.combine(sources)
        except (RuntimeError, IndexError):
            tensor = None
        if tensor is None or tuple(tensor.shape) != target_shape:
            shapes = ", ".join(f"{key} {tuple(state_dict[key].shape)}" for key in rule.sources)
            misshaped.append(f"{shapes} (model needs {target_shape})")
            continue
        converted[rule.target] = tensor.to(expected[rule.target].dtype)
    unexpected = sorted(
        key for key in state_dict if key not in consumed and not key.startswith(dropped)
    )
    problems = []
    if missing:
        problems.append(f"missing keys: {_names(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_names(unexpected)}")
    if misshaped:
        problems.append(f"mis-shaped keys: {_names(misshaped, limit=6)}")
    if problems:
        raise CheckpointError(
            f"{where}: does not load exactly as {fmt} format {model.variant}: "
            + "; ".join(problems)
        )
    # Optional keys (num_batches_tracked) keep the model's value when the source lacks them.
    return {**expected, **converted}


# --------------------------------------------------------------------------- variant detection


def _variant_from_sizes(
    embed_dims: tuple[int, ...], depths: tuple[int, ...], decoder_dim: int | None, where: str
) -> str:
    for name, spec in VARIANTS.items():
        if spec.embed_dims == embed_dims and spec.depths == depths:
            if decoder_dim is not None and decoder_dim != spec.decoder_dim:
                raise CheckpointError(
                    f"{where}: encoder is {name} but the decoder width is {decoder_dim}, "
                    f"not the published {spec.decoder_dim}"
                )
            return name
    raise CheckpointError(
        f"{where}: no SegFormer variant has embed dims {list(embed_dims)} and depths {list(depths)}"
    )


def _count_blocks(keys: list[str], pattern: str, first_stage: int = 0) -> tuple[int, ...]:
    """Depth per stage: distinct block indices (group 2) per stage number (group 1)."""
    regex = re.compile(pattern)
    counts = []
    for stage in range(first_stage, first_stage + 4):
        indices = {
            int(m.group(2)) for k in keys if (m := regex.match(k)) and int(m.group(1)) == stage
        }
        counts.append(len(indices))
    return tuple(counts)


def _shape0(state_dict: dict[str, torch.Tensor], key: str, where: str, fmt: str) -> int:
    if key not in state_dict:
        raise CheckpointError(f"{where}: missing key {key} (format assumed: {fmt})")
    return int(state_dict[key].shape[0])


_HF_FIXED = {
    "num_encoder_blocks": 4,
    "num_channels": 3,
    "num_attention_heads": [1, 2, 5, 8],
    "sr_ratios": list(SR_RATIOS),
    "patch_sizes": list(PATCH_SIZES),
    "strides": [4, 2, 2, 2],
    "mlp_ratios": [4, 4, 4, 4],
    "hidden_act": "gelu",
}


def _hf_variant(config: dict[str, Any], where: str) -> str:
    for key, value in _HF_FIXED.items():
        if key in config and config[key] != value:
            raise CheckpointError(
                f"{where}: config.json {key}={config[key]!r} is not a published SegFormer "
                f"setting ({value!r}) (format assumed: hf)"
            )
    try:
        dims = tuple(int(v) for v in config["hidden_sizes"])
        depths = tuple(int(v) for v in config["depths"])
        decoder_dim = int(config["decoder_hidden_size"])
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(
            f"{where}: config.json lacks SegFormer sizes ({exc}) (format assumed: hf)"
        ) from exc
    return _variant_from_sizes(dims, depths, decoder_dim, where)


def detect_variant(
    state_dict: dict[str, torch.Tensor], meta: dict[str, Any], fmt: str, where: str
) -> str:
    """Read the variant from the HF config or from tensor shapes (embed dims and depths)."""
    keys = list(state_dict)
    if fmt == "hf":
        if "hf_config" in meta:
            return _hf_variant(meta["hf_config"], where)
        dims = tuple(
            _shape0(state_dict, f"segformer.encoder.patch_embeddings.{i}.proj.weight", where, fmt)
            for i in range(4)
        )
        depths = _count_blocks(keys, r"segformer\.encoder\.block\.(\d+)\.(\d+)\.")
        decoder_key = "decode_head.linear_fuse.weight"
    elif fmt == "nvlabs":
        dims = tuple(
            _shape0(state_dict, f"backbone.patch_embed{i + 1}.proj.weight", where, fmt)
            for i in range(4)
        )
        depths = _count_blocks(keys, r"backbone\.block(\d+)\.(\d+)\.", first_stage=1)
        decoder_key = "decode_head.linear_fuse.conv.weight"
    else:
        dims = tuple(
            _shape0(state_dict, f"backbone.layers.{i}.0.projection.weight", where, fmt)
            for i in range(4)
        )
        depths = _count_blocks(keys, r"backbone\.layers\.(\d+)\.1\.(\d+)\.")
        decoder_key = "decode_head.fusion_conv.conv.weight"
    decoder_dim = _shape0(state_dict, decoder_key, where, fmt)
    return _variant_from_sizes(dims, depths, decoder_dim, where)


# --------------------------------------------------------------------------- class metadata


def _as_palette(value: object) -> tuple[tuple[int, int, int], ...] | None:
    if not isinstance(value, list | tuple):
        return None
    colours = []
    for colour in value:
        if not isinstance(colour, list | tuple) or len(colour) != 3:
            return None
        colours.append((int(colour[0]), int(colour[1]), int(colour[2])))
    return tuple(colours)


def _class_metadata(
    meta: dict[str, Any], fmt: str
) -> tuple[tuple[str, ...] | None, tuple[tuple[int, int, int], ...] | None]:
    if fmt == "hf":
        id2label = meta.get("hf_config", {}).get("id2label") or {}
        labels = tuple(str(id2label[k]) for k in sorted(id2label, key=int))
        generic = all(label == f"LABEL_{i}" for i, label in enumerate(labels))
        return (None if generic or not labels else labels), None
    dataset_meta = meta.get("dataset_meta")
    if not isinstance(dataset_meta, dict):
        dataset_meta = {}
    classes = dataset_meta.get("classes", meta.get("CLASSES"))
    palette = dataset_meta.get("palette", meta.get("PALETTE"))
    names = tuple(str(c) for c in classes) if isinstance(classes, list | tuple) else None
    return names, _as_palette(palette)


# --------------------------------------------------------------------------- loading


def _load_setr(
    state_dict: dict[str, torch.Tensor], meta: dict[str, Any], model_name: str | None, where: str
) -> tuple[nn.Module, str]:
    try:
        setr = importlib.import_module("models.setr")
    except ModuleNotFoundError as exc:
        if exc.name != "models.setr":
            raise
        raise CheckpointError(
            f"{where}: this is an mmsegmentation SETR checkpoint (backbone.cls_token) but SETR "
            "support (models/setr.py) is not installed (format assumed: mmseg-setr)"
        ) from exc
    try:
        model, name = setr.load_mmseg_setr(state_dict, meta, model_name)
    except CheckpointError as exc:
        raise CheckpointError(f"{where}: {exc} (format assumed: mmseg-setr)") from exc
    return model, name


def load_checkpoint(
    path: str | Path, model_name: str | None = None, format: str = "auto"
) -> LoadedCheckpoint:
    """Load a checkpoint into an eval-mode model; ``format`` forces one of ``FORMATS``."""
    path = Path(path)
    where = str(path)
    if format != "auto" and format not in FORMATS:
        raise CheckpointError(f"{where}: unknown format {format!r}; known: {', '.join(FORMATS)}")
    state_dict, meta = read_checkpoint(path)
    weights = _weights_file(path)
    fmt = detect_format(state_dict, meta) if format == "auto" else format
    if fmt == "mmseg-setr":
        model, name = _load_setr(state_dict, meta, model_name, where)
        classes, palette = _class_metadata(meta, "mmseg")
        setr_classes = model.num_classes
        assert isinstance(setr_classes, int), "registry models expose num_classes: int"
        _check_class_count(setr_classes, classes, palette, where, fmt)
    else:
        name = detect_variant(state_dict, meta, fmt, where)
        if model_name is not None and model_name != name:
            raise CheckpointError(
                f"{where}: checkpoint holds {name} (read from the {fmt} weights), "
                f"not the requested {model_name}"
            )
        classifier = _classifier_key(fmt)
        num_classes = _shape0(state_dict, classifier, where, fmt)
        classes, palette = _class_metadata(meta, fmt)
        _check_class_count(num_classes, classes, palette, where, fmt)
        if fmt == "hf":
            _check_hf_label_count(meta.get("hf_config", {}), num_classes, where)
        model = create_model(
            name,
            num_classes=num_classes,
            decoder="mmseg" if fmt == "mmseg" else "hf",
            norm_eps=fmt,
        )
        assert isinstance(model, SegFormer)
        model.load_state_dict(convert_state_dict(state_dict, fmt, model, where), strict=True)
    return LoadedCheckpoint(
        model=model.eval(),
        model_name=name,
        format=fmt,
        classes=classes,
        palette=palette,
        sha256=_sha256(weights),
        source_name=path.name,
    )


def _classifier_key(fmt: str) -> str:
    return {
        "hf": "decode_head.classifier.weight",
        "nvlabs": "decode_head.linear_pred.weight",
        "mmseg": "decode_head.conv_seg.weight",
    }[fmt]


def _check_class_count(
    num_classes: int,
    classes: tuple[str, ...] | None,
    palette: tuple[tuple[int, int, int], ...] | None,
    where: str,
    fmt: str,
) -> None:
    for what, listed in (("class names", classes), ("palette colours", palette)):
        if listed is not None and len(listed) != num_classes:
            raise CheckpointError(
                f"{where}: the classifier has {num_classes} outputs but the metadata lists "
                f"{len(listed)} {what} (format assumed: {fmt})"
            )


def _check_hf_label_count(config: dict[str, Any], num_classes: int, where: str) -> None:
    declared = len(config.get("id2label") or {}) or config.get("num_labels")
    if declared is not None and declared != num_classes:
        raise CheckpointError(
            f"{where}: config.json declares {declared} labels but the classifier has "
            f"{num_classes} outputs (format assumed: hf)"
        )
