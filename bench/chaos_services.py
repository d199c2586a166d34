"""The chaos campaign's services, each private to the campaign and on loopback, each with the
handles a fault needs: a redis-server (AOF on or off), a PostgreSQL cluster of its own
(initdb/pg_ctl), a multi-node Ray cluster with one tiny-model worker actor per worker node, and
the dispatcher and Telegram bot processes (bench/chaos_proc.py)."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
LOOPBACK = "127.0.0.1"
# Ray declares a silent node dead after about period x threshold.
HEALTH_CHECK = {
    "health_check_period_ms": 500,
    "health_check_timeout_ms": 500,
    "health_check_failure_threshold": 3,
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((LOOPBACK, port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{what} on port {port} did not start within {timeout_s:g} s")


class Redis:
    """A redis-server of the campaign's own: killed, frozen and restarted, AOF on or off."""

    def __init__(self, root: Path) -> None:
        self.port = free_port()
        self.dir = root / "redis"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.proc: subprocess.Popen[bytes] | None = None
        self.paused = False
        self.aof = False

    @property
    def url(self) -> str:
        return f"redis://{LOOPBACK}:{self.port}/0"

    def start(self, *, aof: bool) -> None:
        self.aof = aof
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", LOOPBACK, "--save", "",
             "--appendonly", "yes" if aof else "no", "--appendfsync", "everysec",
             "--dir", str(self.dir), "--protected-mode", "yes"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        wait_port(self.port, 20, "redis-server")

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.kill()
            self.proc.wait(10)
            self.proc = None
        self.paused = False

    def pause(self) -> None:
        if self.proc is not None:
            self.proc.send_signal(signal.SIGSTOP)
            self.paused = True

    def resume(self) -> None:
        if self.proc is not None:
            self.proc.send_signal(signal.SIGCONT)
        self.paused = False


class Postgres:
    """A PostgreSQL cluster of the campaign's own (never the machine's shared server): initdb
    in a temp dir, trust auth on loopback, restarted with ``pg_ctl -m immediate`` (a crash)."""

    def __init__(self, root: Path) -> None:
        bins = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"))
        if not bins:
            raise RuntimeError("no PostgreSQL server binaries under /usr/lib/postgresql")
        self.bin = bins[-1].parent
        self.port = free_port()
        # A folder of its own in /tmp: the server runs as "postgres" where we are root, and
        # may not be able to reach into ``root`` (pytest's tmp_path is private to its user).
        self.dir = Path(tempfile.mkdtemp(prefix="atelier-chaos-pg-"))
        self.data = self.dir / "data"
        self.database = f"chaos_{uuid.uuid4().hex[:8]}"
        self._as_postgres = os.geteuid() == 0  # initdb refuses to run as root

    @property
    def url(self) -> str:
        return f"postgresql://postgres@{LOOPBACK}:{self.port}/{self.database}"

    def _run(self, *args: str) -> None:
        cmd = [str(self.bin / args[0]), *args[1:]]
        if self._as_postgres:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        done = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        if done.returncode != 0:
            raise RuntimeError(f"{args[0]} failed ({done.returncode}): {done.stderr.decode()}")

    def init(self) -> None:
        os.chmod(self.dir, 0o755)
        if self._as_postgres:
            shutil.chown(self.dir, "postgres", "postgres")
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "UTF8")
        self.start()
        import psycopg

        admin = f"postgresql://postgres@{LOOPBACK}:{self.port}/postgres"
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{self.database}"')

    def start(self) -> None:
        # fsync off: only the server process dies here, never the machine, so the OS keeps
        # every write; commits stay synchronous, so none acknowledged is lost in a crash.
        opts = (f"-p {self.port} -k {self.dir} -c listen_addresses={LOOPBACK} -c fsync=off "
                "-c full_page_writes=off -c max_connections=200")
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.dir / "log"), "-o", opts,
                  "-w", "-t", "60", "start")

    def stop(self, mode: str = "fast") -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "-t", "60", "stop")

    def remove(self) -> None:
        """Stop the server (if it runs) and delete its files."""
        with contextlib.suppress(Exception):
            self.stop("immediate")
        shutil.rmtree(self.dir, ignore_errors=True)

    def crash_restart(self) -> None:
        self.stop("immediate")
        self.start()


@dataclasses.dataclass
class Worker:
    node: int
    handle: Any
    name: str
    pid: int


