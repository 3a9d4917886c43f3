"""Exact algebraic rewrites of SegFormer's decoder, applied to the copy that is exported.

Both published heads end in ``relu(bn(fuse(concat(levels))))`` with ``fuse`` a 1×1 conv from
``4·dim`` to ``dim`` channels at 1/4 of the input size (about 4.3 of B0's 8 GMAC at 512×512) and
three of the four levels bilinearly upsampled to that size. A 1×1 conv is a per-pixel linear map,
bilinear resizing a per-channel linear map whose weights sum to one, so the two commute and
biases pass through unchanged: ``fuse(concat(up(ai)))`` = ``sum_i up(Wi ai)`` with ``Wi`` the
fusion weight's input-channel block of level i. Each level is then mixed at its own resolution
and only ``dim``-channel maps are upsampled and added; the BatchNorm after the fusion folds into
the ``Wi`` (its shift becomes one bias). Export verification still compares the rewritten graph
with the PyTorch model as loaded, and the parameter layout of ``models/segformer.py`` (what every
checkpoint loader writes) is untouched.

* NVlabs / HuggingFace ``AllMLPHead``: the per-level Linear has no nonlinearity after it, so it
  composes with its fusion block too (``Wi Li``, bias ``Wi bi``): one ``C_in -> dim`` conv per
  level. The concatenation is coarsest first (c4, c3, c2, c1).
* mmsegmentation ``SegformerHead`` (``MMSegHead``): BN + ReLU follow each level's conv, so only
  the fusion splits: the level ConvModules stay, each followed by its ``dim -> dim`` block. The
  concatenation is finest first (c1..c4).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from models.segformer import AllMLPHead, MMSegHead, SegFormer


def _batchnorm_affine(bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """Inference-time BatchNorm as ``scale * x + shift`` (float64)."""
    assert bn.running_var is not None and bn.running_mean is not None
    scale = bn.weight.detach().double() / torch.sqrt(bn.running_var.double() + bn.eps)
    shift = bn.bias.detach().double() - scale * bn.running_mean.double()
    return scale, shift


def _fusion_blocks(fuse: nn.Conv2d, levels: int) -> torch.Tensor:
    """The fusion weight as (levels, out, in) float64 blocks, in concatenation order."""
    dim = fuse.out_channels
    return fuse.weight.detach().double().reshape(dim, levels, -1).transpose(0, 1)


def _level_convs(weights: list[torch.Tensor], bias: torch.Tensor) -> list[nn.Conv2d]:
    """One float32 1×1 conv per (out, in) weight; the first carries the whole bias (the levels'
    outputs are summed)."""
    convs = []
    for index, weight in enumerate(weights):
        conv = nn.Conv2d(weight.shape[1], weight.shape[0], 1, bias=index == 0)
        conv.weight.data = weight.reshape(*weight.shape, 1, 1).float()
        convs.append(conv)
    assert convs[0].bias is not None
    convs[0].bias.data = bias.float()
    return convs


class FoldedHead(nn.Module):
    """``classifier(relu(sum_i up(mix_i(level_i(c_i)))))``: each level's mix is a 1×1 conv at
    its own resolution (the first one carries the bias), ``level_i`` the kept per-level module
    (identity where the mix already composed it)."""

    def __init__(
        self, levels: list[nn.Module], mixes: list[nn.Conv2d], classifier: nn.Module
    ) -> None:
        super().__init__()
        self.levels = nn.ModuleList(levels)
        self.mixes = nn.ModuleList(mixes)
        self.classifier = classifier

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        finest = features[0]
        fused = self.mixes[0](self.levels[0](finest))
        for level, mix, feature in zip(self.levels[1:], self.mixes[1:], features[1:], strict=True):
            fused = fused + F.interpolate(
                mix(level(feature)), size=finest.shape[-2:], mode="bilinear", align_corners=False
            )
        return self.classifier(F.relu(fused))


def fold_all_mlp_head(head: AllMLPHead) -> FoldedHead:
    """Per-level Linear, fusion block and BatchNorm composed into one conv per level."""
    count = len(head.linear)
    blocks = _fusion_blocks(head.fuse, count)
    scale, shift = _batchnorm_affine(head.fuse_bn)
    bias = shift.clone()
    mixes = []
    for index, linear in enumerate(head.linear):
        assert isinstance(linear, nn.Conv2d) and linear.bias is not None
        block = scale[:, None] * blocks[count - 1 - index]  # concatenated coarsest first
        bias += block @ linear.bias.detach().double()
        mixes.append(block @ linear.weight.detach().double().flatten(1))
    return FoldedHead([nn.Identity() for _ in mixes], _level_convs(mixes, bias), head.classifier)


def fold_mmseg_head(head: MMSegHead) -> FoldedHead:
    """Fusion conv split into one ``dim -> dim`` block per level, its BatchNorm folded in; the
    level ConvModules (conv, BN, ReLU) are kept as they are."""
    blocks = _fusion_blocks(head.fusion.conv, len(head.convs))
    scale, shift = _batchnorm_affine(head.fusion.bn)
    convs = _level_convs([scale[:, None] * block for block in blocks], shift)
    return FoldedHead(list(head.convs), convs, head.classifier)


def fold_for_inference(model: nn.Module) -> nn.Module:
    """Rewrite the SegFormer decoder in place (exactly); other models are returned unchanged."""
    if isinstance(model, SegFormer):
        head = model.decode_head
        if isinstance(head, AllMLPHead):
            model.decode_head = fold_all_mlp_head(head)  # type: ignore[assignment]
        elif isinstance(head, MMSegHead):
            model.decode_head = fold_mmseg_head(head)  # type: ignore[assignment]
    return model
