"""The CPU's aligned twin (service/aligned.py) of a real exported SegFormer-B0: which inputs it
serves, that its logits are the graph's, and that onnxruntime keeps its decoder blocked."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from service import runtime as runtime_module
from service.aligned import aligned_twin, is_aligned, twin_mismatch
from service.bundle import Bundle
from service.config import RuntimeSettings
from service.runtime import Runtime
from service.settings import Settings

SIDE = 32


def _graph_session(path: Path | bytes, optimized: Path | None = None) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    if optimized is not None:
        options.optimized_model_filepath = str(optimized)
    source = path if isinstance(path, bytes) else str(path)
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def _pixels(height: int, width: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (1, 3, height, width), dtype=np.uint8)


def _runtime(bundle: Bundle, **settings: object) -> Runtime:
    config = Settings(providers=("cpu",), **settings)
    meta = bundle.metadata
    return Runtime(
        bundle.model_path,
        meta.input.name,
        meta.output.name,
        meta.input.dtype,
        config.engine_config().runtime,
        aligned_side=meta.aligned_side,
    )


@pytest.fixture(scope="module")
def twin(segformer_b0_bundle: Bundle) -> bytes:
    graph = aligned_twin(segformer_b0_bundle.model_path, np.dtype(np.uint8), SIDE)
    assert graph is not None
    return graph


def test_aligned_means_both_sides_multiples() -> None:
    assert is_aligned((1, 3, 512, 512), 32)
    assert is_aligned((4, 3, 64, 2048), 32)
    assert not is_aligned((1, 3, 512, 513), 32)
    assert not is_aligned((1, 3, 500, 512), 32)
    assert not is_aligned((1, 3, 512, 512), 0)


def test_the_twin_upsamples_by_constant_integer_scales(
    segformer_b0_bundle: Bundle, twin: bytes
) -> None:
    graph = onnx.load(str(segformer_b0_bundle.model_path))
    sized = [n for n in graph.graph.node if n.op_type == "Resize"]
    assert len(sized) == 3 and all(len(n.input) == 4 and n.input[3] for n in sized)
    model = onnx.load_from_string(twin)
    constants = {init.name: onnx.numpy_helper.to_array(init) for init in model.graph.initializer}
    resizes = [n for n in model.graph.node if n.op_type == "Resize"]
    assert len(resizes) == 3
    assert all(len(n.input) == 3 for n in resizes)  # no sizes input
    # B0's levels 2-4 come up to level 1's size: x2, x4, x8 at every aligned input.
    scales = sorted(constants[n.input[2]].tolist() for n in resizes)
    assert scales == [[1, 1, 2, 2], [1, 1, 4, 4], [1, 1, 8, 8]]
    # The size arithmetic that fed them is gone (onnxruntime would still run it).
    assert len(model.graph.node) < len(graph.graph.node)


@pytest.mark.parametrize(("height", "width"), [(64, 64), (96, 160), (256, 192), (512, 512)])
def test_the_twin_gives_the_graphs_logits_at_aligned_sizes(
    segformer_b0_bundle: Bundle, twin: bytes, height: int, width: int
) -> None:
    pixels = _pixels(height, width)
    expected = _graph_session(segformer_b0_bundle.model_path).run(None, {"pixels": pixels})[0]
    got = _graph_session(twin).run(None, {"pixels": pixels})[0]
    assert got.shape == expected.shape == (1, 150, height // 4, width // 4)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5 * np.abs(expected).max())


def test_the_twin_keeps_the_decoder_in_the_blocked_layout(
    segformer_b0_bundle: Bundle, twin: bytes, tmp_path: Path
) -> None:
    """What the twin is for: onnxruntime turns its Resizes into NCHWc Upsamples, and drops the
    reorders around them; the graph's Resizes stay NCHW."""

    def optimized(source: Path | bytes, name: str) -> list[onnx.NodeProto]:
        _graph_session(source, tmp_path / name)
        return list(onnx.load(str(tmp_path / name)).graph.node)

    graph_nodes = optimized(segformer_b0_bundle.model_path, "graph.onnx")
    twin_nodes = optimized(twin, "twin.onnx")
    assert sum(n.op_type == "Resize" for n in graph_nodes) == 3
    assert not any(n.op_type == "Upsample" for n in graph_nodes)
    blocked = [n for n in twin_nodes if n.op_type == "Upsample" and n.domain.endswith("nchwc")]
    assert len(blocked) == 3 and not any(n.op_type == "Resize" for n in twin_nodes)

    def reorders(nodes: list[onnx.NodeProto]) -> int:
        return sum(n.op_type in ("ReorderInput", "ReorderOutput") for n in nodes)

    assert reorders(twin_nodes) < reorders(graph_nodes)


