"""Bytes on disk -> (state dict, metadata), running no code from the file.

``.safetensors`` needs no unpickling at all; ``.pth``/``.bin`` go through ``torch.load`` with a
restricted unpickler that materialises only tensors, storages, dtypes and plain containers.
Objects from known framework namespaces (mmengine's message hub and history buffers, numpy arrays
in training metadata) become inert ``OpaqueObject`` placeholders: their classes are never imported
and nothing of theirs runs. Any other global (``os.system``, ``builtins.exec``...) refuses the
whole file.
"""

from __future__ import annotations

import _compat_pickle
import hashlib
import importlib
import io
import json
import pickle
import types
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from models.checkpoints.errors import CheckpointError

HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
# Objects from these top-level packages are tolerated as inert placeholders (never imported).
TOLERATED_NAMESPACES = frozenset({"mmengine", "mmcv", "mmseg", "mmdet", "numpy"})


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


def weights_file(path: Path) -> Path:
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
    weights = weights_file(path)
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


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
