"""Class names, standard palettes and default test settings of the datasets SegFormer ships for.

Names and palettes are mmsegmentation 1.x's ``METAINFO`` (``mmseg/datasets/ade.py``,
``cityscapes.py``, ``pascal_context.py`` (``PascalContextDataset59``), ``coco_stuff.py``), kept
verbatim, including ADE20K's ``'bed '`` with its trailing space, so masks and legends match what
mmsegmentation renders. ``test_config`` uses the keys of ``service.bundle.TestConfig`` and holds
mmsegmentation 1.x's published test settings: the SegFormer configs for ADE20K and Cityscapes
(``configs/segformer/segformer_mit-b0_8xb2-160k_ade20k-512x512.py``,
``..._8xb1-160k_cityscapes-1024x1024.py``); mmsegmentation publishes no SegFormer config for
Pascal Context or COCO-Stuff, so those take the dataset's own test pipeline
(``configs/_base_/datasets/pascal_context_59.py``, ``coco-stuff164k.py``) and the sliding window
every mmsegmentation Pascal-Context-59 model uses (crop 480, stride 320). Whole-mode datasets
still carry a window: their training crop with mmseg's two-thirds stride (ADE20K and COCO-Stuff
512, stride 341), used when a request asks for slide mode without a crop.
"""

from __future__ import annotations

import colorsys
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

RGB = tuple[int, int, int]

# ImageNet statistics on 0-255 RGB, as in every SegFormer config's data preprocessor.
IMAGENET_MEAN: tuple[float, float, float] = (123.675, 116.28, 103.53)
IMAGENET_STD: tuple[float, float, float] = (58.395, 57.12, 57.375)


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    classes: tuple[str, ...]
    palette: tuple[RGB, ...]
    test_config: dict[str, Any]


# Data tables laid out like the mmsegmentation source, several entries per line.
# fmt: off

ADE20K_CLASSES = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed ", "windowpane",
    "grass", "cabinet", "sidewalk", "person", "earth", "door", "table", "mountain", "plant",
    "curtain", "chair", "car", "water", "painting", "sofa", "shelf", "house", "sea", "mirror",
    "rug", "field", "armchair", "seat", "fence", "desk", "rock", "wardrobe", "lamp", "bathtub",
    "railing", "cushion", "base", "box", "column", "signboard", "chest of drawers", "counter",
    "sand", "sink", "skyscraper", "fireplace", "refrigerator", "grandstand", "path", "stairs",
    "runway", "case", "pool table", "pillow", "screen door", "stairway", "river", "bridge",
    "bookcase", "blind", "coffee table", "toilet", "flower", "book", "hill", "bench",
    "countertop", "stove", "palm", "kitchen island", "computer", "swivel chair", "boat", "bar",
    "arcade machine", "hovel", "bus", "towel", "light", "truck", "tower", "chandelier",
    "awning", "streetlight", "booth", "television receiver", "airplane", "dirt track",
    "apparel", "pole", "land", "bannister", "escalator", "ottoman", "bottle", "buffet",
    "poster", "stage", "van", "ship", "fountain", "conveyer belt", "canopy", "washer",
    "plaything", "swimming pool", "stool", "barrel", "basket", "waterfall", "tent", "bag",
    "minibike", "cradle", "oven", "ball", "food", "step", "tank", "trade name", "microwave",
    "pot", "animal", "bicycle", "lake", "dishwasher", "screen", "blanket", "sculpture", "hood",
    "sconce", "vase", "traffic light", "tray", "ashcan", "fan", "pier", "crt screen", "plate",
    "monitor", "bulletin board", "shower", "radiator", "glass", "clock", "flag",
)
ADE20K_PALETTE = (
    (120, 120, 120), (180, 120, 120), (6, 230, 230), (80, 50, 50), (4, 200, 3),
    (120, 120, 80), (140, 140, 140), (204, 5, 255), (230, 230, 230), (4, 250, 7),
    (224, 5, 255), (235, 255, 7), (150, 5, 61), (120, 120, 70), (8, 255, 51), (255, 6, 82),
    (143, 255, 140), (204, 255, 4), (255, 51, 7), (204, 70, 3), (0, 102, 200),
    (61, 230, 250), (255, 6, 51), (11, 102, 255), (255, 7, 71), (255, 9, 224), (9, 7, 230),
    (220, 220, 220), (255, 9, 92), (112, 9, 255), (8, 255, 214), (7, 255, 224),
    (255, 184, 6), (10, 255, 71), (255, 41, 10), (7, 255, 255), (224, 255, 8), (102, 8, 255),
    (255, 61, 6), (255, 194, 7), (255, 122, 8), (0, 255, 20), (255, 8, 41), (255, 5, 153),
    (6, 51, 255), (235, 12, 255), (160, 150, 20), (0, 163, 255), (140, 140, 140),
    (250, 10, 15), (20, 255, 0), (31, 255, 0), (255, 31, 0), (255, 224, 0), (153, 255, 0),
    (0, 0, 255), (255, 71, 0), (0, 235, 255), (0, 173, 255), (31, 0, 255), (11, 200, 200),
    (255, 82, 0), (0, 255, 245), (0, 61, 255), (0, 255, 112), (0, 255, 133), (255, 0, 0),
    (255, 163, 0), (255, 102, 0), (194, 255, 0), (0, 143, 255), (51, 255, 0), (0, 82, 255),
    (0, 255, 41), (0, 255, 173), (10, 0, 255), (173, 255, 0), (0, 255, 153), (255, 92, 0),
    (255, 0, 255), (255, 0, 245), (255, 0, 102), (255, 173, 0), (255, 0, 20),
    (255, 184, 184), (0, 31, 255), (0, 255, 61), (0, 71, 255), (255, 0, 204), (0, 255, 194),
    (0, 255, 82), (0, 10, 255), (0, 112, 255), (51, 0, 255), (0, 194, 255), (0, 122, 255),
    (0, 255, 163), (255, 153, 0), (0, 255, 10), (255, 112, 0), (143, 255, 0), (82, 0, 255),
    (163, 255, 0), (255, 235, 0), (8, 184, 170), (133, 0, 255), (0, 255, 92), (184, 0, 255),
    (255, 0, 31), (0, 184, 255), (0, 214, 255), (255, 0, 112), (92, 255, 0), (0, 224, 255),
    (112, 224, 255), (70, 184, 160), (163, 0, 255), (153, 0, 255), (71, 255, 0),
    (255, 0, 163), (255, 204, 0), (255, 0, 143), (0, 255, 235), (133, 255, 0),
    (255, 0, 235), (245, 0, 255), (255, 0, 122), (255, 245, 0), (10, 190, 212),
    (214, 255, 0), (0, 204, 255), (20, 0, 255), (255, 255, 0), (0, 153, 255), (0, 41, 255),
    (0, 255, 204), (41, 0, 255), (41, 255, 0), (173, 0, 255), (0, 245, 255), (71, 0, 255),
    (122, 0, 255), (0, 255, 184), (0, 92, 255), (184, 255, 0), (0, 133, 255), (255, 214, 0),
    (25, 194, 194), (102, 255, 0), (92, 0, 255),
)

