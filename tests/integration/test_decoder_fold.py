"""The export-time rewrite of SegFormer's decoder computes the same logits for both published
heads, without the full-resolution ``4·dim -> dim`` fusion conv."""

from __future__ import annotations

import copy

import pytest
import torch

from export.decoder_fold import FoldedHead, fold_for_inference
from models.registry import create_model


def _randomise_batchnorm(model: torch.nn.Module, generator: torch.Generator) -> None:
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            size = module.num_features
            module.running_mean.copy_(torch.randn(size, generator=generator))
            module.running_var.copy_(torch.rand(size, generator=generator) + 0.5)
            module.weight.data.copy_(torch.randn(size, generator=generator))
            module.bias.data.copy_(torch.randn(size, generator=generator))


@pytest.mark.parametrize(
    ("decoder", "size"), [("hf", (64, 96)), ("hf", (75, 130)), ("mmseg", (75, 130))]
)
def test_folded_head_matches_unfolded(decoder: str, size: tuple[int, int]) -> None:
    generator = torch.Generator().manual_seed(0)
    model = create_model("segformer-b0", num_classes=19, decoder=decoder)
    _randomise_batchnorm(model, generator)
    for conv in model.decode_head.modules():
        if isinstance(conv, torch.nn.Conv2d) and conv.bias is not None:
            conv.bias.data.copy_(torch.randn(conv.bias.shape, generator=generator))
    folded = fold_for_inference(copy.deepcopy(model))
    assert isinstance(folded.decode_head, FoldedHead)
    pixels = torch.randn(2, 3, *size, generator=generator)
    with torch.no_grad():
        expected = model(pixels)
        actual = folded(pixels)
    assert actual.shape == expected.shape
    scale = expected.abs().max().item()
    assert scale > 1.0  # the BatchNorm randomisation makes the check meaningful
    assert (actual - expected).abs().max().item() <= 1e-5 * scale
    # The loaded model is untouched and the rewritten one has no 4*dim fusion conv left.
    assert any(isinstance(m, torch.nn.Conv2d) and m.in_channels == 4 * 256 for m in model.modules())
    assert not any(
        isinstance(m, torch.nn.Conv2d) and m.in_channels == 4 * 256
        for m in folded.decode_head.modules()
    )
