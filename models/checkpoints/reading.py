"""Bytes on disk -> (state dict, metadata), running no code from the file.

``.safetensors`` needs no unpickling at all. ``.pth``/``.bin`` go through ``torch.load`` with
``RestrictedUnpickler`` as its pickle module, after ``_check_archive`` has looked at the file:

* A TorchScript archive (a zip holding ``constants.pkl``) is refused before ``torch.load`` sees
  it: ``torch.load`` would hand it to ``torch.jit.load``, which ignores the pickle module and runs
  the archive's ``__setstate__`` code. Compressed zip entries (``torch.save`` writes none) and
  damaged or truncated archives are refused too, so nothing is inflated or half-read.
* The unpickler resolves only tensor rebuilders, storages, dtypes, plain containers and numpy's
  array reconstruction. Classes from mmengine, mmcv, mmseg and mmdet (message hub, history
  buffers, config dicts) become inert ``OpaqueObject`` stand-ins: never imported, nothing of
  theirs runs. Any other global (``os.system``, ``builtins.exec``...) refuses the whole file.
* What the pickle allocates is bounded by the file's size: storages, ``bytearray(n)``,
  ``bytes(n)``, ``_codecs.encode`` and numpy arrays are checked before they are made, each
  against the file's size and all of them against twice that (and 1 MiB), so a 30-byte pickle
  cannot ask for 64 GiB nor 6000 small pickles for 360 MB. Storage classes resolve to inert tags
  (torch's loader only reads their dtype), and numpy arrays are filled only from bytes of exactly
  their size, never with Python objects (numpy's ``__setstate__`` reads past a short object
  list: a crafted 1 KB file crashed the process).

Why not ``torch.load(weights_only=True)`` with an allow-list: its unpickler accepts
``bytearray(n)`` for any ``n`` and offers no hook to bound allocations, and its stand-ins must be
named class by class in advance, where mmengine checkpoints carry whatever classes the training
run put in ``meta`` and ``message_hub``.
"""

from __future__ import annotations

import _compat_pickle
import contextvars
import hashlib
import importlib
import io
import json
import math
import pickle
import types
import zipfile
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open

from models.checkpoints.errors import CheckpointError

HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
# Objects from these top-level packages are tolerated as inert placeholders (never imported).
TOLERATED_NAMESPACES = frozenset({"mmengine", "mmcv", "mmseg", "mmdet"})


class _Budget:
    """What one file's pickle may allocate: each allocation at most the file's size (what real
    data can fill), all of them at most twice that and 1 MiB; a storage is charged once however
    many tensors share it."""

    def __init__(self, file_size: int) -> None:
        self.file_size = file_size
        self.left = 2 * file_size + (1 << 20)
        self.storages: set[object] = set()


_ALLOCATION_BUDGET: contextvars.ContextVar[_Budget] = contextvars.ContextVar("allocation_budget")


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


def _opaque_type(qualified_name: str) -> type[OpaqueObject]:
    name = qualified_name.rsplit(".", 1)[-1]
    return type(name, (OpaqueObject,), {"qualified_name": qualified_name})


class _UnsafeGlobal(pickle.UnpicklingError):
    def __init__(self, qualified_name: str) -> None:
        super().__init__(qualified_name)
        self.qualified_name = qualified_name


class _OverBudget(pickle.UnpicklingError):
    """An allocation larger than the file could fill."""


def _check_allocation(nbytes: int, what: str) -> None:
    budget = _ALLOCATION_BUDGET.get()
    if nbytes > budget.file_size:
        raise _OverBudget(f"{what} of {nbytes} bytes from a {budget.file_size}-byte file")
    if nbytes > budget.left:
        raise _OverBudget(
            f"{what} of {nbytes} bytes after allocations that took all but {budget.left} "
            f"bytes of what a {budget.file_size}-byte file may"
        )
    budget.left -= nbytes


