"""Exact algebraic folding of SegFormer's All-MLP decoder, applied to the copy that is exported.

The NVlabs / HuggingFace head computes ``relu(bn(fuse(concat(up(L4 c4), up(L3 c3), up(L2 c2),
L1 c1))))``. A 1×1 conv is a per-pixel linear map, bilinear resizing is a per-channel linear map
whose weights sum to one, so the two commute and biases pass through unchanged:
``fuse(concat(up(Li ci)))`` = ``sum_i up((Wi Li) ci) + sum_i Wi bi``. Folding ``Wi Li`` and the
BatchNorm into one conv per level removes the full-resolution ``4·dim -> dim`` conv and the
concatenation (about half the decoder's time on CPU) while computing the same function; export
verification still compares the folded graph with the unfolded PyTorch model.

mmsegmentation's ``SegformerHead`` puts BN + ReLU before the fusion, which blocks the fold; it is
exported as is.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from models.segformer import AllMLPHead, SegFormer


class FoldedAllMLPHead(nn.Module):
    """``AllMLPHead`` with per-level linear, fusion conv and BatchNorm folded together."""

    def __init__(self, head: AllMLPHead) -> None:
        super().__init__()
        levels = len(head.linear)
        dim = head.fuse.out_channels
        fuse = head.fuse.weight.detach().reshape(dim, levels, dim).double()
        bn = head.fuse_bn
        assert bn.running_var is not None and bn.running_mean is not None
        scale = bn.weight.detach().double() / torch.sqrt(bn.running_var.double() + bn.eps)
        shift = bn.bias.detach().double() - scale * bn.running_mean.double()
        self.levels = nn.ModuleList()
        bias = torch.zeros(dim, dtype=torch.float64)
        for index, linear in enumerate(head.linear):
            assert isinstance(linear, nn.Conv2d) and linear.bias is not None
            # The fusion input is concatenated coarsest first: block j holds level levels-1-j.
            block = fuse[:, levels - 1 - index, :]
            weight = block @ linear.weight.detach().double().flatten(1)
            bias += block @ linear.bias.detach().double()
            conv = nn.Conv2d(weight.shape[1], dim, 1, bias=index == 0)
            conv.weight.data = (scale[:, None] * weight).reshape(dim, -1, 1, 1).float()
            self.levels.append(conv)
        first_bias = self.levels[0].bias
        assert first_bias is not None
        first_bias.data = (scale * bias + shift).float()
        self.classifier = head.classifier

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        finest = features[0]
        fused = self.levels[0](finest)
        for conv, feature in zip(self.levels[1:], features[1:], strict=True):
            fused = fused + F.interpolate(
                conv(feature), size=finest.shape[-2:], mode="bilinear", align_corners=False
            )
        return self.classifier(F.relu(fused))


def fold_for_inference(model: nn.Module) -> nn.Module:
    """Fold the decoder in place where that is exact; other models are returned unchanged."""
    if isinstance(model, SegFormer) and isinstance(model.decode_head, AllMLPHead):
        model.decode_head = FoldedAllMLPHead(model.decode_head)  # type: ignore[assignment]
    return model
