"""Checkpoint loaders: NVlabs and mmsegmentation layouts round-trip, unsafe and bad files refused.

The references are HuggingFace transformers' SegFormer (an implementation we did not write) and,
for mmsegmentation's ``SegformerHead``, a plain-torch re-implementation written here from
``mmseg/models/decode_heads/segformer_head.py``. The key maps below are written from the
NVlabs (``mmseg/models/backbones/mix_transformer.py``, ``segformer_head.py``) and mmseg 1.x
(``mmseg/models/backbones/mit.py``) sources, independently of ``models/checkpoints.py``.
"""

from __future__ import annotations

import builtins
import codecs
import hashlib
import io
import json
import os
import pickle
import re
import struct
import sys
import types
import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from export import export_bundle
from models.checkpoints import CheckpointError, load_checkpoint, read_checkpoint
from models.datasets import ADE20K_CLASSES, get_dataset
from service.bundle import load_bundle
from tests.integration.test_segformer import pixels, save_hf_model

transformers = pytest.importorskip("transformers")

NUM_CLASSES = 19
SIZE = (64, 96)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("hf") / "segformer-b0-city"
    save_hf_model(directory, "segformer-b0", NUM_CLASSES, seed=7)
    return directory


@pytest.fixture(scope="module")
def reference(hf_dir: Path) -> nn.Module:
    model = transformers.SegformerForSemanticSegmentation.from_pretrained(
        hf_dir, attn_implementation="eager"
    )
    return model.eval()


def hf_state(reference: nn.Module) -> dict[str, torch.Tensor]:
    """The reference's weights under the hub key names (what save_pretrained writes)."""
    from safetensors.torch import load_file

    return load_file(str(Path(reference.name_or_path) / "model.safetensors"))


def set_layer_norm_eps(model: nn.Module, eps_by_role: dict[str, float]) -> None:
    """Give the reference the LayerNorm epsilons of another implementation, by module role."""
    for name, module in model.named_modules():
        if isinstance(module, nn.LayerNorm):
            role = next(r for r in eps_by_role if re.search(r, name))
            module.eps = eps_by_role[role]


# NVlabs: norm_layer=partial(LayerNorm, eps=1e-6) for blocks and stage norms; plain LayerNorm
# (1e-5) in OverlapPatchEmbed and Attention.norm.
NVLABS_EPS = {r"patch_embeddings": 1e-5, r"sequence_reduction": 1e-5, r".": 1e-6}
# mmseg 1.x MixVisionTransformer: norm_cfg=dict(type="LN", eps=1e-6) everywhere.
MMSEG_EPS = {r".": 1e-6}


