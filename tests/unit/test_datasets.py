"""Dataset metadata: published names and colours, test settings the service accepts, class files."""

from __future__ import annotations

from pathlib import Path

import pytest

from models.datasets import (
    DATASETS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    default_palette,
    get_dataset,
    load_class_file,
)
from service.bundle import TestConfig


@pytest.mark.parametrize(
    ("name", "count"),
    [("ade20k", 150), ("cityscapes", 19), ("pascal-context", 59), ("coco-stuff", 171)],
)
def test_sizes_and_test_configs_are_valid(name: str, count: int) -> None:
    info = get_dataset(name)
    assert info.name == name
    assert len(info.classes) == len(set(info.classes)) == count
    assert len(info.palette) == count
    assert all(len(c) == 3 and all(0 <= v <= 255 for v in c) for c in info.palette)
    config = TestConfig(**info.test_config)
    assert config.keep_ratio


def test_cityscapes_matches_the_official_label_definitions() -> None:
    # cityscapesScripts helpers/labels.py: the 19 train ids in order, with their colours.
    city = get_dataset("cityscapes")
    official = {
        "road": (128, 64, 128),
        "sidewalk": (244, 35, 232),
        "traffic light": (250, 170, 30),
        "vegetation": (107, 142, 35),
        "sky": (70, 130, 180),
        "person": (220, 20, 60),
        "car": (0, 0, 142),
        "bicycle": (119, 11, 32),
    }
    for name, colour in official.items():
        assert city.palette[city.classes.index(name)] == colour
    assert city.classes.index("road") == 0 and city.classes.index("bicycle") == 18


def test_ade20k_order_matches_scene_parsing_ids() -> None:
    # ADE20K SceneParsing objectInfo150: ids 1..150 (0 = other, dropped by reduce_zero_label).
    ade = get_dataset("ade20k")
    assert ade.classes[:5] == ("wall", "building", "sky", "floor", "tree")
    assert ade.classes[12] == "person" and ade.classes[20] == "car"
    assert ade.classes[-1] == "flag"
    assert ade.palette[0] == (120, 120, 120) and ade.palette[-1] == (92, 0, 255)


def test_pascal_context_and_coco_stuff_spot_checks() -> None:
    context = get_dataset("pascal-context")
    assert context.classes[0] == "aeroplane" and context.classes[-1] == "wood"
    assert "background" not in context.classes
    assert context.palette[0] == (180, 120, 120) and context.palette[-1] == (31, 0, 255)
    assert context.test_config == {
        "mode": "slide",
        "resize_scale": (520, 520),
        "crop": (480, 480),
        "stride": (320, 320),
    }
    coco = get_dataset("coco-stuff")
    # 80 COCO thing classes first, then 91 stuff classes.
    assert coco.classes[0] == "person" and coco.classes[79] == "toothbrush"
    assert coco.classes[80] == "banner" and coco.classes[-1] == "wood"
    assert coco.test_config["mode"] == "whole" and coco.test_config["resize_scale"] == (2048, 512)
    assert coco.test_config["crop"] == (512, 512) and coco.test_config["stride"] == (341, 341)


def test_segformer_test_settings() -> None:
    assert DATASETS["ade20k"].test_config == {
        "mode": "whole",
        "resize_scale": (2048, 512),
        "crop": (512, 512),  # the training crop: slide mode's default window
        "stride": (341, 341),
    }
    assert DATASETS["cityscapes"].test_config == {
        "mode": "slide",
        "resize_scale": (2048, 1024),
        "crop": (1024, 1024),
        "stride": (768, 768),
    }


def test_normalisation_constants() -> None:
    assert IMAGENET_MEAN == (123.675, 116.28, 103.53)
    assert IMAGENET_STD == (58.395, 57.12, 57.375)
    # The usual 0-1 ImageNet statistics, times 255.
    assert [round(m / 255, 3) for m in IMAGENET_MEAN] == [0.485, 0.456, 0.406]
    assert [round(s / 255, 3) for s in IMAGENET_STD] == [0.229, 0.224, 0.225]


def test_get_dataset_names() -> None:
    assert get_dataset("COCO_Stuff") is DATASETS["coco-stuff"]
    with pytest.raises(KeyError, match="unknown dataset 'voc'; known: ade20k, cityscapes"):
        get_dataset("voc")


def test_default_palette_is_deterministic_and_distinct() -> None:
    palette = default_palette(1000)
    assert len(palette) == len(set(palette)) == 1000
    assert palette == default_palette(1000)
    assert default_palette(10) == palette[:10]
    assert all(0 <= v <= 255 for colour in palette for v in colour)
    # Neighbouring ids must be told apart at a glance.
    assert (
        min(
            sum(abs(a - b) for a, b in zip(palette[i], palette[i + 1], strict=True))
            for i in range(99)
        )
        > 60
    )
    assert default_palette(0) == ()


def test_class_file_with_names_only(tmp_path: Path) -> None:
    path = tmp_path / "classes.txt"
    path.write_text("# my classes\nbackground\n\ntraffic light\n  road  \n")
    assert load_class_file(path) == (("background", "traffic light", "road"), None)


def test_class_file_with_colours(tmp_path: Path) -> None:
    path = tmp_path / "classes.txt"
    path.write_text("background 0 0 0\ntraffic light #FAAA1E\nroad 128 64 128\n")
    names, palette = load_class_file(path)
    assert names == ("background", "traffic light", "road")
    assert palette == ((0, 0, 0), (250, 170, 30), (128, 64, 128))


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("a 1 2 3\nb\n", "colours given for 1 of 2 classes"),
        ("a 1 2 300\n", "0-255"),
        ("a\nb\na\n", "duplicate class names: a"),
        ("\n# nothing\n", "no class names"),
    ],
)
def test_bad_class_files(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "bad.txt"
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        load_class_file(path)
