"""The fast tier's marking (tests/conftest.py): a test is `services` / `pipelines` when any
fixture in its closure starts Ray or builds pipelines, wherever that fixture is defined."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _fast_tier_collects(*paths: str) -> str:
    env = {**os.environ, "ATELIER_TEST_FAST": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
         "-m", "not services and not pipelines", *paths],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    return done.stdout + done.stderr


def test_tests_reaching_ray_through_fixtures_are_left_out_of_the_fast_tier() -> None:
    # The browser tests reach Ray and the tiny pipelines through `live` -> `web_ray_worker`
    # and `web_tiny_dir`, fixtures of tests/web/conftest.py that no list of names knew.
    out = _fast_tier_collects("tests/web/test_browser.py", "tests/web/test_links.py")
    assert "test_browser.py::" not in out, out
    assert "test_links.py::test_a_link_signs_in" in out, out  # the rest stays in
    assert "deselected" in out, out
