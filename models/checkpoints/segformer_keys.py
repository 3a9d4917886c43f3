"""SegFormer checkpoints: three published key layouts mapped onto ``models.segformer`` names.

* ``hf``: a HuggingFace ``transformers`` directory (``config.json`` + ``model.safetensors`` or
  ``pytorch_model.bin``), keys ``segformer.encoder.*`` / ``decode_head.linear_c.*``;
* ``nvlabs``: the official NVlabs release (mmseg 0.x / mmcv 1.x), keys
  ``backbone.block1.0.attn.kv.weight``, ``decode_head.linear_c4.proj.weight``;
* ``mmseg``: mmsegmentation 1.x, keys ``backbone.layers.0.1.0.attn.attn.in_proj_weight``,
  ``decode_head.convs.0.conv.weight``, ``decode_head.conv_seg.weight``.

Loading is strict: every source key must be consumed, every model key filled, every shape must
match; the error names the keys and the format assumed. Two documented exceptions are dropped by
name: ``auxiliary_head.*`` (training-only heads) and, for NVlabs, ``decode_head.conv_seg.*`` (a
classifier its base class creates but ``SegFormerHead`` never uses; ``linear_pred`` is the real
one). Like timm's per-architecture ``checkpoint_filter_fn``, this module owns everything about
its architecture's checkpoints: recognising them, naming the variant, renaming the keys.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from models.checkpoints.errors import CheckpointError
from models.segformer import (
    HF_NORM_EPS,
    MMSEG_NORM_EPS,
    NVLABS_NORM_EPS,
    PATCH_SIZES,
    SR_RATIOS,
    VARIANTS,
    DecoderFlavour,
    LayerNormEps,
    SegFormer,
)

FORMATS = ("hf", "nvlabs", "mmseg")
DROPPED_PREFIXES: dict[str, tuple[str, ...]] = {
    "hf": ("auxiliary_head.",),
    "nvlabs": ("auxiliary_head.", "decode_head.conv_seg."),
    "mmseg": ("auxiliary_head.",),
}
CLASSIFIER_KEYS = {
    "hf": "decode_head.classifier.weight",
    "nvlabs": "decode_head.linear_pred.weight",
    "mmseg": "decode_head.conv_seg.weight",
}
DECODERS: dict[str, DecoderFlavour] = {"hf": "hf", "nvlabs": "hf", "mmseg": "mmseg"}
NORM_EPS: dict[str, LayerNormEps] = {
    "hf": HF_NORM_EPS,
    "nvlabs": NVLABS_NORM_EPS,
    "mmseg": MMSEG_NORM_EPS,
}


def detect(state_dict: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> str | None:
    """The SegFormer layout the tell-tale keys show, or None."""
    keys = state_dict.keys()
    if "hf_config" in meta or any(k.startswith("segformer.encoder.") for k in keys):
        return "hf"
    if any(k.startswith("backbone.block1.") for k in keys):
        return "nvlabs"
    if any(k.startswith("backbone.layers.") for k in keys):
        return "mmseg"
    return None


def load(
    state_dict: dict[str, torch.Tensor],
    meta: dict[str, Any],
    fmt: str,
    model_name: str | None,
    where: str,
) -> SegFormer:
    """Build the variant the weights describe and load them into it strictly."""
    name, decoder_dim = detect_variant(state_dict, meta, fmt, where)
    if model_name is not None and model_name != name:
        raise CheckpointError(
            f"{where}: checkpoint holds {name} (read from the {fmt} weights), "
            f"not the requested {model_name}"
        )
    if not any(key.startswith("decode_head.") for key in state_dict):
        raise CheckpointError(
            f"{where}: holds a {name} encoder without a decode head (no decode_head.* keys: "
            "a transformers SegformerModel, or an ImageNet-pretrained MiT backbone); export a "
            "checkpoint trained for segmentation (SegformerForSemanticSegmentation, or mmseg's "
            "or NVlabs' whole model)"
        )
    num_classes = _shape0(state_dict, CLASSIFIER_KEYS[fmt], where, fmt)
    model = SegFormer(
        name,
        num_classes,
        decoder=DECODERS[fmt],
        norm_eps=NORM_EPS[fmt],
        decoder_dim=decoder_dim,
    )
    model.load_state_dict(convert_state_dict(state_dict, fmt, model, where), strict=True)
    return model


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


def _variant_from_sizes(embed_dims: tuple[int, ...], depths: tuple[int, ...], where: str) -> str:
    """The variant is the encoder's; the decoder width is whatever the checkpoint has (mmseg's
    B2-B5 configs keep B0's 256 where the paper, NVlabs and HF use 768)."""
    for name, spec in VARIANTS.items():
        if spec.embed_dims == embed_dims and spec.depths == depths:
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


def _hf_variant(config: dict[str, Any], where: str) -> tuple[str, int]:
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
    return _variant_from_sizes(dims, depths, where), decoder_dim


def detect_variant(
    state_dict: dict[str, torch.Tensor], meta: dict[str, Any], fmt: str, where: str
) -> tuple[str, int]:
    """Variant and decoder width, from the HF config or from tensor shapes (embed dims, depths,
    fuse conv)."""
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
    return _variant_from_sizes(dims, depths, where), decoder_dim
