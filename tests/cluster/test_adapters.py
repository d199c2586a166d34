"""The adapter catalogue: [loras.NAME] / [embeddings.NAME] in models.toml, availability, and the
admission check (unknown name, wrong family, default weight)."""

from __future__ import annotations

from pathlib import Path

import pytest

from cluster.availability import adapter_table_rows
from cluster.broker_memory import MemoryBroker
from cluster.client import Client
from cluster.registry import ModelRegistry
from core.adapters import AdapterRef
from core.errors import ConfigError, InvalidRequest
from core.jobs import Requester
from core.prompts import default_blocklist
from core.request import GenerationRequest
from core.settings import Settings
from core.styles import StyleRegistry
from storage.blobs import BlobStore
from storage.db import make_engine, session_factory


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, "utf-8")
    return path


USER_FILE = """
[loras.ink]
file = "loras/ink.safetensors"
family = "sd15"
default_weight = 0.7
triggers = ["ink drawing"]
description = "Ink outlines"

[loras.xl-neon]
repo = "someone/neon-xl"
file = "neon.safetensors"
family = "sdxl"

[embeddings.badhands]
file = "{data_dir}/embeddings/badhands.safetensors"
family = "sd15"
token = "bad-hands"
"""


@pytest.fixture
def registry(settings: Settings) -> ModelRegistry:
    write(settings.data_dir / "models.toml", USER_FILE)
    write(settings.data_dir / "loras" / "ink.safetensors", "x")
    return ModelRegistry.load(settings)


def test_user_file_adds_adapters(registry: ModelRegistry, settings: Settings) -> None:
    ink = registry.adapters["ink"]
    assert (ink.kind, ink.family, ink.default_weight, ink.triggers) == (
        "lora", "sd15", 0.7, ("ink drawing",)
    )
    assert ink.file == str(settings.data_dir / "loras" / "ink.safetensors")
    neon = registry.adapters["xl-neon"]
    assert (neon.source, neon.location) == ("repo", "someone/neon-xl/neon.safetensors")
    emb = registry.adapters["badhands"]
    assert (emb.kind, emb.prompt_token) == ("embedding", "bad-hands")
    # Models are untouched and a copy keeps the adapters.
    assert "tiny" in registry
    assert registry.with_models(default="tiny").adapters == registry.adapters


def test_availability_rows(registry: ModelRegistry) -> None:
    rows = {r["name"]: r for r in adapter_table_rows(registry, offline=True)}
    assert (rows["ink"]["available"], rows["ink"]["availability"]) == (True, "file")
    assert rows["xl-neon"]["available"] is False
    assert "huggingface-cli download someone/neon-xl neon.safetensors" in rows["xl-neon"]["how"]
    assert rows["badhands"]["how"].startswith("set file under [embeddings.badhands]")


def test_the_demo_lora_is_packaged_for_the_demo_model(registry: ModelRegistry) -> None:
    from cluster.registry import DEMO_LORA_DIR
    from engine.demo.lora import LORA_FILE

    outline = registry.adapters["outline"]
    assert (outline.kind, outline.family, outline.models) == ("lora", "sd15", ("demo",))
    assert Path(outline.file) == DEMO_LORA_DIR / LORA_FILE and Path(outline.file).is_file()
    assert registry.resolve_adapters((AdapterRef(name="outline"),), "demo") == (
        AdapterRef(name="outline", weight=outline.default_weight),)
    rows = {r["name"]: r for r in adapter_table_rows(registry, offline=True)}
    assert rows["outline"]["available"] is True and rows["outline"]["models"] == "demo"


def test_resolve_fills_default_weight(registry: ModelRegistry) -> None:
    refs = (AdapterRef(name="ink"), AdapterRef(name="xl-neon", weight=0.3))
    assert registry.resolve_adapters(refs[:1], "tiny") == (AdapterRef(name="ink", weight=0.7),)
    # An SDXL LoRA fits SDXL-Turbo too.
    assert registry.resolve_adapters(refs[1:], "sdxl-turbo") == refs[1:]


