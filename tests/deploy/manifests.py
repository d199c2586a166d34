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
OVERLAY = DEPLOY / "kubernetes" / "overlays" / "example"
MODEL_OF_KIND = {
    "Namespace": "V1Namespace", "ConfigMap": "V1ConfigMap", "Deployment": "V1Deployment",
    "Service": "V1Service", "PersistentVolumeClaim": "V1PersistentVolumeClaim",
    "Job": "V1Job", "PodDisruptionBudget": "V1PodDisruptionBudget",
}


def render(folder: Path = BASE) -> list[dict[str, Any]]:
    """A kustomization as kustomize renders it: ``kubectl kustomize`` where kubectl exists,
    else :func:`render_like_kustomize`."""
    if shutil.which("kubectl"):
        out = subprocess.run(["kubectl", "kustomize", str(folder)], check=True,
                             capture_output=True, text=True, timeout=60).stdout
        return [d for d in yaml.safe_load_all(out) if d]
    return render_like_kustomize(folder)


def render_base() -> list[dict[str, Any]]:
    return render(BASE)


def pod_specs(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """The pod specs inside an object (Deployment, Job, RayCluster head and groups)."""
    spec = doc.get("spec", {})
    if doc["kind"] == "RayCluster":
        return [spec["headGroupSpec"]["template"]["spec"]] + [
            g["template"]["spec"] for g in spec["workerGroupSpecs"]]
    if "template" in spec:
        return [spec["template"]["spec"]]
    return []


def containers(pod: dict[str, Any]) -> list[dict[str, Any]]:
    return list(pod.get("initContainers", [])) + list(pod["containers"])


def render_like_kustomize(folder: Path) -> list[dict[str, Any]]:
    """What kustomize does with the features deploy/kubernetes uses (resources, namespace,
    labels, images on containers and init containers, JSON-patch ``replace`` by kind/name)."""
    k = yaml.safe_load((folder / "kustomization.yaml").read_text())
    docs: list[dict[str, Any]] = []
    for res in k.get("resources", []):
        path = folder / res
        if path.is_dir():
            docs += render_like_kustomize(path)
        else:
            docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    for doc in docs:
        if "namespace" in k and doc["kind"] != "Namespace":
            doc["metadata"]["namespace"] = k["namespace"]
        for pair in k.get("labels", []):
            doc["metadata"].setdefault("labels", {}).update(pair["pairs"])
    for image in k.get("images", []):
        for doc in docs:
            for pod in pod_specs(doc):
                for c in containers(pod):
                    name, _, tag = c["image"].partition(":")
                    if name == image["name"]:
                        c["image"] = f"{image.get('newName', name)}:{image.get('newTag', tag)}"
    for patch in k.get("patches", []):
        target = patch["target"]
        for doc in docs:
            if doc["kind"] != target["kind"] or target.get("name", doc["metadata"]["name"]) != (
                    doc["metadata"]["name"]):
                continue
            for op in yaml.safe_load(patch["patch"]):
                if op["op"] != "replace":
                    raise ValueError(f"only replace patches are modelled, got {op}")
                *parents, last = op["path"].strip("/").split("/")
                node = doc
                for part in parents:
                    node = node[int(part)] if isinstance(node, list) else node[part]
                if last not in node:
                    raise ValueError(f"replace of a missing path {op['path']}")
                node[last] = op["value"]
    return docs


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
