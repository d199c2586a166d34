"""Serving the web app: the ``WebContext`` built from a running stack, and uvicorn inside the
caller's event loop (``atelier up``) or on its own (``atelier web``)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Awaitable, Iterator

import uvicorn

from atelier.service import Stack, serve_metrics, shared_stack, stop_on_signals
from atelier.wiring import console, fail, settings_or_exit
from cluster.health import Probe, broker_check, store_check, with_probe
from cluster.supervise import supervise
from core.errors import AtelierError, ConfigError
from core.logs import setup_logging
from core.redact import redact_url
from core.settings import Settings, parse_listen
from storage.blobs import BlobStore
from web.context import WebContext


class _InLoopServer(uvicorn.Server):
    """uvicorn without its own signal handling: the process that embeds it owns Ctrl-C."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def web_context(stack: Stack) -> WebContext:
    """The web app's dependencies over a started stack."""
    return WebContext(
        settings=stack.settings,
        sessions=stack.sessions,
        blobs=BlobStore.from_settings(stack.settings),
        client=stack.client,
    )


def _bind(settings: Settings, port: int | None = None) -> socket.socket:
    """A listening socket on ATELIER_WEB_LISTEN (``port``: this one instead of its port)."""
    host, listen_port = parse_listen(settings.web_listen)
    port = listen_port if port is None else port
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ConfigError(
            f"cannot listen on ATELIER_WEB_LISTEN={settings.web_listen!r}: {exc.strerror}"
        ) from None
    sock.listen(128)
    sock.setblocking(False)
    return sock


def listen_url(settings: Settings, sock: socket.socket) -> str:
    """The address the app answers on (the bound port, which matters when 0 was asked)."""
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}"


@contextlib.asynccontextmanager
async def serve_web(stack: Stack) -> AsyncIterator[str]:
    """Serve the web app in this event loop while the block runs; yields the listen URL."""
    from web.app import create_app
    from web.gallery.deliveries import settle_deliveries

    app = create_app(web_context(stack))
    # /metrics and /readyz (store and broker reachable) on the web app's own port unless the
    # metrics port serves them (ATELIER_METRICS__ON_WEB_PORT); /healthz is the app's own.
    checks = {"store": store_check(stack.sessions), "broker": broker_check(stack.broker)}
    probe = Probe(checks, timeout_s=stack.settings.metrics.check_timeout_s)
    sock = _bind(stack.settings)
    paths = frozenset({"/metrics", "/readyz"})
    if not stack.settings.metrics.probes_on_web_port:
        paths = frozenset()
    config = uvicorn.Config(
        with_probe(app, probe, paths), log_level="warning",
        lifespan="off", proxy_headers=True, access_log=False,
    )
    url = listen_url(stack.settings, sock)
    bound_port = sock.getsockname()[1]
    servers: list[_InLoopServer] = []

    def serve() -> Awaitable[None]:
        # uvicorn closes its sockets when it ends: a restart listens again on the same port.
        listening = sock if not servers else _bind(stack.settings, bound_port)
        servers.append(_InLoopServer(config))
        return servers[-1].serve(sockets=[listening])

    # Both supervised: an unexpected end is logged and they start again.
    stop = asyncio.Event()
    task = asyncio.create_task(supervise("web server", serve, stop))
    settling = asyncio.create_task(
        supervise("web deliveries", lambda: settle_deliveries(stack.client, stop), stop)
    )
    try:
        while not (servers and servers[-1].started):
            if task.done() or len(servers) > 1:  # it ended before it started (logged)
                raise ConfigError(f"the web app did not start on {stack.settings.web_listen}")
            await asyncio.sleep(0.02)
        yield url
    finally:
        stop.set()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(settling, timeout=5)
        if servers:
            servers[-1].should_exit = True
        with contextlib.suppress(Exception):
            await asyncio.wait_for(task, timeout=10)
        sock.close()


def web_lines(settings: Settings, url: str) -> list[str]:
    """What start-up prints about the web app."""
    lines = [f"web: {url}"]
    public = settings.public_base_url.rstrip("/")
    if public != url:
        lines.append(f"  links point at {public} (ATELIER_PUBLIC_BASE_URL)")
    return lines


def web() -> None:
    """Run the web app (gallery and APIs) on its own, over the shared Redis and database (the
    dispatchers and workers run elsewhere). `atelier up` serves it in-process instead."""
    settings = settings_or_exit()
    setup_logging(settings.log_format, settings.log_level)
    try:
        asyncio.run(_web(settings))
    except AtelierError as exc:
        raise fail(exc) from None


async def _web(settings: Settings) -> None:
    stop = stop_on_signals()
    # The shared Redis: jobs made from the gallery go to the dispatchers running elsewhere.
    async with (
        shared_stack(settings) as stack, serve_web(stack) as url,
        serve_metrics(settings, stack, with_ray=False),  # ATELIER_METRICS__PORT, if set
    ):
        console.print("[bold]Atelier web is up[/bold]")
        for line in web_lines(settings, url):
            console.print(f"  {line}")
        console.print(f"  database: {redact_url(settings.db_url)}")
        console.print("Ctrl-C stops it.")
        await stop.wait()
