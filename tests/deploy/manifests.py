"""Loading deploy/'s manifests as the cluster would get them, and checking objects against the
Kubernetes API models of the ``kubernetes`` package (every field known, every type right)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import kubernetes.client.models as k8s
import yaml
from kubernetes.client import ApiClient

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
BASE = DEPLOY / "kubernetes" / "base"
MODEL_OF_KIND = {
    "Namespace": "V1Namespace", "ConfigMap": "V1ConfigMap", "Deployment": "V1Deployment",
    "Service": "V1Service", "PersistentVolumeClaim": "V1PersistentVolumeClaim",
}


def render_base() -> list[dict[str, Any]]:
    """The base as kustomize renders it (``kubectl kustomize`` where kubectl exists, else
    the listed resources with the namespace and image set, which is all the base uses)."""
    if shutil.which("kubectl"):
        out = subprocess.run(["kubectl", "kustomize", str(BASE)], check=True,
                             capture_output=True, text=True, timeout=60).stdout
        return [d for d in yaml.safe_load_all(out) if d]
    kustomization = yaml.safe_load((BASE / "kustomization.yaml").read_text())
    image = kustomization["images"][0]
    docs: list[dict[str, Any]] = []
    for name in kustomization["resources"]:
        for doc in yaml.safe_load_all((BASE / name).read_text()):
            if doc["kind"] != "Namespace":
                doc["metadata"]["namespace"] = kustomization["namespace"]
            docs.append(doc)
    text = yaml.safe_dump_all(docs).replace(
        "image: atelier\n", f"image: {image['newName']}:{image['newTag']}\n"
    )
    return list(yaml.safe_load_all(text))


def check_model(data: Any, type_name: str, path: str = "") -> list[str]:
    """Problems of ``data`` as an object of the Kubernetes model ``type_name``: unknown fields
    (which the API server would drop or refuse) and wrong types, with their paths."""
    problems: list[str] = []
    # Older clients write list[X] / dict(str, X), newer ones List[X] / Dict[str, X].
    if type_name.lower().startswith("list["):
        if not isinstance(data, list):
            return [f"{path}: expected a list, got {type(data).__name__}"]
        for i, item in enumerate(data):
            problems += check_model(item, type_name[5:-1], f"{path}[{i}]")
        return problems
    if type_name.lower().startswith(("dict(", "dict[")):
        if not isinstance(data, dict):
            return [f"{path}: expected a mapping, got {type(data).__name__}"]
        inner = type_name[5:-1].split(",", 1)[1].strip()
        for key, value in data.items():
            problems += check_model(value, inner, f"{path}.{key}")
        return problems
    simple = {"str": str, "bool": bool, "int": int, "float": (int, float), "datetime": str}
    if type_name in simple:
        ok = isinstance(data, simple[type_name]) and not (
            type_name == "int" and isinstance(data, bool)
        )
        return [] if ok else [f"{path}: expected {type_name}, got {data!r}"]
    if type_name == "object":  # IntOrString, quantities, raw JSON
        return []
    klass = getattr(k8s, type_name)
    if not isinstance(data, dict):
        return [f"{path}: expected a {type_name} mapping, got {data!r}"]
    by_json = {json_key: attr for attr, json_key in klass.attribute_map.items()}
    for key, value in data.items():
        if key not in by_json:
            problems.append(f"{path}.{key}: not a field of {type_name}")
            continue
        problems += check_model(value, klass.openapi_types[by_json[key]], f"{path}.{key}")
    return problems


def build_model(data: dict[str, Any], type_name: str) -> Any:
    """The model object (the client's own deserializer: required fields are enforced)."""
    return ApiClient()._ApiClient__deserialize(data, type_name)  # type: ignore[attr-defined]


def ray_resources(param: str) -> dict[str, float]:
    """``rayStartParams.resources`` as KubeRay wants it written: a JSON object inside double
    quotes with its own quotes escaped ('"{\\"device:x\\": 1}"'), which KubeRay passes to
    ``ray start --resources=`` through a shell."""
    import json

    match = re.fullmatch(r'"(\{.*\})"', param)
    if match is None:
        raise ValueError(f"rayStartParams.resources must be '\"{{...}}\"', got {param!r}")
    inner = match.group(1)
    if '"' in inner.replace('\\"', ""):
        raise ValueError(f"unescaped quote inside rayStartParams.resources: {param!r}")
    value = json.loads(inner.replace('\\"', '"'))
    if not isinstance(value, dict):
        raise ValueError(f"rayStartParams.resources is not an object: {param!r}")
    return {str(k): float(v) for k, v in value.items()}
