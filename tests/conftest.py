"""Shared fixtures: real photographs and small but real model bundles.

``tiny_bundle`` / ``tiny_float_bundle`` are built here with ``onnx.helper`` (no export code
involved): a SegFormer-like stem (7x7 conv, stride 4, padding 3, ReLU), a 3x3 conv with tanh, a 1x1
classifier, 5 classes, logits at stride 4, dynamic batch and size. The uint8 variant normalises in
the graph, the float32 one expects normalised input, so both input contracts are exercised.
``segformer_b0_bundle`` is a random-init SegFormer-B0 exported by ``export.export_bundle`` (a hard
dependency: the real-model tests fail, not skip, when the export breaks).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from skimage import data

from service.bundle import (
    MODEL_FILE,
    Bundle,
    BundleMetadata,
    InputContract,
    OutputContract,
    TestConfig,
    load_bundle,
    write_metadata,
)

ADE_MEAN = (123.675, 116.28, 103.53)
ADE_STD = (58.395, 57.12, 57.375)
TINY_CLASSES = ("sky", "tree", "person", "road", "wall")
TINY_PALETTE = ((70, 130, 180), (107, 142, 35), (220, 20, 60), (128, 64, 128), (102, 102, 156))


def tiny_model(
    normalized_in_graph: bool, num_classes: int = len(TINY_CLASSES), fp16_io: bool = False
) -> onnx.ModelProto:
    """A small conv net: pixels (N, 3, H, W) -> logits (N, classes, ceil(H/4), ceil(W/4)).

    ``fp16_io``: float16 input and logits around float32 compute, as an fp16 bundle's contract
    looks from outside (onnxruntime's CPU kernels are float32)."""
    rng = np.random.default_rng(1234)
    hidden = 16
    stem_w = rng.normal(0, 0.2, (hidden, 3, 7, 7)).astype(np.float32)
    stem_b = rng.normal(0, 0.1, hidden).astype(np.float32)
    mix_w = rng.normal(0, 0.3, (hidden, hidden, 3, 3)).astype(np.float32)
    cls_w = rng.normal(0, 0.5, (num_classes, hidden, 1, 1)).astype(np.float32)
    cls_b = rng.normal(0, 0.2, num_classes).astype(np.float32)
    initializers = [
        numpy_helper.from_array(stem_w, "stem_w"),
        numpy_helper.from_array(stem_b, "stem_b"),
        numpy_helper.from_array(mix_w, "mix_w"),
        numpy_helper.from_array(cls_w, "cls_w"),
        numpy_helper.from_array(cls_b, "cls_b"),
    ]
    nodes = []
    if normalized_in_graph:
        mean = np.asarray(ADE_MEAN, np.float32).reshape(1, 3, 1, 1)
        std = np.asarray(ADE_STD, np.float32).reshape(1, 3, 1, 1)
        initializers += [numpy_helper.from_array(mean, "mean"), numpy_helper.from_array(std, "std")]
        nodes += [
            helper.make_node("Cast", ["pixels"], ["pixels_f"], to=TensorProto.FLOAT),
            helper.make_node("Sub", ["pixels_f", "mean"], ["centred"]),
            helper.make_node("Div", ["centred", "std"], ["normalised"]),
        ]
        stem_input = "normalised"
        input_type = TensorProto.UINT8
    elif fp16_io:
        nodes.append(helper.make_node("Cast", ["pixels"], ["pixels_f"], to=TensorProto.FLOAT))
        stem_input = "pixels_f"
        input_type = TensorProto.FLOAT16
    else:
        stem_input = "pixels"
        input_type = TensorProto.FLOAT
    nodes += [
        helper.make_node(
            "Conv", [stem_input, "stem_w", "stem_b"], ["stem"], strides=[4, 4], pads=[3, 3, 3, 3]
        ),
        helper.make_node("Relu", ["stem"], ["stem_act"]),
        helper.make_node("Conv", ["stem_act", "mix_w"], ["mixed"], pads=[1, 1, 1, 1]),
        helper.make_node("Tanh", ["mixed"], ["mixed_act"]),
        helper.make_node("Conv", ["mixed_act", "cls_w", "cls_b"], ["logits_f"]),
        helper.make_node(
            "Cast",
            ["logits_f"],
            ["logits"],
            to=TensorProto.FLOAT16 if fp16_io else TensorProto.FLOAT,
        ),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny_segmenter",
        [helper.make_tensor_value_info("pixels", input_type, ["N", 3, "H", "W"])],
        [
            helper.make_tensor_value_info(
                "logits",
                TensorProto.FLOAT16 if fp16_io else TensorProto.FLOAT,
                ["N", num_classes, "h", "w"],
            )
        ],
        initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def write_tiny_bundle(
    directory: Path,
    *,
    normalized_in_graph: bool = True,
    test_config: TestConfig | None = None,
    num_classes: int = len(TINY_CLASSES),
    fp16_io: bool = False,
) -> Bundle:
    """Write a complete bundle directory for the tiny model and load it back."""
    (directory / "1").mkdir(parents=True, exist_ok=True)
    model = tiny_model(normalized_in_graph, num_classes, fp16_io)
    onnx.save(model, str(directory / MODEL_FILE))
    if num_classes == len(TINY_CLASSES):
        classes, palette = TINY_CLASSES, TINY_PALETTE
    else:
        classes = tuple(f"class{i}" for i in range(num_classes))
        palette = tuple((i % 256, (7 * i) % 256, (13 * i) % 256) for i in range(num_classes))
    metadata = BundleMetadata(
        arch="segformer",
        variant="tiny-test",
        trained=False,
        source_checkpoint=None,
        dataset=None,
        classes=classes,
        palette=palette,
        input=InputContract(
            name="pixels",
            dtype="uint8" if normalized_in_graph else "float16" if fp16_io else "float32",
            mean=ADE_MEAN,
            std=ADE_STD,
            normalized_in_graph=normalized_in_graph,
        ),
        output=OutputContract(name="logits", dtype="float16" if fp16_io else "float32", stride=4),
        test_config=test_config or TestConfig(mode="whole", resize_scale=(320, 160)),
        precision="fp16" if fp16_io else "fp32",
        opset=17,
        attention="onnx",
        exporter_version="tests.conftest",
    )
    write_metadata(directory, metadata)
    (directory / "config.pbtxt").write_text(
        f'name: "{directory.name}"\nplatform: "onnxruntime_onnx"\nmax_batch_size: 16\n'
    )
    return load_bundle(directory)


@pytest.fixture(scope="session")
def model_repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A repository with two tiny bundles: ``tiny`` (uint8, whole) and ``tiny-float`` (float32,
    slide with 96x96 crops and 64x64 stride)."""
    root = tmp_path_factory.mktemp("model_repository")
    write_tiny_bundle(root / "tiny")
    write_tiny_bundle(
        root / "tiny-float",
        normalized_in_graph=False,
        test_config=TestConfig(
            mode="slide", resize_scale=(320, 160), crop=(96, 96), stride=(64, 64)
        ),
    )
    return root


@pytest.fixture(scope="session")
def tiny_bundle(model_repository: Path) -> Bundle:
    return load_bundle(model_repository / "tiny")


@pytest.fixture(scope="session")
def tiny_float_bundle(model_repository: Path) -> Bundle:
    return load_bundle(model_repository / "tiny-float")


PHOTOS: dict[str, Callable[[], np.ndarray]] = {
    "astronaut": data.astronaut,
    "chelsea": data.chelsea,
    "coffee": data.coffee,
    "rocket": data.rocket,
}


@pytest.fixture(scope="session")
def photos() -> dict[str, np.ndarray]:
    """Real RGB uint8 photographs shipped with scikit-image (no download)."""
    return {name: np.ascontiguousarray(load()) for name, load in PHOTOS.items()}


@pytest.fixture(scope="session")
def segformer_b0_bundle(tmp_path_factory: pytest.TempPathFactory) -> Bundle:
    """A random-init SegFormer-B0 (ADE20K classes and test config) exported to a bundle.

    The export's own verification is tested in tests/test_export*; it is skipped here to keep
    this session fixture cheap.
    """
    from export import export_bundle

    out = tmp_path_factory.mktemp("segformer_repo") / "segformer-b0"
    export_bundle("segformer-b0", out, random_init=True, dataset="ade20k", skip_verify=True)
    return load_bundle(out)
