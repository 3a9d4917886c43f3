"""End-to-end exports: SegFormer-B0 and SETR-PUP ViT-B to verified bundles, fp16, and bad input.

Each model is exported once per module (exports take tens of seconds on 2 cores) with small
verification sizes. Independent references: transformers' SegformerForSemanticSegmentation for
the checkpoint export, Triton's protobuf schema for config.pbtxt, ``service.bundle.load_bundle``
for the metadata, and onnxruntime re-run at sizes and batch sizes the export never saw.
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import transformers
from google.protobuf import text_format

from export import ExportError, ExportReport, export_bundle
from export.__main__ import main
from export.attention import attention_census
from export.verify import FP16_MIN_ARGMAX_AGREEMENT, FP32_NOISE_MULTIPLE, photo_batch
from models.datasets import IMAGENET_MEAN, IMAGENET_STD, get_dataset
from models.registry import create_model
from service.aligned import aligned_twin
from service.bundle import Bundle, TestConfig, load_bundle
from tests.integration.test_export_attention import triton_schema

VERIFY_SIZES = ((64, 64), (48, 80))
# Sizes and batches the export and its verification never saw; 45x83 is not a stride multiple.
DYNAMIC_SIZES = ((64, 48), (32, 96), (45, 83))
DYNAMIC_BATCHES = (1, 3)
SEED = 20261125
# Dynamic-shape runs against eager float32 on our seeded models (these stay well inside it).
LOGIT_RELATIVE_TOLERANCE = 1e-4


def _export_seeded(model_name: str, out: Path, **kwargs: object) -> ExportReport:
    """Export with a fixed torch seed, so ``_seeded_model`` rebuilds the same random weights."""
    torch.manual_seed(SEED)
    return export_bundle(model_name, out, random_init=True, verify_sizes=VERIFY_SIZES, **kwargs)  # type: ignore[arg-type]


def _seeded_model(model_name: str, num_classes: int) -> torch.nn.Module:
    torch.manual_seed(SEED)
    return create_model(model_name, num_classes=num_classes)


def _leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("."))


def _run_bundle(bundle: Bundle, pixels: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(bundle.model_path), providers=["CPUExecutionProvider"])
    return np.asarray(session.run(None, {bundle.metadata.input.name: pixels})[0])


def _torch_logits(model: torch.nn.Module, pixels: np.ndarray) -> np.ndarray:
    mean = np.asarray(IMAGENET_MEAN, dtype=np.float64).reshape(1, 3, 1, 1)
    std = np.asarray(IMAGENET_STD, dtype=np.float64).reshape(1, 3, 1, 1)
    normalised = ((pixels - mean) / std).astype(np.float32)
    with torch.no_grad():
        return model(torch.from_numpy(normalised)).numpy()


def _check_dynamic_shapes(bundle: Bundle, model: torch.nn.Module, stride: int) -> None:
    rng = np.random.default_rng(7)
    for height, width in DYNAMIC_SIZES:
        for batch in DYNAMIC_BATCHES:
            pixels = rng.integers(0, 256, (batch, 3, height, width), dtype=np.uint8)
            actual = _run_bundle(bundle, pixels)
            expected = _torch_logits(model, pixels)
            assert actual.dtype == np.float32
            assert actual.shape == expected.shape
            assert actual.shape[:2] == (batch, bundle.metadata.num_classes)
            if stride > 1:  # SegFormer: ceil(size / 4)
                assert actual.shape[2:] == (math.ceil(height / stride), math.ceil(width / stride))
            diff = np.abs(actual - expected).max()
            assert diff <= LOGIT_RELATIVE_TOLERANCE * np.abs(expected).max(), (height, width, batch)


# --------------------------------------------------------------------------- SegFormer-B0 fp32


@pytest.fixture(scope="module")
def b0(tmp_path_factory: pytest.TempPathFactory) -> tuple[ExportReport, list[str]]:
    messages: list[str] = []
    out = tmp_path_factory.mktemp("repository") / "segformer-b0"
    report = _export_seeded("segformer-b0", out, progress=messages.append)
    return report, messages


def test_b0_report(b0: tuple[ExportReport, list[str]]) -> None:
    report, messages = b0
    assert (report.model_name, report.arch, report.trained) == ("segformer-b0", "segformer", False)
    assert report.attention == "ort-contrib"  # the measured default
    assert report.census.contrib_attention == report.expected_attention_nodes == 8
    assert (report.census.onnx_attention, report.census.softmax) == (0, 0)
    assert report.input == ("pixels", "uint8", ["batch", 3, "height", "width"])
    assert report.output[:2] == ("logits", "float32")
    assert report.output[2][:2] == ["batch", 150]
    assert report.verification is not None and report.verification.passed
    cases = report.verification.cases
    assert sorted((c.inputs, c.shape) for c in cases) == sorted(
        (kind, (2, 3, h, w)) for kind in ("random", "photos") for h, w in VERIFY_SIZES
    )
    for case in cases:
        assert case.logit_scale > 0.01 and case.float32_diff > 0
        assert case.max_abs_diff <= FP32_NOISE_MULTIPLE * case.float32_diff
        assert case.argmax_agreement > 0.99
    text = report.format()
    assert "8 fused 'ort-contrib' nodes (expected 8), 0 Softmax" in text
    assert text.count(" ok") == len(cases)
    assert any("torch.onnx.export" in m for m in messages)
    assert any("verifying photos batch 2x3x48x80" in m for m in messages)


def test_b0_bundle_files(b0: tuple[ExportReport, list[str]]) -> None:
    report, _ = b0
    bundle = load_bundle(report.out)
    assert report.files == (
        report.out / "config.pbtxt",
        report.out / "1" / "model.onnx",
        report.out / "segserve.json",
    )
    assert sorted(p.name for p in report.out.iterdir()) == ["1", "config.pbtxt", "segserve.json"]
    assert _leftovers(report.out.parent) == []
    meta = bundle.metadata
    ade = get_dataset("ade20k")
    assert (meta.arch, meta.variant, meta.trained, meta.source_checkpoint) == (
        "segformer",
        "segformer-b0",
        False,
        None,
    )
    assert (meta.dataset, meta.classes) == ("ade20k", tuple(ade.classes))
    assert meta.palette == tuple(tuple(c) for c in ade.palette)
    assert meta.test_config == TestConfig.model_validate(ade.test_config)
    assert (meta.input.name, meta.input.dtype, meta.input.normalized_in_graph) == (
        "pixels",
        "uint8",
        True,
    )
    assert meta.input.mean == pytest.approx(IMAGENET_MEAN)
    assert meta.input.std == pytest.approx(IMAGENET_STD)
    assert (meta.output.name, meta.output.dtype, meta.output.stride) == ("logits", "float32", 4)
    assert (meta.precision, meta.opset, meta.attention) == ("fp32", 23, "ort-contrib")

    schema = triton_schema()
    config = text_format.Parse(
        (report.out / "config.pbtxt").read_text(),
        schema.ModelConfig(),  # type: ignore[attr-defined]
    )
    assert config.name == "segformer-b0" and config.platform == "onnxruntime_onnx"
    assert [(i.name, list(i.dims)) for i in config.input] == [("pixels", [3, -1, -1])]
    assert [(o.name, list(o.dims)) for o in config.output] == [("logits", [150, -1, -1])]


def test_b0_graph_is_folded_and_fused(b0: tuple[ExportReport, list[str]]) -> None:
    report, _ = b0
    graph = onnx.load(str(report.out / "1" / "model.onnx"))
    onnx.checker.check_model(graph)
    ops = {node.op_type for node in graph.graph.node}
    model = _seeded_model("segformer-b0", 150)
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    assert "BatchNormalization" not in ops
    census = attention_census(graph)
    assert (census.onnx_attention, census.contrib_attention, census.softmax) == (0, 8, 0)
    assert {opset.domain for opset in graph.opset_import} == {"", "com.microsoft"}
    assert max(o.version for o in graph.opset_import if o.domain in ("", "ai.onnx")) == 23


def test_b0_dynamic_batch_and_size(b0: tuple[ExportReport, list[str]]) -> None:
    report, _ = b0
    _check_dynamic_shapes(load_bundle(report.out), _seeded_model("segformer-b0", 150), stride=4)


# --------------------------------------------------------------------------- SETR-PUP ViT-B


@pytest.fixture(scope="module")
def setr(
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[Path, str]:
    """Exported through the command line, so the CLI's report is what is checked."""
    out = tmp_path_factory.mktemp("repository") / "setr-pup-base"
    torch.manual_seed(SEED)
    argv = ["--model", "setr-pup-base", "--random-init", "--dataset", "cityscapes"]
    argv += ["--attention", "onnx"]
    argv += ["--out", str(out), "--verify-size", "64x64", "--verify-size", "48x80"]
    with pytest.MonkeyPatch.context() as patch:
        lines: list[str] = []
        patch.setattr("builtins.print", lambda *a, **k: lines.append(" ".join(map(str, a))))
        status = main(argv)
    assert status == 0, lines
    return out, "\n".join(lines)


