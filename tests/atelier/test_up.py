"""`atelier up` as a real process serves a job submitted from another process: the README's
service command, over a private Redis, a SQLite store, a local Ray and the tiny model."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from PIL import Image

from atelier.serve import DEMO_EXAMPLE
from engine.demo.scenes import Scene, Shape
from engine.demo.score import score
from engine.tiny import make_tiny_models
from tests.atelier.helpers import wait_for_line

ATELIER = [sys.executable, "-c", "from atelier.cli import app; app()"]


def _env(data_dir: Path, redis_url: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ATELIER_")}
    env |= {
        "ATELIER_DATA_DIR": str(data_dir),
        "ATELIER_REDIS_URL": redis_url,
        "HF_HUB_OFFLINE": "1",
        "NO_PROXY": "127.0.0.1,localhost",
        "no_proxy": "127.0.0.1,localhost",
        "RAY_USAGE_STATS_ENABLED": "0",
        "COLUMNS": "200",
        "ATELIER_WEB_LISTEN": "127.0.0.1:0",  # any free port: tests run side by side
    }
    return env


@pytest.mark.slow
def test_atelier_up_serves_a_job_from_another_process(tmp_path: Path, redis_url: str) -> None:
    data_dir = tmp_path / "data"
    make_tiny_models(data_dir / "models", seed=0)
    env = _env(data_dir, redis_url)
    subprocess.run([*ATELIER, "db", "upgrade"], env=env, check=True, cwd=tmp_path,
                   capture_output=True)
    up = subprocess.Popen(
        [*ATELIER, "up"], env=env, cwd=tmp_path, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )
    try:
        banner = "".join(wait_for_line(up, "Ctrl-C stops it", timeout=150))
        assert "broker: redis" in banner and "workers: cpu" in banner, banner
        web_url = next(w for w in banner.split() if w.startswith("http://127.0.0.1:"))
        assert httpx.get(f"{web_url}/healthz", timeout=10).json() == {"status": "ok"}
        # Each model's availability, with how to get a missing one.
        assert "tiny: available (folder)" in banner, banner
        assert "sd15: not available (it is not in the Hugging Face cache" in banner, banner
        assert "huggingface-cli download stable-diffusion-v1-5/stable-diffusion-v1-5" in banner
        # The default (sd15) is not here: prompts naming no model get the demo model, and
        # start-up says so and why; the hint is a prompt the demo model draws.
        assert "default model: demo, since the configured default sd15 is not available" in (
            banner), banner
        assert f'atelier imagine "{DEMO_EXAMPLE}"\n' in banner, banner
        drawn = tmp_path / "drawn"
        done = subprocess.run(
            [*ATELIER, "imagine", "a red circle on a blue background --seed 3", "--out",
             str(drawn), "--via-queue"],
            env=env, cwd=tmp_path, text=True, capture_output=True, timeout=150,
        )
        assert done.returncode == 0, done.stdout + done.stderr
        assert "of model demo" in done.stdout, done.stdout
        (png,) = sorted(drawn.glob("*.png"))
        assert f"{png}  seed 3" in done.stdout
        with Image.open(png) as im:
            found = score(im, Scene("blue", (Shape("red", "circle"),)))
        assert found["background"] and found["colour"], found
        out = tmp_path / "out"
        done = subprocess.run(
            [*ATELIER, "imagine", "a red fox --style watercolor,anime --w 64 --h 64 --steps 2",
             "--model", "tiny", "--out", str(out), "--via-queue"],
            env=env, cwd=tmp_path, text=True, capture_output=True, timeout=150,
        )
        assert done.returncode == 0, done.stdout + done.stderr
        pngs = sorted(out.glob("*.png"))
        assert len(pngs) == 2, done.stdout  # one image per style
        for png in pngs:
            with Image.open(png) as im:
                assert im.size == (64, 64)
                assert "Styles: " in im.info["parameters"]
            assert f"{png}  seed " in done.stdout
    finally:
        up.send_signal(signal.SIGINT)
        try:
            rc = up.wait(timeout=60)
        except subprocess.TimeoutExpired:
            up.kill()
            raise
    assert rc == 0


def test_via_queue_needs_redis(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ATELIER_")}
    env["ATELIER_DATA_DIR"] = str(tmp_path)
    done = subprocess.run(
        [*ATELIER, "imagine", "a fox", "--via-queue"], env=env, cwd=tmp_path, text=True,
        capture_output=True, timeout=60,
    )
    assert done.returncode == 2
    assert "--via-queue needs ATELIER_REDIS_URL" in done.stderr
