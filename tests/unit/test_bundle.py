"""segserve.json schema: valid metadata round-trips, inconsistent metadata is refused by name."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from service.bundle import (
    BundleError,
    BundleMetadata,
    InputContract,
    OutputContract,
    TestConfig,
    load_bundle,
    write_metadata,
)


def _metadata(**overrides: object) -> BundleMetadata:
    fields: dict[str, object] = dict(
        arch="segformer",
        variant="segformer-b0",
        trained=False,
        source_checkpoint=None,
        classes=("sky", "tree"),
        palette=((0, 0, 255), (0, 255, 0)),
        input=InputContract(
            name="pixels",
            dtype="uint8",
            mean=(123.675, 116.28, 103.53),
            std=(58.395, 57.12, 57.375),
            normalized_in_graph=True,
        ),
        output=OutputContract(name="logits", dtype="float32", stride=4),
        test_config=TestConfig(mode="whole", resize_scale=(2048, 512)),
        precision="fp32",
        opset=23,
        attention="onnx",
        exporter_version="test",
    )
    fields.update(overrides)
    return BundleMetadata.model_validate(fields)


def test_round_trip(tmp_path: Path) -> None:
    (tmp_path / "1").mkdir()
    (tmp_path / "1" / "model.onnx").write_bytes(b"onnx")
    write_metadata(tmp_path, _metadata())
    bundle = load_bundle(tmp_path)
    assert bundle.metadata == _metadata()
    assert bundle.metadata.num_classes == 2
    assert bundle.model_path == tmp_path / "1" / "model.onnx"


def test_palette_must_match_classes() -> None:
    with pytest.raises(ValueError, match="palette has 1 colours for 2 classes"):
        _metadata(palette=((0, 0, 0),))


def test_slide_needs_crop_and_stride() -> None:
    with pytest.raises(ValueError, match="slide mode needs crop and stride"):
        TestConfig(mode="slide", resize_scale=None)


def test_untrained_bundle_has_no_source() -> None:
    with pytest.raises(ValueError, match="trained bundles name their source"):
        _metadata(trained=True)


def test_wrong_schema_version_is_named(tmp_path: Path) -> None:
    data = json.loads(_metadata().model_dump_json())
    data["schema_version"] = 99
    (tmp_path / "segserve.json").write_text(json.dumps(data))
    with pytest.raises(BundleError, match="schema_version 99"):
        load_bundle(tmp_path)


def test_missing_model_file(tmp_path: Path) -> None:
    write_metadata(tmp_path, _metadata())
    with pytest.raises(BundleError, match=r"model\.onnx: missing"):
        load_bundle(tmp_path)