def test_setr_export(setr: tuple[Path, str]) -> None:
    out, printed = setr
    bundle = load_bundle(out)
    assert (bundle.metadata.arch, bundle.metadata.variant) == ("setr", "setr-pup-base")
    assert bundle.metadata.dataset == "cityscapes" and bundle.metadata.num_classes == 19
    graph = onnx.load(str(bundle.model_path))
    census = attention_census(graph)
    assert (census.onnx_attention, census.contrib_attention, census.softmax) == (12, 0, 0)
    # standard ONNX only: no onnxruntime-specific domain crept in through the offline optimiser
    assert {opset.domain for opset in graph.opset_import} <= {"", "ai.onnx"}
    assert bundle.metadata.attention == "onnx"
    assert "12 fused 'onnx' nodes (expected 12), 0 Softmax" in printed
    verified = [
        line for line in printed.splitlines() if line.startswith(("    random", "    photos"))
    ]
    assert len(verified) == 4 and all(line.endswith(" ok") for line in verified)
    assert "exported setr-pup-base (setr, random init)" in printed


def test_setr_gets_no_aligned_twin(setr: tuple[Path, str]) -> None:
    """SETR's decoder already upsamples by constant scales; its one Resize to a computed size,
    the position embedding's grid to the patches', has no integer ratio (service/aligned.py)."""
    bundle = load_bundle(setr[0])
    graph = onnx.load(str(bundle.model_path))
    resizes = [node for node in graph.graph.node if node.op_type == "Resize"]
    assert sum(len(node.input) == 4 and bool(node.input[3]) for node in resizes) == 1
    side = bundle.metadata.aligned_side
    assert side == 16
    assert aligned_twin(bundle.model_path, np.dtype(bundle.metadata.input.dtype), side) is None


