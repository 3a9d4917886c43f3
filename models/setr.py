"""SETR (Zheng et al., CVPR 2021) as mmsegmentation 1.x builds it: a plain ViT encoder and the
Naive, PUP (progressive up-sampling) or MLA (multi-level aggregation) decoder.

Module and parameter names deliberately mirror mmsegmentation's ``EncoderDecoder`` (``backbone.*``,
``neck.*``, ``decode_head.*``, mmcv's ``ln1``/``attn.attn.in_proj_weight``/``ffn.layers.0.0``,
``ConvModule``'s ``conv``/``bn``) so that a model-zoo state dict loads by name with no rename table
that could drift. Attention goes through ``F.scaled_dot_product_attention`` once per block, and the
position embeddings are resized from the input's patch grid on every call with tensor ops only, so
``torch.export`` traces one graph for every input height and width.

Sources read (mmsegmentation 1.x): ``mmseg/models/backbones/vit.py``,
``mmseg/models/utils/embed.py`` (``PatchEmbed`` with corner padding),
``mmseg/models/decode_heads/setr_up_head.py``, ``setr_mla_head.py``,
``mmseg/models/necks/mla_neck.py``, ``configs/_base_/models/setr_*.py`` and the ADE20K/Cityscapes
SETR configs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from models.registry import register_model

Decoder = Literal["naive", "pup", "mla"]

HEAD_LN_EPS = 1e-6  # SETRUPHead's and MLANeck's input norms: norm_layer=dict(type='LN', eps=1e-6)


@dataclass(frozen=True)
class SETRSpec:
    """Everything that shapes a SETR model; the defaults are the published configs' values."""

    decoder: Decoder
    embed_dims: int
    num_layers: int
    num_heads: int
    out_indices: tuple[int, ...]
    with_cls_token: bool
    pos_grid: tuple[int, int]
    patch_size: int = 16
    mlp_ratio: int = 4
    interpolate_mode: str = "bilinear"
    # mmseg VisionTransformer options; the published SETR configs keep mmseg's defaults.
    patch_bias: bool = False
    patch_norm: bool = False
    pre_norm: bool = False
    final_norm: bool = False
    qkv_bias: bool = True
    norm_eps: float = 1e-6  # backbone_norm_cfg = dict(type='LN', eps=1e-6)
    align_corners: bool = False
    channels: int = 256  # SETRUPHead.channels; unused by MLA
    num_convs: int = 1  # SETRUPHead
    kernel_size: int = 1  # SETRUPHead
    up_scale: int = 4  # SETRUPHead / SETRMLAHead
    in_index: int = 3  # SETRUPHead: which backbone output it decodes
    mla_neck_channels: int = 256  # MLANeck.out_channels
    mla_channels: int = 128  # SETRMLAHead.mla_channels

    @property
    def output_stride(self) -> int:
        """Input size / logits size: the patch stride undone by the head's up-sampling."""
        convs = 1 if self.decoder == "mla" else self.num_convs
        stride = self.patch_size // self.up_scale**convs
        if stride < 1 or self.patch_size % self.up_scale**convs:
            raise ValueError(f"head up-samples past the input size: {self}")
        return stride


# (embed_dims, num_layers, num_heads): ViT-B/16 and ViT-L/16.
VIT_SIZES: dict[str, tuple[int, int, int]] = {"base": (768, 12, 12), "large": (1024, 24, 16)}

# out_indices per decoder: ViT-L from configs/_base_/models/setr_*.py, ViT-B from the DeiT-B
# SETR configs (setr_{pup,mla}_deit_*).
OUT_INDICES: dict[tuple[str, str], tuple[int, ...]] = {
    ("large", "naive"): (9, 14, 19, 23),
    ("large", "pup"): (9, 14, 19, 23),
    ("large", "mla"): (5, 11, 17, 23),
    ("base", "naive"): (4, 7, 9, 11),
    ("base", "pup"): (4, 7, 9, 11),
    ("base", "mla"): (2, 5, 8, 11),
}

# Decoder settings of the published configs (decode_head=...).
DECODER_DEFAULTS: dict[str, dict[str, Any]] = {
    "naive": {"channels": 256, "num_convs": 1, "up_scale": 4, "kernel_size": 1},
    "pup": {"channels": 256, "num_convs": 4, "up_scale": 2, "kernel_size": 3},
    "mla": {"up_scale": 4, "mla_neck_channels": 256, "mla_channels": 128},
}


