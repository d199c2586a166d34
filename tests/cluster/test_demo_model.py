"""The shipped demo model (cluster/data/demo), run the way people's jobs run: through the
client, the queue, the dispatcher and a Ray worker actor, its pictures read back by the scorer.
Eight people's prompts gathered into one batch each come back to their own person; people
with and without the demo LoRA each get their own look; one prompt
in three styles comes back with each style's rendering in its own image; img2img changes what
the prompt changes; a reroll still draws the prompt. Also its adherence on held-out captions
(``bench/demo_quality.py`` prints the full table)."""

from __future__ import annotations

import asyncio
import io
import os
import random
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from sqlalchemy import Engine

from bots.common.requests import reroll
from cluster.broker_memory import MemoryBroker
from cluster.client import Client
from cluster.contract import device_resource, init_local_ray
from cluster.dispatcher import RAY_NAMESPACE, WORKER_NAME_PREFIX, Dispatcher, Pacing
from cluster.events import EventKind
from cluster.placement import WorkerPool
from cluster.registry import DEMO_MODEL_DIR, ModelRegistry
from core.adapters import AdapterRef
from core.prompts import default_blocklist
from core.request import GenerationRequest, JobKind
from core.settings import Settings, Tier, load_settings
from core.styles import default_registry
from engine.actor import spawn_worker
from engine.demo.quality import adherence, held_out, paraphrased
from engine.demo.scenes import Scene, Shape, parse_caption, render
from engine.demo.score import outlined, score
from engine.devices import DeviceProfile
from storage.blobs import BlobStore
from storage.db import session_factory
from storage.gallery import list_job_images
from tests.cluster.helpers import Cluster, submit, who

pytestmark = pytest.mark.pipelines

# What the held-out run must reach (bench/demo_quality.py measures the model against the goals
# of issue 13; these are the shipped model's own figures less a margin, so a worse model, a
# broken tokenizer or a scorer that reads nothing fails). The 128² model reads 100/97.5/85/100%
# on these 40 (the 64² one's floors were 95/90/70/80%).
FLOORS = {"background": 0.95, "colour": 0.95, "kind": 0.8, "position": 0.9}
# The same on phrasings people type, in templates training never used (issue 27's goals were
# 95/90/80/80%; the shipped model reads 100/100/95/100% on these 40 and 100/100/96.5/100% on
# bench.demo_quality's 200, the one before it learnt phrasings 19/30/22/22%).
PARAPHRASE_FLOORS = {"background": 0.95, "colour": 0.95, "kind": 0.85, "position": 0.9}


@pytest.fixture(scope="module")
def demo_settings(tmp_path_factory: pytest.TempPathFactory) -> Settings:
    return load_settings(
        data_dir=tmp_path_factory.mktemp("demo-data"), _env_file=None,
        tiers={"free": Tier(daily_allowance=100, concurrency=20, max_side=512)},
    )


@pytest.fixture(scope="module")
def demo_worker(demo_settings: Settings, cpu_profile: DeviceProfile) -> Iterator[Any]:
    import ray

    init_local_ray(num_cpus=2, resources={device_resource("cpu"): 1}, namespace=RAY_NAMESPACE,
                   log_to_driver=False)
    handle = spawn_worker(settings=demo_settings.worker_config(), device_class="cpu",
                          profile=cpu_profile, name=f"{WORKER_NAME_PREFIX}-demo", timeout_s=120)
    ray.get(handle.preload.remote("demo"), timeout=120)
    yield handle
    ray.kill(handle)
    ray.shutdown()


