"""`atelier web` as a real process over the shared Redis: serves the app on ATELIER_WEB_LISTEN
(port 0: any free one, printed at start-up), answers, and stops cleanly; a taken port, a
malformed listen address or no Redis is a one-line error naming the variable."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

ATELIER = [sys.executable, "-c", "from atelier.cli import app; app()"]


def _env(data_dir: Path, listen: str, redis_url: str | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ATELIER_")}
    return env | {
        "ATELIER_DATA_DIR": str(data_dir), "ATELIER_WEB_LISTEN": listen, "COLUMNS": "200",
        "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost",
    } | ({"ATELIER_REDIS_URL": redis_url} if redis_url else {})


def _start(
    tmp_path: Path, listen: str, redis_url: str
) -> tuple[subprocess.Popen[str], dict[str, str]]:
    env = _env(tmp_path / "data", listen, redis_url)
    subprocess.run([*ATELIER, "db", "upgrade"], env=env, check=True, capture_output=True)
    proc = subprocess.Popen([*ATELIER, "web"], env=env, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    return proc, env


def test_atelier_web_serves_the_app_and_prints_its_url(tmp_path: Path, redis_url: str) -> None:
    proc, _ = _start(tmp_path, "127.0.0.1:0", redis_url)
    assert proc.stdout is not None
    lines: list[str] = []
    deadline = time.monotonic() + 60
    try:
        while time.monotonic() < deadline and not any("Ctrl-C" in line for line in lines):
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
        text = "".join(lines)
        match = re.search(r"web: (http://127\.0\.0\.1:\d+)", text)
        assert match, text
        url = match.group(1)
        assert httpx.get(f"{url}/healthz", timeout=10).json() == {"status": "ok"}
        refused = httpx.get(f"{url}/g/not-a-token", timeout=10)
        assert refused.status_code == 403 and "malformed" in refused.text
        assert "links point at http://127.0.0.1:8000" in text  # ATELIER_PUBLIC_BASE_URL
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0


def test_a_taken_port_names_the_variable(tmp_path: Path, redis_url: str) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        proc, _ = _start(tmp_path, f"127.0.0.1:{port}", redis_url)
        out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 1, out
    assert f"cannot listen on ATELIER_WEB_LISTEN='127.0.0.1:{port}'" in out


def test_a_malformed_listen_address_names_the_variable(tmp_path: Path) -> None:
    env = _env(tmp_path / "data", "localhost")
    done = subprocess.run([*ATELIER, "web"], env=env, text=True, capture_output=True,
                          timeout=60)
    assert done.returncode == 2
    assert "ATELIER_WEB_LISTEN" in done.stderr and "HOST:PORT" in done.stderr


def test_without_the_shared_redis_it_says_so(tmp_path: Path) -> None:
    env = _env(tmp_path / "data", "127.0.0.1:0")
    subprocess.run([*ATELIER, "db", "upgrade"], env=env, check=True, capture_output=True)
    done = subprocess.run([*ATELIER, "web"], env=env, text=True, capture_output=True,
                          timeout=60)
    assert done.returncode == 1 and "ATELIER_REDIS_URL" in done.stderr


def test_probe_paths_on_the_metrics_port_not_the_public_one(
    tmp_path: Path, redis_url: str
) -> None:
    """With ATELIER_METRICS__PORT set, /metrics and /readyz answer there (unpublished in
    deploy/compose.yaml) and the public port serves the app only (/healthz is the app's)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        metrics_port = s.getsockname()[1]
    env = _env(tmp_path / "data", "127.0.0.1:0", redis_url) | {
        "ATELIER_METRICS__PORT": str(metrics_port)}
    subprocess.run([*ATELIER, "db", "upgrade"], env=env, check=True, capture_output=True)
    proc = subprocess.Popen([*ATELIER, "web"], env=env, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    assert proc.stdout is not None
    lines: list[str] = []
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not any("Ctrl-C" in line for line in lines):
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
        match = re.search(r"web: (http://127\.0\.0\.1:\d+)", "".join(lines))
        assert match, "".join(lines)
        public = match.group(1)
        assert httpx.get(f"{public}/healthz", timeout=10).status_code == 200
        assert httpx.get(f"{public}/metrics", timeout=10).status_code == 404
        assert httpx.get(f"{public}/readyz", timeout=10).status_code == 404
        private = f"http://127.0.0.1:{metrics_port}"
        assert "atelier_" in httpx.get(f"{private}/metrics", timeout=10).text
        ready = httpx.get(f"{private}/readyz", timeout=10)
        assert ready.status_code == 200 and "broker: ok" in ready.text, ready.text
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0