def published_spec(decoder: Decoder, size: str, img_size: int = 512) -> SETRSpec:
    embed_dims, num_layers, num_heads = VIT_SIZES[size]
    return SETRSpec(
        decoder=decoder,
        embed_dims=embed_dims,
        num_layers=num_layers,
        num_heads=num_heads,
        out_indices=OUT_INDICES[(size, decoder)],
        with_cls_token=decoder != "mla",
        pos_grid=(img_size // 16, img_size // 16),
        **DECODER_DEFAULTS[decoder],
    )


def resize_pos_embed(
    pos_embed: torch.Tensor,
    input_grid_hw: tuple[int, int],
    pos_grid_hw: tuple[int, int],
    mode: str = "bilinear",
) -> torch.Tensor:
    """mmseg's ``VisionTransformer.resize_pos_embed``: keep the class-token entry, reshape the
    rest to the training grid, interpolate it (align_corners=False) to the input's patch grid and
    flatten back to (1, 1 + h*w, C). ``input_grid_hw`` may hold symbolic sizes while tracing."""
    pos_h, pos_w = pos_grid_hw
    cls_weight = pos_embed[:, :1]
    grid = pos_embed[:, -pos_h * pos_w :].reshape(1, pos_h, pos_w, pos_embed.shape[2])
    grid = F.interpolate(
        grid.permute(0, 3, 1, 2), size=input_grid_hw, mode=mode, align_corners=False
    )
    return torch.cat((cls_weight, grid.flatten(2).transpose(1, 2)), dim=1)


class PatchEmbed(nn.Module):
    """16×16 patchify convolution (with or without bias, optionally followed by LayerNorm); the
    input is zero-padded bottom/right to a multiple of the patch size first (mmseg's
    ``AdaptivePadding(padding='corner')``)."""

    def __init__(self, spec: SETRSpec) -> None:
        super().__init__()
        self.patch_size = spec.patch_size
        self.projection = nn.Conv2d(
            3, spec.embed_dims, spec.patch_size, stride=spec.patch_size, bias=spec.patch_bias
        )
        self.norm = nn.LayerNorm(spec.embed_dims, eps=spec.norm_eps) if spec.patch_norm else None

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        height, width = pixels.shape[2], pixels.shape[3]
        pixels = F.pad(pixels, (0, -width % self.patch_size, 0, -height % self.patch_size))
        features = self.projection(pixels)
        grid = (features.shape[2], features.shape[3])
        tokens = features.flatten(2).transpose(1, 2)
        return (tokens if self.norm is None else self.norm(tokens)), grid


class SelfAttention(nn.Module):
    """Multi-head self-attention as one fused ``scaled_dot_product_attention`` call.

    The weights live in a ``torch.nn.MultiheadAttention`` because that is what mmcv's
    ``MultiheadAttention`` wraps (``attn.attn.in_proj_weight`` etc.); only its parameters are used.
    """

    def __init__(self, embed_dims: int, num_heads: int, bias: bool) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.attn = nn.MultiheadAttention(embed_dims, num_heads, bias=bias, batch_first=True)

    def forward(self, tokens: torch.Tensor, identity: torch.Tensor) -> torch.Tensor:
        batch, length, dims = tokens.shape
        qkv = F.linear(tokens, self.attn.in_proj_weight, self.attn.in_proj_bias)
        qkv = qkv.reshape(batch, length, 3, self.num_heads, dims // self.num_heads)
        query, key, value = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        attended = F.scaled_dot_product_attention(query, key, value)
        attended = attended.transpose(1, 2).reshape(batch, length, dims)
        return identity + self.attn.out_proj(attended)


class FFN(nn.Module):
    """mmcv's two-layer FFN (Linear, GELU, Linear) with its residual; keys ``layers.0.0``,
    ``layers.1``."""

    def __init__(self, embed_dims: int, hidden_dims: int) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Sequential(nn.Linear(embed_dims, hidden_dims), nn.GELU()),
            nn.Linear(hidden_dims, embed_dims),
        )

    def forward(self, tokens: torch.Tensor, identity: torch.Tensor) -> torch.Tensor:
        return identity + self.layers(tokens)


class TransformerEncoderLayer(nn.Module):
    """Pre-norm ViT block."""

    def __init__(self, spec: SETRSpec) -> None:
        super().__init__()
        dims = spec.embed_dims
        self.ln1 = nn.LayerNorm(dims, eps=spec.norm_eps)
        self.attn = SelfAttention(dims, spec.num_heads, spec.qkv_bias)
        self.ln2 = nn.LayerNorm(dims, eps=spec.norm_eps)
        self.ffn = FFN(dims, spec.mlp_ratio * dims)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        tokens = self.attn(self.ln1(tokens), identity=tokens)
        return self.ffn(self.ln2(tokens), identity=tokens)


class VisionTransformer(nn.Module):
    """mmseg's ViT backbone: class token, learned position embeddings on the training grid
    (resized to each input's grid), optional norms after the position embeddings (``ln_pre``) and
    after the last layer (``ln1``); returns the NCHW feature maps of the ``out_indices`` layers,
    class token removed."""

    def __init__(self, spec: SETRSpec) -> None:
        super().__init__()
        self.pos_grid = spec.pos_grid
        self.interpolate_mode = spec.interpolate_mode
        self.with_cls_token = spec.with_cls_token
        self.out_indices = spec.out_indices
        dims = spec.embed_dims
        self.patch_embed = PatchEmbed(spec)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dims))
        self.pos_embed = nn.Parameter(torch.zeros(1, spec.pos_grid[0] * spec.pos_grid[1] + 1, dims))
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        self.ln_pre = nn.LayerNorm(dims, eps=spec.norm_eps) if spec.pre_norm else None
        self.layers = nn.ModuleList(TransformerEncoderLayer(spec) for _ in range(spec.num_layers))
        self.ln1 = nn.LayerNorm(dims, eps=spec.norm_eps) if spec.final_norm else None

    def forward(self, pixels: torch.Tensor) -> list[torch.Tensor]:
        tokens, grid = self.patch_embed(pixels)
        cls_tokens = self.cls_token.expand(tokens.shape[0], -1, -1)
        tokens = torch.cat((cls_tokens, tokens), dim=1)
        # Always resized: at the training grid bilinear/align_corners=False is the identity, so
        # this equals mmseg's "resize only when the token count differs" except for a transposed
        # grid with the same count, where mmseg (wrongly) adds the unresized table.
        tokens = tokens + resize_pos_embed(
            self.pos_embed, grid, self.pos_grid, self.interpolate_mode
        )
        if not self.with_cls_token:
            tokens = tokens[:, 1:]
        if self.ln_pre is not None:
            tokens = self.ln_pre(tokens)
        outputs = []
        for index, layer in enumerate(self.layers):
            tokens = layer(tokens)
            if index == len(self.layers) - 1 and self.ln1 is not None:
                tokens = self.ln1(tokens)
            if index in self.out_indices:
                patches = tokens[:, 1:] if self.with_cls_token else tokens
                batch, _, dims = patches.shape
                outputs.append(patches.transpose(1, 2).reshape(batch, dims, grid[0], grid[1]))
        return outputs


