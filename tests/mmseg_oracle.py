"""mmsegmentation 1.2.2 itself, as the oracle for tests/integration/test_mmseg_real.py.

Run with ``.venv-mmseg/bin/python tests/mmseg_oracle.py OUT PHOTOS`` (mmseg's pins clash with
ours, so it lives in its own environment). For each case it builds a random-init model from
mmseg's own config through ``MODELS.build``, saves it with mmengine's checkpoint code the way
``Runner.save_checkpoint`` does (``meta`` with ``cfg`` text and ``dataset_meta``, ``state_dict``,
``message_hub``, ``optimizer``, ``param_schedulers``) and once more without training state, then
runs mmseg's own inference on the photographs in PHOTOS (RGB uint8 ``.npy``): the decode head's
raw logits, and label maps from whole and slide inference and from ``SegTTAModel``
(multi-scale + flip). Everything lands in OUT/<model name>/ as ``.pth`` and ``.npy`` files.

The module level imports nothing from mmseg so the test can read ``CASES``.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SEED = 20261204


@dataclass(frozen=True)
class Case:
    model_name: str  # our registry name
    config: str  # under mmseg's packaged configs
    # Smaller than published, within what mmseg's config allows: SETR on ViT-B (our registered
    # setr-pup-base layout) at a 128 px training grid instead of ViT-L at 512.
    model_overrides: dict[str, Any]
    photo_size: tuple[int, int]  # (height, width) the photographs are resized to
    crop: tuple[int, int]
    stride: tuple[int, int]
    tta_scales: tuple[float, ...]
    photos: tuple[str, ...] = ("chelsea", "astronaut", "coffee")
    # (height, width) of the first photo resized thin, for whole inference at the graph's minimum
    # side (mmseg runs SegFormer from 29 px unpadded, SETR at any size: its patch embedding pads
    # to a whole patch inside the model).
    thin_sizes: tuple[tuple[int, int], ...] = ()


_VIT_B = {"embed_dims": 768, "num_layers": 12, "num_heads": 12, "out_indices": (4, 7, 9, 11)}
CASES = (
    Case(
        model_name="segformer-b0",
        config="segformer/segformer_mit-b0_8xb2-160k_ade20k-512x512.py",
        model_overrides={},
        photo_size=(192, 288),
        crop=(128, 128),
        stride=(85, 85),
        tta_scales=(0.75, 1.0, 1.25),
        thin_sizes=((29, 61), (30, 200), (97, 31)),
    ),
    Case(
        model_name="setr-pup-base",
        config="setr/setr_vit-l_pup_8xb2-160k_ade20k-512x512.py",
        model_overrides={
            "backbone": {**_VIT_B, "img_size": (128, 128)},
            "decode_head": {"in_channels": 768},
            "auxiliary_head": [{"in_channels": 768}] * 3,
        },
        photo_size=(160, 224),
        crop=(128, 128),
        stride=(85, 85),
        tta_scales=(0.75, 1.0),
        thin_sizes=((10, 90), (90, 13), (15, 31)),
    ),
)


# Published configs whose state-dict layout (keys, shapes, config text) the oracle writes to
# OUT/layouts/, for the loader to fit exactly; value: the registry name they must load as.
LAYOUT_CONFIGS = {
    f"segformer/segformer_mit-b{i}_8xb2-160k_ade20k-512x512.py": f"segformer-b{i}"
    for i in range(1, 6)
} | {
    "setr/setr_vit-l_naive_8xb2-160k_ade20k-512x512.py": "setr-naive",
    "setr/setr_vit-l_pup_8xb2-160k_ade20k-512x512.py": "setr-pup",
    "setr/setr_vit-l_mla_8xb2-160k_ade20k-512x512.py": "setr-mla",
}


# mmseg VisionTransformer options the published SETR configs leave at their defaults, all turned
# the other way (and a non-default LayerNorm eps and interpolation), on a ViT-B SETR-Naive.
OPTIONS_MODEL = "setr-naive-base"
OPTIONS_OVERRIDES: dict[str, Any] = {
    "backbone": {
        **_VIT_B,
        "img_size": (64, 64),
        "patch_bias": True,
        "patch_norm": True,
        "pre_norm": True,
        "final_norm": True,
        "qkv_bias": False,
        "interpolate_mode": "bicubic",
        "norm_cfg": {"type": "LN", "eps": 1e-5, "requires_grad": True},
    },
    "decode_head": {"in_channels": 768},
    "auxiliary_head": [{"in_channels": 768}] * 3,
}
OPTIONS_PHOTO = "chelsea_setr-pup-base"


def _stub_compiled_ops() -> None:
    """mmcv-lite has no compiled ``mmcv.ops``; mmseg imports names from it at import time (for
    heads SegFormer and SETR do not use). Any use of one raises."""
    import types

    ops = types.ModuleType("mmcv.ops")

    def missing(name: str) -> type:
        if name.startswith("__"):
            raise AttributeError(name)

        class Missing:
            def __init__(self, *args: object, **kwargs: object) -> None:
                raise RuntimeError(f"mmcv.ops.{name} needs the compiled mmcv")

        return Missing

    ops.__getattr__ = missing  # type: ignore[method-assign]
    sys.modules["mmcv.ops"] = ops


def _merge(config: Any, overrides: dict[str, Any]) -> None:
    for key, value in overrides.items():
        if isinstance(value, dict):
            _merge(config[key], value)
        elif isinstance(value, list) and isinstance(config[key], list):
            for item, item_overrides in zip(config[key], value, strict=True):
                _merge(item, item_overrides)
        else:
            config[key] = value


def _randomise_like_training(model: Any, torch: Any) -> None:
    """Random init leaves BatchNorm at identity and the classifier near zero (every pixel a
    near tie); training would not. Give both values a trained model could have."""
    generator = torch.Generator().manual_seed(SEED)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                size = module.num_features
                module.running_mean.copy_(torch.rand(size, generator=generator) - 0.5)
                module.running_var.copy_(torch.rand(size, generator=generator) * 1.5 + 0.5)
                module.weight.copy_(torch.rand(size, generator=generator) + 0.5)
                module.bias.copy_(torch.rand(size, generator=generator) - 0.5)
        conv_seg = model.decode_head.conv_seg
        fan_in = conv_seg.weight[0].numel()
        conv_seg.weight.copy_(torch.randn(conv_seg.weight.shape, generator=generator) / fan_in**0.5)


def _training_state(model: Any, cfg: Any) -> dict[str, Any]:
    """What ``Runner.save_checkpoint`` adds: a message hub with history buffers (numpy arrays
    inside), the optimizer's state after a step, the parameter schedulers' state."""
    import torch
    from mmengine.logging import MessageHub
    from mmengine.optim import build_optim_wrapper
    from mmengine.registry import PARAM_SCHEDULERS

    hub = MessageHub.get_instance("oracle")
    for step, loss in enumerate((1.2, 0.9, 0.7)):
        hub.update_scalar("train/loss", loss)
        hub.update_scalar("train/lr", 6e-5 * (1 - step / 10))
    hub.update_info("iter", 3)
    optim_wrapper = build_optim_wrapper(model, cfg.optim_wrapper)
    # One step on the decode head gives the optimizer real per-parameter state; the backbone's
    # would only make the file bigger.
    for parameter in model.decode_head.parameters():
        parameter.grad = torch.full_like(parameter, 1e-3)
    optim_wrapper.step()
    optim_wrapper.zero_grad()
    schedulers = [
        PARAM_SCHEDULERS.build(dict(scheduler), default_args={"optimizer": optim_wrapper})
        for scheduler in cfg.param_scheduler
    ]
    return {
        "message_hub": hub.state_dict(),
        "optimizer": optim_wrapper.state_dict(),
        "param_schedulers": [scheduler.state_dict() for scheduler in schedulers],
    }


def _run_case(
    case: Case,
    configs: Path,
    photos: dict[str, Any],
    thin: dict[tuple[int, int], Any],
    out: Path,
) -> None:
    import mmengine
    import numpy as np
    import torch
    from mmengine.config import Config, ConfigDict
    from mmengine.dataset import Compose, pseudo_collate
    from mmengine.runner.checkpoint import save_checkpoint, weights_to_cpu
    from mmseg.datasets import ADE20KDataset
    from mmseg.registry import MODELS

    torch.manual_seed(SEED)
    cfg = Config.fromfile(str(configs / case.config))
    _merge(cfg.model, case.model_overrides)
    cfg.model.pretrained = None
    cfg.model.backbone.init_cfg = None
    model = MODELS.build(cfg.model)
    model.init_weights()
    _randomise_like_training(model, torch)

    out.mkdir(parents=True, exist_ok=True)
    meta = {
        "cfg": cfg.pretty_text,
        "seed": SEED,
        "experiment_name": f"oracle-{case.model_name}",
        "mmengine_version": mmengine.__version__,
        "dataset_meta": dict(ADE20KDataset.METAINFO),
        "epoch": 0,
        "iter": 3,
    }
    training_state = _training_state(model, cfg)  # its optimizer step changes the head
    model.eval()
    weights = {"meta": meta, "state_dict": weights_to_cpu(model.state_dict())}
    save_checkpoint(weights, str(out / "weights.pth"))
    save_checkpoint({**weights, **training_state}, str(out / "training.pth"))

    load = {"type": "LoadImageFromNDArray"}
    pack = {"type": "PackSegInputs"}
    single = Compose([load, pack])
    resizes = [{"type": "Resize", "scale_factor": r, "keep_ratio": True} for r in case.tta_scales]
    flips = [{"type": "RandomFlip", "prob": p, "direction": "horizontal"} for p in (0.0, 1.0)]
    tta = Compose([load, {"type": "TestTimeAug", "transforms": [resizes, flips, [pack]]}])
    tta_model = MODELS.build({"type": "SegTTAModel", "module": model})
    for name in case.photos:
        bgr = np.ascontiguousarray(photos[name][:, :, ::-1])  # as LoadImageFromFile reads it
        batch = pseudo_collate([single({"img": bgr})])
        with torch.no_grad():
            pixels = model.data_preprocessor(batch, False)["inputs"]
            logits = model._forward(pixels)
            np.save(out / f"{name}_logits.npy", logits.numpy())
            model.test_cfg = ConfigDict(mode="whole")
            (whole,) = model.test_step(batch)
            model.test_cfg = ConfigDict(mode="slide", crop_size=case.crop, stride=case.stride)
            (slide,) = model.test_step(batch)
            model.test_cfg = ConfigDict(mode="whole")
            (merged,) = tta_model.test_step(pseudo_collate([tta({"img": bgr})]))
        for mode, sample in (("whole", whole), ("slide", slide), ("tta", merged)):
            labels = sample.pred_sem_seg.data[0].numpy().astype(np.uint8)
            np.save(out / f"{name}_{mode}.npy", labels)
    for (height, width), rgb in thin.items():
        bgr = np.ascontiguousarray(rgb[:, :, ::-1])
        with torch.no_grad():
            (whole,) = model.test_step(pseudo_collate([single({"img": bgr})]))
        labels = whole.pred_sem_seg.data[0].numpy().astype(np.uint8)
        np.save(out / f"thin_{height}x{width}_whole.npy", labels)


def _write_options_case(configs: Path, photo: Any, out: Path) -> None:
    """A checkpoint of ``OPTIONS_OVERRIDES`` and mmseg's decode-head logits on ``photo``."""
    import numpy as np
    import torch
    from mmengine.config import Config
    from mmengine.dataset import Compose, pseudo_collate
    from mmengine.runner.checkpoint import save_checkpoint, weights_to_cpu
    from mmseg.registry import MODELS

    torch.manual_seed(SEED)
    cfg = Config.fromfile(str(configs / "setr/setr_vit-l_naive_8xb2-160k_ade20k-512x512.py"))
    _merge(cfg.model, OPTIONS_OVERRIDES)
    cfg.model.pretrained = None
    cfg.model.backbone.init_cfg = None
    model = MODELS.build(cfg.model)
    model.init_weights()
    _randomise_like_training(model, torch)
    model.eval()
    out.mkdir(parents=True, exist_ok=True)
    meta = {"cfg": cfg.pretty_text}
    save_checkpoint(
        {"meta": meta, "state_dict": weights_to_cpu(model.state_dict())}, str(out / "weights.pth")
    )
    pipeline = Compose([{"type": "LoadImageFromNDArray"}, {"type": "PackSegInputs"}])
    batch = pseudo_collate([pipeline({"img": np.ascontiguousarray(photo[:, :, ::-1])})])
    with torch.no_grad():
        logits = model._forward(model.data_preprocessor(batch, False)["inputs"])
    np.save(out / "logits.npy", logits.numpy())


