"""Shared test fixtures: real services (a private Redis), settings in a temp data dir."""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import inspect
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import ModuleType

import pytest

from core.settings import Settings, load_settings
from testing.net import free_port

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("NO_PROXY", "127.0.0.1,localhost")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# Ray 2.5x turns token auth on, process-wide, for the first local cluster a process starts; a
# later test's own multi-node cluster (test_autoscaling) then loses its workers. Test Rays are
# private and on loopback: no tokens.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

REQUIRE_SERVICES = os.environ.get("ATELIER_REQUIRE_SERVICES") == "1"
# The fast tier (`make test-fast`): only tests that need no Ray, Redis or PostgreSQL, selected
# with `-m "not services"`. Here a test that reaches for one anyway fails, naming it, instead
# of quietly making the tier slow: Redis and PostgreSQL refuse to start, Ray cannot be imported.
FAST_TIER = os.environ.get("ATELIER_TEST_FAST") == "1"
# Fixtures that stand for a service: a test using one is marked `services`.
SERVICE_FIXTURES = frozenset({"redis_server", "redis_url", "private_redis", "pg_admin"})
# Parametrized fixtures whose value names a service (PostgreSQL, the Redis broker).
SERVICE_PARAMS = {"db_url": "postgresql", "broker": "redis"}
# Fixtures that build tiny Diffusers pipelines (seconds each on a CPU): marked `pipelines`,
# also left out of the fast tier.
PIPELINE_FIXTURES = frozenset({"tiny_models"})
# Calls that start Ray (a service) or build tiny pipelines: a fixture whose own body makes one
# marks every test with that fixture anywhere in its closure (tests/web's browser tests reach
# Ray through `live` -> `web_ray_worker`, a fixture no name list knew).
RAY_CALLS = ("init_local_ray(", "ray.init(", "spawn_worker(")
PIPELINE_CALLS = ("make_tiny_models(",)
# Modules all of whose tests start Ray or run pipelines: not even collected in the fast tier
# (importing torch, Diffusers and Ray alone would take much of its minute).
HEAVY_MODULES = frozenset({
    "test_metrics.py", "test_autoscaling.py",
    "test_engine.py", "test_tiny.py", "test_cache.py", "test_stepcache.py", "test_pipeline.py",
    "test_worker.py", "test_faults.py", "test_chaos.py", "test_worker_loading.py",
    "test_loras.py",
})


def forbid_in_fast_tier(what: str) -> None:
    if FAST_TIER:
        pytest.fail(f"{what} used in the fast tier: mark the test (or its module) `services`")