class ConvModule(nn.Module):
    """mmcv ``ConvModule`` with norm and ReLU: conv (no bias), BatchNorm (SyncBN at training
    time), ReLU."""

    def __init__(self, in_dims: int, out_dims: int, kernel_size: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_dims, out_dims, kernel_size, padding=kernel_size // 2, bias=False)
        self.bn = nn.BatchNorm2d(out_dims)
        self.activate = nn.ReLU(inplace=True)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.activate(self.bn(self.conv(features)))


def _layer_norm_channels(norm: nn.Module, features: torch.Tensor) -> torch.Tensor:
    """LayerNorm over the channels of an NCHW map, the way the SETR heads apply it to tokens."""
    return norm(features.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def _upsample(scale: int, align_corners: bool) -> nn.Upsample:
    return nn.Upsample(scale_factor=scale, mode="bilinear", align_corners=align_corners)


class SETRUPHead(nn.Module):
    """Naive (1 conv + ×4) and PUP (4 × (conv + ×2)) heads: LN on the tokens, then
    ``num_convs`` × (ConvModule, bilinear up-sampling), then the 1×1 classifier ``conv_seg``."""

    def __init__(self, spec: SETRSpec, num_classes: int) -> None:
        super().__init__()
        self.in_index = spec.in_index
        self.norm = nn.LayerNorm(spec.embed_dims, eps=HEAD_LN_EPS)
        self.up_convs = nn.ModuleList(
            nn.Sequential(
                ConvModule(
                    spec.embed_dims if i == 0 else spec.channels, spec.channels, spec.kernel_size
                ),
                _upsample(spec.up_scale, spec.align_corners),
            )
            for i in range(spec.num_convs)
        )
        self.conv_seg = nn.Conv2d(spec.channels, num_classes, 1)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        decoded = _layer_norm_channels(self.norm, features[self.in_index])
        for up_conv in self.up_convs:
            decoded = up_conv(decoded)
        return self.conv_seg(decoded)


class MLAModule(nn.Module):
    """1×1 projections, top-down cumulative sums (p5, p5+p4, ...), 3×3 convs. Like mmseg, the
    outputs come out deepest-first."""

    def __init__(self, in_dims: int, out_dims: int, levels: int) -> None:
        super().__init__()
        self.channel_proj = nn.ModuleList(ConvModule(in_dims, out_dims, 1) for _ in range(levels))
        self.feat_extract = nn.ModuleList(ConvModule(out_dims, out_dims, 3) for _ in range(levels))

    def forward(self, features: list[torch.Tensor]) -> list[torch.Tensor]:
        projected = [proj(x) for x, proj in zip(features, self.channel_proj, strict=True)]
        outputs = []
        running: torch.Tensor | None = None
        for level, extract in zip(reversed(projected), self.feat_extract, strict=True):
            running = level if running is None else running + level
            outputs.append(extract(running))
        return outputs


class MLANeck(nn.Module):
    """Per-level LN on the tokens, then the MLA module."""

    def __init__(self, in_dims: int, out_dims: int, levels: int) -> None:
        super().__init__()
        self.norm = nn.ModuleList(nn.LayerNorm(in_dims, eps=HEAD_LN_EPS) for _ in range(levels))
        self.mla = MLAModule(in_dims, out_dims, levels)

    def forward(self, features: list[torch.Tensor]) -> list[torch.Tensor]:
        normed = [_layer_norm_channels(n, x) for x, n in zip(features, self.norm, strict=True)]
        return self.mla(normed)


class SETRMLAHead(nn.Module):
    """Per level two 3×3 ConvModules and ×4 bilinear up-sampling, concatenated, 1×1 classifier."""

    def __init__(self, spec: SETRSpec, num_classes: int, levels: int) -> None:
        super().__init__()
        width = spec.mla_channels
        self.up_convs = nn.ModuleList(
            nn.Sequential(
                ConvModule(spec.mla_neck_channels, width, 3),
                ConvModule(width, width, 3),
                _upsample(spec.up_scale, spec.align_corners),
            )
            for _ in range(levels)
        )
        self.conv_seg = nn.Conv2d(levels * width, num_classes, 1)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        upsampled = [up(x) for x, up in zip(features, self.up_convs, strict=True)]
        return self.conv_seg(torch.cat(upsampled, dim=1))


class SETR(nn.Module):
    """Normalised float32 NCHW pixels -> logits at ``output_stride``."""

    arch = "setr"

    def __init__(self, spec: SETRSpec, num_classes: int, variant: str) -> None:
        super().__init__()
        self.spec = spec
        self.variant = variant
        self.num_classes = num_classes
        self.output_stride = spec.output_stride
        self.backbone = VisionTransformer(spec)
        self.neck: MLANeck | None = None
        self.decode_head: nn.Module
        if spec.decoder == "mla":
            levels = len(spec.out_indices)
            self.neck = MLANeck(spec.embed_dims, spec.mla_neck_channels, levels)
            self.decode_head = SETRMLAHead(spec, num_classes, levels)
        else:
            self.decode_head = SETRUPHead(spec, num_classes)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        features = self.backbone(pixels)
        if self.neck is not None:
            features = self.neck(features)
        return self.decode_head(features)


VARIANTS: dict[str, tuple[Decoder, str]] = {
    "setr-naive": ("naive", "large"),
    "setr-pup": ("pup", "large"),
    "setr-mla": ("mla", "large"),
    "setr-naive-base": ("naive", "base"),
    "setr-pup-base": ("pup", "base"),
    "setr-mla-base": ("mla", "base"),
}


def _factory(variant: str) -> None:
    decoder, size = VARIANTS[variant]

    @register_model(variant)
    def build(num_classes: int, img_size: int = 512) -> SETR:
        return SETR(published_spec(decoder, size, img_size), num_classes, variant)


for _variant in VARIANTS:
    _factory(_variant)
