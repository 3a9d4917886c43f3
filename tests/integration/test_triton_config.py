"""The bundles are Triton model repository entries unchanged: each ``config.pbtxt`` the exporter
writes parses with Triton's own ``ModelConfig`` protobuf (from ``tritonclient``) and agrees with
the ONNX graph beside it the way Triton's onnxruntime backend requires (names, data types, ranks
with the batch axis, dynamic axes, the version directory, the model name)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from google.protobuf import text_format

from export.triton import triton_config
from service.bundle import MODEL_FILE, TRITON_CONFIG_FILE, Bundle, load_bundle
from tests.conftest import write_tiny_bundle
from tests.triton_schema import triton_schema

_ONNX_TO_TRITON = {
    onnx.TensorProto.UINT8: "TYPE_UINT8",
    onnx.TensorProto.FLOAT: "TYPE_FP32",
    onnx.TensorProto.FLOAT16: "TYPE_FP16",
}


SCHEMA = triton_schema()


def parse_config(text: str) -> Any:
    return text_format.Parse(text, SCHEMA.ModelConfig())


def _graph_tensors(values: Any, initializers: set[str]) -> dict[str, tuple[int, list[int | str]]]:
    tensors = {}
    for value in values:
        if value.name in initializers:
            continue
        tensor = value.type.tensor_type
        dims: list[int | str] = [d.dim_param or d.dim_value for d in tensor.shape.dim]
        tensors[value.name] = (tensor.elem_type, dims)
    return tensors


def triton_problems(bundle_dir: Path) -> list[str]:
    """What Triton's onnxruntime backend would refuse when loading ``bundle_dir``; empty = fine."""
    config = parse_config((bundle_dir / TRITON_CONFIG_FILE).read_text())
    problems = []
    if config.name != bundle_dir.name:
        problems.append(f"name {config.name!r} is not the directory name {bundle_dir.name!r}")
    if config.platform != "onnxruntime_onnx" and config.backend != "onnxruntime":
        problems.append(f"platform {config.platform!r} is not onnxruntime_onnx")
    if config.default_model_filename not in ("", "model.onnx"):
        problems.append(f"default_model_filename {config.default_model_filename!r}")
    if not (bundle_dir / MODEL_FILE).is_file():
        problems.append(f"{MODEL_FILE} missing (Triton loads version 1 from 1/model.onnx)")
        return problems
    graph = onnx.load(str(bundle_dir / MODEL_FILE), load_external_data=False).graph
    initializers = {i.name for i in graph.initializer}
    batched = config.max_batch_size > 0
    for kind, declared, actual in (
        ("input", config.input, _graph_tensors(graph.input, initializers)),
        ("output", config.output, _graph_tensors(graph.output, initializers)),
    ):
        if sorted(t.name for t in declared) != sorted(actual):
            problems.append(f"{kind}s {[t.name for t in declared]} vs graph {sorted(actual)}")
            continue
        for tensor in declared:
            elem_type, dims = actual[tensor.name]
            type_name = SCHEMA.DataType.Name(tensor.data_type)
            if _ONNX_TO_TRITON.get(elem_type) != type_name:
                problems.append(f"{tensor.name}: {type_name} vs graph element type {elem_type}")
            if batched:
                if not dims or not isinstance(dims[0], str):
                    problems.append(f"{tensor.name}: graph batch axis {dims[:1]} is not dynamic")
                dims = dims[1:]
            if len(dims) != len(tensor.dims):
                problems.append(f"{tensor.name}: rank {list(tensor.dims)} vs graph {dims}")
                continue
            for want, have in zip(tensor.dims, dims, strict=True):
                if want == -1 and isinstance(have, int) and have > 0:
                    problems.append(f"{tensor.name}: -1 where the graph fixes {have}")
                if want != -1 and isinstance(have, int) and have != want:
                    problems.append(f"{tensor.name}: {want} where the graph has {have}")
    return problems


def check_exported_bundle(bundle: Bundle) -> None:
    assert triton_problems(bundle.path) == []
    config = parse_config((bundle.path / TRITON_CONFIG_FILE).read_text())
    meta = bundle.metadata
    (declared_input,) = config.input
    (declared_output,) = config.output
    assert declared_input.name == meta.input.name
    assert (
        SCHEMA.DataType.Name(declared_input.data_type)
        == _ONNX_TO_TRITON[onnx.helper.np_dtype_to_tensor_dtype(np.dtype(meta.input.dtype))]
    )
    assert declared_output.name == meta.output.name
    assert list(declared_output.dims) == [meta.num_classes, -1, -1]
    assert config.max_batch_size >= 1 and config.HasField("dynamic_batching")


def test_exported_segformer_b0_is_a_triton_model(segformer_b0_bundle: Bundle) -> None:
    """The export a real user runs (random init, ADE20K classes), as the exporter wrote it."""
    check_exported_bundle(segformer_b0_bundle)


@pytest.mark.parametrize("normalized_in_graph", [True, False], ids=["uint8-in", "float32-in"])
@pytest.mark.parametrize("num_classes", [5, 300])
def test_triton_config_matches_graphs_for_both_input_contracts(
    tmp_path: Path, normalized_in_graph: bool, num_classes: int
) -> None:
    """export.triton's text for the graphs of both input contracts (and > 256 classes)."""
    bundle = write_tiny_bundle(
        tmp_path / "tiny-model", normalized_in_graph=normalized_in_graph, num_classes=num_classes
    )
    meta = bundle.metadata
    (bundle.path / TRITON_CONFIG_FILE).write_text(
        triton_config(
            bundle.name,
            input_name=meta.input.name,
            input_dtype=meta.input.dtype,
            output_name=meta.output.name,
            output_dtype=meta.output.dtype,
            num_classes=meta.num_classes,
        )
    )
    check_exported_bundle(load_bundle(bundle.path))


def test_checker_catches_what_triton_would_refuse(tmp_path: Path) -> None:
    bundle = write_tiny_bundle(tmp_path / "tiny")
    meta = bundle.metadata

    def config(**overrides: Any) -> str:
        arguments: dict[str, Any] = {
            "input_name": meta.input.name,
            "input_dtype": meta.input.dtype,
            "output_name": meta.output.name,
            "output_dtype": meta.output.dtype,
            "num_classes": meta.num_classes,
        }
        return triton_config(overrides.pop("name", "tiny"), **(arguments | overrides))

    cases = {
        "not the directory name": config(name="other"),
        "TYPE_FP32 vs graph element type": config(input_dtype="float32"),
        "where the graph has 5": config(num_classes=7),
        "vs graph": config(output_name="scores"),
    }
    for expected, text in cases.items():
        (bundle.path / TRITON_CONFIG_FILE).write_text(text)
        problems = triton_problems(bundle.path)
        assert any(expected in p for p in problems), (expected, problems)
    with pytest.raises(text_format.ParseError):
        parse_config(config() + "max_batch_sise: 4\n")
