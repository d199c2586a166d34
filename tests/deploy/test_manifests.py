"""deploy/ as an operator gets it: the KubeRay base renders and validates against the RayCluster
CRD schema (a vendored subset) and the Kubernetes models; each worker group offers the device
resource cluster/devices.py names for its card and the autoscaler knows every group; every
ATELIER_* variable in the manifests and the compose file is a Settings field; the images'
Ray is the tested one; `docker compose config` passes where docker compose exists."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import ray
import yaml
from pydantic import BaseModel

from cluster.contract import device_resource
from cluster.device_classes import device_class_name, nominal_gb
from core.settings import Settings, load_settings
from tests.conftest import service_missing
from tests.deploy.kuberay import head_pod, token_source, worker_pod
from tests.deploy.manifests import (
    DEPLOY,
    MODEL_OF_KIND,
    OVERLAY,
    ROOT,
    build_model,
    check_model,
    containers,
    pod_specs,
    ray_resources,
    render,
    render_base,
    render_like_kustomize,
)

SCHEMA = json.loads((Path(__file__).with_name("raycluster.schema.json")).read_text())


@pytest.fixture(scope="module")
def rendered() -> list[dict[str, Any]]:
    return render_base()


def _raycluster(docs: list[dict[str, Any]]) -> dict[str, Any]:
    (rc,) = [d for d in docs if d["kind"] == "RayCluster"]
    return rc


def test_every_object_validates(rendered: list[dict[str, Any]]) -> None:
    kinds = sorted(d["kind"] for d in rendered)
    assert kinds.count("Deployment") == 4 and "RayCluster" in kinds, kinds
    for doc in rendered:
        where = f"{doc['kind']}/{doc['metadata']['name']}"
        if doc["kind"] == "RayCluster":
            jsonschema.validate(doc, SCHEMA)
            spec = doc["spec"]
            templates = [spec["headGroupSpec"]["template"]] + [
                g["template"] for g in spec["workerGroupSpecs"]
            ]
            for template in templates:
                assert check_model(template, "V1PodTemplateSpec", where) == []
                build_model(template, "V1PodTemplateSpec")
            continue
        model = MODEL_OF_KIND[doc["kind"]]
        assert check_model(doc, model, where) == []
        build_model(doc, model)


def test_the_validation_catches_mistakes(rendered: list[dict[str, Any]]) -> None:
    rc = json.loads(json.dumps(_raycluster(rendered)))
    rc["spec"]["workerGroupSpecs"][0]["minReplica"] = 0  # misspelt
    with pytest.raises(jsonschema.ValidationError, match="minReplica"):
        jsonschema.validate(rc, SCHEMA)
    rc = json.loads(json.dumps(_raycluster(rendered)))
    rc["spec"]["autoscalerOptions"]["upscalingMode"] = "Fast"
    with pytest.raises(jsonschema.ValidationError, match="Fast"):
        jsonschema.validate(rc, SCHEMA)
    (dep,) = [d for d in rendered if d["metadata"]["name"] == "atelier-dispatcher"]
    dep = json.loads(json.dumps(dep))
    dep["spec"]["template"]["spec"]["containers"][0]["envfrom"] = []
    dep["spec"]["replicas"] = "2"
    assert check_model(dep, "V1Deployment", "d") == [
        "d.spec.replicas: expected int, got '2'",
        "d.spec.template.spec.containers[0].envfrom: not a field of V1Container",
    ]
    with pytest.raises(ValueError, match="unescaped"):
        ray_resources('"{"device:cpu": 1}"')
    with pytest.raises(ValueError, match="must be"):
        ray_resources('{"device:cpu": 1}')


def _worker_class(template: dict[str, Any]) -> str:
    notes = template["metadata"]["annotations"]
    memory = float(notes["atelier.dev/gpu-memory-gb"])
    if memory == 0:
        return device_class_name("cpu", "", None)
    # What the card's driver reports (a little under the size it is sold as).
    reported = int(memory * 2**30 * 0.98)
    return device_class_name("cuda", notes["atelier.dev/gpu-product"], nominal_gb(reported))


def test_worker_groups_offer_the_device_resource_their_workers_advertise(
    rendered: list[dict[str, Any]],
) -> None:
    rc = _raycluster(rendered)
    spec = rc["spec"]
    assert spec["enableInTreeAutoscaling"] is True
    assert spec["rayVersion"] == ray.__version__
    config = next(d for d in rendered if d["kind"] == "ConfigMap")["data"]
    autoscaled = json.loads(config["ATELIER_AUTOSCALE__CLASSES"])
    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    assert set(groups) == {"gpu-24g", "gpu-80g", "cpu"}
    classes = {}
    for name, group in groups.items():
        # No `replicas`: the autoscaler owns the count (a set one is reset at every apply).
        assert group["minReplicas"] == 0 and "replicas" not in group, name
        cls = _worker_class(group["template"])
        classes[name] = cls
        assert ray_resources(group["rayStartParams"]["resources"]) == {device_resource(cls): 1}
        pod = group["template"]["spec"]
        limits = pod["containers"][0]["resources"]["limits"]
        if cls == "cpu":
            assert "nvidia.com/gpu" not in limits and autoscaled[cls]["gpus"] == 0
        else:
            assert limits["nvidia.com/gpu"] == "1", name
            assert pod["nodeSelector"]["nvidia.com/gpu.product"], name
            assert {"key": "nvidia.com/gpu", "operator": "Exists",
                    "effect": "NoSchedule"} in pod["tolerations"], name
            assert autoscaled[cls]["memory_gb"] == float(
                group["template"]["metadata"]["annotations"]["atelier.dev/gpu-memory-gb"]
            )
    assert classes == {"gpu-24g": "l4-24gb", "gpu-80g": "a100-80gb", "cpu": "cpu"}
    assert set(autoscaled) == set(classes.values())


def _settings_field(name: str) -> bool:
    """Whether ATELIER_A__B names a Settings field (nested models by ``__``)."""
    parts = name.removeprefix("ATELIER_").lower().split("__")
    model: type[BaseModel] = Settings
    for i, part in enumerate(parts):
        field = model.model_fields.get(part)
        if field is None:
            return False
        ann = field.annotation
        if i < len(parts) - 1:
            if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
                return False
            model = ann
    return True


def _atelier_names(text: str) -> set[str]:
    return set(re.findall(r"\b(ATELIER_[A-Z0-9_]+)\b", text)) - {
        "ATELIER_IMAGE", "ATELIER_CUDA_IMAGE"}


def test_every_atelier_variable_is_a_setting(rendered: list[dict[str, Any]]) -> None:
    texts = [yaml.safe_dump_all(rendered), (DEPLOY / "compose.yaml").read_text()] + [
        p.read_text() for p in (DEPLOY / "env").glob("*.env.example")]
    names = set().union(*(_atelier_names(t) for t in texts))
    assert {"ATELIER_METRICS__PORT", "ATELIER_AUTOSCALE__CLASSES", "ATELIER_REDIS_URL"} <= names
    unknown = sorted(n for n in names if not _settings_field(n))
    assert unknown == []
    assert not _settings_field("ATELIER_METRICS__PROT") and not _settings_field("ATELIER_NOPE")
    # The ConfigMap's values load, with the secrets the operator adds.
    config = next(d for d in rendered if d["kind"] == "ConfigMap")["data"]
    env = {k.removeprefix("ATELIER_").lower(): v for k, v in config.items()
           if k.startswith("ATELIER_") and "__" not in k}
    settings = load_settings(
        _env_file=None, **env, signing_key="x" * 32, database_url="postgresql://db/atelier",
        metrics={"host": config["ATELIER_METRICS__HOST"], "port": config["ATELIER_METRICS__PORT"]},
        autoscale={"enabled": config["ATELIER_AUTOSCALE__ENABLED"],
                   "classes": json.loads(config["ATELIER_AUTOSCALE__CLASSES"])},
    )
    assert settings.autoscale.enabled and settings.metrics.port == 9464


def test_the_images_carry_the_tested_ray_and_pinned_deps() -> None:
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    assert f"ARG RAY_VERSION={ray.__version__}\n" in dockerfile
    # No CUDA in the image of web, bots and dispatchers; Ray's GPU image for the GPU workers.
    assert "FROM python:3.11-slim-bookworm AS cpu\n" in dockerfile
    assert "FROM rayproject/ray:${RAY_VERSION}-py311-gpu AS cuda\n" in dockerfile
    stages = dockerfile.split("\nFROM ")[1:]
    assert len(stages) == 2
    for stage in stages:
        lines = stage.splitlines()
        deps = next(i for i, line in enumerate(lines) if "install.sh deps" in line)
        source = [i for i, line in enumerate(lines) if re.match(r"COPY .* (core|atelier) ", line)]
        app = next(i for i, line in enumerate(lines) if "install.sh app" in line)
        # Dependencies first: a code change leaves their (multi-GB) layer cached.
        assert len(source) == 2 and deps < min(source) and max(source) < app, lines[0]
        copied = next(line for line in lines[:deps] if "deploy/install.sh" in line)
        assert "core" not in copied and "pyproject.toml" in copied
        # Every package the wheel ships is in the image (a new top-level package, e.g. engine/,
        # left out would only show when a worker first imports it in the cluster).
        for package in _shipped_packages():
            assert f"COPY --chown=ray:users {package} ./{package}" in lines, (lines[0], package)
    ignored = (ROOT / ".dockerignore").read_text().splitlines()
    for pattern in (".git", ".venv", "**/__pycache__", "**/.pytest_cache", "**/.mypy_cache",
                    "**/.ruff_cache", "tests", "**/*.env", "*.egg-info"):
        assert pattern in ignored, pattern
    pins = (DEPLOY / "constraints.txt").read_text()
    assert f"\nray=={ray.__version__}\n" in pins
    for line in pins.splitlines():
        assert line.startswith("#") or re.fullmatch(r"[A-Za-z0-9_.\-\[\]]+==[^=\s]+", line), line


def _shipped_packages() -> list[str]:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    include = pyproject["tool"]["setuptools"]["packages"]["find"]["include"]
    return [pattern.rstrip("*") for pattern in include]


def _compose_command() -> list[str] | None:
    """Compose v2 (`docker compose`), else v1 (`docker-compose`, Debian's package)."""
    if shutil.which("docker") and subprocess.run(
        ["docker", "compose", "version"], capture_output=True
    ).returncode == 0:
        return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    return None


def _env_names(service: dict[str, Any]) -> set[str]:
    """The variables a compose service's env files give it (from the shipped examples)."""
    names: set[str] = set()
    for path in service.get("env_file", []):
        text = (DEPLOY / f"{path}.example").read_text()
        names |= {line.split("=", 1)[0] for line in text.splitlines()
                  if line and not line.startswith("#")}
    return names


def test_compose_file(tmp_path: Path) -> None:
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    services = compose["services"]
    assert services["redis"]["command"][:3] == ["redis-server", "--appendonly", "yes"]
    gpu = services["gpu-worker"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["driver"] == "nvidia" and gpu["capabilities"] == ["gpu"]
    for name, service in services.items():
        assert "healthcheck" in service or name == "migrate", name
        assert service["logging"]["options"]["max-size"], name  # rotated logs
    compose_cli = _compose_command()
    if compose_cli is None:
        service_missing("docker compose (or docker-compose); the structure was checked above")
    shutil.copytree(DEPLOY, tmp_path / "deploy")
    for example in (tmp_path / "deploy" / "env").glob("*.env.example"):
        shutil.copy(example, example.with_suffix(""))
    done = subprocess.run(
        [*compose_cli, "-p", "atelier", "-f", str(tmp_path / "deploy" / "compose.yaml"),
         "--profile", "telegram", "--profile", "discord", "config", "--quiet"],
        capture_output=True, text=True, timeout=60,
    )
    assert done.returncode == 0, done.stderr


def test_compose_processes_block_and_heal() -> None:
    """The head and the GPU worker keep their node as the container's process (it ends with
    the node, and the restart re-joins); the worker's health check asks its own node; the
    dispatcher is a service of its own."""
    services = yaml.safe_load((DEPLOY / "compose.yaml").read_text())["services"]
    head = services["head"]
    assert head["command"][:4] == ["ray", "start", "--head", "--block"]
    assert "127.0.0.1:6379" in head["healthcheck"]["test"]
    worker = services["gpu-worker"]
    script = worker["command"][-1]
    first, _, then = script.partition(" && ")
    assert first.startswith("atelier worker --address head:6379")
    # Nothing after the watch loop: the container exits when the raylet does.
    assert then.startswith("exec python -c ") and "raylet" in then and "sleep infinity" not in then
    check = " ".join(worker["healthcheck"]["test"])
    assert "raylet" in check and "head" not in check  # this node, not the head
    assert worker["restart"] == "unless-stopped"
    dispatcher = services["dispatcher"]
    assert "exec atelier dispatcher" in dispatcher["command"][-1]
    assert "dispatcher" not in " ".join(head["command"])


def test_compose_services_get_only_their_secrets() -> None:
    services = yaml.safe_load((DEPLOY / "compose.yaml").read_text())["services"]
    got = {name: _env_names(s) for name, s in services.items()}
    assert got["gpu-worker"] == got["head"] == {"RAY_AUTH_TOKEN"}
    assert got["dispatcher"] == {"RAY_AUTH_TOKEN", "ATELIER_DATABASE_URL",
                                 "ATELIER_SIGNING_KEY", "ATELIER_PUBLIC_BASE_URL"}
    assert got["bot-telegram"] - got["web"] == {"ATELIER_TELEGRAM_TOKEN"}
    assert got["bot-discord"] - got["web"] == {"ATELIER_DISCORD_TOKEN"}
    assert got["postgres"] == {"POSTGRES_PASSWORD"}
    for name, names in got.items():
        if name not in ("head", "gpu-worker", "dispatcher"):
            assert "RAY_AUTH_TOKEN" not in names, name
    # The GPU worker is not in production mode (which would want the database and key).
    assert "ATELIER_MODE" not in services["gpu-worker"]["environment"]
    # Bots start only when asked for (a site may run one platform): no crash loop on the other.
    assert services["bot-telegram"]["profiles"] == ["telegram"]
    assert services["bot-discord"]["profiles"] == ["discord"]


def test_compose_publishes_the_app_not_the_probes() -> None:
    services = yaml.safe_load((DEPLOY / "compose.yaml").read_text())["services"]
    web = services["web"]
    assert web["ports"] == ["8000:8000"]
    env = web["environment"]
    assert env["ATELIER_METRICS__PORT"] == "9464" and "ATELIER_METRICS__ON_WEB_PORT" not in env
    settings = load_settings(_env_file=None, metrics={"port": 9464})
    assert not settings.metrics.probes_on_web_port  # so /metrics, /readyz leave port 8000
    assert "9464" in " ".join(web["healthcheck"]["test"])
    for name, service in services.items():
        for port in service.get("ports", []):
            assert "9464" not in str(port), name


def test_the_dashboard_shows_metrics_the_processes_export() -> None:
    import prometheus_client

    from core import metrics

    dashboard = json.loads((DEPLOY / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    used = set(re.findall(r"\b(atelier_[a-z_]+)", " ".join(exprs)))
    exported = set()
    for value in vars(metrics).values():
        if isinstance(value, prometheus_client.metrics.MetricWrapperBase):
            for family in value.describe():
                exported |= {family.name, family.name + "_total", family.name + "_bucket",
                             family.name + "_sum", family.name + "_count"}
    assert used and used <= exported, sorted(used - exported)
    assert len(used) >= 15  # every family core/metrics.py defines has a panel


RAY_TOKEN = {"secretKeyRef": {"name": "atelier-ray-token", "key": "auth_token"}}


def test_ray_token_reaches_every_ray_process(rendered: list[dict[str, Any]]) -> None:
    """A head in token mode refuses `ray health-check`, `ray start` and the autoscaler without
    the token: each gets it in its `env` as KubeRay builds the pods (tests/deploy/kuberay.py)."""
    rc = _raycluster(rendered)
    assert rc["spec"]["authOptions"] == {"mode": "token", "secretName": "atelier-ray-token"}
    head = head_pod(rc)
    for container in head["containers"]:  # ray-head and the autoscaler sidecar
        assert token_source(container) == ("token", RAY_TOKEN), container["name"]
    for group in rc["spec"]["workerGroupSpecs"]:
        pod = worker_pod(rc, group)
        (init,) = [c for c in pod["initContainers"] if c["name"] == "wait-gcs-ready"]
        assert token_source(init) == ("token", RAY_TOKEN), group["groupName"]
        assert token_source(pod["containers"][0]) == ("token", RAY_TOKEN)
        # Workers get no Atelier secrets at all (bot tokens, database, signing key).
        refs = [e for c in containers(pod) for e in c.get("envFrom", [])]
        assert all("secretRef" not in e for e in refs), group["groupName"]
    # The dispatchers join the cluster with `ray start` outside KubeRay: their own env.
    (dispatcher,) = [d for d in rendered if d["metadata"]["name"] == "atelier-dispatcher"]
    (main,) = dispatcher["spec"]["template"]["spec"]["containers"]
    assert token_source(main) == ("token", RAY_TOKEN)


def test_the_token_model_sees_what_envfrom_misses(rendered: list[dict[str, Any]]) -> None:
    """The model of KubeRay's pod builder tells the manifests of before apart: a token only in
    the Ray container's envFrom never reaches the init container or the autoscaler."""
    rc = json.loads(json.dumps(_raycluster(rendered)))
    del rc["spec"]["authOptions"]
    group = rc["spec"]["workerGroupSpecs"][0]
    group["template"]["spec"]["containers"][0]["envFrom"].append(
        {"secretRef": {"name": "atelier-secrets"}})
    (init,) = worker_pod(rc, group)["initContainers"]
    assert token_source(init) == (None, None)
    assert token_source(head_pod(rc)["containers"][1]) == (None, None)


def test_cluster_operations(rendered: list[dict[str, Any]]) -> None:
    rc = _raycluster(rendered)
    spec = rc["spec"]
    assert spec["upgradeStrategy"] == {"type": "Recreate"}
    assert spec["gcsFaultToleranceOptions"]["redisAddress"]
    (pdb,) = [d for d in rendered if d["kind"] == "PodDisruptionBudget"]
    assert pdb["spec"]["selector"]["matchLabels"] == {
        "ray.io/cluster": rc["metadata"]["name"], "ray.io/node-type": "head"}
    assert pdb["spec"]["maxUnavailable"] == 0
    claims = {d["metadata"]["name"] for d in rendered if d["kind"] == "PersistentVolumeClaim"}
    assert all(d["spec"]["storageClassName"] for d in rendered
               if d["kind"] == "PersistentVolumeClaim")
    config = next(d for d in rendered if d["kind"] == "ConfigMap")["data"]
    check_timeout_s = float(config["ATELIER_METRICS__CHECK_TIMEOUT_S"])
    for doc in rendered:
        for pod in pod_specs(doc):
            writes = {v["name"] for v in pod.get("volumes", [])
                      if v.get("persistentVolumeClaim", {}).get("claimName") in claims}
            mounted_rw = {m["name"] for c in containers(pod) for m in c.get("volumeMounts", [])
                          if m["name"] in writes and not m.get("readOnly")}
            if mounted_rw:  # the image's user (uid 1000, group 100) must write the volume
                assert pod.get("securityContext", {}).get("fsGroup") == 100, doc["metadata"]
            for c in pod["containers"]:
                for probe in ("livenessProbe", "readinessProbe"):
                    if probe in c:  # the default timeout, 1 s, is below the checks' own
                        assert c[probe]["timeoutSeconds"] > check_timeout_s, (doc["kind"], probe)


def test_migration_runs_before_the_processes_start(rendered: list[dict[str, Any]]) -> None:
    (job,) = [d for d in rendered if d["kind"] == "Job"]
    (migrate,) = job["spec"]["template"]["spec"]["containers"]
    assert migrate["command"] == ["atelier", "db", "upgrade"]
    deployments = [d for d in rendered if d["kind"] == "Deployment"]
    assert len(deployments) == 4
    for dep in deployments:
        pod = dep["spec"]["template"]["spec"]
        (wait,) = pod["initContainers"]
        assert "until atelier db check" in " ".join(wait["command"]), dep["metadata"]["name"]
        # The same database settings as the Job, so it waits for the database the Job migrates.
        assert wait["envFrom"] == migrate["envFrom"] == pod["containers"][0]["envFrom"]


@pytest.mark.parametrize("renderer", ["kustomize", "model"])
def test_the_example_overlay_sets_every_image(renderer: str) -> None:
    """deploy/README.md's overlay, rendered: every container of every pod (init containers and
    the RayCluster's groups too) runs the site's image, the CUDA one only on GPU workers."""
    if renderer == "kustomize" and shutil.which("kubectl") is None:
        pytest.skip("kubectl not installed; the model renderer covers the overlay")
    docs = render(OVERLAY) if renderer == "kustomize" else render_like_kustomize(OVERLAY)
    images: dict[str, set[str]] = {}
    for doc in docs:
        for i, pod in enumerate(pod_specs(doc)):
            where = f"{doc['kind']}/{doc['metadata']['name']}/{i}"
            images[where] = {c["image"] for c in containers(pod)}
    assert len(images) == 4 + 1 + 4  # deployments, the Job, the head and three groups
    rc = _raycluster(docs)
    gpu_groups = {i + 1 for i, g in enumerate(rc["spec"]["workerGroupSpecs"])
                  if "nvidia.com/gpu" in g["template"]["spec"]["containers"][0]["resources"][
                      "limits"]}
    assert len(gpu_groups) == 2
    for where, used in images.items():
        cuda = where.startswith("RayCluster/") and int(where.rsplit("/", 1)[1]) in gpu_groups
        want = "registry.example.org/atelier:0.1.0-" + ("cuda" if cuda else "cpu")
        assert used == {want}, where
    assert {d["spec"]["storageClassName"] for d in docs
            if d["kind"] == "PersistentVolumeClaim"} == {"nfs-client"}
    assert rc["spec"]["gcsFaultToleranceOptions"]["redisAddress"] == (
        "redis-master.databases.svc:6379")
    readme = (DEPLOY / "README.md").read_text()
    assert "deploy/kubernetes/overlays/example" in readme
