"""``export_onnx`` + ``verify`` on a toy segmenter: the fp16 standard-Attention path, quickly.

The toy has SegFormer's shape of computation (strided conv stem, spatial-reduction attention,
BatchNorm, 1x1 classifier at stride 4). The full models in tests/test_export.py cover fp32 with
both attention forms and fp16 with the contrib form; this covers the remaining pair (fp16 with the
standard ``Attention`` node and its float32 softmax request) and the verifier's own failure modes.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from export.bundle_writer import _staging_directory
from export.onnx_export import OnnxExportError, export_onnx
from export.verify import FP32_NOISE_MULTIPLE, compare, photo_batch, verify
from tests.integration.test_export_attention import ReductionAttention

MEAN = (123.675, 116.28, 103.53)
STD = (58.395, 57.12, 57.375)
SIZES = ((32, 32), (24, 40))


class ToySegmenter(nn.Module):
    """pixels -> stride-4 stem -> BN -> two attention blocks -> 5-class logits at stride 4."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 32, 7, stride=4, padding=3)
        self.norm = nn.BatchNorm2d(32)
        self.blocks = nn.ModuleList([ReductionAttention(reduction=2) for _ in range(2)])
        self.classifier = nn.Conv2d(32, 5, 1)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        features = self.norm(self.stem(pixels))
        for block in self.blocks:
            features = features + block(features)
        return self.classifier(features)


@pytest.fixture(scope="module")
def toy() -> nn.Module:
    torch.manual_seed(3)
    model = ToySegmenter()
    with torch.no_grad():  # non-trivial BatchNorm statistics, so folding is really checked
        model.norm.running_mean.uniform_(-0.5, 0.5)
        model.norm.running_var.uniform_(0.5, 2.0)
    return model.eval()


@pytest.mark.parametrize(("attention", "precision"), [("onnx", "fp16")])
def test_export_and_verify(toy: nn.Module, tmp_path: Path, attention: str, precision: str) -> None:
    graph = export_onnx(
        toy,
        mean=MEAN,
        std=STD,
        precision=precision,  # type: ignore[arg-type]
        opset=23,
        attention=attention,  # type: ignore[arg-type]
        expected_attention=2,
        progress=lambda _: None,
    )
    ops = [node.op_type for node in graph.model.graph.node]
    assert "BatchNormalization" not in ops and "Softmax" not in ops
    fused = "Attention" if attention == "onnx" else "MultiHeadAttention"
    assert ops.count(fused) == 2
    if precision == "fp16" and attention == "onnx":
        softmax_precisions = [
            onnx.helper.get_attribute_value(a)
            for n in graph.model.graph.node
            if n.op_type == "Attention"
            for a in n.attribute
            if a.name == "softmax_precision"
        ]
        assert softmax_precisions == [onnx.TensorProto.FLOAT] * 2
    path = tmp_path / "model.onnx"
    onnx.save(graph.model, str(path))
    report = verify(path, toy, mean=MEAN, std=STD, precision=precision, sizes=SIZES)
    assert report.passed, [case.describe() for case in report.cases]
    assert len(report.cases) == 4
    for case in report.cases:
        assert case.logit_scale > 0.1
        if precision == "fp32":
            assert case.max_abs_diff <= FP32_NOISE_MULTIPLE * case.float32_diff
        else:  # fp16 is close but measurably not exact
            assert 0 < case.max_abs_diff <= 0.02 * case.logit_scale


def test_old_opset_is_refused(toy: nn.Module) -> None:
    with pytest.raises(OnnxExportError, match="opset 18 has no fused Attention"):
        export_onnx(
            toy,
            mean=MEAN,
            std=STD,
            precision="fp32",
            opset=18,
            attention="onnx",
            expected_attention=2,
            progress=lambda _: None,
        )


def test_compare_measures_against_float32_noise() -> None:
    """The fp32 tolerance is FP32_NOISE_MULTIPLE times float32's own error against float64."""
    rng = np.random.default_rng(0)
    float64 = rng.standard_normal((2, 5, 8, 8))
    noise = 1e-4 * rng.choice([-1.0, 1.0], float64.shape)  # float32's error: 1e-4 everywhere
    float32 = (float64 + noise).astype(np.float32)
    case = compare("random", (2, 3, 32, 32), float64 + 3.9 * noise, float32, float64, "fp32")
    assert case.passed and round(case.noise_ratio, 1) == 3.9
    assert abs(case.float32_diff - 1e-4) < 1e-6  # plus the float32 rounding of float64
    assert "torch-fp32 0.0001 (ratio 3.90" in case.describe()
    too_far = compare("random", (2, 3, 32, 32), float64 + 4.2 * noise, float32, float64, "fp32")
    assert not too_far.passed and "FAILED" in too_far.describe()
    # a model float32 computes exactly still tolerates a rounding of the ONNX output
    exact = compare("random", (2, 3, 32, 32), float64.astype(np.float32), float64, float64, "fp32")
    assert exact.float32_diff == 0 and exact.passed
    flipped = float64.copy()
    flipped[:, :, :, :1] = -flipped[:, :, :, :1]  # changes the argmax of many pixels
    assert not compare("random", (2, 3, 32, 32), flipped, float64, float64, "fp16").passed
    few_flipped = float64.copy()
    few_flipped[0, :, 0, 0] = -few_flipped[0, :, 0, 0]  # 1 pixel of 128: 99.2 % agreement
    assert not compare("random", (2, 3, 32, 32), few_flipped, float32, float64, "fp32").passed
    assert not compare("random", (2, 3, 32, 32), float64 * np.nan, float32, float64, "fp32").passed


def test_photo_batch_is_two_real_photographs() -> None:
    batch = photo_batch(48, 80)
    assert batch.shape == (2, 3, 48, 80) and batch.dtype == np.uint8
    assert not np.array_equal(batch[0], batch[1])
    assert batch.std() > 30  # real image content, not a constant


def test_a_bundle_directory_is_as_readable_as_the_umask_allows(tmp_path: Path) -> None:
    """The bundle is written in a staging directory made by mkdtemp (mode 0700) and renamed:
    a server running as another user than the exporter (compose's export run as you, serving as
    uid 10001) could not read it (deploy probe). It now gets what mkdir gives under the umask."""
    previous = os.umask(0o022)
    try:
        with _staging_directory(tmp_path / "bundle", force=False) as staging:
            (staging / "segserve.json").write_text("{}")
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "bundle").stat().st_mode) == 0o755
