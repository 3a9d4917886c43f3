"""int8 bundles: onnxruntime static quantization of the fp32 graph, and its label agreement.

The fp32 graph (verified against PyTorch first) is quantized with onnxruntime's own tools: QDQ
format, int8 weights per output channel in 7 bits (so CPUs without VNNI do not saturate), uint8
activations whose ranges are the 0.005th and 99.995th percentiles of their values on photographs
shipped with scikit-image (or the caller's):
MinMax ranges are stretched by a few outlying values, and the coarser steps cost more on every
other value than clipping those few does (docs/export.md). onnxruntime's CPU provider fuses each
DequantizeLinear -> op -> QuantizeLinear group into its integer kernel when the session is made;
ops without one (the fused ``MultiHeadAttention``, LayerNormalization, Gelu, Resize) stay in
float between a DequantizeLinear and a QuantizeLinear, and so do the MatMuls that read the
attention's output (``attention_output_matmuls``).

What an int8 bundle is worth is measured, not assumed: the share of pixels whose label (argmax of
the logits resized bilinearly to the input, as mmseg does) is the same as the fp32 graph's, on
photographs not used for calibration. Random-init weights make that figure meaningless (their
logits are near ties everywhere), so for them it is measured on a twin whose 1x1 classifier is
refitted to superpixels of the photographs (``refit_classifier``): region-like masks, as a trained
model gives, through the same quantized backbone.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import numpy_helper
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_static,
)
from PIL import Image
from skimage import data as skimage_data
from skimage import segmentation

CALIBRATION_PHOTOS = ("astronaut", "rocket", "camera", "coins")
AGREEMENT_PHOTOS = ("chelsea", "coffee")  # not calibrated on
PHOTO_SIZE = (512, 512)  # height, width: the ADE20K test scale of a square photo
INT8_TARGET_LABEL_AGREEMENT = 0.985  # reported against, not enforced: see docs/export.md
CALIBRATION_PERCENTILE = 99.99  # share of each activation's values kept inside its range
METHOD = (
    "onnxruntime static quantization, QDQ: int8 weights per output channel in 7 bits "
    f"(reduce_range), uint8 activations, percentile calibration ({CALIBRATION_PERCENTILE}); "
    "the MatMuls after attention in float"
)


@dataclass(frozen=True)
class Agreement:
    """Label agreement of an int8 graph with its fp32 source."""

    label_agreement: float
    photos: tuple[str, ...]
    weights: str  # "trained" | "refitted classifier"


def photos(names: Sequence[str], size: tuple[int, int] = PHOTO_SIZE) -> list[np.ndarray]:
    """scikit-image photographs by name as (1, 3, H, W) uint8 RGB (grey ones repeated)."""
    height, width = size
    batches = []
    for name in names:
        image = np.asarray(getattr(skimage_data, name)())
        rgb = np.repeat(image[..., None], 3, axis=2) if image.ndim == 2 else image[..., :3]
        resized = Image.fromarray(rgb).resize((width, height), Image.Resampling.BILINEAR)
        batches.append(np.asarray(resized).transpose(2, 0, 1)[None].copy())
    return batches


class _Photos(CalibrationDataReader):
    def __init__(self, input_name: str, batches: Sequence[np.ndarray]) -> None:
        self._feeds: Iterator[dict[str, np.ndarray]] = iter(
            [{input_name: batch} for batch in batches]
        )

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._feeds, None)


def quantize_int8(fp32_path: Path, int8_path: Path, calibration: Sequence[np.ndarray]) -> None:
    """Write the int8 (QDQ) version of the graph at ``fp32_path`` to ``int8_path``."""
    graph = onnx.load(str(fp32_path), load_external_data=False).graph
    # The histogram calibrator prints its progress; stdout is the exporter's report.
    with contextlib.redirect_stdout(sys.stderr):
        quantize_static(
            str(fp32_path),
            str(int8_path),
            _Photos(graph.input[0].name, calibration),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            nodes_to_exclude=attention_output_matmuls(graph),
            # 7-bit weights: on CPUs without VNNI (AVX2 only) onnxruntime multiplies uint8 by
            # int8 with pmaddubsw, whose pairwise int16 sums saturate at full-range weights
            # (label agreement 56 % on an AVX2 EPYC, 94 % with 7 bits; as fast).
            reduce_range=True,
            weight_type=QuantType.QInt8,
            activation_type=QuantType.QUInt8,
            calibrate_method=CalibrationMethod.Percentile,
            extra_options={"CalibPercentile": CALIBRATION_PERCENTILE},
        )
    model = onnx.load(str(int8_path))
    if _leave_accumulator_headroom(model):
        onnx.save(model, str(int8_path))


def attention_output_matmuls(graph: onnx.GraphProto) -> list[str]:
    """The MatMuls that read a ``MultiHeadAttention``'s output (through reshapes): they stay float.

    The attention has no integer kernel, so its output is float, and the quantizer gives such a
    MatMul int8 weights only; onnxruntime then fuses the weights' DequantizeLinear and the MatMul
    into ``MatMulNBits``, which quantizes the activations itself on every run: on the AVX2 EPYC
    the eight output projections of B0 took 6.8 ms that way against 2.1 ms as float MatMuls
    (label agreement 99.71 against 99.73 %, docs/export.md)."""
    producers = {output: node for node in graph.node for output in node.output}
    found = []
    for node in graph.node:
        if node.op_type != "MatMul":
            continue
        source = producers.get(node.input[0])
        while source is not None and source.op_type in ("Reshape", "Transpose"):
            source = producers.get(source.input[0])
        if source is not None and source.op_type == "MultiHeadAttention":
            found.append(node.name)
    return found


_INT32_MAX = np.iinfo(np.int32).max


def _leave_accumulator_headroom(model: onnx.ModelProto) -> bool:
    """Coarsen the output channels of quantized Convs whose int32 accumulator could overflow.

    A channel with tiny weights and a large bias (a class that is never predicted) gets a tiny
    weight scale, so its bias in units of input scale x weight scale is huge; onnxruntime's
    quantizer then raises the weight scale just enough for the bias to fit in int32, which
    leaves the accumulator no room for the products: the sum wraps around and that class wins
    everywhere (seen on a refitted twin, every pixel's label changed). Such a channel's scales
    are multiplied by the factor that keeps bias + any sum of products inside int32."""
    initializers = {tensor.name: tensor for tensor in model.graph.initializer}
    producers = {output: node for node in model.graph.node for output in node.output}
    changed = False
    for node in model.graph.node:
        if node.op_type != "Conv" or len(node.input) < 3:
            continue
        weight_dq, bias_dq = producers.get(node.input[1]), producers.get(node.input[2])
        if weight_dq is None or bias_dq is None or bias_dq.op_type != "DequantizeLinear":
            continue
        weight_q, weight_scale = (initializers[name] for name in weight_dq.input[:2])
        bias_q, bias_scale = (initializers[name] for name in bias_dq.input[:2])
        weights, biases = numpy_helper.to_array(weight_q), numpy_helper.to_array(bias_q)
        worst = np.abs(biases.astype(np.int64)) + 255 * np.abs(weights.astype(np.int64)).reshape(
            len(weights), -1
        ).sum(axis=1)
        factor = np.maximum(1, np.ceil(worst / _INT32_MAX)).astype(np.int64)
        if (factor == 1).all():
            continue
        if numpy_helper.to_array(weight_scale).size == 1:  # one scale for the tensor: one factor
            factor = np.full_like(factor, factor.max())
        per_weight = factor.reshape(-1, *[1] * (weights.ndim - 1))
        updates = [
            (weight_q, np.round(weights / per_weight).astype(weights.dtype)),
            (bias_q, np.round(biases / factor).astype(biases.dtype)),
        ]
        for scale in (weight_scale, bias_scale):
            values = numpy_helper.to_array(scale)
            grown = values * (factor if values.size > 1 else factor[0]).astype(values.dtype)
            updates.append((scale, grown.reshape(values.shape)))
        for tensor, value in updates:
            tensor.CopyFrom(numpy_helper.from_array(value, tensor.name))
        changed = True
    return changed


def cpu_session(model: Path | bytes) -> ort.InferenceSession:
    return ort.InferenceSession(
        model if isinstance(model, bytes) else str(model), providers=["CPUExecutionProvider"]
    )


def labels(session: ort.InferenceSession, batch: np.ndarray) -> np.ndarray:
    """(N, H, W) labels: logits resized bilinearly to the input (align_corners False), argmax."""
    (logits,) = session.run(None, {session.get_inputs()[0].name: batch})
    resized = torch.nn.functional.interpolate(
        torch.from_numpy(np.asarray(logits, np.float32)),
        size=batch.shape[2:],
        mode="bilinear",
        align_corners=False,
    )
    return resized.argmax(dim=1).numpy()


def label_agreement(fp32: Path | bytes, int8: Path | bytes, batches: Sequence[np.ndarray]) -> float:
    """Share of pixels labelled alike by the two graphs over ``batches``."""
    reference, quantized = cpu_session(fp32), cpu_session(int8)
    same = total = 0
    for batch in batches:
        expected = labels(reference, batch)
        same += int((labels(quantized, batch) == expected).sum())
        total += expected.size
    return same / total


def refit_classifier(
    model: onnx.ModelProto,
    inputs: Sequence[np.ndarray],
    targets: Sequence[np.ndarray],
    stride: int,
) -> onnx.ModelProto:
    """A copy of ``model`` whose final 1x1 classifier (the Conv making the output) is refitted
    by ridge regression on the graph's own features, so that it labels each input (1, 3, H, W)
    as its ``targets`` (H, W) class map: region-like masks from any backbone. For measurements
    only; not a model of anything."""
    refitted = onnx.ModelProto()
    refitted.CopyFrom(model)
    classifier = _classifier(refitted.graph)
    initializers = {tensor.name: tensor for tensor in refitted.graph.initializer}
    if classifier.op_type != "Conv" or classifier.input[1] not in initializers:
        raise ValueError(f"the output is made by {classifier.op_type}, not a 1x1 Conv")
    features, weight_name = classifier.input[:2]
    classes = initializers[weight_name].dims[0]
    if len(classifier.input) < 3:  # a classifier exported without bias gets one
        classifier.input.append(f"{weight_name}.refitted_bias")
    bias_name = classifier.input[2]
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    probe.graph.output.append(
        onnx.helper.make_tensor_value_info(features, onnx.TensorProto.FLOAT, None)
    )
    session = cpu_session(probe.SerializeToString())
    found = [session.run([features], {session.get_inputs()[0].name: batch})[0] for batch in inputs]
    weight, bias_values = fit_region_classifier(found, targets, classes, stride)
    weight = weight.reshape(classes, -1, 1, 1)
    initializers[weight_name].CopyFrom(numpy_helper.from_array(weight, weight_name))
    bias = numpy_helper.from_array(bias_values, bias_name)
    if bias_name in initializers:
        initializers[bias_name].CopyFrom(bias)
    else:
        refitted.graph.initializer.append(bias)
    return refitted


def fit_region_classifier(
    features: Sequence[np.ndarray], targets: Sequence[np.ndarray], classes: int, stride: int
) -> tuple[np.ndarray, np.ndarray]:
    """(classes, C) weight and (classes,) bias, float32, of a 1x1 classifier that labels each
    (1, C, h, w) feature map as its (H, W) class map at the stride's centres: ridge regression
    onto +-4 one-hot logits."""
    rows, wanted = [], []
    for found, target in zip(features, targets, strict=True):
        rows.append(found[0].reshape(found.shape[1], -1).T)
        centres = target[stride // 2 :: stride, stride // 2 :: stride]
        wanted.append(centres[: found.shape[2], : found.shape[3]].ravel())
    design = np.hstack([np.concatenate(rows), np.ones((sum(len(r) for r in rows), 1))])
    design = design.astype(np.float64)
    classes_wanted = np.concatenate(wanted)
    goal = np.full((len(classes_wanted), classes), -4.0)
    goal[np.arange(len(classes_wanted)), classes_wanted] = 4.0
    gram = design.T @ design + 1e-2 * np.eye(design.shape[1])
    solution = np.linalg.solve(gram, design.T @ goal)
    return solution[:-1].T.astype(np.float32), solution[-1].astype(np.float32)


def _classifier(graph: onnx.GraphProto) -> onnx.NodeProto:
    """The node computing the output, looking through trailing Casts and Identities."""
    producers = {output: node for node in graph.node for output in node.output}
    node = producers[graph.output[0].name]
    while node.op_type in ("Cast", "Identity"):
        node = producers[node.input[0]]
    return node


def superpixel_classes(batch: np.ndarray, classes: int, seed: int = 0) -> np.ndarray:
    """(H, W) class map of a (1, 3, H, W) photo: SLIC superpixels, one random class each."""
    regions = segmentation.slic(
        batch[0].transpose(1, 2, 0), n_segments=40, compactness=20, start_label=0
    )
    lookup = np.random.default_rng(seed).integers(0, classes, regions.max() + 1)
    return lookup[regions]


def measure_agreement(
    fp32_path: Path,
    int8_path: Path,
    calibration: Sequence[np.ndarray],
    *,
    trained: bool,
    num_classes: int,
    stride: int,
    work: Path,
) -> Agreement:
    """The int8 graph's label agreement with ``fp32_path`` on the agreement photographs; for
    untrained weights, that of the same quantization applied to a region-like twin."""
    batches = photos(AGREEMENT_PHOTOS)
    if trained:
        agreement = label_agreement(fp32_path, int8_path, batches)
        return Agreement(agreement, AGREEMENT_PHOTOS, "trained")
    model = onnx.load(str(fp32_path))
    fit_inputs = [*calibration, *batches]
    targets = [superpixel_classes(b, num_classes, seed) for seed, b in enumerate(fit_inputs)]
    twin_fp32, twin_int8 = work / "refitted-fp32.onnx", work / "refitted-int8.onnx"
    onnx.save(refit_classifier(model, fit_inputs, targets, stride), str(twin_fp32))
    quantize_int8(twin_fp32, twin_int8, calibration)
    agreement = label_agreement(twin_fp32, twin_int8, batches)
    return Agreement(agreement, AGREEMENT_PHOTOS, "refitted classifier")