CITYSCAPES_CLASSES = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign",
    "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "train",
    "motorcycle", "bicycle",
)
CITYSCAPES_PALETTE = (
    (128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153),
    (153, 153, 153), (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152),
    (70, 130, 180), (220, 20, 60), (255, 0, 0), (0, 0, 142), (0, 0, 70), (0, 60, 100),
    (0, 80, 100), (0, 0, 230), (119, 11, 32),
)

PASCAL_CONTEXT_59_CLASSES = (
    "aeroplane", "bag", "bed", "bedclothes", "bench", "bicycle", "bird", "boat", "book",
    "bottle", "building", "bus", "cabinet", "car", "cat", "ceiling", "chair", "cloth",
    "computer", "cow", "cup", "curtain", "dog", "door", "fence", "floor", "flower", "food",
    "grass", "ground", "horse", "keyboard", "light", "motorbike", "mountain", "mouse",
    "person", "plate", "platform", "pottedplant", "road", "rock", "sheep", "shelves",
    "sidewalk", "sign", "sky", "snow", "sofa", "table", "track", "train", "tree", "truck",
    "tvmonitor", "wall", "water", "window", "wood",
)
# mmsegmentation gives Pascal Context 59 the first ADE20K colours after the background's.
PASCAL_CONTEXT_59_PALETTE = ADE20K_PALETTE[1:60]

