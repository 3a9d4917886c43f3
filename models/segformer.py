"""SegFormer (Mix Transformer encoder + All-MLP decoder), variants B0–B5.

One module per published component, named after what it does; ``models.checkpoints.segformer_keys``
maps the HuggingFace, NVlabs and mmsegmentation key layouts onto these names. Attention goes through
``F.scaled_dot_product_attention`` exactly once per transformer block (full-length queries,
spatially reduced keys/values) so the ONNX exporter can keep it as one fused node. Spatial sizes
are always read from tensors, never cached as Python ints, so ``torch.export`` with dynamic H, W
traces one graph for every input size.

The decoder exists in two published flavours that differ in more than key names:

* ``"hf"`` (NVlabs release and HuggingFace ``SegformerDecodeHead``): a Linear (with bias, no
  norm) per level, concatenation in the order c4, c3, c2, c1, fuse conv + BN + ReLU, classifier.
* ``"mmseg"`` (mmsegmentation 1.x ``SegformerHead``): a 1×1 ConvModule (conv without bias, BN,
  ReLU) per level, concatenation c1, c2, c3, c4, fusion ConvModule (conv, BN, ReLU), ``conv_seg``.

LayerNorm epsilons also differ by source (HF uses PyTorch's 1e-5 everywhere, NVlabs 1e-6 in the
blocks and stage norms but 1e-5 in the patch embedding and reduction norms, mmseg 1e-6
everywhere); ``norm_eps`` takes the source's epsilons so each checkpoint reproduces its own numbers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from models.registry import register_model

DecoderFlavour = Literal["hf", "mmseg"]

NUM_HEADS = (1, 2, 5, 8)
SR_RATIOS = (8, 4, 2, 1)
PATCH_SIZES = (7, 3, 3, 3)
PATCH_STRIDES = (4, 2, 2, 2)
MLP_RATIO = 4


@dataclass(frozen=True)
class SegFormerSpec:
    """The published per-variant sizes (SegFormer paper, table 6)."""

    embed_dims: tuple[int, int, int, int]
    depths: tuple[int, int, int, int]
    decoder_dim: int  # the default; mmseg's B2-B5 configs use 256 and checkpoints say which


VARIANTS: dict[str, SegFormerSpec] = {
    "segformer-b0": SegFormerSpec((32, 64, 160, 256), (2, 2, 2, 2), 256),
    "segformer-b1": SegFormerSpec((64, 128, 320, 512), (2, 2, 2, 2), 256),
    "segformer-b2": SegFormerSpec((64, 128, 320, 512), (3, 4, 6, 3), 768),
    "segformer-b3": SegFormerSpec((64, 128, 320, 512), (3, 4, 18, 3), 768),
    "segformer-b4": SegFormerSpec((64, 128, 320, 512), (3, 8, 27, 3), 768),
    "segformer-b5": SegFormerSpec((64, 128, 320, 512), (3, 6, 40, 3), 768),
}


@dataclass(frozen=True)
class LayerNormEps:
    """Epsilon per LayerNorm site: patch embedding, key/value reduction, block and stage norms."""

    patch_embed: float
    reduction: float
    block: float


HF_NORM_EPS = LayerNormEps(patch_embed=1e-5, reduction=1e-5, block=1e-5)
NVLABS_NORM_EPS = LayerNormEps(patch_embed=1e-5, reduction=1e-5, block=1e-6)
MMSEG_NORM_EPS = LayerNormEps(patch_embed=1e-6, reduction=1e-6, block=1e-6)
# Each decoder flavour's own source, used when no checkpoint says otherwise.
DEFAULT_NORM_EPS: dict[DecoderFlavour, LayerNormEps] = {"hf": HF_NORM_EPS, "mmseg": MMSEG_NORM_EPS}


def _tokens(feature_map: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, H*W, C)."""
    return feature_map.flatten(2).transpose(1, 2)


