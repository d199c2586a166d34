"""``Client.prepare``, the checks every front end's request passes before anything is
charged: the length of the texts comes first, before the blocklist or the token count read
them (each costs time in proportion to the length)."""

from __future__ import annotations

from pathlib import Path

import pytest

from cluster.broker_memory import MemoryBroker
from cluster.client import Client
from cluster.registry import ModelRegistry
from core.errors import ContentBlocked, PromptTooLong
from core.jobs import Requester
from core.prompts import Blocklist
from core.request import GenerationRequest
from core.settings import load_settings
from core.styles import default_registry
from storage.blobs import BlobStore
from storage.db import make_engine, session_factory

WHO = Requester(platform="telegram", platform_user_id="1")


def _client(tmp_path: Path) -> Client:
    settings = load_settings(_env_file=None, data_dir=tmp_path, limits={"max_prompt_chars": 200})
    return Client(
        settings=settings, session_factory=session_factory(make_engine("sqlite://")),
        broker=MemoryBroker(), blobs=BlobStore(tmp_path / "blobs"),
        blocklist=Blocklist(never=["forbiddenword"]),
        models=ModelRegistry.load(settings),
        styles=default_registry(),
    )


def test_the_length_is_checked_before_the_blocklist(tmp_path: Path) -> None:
    client = _client(tmp_path)
    with pytest.raises(ContentBlocked):
        client.prepare(GenerationRequest(prompt="a forbiddenword"), WHO)
    long = GenerationRequest(prompt="a forbiddenword " * 100)
    with pytest.raises(PromptTooLong, match="prompt is 1599 characters; the limit is 200"):
        client.prepare(long, WHO)
    negative = GenerationRequest(prompt="a fox", negative="blurry " * 100)
    with pytest.raises(PromptTooLong, match="negative prompt is 700 characters; the limit is 200"):
        client.prepare(negative, WHO)
