"""Typed request and response bodies of the HTTP API."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from service.encodings import MAX_POLYGON_TOLERANCE


class ErrorBody(BaseModel):
    error: str = Field(description="machine-readable code, e.g. payload_too_large")
    message: str


class ProtocolError(BaseModel):
    """The Open Inference Protocol's error body (``/v2``): the message alone."""

    error: str


class ClassInfo(BaseModel):
    id: int
    name: str
    pixels: int
    fraction: float = Field(description="share of the image's pixels, 0..1")
    color: tuple[int, int, int]


class MaskUrls(BaseModel):
    png: str
    labels: str
    overlay: str
    rle: str
    polygons: str


class SegmentResponse(BaseModel):
    mask_id: str
    model: str
    trained: bool = Field(description="false for random-init bundles: the mask means nothing")
    width: int
    height: int
    num_inputs: int = Field(description="model inputs run: windows x scales x flips")
    classes: list[ClassInfo]
    timings: dict[str, float] = Field(description="seconds per stage, plus total")
    urls: MaskUrls


class SegmentQuery(BaseModel):
    """Query parameters of ``POST /segment``; omitted ones take the model's test configuration."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(None, description="bundle name; the default model when omitted")
    mode: Literal["whole", "slide"] | None = None
    scales: str | None = Field(None, description="comma list of resize ratios, e.g. 0.75,1,1.25")
    flip: bool = False
    crop: str | None = Field(None, description="window size: 512 or HxW (slide mode)")
    stride: str | None = Field(None, description="window step: 341 or HxW (slide mode)")
    output: Literal["json", "png", "labels", "overlay", "rle", "polygons", "probabilities"] = "json"
    tolerance: float = Field(
        0.0,
        ge=0,
        le=MAX_POLYGON_TOLERANCE,
        description="polygons: Douglas-Peucker tolerance in pixels (0: exact pixel edges)",
    )


class ModelInfo(BaseModel):
    name: str
    default: bool
    arch: str
    variant: str
    dataset: str | None
    trained: bool
    provider: str
    postprocess: str = Field(description="host or device: where resize / merge / argmax run")
    aligned_side: int = Field(
        description="on the CPU, inputs whose sides are multiples of this run in the graph's "
        "aligned twin, its upsamplings at constant scales (faster); 0: none"
    )
    precision: str
    num_classes: int
    classes: list[str]
    palette: list[tuple[int, int, int]]
    palette_version: str
    test_config: dict[str, Any]


class ReadyResponse(BaseModel):
    ready: bool
    draining: bool
    models: list[str]
    problems: list[str] = Field(description="why not ready; empty when ready")
    store: str = Field(
        description="the mask store: ok, or unavailable and why (not a problem: "
        "only calls that keep or fetch a mask need it)"
    )