def _feature_map(tokens: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(B, H*W, C) -> (B, C, H, W) with H, W taken from ``like`` (symbolic under export)."""
    return tokens.transpose(1, 2).unflatten(2, like.shape[-2:])


class OverlapPatchEmbed(nn.Module):
    """Strided conv with overlapping windows (kernel 7/stride 4, then 3/2) followed by LayerNorm."""

    def __init__(self, in_dim: int, dim: int, patch_size: int, stride: int, eps: float) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_dim, dim, patch_size, stride=stride, padding=patch_size // 2)
        self.norm = nn.LayerNorm(dim, eps=eps)

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return the tokens and the projected map (whose shape carries H, W)."""
        projected = self.proj(pixels)
        return self.norm(_tokens(projected)), projected


class EfficientSelfAttention(nn.Module):
    """Multi-head attention whose keys/values come from a ``sr_ratio``-strided conv of the input."""

    def __init__(self, dim: int, num_heads: int, sr_ratio: int, reduction_eps: float) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)
        self.sr: nn.Module
        self.sr_norm: nn.Module
        if sr_ratio > 1:
            self.sr = nn.Conv2d(dim, dim, sr_ratio, stride=sr_ratio)
            self.sr_norm = nn.LayerNorm(dim, eps=reduction_eps)
        else:
            self.sr = nn.Identity()
            self.sr_norm = nn.Identity()

    def forward(self, tokens: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        head_dim = self.q.out_features // self.num_heads
        query = self.q(tokens).unflatten(-1, (self.num_heads, head_dim)).transpose(1, 2)
        reduced = self.sr_norm(_tokens(self.sr(_feature_map(tokens, like))))
        key, value = self.kv(reduced).unflatten(-1, (2, self.num_heads, head_dim)).unbind(2)
        attended = F.scaled_dot_product_attention(query, key.transpose(1, 2), value.transpose(1, 2))
        return self.proj(attended.transpose(1, 2).flatten(2))


class MixFFN(nn.Module):
    """fc1 -> depthwise 3×3 conv (the positional signal) -> GELU -> fc2.

    The two Linear layers (kept as such, so checkpoints load unchanged) are applied as 1×1
    convolutions on the feature map: the same linear maps, but the only layout changes are at
    ``dim`` channels rather than the 4x wider hidden ones around the depthwise conv, and
    onnxruntime runs the conv chain in its blocked layout. B0's CPU forward at 512×512 went from
    98 to 75 ms (docs/export.md)."""

    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.dwconv = nn.Conv2d(hidden_dim, hidden_dim, 3, padding=1, groups=hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, tokens: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        feature_map = _feature_map(tokens, like)
        hidden = F.conv2d(feature_map, self.fc1.weight[..., None, None], self.fc1.bias)
        hidden = F.gelu(self.dwconv(hidden))
        return _tokens(F.conv2d(hidden, self.fc2.weight[..., None, None], self.fc2.bias))


class TransformerBlock(nn.Module):
    """Pre-norm residual block: attention then Mix-FFN."""

    def __init__(self, dim: int, num_heads: int, sr_ratio: int, eps: LayerNormEps) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps.block)
        self.attn = EfficientSelfAttention(dim, num_heads, sr_ratio, eps.reduction)
        self.norm2 = nn.LayerNorm(dim, eps=eps.block)
        self.ffn = MixFFN(dim, MLP_RATIO * dim)

    def forward(self, tokens: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        tokens = tokens + self.attn(self.norm1(tokens), like)
        return tokens + self.ffn(self.norm2(tokens), like)


class EncoderStage(nn.Module):
    """Patch embedding, ``depth`` blocks, LayerNorm; returns an NCHW feature map."""

    def __init__(self, index: int, in_dim: int, dim: int, depth: int, eps: LayerNormEps) -> None:
        super().__init__()
        self.patch_embed = OverlapPatchEmbed(
            in_dim, dim, PATCH_SIZES[index], PATCH_STRIDES[index], eps.patch_embed
        )
        self.blocks = nn.ModuleList(
            TransformerBlock(dim, NUM_HEADS[index], SR_RATIOS[index], eps) for _ in range(depth)
        )
        self.norm = nn.LayerNorm(dim, eps=eps.block)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        tokens, like = self.patch_embed(features)
        for block in self.blocks:
            tokens = block(tokens, like)
        return _feature_map(self.norm(tokens), like)


class MixTransformer(nn.Module):
    """The hierarchical encoder: four stages at strides 4, 8, 16, 32."""

    def __init__(self, spec: SegFormerSpec, eps: LayerNormEps) -> None:
        super().__init__()
        in_dims = (3, *spec.embed_dims[:-1])
        self.stages = nn.ModuleList(
            EncoderStage(i, in_dims[i], spec.embed_dims[i], spec.depths[i], eps) for i in range(4)
        )

    def forward(self, pixels: torch.Tensor) -> list[torch.Tensor]:
        features = []
        for stage in self.stages:
            pixels = stage(pixels)
            features.append(pixels)
        return features


def _upsample_to(feature_map: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return F.interpolate(feature_map, size=like.shape[-2:], mode="bilinear", align_corners=False)


class AllMLPHead(nn.Module):
    """NVlabs / HuggingFace decoder: per-level Linear (stored as 1×1 conv), fuse c4..c1."""

    def __init__(self, in_dims: tuple[int, ...], dim: int, num_classes: int) -> None:
        super().__init__()
        self.linear = nn.ModuleList(nn.Conv2d(in_dim, dim, 1) for in_dim in in_dims)
        self.fuse = nn.Conv2d(dim * len(in_dims), dim, 1, bias=False)
        self.fuse_bn = nn.BatchNorm2d(dim)
        self.classifier = nn.Conv2d(dim, num_classes, 1)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        finest = features[0]
        levels = [self.linear[0](finest)]
        for linear, feature in zip(self.linear[1:], features[1:], strict=True):
            levels.append(_upsample_to(linear(feature), finest))
        fused = F.relu(self.fuse_bn(self.fuse(torch.cat(levels[::-1], dim=1))))
        return self.classifier(fused)


class ConvBNReLU(nn.Sequential):
    """mmcv's ConvModule with BN: conv (no bias), BatchNorm, ReLU."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_dim, out_dim, 1, bias=False)
        self.bn = nn.BatchNorm2d(out_dim)
        self.act = nn.ReLU()


class MMSegHead(nn.Module):
    """mmsegmentation 1.x ``SegformerHead``: ConvModule per level, fuse c1..c4, ``conv_seg``."""

    def __init__(self, in_dims: tuple[int, ...], dim: int, num_classes: int) -> None:
        super().__init__()
        self.convs = nn.ModuleList(ConvBNReLU(in_dim, dim) for in_dim in in_dims)
        self.fusion = ConvBNReLU(dim * len(in_dims), dim)
        self.classifier = nn.Conv2d(dim, num_classes, 1)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        finest = features[0]
        levels = [self.convs[0](finest)]
        for conv, feature in zip(self.convs[1:], features[1:], strict=True):
            levels.append(_upsample_to(conv(feature), finest))
        return self.classifier(self.fusion(torch.cat(levels, dim=1)))


class SegFormer(nn.Module):
    """Normalised float32 NCHW pixels -> logits at 1/4 of the input size."""

    arch = "segformer"
    output_stride = 4

    def __init__(
        self,
        variant: str,
        num_classes: int,
        decoder: DecoderFlavour = "hf",
        norm_eps: LayerNormEps | None = None,
        decoder_dim: int | None = None,
    ) -> None:
        super().__init__()
        if variant not in VARIANTS:
            raise KeyError(f"unknown SegFormer variant {variant!r}; known: {', '.join(VARIANTS)}")
        if decoder not in ("hf", "mmseg"):
            raise ValueError(f"decoder must be 'hf' or 'mmseg', got {decoder!r}")
        spec = VARIANTS[variant]
        self.variant = variant
        self.num_classes = num_classes
        self.decoder = decoder
        self.norm_eps = norm_eps or DEFAULT_NORM_EPS[decoder]
        self.encoder = MixTransformer(spec, self.norm_eps)
        head_type = AllMLPHead if decoder == "hf" else MMSegHead
        self.decode_head = head_type(spec.embed_dims, decoder_dim or spec.decoder_dim, num_classes)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.decode_head(self.encoder(pixels))


def _factory(variant: str) -> None:
    @register_model(variant)
    def build(
        num_classes: int,
        decoder: DecoderFlavour = "hf",
        norm_eps: LayerNormEps | None = None,
        decoder_dim: int | None = None,
    ) -> SegFormer:
        return SegFormer(
            variant, num_classes, decoder=decoder, norm_eps=norm_eps, decoder_dim=decoder_dim
        )


for _variant in VARIANTS:
    _factory(_variant)
