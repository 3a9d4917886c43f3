"""SETR checkpoints as mmsegmentation 1.x writes them (format ``mmseg-setr``).

``models.setr`` names its modules after mmseg's, so the keys load by name with no rename table;
what this module reads from a checkpoint is the architecture: sizes from tensor shapes, and the
settings shapes cannot show (heads, out_indices, up-sampling, interpolation) from the config text
saved with it, else from the published configs.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import torch
from torch import nn

from models.checkpoints.errors import CheckpointError
from models.checkpoints.metadata import model_config, pick, section
from models.setr import (
    DECODER_DEFAULTS,
    OUT_INDICES,
    SETR,
    VARIANTS,
    VIT_SIZES,
    Decoder,
    SETRSpec,
    published_spec,
)

FORMATS = ("mmseg-setr",)
_AUX_PREFIX = "auxiliary_head."
_MLA_MARKER = "neck.mla.channel_proj.0.conv.weight"


def detect(state_dict: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> str | None:
    """A ViT class token is the tell-tale (no SegFormer layout has one)."""
    return "mmseg-setr" if "backbone.cls_token" in state_dict else None


def looks_like_setr(state_dict: Mapping[str, Any]) -> bool:
    """An mmseg ViT backbone (class token + position embeddings) with a SETR head or neck."""
    has_vit = "backbone.cls_token" in state_dict and "backbone.pos_embed" in state_dict
    has_setr_head = (
        _MLA_MARKER in state_dict or "decode_head.up_convs.0.0.conv.weight" in state_dict
    )
    return has_vit and has_setr_head


def load(
    state_dict: dict[str, torch.Tensor],
    meta: dict[str, Any],
    fmt: str,
    model_name: str | None,
    where: str,
) -> SETR:
    """``load_mmseg_setr`` with the file and format named in any error."""
    try:
        return load_mmseg_setr(state_dict, meta, model_name)
    except CheckpointError as exc:
        raise CheckpointError(f"{where}: {exc} (format assumed: {fmt})") from exc


def _grid_from_pos_embed(tokens: int, patch_size: int, img_size: Any) -> tuple[int, int]:
    """Training patch grid: from the config's img_size when it matches, else a square grid."""
    if isinstance(img_size, int):
        img_size = (img_size, img_size)
    if isinstance(img_size, tuple | list) and len(img_size) == 2:
        grid = (int(img_size[0]) // patch_size, int(img_size[1]) // patch_size)
        if grid[0] * grid[1] == tokens:
            return grid
    side = math.isqrt(tokens)
    if side * side != tokens:
        raise ValueError(f"pos_embed holds {tokens} patch tokens: not a square grid, no img_size")
    return (side, side)


def _layer_count(keys: list[str], prefix: str) -> int:
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    indices = {int(m.group(1)) for k in keys if (m := pattern.match(k))}
    return max(indices) + 1 if indices else 0


def infer_setr_spec(
    state_dict: Mapping[str, torch.Tensor], meta: Mapping[str, Any]
) -> tuple[SETRSpec, int]:
    """SETR spec and class count of an mmseg checkpoint: sizes from tensor shapes, settings that
    shapes cannot show (heads, out_indices, up_scale, interpolation) from the config text, else
    from the published configs. Raises ``ValueError`` when the keys do not describe SETR."""
    if not looks_like_setr(state_dict):
        raise ValueError("not an mmseg SETR state dict (no backbone.cls_token/pos_embed + head)")
    keys = list(state_dict)
    config = model_config(meta)
    backbone_cfg, head_cfg = section(config, "backbone"), section(config, "decode_head")

    embed_dims = int(state_dict["backbone.cls_token"].shape[-1])
    num_layers = _layer_count(keys, "backbone.layers.")
    patch_size = int(state_dict["backbone.patch_embed.projection.weight"].shape[-1])
    size = {768: "base", 1024: "large"}.get(embed_dims)
    decoder: Decoder
    if _MLA_MARKER in state_dict:
        decoder = "mla"
    else:
        num_convs = _layer_count(keys, "decode_head.up_convs.")
        decoder = "naive" if num_convs == 1 else "pup"
    default_heads = VIT_SIZES[size][2] if size else max(embed_dims // 64, 1)
    default_indices = OUT_INDICES.get((size or "", decoder), (num_layers - 1,) * 4)
    spec = SETRSpec(
        decoder=decoder,
        embed_dims=embed_dims,
        num_layers=num_layers,
        num_heads=pick(backbone_cfg, "num_heads", int, default_heads),
        out_indices=tuple(pick(backbone_cfg, "out_indices", (tuple, list), default_indices)),
        with_cls_token=pick(backbone_cfg, "with_cls_token", bool, decoder != "mla"),
        pos_grid=_grid_from_pos_embed(
            int(state_dict["backbone.pos_embed"].shape[1]) - 1,
            patch_size,
            backbone_cfg.get("img_size"),
        ),
        patch_size=patch_size,
        mlp_ratio=int(state_dict["backbone.layers.0.ffn.layers.0.0.weight"].shape[0]) // embed_dims,
        interpolate_mode=pick(backbone_cfg, "interpolate_mode", str, "bilinear"),
        align_corners=pick(head_cfg, "align_corners", bool, False),
        # Layers whose presence the keys show (mmseg's patch_bias, patch_norm, pre_norm,
        # final_norm, qkv_bias options); the epsilon only the config text can tell.
        patch_bias="backbone.patch_embed.projection.bias" in state_dict,
        patch_norm="backbone.patch_embed.norm.weight" in state_dict,
        pre_norm="backbone.ln_pre.weight" in state_dict,
        final_norm="backbone.ln1.weight" in state_dict,
        qkv_bias="backbone.layers.0.attn.attn.in_proj_bias" in state_dict,
        norm_eps=pick(section(backbone_cfg, "norm_cfg"), "eps", float, 1e-6),
        **DECODER_DEFAULTS[decoder],
    )
    if decoder == "mla":
        spec = replace(
            spec,
            mla_neck_channels=int(state_dict[_MLA_MARKER].shape[0]),
            mla_channels=int(state_dict["decode_head.up_convs.0.0.conv.weight"].shape[0]),
            up_scale=pick(head_cfg, "up_scale", int, spec.up_scale),
        )
    else:
        first_conv = state_dict["decode_head.up_convs.0.0.conv.weight"]
        spec = replace(
            spec,
            channels=int(first_conv.shape[0]),
            kernel_size=int(first_conv.shape[-1]),
            num_convs=_layer_count(keys, "decode_head.up_convs."),
            up_scale=pick(head_cfg, "up_scale", int, spec.up_scale),
            in_index=pick(head_cfg, "in_index", int, spec.in_index),
        )
    num_classes = int(state_dict["decode_head.conv_seg.weight"].shape[0])
    return spec, num_classes


# Fields that decide the parameter layout; the others (grid, interpolation, which layers feed the
# head, up-sampling factor) are taken from the checkpoint as they are.
_STRUCTURAL_FIELDS = (
    "decoder",
    "embed_dims",
    "num_layers",
    "num_heads",
    "patch_size",
    "mlp_ratio",
    "channels",
    "num_convs",
    "kernel_size",
    "mla_neck_channels",
    "mla_channels",
)


def _variant_name(spec: SETRSpec) -> str | None:
    """The registry name whose published parameter layout ``spec`` has, if any."""
    for name, (decoder, size) in VARIANTS.items():
        published = published_spec(decoder, size)
        if all(getattr(spec, f) == getattr(published, f) for f in _STRUCTURAL_FIELDS):
            return name
    return None


def _strict_mismatches(model: nn.Module, weights: Mapping[str, torch.Tensor]) -> list[str]:
    expected = model.state_dict()
    problems = [f"missing: {k}" for k in expected if k not in weights]
    problems += [f"unexpected: {k}" for k in weights if k not in expected]
    problems += [
        f"shape mismatch: {k} checkpoint {tuple(v.shape)} vs model {tuple(expected[k].shape)}"
        for k, v in weights.items()
        if k in expected and v.shape != expected[k].shape
    ]
    return problems


def load_mmseg_setr(
    state_dict: dict[str, torch.Tensor], meta: dict[str, Any], model_name: str | None = None
) -> SETR:
    """Builds the SETR model an mmseg 1.x checkpoint describes and loads it strictly.

    Auxiliary heads (training-only) are dropped by name; any other missing, unexpected or
    mis-shaped key raises ``CheckpointError`` naming it. ``model_name`` pins
    the registry variant (its decoder and ViT size must match the checkpoint). Returns the model
    in eval mode (``variant`` holds the registry name).
    """
    # float32 throughout: the serving contract, whatever precision the checkpoint was saved in.
    weights = {
        k: v.float() if v.is_floating_point() else v
        for k, v in state_dict.items()
        if not k.startswith(_AUX_PREFIX)
    }
    try:
        spec, num_classes = infer_setr_spec(weights, meta)
    except (KeyError, ValueError) as exc:
        raise CheckpointError(f"cannot read a SETR model from this checkpoint: {exc}") from exc
    variant = _variant_name(spec)
    if model_name is not None:
        if model_name not in VARIANTS:
            raise CheckpointError(f"{model_name!r} is not a SETR variant ({', '.join(VARIANTS)})")
        if variant != model_name:
            raise CheckpointError(
                f"checkpoint holds {variant or 'a non-published SETR'} ({spec.decoder} decoder, "
                f"{spec.embed_dims}-d × {spec.num_layers} layers), not {model_name}"
            )
    if variant is None:
        raise CheckpointError(
            f"checkpoint SETR structure matches no registered variant: {spec.decoder} decoder, "
            f"embed_dims={spec.embed_dims}, num_layers={spec.num_layers}"
        )
    with torch.device("meta"):
        model = SETR(spec, num_classes, variant)
    problems = _strict_mismatches(model, weights)
    if problems:
        raise CheckpointError(
            f"{variant} checkpoint does not match the model: " + "; ".join(problems)
        )
    model.load_state_dict(weights, strict=True, assign=True)
    return model.eval()