@pytest.fixture
async def demo(demo_settings: Settings, db_engine: Engine, demo_worker: Any
               ) -> AsyncIterator[Cluster]:
    sessions = session_factory(db_engine)
    blobs = BlobStore.from_settings(demo_settings)
    broker = MemoryBroker()
    client = Client(settings=demo_settings, session_factory=sessions, broker=broker, blobs=blobs,
                    poll_interval_s=0.2,
                    models=ModelRegistry.load(demo_settings),
                    styles=default_registry(),
                    blocklist=default_blocklist(),)
    dispatcher = Dispatcher(
        # A wide gathering window: the eight submissions below land in one batch.
        dispatch=demo_settings.dispatch.model_copy(update={
            "gather_window_ms": 3000, "gather_gap_ms": 1500, "max_batch_items": 8,
            "job_timeout_s": 600}),
        sessions=sessions, broker=broker, blobs=blobs,
        workers=await WorkerPool.from_handles([demo_worker], host_memory_gb=32), name="demo-d",
        models=client.models,
        pacing=Pacing(progress_interval_s=0.2, cancel_poll_s=0.1, read_block_ms=100,
                      drain_timeout_s=20, reconcile_grace_s=0.0),
    )
    c = Cluster(demo_settings, sessions, broker, blobs, client, dispatcher)
    c.start()
    yield c
    await c.close()
    await broker.close()


async def _images(c: Cluster, job_id: str) -> list[Image.Image]:
    end = await c.client.wait(job_id)
    assert end.kind is EventKind.done, end.reason
    return [Image.open(io.BytesIO(await c.client.image_bytes(i))).convert("RGB")
            for i in end.images]


def test_the_demo_model_is_shipped_small_with_its_recipe() -> None:
    files = [p for p in DEMO_MODEL_DIR.rglob("*") if p.is_file()]
    assert (DEMO_MODEL_DIR / "model_index.json").is_file()
    assert (DEMO_MODEL_DIR / "recipe.json").is_file()
    assert sum(p.stat().st_size for p in files) <= 30 * 1024 * 1024


def test_held_out_captions_are_drawn_as_asked() -> None:
    rows = adherence(DEMO_MODEL_DIR, held_out(40, random.Random(2026)), steps=20)
    for name, floor in FLOORS.items():
        values = [r.result[name] for r in rows if r.result[name] is not None]
        share = sum(bool(v) for v in values) / len(values)
        assert share >= floor, (name, share, floor)


def test_held_out_phrasings_are_drawn_as_asked() -> None:
    cases = paraphrased(40, random.Random(2027), typo_rate=0.1)
    assert all(parse_caption(c.prompt) == c.scene for c in cases)
    assert len({c.prompt for c in cases}) == len(cases)
    rows = adherence(DEMO_MODEL_DIR, cases, steps=20)
    for name, floor in PARAPHRASE_FLOORS.items():
        values = [r.result[name] for r in rows if r.result[name] is not None]
        assert values, name
        share = sum(bool(v) for v in values) / len(values)
        assert share >= floor, (name, share, floor)


# The eight people and their prompts: every background different, so an image handed to the
# wrong person shows the wrong background.
EIGHT = [
    "a red circle on a blue background", "blue box, yellow bg",
    "on a purple backdrop, a yellow star", "Please draw a white triangle on red background",
    "an orange ball on a green background", "green square and white backdrop",
    "a purple circle on an orange background", "black bg with a yellow square",
]


async def test_eight_people_in_one_batch_each_get_their_own_picture(demo: Cluster) -> None:
    people = [who(f"person-{n}") for n in range(len(EIGHT))]
    jobs = await asyncio.gather(*(
        submit(demo, person, GenerationRequest(prompt=prompt, seed=100 + n))
        for n, (person, prompt) in enumerate(zip(people, EIGHT, strict=True))))
    pictures = {job.job_id: (await _images(demo, job.job_id))[0] for job in jobs}
    batch = next(b for b in demo.dispatcher.batches if jobs[0].job_id in b.job_ids)
    assert sorted(batch.job_ids) == sorted(j.job_id for j in jobs)  # one batch of all eight
    assert batch.model == "demo"
    kinds = 0
    for job, prompt in zip(jobs, EIGHT, strict=True):
        scene = parse_caption(prompt)
        assert scene is not None
        found = score(pictures[job.job_id], scene)
        assert found["background"] and found["colour"], (prompt, found)
        kinds += bool(found["kind"])
    assert kinds >= 6  # all eight on the machine that made docs/demo.png; a margin elsewhere
    if os.environ.get("ATELIER_UPDATE_DOCS") == "1":  # refresh the README's picture on request
        strip = Image.new("RGB", (128 * len(jobs), 128))
        for n, job in enumerate(jobs):
            strip.paste(pictures[job.job_id].resize((128, 128), Image.Resampling.NEAREST),
                        (128 * n, 0))
        strip.save(Path(__file__).resolve().parents[2] / "docs" / "demo.png")


