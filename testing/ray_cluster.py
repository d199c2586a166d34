"""A Ray cluster with an autoscaler and a fake node provider (Ray's ``fake_multinode``), of this
test's own. Ray's ``cluster_utils.AutoscalingCluster`` does the same but begins with
``ray stop --force``, which would kill every Ray on a shared machine, and its base config
(``fake_multi_node/example.yaml``) is not in the Ray wheel: so the head is started here with
``ray start --head --block`` and its processes (and the fake nodes its autoscaler starts) are
stopped by pid at the end."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil

from testing.net import free_port


def fake_cluster_config(
    worker_node_types: dict[str, Any], *, gcs_address: str, idle_timeout_minutes: float
) -> dict[str, Any]:
    """An autoscaler config for the fake provider (the fields Ray's example file has)."""
    types = dict(worker_node_types)
    types["ray.head.default"] = {"resources": {}, "node_config": {}, "max_workers": 0}
    return {
        "cluster_name": "atelier-fake",
        "max_workers": sum(t.get("max_workers", 0) for t in worker_node_types.values()),
        "upscaling_speed": 1.0,
        "idle_timeout_minutes": idle_timeout_minutes,
        "provider": {
            "type": "fake_multinode",
            "use_node_id_as_ip": True,
            "disable_node_updaters": True,
            "disable_launch_config_check": True,
            "gcs_address": gcs_address,
        },
        "available_node_types": types,
        "head_node_type": "ray.head.default",
        "auth": {"ssh_user": "ubuntu"},
        "docker": {},
        "file_mounts": {},
        "cluster_synced_files": [],
        "file_mounts_sync_continuously": False,
        "rsync_exclude": [],
        "rsync_filter": [],
        "initialization_commands": [],
        "setup_commands": [],
        "head_setup_commands": [],
        "worker_setup_commands": [],
        "head_start_ray_commands": [],
        "worker_start_ray_commands": [],
    }


class FakeAutoscalingCluster:
    def __init__(self, tmp: Path, worker_node_types: dict[str, Any],
                 idle_timeout_minutes: float = 0.05) -> None:
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.config_path = tmp / "autoscaler.json"
        self.config_path.write_text(json.dumps(fake_cluster_config(
            worker_node_types, gcs_address=self.address,
            idle_timeout_minutes=idle_timeout_minutes,
        )))
        self.log = (tmp / "ray-head.log").open("w")
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        ray_bin = Path(sys.executable).with_name("ray")
        env = os.environ | {
            "RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1",
            "RAY_USAGE_STATS_ENABLED": "0",
            # Every node on loopback (see cluster.contract.init_local_ray).
            "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
            # Ray 2.5x turns token auth on for a new head; a private loopback cluster needs none.
            "RAY_AUTH_MODE": "disabled",
        }
        self.proc = subprocess.Popen(
            [str(ray_bin), "start", "--head", "--block", f"--port={self.port}",
             "--node-ip-address=127.0.0.1", "--num-cpus=0", "--include-dashboard=false",
             f"--autoscaling-config={self.config_path}"],
            env=env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True,
        )

    def stop(self) -> None:
        """SIGTERM to the head's processes and every process they started, then SIGKILL."""
        if self.proc is None:
            return
        try:
            procs = [psutil.Process(self.proc.pid)]
            procs += procs[0].children(recursive=True)
        except psutil.NoSuchProcess:
            procs = []
        for p in procs:
            try:
                p.send_signal(signal.SIGTERM)
            except psutil.NoSuchProcess:
                continue
        _, alive = psutil.wait_procs(procs, timeout=15)
        for p in alive:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                continue
        self.proc.wait(timeout=10)
        self.proc = None
        self.log.close()

    def wait_for_head(self, timeout: float = 60) -> None:
        import socket

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"ray start exited with {self.proc.returncode}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return
            except OSError:
                time.sleep(0.3)
        raise RuntimeError(f"the Ray head did not listen on {self.address} in {timeout}s")
