"""Readers for the deployment files, shared by the deploy tests: the Dockerfile's stages, the
compose files as Compose merges them, and the metric names segserve exports."""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from prometheus_client import Counter, Gauge, Histogram

from service import metrics

REPO_ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = REPO_ROOT / "Dockerfile"
COMPOSE = REPO_ROOT / "docker-compose.yml"
COMPOSE_CPU = REPO_ROOT / "docker-compose.cpu.yml"
COMPOSE_SCHEMA = REPO_ROOT / "deploy" / "schemas" / "compose-spec.json"
PROMETHEUS_CONFIG = REPO_ROOT / "deploy" / "prometheus" / "prometheus.yml"
DASHBOARD = REPO_ROOT / "deploy" / "grafana" / "dashboards" / "segserve.json"
KUBERNETES = REPO_ROOT / "deploy" / "kubernetes"


@dataclass
class Stage:
    name: str
    base: str
    instructions: list[tuple[str, str]] = field(default_factory=list)


def dockerfile_stages(path: Path = DOCKERFILE) -> dict[str, Stage]:
    """Stages by name (in file order), each with its instructions, continuation lines joined."""
    text = re.sub(r"\\\n", " ", path.read_text())
    stages: dict[str, Stage] = {}
    current: Stage | None = None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        keyword, _, rest = line.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            words = rest.split()
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else f"#{len(stages)}"
            current = stages[name] = Stage(name, words[0])
        elif current is not None:
            current.instructions.append((keyword, rest.strip()))
    return stages


def stage_chain(stages: dict[str, Stage], name: str) -> list[Stage]:
    """The stage and the stages it is built FROM inside this file, base first."""
    chain = []
    stage: Stage | None = stages[name]
    while stage is not None:
        chain.insert(0, stage)
        stage = stages.get(stage.base)
    return chain


def stage_instructions(stages: dict[str, Stage], name: str, keyword: str) -> list[str]:
    return [rest for s in stage_chain(stages, name) for k, rest in s.instructions if k == keyword]


def exec_form(argument: str) -> list[str]:
    """A CMD/ENTRYPOINT/HEALTHCHECK CMD argument as the argv Docker runs (exec form only)."""
    parsed = json.loads(argument)
    assert isinstance(parsed, list) and all(isinstance(p, str) for p in parsed), argument
    return parsed


def stage_env(stages: dict[str, Stage], name: str) -> dict[str, str]:
    """ENV of a stage including its in-file bases (``KEY=VALUE`` forms, ``$PATH`` expanded)."""
    env: dict[str, str] = {"PATH": "/usr/local/bin:/usr/bin:/bin"}
    for rest in stage_instructions(stages, name, "ENV"):
        for pair in shlex.split(rest):
            key, _, value = pair.partition("=")
            env[key] = value.replace("$PATH", env.get("PATH", ""))
    return env


class _ComposeLoader(yaml.SafeLoader):
    """YAML loader that keeps Compose's ``!reset`` tag as a marker."""


RESET = object()
_ComposeLoader.add_constructor("!reset", lambda loader, node: RESET)


def load_compose(path: Path) -> dict[str, Any]:
    return yaml.load(path.read_text(), Loader=_ComposeLoader)


def merge_compose(base: Any, override: Any) -> Any:
    """Compose's merge of an override file: mappings merge key by key, ``!reset`` removes the key,
    scalars and sequences are replaced (enough for our files, which never merge sequences)."""
    if isinstance(base, dict) and isinstance(override, dict):
        merged = dict(base)
        for key, value in override.items():
            if value is RESET:
                merged.pop(key, None)
            else:
                merged[key] = merge_compose(base.get(key), value)
        return merged
    return override


def exported_metric_names() -> set[str]:
    """Every series name ``service/metrics.py`` exports, with the suffixes Prometheus adds."""
    suffixes = {"counter": ("_total",), "gauge": ("",), "histogram": ("_bucket", "_sum", "_count")}
    names: set[str] = set()
    for value in vars(metrics).values():
        if isinstance(value, Counter | Gauge | Histogram):
            for family in value.describe():
                names.update(family.name + suffix for suffix in suffixes[family.type])
    return names
