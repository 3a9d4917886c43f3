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
    CALIBRATION_PERCENTILE,
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


def test_activation_ranges_clip_the_calibration_outliers(
    model_repository: Path, int8_repository: Path
) -> None:
    """The middle convolution's output range is its values' percentile range on the calibration
    photos, not their min-max stretched by a few outliers (which a MinMax calibration gives)."""
    probe = onnx.load(str(model_repository / "tiny" / MODEL_FILE))
    probe.graph.output.append(
        onnx.helper.make_tensor_value_info("mixed", onnx.TensorProto.FLOAT, None)
    )
    session = cpu_session(probe.SerializeToString())
    values = np.concatenate(
        [
            session.run(["mixed"], {"pixels": b})[0].ravel()
            for b in quantize.photos(CALIBRATION, SIZE)
        ]
    )
    cut = (100 - CALIBRATION_PERCENTILE) / 2
    low, high = np.percentile(values, [cut, 100 - cut])
    graph = onnx.load(str(int8_repository / "tiny-int8" / MODEL_FILE)).graph
    initializers = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    quantizer = next(
        n for n in graph.node if n.op_type == "QuantizeLinear" and n.input[0] == "mixed"
    )
    width = float(initializers[quantizer.input[1]]) * 255  # uint8 steps
    # 2 % below: onnxruntime reads the percentiles off a 2048-bin histogram.
    assert 0.98 * (high - low) <= width <= 0.95 * (values.max() - values.min())


def test_a_class_that_never_wins_stays_out_of_int8_labels(tmp_path: Path) -> None:
    """A classifier channel with near-zero weights and a large negative bias (a class that is
    never predicted, as in a refitted twin) must not wrap its int32 accumulator and win.

    Its weights are set so that onnxruntime's quantizer has to raise their scale slightly for
    the bias to fit in int32: the bias then sits at the edge of int32, as on the twin that
    labelled every pixel with such a class."""
    fp32, int8 = tmp_path / "fp32.onnx", tmp_path / "int8.onnx"
    calibration = quantize.photos(CALIBRATION, SIZE)
    onnx.save(_wide_net_with_a_dead_class(1e-6), str(fp32))
    quantize_int8(fp32, int8, calibration)
    graph = onnx.load(str(int8)).graph
    initializers = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    producers = {output: node for node in graph.node for output in node.output}
    classifier = next(n for n in reversed(graph.node) if n.op_type == "Conv")
    input_scale = float(initializers[producers[classifier.input[0]].input[1]])
    # Natural weight scale 0.999x the least that keeps the bias (-4) inside int32.
    weight = 0.999 * 127 * 4.0 / (input_scale * 2**31)
    onnx.save(_wide_net_with_a_dead_class(weight), str(fp32))
    quantize_int8(fp32, int8, calibration)
    for batch in quantize.photos(AGREEMENT, SIZE):
        (expected,) = cpu_session(fp32).run(None, {"pixels": batch})
        (found,) = cpu_session(int8).run(None, {"pixels": batch})
        assert np.abs(found[:, 0] - expected[:, 0]).max() < 0.5  # about -4 everywhere
        assert (labels(cpu_session(int8), batch) != 0).all()


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


def _wide_net_with_a_dead_class(dead_weight: float) -> onnx.ModelProto:
    """pixels -> 4x4 patch conv to 256 channels -> ReLU -> 1x1 classifier of 5 classes, as wide
    as SegFormer's classifier; class 0 has every weight ``-dead_weight`` and a bias of -4."""
    rng = np.random.default_rng(7)
    patch_w = rng.normal(0, 0.02, (256, 3, 4, 4)).astype(np.float32)
    cls_w = rng.normal(0, 0.1, (5, 256, 1, 1)).astype(np.float32)
    cls_w[0] = -dead_weight
    cls_b = np.array([-4.0, 0.1, -0.1, 0.2, 0.0], np.float32)
    nodes = [
        onnx.helper.make_node("Cast", ["pixels"], ["pixels_f"], to=onnx.TensorProto.FLOAT),
        onnx.helper.make_node("Conv", ["pixels_f", "patch_w"], ["patches"], strides=[4, 4]),
        onnx.helper.make_node("Relu", ["patches"], ["features"]),
        onnx.helper.make_node("Conv", ["features", "cls_w", "cls_b"], ["logits"]),
    ]
    graph = onnx.helper.make_graph(
        nodes,
        "dead_class",
        [onnx.helper.make_tensor_value_info("pixels", onnx.TensorProto.UINT8, ["N", 3, "H", "W"])],
        [onnx.helper.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, None)],
        [
            numpy_helper.from_array(patch_w, "patch_w"),
            numpy_helper.from_array(cls_w, "cls_w"),
            numpy_helper.from_array(cls_b, "cls_b"),
        ],
    )
    return onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])


def _png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def _decode(payload: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(payload)))
