"""SETR: shapes and strides of the three decoders, the encoder against HuggingFace's ViT, the
position-embedding rule against OpenCV, the mmsegmentation key layout, strict checkpoint loading,
the published ViT-L size and dynamic-shape ``torch.export``.

ViT-B/16-sized models at batch 1 keep this file at a few seconds per test on two CPU cores.
"""

from __future__ import annotations

import math
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from models.checkpoints import CheckpointError, LoadedCheckpoint, load_checkpoint
from models.checkpoints.metadata import parse_config_text
from models.checkpoints.setr_keys import infer_setr_spec, load_mmseg_setr, looks_like_setr
from models.registry import create_model, list_models
from models.setr import (
    SETR,
    SelfAttention,
    resize_pos_embed,
)

NUM_CLASSES = 150
EXPECTED_STRIDE = {"naive": 4, "pup": 1, "mla": 4}
BASE_VARIANTS = ("setr-naive-base", "setr-pup-base", "setr-mla-base")


def _seed_batchnorm_statistics(model: nn.Module, seed: int) -> None:
    """Random BN affine and running statistics so that eval-mode BN is not the identity."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                n = module.num_features
                module.weight.copy_(1 + 0.2 * torch.randn(n, generator=generator))
                module.bias.copy_(0.2 * torch.randn(n, generator=generator))
                module.running_mean.copy_(0.2 * torch.randn(n, generator=generator))
                module.running_var.copy_(0.5 + torch.rand(n, generator=generator))
                module.num_batches_tracked.fill_(1000)


@pytest.fixture(scope="module")
def base_models() -> dict[str, nn.Module]:
    torch.manual_seed(0)
    models = {}
    for name in BASE_VARIANTS:
        model = create_model(name, num_classes=NUM_CLASSES)
        _seed_batchnorm_statistics(model, seed=1)
        models[name] = model
    return models


def _pixels(height: int, width: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(1, 3, height, width, generator=torch.Generator().manual_seed(seed))


def test_all_variants_registered() -> None:
    names = set(list_models())
    for decoder in ("naive", "pup", "mla"):
        assert {f"setr-{decoder}", f"setr-{decoder}-base"} <= names


@pytest.mark.parametrize("name", BASE_VARIANTS)
@pytest.mark.parametrize("height,width", [(512, 512), (256, 384)])
def test_decoder_output_shape_and_stride(
    base_models: dict[str, nn.Module], name: str, height: int, width: int
) -> None:
    """512×512 is the training grid (32×32 patches); 256×384 gives a 16×24 patch grid, so the
    position embeddings must be resized to a non-square grid."""
    model = base_models[name]
    decoder = name.split("-")[1]
    assert (model.arch, model.variant, model.num_classes) == ("setr", name, NUM_CLASSES)
    assert model.output_stride == EXPECTED_STRIDE[decoder]
    assert model.backbone.pos_grid == (32, 32)
    with torch.no_grad():
        logits = model(_pixels(height, width))
    stride = model.output_stride
    assert logits.shape == (1, NUM_CLASSES, height // stride, width // stride)
    assert logits.dtype == torch.float32
    assert torch.isfinite(logits).all()
    assert logits.std() > 0


def test_input_not_multiple_of_patch_is_corner_padded(base_models: dict[str, nn.Module]) -> None:
    """mmseg pads bottom/right with zeros up to the next multiple of 16 (AdaptivePadding)."""
    model = base_models["setr-naive-base"]
    pixels = _pixels(100, 120)
    with torch.no_grad():
        logits = model(pixels)
        padded = model(F.pad(pixels, (0, 8, 0, 12)))
    assert logits.shape == (1, NUM_CLASSES, 112 // 4, 128 // 4)
    torch.testing.assert_close(logits, padded, rtol=0, atol=0)


def _opencv_resize_pos_embed(
    pos_embed: np.ndarray, input_hw: tuple[int, int], pos_hw: tuple[int, int]
) -> np.ndarray:
    """mmseg's rule written out plainly with OpenCV's bilinear resize (half-pixel centres, as
    align_corners=False): class token kept, grid reshaped row-major, resized, flattened."""
    cls_token = pos_embed[0, :1]
    grid = pos_embed[0, 1:].reshape(pos_hw[0], pos_hw[1], -1)
    resized = cv2.resize(grid, (input_hw[1], input_hw[0]), interpolation=cv2.INTER_LINEAR)
    return np.concatenate([cls_token, resized.reshape(input_hw[0] * input_hw[1], -1)])[None]


@pytest.mark.parametrize("input_hw", [(16, 20), (60, 50)])
def test_resize_pos_embed_matches_reference(input_hw: tuple[int, int]) -> None:
    generator = torch.Generator().manual_seed(3)
    pos_embed = torch.randn(1, 48 * 48 + 1, 32, generator=generator)
    resized = resize_pos_embed(pos_embed, input_hw, (48, 48), "bilinear")
    assert resized.shape == (1, 1 + input_hw[0] * input_hw[1], 32)
    assert torch.equal(resized[:, 0], pos_embed[:, 0])
    expected = _opencv_resize_pos_embed(pos_embed.numpy(), input_hw, (48, 48))
    np.testing.assert_allclose(resized.numpy(), expected, rtol=0, atol=1e-4)


def test_resize_pos_embed_identity_at_training_grid() -> None:
    """Resizing every call is only equivalent to mmseg's resize-when-needed if it is exact here."""
    pos_embed = torch.randn(1, 32 * 32 + 1, 16)
    assert torch.equal(resize_pos_embed(pos_embed, (32, 32), (32, 32), "bilinear"), pos_embed)


