"""deploy/kserve/ against KServe's API types (``deploy/schemas/kserve-0.21.0.schema.json``,
written by ``scripts/kserve_schema.py`` from KServe's SDK, closed like ``kubectl
--validate=strict``) and Kubernetes' strict schemas (kubernetes-validate) for the embedded pod
types, and against segserve itself: the runtime's image, port, probes and settings exist."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from referencing import Registry, Resource

from service import __version__
from service.http import create_app
from service.http.v2 import PLATFORM
from service.settings import Settings

REPO_ROOT = Path(__file__).resolve().parents[2]
KSERVE = REPO_ROOT / "deploy" / "kserve"
SCHEMA = REPO_ROOT / "deploy" / "schemas" / "kserve-0.21.0.schema.json"
KUBERNETES = (
    Path(kubernetes_validate.__file__).parent
    / "kubernetes-json-schema"
    / "v1.37.0-local-strict"
    / "_definitions.json"
)
KINDS = {
    "ServingRuntime": "serving.kserve.io/v1alpha1",
    "InferenceService": "serving.kserve.io/v1beta1",
}


def manifest(kind: str) -> dict[str, Any]:
    (document,) = [
        d
        for path in sorted(KSERVE.glob("*.yaml"))
        for d in yaml.safe_load_all(path.read_text())
        if d and d["kind"] == kind
    ]
    return document


def validator(kind: str) -> jsonschema.Draft202012Validator:
    schema = json.loads(SCHEMA.read_text())
    registry = Registry().with_resources(
        [
            (schema["$id"], Resource.from_contents(schema)),
            (
                "https://kubernetes.io/api/_definitions.json",
                Resource.from_contents(json.loads(KUBERNETES.read_text())),
            ),
        ]
    )
    root = {"$ref": f"{schema['$id']}#/properties/{kind}"}
    return jsonschema.Draft202012Validator(root, registry=registry)


@pytest.mark.parametrize("kind", list(KINDS))
def test_manifests_validate_against_kserve_types(kind: str) -> None:
    document = manifest(kind)
    assert document["apiVersion"] == KINDS[kind]
    assert document["metadata"]["namespace"] == "segserve"
    validator(kind).validate(document)


@pytest.mark.parametrize(
    ("kind", "path", "key", "value"),
    [
        ("ServingRuntime", ["spec"], "protocolVersion", ["v2"]),  # typo of protocolVersions
        ("ServingRuntime", ["spec", "containers", 0], "readinessProbes", {}),  # Kubernetes type
        ("ServingRuntime", ["spec"], "containers", None),  # required
        ("InferenceService", ["spec", "predictor", "model"], "storageURI", "pvc://x"),
        ("InferenceService", ["spec", "predictor"], "minReplicas", "one"),
    ],
)
def test_mistakes_are_refused(kind: str, path: list[Any], key: str, value: Any) -> None:
    broken = copy.deepcopy(manifest(kind))
    node = broken
    for step in path:
        node = node[step]
    if value is None:
        del node[key]
    else:
        node[key] = value
    with pytest.raises(jsonschema.ValidationError):
        validator(kind).validate(broken)


def test_runtime_and_service_fit_segserve() -> None:
    runtime, service = manifest("ServingRuntime"), manifest("InferenceService")
    spec = runtime["spec"]
    assert spec["protocolVersions"] == ["v2"]
    formats = {f["name"] for f in spec["supportedModelFormats"]}
    assert formats == {PLATFORM}  # what /v2/models/{name} reports as the platform
    model = service["spec"]["predictor"]["model"]
    assert (
        model["modelFormat"]["name"] in formats and model["runtime"] == runtime["metadata"]["name"]
    )
    assert model["protocolVersion"] == "v2"
    (container,) = spec["containers"]
    assert container["name"] == "kserve-container"
    assert container["image"] == f"segserve:{__version__}"
    port = container["ports"][0]["containerPort"]
    assert container["args"][container["args"].index("--port") + 1] == str(port)
    settings = {f"SEGSERVE_{name.upper()}" for name in Settings.model_fields}
    env = {e["name"]: e for e in container["env"]}
    assert set(env) <= settings
    assert env["SEGSERVE_MODEL_REPOSITORY"]["value"] == "/mnt/models"  # where KServe puts models
    routes = set(create_app(Settings()).openapi()["paths"])
    for probe in ("startupProbe", "readinessProbe"):
        assert container[probe]["httpGet"]["path"] == "/v2/health/ready"  # models warm
        assert container[probe]["httpGet"]["path"] in routes
        assert container[probe]["httpGet"]["port"] == port
    assert re.fullmatch(r"pvc://segserve-models/.*", model["storageUri"])


def kserve_pod_labels() -> dict[str, str]:
    """The labels KServe puts on the predictor's pods: the runtime's pod labels, the
    InferenceService's own metadata labels and the predictor's, then its own two (KServe's
    predictor reconciler, ``utils.Union`` in that order)."""
    runtime, service = manifest("ServingRuntime"), manifest("InferenceService")
    return {
        **runtime["spec"].get("labels", {}),
        **service["metadata"].get("labels", {}),
        **service["spec"]["predictor"].get("labels", {}),
        "serving.kserve.io/inferenceservice": service["metadata"]["name"],
        "component": "predictor",
    }


def segserve_pod_selectors() -> list[tuple[str, dict[str, str]]]:
    """Every selector in deploy/kubernetes/ that picks the Deployment's own pods."""
    selectors = []
    for path in sorted((REPO_ROOT / "deploy" / "kubernetes").glob("*.yaml")):
        for document in yaml.safe_load_all(path.read_text()):
            if not document:
                continue
            kind, spec = document["kind"], document.get("spec", {})
            if kind == "Service":
                selector = spec.get("selector")
            elif kind in ("Deployment", "PodDisruptionBudget"):
                selector = spec["selector"]["matchLabels"]
            elif kind == "NetworkPolicy":
                selector = spec["podSelector"]["matchLabels"]
            else:
                continue
            if selector:
                selectors.append((f"{kind} {document['metadata']['name']}", selector))
    return selectors


def test_kserve_pods_are_not_picked_by_the_deployments_selectors() -> None:
    """Both sets live in namespace ``segserve``: a KServe pod that the Deployment's Service
    selected would get its traffic on port 8000 (it listens on 8080), and the PDB and
    NetworkPolicy would count and fence it as one of the Deployment's."""
    pods = kserve_pod_labels()
    selectors = segserve_pod_selectors()
    assert {"Service segserve", "PodDisruptionBudget segserve"} <= {name for name, _ in selectors}
    picked = [name for name, selector in selectors if selector.items() <= pods.items()]
    assert picked == [], f"KServe's pods {pods} are selected by {picked}"
