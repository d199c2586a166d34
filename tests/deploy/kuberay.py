"""What KubeRay v1.6.0 makes of a RayCluster's pod templates, as far as Ray's token goes: a
transcription of ray-operator/controllers/ray/common/pod.go (tag v1.6.0). A worker pod gets an
init container ``wait-gcs-ready`` running ``ray health-check`` against the head, with a copy of
the Ray container's ``env`` and ``volumeMounts`` (never its ``envFrom``); the head pod gets the
autoscaler sidecar with KubeRay's own env plus ``autoscalerOptions.env``/``envFrom``. With
``spec.authOptions.mode: token``, SetContainerTokenAuthEnvVars adds RAY_AUTH_MODE=token and
RAY_AUTH_TOKEN (key ``auth_token`` of ``authOptions.secretName``, default: the cluster's name)
to the Ray containers, the init container and the autoscaler, unless already in their ``env``."""

from __future__ import annotations

import copy
from typing import Any

TOKEN_KEY = "auth_token"


def _auth_enabled(spec: dict[str, Any]) -> bool:
    return (spec.get("authOptions") or {}).get("mode") == "token"  # utils.IsAuthEnabled


def _set_token_env(cluster: str, container: dict[str, Any], auth: dict[str, Any]) -> None:
    env = container.setdefault("env", [])
    names = {e["name"] for e in env}
    if "RAY_AUTH_MODE" not in names:
        env.append({"name": "RAY_AUTH_MODE", "value": "token"})
    if "RAY_AUTH_TOKEN" not in names:
        secret = auth.get("secretName") or cluster
        env.append({"name": "RAY_AUTH_TOKEN", "valueFrom": {
            "secretKeyRef": {"name": secret, "key": TOKEN_KEY}}})


def worker_pod(rc: dict[str, Any], group: dict[str, Any]) -> dict[str, Any]:
    """The pod spec KubeRay creates for a worker of ``group`` (DefaultWorkerPodTemplate)."""
    pod = copy.deepcopy(group["template"]["spec"])
    ray_container = pod["containers"][0]
    pod.setdefault("initContainers", []).append({
        "name": "wait-gcs-ready", "image": ray_container["image"],
        "args": ["ray health-check --address <head>:6379"],
        "env": copy.deepcopy(ray_container.get("env", [])),
        "volumeMounts": copy.deepcopy(ray_container.get("volumeMounts", [])),
    })
    if _auth_enabled(rc["spec"]):
        auth = rc["spec"]["authOptions"]
        _set_token_env(rc["metadata"]["name"], ray_container, auth)
        for init in pod["initContainers"]:
            if init["name"] == "wait-gcs-ready":
                _set_token_env(rc["metadata"]["name"], init, auth)
    return pod


def head_pod(rc: dict[str, Any]) -> dict[str, Any]:
    """The head's pod spec (DefaultHeadPodTemplate), with the autoscaler sidecar."""
    spec = rc["spec"]
    pod = copy.deepcopy(spec["headGroupSpec"]["template"]["spec"])
    if spec.get("enableInTreeAutoscaling"):
        options = spec.get("autoscalerOptions") or {}
        autoscaler: dict[str, Any] = {
            "name": "autoscaler", "image": pod["containers"][0]["image"],
            "env": [{"name": n} for n in ("KUBERAY_CRD_VER", "RAY_CLUSTER_NAME",
                                          "RAY_CLUSTER_NAMESPACE", "RAY_HEAD_POD_NAME")]
            + copy.deepcopy(options.get("env", [])),
            "envFrom": copy.deepcopy(options.get("envFrom", [])),
        }
        if _auth_enabled(spec):
            _set_token_env(rc["metadata"]["name"], autoscaler, spec["authOptions"])
        pod["containers"].append(autoscaler)
    if _auth_enabled(spec):
        _set_token_env(rc["metadata"]["name"], pod["containers"][0], spec["authOptions"])
    return pod


def token_source(container: dict[str, Any]) -> tuple[str | None, Any]:
    """(RAY_AUTH_MODE, where RAY_AUTH_TOKEN comes from) as the container's ``env`` gives them:
    what ``ray health-check`` and ``ray start`` in it would see before any ``envFrom``; a
    token only in ``envFrom`` counts as (None, None) for the init container, which has none."""
    env = {e["name"]: e for e in container.get("env", [])}
    mode = env.get("RAY_AUTH_MODE", {}).get("value")
    token = env.get("RAY_AUTH_TOKEN")
    return mode, None if token is None else token.get("valueFrom", token.get("value"))