def test_setr_dynamic_batch_and_size(setr: tuple[Path, str]) -> None:
    out, _ = setr
    bundle = load_bundle(out)
    model = _seeded_model("setr-pup-base", 19)
    _check_dynamic_shapes(bundle, model, stride=bundle.metadata.output.stride)


# --------------------------------------------------------------------------- checkpoint, fp16


def _save_hf_b0(directory: Path, num_labels: int) -> torch.nn.Module:
    """A random-init transformers SegFormer-B0 (its default config), saved as an HF checkpoint."""
    torch.manual_seed(SEED)
    config = transformers.SegformerConfig(
        num_labels=num_labels,
        id2label={i: f"class {i}" for i in range(num_labels)},
        label2id={f"class {i}": i for i in range(num_labels)},
    )
    model = transformers.SegformerForSemanticSegmentation(config).eval()
    model.save_pretrained(directory)
    return model


@pytest.fixture(scope="module")
def hf_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.nn.Module]:
    directory = tmp_path_factory.mktemp("hf-segformer-b0")
    return directory, _save_hf_b0(directory, num_labels=19)


def test_fp16_checkpoint_export_replaces_with_force(
    tmp_path: Path, hf_checkpoint: tuple[Path, torch.nn.Module]
) -> None:
    checkpoint, reference = hf_checkpoint
    out = tmp_path / "b0-fp16"
    out.mkdir()
    (out / "stale.txt").write_text("an older bundle")
    with pytest.raises(ExportError, match="already exists; pass --force"):
        export_bundle("segformer-b0", out, checkpoint=checkpoint, dataset="cityscapes")
    assert (out / "stale.txt").is_file()

    report = export_bundle(
        "segformer-b0",
        out,
        checkpoint=checkpoint,
        dataset="cityscapes",
        precision="fp16",
        force=True,
        verify_sizes=VERIFY_SIZES,
    )
    assert not (out / "stale.txt").exists()
    assert _leftovers(tmp_path) == []
    assert report.verification is not None and report.verification.passed
    assert all(c.argmax_agreement >= FP16_MIN_ARGMAX_AGREEMENT for c in report.verification.cases)
    assert report.census.contrib_attention == 8 and report.census.softmax == 0

    bundle = load_bundle(out)
    meta = bundle.metadata
    weights = checkpoint / "model.safetensors"
    assert meta.trained and meta.source_checkpoint is not None
    assert meta.source_checkpoint.sha256 == hashlib.sha256(weights.read_bytes()).hexdigest()
    assert meta.source_checkpoint.format == "hf"
    assert (meta.precision, meta.output.dtype) == ("fp16", "float32")
    assert meta.classes == tuple(get_dataset("cityscapes").classes)
    graph = onnx.load(str(bundle.model_path))
    weight_types = {init.data_type for init in graph.graph.initializer if len(init.dims) >= 2}
    assert onnx.TensorProto.FLOAT16 in weight_types
    norms = [n for n in graph.graph.node if n.op_type == "LayerNormalization"]
    assert norms and all(  # float32 accumulation (stash_type 1, also the default)
        onnx.helper.get_attribute_value(a) == 1
        for n in norms
        for a in n.attribute
        if a.name == "stash_type"
    )

    # Independent of our model code: transformers' own SegFormer on real photographs.
    pixels = photo_batch(96, 128)
    actual = _run_bundle(bundle, pixels)
    mean = np.asarray(IMAGENET_MEAN).reshape(1, 3, 1, 1)
    std = np.asarray(IMAGENET_STD).reshape(1, 3, 1, 1)
    with torch.no_grad():
        expected = reference(
            pixel_values=torch.from_numpy(((pixels - mean) / std).astype(np.float32))
        ).logits.numpy()
    assert actual.shape == expected.shape
    agreement = (actual.argmax(1) == expected.argmax(1)).mean()
    assert agreement >= FP16_MIN_ARGMAX_AGREEMENT