COCO_STUFF_CLASSES = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat",
    "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack",
    "umbrella", "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball",
    "kite", "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket",
    "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair",
    "couch", "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse",
    "remote", "keyboard", "cell phone", "microwave", "oven", "toaster", "sink",
    "refrigerator", "book", "clock", "vase", "scissors", "teddy bear", "hair drier",
    "toothbrush", "banner", "blanket", "branch", "bridge", "building-other", "bush",
    "cabinet", "cage", "cardboard", "carpet", "ceiling-other", "ceiling-tile", "cloth",
    "clothes", "clouds", "counter", "cupboard", "curtain", "desk-stuff", "dirt", "door-stuff",
    "fence", "floor-marble", "floor-other", "floor-stone", "floor-tile", "floor-wood",
    "flower", "fog", "food-other", "fruit", "furniture-other", "grass", "gravel",
    "ground-other", "hill", "house", "leaves", "light", "mat", "metal", "mirror-stuff", "moss",
    "mountain", "mud", "napkin", "net", "paper", "pavement", "pillow", "plant-other",
    "plastic", "platform", "playingfield", "railing", "railroad", "river", "road", "rock",
    "roof", "rug", "salad", "sand", "sea", "shelf", "sky-other", "skyscraper", "snow",
    "solid-other", "stairs", "stone", "straw", "structural-other", "table", "tent",
    "textile-other", "towel", "tree", "vegetable", "wall-brick", "wall-concrete",
    "wall-other", "wall-panel", "wall-stone", "wall-tile", "wall-wood", "water-other",
    "waterdrops", "window-blind", "window-other", "wood",
)
COCO_STUFF_PALETTE = (
    (0, 192, 64), (0, 192, 64), (0, 64, 96), (128, 192, 192), (0, 64, 64), (0, 192, 224),
    (0, 192, 192), (128, 192, 64), (0, 192, 96), (128, 192, 64), (128, 32, 192), (0, 0, 224),
    (0, 0, 64), (0, 160, 192), (128, 0, 96), (128, 0, 192), (0, 32, 192), (128, 128, 224),
    (0, 0, 192), (128, 160, 192), (128, 128, 0), (128, 0, 32), (128, 32, 0), (128, 0, 128),
    (64, 128, 32), (0, 160, 0), (0, 0, 0), (192, 128, 160), (0, 32, 0), (0, 128, 128),
    (64, 128, 160), (128, 160, 0), (0, 128, 0), (192, 128, 32), (128, 96, 128), (0, 0, 128),
    (64, 0, 32), (0, 224, 128), (128, 0, 0), (192, 0, 160), (0, 96, 128), (128, 128, 128),
    (64, 0, 160), (128, 224, 128), (128, 128, 64), (192, 0, 32), (128, 96, 0), (128, 0, 192),
    (0, 128, 32), (64, 224, 0), (0, 0, 64), (128, 128, 160), (64, 96, 0), (0, 128, 192),
    (0, 128, 160), (192, 224, 0), (0, 128, 64), (128, 128, 32), (192, 32, 128), (0, 64, 192),
    (0, 0, 32), (64, 160, 128), (128, 64, 64), (128, 0, 160), (64, 32, 128), (128, 192, 192),
    (0, 0, 160), (192, 160, 128), (128, 192, 0), (128, 0, 96), (192, 32, 0), (128, 64, 128),
    (64, 128, 96), (64, 160, 0), (0, 64, 0), (192, 128, 224), (64, 32, 0), (0, 192, 128),
    (64, 128, 224), (192, 160, 0), (0, 192, 0), (192, 128, 96), (192, 96, 128), (0, 64, 128),
    (64, 0, 96), (64, 224, 128), (128, 64, 0), (192, 0, 224), (64, 96, 128), (128, 192, 128),
    (64, 0, 224), (192, 224, 128), (128, 192, 64), (192, 0, 96), (192, 96, 0), (128, 64, 192),
    (0, 128, 96), (0, 224, 0), (64, 64, 64), (128, 128, 224), (0, 96, 0), (64, 192, 192),
    (0, 128, 224), (128, 224, 0), (64, 192, 64), (128, 128, 96), (128, 32, 128), (64, 0, 192),
    (0, 64, 96), (0, 160, 128), (192, 0, 64), (128, 64, 224), (0, 32, 128), (192, 128, 192),
    (0, 64, 224), (128, 160, 128), (192, 128, 0), (128, 64, 32), (128, 32, 64), (192, 0, 128),
    (64, 192, 32), (0, 160, 64), (64, 0, 0), (192, 192, 160), (0, 32, 64), (64, 128, 128),
    (64, 192, 160), (128, 160, 64), (64, 128, 0), (192, 192, 32), (128, 96, 192),
    (64, 0, 128), (64, 64, 32), (0, 224, 192), (192, 0, 0), (192, 64, 160), (0, 96, 192),
    (192, 128, 128), (64, 64, 160), (128, 224, 192), (192, 128, 64), (192, 64, 32),
    (128, 96, 64), (192, 0, 192), (0, 192, 32), (64, 224, 64), (64, 0, 64), (128, 192, 160),
    (64, 96, 64), (64, 128, 192), (0, 192, 160), (192, 224, 64), (64, 128, 64),
    (128, 192, 32), (192, 32, 192), (64, 64, 192), (0, 64, 32), (64, 160, 192),
    (192, 64, 64), (128, 64, 160), (64, 32, 192), (192, 192, 192), (0, 64, 160),
    (192, 160, 192), (192, 192, 0), (128, 64, 96), (192, 32, 64), (192, 64, 128),
    (64, 192, 96), (64, 160, 64), (64, 64, 0),
)
# fmt: on

