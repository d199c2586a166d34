"""/metrics, /healthz and /readyz for every long-running process: the answers (``Probe``), an
ASGI app a web server mounts, and a small standalone HTTP server for processes without one
(dispatchers, bots). Readiness asks the store, the broker and Ray, each within a timeout, and
names every supervised part of the process that is down (cluster/supervise.py).

Workers have no endpoint of their own: they are Ray actors that may come and go with their
nodes, and every fact about them (batches, busy time, model loads and their time) passes
through the dispatcher that runs their batches, which counts it (a worker reports its model
loads with each batch's results). Scraping the dispatchers therefore covers the workers,
without a port per actor or Ray's metrics agent."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, generate_latest
from sqlalchemy import text
from sqlalchemy.orm import sessionmaker
from sqlmodel import Session

from cluster.broker import Broker
from cluster.supervise import PARTS, Parts

log = logging.getLogger(__name__)

Check = Callable[[], Awaitable[None]]  # raises (or times out) when the part is not reachable


def store_check(sessions: sessionmaker[Session]) -> Check:
    def ping() -> None:
        with sessions() as session:
            session.execute(text("SELECT 1"))

    async def check() -> None:
        await asyncio.to_thread(ping)

    return check


def broker_check(broker: Broker) -> Check:
    async def check() -> None:
        if not await broker.ping(timeout_s=1.0):
            raise ConnectionError(f"the {broker.kind} broker does not answer")

    return check


def ray_check() -> Check:
    async def check() -> None:
        import ray

        if not ray.is_initialized():
            raise ConnectionError("Ray is not initialized in this process")
        # Asks the GCS: fails (or hangs, hence the caller's timeout) when the head is gone.
        await asyncio.to_thread(ray.cluster_resources)

    return check


@dataclass
class Probe:
    """What the endpoints answer, for one process: its readiness checks by name, and its
    supervised parts (``parts``), each ready only while it runs."""

    checks: dict[str, Check] = field(default_factory=dict)
    timeout_s: float = 2.0
    registry: CollectorRegistry = REGISTRY
    parts: Parts = field(default_factory=lambda: PARTS)

    async def readiness(self) -> dict[str, str]:
        """"ok" or why not, per check and then per supervised part; the checks run side by
        side, each within the timeout."""

        async def one(check: Check) -> str:
            try:
                await asyncio.wait_for(check(), self.timeout_s)
            except TimeoutError:
                return f"no answer within {self.timeout_s:g}s"
            except Exception as exc:
                return f"{type(exc).__name__}: {exc}"[:300]
            return "ok"

        names = list(self.checks)
        results = await asyncio.gather(*(one(self.checks[n]) for n in names))
        return dict(zip(names, results, strict=True)) | self.parts.states()

    async def respond(self, path: str) -> tuple[int, str, bytes]:
        """(status, content type, body) for a GET of ``path``."""
        if path == "/metrics":
            return 200, CONTENT_TYPE_LATEST, generate_latest(self.registry)
        if path == "/healthz":
            return 200, "text/plain; charset=utf-8", b"ok\n"
        if path == "/readyz":
            states = await self.readiness()
            ready = all(v == "ok" for v in states.values())
            body = "".join(f"{k}: {v}\n" for k, v in states.items()) or "ok\n"
            return (200 if ready else 503), "text/plain; charset=utf-8", body.encode()
        return 404, "text/plain; charset=utf-8", b"not found\n"


def asgi_app(probe: Probe) -> Callable[..., Awaitable[None]]:
    """An ASGI app answering /metrics, /healthz and /readyz (mount it in a web app, e.g.
    ``app.mount("/", ...)`` after the app's own routes, or serve it as is)."""

    async def app(scope: Mapping[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        status, ctype, body = await probe.respond(scope["path"])
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", ctype.encode())]})
        await send({"type": "http.response.body", "body": body})

    return app


PROBE_PATHS = frozenset({"/metrics", "/healthz", "/readyz"})


def with_probe(
    app: Callable[..., Awaitable[None]], probe: Probe, paths: frozenset[str] = PROBE_PATHS
) -> Callable[..., Awaitable[None]]:
    """``app`` with the probe's ``paths`` answered in front of it (a web app's own port then
    serves them; every other path and the lifespan go to ``app``)."""
    endpoints = asgi_app(probe)

    async def wrapped(scope: Mapping[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"] in paths:
            await endpoints(scope, receive, send)
        else:
            await app(scope, receive, send)

    return wrapped


class MetricsServer:
    """The endpoints on their own port, in this process's event loop (aiohttp: it installs no
    signal handlers of its own, so the process's SIGTERM handling stays as it is)."""

    def __init__(self, probe: Probe, host: str, port: int) -> None:
        self.probe = probe
        self.host = host
        self.port = port
        self._runner: Any = None

    async def start(self) -> MetricsServer:
        from aiohttp import web

        async def handle(request: web.Request) -> web.Response:
            status, ctype, body = await self.probe.respond(request.path)
            return web.Response(status=status, body=body, headers={"Content-Type": ctype})

        app = web.Application()
        app.router.add_get("/{tail:.*}", handle)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, self.host, self.port)
        await site.start()
        self._runner = runner
        if self.port == 0:  # an ephemeral port (tests): find out which
            server = getattr(site, "_server", None)
            sockets = getattr(server, "sockets", None) or []
            if sockets:
                self.port = int(sockets[0].getsockname()[1])
        log.info("metrics and health on http://%s:%d (/metrics /healthz /readyz)",
                 self.host, self.port)
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