# --------------------------------------------------------------------------- bad input


def test_unknown_variant(tmp_path: Path) -> None:
    with pytest.raises(ExportError, match=r"unknown model 'segformer-b9'; known: .*segformer-b0"):
        export_bundle("segformer-b9", tmp_path / "x", random_init=True)
    assert list(tmp_path.iterdir()) == []


def test_checkpoint_of_another_architecture(
    tmp_path: Path, hf_checkpoint: tuple[Path, torch.nn.Module]
) -> None:
    checkpoint, _ = hf_checkpoint
    with pytest.raises(ExportError, match=r"cannot load .* as setr-pup-base"):
        export_bundle("setr-pup-base", tmp_path / "x", checkpoint=checkpoint)
    assert list(tmp_path.iterdir()) == []


def test_class_count_disagreeing_with_checkpoint(
    tmp_path: Path, hf_checkpoint: tuple[Path, torch.nn.Module]
) -> None:
    checkpoint, _ = hf_checkpoint
    with pytest.raises(ExportError, match=r"150 class names given but .* predicts 19"):
        export_bundle("segformer-b0", tmp_path / "x", checkpoint=checkpoint, dataset="ade20k")
    assert list(tmp_path.iterdir()) == []


def test_unwritable_output_directory(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("a file where the repository should be")
    with pytest.raises(ExportError, match="cannot write the bundle next to"):
        export_bundle("segformer-b0", blocker / "segformer-b0", random_init=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["not-a-directory"]


def test_existing_bundle_is_refused(tmp_path: Path) -> None:
    out = tmp_path / "segformer-b0"
    out.mkdir()
    with pytest.raises(ExportError, match="already exists; pass --force"):
        export_bundle("segformer-b0", out, random_init=True)
    assert list(out.iterdir()) == [] and _leftovers(tmp_path) == []


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({}, "give --checkpoint PATH, or --random-init"),
        ({"random_init": True, "dataset": "kitti"}, "unknown dataset 'kitti'"),
        ({"random_init": True, "attention": "flash"}, "--attention must be one of"),
        ({"random_init": True, "opset": 18}, "opset 18 has no fused Attention operator"),
        ({"random_init": True, "precision": "int4"}, "precision must be fp32, fp16 or int8"),
        ({"checkpoint": Path("/nonexistent/ckpt.pth")}, "cannot load /nonexistent/ckpt.pth"),
        ({"checkpoint": Path("/x.pth"), "random_init": True}, "exclude each other"),
    ],
)
def test_other_user_errors_leave_nothing(
    tmp_path: Path, kwargs: dict[str, object], message: str
) -> None:
    with pytest.raises(ExportError, match=message):
        export_bundle("segformer-b0", tmp_path / "b0", **kwargs)  # type: ignore[arg-type]
    assert list(tmp_path.iterdir()) == []