@pytest.mark.parametrize("bias", [True, False], ids=["qkv_bias", "no_bias"])
def test_attention_matches_torch_multihead_attention(bias: bool) -> None:
    torch.manual_seed(4)
    attention = SelfAttention(embed_dims=64, num_heads=4, bias=bias).eval()
    tokens = torch.randn(2, 37, 64)
    reference, _ = attention.attn(tokens, tokens, tokens, need_weights=False)
    torch.testing.assert_close(attention(tokens, identity=tokens), tokens + reference)


def _transformers_vit_from(backbone: nn.Module, image_size: int) -> nn.Module:
    """A HuggingFace ViTModel holding the same weights as our backbone."""
    from transformers import ViTConfig, ViTModel

    dims = backbone.cls_token.shape[-1]
    config = ViTConfig(
        hidden_size=dims,
        num_hidden_layers=len(backbone.layers),
        num_attention_heads=backbone.layers[0].attn.num_heads,
        intermediate_size=4 * dims,
        image_size=image_size,
        patch_size=16,
        layer_norm_eps=1e-6,
        hidden_act="gelu",
    )
    with torch.device("meta"):  # skip random init; every weight is assigned below
        reference = ViTModel(config, add_pooling_layer=False).eval()
    ours = backbone.state_dict()
    weights = {
        "embeddings.cls_token": ours["cls_token"],
        "embeddings.position_embeddings": ours["pos_embed"],
        "embeddings.patch_embeddings.projection.weight": ours["patch_embed.projection.weight"],
        # mmseg's VisionTransformer defaults to patch_bias=False; HF's ViT always has one.
        "embeddings.patch_embeddings.projection.bias": torch.zeros(dims),
        "layernorm.weight": torch.ones(dims),
        "layernorm.bias": torch.zeros(dims),
    }
    for i in range(len(backbone.layers)):
        src, dst = f"layers.{i}.", f"layers.{i}."
        in_w = ours[src + "attn.attn.in_proj_weight"].chunk(3)
        in_b = ours[src + "attn.attn.in_proj_bias"].chunk(3)
        for j, proj in enumerate(("q_proj", "k_proj", "v_proj")):
            weights[f"{dst}attention.{proj}.weight"] = in_w[j]
            weights[f"{dst}attention.{proj}.bias"] = in_b[j]
        pairs = {
            "attention.o_proj": "attn.attn.out_proj",
            "layernorm_before": "ln1",
            "layernorm_after": "ln2",
            "mlp.fc1": "ffn.layers.0.0",
            "mlp.fc2": "ffn.layers.1",
        }
        for theirs, mine in pairs.items():
            for param in ("weight", "bias"):
                weights[f"{dst}{theirs}.{param}"] = ours[f"{src}{mine}.{param}"]
    reference.load_state_dict(weights, strict=True, assign=True)
    return reference


