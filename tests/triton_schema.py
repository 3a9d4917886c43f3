"""Triton's own ``ModelConfig`` protobuf schema, for parsing the config.pbtxt files we write."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType


def triton_schema() -> ModuleType:
    """tritonclient's generated ``model_config_pb2``, loaded from its file: importing it through
    ``tritonclient.grpc`` would demand the grpc extra, which the schema does not need."""
    spec = importlib.util.find_spec("tritonclient")
    assert spec is not None and spec.submodule_search_locations
    path = Path(next(iter(spec.submodule_search_locations))) / "grpc" / "model_config_pb2.py"
    module_spec = importlib.util.spec_from_file_location("triton_model_config_pb2", path)
    assert module_spec is not None and module_spec.loader is not None
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module
