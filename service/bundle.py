"""The model bundle: the only contract between the build side (models/, export/) and serving.

A bundle is a directory usable both as a Triton model repository entry and by segserve::

    NAME/config.pbtxt      Triton configuration (platform onnxruntime_onnx)
    NAME/1/model.onnx      the graph: pixels in, logits at the model's native stride out
    NAME/segserve.json     BundleMetadata below, versioned and validated on load

``export/`` writes segserve.json from these models; ``service/`` reads it. Nothing here imports
PyTorch.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

SCHEMA_VERSION: Literal[1] = 1
METADATA_FILE = "segserve.json"
MODEL_FILE = "1/model.onnx"
TRITON_CONFIG_FILE = "config.pbtxt"

RGB = tuple[int, int, int]

# The smallest input side each architecture's graph accepts, as mmseg's own model does: SegFormer's
# stage-1 key/value reduction is an 8x8 convolution of the stride-4 features, and the 7x7 patch
# embedding (padding 3) gives ceil(side / 4) of them, so 29 px; SETR needs one 16-px patch.
# Smaller windows are padded up to it by the engine (see docs/api.md). Padding from 29 up to 32
# changed 2-16 % of the labels of 29-31 px inputs against mmseg, which runs them unpadded.
# The smallest side each graph runs, as mmseg's model does: SegFormer's patch embedding and 8x8
# key/value reduction need 29 px; SETR's patch embedding pads any side to a whole 16-px patch
# itself (mmseg's AdaptivePadding, corner), and the head resizes its logits to the input.
MIN_INPUT_SIDE: dict[str, int] = {"segformer": 29, "setr": 1}
# Each architecture's total stride: at input sides that are multiples of it every upsampling in
# the graph has one integer scale, which the CPU's aligned twin makes constant (service/aligned.py).
STRIDE: dict[str, int] = {"segformer": 32, "setr": 16}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class InputContract(_Strict):
    """How pixels enter the graph.

    ``dtype == "uint8"``: raw RGB bytes, NCHW, normalisation happens inside the graph.
    ``dtype == "float32"``: the caller normalises with ``(pixel - mean) / std`` first.
    ``mean``/``std`` are recorded in both cases (0-255 scale, RGB order).
    """

    name: str
    dtype: Literal["uint8", "float32", "float16"]
    layout: Literal["NCHW"] = "NCHW"
    color_order: Literal["RGB"] = "RGB"
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    normalized_in_graph: bool


class OutputContract(_Strict):
    name: str
    dtype: Literal["float32", "float16"]
    stride: int = Field(ge=1, description="input size / logits size (SegFormer 4)")


class TestConfig(_Strict):
    """The dataset's default test configuration as mmsegmentation publishes it.

    ``resize_scale`` follows mmcv's ``imrescale`` with keep-ratio: the image is scaled by
    ``min(max(scale) / long_edge, min(scale) / short_edge)``. ``None`` means no resize.
    ``crop``/``stride`` are (height, width), required for ``slide``; a ``whole`` bundle may carry
    them too (its dataset's training crop), as the window of requests that ask for slide mode
    without one. Older bundles without them are read as before.
    """

    __test__ = False  # not a pytest class

    mode: Literal["whole", "slide"]
    resize_scale: tuple[int, int] | None
    keep_ratio: bool = True
    crop: tuple[int, int] | None = None
    stride: tuple[int, int] | None = None
    tta_ratios: tuple[float, ...] = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)

    @model_validator(mode="after")
    def _slide_needs_windows(self) -> TestConfig:
        if self.mode == "slide" and (self.crop is None or self.stride is None):
            raise ValueError("slide mode needs crop and stride")
        for pair in (self.crop, self.stride, self.resize_scale):
            if pair is not None and min(pair) < 1:
                raise ValueError(f"sizes must be positive, got {pair}")
        return self


class SourceCheckpoint(_Strict):
    name: str
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    format: str


class Quantization(_Strict):
    """How an int8 bundle was made from its fp32 graph, and what that cost in labels."""

    method: str
    calibration_photos: tuple[str, ...] = Field(min_length=1)
    label_agreement: float = Field(ge=0.0, le=1.0, description="share of pixels labelled as fp32")
    agreement_photos: tuple[str, ...] = Field(min_length=1)
    agreement_weights: Literal["trained", "refitted classifier"]


class BundleMetadata(_Strict):
    schema_version: Literal[1] = SCHEMA_VERSION
    arch: Literal["segformer", "setr"]
    variant: str
    trained: bool = Field(description="False for --random-init bundles: masks are meaningless")
    source_checkpoint: SourceCheckpoint | None
    dataset: str | None = None
    classes: tuple[str, ...] = Field(min_length=1)
    palette: tuple[RGB, ...]
    input: InputContract
    output: OutputContract
    test_config: TestConfig
    precision: Literal["fp32", "fp16", "int8"]
    quantization: Quantization | None = None  # int8 bundles only
    opset: int
    attention: Literal["onnx", "ort-contrib"]
    exporter_version: str

    @model_validator(mode="after")
    def _consistent(self) -> BundleMetadata:
        if len(self.palette) != len(self.classes):
            raise ValueError(
                f"palette has {len(self.palette)} colours for {len(self.classes)} classes"
            )
        for colour in self.palette:
            if any(not 0 <= c <= 255 for c in colour):
                raise ValueError(f"palette colour {colour} outside 0..255")
        if self.trained != (self.source_checkpoint is not None):
            raise ValueError("trained bundles name their source checkpoint; untrained ones do not")
        if (self.precision == "int8") != (self.quantization is not None):
            raise ValueError("int8 bundles, and only they, record their quantization")
        return self

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def min_input_side(self) -> int:
        return MIN_INPUT_SIDE[self.arch]

    @property
    def aligned_side(self) -> int:
        """The side multiple at which an aligned twin serves this graph (service/aligned.py); 0
        where it would not pay: int8 and float16 graphs' convolutions do not run in onnxruntime's
        blocked float32 layout, which is all the twin gains."""
        return STRIDE[self.arch] if self.precision == "fp32" else 0


class BundleError(ValueError):
    """A bundle directory that cannot be served; the message names the file and the problem."""


class Bundle(_Strict):
    name: str
    path: Path
    metadata: BundleMetadata

    @property
    def model_path(self) -> Path:
        return self.path / MODEL_FILE


def read_metadata(path: Path) -> BundleMetadata:
    file = path / METADATA_FILE
    try:
        raw = json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise BundleError(f"{file}: missing (not a segserve bundle)") from exc
    except (OSError, json.JSONDecodeError) as exc:
        raise BundleError(f"{file}: unreadable: {exc}") from exc
    if not isinstance(raw, dict) or raw.get("schema_version") != SCHEMA_VERSION:
        version = raw.get("schema_version") if isinstance(raw, dict) else None
        raise BundleError(
            f"{file}: schema_version {version!r}, this segserve reads {SCHEMA_VERSION}"
        )
    try:
        return BundleMetadata.model_validate(raw)
    except ValidationError as exc:
        raise BundleError(f"{file}: invalid: {exc}") from exc


def write_metadata(path: Path, metadata: BundleMetadata) -> None:
    (path / METADATA_FILE).write_text(metadata.model_dump_json(indent=2) + "\n", encoding="utf-8")


def load_bundle(path: Path) -> Bundle:
    path = Path(path)
    metadata = read_metadata(path)
    if not (path / MODEL_FILE).is_file():
        raise BundleError(f"{path / MODEL_FILE}: missing")
    return Bundle(name=path.name, path=path, metadata=metadata)


def discover_bundles(repository: Path) -> list[Path]:
    """Bundle directories in a model repository (those holding segserve.json), sorted by name."""
    repository = Path(repository)
    if not repository.is_dir():
        return []
    return sorted(p for p in repository.iterdir() if (p / METADATA_FILE).is_file())
