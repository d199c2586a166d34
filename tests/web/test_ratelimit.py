"""Rate limits of the web app, per API key and per client address: the request over the limit
gets 429 with Retry-After and a message naming the limit; probes are never counted; two web
processes on one Redis share the count; a broker that does not answer lets requests through."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path

import httpx
from sqlalchemy.orm import sessionmaker
from sqlmodel import Session

from cluster.broker import Broker
from cluster.broker_memory import MemoryBroker
from cluster.broker_redis import RedisBroker
from cluster.client import Client
from cluster.registry import ModelRegistry
from core.prompts import default_blocklist
from core.settings import Settings, WebRate, load_settings
from core.styles import default_registry
from storage import apikeys
from storage.blobs import BlobStore
from storage.db import transaction
from tests.web.conftest import BASE
from tests.web.helpers import make_person
from web.app import create_app
from web.context import WebContext
from web.ratelimit import rate_window

WINDOW_S = 600.0
App = Callable[..., AbstractAsyncContextManager[httpx.AsyncClient]]


async def _fresh_window() -> None:
    """Counts are per fixed window: start well inside one, so the test's hits share it."""
    _, left = rate_window(WINDOW_S)
    if left < 10:
        await asyncio.sleep(left + 0.1)


def _settings(tmp_path: Path, *, per_key: int, per_ip: int) -> Settings:
    return load_settings(data_dir=tmp_path / "data", _env_file=None, public_base_url=BASE,
                         web_rate=WebRate(per_key=per_key, per_ip=per_ip, window_s=WINDOW_S))


def _new_key(sessions: sessionmaker[Session]) -> str:
    person = make_person(sessions)
    with transaction(sessions) as s:
        return apikeys.create_api_key(session=s, identity_id=person.identity_id).key


def app_factory(settings: Settings, sessions: sessionmaker[Session]) -> App:
    @asynccontextmanager
    async def open_app(broker: Broker, address: str = "127.0.0.1") -> AsyncIterator[
            httpx.AsyncClient]:
        blobs = BlobStore.from_settings(settings)
        client = Client(settings=settings, session_factory=sessions, broker=broker, blobs=blobs,
                        models=ModelRegistry.load(settings), styles=default_registry(),
                        blocklist=default_blocklist())
        app = create_app(WebContext(settings=settings, sessions=sessions, blobs=blobs,
                                    client=client))
        transport = httpx.ASGITransport(app=app, client=(address, 40000))
        async with httpx.AsyncClient(transport=transport, base_url=BASE) as http:
            yield http

    return open_app


async def test_a_key_over_its_limit_gets_429_and_other_keys_do_not(
    tmp_path: Path, factory: sessionmaker[Session]
) -> None:
    settings = _settings(tmp_path, per_key=3, per_ip=0)
    alice, bob = _new_key(factory), _new_key(factory)
    await _fresh_window()
    async with app_factory(settings, factory)(MemoryBroker()) as http:
        for _ in range(3):
            ok = await http.get("/api/v1/images", headers={"Authorization": f"Bearer {alice}"})
            assert ok.status_code == 200, ok.text
        over = await http.get("/api/v1/images", headers={"Authorization": f"Bearer {alice}"})
        assert over.status_code == 429
        body = over.json()
        assert body["error"] == "rate_limited"
        assert "API key" in body["detail"] and "3 per 600 s" in body["detail"]
        assert 1 <= int(over.headers["Retry-After"]) <= WINDOW_S
        # The same key through the A1111 API (HTTP Basic) is the same count.
        basic = base64.b64encode(f"user:{alice}".encode()).decode()
        sd = await http.get("/sdapi/v1/sd-models", headers={"Authorization": f"Basic {basic}"})
        assert sd.status_code == 429 and sd.json()["error"] == "rate_limited"
        other = await http.get("/api/v1/images", headers={"Authorization": f"Bearer {bob}"})
        assert other.status_code == 200
        # A wrong key is refused as such, not counted against anyone's limit.
        wrong = await http.get("/api/v1/images", headers={"Authorization": "Bearer atk_nope"})
        assert wrong.status_code == 401


async def test_an_address_over_its_limit_gets_429_but_probes_pass(
    tmp_path: Path, factory: sessionmaker[Session]
) -> None:
    settings = _settings(tmp_path, per_key=0, per_ip=4)
    broker = MemoryBroker()
    open_app = app_factory(settings, factory)
    await _fresh_window()
    async with open_app(broker, "10.0.0.7") as http, open_app(broker, "10.0.0.8") as other:
        answers = [(await http.get("/api/v1/images")).status_code for _ in range(4)]
        assert answers == [401] * 4  # counted, whatever the answer
        page = await http.get("/gallery")
        assert page.status_code == 429
        assert "address" in page.json()["detail"]
        assert int(page.headers["Retry-After"]) >= 1
        assert (await http.get("/healthz")).status_code == 200  # probes are never counted
        assert (await other.get("/api/v1/images")).status_code == 401  # another address


async def test_two_web_processes_on_one_redis_share_the_count(
    tmp_path: Path, factory: sessionmaker[Session], redis_url: str
) -> None:
    settings = _settings(tmp_path, per_key=0, per_ip=3)
    open_app = app_factory(settings, factory)
    await _fresh_window()
    async with RedisBroker(redis_url) as b1, RedisBroker(redis_url) as b2, \
            open_app(b1, "10.1.0.1") as web1, open_app(b2, "10.1.0.1") as web2:
        assert (await web1.get("/api/v1/images")).status_code == 401
        assert (await web2.get("/api/v1/images")).status_code == 401
        assert (await web1.get("/api/v1/images")).status_code == 401
        assert (await web2.get("/api/v1/images")).status_code == 429


async def test_requests_pass_when_the_broker_does_not_answer(
    tmp_path: Path, factory: sessionmaker[Session]
) -> None:
    settings = _settings(tmp_path, per_key=1, per_ip=1)
    key = _new_key(factory)
    broker = RedisBroker("redis://127.0.0.1:1/0", socket_timeout_s=0.5)
    async with app_factory(settings, factory)(broker) as http:
        for _ in range(3):
            answer = await http.get("/api/v1/images", headers={"Authorization": f"Bearer {key}"})
            assert answer.status_code == 200, answer.text
    await broker.close()
