"""Fused-attention census, the contrib MultiHeadAttention rewrite and the Triton config, on toys.

A toy spatial-reduction attention block (queries over every pixel, keys/values over a strided
reduction, as in SegFormer) exported with torch's dynamo exporter; the rewritten graph is run by
onnxruntime and compared with PyTorch. The Triton config is parsed with Triton's own protobuf
schema (tritonclient's ``model_config_pb2``).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from google.protobuf import text_format
from torch import nn

from export.attention import (
    AttentionError,
    attention_census,
    check_fused_attention,
    expected_attention_nodes,
    to_contrib_attention,
)
from export.triton import triton_config
from tests.triton_schema import triton_schema


class ReductionAttention(nn.Module):
    """SegFormer-style attention: full-length queries, keys/values from a strided conv."""

    def __init__(self, dim: int = 32, heads: int = 2, reduction: int = 4, fused: bool = True):
        super().__init__()
        self.heads, self.fused = heads, fused
        self.query = nn.Linear(dim, dim)
        self.key_value = nn.Linear(dim, 2 * dim)
        self.reduce = nn.Conv2d(dim, dim, reduction, reduction)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, dim, height, width = x.shape
        tokens = x.flatten(2).transpose(1, 2)
        query = self.query(tokens).reshape(batch, -1, self.heads, dim // self.heads).transpose(1, 2)
        reduced = self.reduce(x).flatten(2).transpose(1, 2)
        key, value = (
            self.key_value(reduced)
            .reshape(batch, -1, 2, self.heads, dim // self.heads)
            .permute(2, 0, 3, 1, 4)
        )
        if self.fused:
            out = F.scaled_dot_product_attention(query, key, value)
        else:
            weights = (query @ key.transpose(-1, -2) / (dim // self.heads) ** 0.5).softmax(-1)
            out = weights @ value
        out = self.proj(out.transpose(1, 2).reshape(batch, -1, dim))
        return out.transpose(1, 2).reshape(batch, dim, height, width)


def _export(module: nn.Module, dtype: torch.dtype = torch.float32) -> onnx.ModelProto:
    dynamic = torch.export.Dim.DYNAMIC
    program = torch.onnx.export(
        module.to(dtype).eval(),
        (torch.randn(2, 32, 16, 24, dtype=dtype),),
        dynamo=True,
        opset_version=23,
        dynamic_shapes=({0: dynamic, 2: dynamic, 3: dynamic},),
        verbose=False,
    )
    assert program is not None
    return program.model_proto


@pytest.fixture(scope="module")
def toy() -> nn.Module:
    torch.manual_seed(0)
    return ReductionAttention().eval()


@pytest.fixture(scope="module")
def toy_graph(toy: nn.Module) -> onnx.ModelProto:
    return _export(toy)


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return np.asarray(session.run(None, {session.get_inputs()[0].name: x})[0])


def test_sdpa_exports_as_one_attention_node(toy_graph: onnx.ModelProto) -> None:
    census = check_fused_attention(toy_graph, "onnx", expected=1)
    assert (census.onnx_attention, census.contrib_attention, census.softmax) == (1, 0, 0)


@pytest.mark.parametrize("shape", [(2, 32, 16, 24), (1, 32, 40, 12), (3, 32, 8, 8)])
def test_contrib_rewrite_matches_pytorch(
    toy: nn.Module, toy_graph: onnx.ModelProto, shape: tuple[int, ...]
) -> None:
    rewritten = to_contrib_attention(toy_graph)
    onnx.checker.check_model(rewritten)
    census = check_fused_attention(rewritten, "ort-contrib", expected=1)
    assert census.onnx_attention == 0
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(sum(shape)))
    with torch.no_grad():
        expected = toy(x).numpy()
    actual = _run(rewritten, x.numpy())
    assert actual.shape == expected.shape
    assert np.abs(actual - expected).max() <= 1e-5 * np.abs(expected).max()
    # the rewrite changes nothing else: the standard form computes the same
    assert np.abs(_run(toy_graph, x.numpy()) - actual).max() <= 1e-5 * np.abs(expected).max()


def test_contrib_rewrite_keeps_explicit_scale() -> None:
    class Scaled(nn.Module):
        def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            return F.scaled_dot_product_attention(q, k, v, scale=0.05)

    q, k, v = (torch.randn(1, 2, n, 8) for n in (12, 5, 5))
    program = torch.onnx.export(
        Scaled().eval(), (q, k, v), dynamo=True, opset_version=23, verbose=False
    )
    assert program is not None
    rewritten = to_contrib_attention(program.model_proto)
    session = ort.InferenceSession(
        rewritten.SerializeToString(), providers=["CPUExecutionProvider"]
    )
    names = [i.name for i in session.get_inputs()]
    actual = session.run(None, dict(zip(names, (q.numpy(), k.numpy(), v.numpy()), strict=True)))[0]
    expected = F.scaled_dot_product_attention(q, k, v, scale=0.05).numpy()
    assert np.abs(actual - expected).max() < 1e-6


def test_contrib_rewrite_runs_in_fp16(toy: nn.Module) -> None:
    half_graph = to_contrib_attention(_export(_copy_half(toy), torch.float16))
    x = torch.randn(2, 32, 16, 24)
    with torch.no_grad():
        expected = toy(x).numpy()
    actual = _run(half_graph, x.half().numpy()).astype(np.float32)
    assert np.abs(actual - expected).max() <= 5e-3 * np.abs(expected).max()


def _copy_half(module: nn.Module) -> nn.Module:
    half = ReductionAttention().eval()
    half.load_state_dict(module.state_dict())
    return half.half()


def test_decomposed_attention_is_refused() -> None:
    graph = _export(ReductionAttention(fused=False))
    with pytest.raises(AttentionError, match=r"0 Attention nodes, expected 1.*1 Softmax"):
        check_fused_attention(graph, "onnx", expected=1)


def test_wrong_block_count_and_leftover_form_are_refused(toy_graph: onnx.ModelProto) -> None:
    with pytest.raises(AttentionError, match="1 Attention nodes, expected 2"):
        check_fused_attention(toy_graph, "onnx", expected=2)
    with pytest.raises(AttentionError, match=r"0 MultiHeadAttention.*1 leftover Attention"):
        check_fused_attention(toy_graph, "ort-contrib", expected=1)
    assert attention_census(toy_graph).fused("ort-contrib") == 0


def test_published_block_counts() -> None:
    assert expected_attention_nodes("segformer-b0") == 8
    assert expected_attention_nodes("segformer-b2") == 16
    assert expected_attention_nodes("segformer-b5") == 52
    assert expected_attention_nodes("setr-pup-base") == 12
    assert expected_attention_nodes("setr-mla") == 24
    with pytest.raises(AttentionError, match="no published block count"):
        expected_attention_nodes("segformer-b9")


def test_triton_config_parses_with_tritons_schema() -> None:
    schema = triton_schema()
    text = triton_config(
        "segformer-b0",
        input_name="pixels",
        input_dtype="uint8",
        output_name="logits",
        output_dtype="float32",
        num_classes=150,
        max_batch_size=4,
    )
    config = text_format.Parse(text, schema.ModelConfig())  # type: ignore[attr-defined]
    assert config.name == "segformer-b0"
    assert config.platform == "onnxruntime_onnx"
    assert config.max_batch_size == 4
    assert [(i.name, i.data_type, list(i.dims)) for i in config.input] == [
        ("pixels", schema.TYPE_UINT8, [3, -1, -1])  # type: ignore[attr-defined]
    ]
    assert [(o.name, o.data_type, list(o.dims)) for o in config.output] == [
        ("logits", schema.TYPE_FP32, [150, -1, -1])  # type: ignore[attr-defined]
    ]
    assert config.HasField("dynamic_batching")


@pytest.mark.gpu
def test_default_form_stays_on_the_gpu(toy_graph: onnx.ModelProto, tmp_path: Path) -> None:
    """The default attention form must run on the CUDA provider, not fall back to the CPU."""
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("onnxruntime's CUDA provider is not available (no GPU build or no GPU)")
    from export.bundle_writer import DEFAULT_ATTENTION

    graph = to_contrib_attention(toy_graph) if DEFAULT_ATTENTION == "ort-contrib" else toy_graph
    options = ort.SessionOptions()
    options.enable_profiling = True
    options.profile_file_prefix = str(tmp_path / "profile")
    session = ort.InferenceSession(
        graph.SerializeToString(), options, providers=["CUDAExecutionProvider"]
    )
    session.run(None, {session.get_inputs()[0].name: np.ones((2, 32, 16, 24), np.float32)})
    events = json.loads(Path(session.end_profiling()).read_text())
    fused_op = "MultiHeadAttention" if DEFAULT_ATTENTION == "ort-contrib" else "Attention"
    providers = {
        event["args"].get("provider")
        for event in events
        if event.get("cat") == "Node" and event["args"].get("op_name") == fused_op
    }
    assert providers == {"CUDAExecutionProvider"}
