"""A new user's first run, on a box that cannot reach the Hugging Face hub and was never told so
(no HF_HUB_OFFLINE; the hub at a closed loopback port): a fresh data dir, `atelier up` as the
README starts it, then the `Try:` command it prints and the README's demo commands, read from
README.md itself, each making its images within a bounded time."""

from __future__ import annotations

import logging
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from PIL import Image

from cluster.hub import UNREACHABLE
from testing.hub import closed_port_url
from tests.atelier.helpers import wait_for_line

REPO = Path(__file__).resolve().parents[2]
# Bounds for a loaded CI box; on two idle cores the whole first run takes well under two minutes.
UP_TIMEOUT_S = 150
IMAGINE_TIMEOUT_S = 150


def _atelier() -> list[str]:
    """The installed `atelier` script beside this Python (the README's .venv/bin/atelier)."""
    script = Path(sys.executable).parent / "atelier"
    if script.is_file():
        return [str(script)]
    return [sys.executable, "-c", "from atelier.cli import app; app()"]


def readme_demo_commands() -> list[str]:
    """The lines of the ```bash block after "Try it offline" in README.md."""
    text = (REPO / "README.md").read_text("utf-8")
    after = text[text.index("Try it offline"):]
    block = re.search(r"```bash\n(.*?)```", after, re.S)
    assert block is not None, "README.md has no ```bash block after 'Try it offline'"
    return [ln for ln in block.group(1).splitlines() if ln.strip() and not ln.startswith("#")]


def _argv(command: str, out_dir: Path) -> list[str]:
    """A README command as argv: its `atelier` is the installed script; its output folder
    (/tmp/demo) a private one, since tests run side by side."""
    words = shlex.split(command)
    assert words[0] in (".venv/bin/atelier", "atelier"), command
    return [*_atelier(), *(str(out_dir) if w == "/tmp/demo" else w for w in words[1:])]


def _new_user_env(data_dir: Path, hf_home: Path) -> dict[str, str]:
    drop = ("ATELIER_", "HF_", "HUGGINGFACE_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
    assert "HF_HUB_OFFLINE" not in env  # tests/conftest.py sets it for this process only
    env |= {
        "ATELIER_DATA_DIR": str(data_dir),
        "HF_ENDPOINT": closed_port_url(),  # the hub cannot be reached from here
        "HF_HOME": str(hf_home),  # a fresh Hugging Face cache: nothing downloaded before
        "NO_PROXY": "127.0.0.1,localhost",
        "no_proxy": "127.0.0.1,localhost",
        "RAY_USAGE_STATS_ENABLED": "0",
        "COLUMNS": "200",
        "ATELIER_WEB_LISTEN": "127.0.0.1:0",  # any free port: tests run side by side
    }
    return env


def _made_images(done: subprocess.CompletedProcess[str], want: int, cwd: Path) -> list[Path]:
    """The PNGs a finished `atelier imagine` printed ("PATH  seed N"), checked to exist."""
    out = done.stdout + done.stderr
    assert done.returncode == 0, out
    assert "of model demo" in out, out
    paths = [cwd / m.group(1) for m in re.finditer(r"^(\S+\.png)  seed \d+$", done.stdout, re.M)]
    assert len(paths) == want, out
    for path in paths:
        with Image.open(path) as im:
            assert im.size == (128, 128)  # the demo model's own default size
    return paths


def _the_apis_follow_the_model(banner: str, env: dict[str, str], cwd: Path) -> None:
    """With a key made as the README makes one: the A1111 API reports the model a call without
    an override gets (the demo model), and lists only what can be loaded."""
    web = re.search(r"web: (http://127\.0\.0\.1:\d+)", banner)
    assert web is not None, banner
    made = subprocess.run([*_atelier(), "apikey", "create", "telegram:12345", "--name", "st"],
                          env=env, cwd=cwd, text=True, capture_output=True, timeout=60)
    key = next((w for w in made.stdout.split() if w.startswith("atk_")), None)
    assert key is not None, made.stdout + made.stderr
    with httpx.Client(base_url=web.group(1), timeout=30, auth=("me", key)) as http:
        options = http.get("/sdapi/v1/options").json()
        assert options["sd_model_checkpoint"] == "demo", options
        titles = [m["title"] for m in http.get("/sdapi/v1/sd-models").json()]
        assert "demo" in titles and "sd15" not in titles, titles
        # (What a bare call gets and the size scaled to the model: tests/web/api.)


def _start(argv: list[str], env: dict[str, str], cwd: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(argv, env=env, cwd=cwd, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)


def _finish(proc: subprocess.Popen[str], timeout: float) -> subprocess.CompletedProcess[str]:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"{proc.args} did not finish in {timeout:g}s:\n{out}\n{err}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


@pytest.mark.slow
@pytest.mark.services  # local Ray in each process (not the fast tier)
@pytest.mark.pipelines
@pytest.mark.timeout(420)
def test_a_new_user_without_the_hub_gets_pictures(tmp_path: Path) -> None:
    began = time.monotonic()
    env = _new_user_env(tmp_path / "data", tmp_path / "hf")
    demo = readme_demo_commands()
    # The README's first line, `atelier db upgrade`, is also the first half of `make up`.
    assert demo[0].endswith("atelier db upgrade") and len(demo) == 3, demo
    migrated = subprocess.run(_argv(demo[0], tmp_path), env=env, cwd=tmp_path, text=True,
                              capture_output=True, timeout=60)
    assert migrated.returncode == 0, migrated.stdout + migrated.stderr
    # Then, side by side as a person with two terminals would: `atelier up`, and the README's
    # two demo prompts (each runs its own local Ray and worker: no Redis here).
    up = subprocess.Popen([*_atelier(), "up"], env=env, cwd=tmp_path, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    out_dir = tmp_path / "demo"
    prompts = [_start(_argv(command, out_dir), env, tmp_path) for command in demo[1:]]
    try:
        banner = "".join(wait_for_line(up, "Ctrl-C stops it", timeout=UP_TIMEOUT_S))
        # Hub models are missing, and why; the default falls back to the demo model, saying so.
        assert f"sd15: not available ({UNREACHABLE}); " in banner, banner
        assert f"sdxl: not available ({UNREACHABLE}); " in banner, banner
        assert "demo: available (folder)" in banner, banner
        assert ("default model: demo, since the configured default sd15 is not available "
                f"({UNREACHABLE})") in banner, banner
        try_line = banner.rsplit("Try: ", 1)[1].strip()
        assert try_line.startswith("atelier imagine "), banner
        _the_apis_follow_the_model(banner, env, tmp_path)
        # The free tier runs two jobs at a time: the `Try:` prompt once the first is done.
        _made_images(_finish(prompts[0], IMAGINE_TIMEOUT_S), 1, tmp_path)
        tried = tmp_path / "try"
        tried.mkdir()
        try_it = _start(_argv(try_line, tried), env, tried)
        _made_images(_finish(prompts[1], IMAGINE_TIMEOUT_S), 3, tmp_path)  # one per style
        _made_images(_finish(try_it, IMAGINE_TIMEOUT_S), 1, tried)
    finally:
        for proc in prompts:
            if proc.poll() is None:
                proc.kill()
        up.send_signal(signal.SIGINT)
        try:
            rest, _ = up.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            up.kill()
            raise
    # Nothing tried a download, nothing was taken for dead meanwhile.
    log = banner + rest
    assert "could not be downloaded" not in log and "marked dead" not in log, log
    assert up.returncode == 0, log
    logging.getLogger(__name__).warning("first run: %.0fs", time.monotonic() - began)