def _write_layouts(configs: Path, out: Path) -> None:
    """Keys and shapes of each published model as mmseg builds it (weights are not needed)."""
    import json

    from mmengine.config import Config
    from mmseg.registry import MODELS

    out.mkdir(parents=True, exist_ok=True)
    for config in LAYOUT_CONFIGS:
        cfg = Config.fromfile(str(configs / config))
        cfg.model.pretrained = None
        cfg.model.backbone.init_cfg = None
        shapes = {
            key: list(value.shape) for key, value in MODELS.build(cfg.model).state_dict().items()
        }
        layout = {"cfg": cfg.pretty_text, "shapes": shapes}
        (out / f"{Path(config).stem}.json").write_text(json.dumps(layout))


def thin_photo_name(case: Case, height: int, width: int) -> str:
    return f"{case.photos[0]}_{case.model_name}_{height}x{width}"


def main(out: Path, photo_dir: Path) -> None:
    import numpy as np

    _stub_compiled_ops()
    import mmseg
    from mmseg.utils import register_all_modules

    register_all_modules()
    configs = Path(mmseg.__file__).parent / ".mim" / "configs"
    photos = {path.stem: np.load(path) for path in photo_dir.glob("*.npy")}
    for case in CASES:
        sized = {name: photos[f"{name}_{case.model_name}"] for name in case.photos}
        thin = {(h, w): photos[thin_photo_name(case, h, w)] for h, w in case.thin_sizes}
        _run_case(case, configs, sized, thin, out / case.model_name)
    _write_layouts(configs, out / "layouts")
    _write_options_case(configs, photos[OPTIONS_PHOTO], out / "options")


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