def test_cli_error_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    status = main(["--model", "segformer-b9", "--random-init", "--out", str(tmp_path / "x")])
    captured = capsys.readouterr()
    assert status == 2
    assert captured.err.startswith("error: unknown model 'segformer-b9'")
    assert captured.err.count("\n") == 1 and "Traceback" not in captured.err
    assert captured.out == ""


def test_class_file_gives_classes_palette_and_plain_test_config(tmp_path: Path) -> None:
    from export.bundle_writer import NO_DATASET_TEST_CONFIG, _resolve_model

    coloured = tmp_path / "coloured.txt"
    coloured.write_text("# name colour\nsky #4682b4\nroad 128 64 128\n")
    resolved = _resolve_model("segformer-b0", None, None, coloured)
    assert resolved.classes == ("sky", "road")
    assert resolved.palette == ((70, 130, 180), (128, 64, 128))
    assert resolved.dataset is None and resolved.test_config == NO_DATASET_TEST_CONFIG
    assert resolved.model.num_classes == 2 and resolved.source is None

    plain = tmp_path / "plain.txt"
    plain.write_text("sky\nroad\nperson\n")
    resolved = _resolve_model("segformer-b0", None, None, plain)
    assert resolved.classes == ("sky", "road", "person") and len(set(resolved.palette)) == 3

    duplicated = tmp_path / "duplicated.txt"
    duplicated.write_text("sky\nsky\n")
    out = tmp_path / "repository" / "b0"
    with pytest.raises(ExportError, match=r"cannot read class file .*duplicate class names: sky"):
        export_bundle("segformer-b0", out, random_init=True, classes_file=duplicated)
    assert list(out.parent.iterdir()) == []