def test_encoder_matches_transformers_vit() -> None:
    """Our ViT (mmseg layout, fused attention) against HuggingFace's independent ViT on the same
    weights: the feature maps handed to the head are its hidden states at ``out_indices``."""
    torch.manual_seed(5)
    model = create_model("setr-pup-base", num_classes=NUM_CLASSES, img_size=128)
    reference = _transformers_vit_from(model.backbone, image_size=128)
    pixels = _pixels(128, 128, seed=6)
    with torch.no_grad():
        ours = model.backbone(pixels)
        hidden = reference(pixel_values=pixels, output_hidden_states=True).hidden_states
    assert len(ours) == len(model.backbone.out_indices) == 4
    for feature, index in zip(ours, model.backbone.out_indices, strict=True):
        tokens = hidden[index + 1][:, 1:]  # hidden_states[0] is the embedding output
        expected = tokens.transpose(1, 2).reshape(1, -1, 8, 8)
        torch.testing.assert_close(feature, expected, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------ decoders, restated
# The heads written out again with torch.nn.functional, straight from mmseg 1.x's forward code and
# driven by the mmseg-named weights: ConvModule = conv (padding (k-1)//2, no bias) -> BN (eps 1e-5)
# -> ReLU; the heads' LN runs on (N, HW, C) tokens; mmseg's Upsample resizes to
# int(size * scale) with bilinear, align_corners=False.

Weights = dict[str, torch.Tensor]


def _ref_conv_module(w: Weights, prefix: str, x: torch.Tensor) -> torch.Tensor:
    kernel = w[f"{prefix}.conv.weight"]
    x = F.conv2d(x, kernel, None, padding=(kernel.shape[-1] - 1) // 2)
    bn = [w[f"{prefix}.bn.{k}"] for k in ("running_mean", "running_var", "weight", "bias")]
    return F.relu(F.batch_norm(x, *bn, training=False, momentum=0.0, eps=1e-5))


def _ref_token_norm(w: Weights, prefix: str, x: torch.Tensor) -> torch.Tensor:
    n, c, h, width = x.shape
    tokens = x.reshape(n, c, h * width).transpose(2, 1)
    tokens = F.layer_norm(tokens, (c,), w[f"{prefix}.weight"], w[f"{prefix}.bias"], eps=1e-6)
    return tokens.transpose(1, 2).reshape(n, c, h, width)


def _ref_upsample(x: torch.Tensor, scale: int) -> torch.Tensor:
    size = [int(t * scale) for t in x.shape[-2:]]
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


def _ref_conv_seg(w: Weights, x: torch.Tensor) -> torch.Tensor:
    return F.conv2d(x, w["decode_head.conv_seg.weight"], w["decode_head.conv_seg.bias"])


def _ref_up_head(w: Weights, features: list[torch.Tensor], up_scale: int) -> torch.Tensor:
    x = _ref_token_norm(w, "decode_head.norm", features[3])  # in_index=3
    i = 0
    while f"decode_head.up_convs.{i}.0.conv.weight" in w:
        x = _ref_upsample(_ref_conv_module(w, f"decode_head.up_convs.{i}.0", x), up_scale)
        i += 1
    return _ref_conv_seg(w, x)


def _ref_mla(w: Weights, features: list[torch.Tensor]) -> torch.Tensor:
    normed = [_ref_token_norm(w, f"neck.norm.{i}", x) for i, x in enumerate(features)]
    projected = [_ref_conv_module(w, f"neck.mla.channel_proj.{i}", x) for i, x in enumerate(normed)]
    p2, p3, p4, p5 = projected
    mids = [p5, p5 + p4, p5 + p4 + p3, p5 + p4 + p3 + p2]  # MLAModule: m5, m4, m3, m2
    neck_out = [_ref_conv_module(w, f"neck.mla.feat_extract.{i}", m) for i, m in enumerate(mids)]
    outs = []
    for i, x in enumerate(neck_out):
        x = _ref_conv_module(w, f"decode_head.up_convs.{i}.0", x)
        x = _ref_conv_module(w, f"decode_head.up_convs.{i}.1", x)
        outs.append(_ref_upsample(x, 4))
    return _ref_conv_seg(w, torch.cat(outs, dim=1))


@pytest.mark.parametrize("name", BASE_VARIANTS)
def test_decoder_matches_restated_mmseg_forward(
    base_models: dict[str, nn.Module], name: str
) -> None:
    model = base_models[name]
    weights = model.state_dict()
    pixels = _pixels(64, 96, seed=21)
    with torch.no_grad():
        features = model.backbone(pixels)
        if name == "setr-mla-base":
            expected = _ref_mla(weights, features)
        else:
            expected = _ref_up_head(weights, features, up_scale=4 if "naive" in name else 2)
        torch.testing.assert_close(model(pixels), expected, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------ mmsegmentation key layout
# Written from mmseg 1.x sources: VisionTransformer (mmcv MultiheadAttention wraps
# nn.MultiheadAttention as ``attn.attn``; mmcv FFN is Sequential(Sequential(Linear, GELU,
# Dropout), Linear, Dropout); build_norm_layer names LN ``ln1``/``ln2``), ConvModule (conv without
# bias + ``bn``), SETRUPHead, MLANeck/MLAModule, SETRMLAHead, FCNHead(num_convs=0).

Layout = dict[str, tuple[int, ...]]


def _conv_module(prefix: str, cin: int, cout: int, kernel: int) -> Layout:
    layout: Layout = {f"{prefix}.conv.weight": (cout, cin, kernel, kernel)}
    for stat in ("weight", "bias", "running_mean", "running_var"):
        layout[f"{prefix}.bn.{stat}"] = (cout,)
    layout[f"{prefix}.bn.num_batches_tracked"] = ()
    return layout


def _mmseg_backbone(dims: int, layers: int, grid: int) -> Layout:
    layout: Layout = {
        "backbone.cls_token": (1, 1, dims),
        "backbone.pos_embed": (1, grid * grid + 1, dims),
        "backbone.patch_embed.projection.weight": (dims, 3, 16, 16),
    }
    for i in range(layers):
        p = f"backbone.layers.{i}."
        layout |= {
            p + "ln1.weight": (dims,),
            p + "ln1.bias": (dims,),
            p + "attn.attn.in_proj_weight": (3 * dims, dims),
            p + "attn.attn.in_proj_bias": (3 * dims,),
            p + "attn.attn.out_proj.weight": (dims, dims),
            p + "attn.attn.out_proj.bias": (dims,),
            p + "ln2.weight": (dims,),
            p + "ln2.bias": (dims,),
            p + "ffn.layers.0.0.weight": (4 * dims, dims),
            p + "ffn.layers.0.0.bias": (4 * dims,),
            p + "ffn.layers.1.weight": (dims, 4 * dims),
            p + "ffn.layers.1.bias": (dims,),
        }
    return layout


def _mmseg_up_head(prefix: str, dims: int, num_convs: int, kernel: int, classes: int) -> Layout:
    layout: Layout = {f"{prefix}.norm.weight": (dims,), f"{prefix}.norm.bias": (dims,)}
    for i in range(num_convs):
        layout |= _conv_module(f"{prefix}.up_convs.{i}.0", dims if i == 0 else 256, 256, kernel)
    layout |= {
        f"{prefix}.conv_seg.weight": (classes, 256, 1, 1),
        f"{prefix}.conv_seg.bias": (classes,),
    }
    return layout


def mmseg_setr_layout(decoder: str, dims: int, layers: int, grid: int, classes: int) -> Layout:
    """Keys and shapes of an mmseg SETR checkpoint trained with the ADE20K configs, aux heads
    included (Naive: 3 SETRUPHeads 2×1×1 convs, PUP: 3 SETRUPHeads 2×3×3, MLA: 4 FCNHeads)."""
    layout = _mmseg_backbone(dims, layers, grid)
    if decoder == "mla":
        for i in range(4):
            layout[f"neck.norm.{i}.weight"] = layout[f"neck.norm.{i}.bias"] = (dims,)
            layout |= _conv_module(f"neck.mla.channel_proj.{i}", dims, 256, 1)
            layout |= _conv_module(f"neck.mla.feat_extract.{i}", 256, 256, 3)
            layout |= _conv_module(f"decode_head.up_convs.{i}.0", 256, 128, 3)
            layout |= _conv_module(f"decode_head.up_convs.{i}.1", 128, 128, 3)
            layout[f"auxiliary_head.{i}.conv_seg.weight"] = (classes, 256, 1, 1)
            layout[f"auxiliary_head.{i}.conv_seg.bias"] = (classes,)
        layout["decode_head.conv_seg.weight"] = (classes, 512, 1, 1)
        layout["decode_head.conv_seg.bias"] = (classes,)
        return layout
    num_convs, kernel = (1, 1) if decoder == "naive" else (4, 3)
    layout |= _mmseg_up_head("decode_head", dims, num_convs, kernel, classes)
    for k in range(3):
        layout |= _mmseg_up_head(f"auxiliary_head.{k}", dims, 2, kernel, classes)
    return layout


def _without_aux(layout: Layout) -> Layout:
    return {k: v for k, v in layout.items() if not k.startswith("auxiliary_head.")}


def _mmseg_checkpoint(model: nn.Module, decoder: str, grid: int) -> dict[str, torch.Tensor]:
    """The model's weights plus random auxiliary heads, i.e. what mmseg training saves."""
    generator = torch.Generator().manual_seed(7)
    state = dict(model.state_dict())
    layout = mmseg_setr_layout(decoder, 768, 12, grid, NUM_CLASSES)
    for key, shape in layout.items():
        if key.startswith("auxiliary_head."):
            state[key] = torch.randn(shape, generator=generator)
    return state


@pytest.mark.parametrize("name", BASE_VARIANTS)
def test_state_dict_is_mmseg_layout(base_models: dict[str, nn.Module], name: str) -> None:
    decoder = name.split("-")[1]
    expected = _without_aux(mmseg_setr_layout(decoder, 768, 12, 32, NUM_CLASSES))
    actual = {k: tuple(v.shape) for k, v in base_models[name].state_dict().items()}
    assert sorted(set(actual) ^ set(expected)) == []
    assert actual == expected


def _load(
    state: dict[str, torch.Tensor], meta: dict, tmp_path: Path, model_name: str | None
) -> LoadedCheckpoint:
    """Through ``models.checkpoints.load_checkpoint`` on a real .pth file."""
    path = tmp_path / "setr.pth"
    torch.save({"state_dict": state, "meta": meta}, path)
    return load_checkpoint(path, model_name=model_name)


@pytest.mark.parametrize("name", BASE_VARIANTS)
def test_mmseg_checkpoint_round_trip(name: str, tmp_path: Path) -> None:
    """Trained at 256×256 (16×16 grid, inferred from pos_embed), evaluated on a 96×160 input."""
    decoder = name.split("-")[1]
    torch.manual_seed(8)
    source = create_model(name, num_classes=NUM_CLASSES, img_size=256)
    _seed_batchnorm_statistics(source, seed=9)
    state = _mmseg_checkpoint(source, decoder, grid=16)
    assert looks_like_setr(state)
    loaded = _load(state, {"mmseg_version": "1.2.2"}, tmp_path, model_name=None)
    assert (loaded.format, loaded.model_name) == ("mmseg-setr", name)
    model = loaded.model
    assert isinstance(model, SETR)
    assert (model.variant, model.num_classes) == (name, NUM_CLASSES)
    assert model.backbone.pos_grid == (16, 16)
    assert not model.training
    pixels = _pixels(96, 160, seed=10)
    with torch.no_grad():
        torch.testing.assert_close(model(pixels), source(pixels), rtol=0, atol=0)


def test_half_precision_checkpoint_loads_as_float32() -> None:
    torch.manual_seed(11)
    source = create_model("setr-naive-base", num_classes=19, img_size=128)
    half = {k: v.half() if v.is_floating_point() else v for k, v in source.state_dict().items()}
    model = load_mmseg_setr(half, {}, "setr-naive-base")
    assert model.variant == "setr-naive-base"
    assert model.num_classes == 19
    assert model.backbone.pos_grid == (8, 8)
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    pixels = _pixels(64, 64, seed=22)
    with torch.no_grad():
        torch.testing.assert_close(model(pixels), source(pixels), rtol=0.05, atol=0.05)


@pytest.fixture(scope="module")
def naive_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(12)
    source = create_model("setr-naive-base", num_classes=NUM_CLASSES, img_size=128)
    return _mmseg_checkpoint(source, "naive", grid=8)


def _load_error(state: dict[str, torch.Tensor], model_name: str | None = None) -> str:
    with pytest.raises(CheckpointError) as caught:
        load_mmseg_setr(state, {}, model_name)
    return str(caught.value)


def test_unexpected_key_is_named(naive_state: dict[str, torch.Tensor]) -> None:
    state = dict(naive_state) | {"decode_head.extra.weight": torch.zeros(3)}
    assert "unexpected: decode_head.extra.weight" in _load_error(state)


def test_missing_key_is_named(naive_state: dict[str, torch.Tensor]) -> None:
    state = {k: v for k, v in naive_state.items() if k != "backbone.layers.3.ln2.bias"}
    assert "missing: backbone.layers.3.ln2.bias" in _load_error(state)


def test_misshaped_key_is_named(naive_state: dict[str, torch.Tensor]) -> None:
    state = dict(naive_state) | {"decode_head.norm.weight": torch.ones(5)}
    message = _load_error(state)
    assert "shape mismatch: decode_head.norm.weight" in message
    assert "(5,)" in message


def test_model_name_must_match_checkpoint(naive_state: dict[str, torch.Tensor]) -> None:
    assert "not setr-pup-base" in _load_error(naive_state, model_name="setr-pup-base")


def test_not_setr_is_rejected() -> None:
    state = {
        "backbone.cls_token": torch.zeros(1, 1, 8),
        "decode_head.conv_seg.weight": torch.zeros(1),
    }
    assert not looks_like_setr(state)
    assert "SETR" in _load_error(state)


# A config dump in mmengine's pretty_text form, trimmed to the parts that matter, with a
# non-default choice (bicubic position-embedding interpolation, 12 heads stated explicitly) and
# code that would leave a file behind if anything executed it.
CONFIG_TEXT = """
norm_cfg = dict(type='SyncBN', requires_grad=True)
backbone_norm_cfg = dict(type='LN', eps=1e-06, requires_grad=True)
crop_size = (128, 128)
model = dict(
    type='EncoderDecoder',
    data_preprocessor=dict(type='SegDataPreProcessor', mean=[123.675, 116.28, 103.53]),
    pretrained=None,
    backbone=dict(
        type='VisionTransformer',
        img_size=crop_size,
        patch_size=16,
        embed_dims=768,
        num_layers=12,
        num_heads=12,
        out_indices=(4, 7, 9, 11),
        drop_rate=0.0,
        norm_cfg=backbone_norm_cfg,
        with_cls_token=True,
        interpolate_mode='bicubic',
        init_cfg=open('{marker}', 'w').write('executed')),
    decode_head=dict(
        type='SETRUPHead', in_channels=768, channels=256, in_index=3, num_classes=150,
        dropout_ratio=0, norm_cfg=norm_cfg, num_convs=1, up_scale=4, kernel_size=1,
        align_corners=False))
__import__('pathlib').Path('{marker}').write_text('executed')
"""


def test_config_text_is_read_without_executing(tmp_path: Path) -> None:
    marker = tmp_path / "executed.txt"
    text = CONFIG_TEXT.replace("{marker}", str(marker))
    config = parse_config_text(text)
    assert config["model"]["backbone"]["img_size"] == (128, 128)
    assert config["model"]["backbone"]["norm_cfg"] == {
        "type": "LN",
        "eps": 1e-6,
        "requires_grad": True,
    }
    assert not marker.exists()

    torch.manual_seed(13)
    source = create_model("setr-naive-base", num_classes=NUM_CLASSES, img_size=128)
    state = _mmseg_checkpoint(source, "naive", grid=8)
    spec, num_classes = infer_setr_spec(state, {"cfg": text})
    assert num_classes == NUM_CLASSES
    assert spec.interpolate_mode == "bicubic"
    assert spec.pos_grid == (8, 8)
    model = load_mmseg_setr(state, {"cfg": text}, None)
    assert model.backbone.interpolate_mode == "bicubic"
    assert not marker.exists()
    # bicubic vs the published bilinear changes logits once the grid is resized
    pixels = _pixels(96, 64, seed=14)
    with torch.no_grad():
        assert not torch.allclose(model(pixels), source(pixels))


def test_unreadable_config_falls_back_to_published_values() -> None:
    torch.manual_seed(15)
    source = create_model("setr-mla-base", num_classes=NUM_CLASSES, img_size=128)
    state = _mmseg_checkpoint(source, "mla", grid=8)
    spec, _ = infer_setr_spec(state, {"cfg": "model = dict(backbone=dict(num_heads=("})
    assert (spec.decoder, spec.num_heads, spec.with_cls_token) == ("mla", 12, False)
    assert spec.out_indices == (2, 5, 8, 11)
    assert spec.interpolate_mode == "bilinear"


# ---------------------------------------------------------------------------- published sizes

# timm's vit_large_patch16_384 (the ImageNet-21k ViT-L/16 SETR starts from): 304,715,752
# parameters including its final LayerNorm and 1000-class head.
VIT_L16_384_PARAMS = 304_715_752
VIT_L_FINAL_NORM_AND_HEAD = 2 * 1024 + 1024 * 1000 + 1000


def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _count_layout(layout: Layout, prefix: str) -> int:
    """Learnable entries of an mmseg layout (BN running statistics are buffers)."""
    return sum(
        math.prod(shape)
        for key, shape in layout.items()
        if key.startswith(prefix) and not key.split(".")[-1].startswith(("running_", "num_"))
    )


@pytest.mark.parametrize("name", ["setr-naive", "setr-pup", "setr-mla"])
def test_vit_large_parameter_count(name: str) -> None:
    """Built on the meta device: no memory, but the counts come from the real modules."""
    from transformers import ViTConfig, ViTModel

    decoder = name.split("-")[1]
    with torch.device("meta"):
        at_384 = create_model(name, num_classes=NUM_CLASSES, img_size=384)
        model = create_model(name, num_classes=NUM_CLASSES)
        config = ViTConfig(
            hidden_size=1024,
            num_hidden_layers=24,
            num_attention_heads=16,
            intermediate_size=4096,
            image_size=512,
        )
        reference = ViTModel(config, add_pooling_layer=False)
    patch_bias = 1024  # timm's and HF's ViT have one; mmseg's (patch_bias=False) does not
    assert _count(at_384.backbone) + VIT_L_FINAL_NORM_AND_HEAD + patch_bias == VIT_L16_384_PARAMS
    # SETR has no final norm either
    assert _count(model.backbone) == _count(reference) - 2 * 1024 - patch_bias
    layout = mmseg_setr_layout(decoder, 1024, 24, 32, NUM_CLASSES)
    heads = _count(model) - _count(model.backbone)
    assert heads == _count_layout(layout, "decode_head.") + _count_layout(layout, "neck.")
    assert len(model.backbone.layers) == 24
    assert model.backbone.layers[0].attn.num_heads == 16


# ------------------------------------------------------------------------------------- export


def test_dynamic_shape_export_pup_base() -> None:
    """One exported program serves two input sizes (neither the training grid) and matches
    eager; the graph keeps exactly one scaled_dot_product_attention per block."""
    torch.manual_seed(16)
    model = create_model("setr-pup-base", num_classes=NUM_CLASSES)
    _seed_batchnorm_statistics(model, seed=17)
    patches_h = torch.export.Dim("patches_h", min=1, max=64)
    patches_w = torch.export.Dim("patches_w", min=1, max=64)
    exported = torch.export.export(
        model,
        (_pixels(64, 96),),
        dynamic_shapes={"pixels": {2: 16 * patches_h, 3: 16 * patches_w}},
    )
    attention_nodes = [
        node
        for node in exported.graph.nodes
        if node.op == "call_function" and "scaled_dot_product" in str(node.target)
    ]
    assert len(attention_nodes) == 12
    program = exported.module()
    for height, width in [(64, 96), (112, 48)]:
        pixels = _pixels(height, width, seed=height)
        with torch.no_grad():
            expected = model(pixels)
            actual = program(pixels)
        assert actual.shape == (1, NUM_CLASSES, height, width)
        torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4)
