"""SegFormer architecture: exact parity with HuggingFace transformers, graph shape for export."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from models.checkpoints import load_checkpoint
from models.registry import create_model, list_models
from models.segformer import SegFormer

transformers = pytest.importorskip("transformers")

HF_SIZES = {  # the published configs, written out (transformers has no named presets)
    "segformer-b0": {"hidden_sizes": [32, 64, 160, 256], "depths": [2, 2, 2, 2]},
    "segformer-b2": {"hidden_sizes": [64, 128, 320, 512], "depths": [3, 4, 6, 3]},
}
DECODER_WIDTH = {"segformer-b0": 256, "segformer-b2": 768}
PARITY_SIZES = ((64, 96), (97, 75))


def randomize_(model: nn.Module, seed: int) -> nn.Module:
    """Give every weight and every norm statistic a non-trivial value.

    Default inits (LayerNorm 1/0, BatchNorm running stats 0/1, small Linear weights) would let a
    wrong eps, a skipped BN or swapped norm parameters pass unnoticed; unit-scale weights keep
    logits large enough that a 1e-4 tolerance is a real check.
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.LayerNorm | nn.BatchNorm2d):
                module.weight.copy_(1 + 0.2 * torch.randn(module.weight.shape, generator=generator))
                module.bias.copy_(0.2 * torch.randn(module.bias.shape, generator=generator))
            if isinstance(module, nn.BatchNorm2d):
                assert module.running_mean is not None and module.running_var is not None
                module.running_mean.copy_(
                    0.5 * torch.randn(module.running_mean.shape, generator=generator)
                )
                module.running_var.copy_(
                    0.5 + torch.rand(module.running_var.shape, generator=generator)
                )
            if isinstance(module, nn.Linear | nn.Conv2d):
                fan_in = module.weight[0].numel()
                module.weight.copy_(
                    torch.randn(module.weight.shape, generator=generator) / fan_in**0.5
                )
                if module.bias is not None:
                    module.bias.copy_(0.1 * torch.randn(module.bias.shape, generator=generator))
    return model


def pixels(height: int, width: int, seed: int = 0, batch: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, height, width, generator=torch.Generator().manual_seed(seed))


def save_hf_model(directory: Path, variant: str, num_labels: int, seed: int) -> nn.Module:
    """Random-init transformers SegFormer, saved with save_pretrained; returns it in eval mode."""
    config = transformers.SegformerConfig(
        **HF_SIZES[variant],
        decoder_hidden_size=DECODER_WIDTH[variant],
        num_labels=num_labels,
        id2label={i: f"class {i}" for i in range(num_labels)},
        label2id={f"class {i}": i for i in range(num_labels)},
    )
    config._attn_implementation = "eager"  # the reference stays independent of SDPA
    reference = randomize_(transformers.SegformerForSemanticSegmentation(config), seed).eval()
    reference.save_pretrained(directory)
    return reference


@pytest.mark.parametrize(("variant", "num_labels"), [("segformer-b0", 150), ("segformer-b2", 19)])
def test_hf_parity(tmp_path: Path, variant: str, num_labels: int) -> None:
    reference = save_hf_model(tmp_path / "hf", variant, num_labels, seed=1)
    loaded = load_checkpoint(tmp_path / "hf")
    assert (loaded.format, loaded.model_name) == ("hf", variant)
    assert loaded.classes == tuple(f"class {i}" for i in range(num_labels))
    assert not loaded.model.training
    for height, width in PARITY_SIZES:
        x = pixels(height, width)
        with torch.no_grad():
            expected = reference(pixel_values=x).logits
            actual = loaded.model(x)
        assert actual.shape == expected.shape == (1, num_labels, -(-height // 4), -(-width // 4))
        assert expected.std() > 0.1, "logits too small for the tolerance to mean anything"
        assert (actual - expected).abs().max().item() <= 1e-4


def test_variants_registered_with_published_sizes() -> None:
    assert {f"segformer-b{i}" for i in range(6)} <= set(list_models())
    model = create_model("segformer-b0", num_classes=150)
    assert (model.arch, model.variant, model.num_classes, model.output_stride) == (
        "segformer",
        "segformer-b0",
        150,
        4,
    )
    # Parameter counts of the ADE20K models in the SegFormer paper (table 1 / 6), in millions.
    published = {"b0": 3.8, "b1": 13.7, "b2": 27.5, "b3": 47.3, "b4": 64.1, "b5": 84.7}
    for short, millions in published.items():
        with torch.device("meta"):  # sizes only, no memory
            variant = SegFormer(f"segformer-{short}", num_classes=150)
        assert round(sum(p.numel() for p in variant.parameters()) / 1e6, 1) == millions


def test_mmseg_decoder_flavour_has_its_own_layout() -> None:
    model = create_model("segformer-b0", num_classes=19, decoder="mmseg")
    keys = set(model.state_dict())
    assert "decode_head.convs.3.bn.running_var" in keys
    assert "decode_head.fusion.conv.weight" in keys
    assert not any(k.startswith("decode_head.linear.") for k in keys)
    assert model(pixels(64, 64)).shape == (1, 19, 16, 16)
    with pytest.raises(ValueError, match="decoder"):
        create_model("segformer-b0", num_classes=19, decoder="upernet")


def _attention_ops(graph: torch.fx.Graph) -> tuple[int, int]:
    """(SDPA nodes, any other attention-like nodes: softmax, batched matmuls)."""
    targets = [str(node.target) for node in graph.nodes]
    fused = sum("scaled_dot_product_attention" in t for t in targets)
    unfused = sum(any(op in t for op in ("softmax", "bmm", "matmul")) for t in targets)
    return fused, unfused


def test_b2_has_one_attention_per_block() -> None:
    graph = torch.export.export(
        create_model("segformer-b2", num_classes=5), (pixels(64, 64),)
    ).graph
    assert _attention_ops(graph) == (16, 0)


def test_b0_exports_with_dynamic_height_width_and_one_attention_per_block() -> None:
    model = create_model("segformer-b0", num_classes=7)
    dim = torch.export.Dim
    exported = torch.export.export(
        model,
        (pixels(64, 96, batch=2),),
        dynamic_shapes={
            "pixels": {0: dim("batch", max=16), 2: dim("h", min=64), 3: dim("w", min=64)}
        },
    )
    assert _attention_ops(exported.graph) == (8, 0)
    for batch, height, width in ((1, 64, 64), (2, 131, 97), (1, 200, 328)):
        x = pixels(height, width, seed=height, batch=batch)
        with torch.no_grad():
            expected = model(x)
        actual = exported.module()(x)
        assert actual.shape == expected.shape
        assert (actual - expected).abs().max().item() <= 1e-5