def _bounded_encode(text: object, encoding: object = "utf-8") -> bytes:
    """``_codecs.encode`` as protocol-2 pickles use it, ``(str, "latin1")`` -> bytes, only:
    other codecs (hex doubles its input, and calls chain) are refused."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise _UnsafeGlobal(f"_codecs.encode with {type(text).__name__} and {encoding!r}")
    _check_allocation(len(text), "bytes")
    return text.encode("latin-1")


def _bounded_bytearray(*args: Any) -> bytearray:
    if args and isinstance(args[0], int):
        _check_allocation(args[0], "bytearray")
    return bytearray(*args)


def _bounded_bytes(*args: Any) -> bytes:
    if args and isinstance(args[0], int):
        _check_allocation(args[0], "bytes")
    return bytes(*args)


class _NDArrayType:
    """Stands in for ``numpy.ndarray`` where a pickle names it: usable only as the subtype
    argument of ``_reconstruct``, so the pickle cannot call ``ndarray(shape)`` itself."""


class _CheckedArray(np.ndarray):
    """The array ``_reconstruct`` makes: its ``__setstate__`` (which the pickle calls next with a
    shape, dtype and data of its choosing) takes only plain dtypes and bytes of exactly the
    size the shape and dtype need, within the budget; numpy's own reads past a short list of
    objects."""

    def __setstate__(self, state: Any) -> None:
        if not (isinstance(state, tuple) and len(state) == 5):
            raise _UnsafeGlobal("numpy array state of an unknown form")
        _, shape, dtype, _, data = state
        if not isinstance(dtype, np.dtype) or dtype.hasobject:
            raise _UnsafeGlobal(f"numpy array of dtype {dtype!r}")
        if not isinstance(shape, tuple) or not all(
            isinstance(side, int) and side >= 0 for side in shape
        ):
            raise _UnsafeGlobal(f"numpy array of shape {shape!r}")
        nbytes = math.prod(shape) * dtype.itemsize
        if not isinstance(data, bytes | bytearray) or len(data) != nbytes:
            raise _UnsafeGlobal(f"numpy array data that is not {nbytes} bytes")
        _check_allocation(nbytes, "numpy array")
        super().__setstate__(state)


def _bounded_reconstruct(subtype: object, shape: Any, dtype: Any) -> np.ndarray:
    """numpy's ``_reconstruct`` (an empty array that ``__setstate__`` then fills from the
    pickle's own bytes), refusing shapes larger than the file; checked again at ``__setstate__``
    (``_CheckedArray``)."""
    if subtype is not _NDArrayType or not isinstance(dtype, bytes | str):
        raise _UnsafeGlobal("numpy._core.multiarray._reconstruct with a non-array subtype")
    code = dtype.decode("latin-1") if isinstance(dtype, bytes) else dtype
    count = math.prod(int(side) for side in np.atleast_1d(shape))
    _check_allocation(count * np.dtype(code).itemsize, "numpy array")
    return _CheckedArray(shape, dtype=code)


def _inert_getattr(owner: object, name: str) -> object:
    """``getattr`` as pickles spell a method reference (``HistoryBuffer.min``): allowed only on a
    stand-in, and answered with another stand-in."""
    if isinstance(owner, OpaqueObject) or (
        isinstance(owner, type) and issubclass(owner, OpaqueObject)
    ):
        return _opaque_type(f"{owner.qualified_name}.{name}")
    raise _UnsafeGlobal(f"builtins.getattr on {type(owner).__name__}")


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
    }
)


class _StorageTag:
    """Stands in for a storage class where a pickle names it (``torch.FloatStorage``, the
    untyped one): torch's loader reads only its ``dtype``; calling it, which would allocate
    outside the budget, is refused."""

    def __init__(self, qualified_name: str, dtype: torch.dtype) -> None:
        self.qualified_name = qualified_name
        self.dtype = dtype

    def __call__(self, *args: Any, **kwargs: Any) -> None:
        raise _UnsafeGlobal(f"{self.qualified_name} called")


def _storage_tag(module: str, name: str) -> _StorageTag | None:
    """The tag of a storage class a pickle names, None for any other name."""
    if (module, name) in (("torch.storage", "UntypedStorage"), ("torch", "UntypedStorage")):
        return _StorageTag(f"{module}.{name}", torch.uint8)
    if module in ("torch", "torch.storage") and name.endswith("Storage"):
        storage = getattr(torch, name, None)
        dtype = getattr(storage, "dtype", None)
        if isinstance(dtype, torch.dtype):
            return _StorageTag(f"{module}.{name}", dtype)
    return None


_SAFE_GLOBALS: dict[str, object] = {
    "collections.OrderedDict": OrderedDict,
    "builtins.set": set,
    "builtins.frozenset": frozenset,
    "builtins.slice": slice,
    "builtins.complex": complex,
    "builtins.bytearray": _bounded_bytearray,
    "builtins.bytes": _bounded_bytes,  # protocol 2 spells b"" as bytes()
    "builtins.getattr": _inert_getattr,
    "_codecs.encode": _bounded_encode,  # protocol-2 pickles spell bytes this way
    # numpy arrays (mmengine's history buffers): numpy 2 and numpy 1 module names
    "numpy._core.multiarray._reconstruct": _bounded_reconstruct,
    "numpy.core.multiarray._reconstruct": _bounded_reconstruct,
    "numpy.ndarray": _NDArrayType,
    "numpy.dtype": np.dtype,
    "numpy._core.multiarray.scalar": np._core.multiarray.scalar,  # type: ignore[attr-defined]
    "numpy.core.multiarray.scalar": np._core.multiarray.scalar,  # type: ignore[attr-defined]
}


def _resolve_safe_global(module: str, name: str) -> object:
    qualified = f"{module}.{name}"
    if qualified in _SAFE_GLOBALS:
        return _SAFE_GLOBALS[qualified]
    if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
        return getattr(torch, name)
    tag = _storage_tag(module, name)
    if tag is not None:
        return tag
    if qualified in _SAFE_TORCH_FUNCTIONS:
        return getattr(importlib.import_module(module), name)
    if module == "numpy.dtypes" and name.endswith("DType"):  # numpy 2's dtype classes
        return np.dtype
    if module.split(".")[0] in TOLERATED_NAMESPACES:
        return _opaque_type(qualified)
    raise _UnsafeGlobal(qualified)


def _storage_bytes(storage_type: object, numel: object) -> int:
    dtype = getattr(storage_type, "dtype", torch.uint8)
    itemsize = torch.empty((), dtype=dtype).element_size() if isinstance(dtype, torch.dtype) else 1
    return int(numel) * itemsize if isinstance(numel, int) else 0


class RestrictedUnpickler(pickle.Unpickler):
    """Resolves only the globals a weights file needs; see the module docstring."""

    def find_class(self, module: str, name: str) -> Any:
        # Protocol-2 pickles (torch.save's default) spell builtins with Python 2 names.
        module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        return _resolve_safe_global(module, name)

    # torch.load installs its storage loader as ``persistent_load``; this wraps it so every
    # storage's declared size is checked before torch allocates it.
    @property
    def persistent_load(self) -> Callable[[Any], Any]:
        return self._persistent_load

    @persistent_load.setter
    def persistent_load(self, load: Callable[[Any], Any]) -> None:
        def bounded(pid: Any) -> Any:
            if isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage":
                seen = _ALLOCATION_BUDGET.get().storages
                if pid[2] not in seen:  # torch loads a shared storage once
                    _check_allocation(_storage_bytes(pid[1], pid[4]), "tensor storage")
                    seen.add(pid[2])
            return load(pid)

        self._persistent_load = bounded
        pickle.Unpickler.persistent_load.__set__(self, bounded)  # type: ignore[attr-defined]


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
    for name in HF_WEIGHT_FILES:
        if (path / f"{name}.index.json").is_file():
            raise CheckpointError(
                f"{path}: a sharded save ({name}.index.json and its shards), which the exporter "
                "does not read; save the model in one file (save_pretrained with a "
                'max_shard_size above its size, e.g. "10GB")'
            )
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


def _check_archive(path: Path, size: int) -> None:
    """Refuse what ``torch.load`` must never see: TorchScript, compressed or damaged zips."""
    with path.open("rb") as handle:
        magic = handle.read(4)
    if magic != b"PK\x03\x04":
        return  # torch's legacy (pre-1.6) format: a plain pickle stream
    try:
        with zipfile.ZipFile(path) as archive:
            entries = archive.infolist()
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: a damaged or truncated zip archive ({exc})") from exc
    for entry in entries:
        if entry.filename.endswith("constants.pkl") or "/code/" in entry.filename:
            raise CheckpointError(
                f"{path}: refused, a TorchScript archive (torch.jit.save), not a checkpoint: "
                "torch.load would run its code through torch.jit.load"
            )
        if entry.compress_type != zipfile.ZIP_STORED or entry.file_size > size:
            raise CheckpointError(
                f"{path}: refused, zip entry {entry.filename} is compressed "
                f"({entry.compress_size} -> {entry.file_size} bytes); torch.save stores entries "
                "uncompressed, and inflating it could exhaust memory"
            )


def _read_pickle(path: Path) -> object:
    size = path.stat().st_size
    _check_archive(path, size)
    budget = _ALLOCATION_BUDGET.set(_Budget(size))
    try:
        return torch.load(
            path, map_location="cpu", pickle_module=_restricted_pickle, weights_only=False
        )
    except _UnsafeGlobal as exc:
        raise CheckpointError(
            f"{path}: refused, the pickle references {exc.qualified_name!r}, which could run "
            "code; only tensors, plain containers and inert framework metadata are accepted"
        ) from exc
    except _OverBudget as exc:
        raise CheckpointError(f"{path}: refused, the pickle asks for a {exc}") from exc
    except Exception as exc:  # a malformed pickle can fail in any way; all mean "unreadable"
        raise CheckpointError(
            f"{path}: not a readable PyTorch checkpoint ({type(exc).__name__}: {exc})"
        ) from exc
    finally:
        _ALLOCATION_BUDGET.reset(budget)


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
