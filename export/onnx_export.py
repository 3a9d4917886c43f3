"""PyTorch model -> ONNX graph with uint8 pixels in, float32 logits out, attention fused.

The exported graph takes raw RGB bytes (NCHW uint8) and normalises inside the graph (the choice
and its measurement are in docs/export.md), runs the model in the requested precision and always
returns float32 logits at the model's native stride. Batch, height and width are dynamic.
After ``torch.onnx.export(dynamo=True)`` the graph gets, in order: the optional contrib-attention
rewrite, onnxruntime's *basic* offline optimisations (semantics-preserving, provider-independent:
constant folding, Conv+BatchNorm folding, redundant node removal; the extended and layout levels
emit provider-specific ops, so they are left to load time), then the fused-attention census.
"""

from __future__ import annotations

import copy
import re
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import onnx
import onnxruntime as ort
import torch
from torch import nn

from export.attention import (
    AttentionCensus,
    AttentionForm,
    check_fused_attention,
    to_contrib_attention,
)
from export.decoder_fold import fold_for_inference

Precision = Literal["fp32", "fp16"]
INPUT_NAME = "pixels"
OUTPUT_NAME = "logits"
MIN_OPSET = 23  # the first opset with the standard Attention operator
# Example input for tracing: batch 2 and a non-square size so no dimension is specialised.
_TRACE_SHAPE = (2, 3, 128, 160)


class OnnxExportError(ValueError):
    """torch.onnx.export failed or produced a graph that breaks the bundle contract."""


class PixelsToLogits(nn.Module):
    """uint8 RGB NCHW -> normalised -> model (in its precision) -> float32 logits."""

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(
        self,
        model: nn.Module,
        mean: tuple[float, float, float],
        std: tuple[float, float, float],
        precision: Precision,
    ) -> None:
        super().__init__()
        self.model = model
        self.compute_dtype = torch.float16 if precision == "fp16" else torch.float32
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        normalised = (pixels.to(torch.float32) - self.mean) / self.std
        return self.model(normalised.to(self.compute_dtype)).to(torch.float32)


@dataclass(frozen=True)
class ExportedGraph:
    model: onnx.ModelProto
    census: AttentionCensus


def export_onnx(
    model: nn.Module,
    *,
    mean: tuple[float, float, float],
    std: tuple[float, float, float],
    precision: Precision,
    opset: int,
    attention: AttentionForm,
    expected_attention: int,
    progress: Callable[[str], None],
) -> ExportedGraph:
    """Export ``model`` (float32, eval) and return the checked, optimised graph."""
    if opset < MIN_OPSET:
        raise OnnxExportError(f"opset {opset} has no fused Attention operator; use {MIN_OPSET}+")
    graph_model = fold_for_inference(copy.deepcopy(model).eval())
    if precision == "fp16":
        graph_model = graph_model.half()
    wrapper = PixelsToLogits(graph_model, mean, std, precision).eval()
    example = torch.randint(0, 256, _TRACE_SHAPE, dtype=torch.uint8)
    dynamic = torch.export.Dim.DYNAMIC
    progress(f"torch.onnx.export (dynamo, opset {opset}, {precision})")
    try:
        with torch.no_grad():
            program = torch.onnx.export(
                wrapper,
                (example,),
                dynamo=True,
                opset_version=opset,
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                dynamic_shapes=({0: dynamic, 2: dynamic, 3: dynamic},),
                verbose=False,
            )
    except Exception as exc:  # the exporter raises many types; all mean "not exportable"
        raise OnnxExportError(f"torch.onnx.export failed: {type(exc).__name__}: {exc}") from exc
    if program is None:
        raise OnnxExportError("torch.onnx.export returned no program")
    proto = program.model_proto
    _require_dynamic_input(proto)
    _name_dynamic_axes(proto)
    if precision == "fp16":
        _accumulate_softmax_in_float(proto)
    if attention == "ort-contrib":
        progress("rewriting Attention -> com.microsoft.MultiHeadAttention")
        proto = to_contrib_attention(proto)
    progress("onnxruntime basic offline optimisation (BatchNorm folding, constant folding)")
    proto = optimise_offline(proto)
    leftover_norms = [n.name for n in proto.graph.node if n.op_type == "BatchNormalization"]
    if leftover_norms:
        raise OnnxExportError(f"BatchNormalization not folded into a conv: {leftover_norms}")
    census = check_fused_attention(proto, attention, expected_attention)
    return ExportedGraph(model=proto, census=census)