def to_nvlabs(hub: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    renames = [
        (r"^segformer\.encoder\.patch_embeddings\.(\d)\.proj\.", "backbone.patch_embed{s}.proj."),
        (
            r"^segformer\.encoder\.patch_embeddings\.(\d)\.layer_norm\.",
            "backbone.patch_embed{s}.norm.",
        ),
        (r"^segformer\.encoder\.layer_norm\.(\d)\.", "backbone.norm{s}."),
        (r"^decode_head\.linear_c\.(\d)\.proj\.", "decode_head.linear_c{s}.proj."),
    ]
    block_parts = {
        "layer_norm_1": "norm1",
        "attention.self.query": "attn.q",
        "attention.self.sr": "attn.sr",
        "attention.self.layer_norm": "attn.norm",
        "attention.output.dense": "attn.proj",
        "layer_norm_2": "norm2",
        "mlp.dense1": "mlp.fc1",
        "mlp.dwconv.dwconv": "mlp.dwconv.dwconv",
        "mlp.dense2": "mlp.fc2",
    }
    for key, tensor in hub.items():
        if block := re.match(r"^segformer\.encoder\.block\.(\d)\.(\d+)\.(.+)\.(\w+)$", key):
            stage, index, part, param = block.groups()
            prefix = f"backbone.block{int(stage) + 1}.{index}"
            if part == "attention.self.key":
                value = hub[key.replace(".key.", ".value.")]
                out[f"{prefix}.attn.kv.{param}"] = torch.cat([tensor, value])
            elif part != "attention.self.value":
                out[f"{prefix}.{block_parts[part]}.{param}"] = tensor
            continue
        for pattern, template in renames:
            if match := re.match(pattern, key):
                target = template.format(s=int(match.group(1)) + 1)
                out[target + key[match.end() :]] = tensor
                break
        else:
            head = {
                "decode_head.linear_fuse.weight": "decode_head.linear_fuse.conv.weight",
                "decode_head.classifier.weight": "decode_head.linear_pred.weight",
                "decode_head.classifier.bias": "decode_head.linear_pred.bias",
            }
            out[
                head.get(key, key.replace("decode_head.batch_norm.", "decode_head.linear_fuse.bn."))
            ] = tensor
    return out


def to_mmseg_backbone(hub: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    block_parts = {
        "layer_norm_1": "norm1",
        "attention.self.sr": "attn.sr",
        "attention.self.layer_norm": "attn.norm",
        "attention.output.dense": "attn.attn.out_proj",
        "layer_norm_2": "norm2",
        "mlp.dwconv.dwconv": "ffn.layers.1",
    }
    for key, tensor in hub.items():
        if match := re.match(
            r"^segformer\.encoder\.patch_embeddings\.(\d)\.(proj|layer_norm)\.(\w+)$", key
        ):
            stage, part, param = match.groups()
            name = "projection" if part == "proj" else "norm"
            out[f"backbone.layers.{stage}.0.{name}.{param}"] = tensor
        elif match := re.match(r"^segformer\.encoder\.layer_norm\.(\d)\.(\w+)$", key):
            out[f"backbone.layers.{match[1]}.2.{match[2]}"] = tensor
        elif match := re.match(r"^segformer\.encoder\.block\.(\d)\.(\d+)\.(.+)\.(\w+)$", key):
            stage, index, part, param = match.groups()
            prefix = f"backbone.layers.{stage}.1.{index}"
            if part == "attention.self.query":
                key_t, value_t = (
                    hub[key.replace(".query.", ".key.")],
                    hub[key.replace(".query.", ".value.")],
                )
                out[f"{prefix}.attn.attn.in_proj_{param}"] = torch.cat([tensor, key_t, value_t])
            elif part in ("mlp.dense1", "mlp.dense2"):
                layer = 0 if part == "mlp.dense1" else 4
                out[f"{prefix}.ffn.layers.{layer}.{param}"] = (
                    tensor[:, :, None, None] if param == "weight" else tensor
                )
            elif part in block_parts:
                out[f"{prefix}.{block_parts[part]}.{param}"] = tensor
    return out


def mmseg_head_params(in_dims: tuple[int, ...], dim: int, seed: int) -> dict[str, torch.Tensor]:
    """Random SegformerHead weights under mmseg's key names (ConvModule: conv without bias, bn)."""
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return scale * torch.randn(*shape, generator=generator)

    def conv_module(prefix: str, cin: int) -> dict[str, torch.Tensor]:
        return {
            f"{prefix}.conv.weight": randn(dim, cin, 1, 1, scale=cin**-0.5),
            f"{prefix}.bn.weight": 1 + randn(dim, scale=0.2),
            f"{prefix}.bn.bias": randn(dim, scale=0.2),
            f"{prefix}.bn.running_mean": randn(dim, scale=0.5),
            f"{prefix}.bn.running_var": 0.5 + torch.rand(dim, generator=generator),
            f"{prefix}.bn.num_batches_tracked": torch.tensor(1000),
        }

    params: dict[str, torch.Tensor] = {}
    for i, cin in enumerate(in_dims):
        params |= conv_module(f"decode_head.convs.{i}", cin)
    params |= conv_module("decode_head.fusion_conv", dim * len(in_dims))
    params["decode_head.conv_seg.weight"] = randn(NUM_CLASSES, dim, 1, 1, scale=dim**-0.5)
    params["decode_head.conv_seg.bias"] = randn(NUM_CLASSES, scale=0.1)
    return params


def mmseg_segformer_head(features: list[torch.Tensor], p: dict[str, torch.Tensor]) -> torch.Tensor:
    """SegformerHead.forward in eval mode: ConvModule per level, resize to c1, cat c1..c4,
    fusion ConvModule, dropout (identity), conv_seg."""

    def conv_module(x: torch.Tensor, prefix: str) -> torch.Tensor:
        x = F.conv2d(x, p[f"{prefix}.conv.weight"])
        x = F.batch_norm(
            x,
            p[f"{prefix}.bn.running_mean"],
            p[f"{prefix}.bn.running_var"],
            p[f"{prefix}.bn.weight"],
            p[f"{prefix}.bn.bias"],
            training=False,
            eps=1e-5,
        )
        return F.relu(x)

    size = features[0].shape[2:]
    outs = [
        F.interpolate(
            conv_module(x, f"decode_head.convs.{i}"),
            size=size,
            mode="bilinear",
            align_corners=False,
        )
        for i, x in enumerate(features)
    ]
    fused = conv_module(torch.cat(outs, dim=1), "decode_head.fusion_conv")
    return F.conv2d(fused, p["decode_head.conv_seg.weight"], p["decode_head.conv_seg.bias"])


def layer_norm_eps(model: nn.Module) -> dict[str, float]:
    """eps of the patch-embedding, key/value-reduction and block LayerNorms of our model."""
    stage = model.encoder.stages[0]
    return {
        "patch_embed": stage.patch_embed.norm.eps,
        "reduction": stage.blocks[0].attn.sr_norm.eps,
        "block": stage.blocks[0].norm1.eps,
        "stage": stage.norm.eps,
    }


def test_nvlabs_round_trip(tmp_path: Path, reference: nn.Module) -> None:
    state = to_nvlabs(hf_state(reference))
    # SegFormerHead's base class creates a conv_seg it never uses; releases carry it.
    state["decode_head.conv_seg.weight"] = torch.randn(NUM_CLASSES, 128, 1, 1)
    state["decode_head.conv_seg.bias"] = torch.randn(NUM_CLASSES)
    classes = [f"c{i}" for i in range(NUM_CLASSES)]
    palette = [[i, 2 * i, 3 * i] for i in range(NUM_CLASSES)]
    path = tmp_path / "segformer.b0.1024x1024.city.160k.pth"
    # What an mmcv 1.x runner (mmseg 0.x, NVlabs' training) writes: config text, mmcv version,
    # classes and palette in meta, optimizer state beside the weights.
    meta = {
        "mmcv_version": "1.2.7",
        "config": "norm_cfg = dict(type='SyncBN', requires_grad=True)\n"
        "model = dict(type='EncoderDecoder', backbone=dict(type='mit_b0', style='pytorch'))\n",
        "CLASSES": classes,
        "PALETTE": palette,
    }
    optimizer = {"state": {0: {"exp_avg": torch.zeros(3)}}, "param_groups": [{"lr": 6e-5}]}
    torch.save({"meta": meta, "state_dict": state, "optimizer": optimizer}, path)

    loaded = load_checkpoint(path, model_name="segformer-b0")
    assert (loaded.format, loaded.model_name, loaded.source_name) == (
        "nvlabs",
        "segformer-b0",
        path.name,
    )
    assert loaded.classes == tuple(classes)
    assert loaded.palette == tuple(tuple(c) for c in palette)
    assert loaded.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert layer_norm_eps(loaded.model) == {
        "patch_embed": 1e-5,
        "reduction": 1e-5,
        "block": 1e-6,
        "stage": 1e-6,
    }

    set_layer_norm_eps(reference, NVLABS_EPS)
    try:
        x = pixels(*SIZE, seed=3)
        with torch.no_grad():
            expected = reference(pixel_values=x).logits
            actual = loaded.model(x)
    finally:
        set_layer_norm_eps(reference, {r".": 1e-5})
    assert expected.std() > 0.1
    assert (actual - expected).abs().max().item() <= 1e-4


def save_mmseg_checkpoint(
    path: Path, reference: nn.Module, meta: dict[str, object]
) -> dict[str, torch.Tensor]:
    head = mmseg_head_params((32, 64, 160, 256), 256, seed=11)
    state = to_mmseg_backbone(hf_state(reference)) | head
    state["auxiliary_head.conv_seg.weight"] = torch.randn(NUM_CLASSES, 64, 1, 1)
    torch.save({"meta": meta, "state_dict": state}, path)
    return head


def test_mmseg_round_trip_against_plain_torch_head(tmp_path: Path, reference: nn.Module) -> None:
    classes = tuple(f"k{i}" for i in range(NUM_CLASSES))
    palette = tuple((i, 255 - i, 7) for i in range(NUM_CLASSES))
    meta = {
        "dataset_meta": {"classes": classes, "palette": [list(c) for c in palette]},
        "cfg": "model = dict(type='EncoderDecoder')",
    }
    path = tmp_path / "segformer_mit-b0_8xb1-160k_cityscapes-1024x1024.pth"
    head = save_mmseg_checkpoint(path, reference, meta)

    loaded = load_checkpoint(path)
    assert (loaded.format, loaded.model_name) == ("mmseg", "segformer-b0")
    assert (loaded.classes, loaded.palette) == (classes, palette)
    _, read_meta = read_checkpoint(path)
    assert read_meta["cfg"] == meta["cfg"]
    assert set(layer_norm_eps(loaded.model).values()) == {1e-6}

    set_layer_norm_eps(reference, MMSEG_EPS)
    try:
        x = pixels(*SIZE, seed=4)
        with torch.no_grad():
            features = list(reference.segformer(x, output_hidden_states=True).hidden_states)
            expected = mmseg_segformer_head(features, head)
            actual = loaded.model(x)
    finally:
        set_layer_norm_eps(reference, {r".": 1e-5})
    assert actual.shape == expected.shape == (1, NUM_CLASSES, 16, 24)
    assert expected.std() > 0.1
    assert (actual - expected).abs().max().item() <= 1e-4


@pytest.fixture
def fake_mmengine(tmp_path: Path) -> Iterator[tuple[type, Path]]:
    """An importable ``mmengine.logging.MessageHub`` whose unpickling would write a file."""
    marker = tmp_path / "mmengine-code-ran"

    class MessageHub:
        def __setstate__(self, state: dict[str, object]) -> None:
            marker.write_text("ran")
            self.__dict__.update(state)

    package, module = types.ModuleType("mmengine"), types.ModuleType("mmengine.logging")
    MessageHub.__module__, MessageHub.__qualname__ = "mmengine.logging", "MessageHub"
    module.MessageHub = MessageHub  # type: ignore[attr-defined]
    package.logging = module  # type: ignore[attr-defined]
    saved = {name: sys.modules.get(name) for name in ("mmengine", "mmengine.logging")}
    sys.modules.update({"mmengine": package, "mmengine.logging": module})
    try:
        yield MessageHub, marker
    finally:
        for name, previous in saved.items():
            if previous is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = previous


def test_mmengine_objects_are_tolerated_but_never_run(
    tmp_path: Path, reference: nn.Module, fake_mmengine: tuple[type, Path]
) -> None:
    message_hub_type, marker = fake_mmengine
    hub = message_hub_type()
    hub.__dict__["log_scalars"] = {"loss": [0.5, 0.25]}
    path = tmp_path / "iter_160000.pth"
    meta = {"dataset_meta": {"classes": [f"k{i}" for i in range(NUM_CLASSES)]}}
    save_mmseg_checkpoint(path, reference, meta)
    checkpoint = torch.load(path, weights_only=True)
    checkpoint["message_hub"] = hub
    checkpoint["meta"]["hub_copy"] = hub
    torch.save(checkpoint, path)
    with pytest.raises(Exception, match="weights_only"):
        torch.load(path, weights_only=True)  # why a restricted unpickler is needed at all

    state, read_meta = read_checkpoint(path)
    loaded = load_checkpoint(path)
    assert not marker.exists()
    assert loaded.format == "mmseg" and "backbone.layers.0.0.projection.weight" in state
    assert "mmengine.logging.MessageHub" in repr(read_meta["hub_copy"])
    assert read_meta["hub_copy"].state == {"log_scalars": {"loss": [0.5, 0.25]}}


class _WritesFile:
    def __init__(self, target: Path, via: str) -> None:
        self.target, self.via = target, via

    def __reduce__(self) -> tuple[object, tuple[str]]:
        if self.via == "exec":
            return builtins.exec, (f"open({str(self.target)!r}, 'w').write('pwned')",)
        return os.system, (f"touch {self.target}",)


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
@pytest.mark.parametrize(("via", "global_name"), [("exec", "builtins.exec"), ("system", "system")])
def test_code_in_a_pickle_is_refused_and_never_runs(
    tmp_path: Path, reference: nn.Module, via: str, global_name: str, zip_format: bool
) -> None:
    target = tmp_path / "pwned.txt"
    path = tmp_path / "evil.pth"
    state = to_nvlabs(hf_state(reference))
    checkpoint = {"state_dict": state, "meta": {"note": _WritesFile(target, via)}}
    torch.save(checkpoint, path, _use_new_zipfile_serialization=zip_format)
    with pytest.raises(CheckpointError, match=rf"evil\.pth: refused.*{global_name}"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match="refused"):
        read_checkpoint(path)
    assert not target.exists()


def test_bare_state_dict_loads(tmp_path: Path, reference: nn.Module) -> None:
    """``torch.save(model.state_dict())``: no wrapper, no metadata; the keys tell the format."""
    path = tmp_path / "bare.pth"
    torch.save(to_nvlabs(hf_state(reference)), path)
    loaded = load_checkpoint(path)
    assert (loaded.format, loaded.model_name, loaded.classes) == ("nvlabs", "segformer-b0", None)


def test_legacy_torch_format_loads(tmp_path: Path, reference: nn.Module) -> None:
    """Pre-1.6 (non-zip) torch.save files, as old mmcv runners wrote them."""
    path = tmp_path / "legacy.pth"
    torch.save(
        {"state_dict": to_nvlabs(hf_state(reference))}, path, _use_new_zipfile_serialization=False
    )
    loaded = load_checkpoint(path)
    zipped = tmp_path / "zipped.pth"
    torch.save({"state_dict": to_nvlabs(hf_state(reference))}, zipped)
    x = pixels(*SIZE)
    with torch.no_grad():
        assert torch.equal(loaded.model(x), load_checkpoint(zipped).model(x))


def test_safetensors_preferred_over_pickle_in_hf_directory(tmp_path: Path, hf_dir: Path) -> None:
    directory = tmp_path / "hf"
    directory.mkdir()
    for name in ("config.json", "model.safetensors"):
        (directory / name).write_bytes((hf_dir / name).read_bytes())
    (directory / "pytorch_model.bin").write_bytes(b"not a pickle at all")
    loaded = load_checkpoint(directory)
    assert (
        loaded.sha256 == hashlib.sha256((directory / "model.safetensors").read_bytes()).hexdigest()
    )


def test_hf_layer_norm_eps_matches_transformers(hf_dir: Path, reference: nn.Module) -> None:
    theirs = {m.eps for m in reference.modules() if isinstance(m, nn.LayerNorm)}
    assert set(layer_norm_eps(load_checkpoint(hf_dir).model).values()) == theirs == {1e-5}


def test_pytorch_model_bin_directory_loads(
    tmp_path: Path, hf_dir: Path, reference: nn.Module
) -> None:
    directory = tmp_path / "hf-bin"
    directory.mkdir()
    (directory / "config.json").write_bytes((hf_dir / "config.json").read_bytes())
    torch.save(hf_state(reference), directory / "pytorch_model.bin")
    loaded = load_checkpoint(directory)
    x = pixels(*SIZE)
    with torch.no_grad():
        assert (loaded.model(x) - reference(pixel_values=x).logits).abs().max().item() <= 1e-4


# --------------------------------------------------------------------------- bad checkpoints


def test_wrong_variant_named(hf_dir: Path) -> None:
    with pytest.raises(
        CheckpointError, match=r"holds segformer-b0.*not the requested segformer-b2"
    ):
        load_checkpoint(hf_dir, model_name="segformer-b2")


def test_an_encoder_without_its_decode_head_is_named_as_such(
    tmp_path: Path, reference: nn.Module
) -> None:
    """transformers' SegformerModel (the encoder ``SegformerForSemanticSegmentation`` wraps)
    saved alone: the error said only "missing key decode_head.classifier.weight"."""
    encoder = tmp_path / "encoder"
    reference.segformer.save_pretrained(encoder)
    with pytest.raises(
        CheckpointError,
        match=r"holds a segformer-b0 encoder without a decode head .*SegformerForSemanticSeg",
    ):
        load_checkpoint(encoder)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_truncated_file(tmp_path: Path, reference: nn.Module, suffix: str) -> None:
    path = tmp_path / f"cut{suffix}"
    state = to_nvlabs(hf_state(reference))
    if suffix == ".pth":
        torch.save({"state_dict": state}, path)
    else:
        save_file(state, str(path))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    message = "a damaged or truncated zip archive" if suffix == ".pth" else "not a readable"
    with pytest.raises(CheckpointError, match=rf"cut\.\w+: {message}"):
        load_checkpoint(path)


def _save_nvlabs(
    path: Path, state: dict[str, torch.Tensor], meta: dict[str, object] | None = None
) -> Path:
    torch.save({"state_dict": state, "meta": meta or {}}, path)
    return path


def test_extra_missing_and_misshaped_keys_are_named(tmp_path: Path, reference: nn.Module) -> None:
    base = to_nvlabs(hf_state(reference))
    extra = base | {"decode_head.extra_conv.weight": torch.zeros(3)}
    with pytest.raises(
        CheckpointError,
        match=r"nvlabs format segformer-b0: unexpected keys: decode_head\.extra_conv\.weight",
    ):
        load_checkpoint(_save_nvlabs(tmp_path / "extra.pth", extra))

    missing = {k: v for k, v in base.items() if k != "backbone.block2.1.attn.kv.bias"}
    with pytest.raises(CheckpointError, match=r"missing keys: backbone\.block2\.1\.attn\.kv\.bias"):
        load_checkpoint(_save_nvlabs(tmp_path / "missing.pth", missing))

    misshaped = base | {"backbone.block1.0.mlp.fc1.weight": torch.zeros(128, 31)}
    with pytest.raises(
        CheckpointError,
        match=r"mis-shaped keys: backbone\.block1\.0\.mlp\.fc1\.weight \(128, 31\) "
        r"\(model needs \(128, 32\)\)",
    ):
        load_checkpoint(_save_nvlabs(tmp_path / "misshaped.pth", misshaped))

    deeper = base | {"backbone.block1.2.norm1.weight": torch.ones(32)}
    with pytest.raises(
        CheckpointError,
        match=r"no SegFormer variant has embed dims \[32, 64, 160, 256\] and depths \[3, 2, 2, 2\]",
    ):
        load_checkpoint(_save_nvlabs(tmp_path / "deeper.pth", deeper))


def test_auxiliary_head_dropped_but_nothing_else(tmp_path: Path, reference: nn.Module) -> None:
    state = to_nvlabs(hf_state(reference)) | {"auxiliary_head.conv_seg.weight": torch.zeros(2)}
    assert load_checkpoint(_save_nvlabs(tmp_path / "aux.pth", state)).model_name == "segformer-b0"


def test_wrong_class_count(tmp_path: Path, reference: nn.Module, hf_dir: Path) -> None:
    state = to_nvlabs(hf_state(reference))
    path = _save_nvlabs(tmp_path / "classes.pth", state, {"CLASSES": ["a", "b", "c"]})
    with pytest.raises(
        CheckpointError, match=r"classifier has 19 outputs but the metadata lists 3 class names"
    ):
        load_checkpoint(path)

    for label, message in (
        ("x", "the metadata lists 150 class names"),
        ("LABEL_", "config.json declares 150 labels but the classifier has 19 outputs"),
    ):
        directory = tmp_path / f"hf-{label}"
        directory.mkdir()
        config = json.loads((hf_dir / "config.json").read_text())
        config["id2label"] = {str(i): f"{label}{i}" for i in range(150)}
        (directory / "config.json").write_text(json.dumps(config))
        (directory / "model.safetensors").write_bytes((hf_dir / "model.safetensors").read_bytes())
        with pytest.raises(CheckpointError, match=message):
            load_checkpoint(directory)


def test_not_a_checkpoint(tmp_path: Path) -> None:
    text = tmp_path / "notes.pth"
    text.write_text("these are not weights\n")
    with pytest.raises(CheckpointError, match=r"notes\.pth: not a readable PyTorch checkpoint"):
        load_checkpoint(text)

    a_list = tmp_path / "list.pth"
    torch.save([1, 2, 3], a_list)
    with pytest.raises(CheckpointError, match=r"list\.pth: holds a list, not a checkpoint"):
        load_checkpoint(a_list)

    resnet = tmp_path / "resnet.pth"
    torch.save({"state_dict": {"conv1.weight": torch.zeros(64, 3, 7, 7)}}, resnet)
    with pytest.raises(
        CheckpointError,
        match=r"resnet\.pth: no known checkpoint layout matches the keys \(first keys: conv1\.w",
    ):
        load_checkpoint(resnet)

    with pytest.raises(CheckpointError, match="no such file"):
        load_checkpoint(tmp_path / "absent.pth")
    empty_dir = tmp_path / "empty"
    empty_dir.mkdir()
    with pytest.raises(
        CheckpointError, match=r"holds none of model\.safetensors, pytorch_model\.bin"
    ):
        load_checkpoint(empty_dir)


def test_forced_format_that_does_not_fit_names_the_format(
    tmp_path: Path, reference: nn.Module
) -> None:
    path = _save_nvlabs(tmp_path / "nv.pth", to_nvlabs(hf_state(reference)))
    assert load_checkpoint(path, format="nvlabs").format == "nvlabs"
    with pytest.raises(
        CheckpointError,
        match=r"missing key backbone\.layers\.0\.0\.projection\.weight \(format assumed: mmseg\)",
    ):
        load_checkpoint(path, format="mmseg")
    with pytest.raises(CheckpointError, match="unknown format 'onnx'"):
        load_checkpoint(path, format="onnx")


def test_class_token_goes_to_the_setr_loader_and_errors_name_the_file(tmp_path: Path) -> None:
    """A ViT class token routes to SETR even beside SegFormer-like ``backbone.layers.`` keys."""
    path = tmp_path / "setr.pth"
    state = {
        "backbone.cls_token": torch.zeros(1, 1, 8),
        "backbone.layers.0.ln1.weight": torch.ones(8),
    }
    torch.save({"state_dict": state, "meta": {}}, path)
    with pytest.raises(
        CheckpointError,
        match=r"setr\.pth: cannot read a SETR model .* \(format assumed: mmseg-setr\)",
    ):
        load_checkpoint(path)


def test_reference_batch_norm_statistics_are_not_trivial(reference: nn.Module) -> None:
    """Guards the fixtures: a loader that skipped BatchNorm buffers could not pass the others."""
    bn = reference.decode_head.batch_norm
    assert bn.running_var.sub(1).abs().max() > 0.05 and bn.running_mean.abs().max() > 0.05


# --------------------------------------------------------------------------- crafted files


class _Stateful(nn.Module):
    """A TorchScript module whose ``__setstate__`` has a visible side effect (a print)."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(2))

    @torch.jit.export
    def __getstate__(self) -> tuple[torch.Tensor, bool]:
        return (self.weight, self.training)

    @torch.jit.export
    def __setstate__(self, state: tuple[torch.Tensor, bool]) -> None:
        print("__setstate__ ran")
        self.weight = state[0]
        self.training = state[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.weight


def test_torchscript_archive_is_refused_before_torch_load(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "model.pth"
    torch.jit.save(torch.jit.script(_Stateful()), str(path))
    torch.load(path, weights_only=False)  # why: torch.load hands it to torch.jit.load
    assert "__setstate__ ran" in capfd.readouterr().out
    with pytest.raises(CheckpointError, match=r"model\.pth: refused, a TorchScript archive"):
        load_checkpoint(path)
    assert "__setstate__ ran" not in capfd.readouterr().out


class _Allocates:
    def __init__(self, factory: object, *args: object) -> None:
        self.factory, self.args = factory, args

    def __reduce__(self) -> tuple[object, tuple[object, ...]]:
        return self.factory, self.args


@pytest.mark.parametrize(
    ("factory", "args", "what"),
    [
        (bytearray, (2**36,), "bytearray of 68719476736 bytes"),
        (bytes, (2**36,), "bytes of 68719476736 bytes"),
        (np._core.multiarray._reconstruct, (np.ndarray, (2**34,), b"d"), "numpy array of 1374"),
    ],
    ids=["bytearray", "bytes", "numpy"],
)
def test_allocations_beyond_the_file_size_are_refused(
    tmp_path: Path, reference: nn.Module, factory: object, args: tuple[object, ...], what: str
) -> None:
    path = tmp_path / "huge.pth"
    state = to_nvlabs(hf_state(reference))
    torch.save({"state_dict": state, "meta": {"note": _Allocates(factory, *args)}}, path)
    assert path.stat().st_size < 2**25
    with pytest.raises(CheckpointError, match=rf"huge\.pth: refused, the pickle asks for a {what}"):
        load_checkpoint(path)


class _Rebuilds:
    """Pickles as ``factory(*args)`` followed by ``__setstate__(state)``, as numpy arrays do."""

    def __init__(self, factory: object, args: tuple[object, ...], state: object) -> None:
        self.factory, self.args, self.state = factory, args, state

    def __reduce__(self) -> tuple[object, tuple[object, ...], object]:
        return self.factory, self.args, self.state


@pytest.mark.parametrize(
    ("note", "what"),
    [
        # numpy's __setstate__ reads past a list of objects shorter than the shape: SIGSEGV.
        (
            _Rebuilds(
                np._core.multiarray._reconstruct,
                (np.ndarray, (0,), b"b"),
                (1, (10,), np.dtype("O"), False, []),
            ),
            r"numpy array of dtype dtype\('O'\)",
        ),
        # A float array whose data is shorter than its shape.
        (
            _Rebuilds(
                np._core.multiarray._reconstruct,
                (np.ndarray, (0,), b"b"),
                (1, (1000,), np.dtype("f8"), False, b"\0" * 8),
            ),
            "numpy array data that is not 8000 bytes",
        ),
        # hex doubles its input, and calls chain: 643 bytes asked for 256 MiB.
        (_Allocates(codecs.encode, b"A" * 64, "hex"), "_codecs.encode with bytes and 'hex'"),
        # A storage class called directly skipped the storage size check: 2 GiB from 191 bytes.
        (_Allocates(torch.UntypedStorage, 2**31 - 1), "torch.storage.UntypedStorage called"),
    ],
    ids=["numpy-objects", "numpy-short-data", "codecs-hex", "untyped-storage"],
)
def test_crafted_reconstructions_are_refused(
    tmp_path: Path, reference: nn.Module, note: object, what: str
) -> None:
    path = tmp_path / "crafted.pth"
    torch.save({"state_dict": to_nvlabs(hf_state(reference)), "meta": {"note": note}}, path)
    with pytest.raises(CheckpointError, match=rf"crafted\.pth: refused, .*{what}"):
        load_checkpoint(path)


def test_allocations_are_bounded_in_all_not_only_one_by_one(
    tmp_path: Path, reference: nn.Module
) -> None:
    """Each within the file's size, together far beyond it: 6000 bytearrays of 60 kB held 360 MB
    from a 162 kB file."""
    path = tmp_path / "many.pth"
    state = to_nvlabs(hf_state(reference))
    size_alone = len(pickle.dumps(state)) + (1 << 20)
    many = [_Allocates(bytearray, size_alone // 4) for _ in range(20)]
    torch.save({"state_dict": state, "meta": {"notes": many}}, path)
    assert path.stat().st_size < 2 * size_alone
    with pytest.raises(CheckpointError, match=r"many\.pth: refused, .* after allocations"):
        load_checkpoint(path)


def test_numpy_arrays_in_metadata_are_rebuilt(tmp_path: Path, reference: nn.Module) -> None:
    """As mmengine's history buffers hold them; sized within the file, so allowed."""
    path = tmp_path / "numpy.pth"
    history = np.array([0.5, 0.25, 0.125])
    state = to_nvlabs(hf_state(reference))
    torch.save({"state_dict": state, "meta": {"history": history, "empty": b""}}, path)
    _, meta = read_checkpoint(path)
    np.testing.assert_array_equal(meta["history"], history)
    assert meta["empty"] == b""


def test_zip_bomb_is_refused(tmp_path: Path, reference: nn.Module) -> None:
    """A checkpoint whose pickle is stored deflated: 64 MiB from a file of ~64 KiB."""
    genuine = tmp_path / "genuine.pth"
    torch.save({"state_dict": to_nvlabs(hf_state(reference))}, genuine)
    bomb = tmp_path / "bomb.pth"
    with zipfile.ZipFile(genuine) as source, zipfile.ZipFile(bomb, "w") as target:
        for entry in source.infolist():
            data = source.read(entry)
            if entry.filename.endswith("data.pkl"):
                data += b"\0" * (64 << 20)
            target.writestr(entry.filename, data, compress_type=zipfile.ZIP_DEFLATED)
    assert bomb.stat().st_size < genuine.stat().st_size
    with pytest.raises(CheckpointError, match=r"bomb\.pth: refused, zip entry .*data\.pkl is comp"):
        load_checkpoint(bomb)


def test_storage_larger_than_the_file_is_refused(tmp_path: Path) -> None:
    """A legacy-format file whose storage claims 2**36 floats: refused before torch allocates."""
    buffer = io.BytesIO()
    checkpoint = {"state_dict": {"w": torch.zeros(12345)}}
    torch.save(checkpoint, buffer, _use_new_zipfile_serialization=False)
    data = buffer.getvalue()
    numel = b"M" + struct.pack("<H", 12345)  # BININT2: first the storage's size, then the shape
    start = data.index(numel)
    path = tmp_path / "claims.pth"
    path.write_bytes(data[:start] + b"\x8a\x05" + (2**36).to_bytes(5, "little") + data[start + 3 :])
    with pytest.raises(
        CheckpointError, match=r"claims\.pth: refused, .* tensor storage of 274877906944 bytes"
    ):
        load_checkpoint(path)


def test_a_sharded_huggingface_save_is_named_as_such(tmp_path: Path, reference: nn.Module) -> None:
    """transformers' own sharded save (an index and its shards): the error says what it is and
    how to save one file, instead of 'holds none of model.safetensors, pytorch_model.bin'."""
    sharded = tmp_path / "sharded"
    reference.save_pretrained(sharded, max_shard_size="1MB")
    assert (sharded / "model.safetensors.index.json").is_file()
    with pytest.raises(CheckpointError, match=r"a sharded save \(model\.safetensors\.index\.json"):
        load_checkpoint(sharded)


def test_named_classes_replace_metadata_that_disagrees_with_the_classifier(
    tmp_path: Path, reference: nn.Module
) -> None:
    """A 19-class head whose checkpoint metadata lists ADE20K's 150 names (a fine-tune that kept
    its parent's meta): loading it alone is an error, and --dataset names its classes, as
    docs/export.md says (it was the same error before the override applied)."""
    path = tmp_path / "mislabelled.pth"
    state = to_nvlabs(hf_state(reference))
    torch.save({"state_dict": state, "meta": {"CLASSES": list(ADE20K_CLASSES)}}, path)
    with pytest.raises(CheckpointError, match="19 outputs but the metadata lists 150 class names"):
        load_checkpoint(path)
    out = tmp_path / "bundle"
    export_bundle("segformer-b0", out, checkpoint=path, dataset="cityscapes", skip_verify=True)
    assert load_bundle(out).metadata.classes == get_dataset("cityscapes").classes
