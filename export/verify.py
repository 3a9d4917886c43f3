"""Numerical proof that the ONNX graph computes what the PyTorch model computes.

The reference is the float32 PyTorch model fed pixels normalised here in NumPy (float64 maths),
so the check covers the in-graph normalisation, the precision cast and every graph rewrite. Each
case is a batch of two: random bytes, and two real photographs shipped with scikit-image, resized
to the case's size. fp32 bundles must match within ``FP32_RELATIVE_TOLERANCE`` of the logits'
scale (their largest magnitude); fp16 bundles must pick the same class at
``FP16_MIN_ARGMAX_AGREEMENT`` of the pixels.
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

FP32_RELATIVE_TOLERANCE = 1e-4
FP16_MIN_ARGMAX_AGREEMENT = 0.995
DEFAULT_SIZES: tuple[tuple[int, int], ...] = ((512, 512), (384, 640))
BATCH = 2


@dataclass(frozen=True)
class CaseResult:
    """One verification case: its input, the figures and whether they pass."""

    inputs: str  # "random" | "photos"
    shape: tuple[int, int, int, int]
    max_abs_diff: float
    logit_scale: float
    argmax_agreement: float
    passed: bool

    @property
    def relative_diff(self) -> float:
        return self.max_abs_diff / self.logit_scale

    def describe(self) -> str:
        verdict = "ok" if self.passed else "FAILED"
        shape = "x".join(map(str, self.shape))
        return (
            f"{self.inputs:<6} {shape:<14} max|Δ| {self.max_abs_diff:.3g} "
            f"(scale {self.logit_scale:.3g}, rel {self.relative_diff:.2e}) "
            f"argmax agree {self.argmax_agreement:.4%}  {verdict}"
        )


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
) -> np.ndarray:
    """The float32 PyTorch model on pixels normalised outside any graph."""
    mean_array = np.asarray(mean, dtype=np.float64).reshape(1, 3, 1, 1)
    std_array = np.asarray(std, dtype=np.float64).reshape(1, 3, 1, 1)
    normalised = ((pixels.astype(np.float64) - mean_array) / std_array).astype(np.float32)
    with torch.no_grad():
        return model.eval()(torch.from_numpy(normalised)).numpy()


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
            expected = reference_logits(model, pixels, mean, std)
            (actual,) = session.run(None, {input_name: pixels})
            cases.append(compare(kind, pixels.shape, np.asarray(actual), expected, precision))
    criterion = (
        f"max|Δ| ≤ {FP32_RELATIVE_TOLERANCE:g} × max|logit|"
        if precision == "fp32"
        else f"argmax agreement ≥ {FP16_MIN_ARGMAX_AGREEMENT:.1%}"
    )
    return VerificationReport(precision=precision, criterion=criterion, cases=tuple(cases))


def compare(
    inputs: str,
    shape: tuple[int, ...],
    actual: np.ndarray,
    expected: np.ndarray,
    precision: str,
) -> CaseResult:
    if actual.shape != expected.shape:
        raise ValueError(f"ONNX logits {actual.shape} but PyTorch logits {expected.shape}")
    actual = actual.astype(np.float32)
    max_abs_diff = float(np.abs(actual - expected).max())
    logit_scale = max(float(np.abs(expected).max()), float(np.finfo(np.float32).tiny))
    agreement = float((actual.argmax(axis=1) == expected.argmax(axis=1)).mean())
    if precision == "fp32":
        passed = max_abs_diff <= FP32_RELATIVE_TOLERANCE * logit_scale
    else:
        passed = agreement >= FP16_MIN_ARGMAX_AGREEMENT
    batch, channels, height, width = shape
    return CaseResult(
        inputs=inputs,
        shape=(batch, channels, height, width),
        max_abs_diff=max_abs_diff,
        logit_scale=logit_scale,
        argmax_agreement=agreement,
        passed=bool(passed and np.isfinite(actual).all()),
    )