DATASETS: dict[str, DatasetInfo] = {
    "ade20k": DatasetInfo(
        "ade20k",
        ADE20K_CLASSES,
        ADE20K_PALETTE,
        {"mode": "whole", "resize_scale": (2048, 512), "crop": (512, 512), "stride": (341, 341)},
    ),
    "cityscapes": DatasetInfo(
        "cityscapes",
        CITYSCAPES_CLASSES,
        CITYSCAPES_PALETTE,
        {"mode": "slide", "resize_scale": (2048, 1024), "crop": (1024, 1024), "stride": (768, 768)},
    ),
    "pascal-context": DatasetInfo(
        "pascal-context",
        PASCAL_CONTEXT_59_CLASSES,
        PASCAL_CONTEXT_59_PALETTE,
        {"mode": "slide", "resize_scale": (520, 520), "crop": (480, 480), "stride": (320, 320)},
    ),
    "coco-stuff": DatasetInfo(
        "coco-stuff",
        COCO_STUFF_CLASSES,
        COCO_STUFF_PALETTE,
        {"mode": "whole", "resize_scale": (2048, 512), "crop": (512, 512), "stride": (341, 341)},
    ),
}


def get_dataset(name: str) -> DatasetInfo:
    """Look a dataset up by name (case and ``_``/``-`` insensitive)."""
    key = name.strip().lower().replace("_", "-")
    if key not in DATASETS:
        raise KeyError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}")
    return DATASETS[key]


def default_palette(num_classes: int) -> tuple[RGB, ...]:
    """``num_classes`` distinct colours, the same on every call.

    Hues advance by the golden ratio so neighbouring class ids differ strongly; saturation and
    value cycle so that long palettes stay distinguishable; repeats after rounding are skipped.
    """
    if num_classes < 0:
        raise ValueError(f"num_classes must be >= 0, got {num_classes}")
    colours: list[RGB] = []
    seen: set[RGB] = set()
    step = 0
    while len(colours) < num_classes:
        hue = (step * 0.618033988749895) % 1.0
        saturation = (0.95, 0.65, 0.8)[step % 3]
        value = (0.95, 0.75, 0.55, 0.85)[(step // 3) % 4]
        red, green, blue = colorsys.hsv_to_rgb(hue, saturation, value)
        colour = (round(red * 255), round(green * 255), round(blue * 255))
        step += 1
        if colour not in seen:
            seen.add(colour)
            colours.append(colour)
    return tuple(colours)


_HEX_COLOUR = re.compile(r"^#([0-9a-fA-F]{6})$")


def _parse_class_line(line: str, where: str) -> tuple[str, RGB | None]:
    tokens = line.split()
    hex_match = _HEX_COLOUR.match(tokens[-1])
    if hex_match and len(tokens) > 1:
        value = int(hex_match.group(1), 16)
        return " ".join(tokens[:-1]), (value >> 16, (value >> 8) & 255, value & 255)
    if len(tokens) > 3 and all(re.fullmatch(r"\d+", t) for t in tokens[-3:]):
        red, green, blue = (int(t) for t in tokens[-3:])
        if max(red, green, blue) > 255:
            raise ValueError(f"{where}: colour components must be 0-255, got {tokens[-3:]}")
        return " ".join(tokens[:-3]), (red, green, blue)
    return " ".join(tokens), None


def load_class_file(path: str | Path) -> tuple[tuple[str, ...], tuple[RGB, ...] | None]:
    """Read a custom class list: one class per line, optionally ``name r g b`` or ``name #rrggbb``.

    Blank lines and lines starting with ``#`` are skipped. Colours must be given for every class
    or for none; the palette is ``None`` when none are given.
    """
    path = Path(path)
    names: list[str] = []
    colours: list[RGB | None] = []
    for number, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        name, colour = _parse_class_line(line, f"{path}:{number}")
        names.append(name)
        colours.append(colour)
    if not names:
        raise ValueError(f"{path}: no class names")
    if len(set(names)) != len(names):
        duplicates = sorted({n for n in names if names.count(n) > 1})
        raise ValueError(f"{path}: duplicate class names: {', '.join(duplicates)}")
    given = [c for c in colours if c is not None]
    if not given:
        return tuple(names), None
    if len(given) != len(names):
        raise ValueError(f"{path}: colours given for {len(given)} of {len(names)} classes")
    return tuple(names), tuple(given)