def optimise_offline(model: onnx.ModelProto) -> onnx.ModelProto:
    """onnxruntime's basic-level optimisations, saved: exact and portable across providers."""
    with tempfile.TemporaryDirectory(prefix="segserve-ort-opt-") as scratch:
        optimised = Path(scratch) / "optimised.onnx"
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        options.optimized_model_filepath = str(optimised)
        try:
            ort.InferenceSession(
                model.SerializeToString(), options, providers=["CPUExecutionProvider"]
            )
        except Exception as exc:  # onnxruntime's pybind errors share no useful base class
            raise OnnxExportError(f"onnxruntime cannot load the exported graph: {exc}") from exc
        result = onnx.load(str(optimised))
    # onnxruntime declares every domain it knows; keep only those the graph uses (portability).
    used = {node.domain or "" for node in result.graph.node}
    kept = [o for o in result.opset_import if (o.domain or "") in used | {"", "ai.onnx"}]
    del result.opset_import[:]
    result.opset_import.extend(kept)
    return result


def _require_dynamic_input(model: onnx.ModelProto) -> None:
    dims = model.graph.input[0].type.tensor_type.shape.dim
    fixed = [axis for axis in (0, 2, 3) if dims[axis].HasField("dim_value")]
    if fixed:
        names = ", ".join(("batch", "channels", "height", "width")[a] for a in fixed)
        raise OnnxExportError(f"export fixed the input's {names}; the model must trace dynamically")


def _accumulate_softmax_in_float(model: onnx.ModelProto) -> None:
    """fp16 graphs: ask Attention nodes for a float32 softmax (LayerNormalization's stash_type
    already defaults to float32 accumulation, and the exporter keeps it)."""
    for node in model.graph.node:
        if node.op_type == "Attention" and (node.domain or "") == "":
            kept = [a for a in node.attribute if a.name != "softmax_precision"]
            del node.attribute[:]
            node.attribute.extend(kept)
            node.attribute.append(
                onnx.helper.make_attribute("softmax_precision", onnx.TensorProto.FLOAT)
            )


def _name_dynamic_axes(model: onnx.ModelProto) -> None:
    """Rename the exporter's symbols (s0, s81...) to batch/height/width in every shape."""
    dims = model.graph.input[0].type.tensor_type.shape.dim
    names = {dims[0].dim_param: "batch", dims[2].dim_param: "height", dims[3].dim_param: "width"}
    symbol = re.compile(r"\b(" + "|".join(re.escape(s) for s in names) + r")\b")
    for value in [*model.graph.input, *model.graph.value_info, *model.graph.output]:
        for dim in value.type.tensor_type.shape.dim:
            if dim.HasField("dim_param"):
                dim.dim_param = symbol.sub(lambda m: names[m.group(1)], dim.dim_param)


def graph_io(model: onnx.ModelProto) -> dict[str, Any]:
    """Names, element types and shapes (ints or symbolic names) of the graph's input/output."""

    def describe(value: onnx.ValueInfoProto) -> tuple[str, str, list[int | str]]:
        tensor = value.type.tensor_type
        dims: list[int | str] = [
            d.dim_value if d.HasField("dim_value") else (d.dim_param or "?")
            for d in tensor.shape.dim
        ]
        return value.name, onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type).name, dims

    return {"input": describe(model.graph.input[0]), "output": describe(model.graph.output[0])}
