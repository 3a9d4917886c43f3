"""Checkpoint (or random weights) -> verified model bundle, written atomically.

``export_bundle`` is the whole build pipeline: resolve the model and its classes, export the
graph (``onnx_export``), write ``1/model.onnx``, ``config.pbtxt`` and ``segserve.json`` into a
hidden staging directory next to ``out``, verify the written graph against PyTorch (for int8, the
fp32 graph it is quantized from, then the quantized graph's label agreement, ``quantize``), and only
then rename the staging directory into place. Any failure removes the staging directory, so a bundle
path either holds a complete, verified bundle or whatever it held before.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import onnx
import torch
from pydantic import ValidationError
from torch import nn

from export.attention import (
    ATTENTION_FORMS,
    AttentionCensus,
    AttentionError,
    AttentionForm,
    expected_attention_nodes,
)
from export.onnx_export import (
    INPUT_NAME,
    OUTPUT_NAME,
    OnnxExportError,
    Precision,
    export_onnx,
    graph_io,
)
from export.quantize import (
    CALIBRATION_PHOTOS,
    INT8_TARGET_LABEL_AGREEMENT,
    METHOD,
    measure_agreement,
    photos,
    quantize_int8,
)
from export.triton import triton_config
from export.verify import DEFAULT_SIZES, VerificationReport, verify
from models import datasets
from models.checkpoints import CheckpointError, load_checkpoint
from models.registry import create_model, list_models
from service import __version__
from service.bundle import (
    METADATA_FILE,
    MODEL_FILE,
    TRITON_CONFIG_FILE,
    BundleError,
    BundleMetadata,
    InputContract,
    OutputContract,
    Quantization,
    SourceCheckpoint,
    TestConfig,
    load_bundle,
    write_metadata,
)

EXPORTER_VERSION = (
    f"segserve-export {__version__} (torch {torch.__version__}, onnx {onnx.__version__})"
)
# Faster or level on onnxruntime's CPU provider (measured, docs/export.md), and the form with
# mature CUDA kernels (flash / memory-efficient), so it never leaves the GPU.
DEFAULT_ATTENTION: AttentionForm = "ort-contrib"
DEFAULT_DATASET = "ade20k"  # random-init bundles with no classes given
# Used when only a class file is given: the whole image at its own size.
NO_DATASET_TEST_CONFIG = TestConfig(mode="whole", resize_scale=None)


BundlePrecision = Literal["fp32", "fp16", "int8"]


class ExportError(ValueError):
    """A user error or a failed check; the message says what and how to fix it."""


@dataclass(frozen=True)
class ExportReport:
    """What an export did, for the command line and for tests."""

    out: Path
    model_name: str
    arch: str
    trained: bool
    source_checkpoint: str | None
    dataset: str | None
    classes_source: str
    num_classes: int
    precision: BundlePrecision
    quantization: Quantization | None
    opset: int
    attention: AttentionForm
    census: AttentionCensus
    expected_attention_nodes: int
    input: tuple[str, str, list[int | str]]
    output: tuple[str, str, list[int | str]]
    output_stride: int
    verification: VerificationReport | None
    files: tuple[Path, ...]
    seconds: float
    timings: dict[str, float] = field(default_factory=dict)

    def format(self) -> str:
        weights = f"trained ({self.source_checkpoint})" if self.trained else "random init"
        lines = [
            f"exported {self.model_name} ({self.arch}, {weights}) -> {self.out}",
            f"  classes      {self.num_classes} (from {self.classes_source})",
            f"  precision    {self.precision}, opset {self.opset}",
            *_quantization_lines(self.quantization),
            f"  input        {_io(self.input)}",
            f"  output       {_io(self.output)}  (stride {self.output_stride})",
            f"  attention    {self.census.fused(self.attention)} fused {self.attention!r} nodes "
            f"(expected {self.expected_attention_nodes}), {self.census.softmax} Softmax",
        ]
        if self.verification is None:
            lines.append("  verification SKIPPED (--skip-verify)")
        else:
            lines.append(f"  verification {self.verification.criterion}")
            lines += [f"    {case.describe()}" for case in self.verification.cases]
        lines.append("  files        " + ", ".join(str(f) for f in self.files))
        steps = ", ".join(f"{step} {seconds:.1f}s" for step, seconds in self.timings.items())
        lines.append(f"  time         {self.seconds:.1f}s ({steps})")
        return "\n".join(lines)


def _quantization_lines(quantization: Quantization | None) -> list[str]:
    if quantization is None:
        return []
    return [
        f"  int8         {quantization.method}; calibrated on "
        f"{', '.join(quantization.calibration_photos)}",
        f"  agreement    {quantization.label_agreement:.2%} of pixels labelled as fp32 "
        f"({quantization.agreement_weights} weights; {', '.join(quantization.agreement_photos)}; "
        f"target {INT8_TARGET_LABEL_AGREEMENT:.1%})",
    ]


def _io(described: tuple[str, str, list[int | str]]) -> str:
    name, dtype, dims = described
    return f"{name} {dtype} [{', '.join(str(d) for d in dims)}]"


@dataclass(frozen=True)
class _ResolvedModel:
    model: nn.Module
    model_name: str
    arch: Literal["segformer", "setr"]
    output_stride: int
    source: SourceCheckpoint | None
    dataset: str | None
    classes_source: str  # "dataset ade20k", "class file X", "checkpoint"
    classes: tuple[str, ...]
    palette: tuple[tuple[int, int, int], ...]
    test_config: TestConfig


def export_bundle(
    model_name: str,
    out: Path,
    *,
    checkpoint: Path | None = None,
    random_init: bool = False,
    dataset: str | None = None,
    classes_file: Path | None = None,
    precision: BundlePrecision = "fp32",
    opset: int = 23,
    attention: str | None = None,
    force: bool = False,
    skip_verify: bool = False,
    progress: Callable[[str], None] | None = None,
    verify_sizes: Sequence[tuple[int, int]] = DEFAULT_SIZES,
) -> ExportReport:
    """Export ``model_name`` to a verified bundle at ``out``; raise ExportError on any failure."""
    started = time.perf_counter()
    say = progress or (lambda _: None)
    timings: dict[str, float] = {}
    out = Path(out)
    form = _attention_form(attention)
    if precision not in ("fp32", "fp16", "int8"):
        raise ExportError(f"precision must be fp32, fp16 or int8, got {precision!r}")
    graph_precision: Precision = "fp16" if precision == "fp16" else "fp32"
    if checkpoint is None and not random_init:
        raise ExportError("give --checkpoint PATH, or --random-init for an untrained model")
    if checkpoint is not None and random_init:
        raise ExportError("--checkpoint and --random-init exclude each other")
    if not verify_sizes and not skip_verify:
        raise ExportError("verification needs at least one size")
    known = list_models()
    if model_name not in known:
        raise ExportError(f"unknown model {model_name!r}; known: {', '.join(known)}")
    with _staging_directory(out, force) as staging:
        step = time.perf_counter()
        say(f"building {model_name}")
        resolved = _resolve_model(model_name, checkpoint, dataset, classes_file)
        expected = _expected_nodes(resolved.model_name)
        timings["load"] = time.perf_counter() - step

        step = time.perf_counter()
        mean, std = datasets.IMAGENET_MEAN, datasets.IMAGENET_STD
        try:
            graph = export_onnx(
                resolved.model,
                mean=mean,
                std=std,
                precision=graph_precision,
                opset=opset,
                attention=form,
                expected_attention=expected,
                progress=say,
            )
        except (OnnxExportError, AttentionError) as exc:
            raise ExportError(str(exc)) from exc
        timings["export"] = time.perf_counter() - step

        model_path = staging / MODEL_FILE
        model_path.parent.mkdir()
        # An int8 bundle is verified as the fp32 graph it is quantized from, kept aside.
        graph_path = model_path if precision != "int8" else staging / ".fp32" / "model.onnx"
        graph_path.parent.mkdir(exist_ok=True)
        onnx.save(graph.model, str(graph_path))
        io = graph_io(graph.model)

        report: VerificationReport | None = None
        if not skip_verify:
            step = time.perf_counter()
            try:
                report = verify(
                    graph_path,
                    resolved.model,
                    mean=mean,
                    std=std,
                    precision=graph_precision,
                    sizes=verify_sizes,
                    progress=say,
                )
            except Exception as exc:  # onnxruntime's and torch's errors share no useful base
                raise ExportError(f"verification could not run: {exc}") from exc
            timings["verify"] = time.perf_counter() - step
            if not report.passed:
                failed = [case.describe() for case in report.cases if not case.passed]
                raise ExportError(
                    f"verification failed ({report.criterion}): " + " | ".join(failed)
                )
        quantization = None
        if precision == "int8":
            step = time.perf_counter()
            quantization = _quantize(graph_path, model_path, resolved, say)
            shutil.rmtree(graph_path.parent)
            timings["quantize"] = time.perf_counter() - step

        metadata = BundleMetadata(
            arch=resolved.arch,
            variant=resolved.model_name,
            trained=resolved.source is not None,
            source_checkpoint=resolved.source,
            dataset=resolved.dataset,
            classes=resolved.classes,
            palette=resolved.palette,
            input=InputContract(
                name=INPUT_NAME, dtype="uint8", mean=mean, std=std, normalized_in_graph=True
            ),
            output=OutputContract(name=OUTPUT_NAME, dtype="float32", stride=resolved.output_stride),
            test_config=resolved.test_config,
            precision=precision,
            quantization=quantization,
            opset=opset,
            attention=form,
            exporter_version=EXPORTER_VERSION,
        )
        write_metadata(staging, metadata)
        (staging / TRITON_CONFIG_FILE).write_text(
            triton_config(
                out.name,
                input_name=INPUT_NAME,
                input_dtype="uint8",
                output_name=OUTPUT_NAME,
                output_dtype="float32",
                num_classes=len(resolved.classes),
            ),
            encoding="utf-8",
        )
        try:
            load_bundle(staging)
        except BundleError as exc:
            raise ExportError(f"written bundle does not validate: {exc}") from exc
    files = tuple(out / name for name in (TRITON_CONFIG_FILE, MODEL_FILE, METADATA_FILE))
    return ExportReport(
        out=out,
        model_name=resolved.model_name,
        arch=resolved.arch,
        trained=resolved.source is not None,
        source_checkpoint=resolved.source.name if resolved.source else None,
        dataset=resolved.dataset,
        classes_source=resolved.classes_source,
        num_classes=len(resolved.classes),
        precision=precision,
        quantization=quantization,
        opset=opset,
        attention=form,
        census=graph.census,
        expected_attention_nodes=expected,
        input=io["input"],
        output=io["output"],
        output_stride=resolved.output_stride,
        verification=report,
        files=files,
        seconds=time.perf_counter() - started,
        timings=timings,
    )


def _quantize(
    fp32_path: Path, int8_path: Path, resolved: _ResolvedModel, say: Callable[[str], None]
) -> Quantization:
    """Quantize the verified fp32 graph into the bundle and measure its label agreement."""
    say(f"int8 quantization, calibrated on {', '.join(CALIBRATION_PHOTOS)}")
    calibration = photos(CALIBRATION_PHOTOS)
    try:
        quantize_int8(fp32_path, int8_path, calibration)
        say("int8 label agreement with fp32")
        agreement = measure_agreement(
            fp32_path,
            int8_path,
            calibration,
            trained=resolved.source is not None,
            num_classes=len(resolved.classes),
            stride=resolved.output_stride,
            work=fp32_path.parent,
        )
    except Exception as exc:  # onnxruntime's quantizer raises plain exceptions of every kind
        raise ExportError(f"int8 quantization failed: {exc}") from exc
    return Quantization(
        method=METHOD,
        calibration_photos=CALIBRATION_PHOTOS,
        label_agreement=agreement.label_agreement,
        agreement_photos=agreement.photos,
        agreement_weights=agreement.weights,  # type: ignore[arg-type]
    )


def _attention_form(attention: str | None) -> AttentionForm:
    if attention is None:
        return DEFAULT_ATTENTION
    for form in ATTENTION_FORMS:
        if attention == form:
            return form
    raise ExportError(f"--attention must be one of {', '.join(ATTENTION_FORMS)}, got {attention!r}")


def _expected_nodes(model_name: str) -> int:
    try:
        return expected_attention_nodes(model_name)
    except AttentionError as exc:
        raise ExportError(str(exc)) from exc


def _resolve_model(
    model_name: str,
    checkpoint: Path | None,
    dataset: str | None,
    classes_file: Path | None,
) -> _ResolvedModel:
    """The model, its class names and palette, and the test configuration, or ExportError."""
    if dataset is not None and classes_file is not None:
        raise ExportError("give --dataset or --classes, not both")
    if checkpoint is None and dataset is None and classes_file is None:
        dataset = DEFAULT_DATASET
    dataset_info = None
    if dataset is not None:
        try:
            dataset_info = datasets.get_dataset(dataset)
        except KeyError as exc:
            raise ExportError(str(exc.args[0])) from exc
    given = _given_classes(dataset_info, classes_file)

    source = None
    settings: dict[str, object] = {}
    if checkpoint is None:
        assert given is not None  # a dataset is always chosen above
        model = create_model(model_name, num_classes=len(given.names))
    else:
        model, source, from_checkpoint, settings = _load(
            model_name, Path(checkpoint), given is None
        )
        given = given or from_checkpoint
        if given is None:
            raise ExportError(
                f"{checkpoint} has no class names; give --dataset NAME or --classes FILE"
            )
        predicted = _positive_int(model, "num_classes")
        if len(given.names) != predicted:
            raise ExportError(
                f"{len(given.names)} class names given but {checkpoint} predicts {predicted}"
            )
    return _ResolvedModel(
        model=model.eval(),
        model_name=model_name,
        arch=_arch(model),
        output_stride=_positive_int(model, "output_stride"),
        source=source,
        dataset=dataset_info.name if dataset_info else None,
        classes_source=given.source,
        classes=given.names,
        palette=given.palette,
        test_config=_test_config(dataset_info, settings),
    )


@dataclass(frozen=True)
class _ClassList:
    names: tuple[str, ...]
    palette: tuple[tuple[int, int, int], ...]
    source: str


def _given_classes(
    dataset_info: datasets.DatasetInfo | None, classes_file: Path | None
) -> _ClassList | None:
    if dataset_info is not None:
        palette = tuple(_rgb(c) for c in dataset_info.palette)
        return _ClassList(tuple(dataset_info.classes), palette, f"dataset {dataset_info.name}")
    if classes_file is None:
        return None
    try:
        names, colours = datasets.load_class_file(Path(classes_file))
    except (OSError, ValueError) as exc:
        raise ExportError(f"cannot read class file {classes_file}: {exc}") from exc
    palette = tuple(_rgb(c) for c in colours or datasets.default_palette(len(names)))
    return _ClassList(tuple(names), palette, f"class file {classes_file}")


def _load(
    model_name: str, checkpoint: Path, read_classes: bool
) -> tuple[nn.Module, SourceCheckpoint, _ClassList | None, dict[str, object]]:
    """The checkpoint's model, its provenance, its own class names (if it has any and
    ``read_classes``: --dataset or --classes replace them, even where they disagree with the
    classifier) and the test settings of its config."""
    try:
        loaded = load_checkpoint(checkpoint, model_name=model_name, read_classes=read_classes)
    except (CheckpointError, OSError, KeyError, ValueError) as exc:
        raise ExportError(f"cannot load {checkpoint} as {model_name}: {exc}") from exc
    if loaded.model_name != model_name:
        raise ExportError(f"{checkpoint} holds {loaded.model_name}, not {model_name}")
    source = SourceCheckpoint(
        name=str(loaded.source_name), sha256=str(loaded.sha256), format=str(loaded.format)
    )
    if not loaded.classes:
        return loaded.model, source, None, loaded.test_settings
    names = tuple(loaded.classes)
    palette = tuple(_rgb(c) for c in loaded.palette or datasets.default_palette(len(names)))
    return loaded.model, source, _ClassList(names, palette, "checkpoint"), loaded.test_settings


def _arch(model: nn.Module) -> Literal["segformer", "setr"]:
    arch = getattr(model, "arch", None)
    if arch == "segformer" or arch == "setr":
        return arch
    raise ExportError(f"model declares architecture {arch!r}; bundles hold segformer or setr")


def _positive_int(model: nn.Module, attribute: str) -> int:
    value = getattr(model, attribute, None)
    if not isinstance(value, int) or value < 1:
        raise ExportError(f"model declares {attribute} {value!r}; expected a positive int")
    return value


def _test_config(
    dataset_info: datasets.DatasetInfo | None, checkpoint_settings: Mapping[str, object]
) -> TestConfig:
    """The dataset's published test settings (SegFormer's), each replaced by the checkpoint's
    own config where it has one: that is what mmseg's inference_model runs for it."""
    base = (
        NO_DATASET_TEST_CONFIG
        if dataset_info is None
        else TestConfig.model_validate(dataset_info.test_config)
    )
    if not checkpoint_settings:
        return base
    try:
        return TestConfig.model_validate({**base.model_dump(), **checkpoint_settings})
    except ValidationError as exc:
        raise ExportError(
            f"the checkpoint's config has test settings a bundle cannot hold "
            f"({dict(checkpoint_settings)}): {exc}"
        ) from exc