async def test_people_with_and_without_the_outline_lora_each_get_their_own(demo: Cluster) -> None:
    """Three people at once, two asking for the demo LoRA (``--lora outline`` and the prompt
    tag): those two share a batch with the LoRA on, drawn as outlines; the third's job, in
    the same gathering window, runs in its own batch with it off, drawn filled."""
    asks = [
        ("a red circle on a blue background", (AdapterRef(name="outline"),)),
        ("a yellow square on a purple background <lora:outline>", ()),
        ("a green circle on a white background", ()),
    ]
    jobs = await asyncio.gather(*(
        submit(demo, who(f"outliner-{n}"), GenerationRequest(prompt=p, seed=60 + n, adapters=a))
        for n, (p, a) in enumerate(asks)))
    pictures = [(await _images(demo, job.job_id))[0] for job in jobs]
    batch_of = [next(n for n, b in enumerate(demo.dispatcher.batches) if job.job_id in b.job_ids)
                for job in jobs]
    assert batch_of[0] == batch_of[1] != batch_of[2]
    read = []
    for (prompt, _), image in zip(asks, pictures, strict=True):
        scene = parse_caption(prompt)
        assert scene is not None
        found = score(image, scene)
        assert found["background"] and found["colour"], (prompt, found)
        read.append(outlined(image, scene))
    # With it: outlines (or a line too thin to leave an inside to read: None; the shape's
    # colour is there, so not a filled shape, whose inside would read), never filled;
    # without it: filled.
    assert False not in read[:2] and read[2] is False, read


async def test_one_prompt_in_three_styles_draws_the_prompt_in_each_image(demo: Cluster) -> None:
    """Each style's image draws the scene from its own styled prompt (the shipped model has not
    learnt the renderings apart: see issue 13's note), stored with its style, in order."""
    prompt = "a red circle on a blue background"
    styles = ("line-art", "watercolor", "pixel-art")
    job = await submit(demo, who("stylist"), GenerationRequest(prompt=prompt, styles=styles,
                                                               seed=7))
    images = await _images(demo, job.job_id)
    assert len(images) == 3
    scene = parse_caption(prompt)
    assert scene is not None
    for image in images:
        assert score(image, scene)["background"]
    # Same seed, three prompts: three different pictures (each style's prompt reached it).
    pixels = [np.asarray(i, dtype=np.float32) for i in images]
    for a in range(3):
        for b in range(a + 1, 3):
            assert np.abs(pixels[a] - pixels[b]).mean() > 1.0, (a, b)
    with demo.session() as s:
        rows = list_job_images(session=s, job_id=job.job_id)
    assert [r.styles for r in rows] == [[style] for style in styles]


async def test_img2img_changes_what_the_prompt_changes(demo: Cluster) -> None:
    red = render(Scene("blue", (Shape("red", "circle"),)), 128, None, seed=3)
    buf = io.BytesIO()
    red.save(buf, "PNG")
    job = await submit(demo, who("painter"), GenerationRequest(
        prompt="a green circle on a blue background", kind=JobKind.img2img,
        init_image=buf.getvalue(), strength=0.75, seed=11))
    (image,) = await _images(demo, job.job_id)
    found = score(image, Scene("blue", (Shape("green", "circle"),)))
    assert found["background"] and found["colour"], found


async def test_a_reroll_draws_the_prompt_again_with_another_seed(demo: Cluster) -> None:
    first = GenerationRequest(prompt="a yellow square on a purple background", seed=5)
    job = await submit(demo, who("reroller"), first)
    await _images(demo, job.job_id)
    again = await submit(demo, who("reroller"), reroll(first))
    (image,) = await _images(demo, again.job_id)
    stored = await demo.client.job(again.job_id)
    assert stored.request.seed != 5
    scene = parse_caption(first.prompt)
    assert scene is not None and score(image, scene)["background"]


