"""Numerical proof that the ONNX graph computes what the PyTorch model computes.

The reference is the PyTorch model run in float64 on pixels normalised here in NumPy, so the
check covers the in-graph normalisation, the precision cast and every graph rewrite. Each case is
a batch of two: random bytes, and two real photographs shipped with scikit-image, resized to the
case's size.

A fixed tolerance cannot serve every model: float32 itself is about 1e-4 of the logits' scale
away from float64 on a random-init mmseg SegFormer-B0, and far closer on a small head. So the
tolerance is measured per case: the same PyTorch model in float32 gives the noise float32
arithmetic makes, and an fp32 bundle may be at most ``FP32_NOISE_MULTIPLE`` times as far from
float64 as that, and must pick the float64 class at ``FP32_MIN_ARGMAX_AGREEMENT`` of the pixels.
fp16 bundles must pick the same class at ``FP16_MIN_ARGMAX_AGREEMENT`` of the pixels.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from PIL import Image
from skimage import data as skimage_data
from torch import nn

FP32_NOISE_MULTIPLE = 4.0
FP32_MIN_ARGMAX_AGREEMENT = 0.999
FP16_MIN_ARGMAX_AGREEMENT = 0.995
DEFAULT_SIZES: tuple[tuple[int, int], ...] = ((512, 512), (384, 640))
BATCH = 2


@dataclass(frozen=True)
class CaseResult:
    """One verification case: its input, the figures and whether they pass."""

    inputs: str  # "random" | "photos"
    shape: tuple[int, int, int, int]
    max_abs_diff: float  # ONNX vs the float64 reference
    float32_diff: float  # PyTorch float32 vs the float64 reference: the arithmetic's own noise
    logit_scale: float
    argmax_agreement: float  # ONNX vs the float64 reference
    passed: bool

    @property
    def relative_diff(self) -> float:
        return self.max_abs_diff / self.logit_scale

    @property
    def noise_ratio(self) -> float:
        """ONNX error over float32's own (floored at one float32 ulp of the logits' scale)."""
        return self.max_abs_diff / _noise_floor(self.float32_diff, self.logit_scale)

    def describe(self) -> str:
        verdict = "ok" if self.passed else "FAILED"
        shape = "x".join(map(str, self.shape))
        return (
            f"{self.inputs:<6} {shape:<14} max|Δ| onnx {self.max_abs_diff:.3g}, "
            f"torch-fp32 {self.float32_diff:.3g} (ratio {self.noise_ratio:.2f}; "
            f"scale {self.logit_scale:.3g}, rel {self.relative_diff:.2e}) "
            f"argmax agree {self.argmax_agreement:.4%}  {verdict}"
        )


def _noise_floor(float32_diff: float, logit_scale: float) -> float:
    return max(float32_diff, float(np.finfo(np.float32).eps) * logit_scale)


@dataclass(frozen=True)
class VerificationReport:
    precision: str
    criterion: str
    cases: tuple[CaseResult, ...]

    @property
    def passed(self) -> bool:
        return all(case.passed for case in self.cases)


def photo_batch(height: int, width: int) -> np.ndarray:
    """Two scikit-image photographs (astronaut, chelsea) as uint8 NCHW at (height, width)."""
    photos = (skimage_data.astronaut(), skimage_data.chelsea())
    resized = [
        np.asarray(Image.fromarray(p).resize((width, height), Image.Resampling.BILINEAR))
        for p in photos
    ]
    return np.stack(resized).transpose(0, 3, 1, 2).copy()


def random_batch(height: int, width: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (BATCH, 3, height, width), dtype=np.uint8)


def reference_logits(
    model: nn.Module,
    pixels: np.ndarray,
    mean: Sequence[float],
    std: Sequence[float],
) -> tuple[np.ndarray, np.ndarray]:
    """The PyTorch model in float32 and in float64 on pixels normalised outside any graph.

    The model is cast to float64 and back in place: float32 -> float64 -> float32 is exact."""
    mean_array = np.asarray(mean, dtype=np.float64).reshape(1, 3, 1, 1)
    std_array = np.asarray(std, dtype=np.float64).reshape(1, 3, 1, 1)
    normalised = (pixels.astype(np.float64) - mean_array) / std_array
    model.eval()
    with torch.no_grad():
        float32 = model(torch.from_numpy(normalised.astype(np.float32))).numpy()
        try:
            float64 = model.double()(torch.from_numpy(normalised)).numpy()
        finally:
            model.float()
    return float32, float64


def verify(
    onnx_path: Path,
    model: nn.Module,
    *,
    mean: Sequence[float],
    std: Sequence[float],
    precision: str,
    sizes: Sequence[tuple[int, int]] = DEFAULT_SIZES,
    progress: Callable[[str], None] = lambda _: None,
) -> VerificationReport:
    """Run every case through onnxruntime (CPU) and PyTorch and compare the logits."""
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    input_name = session.get_inputs()[0].name
    cases = []
    for index, (height, width) in enumerate(sizes):
        for kind in ("random", "photos"):
            pixels = (
                random_batch(height, width, index)
                if kind == "random"
                else photo_batch(height, width)
            )
            progress(f"verifying {kind} batch {'x'.join(map(str, pixels.shape))}")
            float32, float64 = reference_logits(model, pixels, mean, std)
            (actual,) = session.run(None, {input_name: pixels})
            cases.append(
                compare(kind, pixels.shape, np.asarray(actual), float32, float64, precision)
            )
    criterion = (
        f"against PyTorch float64: max|Δ| ≤ {FP32_NOISE_MULTIPLE:g} × PyTorch float32's own, "
        f"argmax agreement ≥ {FP32_MIN_ARGMAX_AGREEMENT:.1%}"
        if precision == "fp32"
        else f"argmax agreement with PyTorch float64 ≥ {FP16_MIN_ARGMAX_AGREEMENT:.1%}"
    )
    return VerificationReport(precision=precision, criterion=criterion, cases=tuple(cases))


def compare(
    inputs: str,
    shape: tuple[int, ...],
    actual: np.ndarray,
    float32: np.ndarray,
    float64: np.ndarray,
    precision: str,
) -> CaseResult:
    """ONNX logits against the float64 reference, float32's own error setting the tolerance."""
    if not actual.shape == float32.shape == float64.shape:
        raise ValueError(f"ONNX logits {actual.shape} but PyTorch logits {float64.shape}")
    actual = actual.astype(np.float64)
    max_abs_diff = float(np.abs(actual - float64).max())
    float32_diff = float(np.abs(float32.astype(np.float64) - float64).max())
    logit_scale = max(float(np.abs(float64).max()), float(np.finfo(np.float32).tiny))
    agreement = float((actual.argmax(axis=1) == float64.argmax(axis=1)).mean())
    if precision == "fp32":
        passed = (
            max_abs_diff <= FP32_NOISE_MULTIPLE * _noise_floor(float32_diff, logit_scale)
            and agreement >= FP32_MIN_ARGMAX_AGREEMENT
        )
    else:
        passed = agreement >= FP16_MIN_ARGMAX_AGREEMENT
    batch, channels, height, width = shape
    return CaseResult(
        inputs=inputs,
        shape=(batch, channels, height, width),
        max_abs_diff=max_abs_diff,
        float32_diff=float32_diff,
        logit_scale=logit_scale,
        argmax_agreement=agreement,
        passed=bool(passed and np.isfinite(actual).all()),
    )
