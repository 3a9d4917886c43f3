"""The onnxruntime session options a setting turns into (service/runtime.py), read back from the
session onnxruntime made."""

from __future__ import annotations

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
