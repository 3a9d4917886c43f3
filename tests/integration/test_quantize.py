"""int8 bundles on the tiny conv net: quantization, label agreement, the refitted twin, serving.

The full SegFormer-B0 path (``python -m export --precision int8``) is measured in docs/export.md;
here the same functions run on the tiny bundle of tests/conftest.py, so this file takes seconds.
"""

from __future__ import annotations

import io
import shutil
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from fastapi.testclient import TestClient
from onnx import numpy_helper
from PIL import Image
from pydantic import ValidationError

from export import quantize
from export.quantize import (
    METHOD,
    cpu_session,
    label_agreement,
    labels,
    quantize_int8,
    refit_classifier,
    superpixel_classes,
)
from service.bundle import MODEL_FILE, Quantization, load_bundle, read_metadata, write_metadata
from service.http import create_app
from service.settings import Settings

SIZE = (96, 128)
CALIBRATION = ("astronaut", "rocket", "camera")
AGREEMENT = ("chelsea", "coffee")


@pytest.fixture(scope="module")
def int8_repository(model_repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A repository with the tiny bundle quantized to int8 next to its fp32 original."""
    root = tmp_path_factory.mktemp("int8_repo")
    shutil.copytree(model_repository / "tiny", root / "tiny")
    shutil.copytree(model_repository / "tiny", root / "tiny-int8")
    fp32, int8 = root / "tiny" / MODEL_FILE, root / "tiny-int8" / MODEL_FILE
    quantize_int8(fp32, int8, quantize.photos(CALIBRATION, SIZE))
    agreement = label_agreement(fp32, int8, quantize.photos(AGREEMENT, SIZE))
    metadata = read_metadata(root / "tiny-int8").model_copy(
        update={
            "precision": "int8",
            "quantization": Quantization(
                method=METHOD,
                calibration_photos=CALIBRATION,
                label_agreement=agreement,
                agreement_photos=AGREEMENT,
                agreement_weights="refitted classifier",
            ),
        }
    )
    write_metadata(root / "tiny-int8", metadata)
    return root


def test_quantized_graph_has_per_channel_int8_weights_and_tracks_fp32(
    int8_repository: Path,
) -> None:
    fp32 = int8_repository / "tiny" / MODEL_FILE
    int8 = int8_repository / "tiny-int8" / MODEL_FILE
    graph = onnx.load(str(int8))
    initializers = {t.name: numpy_helper.to_array(t) for t in graph.graph.initializer}
    weight_dequantizers = [
        n
        for n in graph.graph.node
        if n.op_type == "DequantizeLinear" and initializers.get(n.input[0]) is not None
    ]
    quantized = [initializers[n.input[0]] for n in weight_dequantizers]
    # The three convolutions' weights, int8 with one scale per output channel.
    assert sum(w.dtype == np.int8 and w.ndim == 4 for w in quantized) == 3
    for node in weight_dequantizers:
        if initializers[node.input[0]].ndim == 4:
            scales = initializers[node.input[1]]
            assert scales.shape == (initializers[node.input[0]].shape[0],)
    assert sum(n.op_type == "QuantizeLinear" for n in graph.graph.node) >= 3

    batches = quantize.photos(AGREEMENT, SIZE)
    assert label_agreement(fp32, fp32, batches) == 1.0
    agreement = label_agreement(fp32, int8, batches)
    assert 0.8 < agreement < 1.0  # int8 is close to fp32, and not secretly the same graph


def test_refitted_classifier_learns_labels_its_features_can_draw(model_repository: Path) -> None:
    """Fitted to the net's own labels with the classes permuted (which a 1x1 classifier on the
    same features can draw), the twin gives the permuted labels; the original does not."""
    model = onnx.load(str(model_repository / "tiny" / MODEL_FILE))
    before = cpu_session(model.SerializeToString())
    inputs = quantize.photos(("astronaut", "chelsea"), SIZE)
    permutation = np.array([3, 0, 4, 1, 2])
    targets = [permutation[labels(before, batch)[0]] for batch in inputs]
    twin = refit_classifier(model, inputs, targets, stride=4)
    after = cpu_session(twin.SerializeToString())
    for batch, target in zip(inputs, targets, strict=True):
        assert (labels(before, batch)[0] == target).mean() < 0.5
        assert (labels(after, batch)[0] == target).mean() > 0.7  # least squares, not argmax
    assert len(twin.graph.node) == len(model.graph.node)  # only the classifier's values changed
    regions = superpixel_classes(inputs[0], 150)
    assert regions.shape == SIZE and 10 <= len(np.unique(regions)) <= 150


def test_int8_bundle_is_served_and_shows_its_precision(
    int8_repository: Path, photos: dict[str, np.ndarray]
) -> None:
    settings = Settings(model_repository=int8_repository, providers=("cpu",), intra_op_threads=1)
    with TestClient(create_app(settings)) as client:
        deadline = time.monotonic() + 60
        while client.get("/readyz").status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        models = {m["name"]: m for m in client.get("/models").json()}
        assert models["tiny-int8"]["precision"] == "int8"
        assert models["tiny"]["precision"] == "fp32"
        answers = {}
        for name in ("tiny", "tiny-int8"):
            response = client.post(
                "/segment",
                params={"model": name, "output": "labels"},
                files={"image": ("cat.png", _png(photos["chelsea"]))},
            )
            assert response.status_code == 200, response.text
            answers[name] = response.content
    fp32_labels, int8_labels = (_decode(answers[n]) for n in ("tiny", "tiny-int8"))
    assert fp32_labels.shape == int8_labels.shape
    assert (fp32_labels == int8_labels).mean() > 0.8


def test_int8_metadata_must_record_its_quantization(model_repository: Path) -> None:
    metadata = read_metadata(model_repository / "tiny")
    with pytest.raises(ValidationError, match="record their quantization"):
        type(metadata).model_validate({**metadata.model_dump(), "precision": "int8"})
    assert load_bundle(model_repository / "tiny").metadata.quantization is None


def _png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def _decode(payload: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(payload)))