def test_the_runtime_runs_aligned_inputs_in_the_twin(segformer_b0_bundle: Bundle) -> None:
    runtime = _runtime(segformer_b0_bundle)
    assert runtime.aligned_side == SIDE
    graph = _graph_session(segformer_b0_bundle.model_path)
    for shape, in_twin in (((1, 3, 64, 96), True), ((1, 3, 70, 96), False), ((2, 3, 96, 64), True)):
        assert (runtime._alone.pick(shape, runtime.aligned_side) is runtime._alone.twin) is in_twin
        pixels = np.concatenate([_pixels(*shape[2:], seed=s) for s in range(shape[0])])
        expected = graph.run(None, {"pixels": pixels})[0]
        for alone in (True, False):
            got = runtime.run(pixels, alone=alone)
            np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5 * np.abs(expected).max())


def test_runs_beside_others_have_twins_too(segformer_b0_bundle: Bundle) -> None:
    runtime = _runtime(segformer_b0_bundle, intra_op_threads=2, parallel_runs=2)
    beside = runtime._beside.get_nowait()
    runtime._beside.put(beside)
    assert beside.twin is not None and beside.twin is not runtime._alone.twin
    assert beside.twin.get_session_options().intra_op_num_threads == 1


def test_no_twin_for_a_model_file_over_the_size_setting(
    segformer_b0_bundle: Bundle, caplog: pytest.LogCaptureFixture
) -> None:
    """The twin doubles the CPU sessions' memory, so big model files get none: B0's 14 MB file
    is over a 13 MiB cap, under the default, and 0 means no twin at all."""
    size = segformer_b0_bundle.model_path.stat().st_size
    assert 13 << 20 < size < RuntimeSettings.aligned_twin_max_mib << 20
    for cap in (13, 0):
        with caplog.at_level(logging.INFO, logger="service.runtime"):
            runtime = _runtime(segformer_b0_bundle, aligned_twin_max_mib=cap)
        assert runtime.aligned_side == 0 and runtime._alone.twin is None
        assert f"over aligned_twin_max_mib ({cap}): no aligned twin" in caplog.text
    assert _runtime(segformer_b0_bundle, aligned_twin_max_mib=14).aligned_side == SIDE


def test_no_twin_without_an_upsampling_to_make_constant(tiny_bundle: Bundle) -> None:
    runtime = _runtime(tiny_bundle)  # the tiny graph has no Resize
    assert runtime.aligned_side == 0 and runtime._alone.twin is None


def test_only_float32_graphs_get_an_aligned_side(segformer_b0_bundle: Bundle) -> None:
    metadata = segformer_b0_bundle.metadata
    assert metadata.aligned_side == SIDE
    for precision in ("fp16", "int8"):  # their convolutions run outside the blocked layout
        assert metadata.model_copy(update={"precision": precision}).aligned_side == 0


def test_a_twin_that_does_not_match_is_not_used(
    segformer_b0_bundle: Bundle,
    twin: bytes,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A twin whose logits differ (shifted by one) fails the check at load: the runtime logs why
    and serves every input from the graph."""
    model = onnx.load_from_string(twin)
    output = model.graph.output[0].name
    last = next(node for node in model.graph.node if output in node.output)
    last.output[:] = ["unshifted"]
    one = onnx.numpy_helper.from_array(np.ones((), np.float32), "one")
    model.graph.initializer.append(one)
    model.graph.node.append(onnx.helper.make_node("Add", ["unshifted", "one"], [output]))
    wrong = model.SerializeToString()
    graph = _graph_session(segformer_b0_bundle.model_path)
    message = twin_mismatch(_graph_session(wrong), graph, "pixels", np.dtype(np.uint8), SIDE)
    assert "differ" in message
    assert twin_mismatch(_graph_session(twin), graph, "pixels", np.dtype(np.uint8), SIDE) == ""

    monkeypatch.setattr(runtime_module, "aligned_twin", lambda *args: wrong)
    with caplog.at_level(logging.WARNING, logger="service.runtime"):
        runtime = _runtime(segformer_b0_bundle)
    assert runtime.aligned_side == 0 and runtime._alone.twin is None
    assert "aligned twin not used" in caplog.text


def test_no_twin_for_weights_in_external_files(segformer_b0_bundle: Bundle, tmp_path: Path) -> None:
    """A model saved with its weights beside it (how models near protobuf's 2 GB limit are
    saved) is not copied into a twin: one serialized copy could not hold it."""
    model = onnx.load(str(segformer_b0_bundle.model_path))
    path = tmp_path / "model.onnx"
    onnx.save_model(model, str(path), save_as_external_data=True, location="weights.bin")
    assert (tmp_path / "weights.bin").stat().st_size > path.stat().st_size
    assert aligned_twin(path, np.dtype(np.uint8), SIDE) is None