def _rgb(colour: Sequence[int]) -> tuple[int, int, int]:
    red, green, blue = (int(c) for c in colour)
    return red, green, blue


@contextmanager
def _staging_directory(out: Path, force: bool) -> Iterator[Path]:
    """A fresh hidden directory next to ``out``; renamed to ``out`` only if the block succeeds."""
    if out.exists() and not force:
        raise ExportError(f"{out} already exists; pass --force to replace it")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
        # mkdtemp's 0700 would become the bundle's: a server running as another user (the
        # image's uid 10001 beside an export run as yours) could not read it.
        staging.chmod(0o777 & ~_umask())
    except OSError as exc:
        raise ExportError(f"cannot write the bundle next to {out}: {exc}") from exc
    try:
        yield staging
        try:
            _replace(staging, out)
        except OSError as exc:
            raise ExportError(f"cannot move the bundle into {out}: {exc}") from exc
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _replace(staging: Path, out: Path) -> None:
    """Rename ``staging`` to ``out``, swapping out an existing ``out`` (only reached with force)."""
    if not out.exists():
        os.rename(staging, out)
        return
    retired = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
    os.rename(out, retired / out.name)
    try:
        os.rename(staging, out)
    except OSError:
        os.rename(retired / out.name, out)
        retired.rmdir()
        raise
    shutil.rmtree(retired, ignore_errors=True)