@pytest.mark.parametrize(
    ("name", "model", "message"),
    [
        ("inc", "tiny",
         "unknown LoRA 'inc' (did you mean 'ink'?); available: outline, ink, xl-neon"),
        ("badhands", "tiny", "unknown LoRA 'badhands'"),
        ("ink", "tiny-xl", "LoRA 'ink' is for sd15 models; model 'tiny-xl' is sdxl"),
        ("xl-neon", "sd-turbo", "LoRA 'xl-neon' is for sdxl models; model 'sd-turbo' is sd-turbo"),
        # The packaged demo LoRA fits the demo model's layers only, not every SD1.5 model's.
        ("outline", "tiny", "LoRA 'outline' is for model 'demo' only; this job's model is 'tiny'"),
        ("outline", "sd15", "LoRA 'outline' is for model 'demo' only; this job's model is 'sd15'"),
    ],
)
def test_resolve_refusals(registry: ModelRegistry, name: str, model: str, message: str) -> None:
    with pytest.raises(InvalidRequest) as exc:
        registry.resolve_adapters((AdapterRef(name=name),), model)
    assert exc.value.message.startswith(message)


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ('[loras.x]\nfile = "x.safetensors"\nfamily = "sd3"\n', "lora 'x': family must be one of"),
        ('[loras.x]\nfile = "x.txt"\nfamily = "sd15"\n', "file: must end in .safetensors"),
        ('[loras.x]\nfile = "x.safetensors"\nfamily = "sd15"\ndefault_weight = 9\n',
         "default_weight: Input should be less than or equal to 4"),
        ('[loras.x]\nfamily = "sd15"\n', "lora 'x': file: Field required"),
        ('[embeddings.x]\nfile = "x.safetensors"\nfamily = "sdxl"\n',
         "embeddings are local files for sd15 or sd-turbo models"),
        ('[loras.x]\nfile = "x.safetensors"\nfamily = "sd15"\nmodels = ["demo", "dmeo"]\n',
         "lora 'x': models names dmeo, not in the registry; available: sd15"),
    ],
)
def test_bad_entries_are_config_errors(settings: Settings, entry: str, message: str) -> None:
    write(settings.data_dir / "models.toml", entry)
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        ModelRegistry.load(settings)


# Admission (Client.prepare: no database or broker is reached) -------------------------------


@pytest.fixture
def client(registry: ModelRegistry, settings: Settings) -> Client:
    styles = StyleRegistry.from_toml(
        '[inked]\nlabel = "Inked"\nprompt = "ink drawing of {prompt}"\nloras = { ink = 0.4 }\n'
        '[neon]\nlabel = "Neon"\nprompt = "neon {prompt}"\nloras = { xl-neon = 1 }\n'
    )
    return Client(
        settings=settings, session_factory=session_factory(make_engine("sqlite://")),
        broker=MemoryBroker(), blobs=BlobStore.from_settings(settings), styles=styles,
        models=registry,
        blocklist=default_blocklist(),
    )


WHO = Requester(platform="cli", platform_user_id="1")


def test_admission_resolves_loras(client: Client) -> None:
    ready = client.prepare(GenerationRequest(prompt="a cat <lora:ink>", model="tiny"), WHO)
    assert ready.adapters == (AdapterRef(name="ink", weight=0.7),)
    # A style's LoRA applies; the request's own weight for the same name wins.
    styled = client.prepare(GenerationRequest(prompt="a cat", model="tiny", styles=["inked"]), WHO)
    assert styled.adapters == (AdapterRef(name="ink", weight=0.4),)
    own = client.prepare(
        GenerationRequest(prompt="a cat <lora:ink:1.5>", model="tiny", styles=["inked"]), WHO
    )
    assert own.adapters == (AdapterRef(name="ink", weight=1.5),)


def test_admission_adds_trigger_words_the_prompt_lacks(client: Client) -> None:
    ready = client.prepare(GenerationRequest(prompt="a cat <lora:ink>", model="tiny"), WHO)
    assert ready.prompt == "a cat, ink drawing"
    # Already there (any case): not added twice; preparing again changes nothing.
    typed = client.prepare(GenerationRequest(prompt="an Ink Drawing of a cat --", model="tiny",
                                             adapters=(AdapterRef(name="ink"),)), WHO)
    assert typed.prompt == "an Ink Drawing of a cat --"
    assert client.prepare(ready, WHO).prompt == ready.prompt
    # No LoRA, no trigger words.
    assert client.prepare(GenerationRequest(prompt="a cat", model="tiny"), WHO).prompt == "a cat"


@pytest.mark.parametrize(
    ("request_", "message"),
    [
        (GenerationRequest(prompt="a <lora:inc:1>", model="tiny"), "unknown LoRA 'inc'"),
        (GenerationRequest(prompt="a <lora:ink:1>", model="tiny-xl"),
         "LoRA 'ink' is for sd15 models; model 'tiny-xl' is sdxl"),
        (GenerationRequest(prompt="a", model="tiny", styles=["neon"]),
         "LoRA 'xl-neon' is for sdxl models; model 'tiny' is sd15"),
    ],
)
def test_admission_refuses_in_one_line(
    client: Client, request_: GenerationRequest, message: str
) -> None:
    with pytest.raises(InvalidRequest) as exc:
        client.prepare(request_, WHO)
    assert exc.value.message.startswith(message) and "\n" not in exc.value.message
