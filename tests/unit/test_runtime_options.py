"""The onnxruntime session options a setting turns into (service/runtime.py), read back from the
session onnxruntime made."""

from __future__ import annotations

import numpy as np
import pytest

from service.bundle import Bundle
from service.runtime import Runtime
from service.settings import Settings


@pytest.mark.parametrize(("variable", "spinning"), [(None, "0"), ("0", "0"), ("1", "1")])
def test_spinning_is_opt_in_and_stops_when_a_run_ends(
    tiny_bundle: Bundle, monkeypatch: pytest.MonkeyPatch, variable: str | None, spinning: str
) -> None:
    if variable is not None:
        monkeypatch.setenv("SEGSERVE_INTRA_OP_SPINNING", variable)
    settings = Settings(providers=("cpu",)).engine_config().runtime
    meta = tiny_bundle.metadata
    runtime = Runtime(
        tiny_bundle.model_path, meta.input.name, meta.output.name, meta.input.dtype, settings
    )
    options = runtime._session.get_session_options()
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == spinning
    assert options.get_session_config_entry("session.force_spinning_stop") == "1"


@pytest.mark.parametrize(
    ("threads", "parallel_runs", "runs", "share", "sessions"),
    [
        (2, 2, 2, 1, 1),  # one single-thread session serves both runs beside
        (4, 2, 2, 2, 2),  # a session each: runs at once in one session contend for its pool
        (6, 3, 3, 2, 3),
        (1, 2, 1, 0, 0),  # one thread: every run alone
        (4, 1, 1, 0, 0),
    ],
)
def test_runs_beside_others_get_an_equal_share_of_the_threads(
    tiny_bundle: Bundle, threads: int, parallel_runs: int, runs: int, share: int, sessions: int
) -> None:
    settings = (
        Settings(providers=("cpu",), intra_op_threads=threads, parallel_runs=parallel_runs)
        .engine_config()
        .runtime
    )
    meta = tiny_bundle.metadata
    runtime = Runtime(
        tiny_bundle.model_path, meta.input.name, meta.output.name, meta.input.dtype, settings
    )
    assert runtime.parallel_runs == runs
    assert runtime._session.get_session_options().intra_op_num_threads == threads
    beside = [runtime._beside.get_nowait() for _ in range(runtime._beside.qsize())]
    for session in beside:
        runtime._beside.put(session)
    assert len(beside) == (runs if runs > 1 else 0)
    assert len({id(pair.graph) for pair in beside}) == sessions
    assert {p.graph.get_session_options().intra_op_num_threads for p in beside} == ({share} - {0})
    pixels = np.random.default_rng(0).integers(0, 256, (1, 3, 64, 96), dtype=np.uint8)
    np.testing.assert_array_equal(runtime.run(pixels, alone=False), runtime.run(pixels))