class RayNodes:
    """A head node (no CPUs) and ``n`` worker nodes, each offering one CPU worker slot and a
    ``chaos-node-{i}`` resource pinning worker ``i`` to it; workers are respawned under new
    names (a dead actor's name is held while handles to it live)."""

    def __init__(self, n: int, worker_settings: Any, profile: Any) -> None:
        import ray
        from ray._private import ray_constants
        from ray.cluster_utils import Cluster

        from cluster.dispatcher import RAY_NAMESPACE

        # Loopback only, here and in every raylet; no /tmp/ray/ray_current_cluster, which would
        # send other people's ray.init() to this cluster.
        os.environ[ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR] = "0"
        ray_constants.ENABLE_RAY_CLUSTER = False
        ray._private.utils.write_ray_address = lambda *a, **k: None
        self.n = n
        self.worker_settings = worker_settings
        self.profile = profile
        self.cluster = Cluster(initialize_head=True, head_node_args={
            "node_ip_address": LOOPBACK, "include_dashboard": False, "num_cpus": 0,
            "_system_config": HEALTH_CHECK,
        })
        self.nodes: dict[int, Any] = {}
        self.workers: dict[int, Worker] = {}
        self.generation = 0
        self.lock = threading.Lock()
        for i in range(n):
            self.add_node(i)
        ray.init(address=self.cluster.address, namespace=RAY_NAMESPACE, log_to_driver=False)

    @property
    def address(self) -> str:
        return str(self.cluster.address)

    def add_node(self, i: int) -> None:
        from cluster.contract import device_resource

        self.nodes[i] = self.cluster.add_node(
            node_ip_address=LOOPBACK, num_cpus=1,
            resources={device_resource("cpu"): 1, f"chaos-node-{i}": 1},
        )

    def remove_node(self, i: int) -> None:
        """Every process of node ``i`` killed at once (raylet, worker): the machine is gone."""
        with self.lock:
            self.workers.pop(i, None)
            node = self.nodes.pop(i)
        self.cluster.remove_node(node, allow_graceful=False)

    def kill_worker(self, i: int) -> None:
        with self.lock:
            worker = self.workers.pop(i, None)
        if worker is not None:
            with_suppress(lambda: os.kill(worker.pid, signal.SIGKILL))

    def spawn(self, i: int) -> Worker:
        import ray

        from cluster.contract import device_resource
        from cluster.dispatcher import WORKER_NAME_PREFIX
        from engine.actor import spawn_worker

        with self.lock:
            self.generation += 1
            name = f"{WORKER_NAME_PREFIX}-chaos{i}-g{self.generation}"
        handle = spawn_worker(
            settings=self.worker_settings, device_class="cpu", profile=self.profile, name=name,
            timeout_s=180, resources={device_resource("cpu"): 1, f"chaos-node-{i}": 1},
        )
        ray.get(handle.preload.remote("tiny"), timeout=180)
        pid = int(ray.get(handle.health.remote(), timeout=30)["pid"])
        worker = Worker(i, handle, name, pid)
        with self.lock:
            self.workers[i] = worker
        return worker

    def heal(self, i: int) -> None:
        """Node ``i``'s worker answering again (blocking: call it in a thread). The node
        itself must be back first: ``add_node`` belongs on the main thread (Ray installs
        signal handlers there)."""
        import ray

        worker = self.workers.get(i)
        if worker is not None:
            try:
                ray.get(worker.handle.health.remote(), timeout=10)
                return
            except Exception:
                with self.lock:
                    self.workers.pop(i, None)
                with_suppress(lambda: ray.kill(worker.handle))
        self.spawn(i)

    def shutdown(self) -> None:
        import ray

        with_suppress(ray.shutdown)
        with_suppress(self.cluster.shutdown)


def with_suppress(fn: Any) -> None:
    with contextlib.suppress(Exception):
        fn()


class Process:
    """One ``python -m bench.chaos_proc`` child (a dispatcher or the bot), restartable."""

    def __init__(self, role: str, env: dict[str, str], logs: Path, *args: str) -> None:
        self.role = role
        self.env = env
        self.logs = logs
        self.args = args
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self) -> None:
        self.starts += 1
        log_file = self.logs / f"{self.role}.log"
        with log_file.open("ab") as out:
            out.write(f"\n==== start {self.starts} ====\n".encode())
            out.flush()
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "bench.chaos_proc", *self.args], cwd=ROOT,
                env=self.env, stdout=out, stderr=subprocess.STDOUT,
            )

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.alive and self.proc is not None else None

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(10)
            self.proc = None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.proc = None