def test_training_saves_a_pipeline_that_loads_with_its_recipe(tmp_path: Path) -> None:
    """``atelier models train-demo``'s code, on a budget of seconds: the folder it writes is a
    Diffusers pipeline Atelier loads, with the recipe and the steps beside it."""
    import json
    from dataclasses import replace

    from engine.demo.train import Recipe, train_demo

    recipe = replace(Recipe(), pool=64, vae_steps=4, vae_batch=4, max_steps=3, batch=4)
    record = train_demo(tmp_path / "demo", recipe, progress=lambda _: None)
    saved = json.loads((tmp_path / "demo" / "recipe.json").read_text())
    assert saved["unet_steps"] == record["unet_steps"] == 3
    assert saved["recipe"]["batch"] == 4 and saved["recipe"]["device"] == "cpu"
    rows = adherence(tmp_path / "demo", held_out(2, random.Random(1)), steps=2)
    assert len(rows) == 2 and all(r.result["background"] is not None for r in rows)


def test_training_goes_on_from_a_saved_model_with_the_recipe_changes_asked(
        tmp_path: Path) -> None:
    """``train-demo --from FOLDER --set field=value``: the weights start from the folder's (its
    autoencoder kept as it is), the record keeps the parent's record, and a misspelt field is
    an error that names it. Asked to learn phrasings, the folder's text encoder is carried
    over to a tokenizer with their words, and the pipeline saved reads them."""
    import json
    from dataclasses import replace

    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    from engine.demo.train import Recipe, train_demo
    from engine.demo.vocab import lacks_phrase_words

    small = replace(Recipe(), pool=64, vae_steps=4, vae_batch=4, max_steps=2, batch=4)
    train_demo(tmp_path / "first", small, progress=lambda _: None)
    recipe = small.with_overrides([f"init_from={tmp_path / 'first'}", "sided=0.5",
                                   "high_noise=0.5", "low_snr_floor=0.3", "max_steps=3",
                                   "phrasing=0.5", "typos=0.2"])
    record = train_demo(tmp_path / "second", recipe, progress=lambda _: None)
    assert record["unet_steps"] == 3 and record["recipe"]["sided"] == 0.5
    assert record["recipe"]["phrasing"] == 0.5
    tokenizers = [CLIPTokenizer.from_pretrained(tmp_path / f / "tokenizer")
                  for f in ("first", "second")]
    assert lacks_phrase_words(tokenizers[0]) and not lacks_phrase_words(tokenizers[1])
    encoder = CLIPTextModel.from_pretrained(tmp_path / "second" / "text_encoder")
    assert encoder.config.vocab_size == len(tokenizers[1])
    rows = adherence(tmp_path / "second", paraphrased(2, random.Random(1)), steps=2)
    assert len(rows) == 2 and all(r.result["background"] is not None for r in rows)
    assert record["continued_from"]["unet_steps"] == 2
    assert json.loads((tmp_path / "second" / "recipe.json").read_text())["continued_from"] == (
        json.loads((tmp_path / "first" / "recipe.json").read_text()))
    first_vae = AutoencoderKL.from_pretrained(tmp_path / "first" / "vae").state_dict()
    second_vae = AutoencoderKL.from_pretrained(tmp_path / "second" / "vae").state_dict()
    assert all(torch.equal(first_vae[k], second_vae[k]) for k in first_vae)
    first_unet = UNet2DConditionModel.from_pretrained(tmp_path / "first" / "unet").state_dict()
    second_unet = UNet2DConditionModel.from_pretrained(tmp_path / "second" / "unet").state_dict()
    assert not all(torch.equal(first_unet[k], second_unet[k]) for k in first_unet)
    with pytest.raises(ValueError, match="'sidde=0.5'"):
        small.with_overrides(["sidde=0.5"])
    with pytest.raises(ValueError, match="'lots' is not a float"):
        small.with_overrides(["lr=lots"])
