"""One admission (issue 22): ``Jobs.admit`` prepares a request once and ``submit(quote)`` writes
it as quoted, with the prompts the worker is to use; the engine uses those prompts as they
are, and prepares them itself only for a job that carries none or whose carried text the real
tokenizer finds too long."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from sqlalchemy.engine import Engine as DbEngine

from atelier.app import make_client
from cluster.broker_memory import MemoryBroker
from cluster.client import Client
from cluster.contract import BatchItem, JobRejected
from cluster.jobs import Prepared
from core.errors import ContentBlocked
from core.jobs import DeliveryTarget, Requester
from core.prompts import Blocklist, default_blocklist, prepare_prompt
from core.request import GenerationRequest
from core.settings import load_settings
from core.styles import default_registry
from engine.cache import ModelCache
from engine.devices import DeviceProfile
from engine.engine import Engine
from storage import accounts
from storage.blobs import BlobStore
from storage.db import make_engine, session_factory, transaction, upgrade
from storage.jobs import create_job, get_job

if TYPE_CHECKING:
    from tests.cluster.conftest import TinyModels

WHO = Requester(platform="telegram", platform_user_id="7", display_name="Ann")


def _sqlite(tmp_path: Path) -> DbEngine:
    url = f"sqlite:///{tmp_path / 'atelier.db'}"
    upgrade(url)
    return make_engine(url)


@pytest.fixture
def client(tmp_path: Path, tiny_models: TinyModels) -> Client:
    settings = load_settings(_env_file=None, data_dir=tmp_path)
    return Client(
        settings=settings, session_factory=session_factory(_sqlite(tmp_path)),
        broker=MemoryBroker(), blobs=BlobStore(tmp_path / "blobs"),
        models=tiny_models.registry.with_models(default="tiny"),
        styles=default_registry(), blocklist=default_blocklist(),
    )


async def test_admit_prepares_once_and_submit_writes_the_quote(
    client: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    prepared: list[str] = []
    real = client.jobs.prepare

    def counting(request: GenerationRequest, requester: Requester) -> Prepared:
        prepared.append(request.prompt)
        return real(request, requester)

    monkeypatch.setattr(client.jobs, "prepare", counting)
    request = GenerationRequest(prompt="a fox", styles=("watercolor",), width=64, height=64,
                                steps=2)
    quote = await client.jobs.admit(request, WHO, "k1")
    job = await client.jobs.submit(quote, DeliveryTarget(frontend="telegram"))
    assert prepared == ["a fox"]  # once, for the check and the write
    assert job.created and job.cost == quote.cost and job.position == 1
    row = await client.jobs.job(job.job_id)
    assert row.request == quote.request and row.request.seed is not None
    # What the worker will feed the model: what admission prepared, one pair per style.
    assert row.prompts == quote.prompts
    assert row.prompts == tuple(prepare_prompt(request, default_registry(), default_blocklist(),
                                               nsfw_allowed=False))
    # The same key again: the job it made, nothing charged, nothing prepared for the write.
    again = await client.jobs.submit(await client.jobs.admit(request, WHO, "k1"),
                                     DeliveryTarget(frontend="telegram"))
    assert (again.job_id, again.created) == (job.job_id, False)
    assert len(prepared) == 2


def test_the_configured_blocklist_is_admissions(tmp_path: Path, tiny_models: TinyModels) -> None:
    """The worker no longer checks prompts that admission prepared, so admission reads the
    blocklist file the workers are configured with."""
    listed = tmp_path / "blocklist.txt"
    listed.write_text("[never]\nmarmalade\n", encoding="utf-8")
    settings = load_settings(_env_file=None, data_dir=tmp_path, blocklist_file=listed)
    # The composition root builds the client with the configured list.
    client = make_client(
        settings, session_factory(_sqlite(tmp_path)), MemoryBroker(),
        models=tiny_models.registry.with_models(default="tiny"),
    )
    with pytest.raises(ContentBlocked):
        client.jobs.prepare(GenerationRequest(prompt="toast with marmalade"), WHO)


@pytest.fixture(scope="module")
def engine(tiny_models: TinyModels, cpu_profile: DeviceProfile) -> Engine:
    cache = ModelCache(tiny_models.registry, cpu_profile, 10**9, offline=True)
    # A blocklist the carried prompt would fail: the engine must not check it again.
    return Engine(cache, profile=cpu_profile, blocklist=Blocklist(never=["lighthouse"]))


def _request(**fields: object) -> GenerationRequest:
    base: dict[str, object] = {"prompt": "a lighthouse", "model": "tiny", "width": 64,
                               "height": 64, "steps": 2, "seed": 5}
    return GenerationRequest(**(base | fields))  # type: ignore[arg-type]


def test_the_engine_uses_the_carried_prompts(engine: Engine) -> None:
    carried = (("a lighthouse, as admitted", "blurry"),)
    [result] = engine.generate([BatchItem("carried", _request(), prompts=carried)])
    assert (result.prompt, result.negative) == carried[0]


def test_a_carried_prompt_too_long_for_the_real_tokenizer_is_prepared_again(
    engine: Engine,
) -> None:
    # Too long by the real count: the engine prepares it itself, with its own blocklist.
    carried = (("a lighthouse " + "word " * 100, ""),)
    with pytest.raises(JobRejected):
        engine.generate([BatchItem("long", _request(), prompts=carried)])
    ok = _request(prompt="a castle")
    [result] = engine.generate([BatchItem("long", ok, prompts=(("a castle " + "x " * 100, ""),))])
    assert result.prompt.startswith("a castle") and len(result.prompt) < 120


def test_a_job_written_without_prompts_reads_back_without(tmp_path: Path) -> None:
    """Rows from before 0008 (or written by the repository alone) carry no prompts: the
    worker prepares theirs as before."""
    factory = session_factory(_sqlite(tmp_path))
    with transaction(factory) as s:
        account = accounts.resolve_account(session=s, platform="telegram",
                                           platform_user_id="1", default_tier="free")
        made, _ = create_job(session=s, idempotency_key="old", account_id=account.id,
                             identity_id=None, request=_request(),
                             delivery=DeliveryTarget(frontend="telegram"), cost=1)
    with transaction(factory) as s:
        assert get_job(session=s, job_id=made.id).prompts is None