class _NoRayInFastTier(importlib.abc.MetaPathFinder):
    """Lets ``ray`` be imported (modules import it at the top) but not started: in the fast
    tier its ``ray.init`` fails the test that calls it."""

    def find_spec(
        self, name: str, path: Sequence[str] | None = None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if name != "ray":
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None:
            return spec
        loader = spec.loader
        load = loader.exec_module

        def exec_module(module: ModuleType) -> None:
            load(module)

            def init(*args: object, **kwargs: object) -> None:
                forbid_in_fast_tier("Ray (ray.init)")

            module.init = init  # type: ignore[attr-defined]

        loader.exec_module = exec_module  # type: ignore[method-assign]
        return spec


if FAST_TIER:
    sys.meta_path.insert(0, _NoRayInFastTier())


def pytest_ignore_collect(collection_path: Path) -> bool | None:
    if FAST_TIER and collection_path.name in HEAVY_MODULES:
        return True
    return None


def _calls(func: object) -> frozenset[str]:
    """Which of RAY_CALLS and PIPELINE_CALLS a fixture's (or test's) own body makes."""
    try:
        source = inspect.getsource(func)  # type: ignore[arg-type]
    except (OSError, TypeError):
        return frozenset()
    return frozenset(c for c in RAY_CALLS + PIPELINE_CALLS if c in source)


def _fixture_calls(item: pytest.Item, cache: dict[object, frozenset[str]]) -> set[str]:
    """What the fixtures of ``item`` (its whole closure: those its fixtures use too, wherever
    they are defined) and the test itself call, of RAY_CALLS and PIPELINE_CALLS."""
    info = getattr(item, "_fixtureinfo", None)
    defs = getattr(info, "name2fixturedefs", {})
    funcs: list[object] = [getattr(item, "function", None)]
    for name in getattr(item, "fixturenames", ()):
        funcs.extend(d.func for d in defs.get(name, ()))
    found: set[str] = set()
    for func in funcs:
        if func is not None:
            if func not in cache:
                cache[func] = _calls(func)
            found |= cache[func]
    return found


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark every test that needs Redis or PostgreSQL (by its fixtures) or starts Ray (a
    fixture in its closure, or the test itself, calls one of RAY_CALLS; or it is in a
    HEAVY_MODULES module) `services`, every one that builds pipelines `pipelines`. Should one
    still call ray.init unmarked, the fast tier fails it."""
    cache: dict[object, frozenset[str]] = {}
    for item in items:
        fixtures = set(getattr(item, "fixturenames", ()))
        params = getattr(getattr(item, "callspec", None), "params", {})
        calls = _fixture_calls(item, cache)
        if (
            fixtures & SERVICE_FIXTURES
            or any(params.get(name) == value for name, value in SERVICE_PARAMS.items())
            or item.path.name in HEAVY_MODULES
            or calls & set(RAY_CALLS)
        ):
            item.add_marker(pytest.mark.services)
        if fixtures & PIPELINE_FIXTURES or calls & set(PIPELINE_CALLS):
            item.add_marker(pytest.mark.pipelines)


def service_missing(what: str) -> None:
    """Skip on a developer's machine without the service; fail in CI, where it must exist."""
    if REQUIRE_SERVICES:
        pytest.fail(f"{what} is required (ATELIER_REQUIRE_SERVICES=1) but not available")
    pytest.skip(f"{what} not available")


class RedisServer:
    """A private redis-server on a free loopback port, so tests never touch a shared one."""

    def __init__(self, tmp: Path) -> None:
        self.port = free_port()
        self.dir = tmp
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        forbid_in_fast_tier("redis-server")
        self.proc = subprocess.Popen(
            [
                "redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
                "--save", "", "--appendonly", "no", "--dir", str(self.dir),
                "--protected-mode", "yes",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"redis-server on port {self.port} did not start")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
            self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()


@pytest.fixture(autouse=True)
def _root_logging_restored() -> Iterator[None]:
    """The root logger as it was before the test: a command run through CliRunner sets up
    logging (``core.logs.setup_logging``) on the runner's stderr, closed once it returns,
    and every later test's log line would then be a "Logging error"."""
    root = logging.getLogger()
    before, level = set(root.handlers), root.level
    yield
    for handler in list(root.handlers):  # pytest's own (subclasses) come and go per phase
        if type(handler) is logging.StreamHandler and handler not in before:
            root.removeHandler(handler)
    root.setLevel(level)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    if shutil.which("redis-server") is None:
        service_missing("redis-server")
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> Iterator[str]:
    import redis

    client = redis.Redis.from_url(redis_server.url)
    client.flushall()
    yield redis_server.url
    client.close()


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return load_settings(data_dir=tmp_path / "data", _env_file=None)


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A Redis of this test's own, to kill or freeze. No persistence (``--save ""
    --appendonly no``), as keys.py plans for: a restart loses every stream."""
    if shutil.which("redis-server") is None:
        service_missing("redis-server")
    server = RedisServer(tmp_path / "redis")
    server.dir.mkdir()
    server.start()
    yield server
    if server.proc is not None:
        server.proc.send_signal(signal.SIGCONT)  # a frozen one would not hear SIGTERM
    server.stop()
