"""Fused attention in the exported graph: the census that proves it and the contrib rewrite.

torch's dynamo exporter at opset 23 turns each ``scaled_dot_product_attention`` call into one
standard ONNX ``Attention`` node. onnxruntime's other fused form,
``com.microsoft.MultiHeadAttention``, is not produced by any exporter or by onnxruntime's
transformer optimizer from that graph, so ``to_contrib_attention`` rewrites each ``Attention``
node into it: the contrib op wants (batch, sequence, heads * head_size) tensors where ``Attention``
takes (batch, heads, sequence, head_size), so the rewrite wraps it in Transpose/Reshape pairs
(onnxruntime's transpose optimizer cancels them against the model's own).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Literal

import numpy as np
import onnx
from onnx import helper, numpy_helper

AttentionForm = Literal["onnx", "ort-contrib"]
ATTENTION_FORMS: tuple[AttentionForm, ...] = ("onnx", "ort-contrib")
CONTRIB_DOMAIN = "com.microsoft"

# (domain, op_type) of the fused node each form must contain.
FUSED_OP: dict[AttentionForm, tuple[str, str]] = {
    "onnx": ("", "Attention"),
    "ort-contrib": (CONTRIB_DOMAIN, "MultiHeadAttention"),
}

# Transformer blocks per published variant (SegFormer paper Table 6 / mmseg mit configs; ViT-B
# and ViT-L for SETR). Independent of our model code, so a model that silently lost or
# duplicated blocks fails the census.
_SEGFORMER_DEPTHS = {
    "b0": (2, 2, 2, 2),
    "b1": (2, 2, 2, 2),
    "b2": (3, 4, 6, 3),
    "b3": (3, 4, 18, 3),
    "b4": (3, 8, 27, 3),
    "b5": (3, 6, 40, 3),
}
# SETR names its ViT-B variants "*-base"; the unsuffixed ones are ViT-L as in the paper.
_VIT_DEPTH_BASE, _VIT_DEPTH_LARGE = 12, 24


class AttentionError(ValueError):
    """The graph does not hold exactly one fused attention node per transformer block."""


def expected_attention_nodes(variant: str) -> int:
    """Published transformer-block count of ``variant`` (one fused attention node each)."""
    arch, _, rest = variant.partition("-")
    if arch == "segformer" and rest in _SEGFORMER_DEPTHS:
        return sum(_SEGFORMER_DEPTHS[rest])
    if arch == "setr" and rest.split("-")[0] in ("naive", "pup", "mla"):
        return _VIT_DEPTH_BASE if rest.endswith("-base") else _VIT_DEPTH_LARGE
    raise AttentionError(f"no published block count for variant {variant!r}")


@dataclass(frozen=True)
class AttentionCensus:
    """What the graph holds: fused nodes of each form and any decomposed-attention Softmax."""

    onnx_attention: int
    contrib_attention: int
    softmax: int

    def fused(self, form: AttentionForm) -> int:
        return self.onnx_attention if form == "onnx" else self.contrib_attention


def attention_census(model: onnx.ModelProto) -> AttentionCensus:
    counts = Counter((node.domain or "", node.op_type) for node in _all_nodes(model.graph))
    return AttentionCensus(
        onnx_attention=counts[FUSED_OP["onnx"]],
        contrib_attention=counts[FUSED_OP["ort-contrib"]],
        softmax=counts[("", "Softmax")],
    )


def check_fused_attention(
    model: onnx.ModelProto, form: AttentionForm, expected: int
) -> AttentionCensus:
    """Raise AttentionError unless the graph has ``expected`` nodes of ``form`` and nothing else.

    A Softmax anywhere means some attention was decomposed into MatMul/Softmax/MatMul (neither
    SegFormer's nor SETR's heads use one), and a node of the other fused form means a rewrite
    was partial.
    """
    census = attention_census(model)
    other: AttentionForm = "ort-contrib" if form == "onnx" else "onnx"
    problems = []
    if census.fused(form) != expected:
        op = FUSED_OP[form][1]
        problems.append(f"{census.fused(form)} {op} nodes, expected {expected} (one per block)")
    if census.softmax:
        problems.append(f"{census.softmax} Softmax nodes (attention decomposed)")
    if census.fused(other):
        problems.append(f"{census.fused(other)} leftover {FUSED_OP[other][1]} nodes")
    if problems:
        raise AttentionError(f"attention not fused as {form!r}: " + "; ".join(problems))
    return census


def to_contrib_attention(model: onnx.ModelProto) -> onnx.ModelProto:
    """Rewrite every ONNX ``Attention`` node into ``com.microsoft.MultiHeadAttention``.

    Only the plain form SDPA exports is accepted (4-D inputs, no mask, not causal, no softcap,
    no extra outputs); anything else raises AttentionError rather than changing semantics.
    """
    model = onnx.shape_inference.infer_shapes(model)
    shapes = _static_shapes(model.graph)
    graph = model.graph
    rewritten: list[onnx.NodeProto] = []
    for node in graph.node:
        if (node.domain or "") == "" and node.op_type == "Attention":
            rewritten.extend(_contrib_nodes(node, shapes, graph))
        else:
            rewritten.append(node)
    del graph.node[:]
    graph.node.extend(rewritten)
    del graph.value_info[:]
    if not any(op.domain == CONTRIB_DOMAIN for op in model.opset_import):
        model.opset_import.append(helper.make_opsetid(CONTRIB_DOMAIN, 1))
    return model


def _contrib_nodes(
    node: onnx.NodeProto, shapes: dict[str, list[int | None]], graph: onnx.GraphProto
) -> list[onnx.NodeProto]:
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    if len(node.input) != 3 or len(node.output) != 1:
        raise AttentionError(f"{node.name}: only q/k/v attention without mask can be rewritten")
    if attrs.get("is_causal", 0) or attrs.get("softcap", 0.0) or attrs.get("qk_matmul_output_mode"):
        raise AttentionError(f"{node.name}: causal/softcap attention cannot be rewritten")
    query, key, value = node.input
    heads_and_sizes = [shapes.get(name) for name in (query, key, value)]
    if any(s is None or len(s) != 4 or None in s[1:2] + s[3:] for s in heads_and_sizes):
        raise AttentionError(f"{node.name}: needs 4-D q/k/v with static heads and head size")
    q_shape, k_shape, v_shape = heads_and_sizes
    assert q_shape is not None and k_shape is not None and v_shape is not None
    num_heads, v_head_size = q_shape[1], v_shape[3]
    if k_shape[1] != num_heads or v_shape[1] != num_heads:
        raise AttentionError(f"{node.name}: grouped-query attention cannot be rewritten")
    assert num_heads is not None and v_head_size is not None

    prefix = node.name or node.output[0]
    flat_shape = f"{prefix}/flat_shape"
    split_shape = f"{prefix}/split_shape"
    graph.initializer.extend(
        [
            numpy_helper.from_array(np.array([0, 0, -1], dtype=np.int64), flat_shape),
            numpy_helper.from_array(
                np.array([0, 0, num_heads, v_head_size], dtype=np.int64), split_shape
            ),
        ]
    )
    nodes = []
    flat_inputs = []
    for role, name in zip(("q", "k", "v"), (query, key, value), strict=True):
        nodes.append(
            helper.make_node("Transpose", [name], [f"{prefix}/{role}_bsnh"], perm=[0, 2, 1, 3])
        )
        nodes.append(
            helper.make_node("Reshape", [f"{prefix}/{role}_bsnh", flat_shape], [f"{prefix}/{role}"])
        )
        flat_inputs.append(f"{prefix}/{role}")
    fused = helper.make_node(
        "MultiHeadAttention",
        flat_inputs,
        [f"{prefix}/mha"],
        name=f"{prefix}/MultiHeadAttention",
        domain=CONTRIB_DOMAIN,
        num_heads=int(num_heads),
    )
    if "scale" in attrs:  # absent means 1/sqrt(head_size) in both operators
        fused.attribute.append(helper.make_attribute("scale", float(attrs["scale"])))
    nodes.append(fused)
    nodes.append(helper.make_node("Reshape", [f"{prefix}/mha", split_shape], [f"{prefix}/y_bsnh"]))
    nodes.append(
        helper.make_node("Transpose", [f"{prefix}/y_bsnh"], [node.output[0]], perm=[0, 2, 1, 3])
    )
    return nodes


def _static_shapes(graph: onnx.GraphProto) -> dict[str, list[int | None]]:
    shapes: dict[str, list[int | None]] = {}
    for info in [*graph.input, *graph.value_info, *graph.output]:
        tensor = info.type.tensor_type
        if tensor.HasField("shape"):
            shapes[info.name] = [
                d.dim_value if d.HasField("dim_value") else None for d in tensor.shape.dim
            ]
    return shapes


def _all_nodes(graph: onnx.GraphProto) -> list[onnx.NodeProto]:
    """Nodes of the graph and of every subgraph (If/Loop bodies)."""
    nodes = []
    for node in graph.node:
        nodes.append(node)
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.GRAPH:
                nodes.extend(_all_nodes(attribute.g))
            for subgraph in attribute.graphs:
                nodes.extend(_all_nodes(subgraph))
    return nodes