def _wrong_graph(num_classes: int) -> onnx.ModelProto:
    """A valid stride-4 graph with the bundle's input/output contract but not the model's maths."""
    weights = np.random.default_rng(0).standard_normal((num_classes, 3, 4, 4)).astype(np.float32)
    graph = onnx.helper.make_graph(
        [
            onnx.helper.make_node("Cast", ["pixels"], ["float_pixels"], to=onnx.TensorProto.FLOAT),
            onnx.helper.make_node("Conv", ["float_pixels", "w"], ["logits"], strides=[4, 4]),
        ],
        "wrong",
        [onnx.helper.make_tensor_value_info("pixels", onnx.TensorProto.UINT8, ["b", 3, "h", "w"])],
        [onnx.helper.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, None)],
        [onnx.numpy_helper.from_array(weights, "w")],
    )
    return onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 23)])


def test_failed_verification_leaves_no_bundle(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Files already written to the staging directory are removed when verification fails."""
    from export import bundle_writer
    from export.attention import AttentionCensus
    from export.onnx_export import ExportedGraph

    written: list[Path] = []

    def wrong_export(*args: object, **kwargs: object) -> ExportedGraph:
        return ExportedGraph(model=_wrong_graph(150), census=AttentionCensus(0, 8, 0))

    real_verify = bundle_writer.verify

    def spy_verify(path: Path, *args: object, **kwargs: object) -> object:
        written.extend(sorted(p.name for p in path.parent.parent.iterdir()))  # type: ignore[arg-type]
        return real_verify(path, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(bundle_writer, "export_onnx", wrong_export)
    monkeypatch.setattr(bundle_writer, "verify", spy_verify)
    out = tmp_path / "segformer-b0"
    with pytest.raises(
        ExportError,
        match=r"verification failed \(against PyTorch float64: max\|Δ\| ≤ 4 × .* FAILED",
    ):
        export_bundle("segformer-b0", out, random_init=True, verify_sizes=((32, 32),))
    assert written == ["1"]  # the graph; metadata and config are written after verification
    assert list(tmp_path.iterdir()) == []


def test_int8_export_through_the_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """B0 quantized end to end (~2 min on the 2-vCPU VM): the report and segserve.json carry the
    agreement, the bundle loads, the graph is QDQ around the kept fused attention, and nothing
    of the fp32 graph or the refitted twin is left behind."""
    out = tmp_path / "b0-int8"
    argv = ["--model", "segformer-b0", "--random-init", "--precision", "int8", "--out", str(out)]
    assert main([*argv, "--skip-verify"]) == 0
    report = capsys.readouterr().out
    assert report.startswith("exported ")  # the calibrator's progress went to stderr
    assert "precision    int8" in report and "refitted classifier weights" in report
    quantization = load_bundle(out).metadata.quantization
    assert quantization is not None and quantization.agreement_weights == "refitted classifier"
    assert f"agreement    {quantization.label_agreement:.2%}" in report
    # 94.2-95.9 % on a VNNI CPU, 94.3 % on one without (56 % there with 8-bit weights)
    assert 0.85 < quantization.label_agreement < 1.0
    ops = [node.op_type for node in onnx.load(str(out / "1" / "model.onnx")).graph.node]
    assert ops.count("MultiHeadAttention") == 8 and ops.count("QuantizeLinear") > 100
    # As onnxruntime runs it: integer Convs and MatMuls, and no MatMulNBits (int8 weights on a
    # float input, quantized again on every run: 3x slower than the float MatMuls kept instead).
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(out / "1" / "model.onnx"), options, providers=["CPUExecutionProvider"])
    optimized = [node.op_type for node in onnx.load(options.optimized_model_filepath).graph.node]
    (tmp_path / "optimized.onnx").unlink()
    assert optimized.count("QLinearConv") > 30 and optimized.count("QLinearMatMul") >= 16
    assert "MatMulNBits" not in optimized and optimized.count("MatMul") == 8
    files = sorted(p.name for p in out.rglob("*"))
    assert files == ["1", "config.pbtxt", "model.onnx", "segserve.json"]
    assert _leftovers(tmp_path) == []
