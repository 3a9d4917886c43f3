"""Write ``deploy/schemas/kserve-<version>.schema.json``: JSON schemas of KServe's
``ServingRuntime`` and ``InferenceService`` for validating ``deploy/kserve/`` offline.

KServe publishes its API types in the generated models of its Python SDK (``kserve`` on PyPI,
``kserve/models/v1*.py``: per type, ``openapi_types``, the JSON names in ``attribute_map`` and the
required fields its setters refuse as None), the same Go types its CRDs are generated from. This
reads them from the wheel (without importing it: the SDK needs the Kubernetes client) and writes
one schema with a definition per KServe type, closed like ``kubectl --validate=strict`` (unknown
fields are errors); embedded Kubernetes types (``V1Container``, ``V1Toleration``, ...) are
references into kubernetes-validate's strict schemas, which the test registers beside it.
Run: ``.venv/bin/python scripts/kserve_schema.py`` (downloads the wheel with pip).
"""

from __future__ import annotations

import ast
import importlib.util
import json
import re
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

VERSION = "0.21.0"
OUT = (
    Path(__file__).resolve().parent.parent / "deploy" / "schemas" / f"kserve-{VERSION}.schema.json"
)
KUBERNETES = "https://kubernetes.io/api/_definitions.json#/$defs/"
# Kubernetes client classes -> their OpenAPI names (group/package differs per type).
KUBERNETES_PACKAGES = {
    "V1ObjectMeta": "io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta",
    "V1LabelSelector": "io.k8s.apimachinery.pkg.apis.meta.v1.LabelSelector",
    "V1Condition": "io.k8s.apimachinery.pkg.apis.meta.v1.Condition",
    "V2MetricSpec": "io.k8s.api.autoscaling.v2.MetricSpec",
    "V2HorizontalPodAutoscalerBehavior": (
        "io.k8s.api.autoscaling.v2.HorizontalPodAutoscalerBehavior"
    ),
}
KUBERNETES_SCHEMAS = (
    Path(importlib.util.find_spec("kubernetes_validate").origin).parent  # type: ignore[arg-type,union-attr]
    / "kubernetes-json-schema/v1.37.0-local-strict/_definitions.json"
)
ROOTS = {"ServingRuntime": "V1alpha1ServingRuntime", "InferenceService": "V1beta1InferenceService"}
MISSING: set[str] = set()
REQUIRED = re.compile(r"Invalid value for `(\w+)`, must not be `None`")
SCALARS = {
    "str": {"type": "string"},
    "int": {"type": "integer"},
    "float": {"type": "number"},
    "bool": {"type": "boolean"},
    "object": {},
    "datetime": {"type": "string"},
    "date": {"type": "string"},
}


def sdk_models(wheel: Path) -> dict[str, tuple[dict[str, str], dict[str, str], list[str]]]:
    """Class name -> (python attribute -> type, attribute -> JSON name, required attributes)."""
    models = {}
    with zipfile.ZipFile(wheel) as archive:
        for name in archive.namelist():
            if not re.match(r"kserve/models/v1(alpha\d|beta\d)?_\w+\.py$", name):
                continue
            source = archive.read(name).decode()
            for node in ast.walk(ast.parse(source)):
                if not isinstance(node, ast.ClassDef):
                    continue
                tables = {
                    target.id: ast.literal_eval(statement.value)
                    for statement in node.body
                    if isinstance(statement, ast.Assign)
                    for target in statement.targets
                    if isinstance(target, ast.Name)
                    and target.id in ("openapi_types", "attribute_map")
                }
                if len(tables) == 2:
                    required = sorted(
                        set(REQUIRED.findall(ast.get_source_segment(source, node) or ""))
                    )
                    models[node.name] = (tables["openapi_types"], tables["attribute_map"], required)
    return models


def kubernetes_ref(name: str, known: set[str]) -> dict[str, str]:
    if name in KUBERNETES_PACKAGES:
        return {"$ref": KUBERNETES + KUBERNETES_PACKAGES[name]}
    if name.startswith("K8sIo"):  # a fully qualified name, e.g. K8sIoApiAutoscalingV2...
        flat = "iok8s" + name[5:].lower()
        (key,) = [k for k in known if k.replace(".", "").lower() == flat]
        return {"$ref": KUBERNETES + key}
    match = re.fullmatch(r"(V\d(?:alpha\d|beta\d)?)(\w+)", name)
    candidates = []
    if match is not None:
        version, kind = match.group(1).lower(), match.group(2)
        candidates = [k for k in known if k.endswith(f".{version}.{kind}")]
    core = [k for k in candidates if k.startswith("io.k8s.api.core.")]
    chosen = core or candidates
    if not chosen:  # neither KServe's nor Kubernetes' (Knative status types; V1alpha1WorkerSpec,
        MISSING.add(name)  # which the 0.21.0 SDK names but does not generate)
        return {"type": "object"}
    if len(chosen) != 1:
        raise ValueError(f"{name}: Kubernetes definitions {candidates}")
    return {"$ref": KUBERNETES + chosen[0]}


def schema_of(kind: str, models: dict, kubernetes: set[str]) -> dict:
    if kind in SCALARS:
        return SCALARS[kind]
    if kind.startswith("list[") and kind.endswith("]"):
        return {"type": "array", "items": schema_of(kind[5:-1], models, kubernetes)}
    if kind.startswith("dict(str, ") and kind.endswith(")"):
        return {
            "type": "object",
            "additionalProperties": schema_of(kind[10:-1], models, kubernetes),
        }
    if kind in models:
        return {"$ref": f"#/$defs/{kind}"}
    return kubernetes_ref(kind, kubernetes)


def main() -> None:
    kubernetes = set(json.loads(KUBERNETES_SCHEMAS.read_text())["$defs"])
    with tempfile.TemporaryDirectory() as folder:
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "-q",
                "--no-deps",
                f"kserve=={VERSION}",
                "-d",
                folder,
            ],
            check=True,
        )
        models = sdk_models(next(Path(folder).glob("kserve-*.whl")))
    reachable, waiting = set(), list(ROOTS.values())
    while waiting:  # only the types the two resources use
        name = waiting.pop()
        if name not in reachable:
            reachable.add(name)
            waiting += [
                t for t in re.findall(r"\w+", " ".join(models[name][0].values())) if t in models
            ]
    definitions = {}
    for name in sorted(reachable):
        types, json_names, required = models[name]
        definitions[name] = {
            "type": "object",
            "properties": {
                json_names[attribute]: schema_of(kind, models, kubernetes)
                for attribute, kind in types.items()
            },
            "required": [json_names[attribute] for attribute in required],
            "additionalProperties": False,
        }
    document = {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": f"https://segserve.local/schemas/kserve-{VERSION}.schema.json",
        "description": f"KServe {VERSION} API types from its Python SDK's generated models "
        "(scripts/kserve_schema.py); Kubernetes types refer to kubernetes-validate's strict "
        f"schemas; types the SDK names but does not define are open objects: {sorted(MISSING)}",
        "$defs": definitions,
        "properties": {kind: {"$ref": f"#/$defs/{name}"} for kind, name in ROOTS.items()},
    }
    OUT.write_text(json.dumps(document, indent=1, sort_keys=True) + "\n")
    print(f"{OUT}: {len(definitions)} KServe types")


if __name__ == "__main__":
    main()
