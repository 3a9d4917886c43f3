"""Checkpoints written by mmsegmentation 1.2.2 / mmengine 0.10.7 themselves, exported through
``python -m export`` and served by the engine, against mmseg's own inference.

tests/mmseg_oracle.py runs in .venv-mmseg (scripts/setup_mmseg_env.sh): it builds SegFormer-B0
and SETR-PUP (ViT-B) from mmseg's configs, saves them with mmengine's checkpoint code (with and
without training state) and runs mmseg's whole, slide and multi-scale + flip inference on real
photographs; it also writes the key layouts mmseg builds from the published SegFormer B1-B5 and
SETR ViT-L configs, and checks the ViT options SETR's configs leave at their defaults. About 4.5
minutes on 2 shared cores, most of it building and exporting SETR.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import onnxruntime as ort
import pytest
import torch

from models.checkpoints import detect_format, load_checkpoint, read_checkpoint, segformer_keys
from models.checkpoints.setr_keys import load_mmseg_setr
from models.datasets import IMAGENET_MEAN, IMAGENET_STD
from models.segformer import SegFormer
from models.setr import SETR
from service.bundle import Bundle, TestConfig, load_bundle
from service.config import EngineConfig, RuntimeSettings
from service.engine import Engine
from service.planning import SegmentOptions
from tests.mmseg_oracle import (
    CASES,
    LAYOUT_CONFIGS,
    OPTIONS_MODEL,
    OPTIONS_PHOTO,
    Case,
    thin_photo_name,
)

ROOT = Path(__file__).resolve().parents[2]
MMSEG_PYTHON = ROOT / ".venv-mmseg" / "bin" / "python"
MIN_AGREEMENT = {"whole": 0.999, "slide": 0.999, "tta": 0.998}
CASE_BY_NAME = {case.model_name: case for case in CASES}


@pytest.fixture(scope="module")
def oracle(tmp_path_factory: pytest.TempPathFactory, photos: dict[str, np.ndarray]) -> Path:
    if not MMSEG_PYTHON.exists():
        if os.environ.get("CI"):
            pytest.fail("no .venv-mmseg: scripts/test.sh builds it (scripts/setup_mmseg_env.sh)")
        pytest.skip("no .venv-mmseg; run scripts/setup_mmseg_env.sh")
    root = tmp_path_factory.mktemp("mmseg")
    photo_dir = root / "photos"
    photo_dir.mkdir()
    for case in CASES:
        height, width = case.photo_size
        for name in case.photos:
            sized = cv2.resize(photos[name], (width, height), interpolation=cv2.INTER_AREA)
            np.save(photo_dir / f"{name}_{case.model_name}.npy", sized)
        for thin_height, thin_width in case.thin_sizes:
            thin = cv2.resize(
                photos[case.photos[0]], (thin_width, thin_height), interpolation=cv2.INTER_AREA
            )
            np.save(photo_dir / f"{thin_photo_name(case, thin_height, thin_width)}.npy", thin)
    done = subprocess.run(
        [str(MMSEG_PYTHON), str(ROOT / "tests" / "mmseg_oracle.py"), str(root / "out"), photo_dir],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    assert done.returncode == 0, done.stderr[-5000:]
    return root


def _photo(oracle: Path, case: Case, name: str) -> np.ndarray:
    return np.load(oracle / "photos" / f"{name}_{case.model_name}.npy")


def _expected(oracle: Path, case: Case, name: str, what: str) -> np.ndarray:
    return np.load(oracle / "out" / case.model_name / f"{name}_{what}.npy")


@pytest.fixture(scope="module")
def bundles(oracle: Path) -> dict[str, tuple[Bundle, str]]:
    """Each training checkpoint through the command line, as a user would run it."""
    exported = {}
    for case in CASES:
        out = oracle / "bundles" / case.model_name
        command = [sys.executable, "-m", "export", "--model", case.model_name]
        command += ["--checkpoint", str(oracle / "out" / case.model_name / "training.pth")]
        command += ["--out", str(out), "--verify-size", "64x96"]
        done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        exported[case.model_name] = (load_bundle(out), done.stdout)
    return exported


@pytest.mark.parametrize("name", list(CASE_BY_NAME))
def test_training_state_is_read_never_run(oracle: Path, name: str) -> None:
    """Both files hold the same weights; the training one also optimizer and message hub."""
    directory = oracle / "out" / name
    _, meta = read_checkpoint(directory / "training.pth")
    assert meta["dataset_meta"]["classes"][:2] == ("wall", "building")
    with_state = load_checkpoint(directory / "training.pth", model_name=name)
    without = load_checkpoint(directory / "weights.pth", model_name=name)
    assert (with_state.format, without.format) == ((fmt := _format(name)), fmt)
    assert with_state.classes is not None and len(with_state.classes) == 150
    assert with_state.palette is not None and with_state.palette[0] == (120, 120, 120)
    for (key, ours), theirs in zip(
        with_state.model.state_dict().items(), without.model.state_dict().values(), strict=True
    ):
        assert torch.equal(ours, theirs), key


def _format(name: str) -> str:
    return "mmseg-setr" if name.startswith("setr") else "mmseg"


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("segformer-b0", TestConfig(mode="whole", resize_scale=(2048, 512))),
        (
            "setr-pup-base",
            TestConfig(mode="slide", resize_scale=(2048, 512), crop=(512, 512), stride=(341, 341)),
        ),
    ],
)
def test_bundles_take_the_test_settings_of_the_checkpoint_config(
    bundles: dict[str, tuple[Bundle, str]], name: str, expected: TestConfig
) -> None:
    """Exported without --dataset, a bundle's defaults are what mmseg's inference_model runs
    for the checkpoint: its config's model.test_cfg and test pipeline Resize. SETR's ADE20K
    configs slide 512 / 341 where the dataset table (SegFormer's) runs whole; a default request
    agreed with mmseg on 74-91 % of the labels (SETR probe)."""
    assert bundles[name][0].metadata.test_config == expected


@pytest.mark.parametrize("name", list(CASE_BY_NAME))
def test_export_report_and_logits(
    oracle: Path, bundles: dict[str, tuple[Bundle, str]], name: str
) -> None:
    case = CASE_BY_NAME[name]
    bundle, report = bundles[name]
    print(f"\n{name} export verification:\n" + "\n".join(re.findall(r".*torch-fp32.*", report)))
    assert "against PyTorch float64" in report and "FAILED" not in report
    assert bundle.metadata.classes[:2] == ("wall", "building")
    session = ort.InferenceSession(str(bundle.model_path), providers=["CPUExecutionProvider"])
    for photo in case.photos:
        pixels = _photo(oracle, case, photo).transpose(2, 0, 1)[None].copy()
        (actual,) = session.run(None, {bundle.metadata.input.name: pixels})
        expected = _expected(oracle, case, photo, "logits")
        assert actual.shape == expected.shape
        relative = np.abs(actual - expected).max() / np.abs(expected).max()
        print(f"{name} {photo} logits: max|Δ|/max|logit| {relative:.2e}")
        assert relative <= 1e-5  # float32 noise: about 1e-6 measured


@pytest.mark.parametrize("mode", ["whole", "slide", "tta"])
@pytest.mark.parametrize("name", list(CASE_BY_NAME))
def test_labels_match_mmseg(
    oracle: Path, bundles: dict[str, tuple[Bundle, str]], name: str, mode: str
) -> None:
    case = CASE_BY_NAME[name]
    bundle, _ = bundles[name]
    # The oracle runs the photos at their own size (no Resize): scale 1 of the photo, where the
    # bundle's default is its config's test Resize.
    options = {
        "whole": SegmentOptions(mode="whole", scales=(1.0,)),
        "slide": SegmentOptions(mode="slide", crop=case.crop, stride=case.stride, scales=(1.0,)),
        "tta": SegmentOptions(mode="whole", scales=case.tta_scales, flip=True),
    }[mode]
    engine = Engine(bundle, EngineConfig(runtime=RuntimeSettings(providers=("cpu",))))
    engine.start()
    try:
        for photo in case.photos:
            image = _photo(oracle, case, photo)
            result = asyncio.run(engine.segment(image, options))
            expected = _expected(oracle, case, photo, mode)
            agreement = float((result.labels == expected).mean())
            print(f"{name} {mode} {photo}: {agreement:.4%} of pixels agree with mmseg")
            assert len(np.unique(expected)) >= 3
            assert agreement >= MIN_AGREEMENT[mode]
    finally:
        engine.stop()


@pytest.mark.parametrize("name", [case.model_name for case in CASES if case.thin_sizes])
def test_thin_inputs_run_unpadded_as_mmseg_runs_them(
    oracle: Path, bundles: dict[str, tuple[Bundle, str]], name: str
) -> None:
    """Sides from the graph's minimum (29 px for SegFormer) up to 31, and SETR's under one patch:
    mmseg runs them as they are. Padding SegFormer's to 32 had changed 2-16 % of the labels,
    padding SETR's to 16 px (and cropping the logits) 12-33 %."""
    case = CASE_BY_NAME[name]
    bundle, _ = bundles[name]
    engine = Engine(bundle, EngineConfig(runtime=RuntimeSettings(providers=("cpu",))))
    engine.start()
    try:
        for height, width in case.thin_sizes:
            image = np.load(oracle / "photos" / f"{thin_photo_name(case, height, width)}.npy")
            whole = SegmentOptions(mode="whole", scales=(1.0,))  # the oracle does not resize
            result = asyncio.run(engine.segment(image, whole))
            expected = np.load(oracle / "out" / name / f"thin_{height}x{width}_whole.npy")
            agreement = float((result.labels == expected).mean())
            print(f"{name} whole {height}x{width}: {agreement:.4%} of pixels agree with mmseg")
            assert len(np.unique(expected)) >= 2
            assert agreement >= MIN_AGREEMENT["whole"]
    finally:
        engine.stop()


@pytest.mark.parametrize("config", list(LAYOUT_CONFIGS))
def test_published_layouts_load_exactly(oracle: Path, config: str) -> None:
    """SegFormer B1-B5 and SETR Naive/PUP/MLA (ViT-L) as mmseg builds them from its configs,
    auxiliary heads included: recognised, named and filled key for key, shape for shape."""
    layout = json.loads((oracle / "out" / "layouts" / f"{Path(config).stem}.json").read_text())
    state = {key: torch.empty(shape) for key, shape in layout["shapes"].items()}
    meta = {"cfg": layout["cfg"]}
    fmt = detect_format(state, meta)
    model: SETR | SegFormer = (
        load_mmseg_setr(state, meta)
        if fmt == "mmseg-setr"
        else segformer_keys.load(state, meta, fmt, None, config)
    )
    assert model.variant == LAYOUT_CONFIGS[config]
    assert model.num_classes == 150


def test_setr_options_read_from_the_checkpoint(oracle: Path) -> None:
    """Patch bias and norm, pre- and final norm, no qkv bias, LN eps 1e-5 and bicubic position
    embeddings, as mmseg builds them: read from keys and config text, logits as mmseg's."""
    loaded = load_checkpoint(oracle / "out" / "options" / "weights.pth", model_name=OPTIONS_MODEL)
    model = loaded.model
    assert isinstance(model, SETR)
    spec = model.spec
    assert (spec.patch_bias, spec.patch_norm, spec.pre_norm, spec.final_norm) == (True,) * 4
    assert (spec.qkv_bias, spec.norm_eps, spec.interpolate_mode) == (False, 1e-5, "bicubic")
    assert spec.pos_grid == (4, 4)
    photo = np.load(oracle / "photos" / f"{OPTIONS_PHOTO}.npy").astype(np.float64)
    pixels = ((photo - IMAGENET_MEAN) / IMAGENET_STD).transpose(2, 0, 1)[None]
    with torch.no_grad():
        actual = model(torch.from_numpy(pixels.astype(np.float32))).numpy()
    expected = np.load(oracle / "out" / "options" / "logits.npy")
    relative = np.abs(actual - expected).max() / np.abs(expected).max()
    print(f"SETR options logits: max|Δ|/max|logit| {relative:.2e}")
    assert relative <= 1e-5
