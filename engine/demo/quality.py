"""Measuring the demo model's adherence: held-out scenes drawn by the pipeline and scored.
Used by ``bench/demo_quality.py`` and the tests. A case's prompt is what a person typed: the
captions' grammar, or a phrasing of the held-out templates (issue 27); it is scored against
its scene either way."""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core.prompts import Blocklist, prepare_prompt
from core.request import GenerationRequest
from core.styles import default_registry
from engine.demo.phrasing import describe
from engine.demo.scenes import RENDERINGS, Scene, random_scene
from engine.demo.score import score
from engine.engine import token_counter

GOALS = {"background": 0.95, "colour": 0.90, "kind": 0.80, "position": 0.80}


@dataclass(frozen=True)
class Case:
    scene: Scene
    style: str | None
    seed: int
    prompt: str = ""  # what is typed; the scene's caption when not given

    def __post_init__(self) -> None:
        if not self.prompt:
            object.__setattr__(self, "prompt", self.scene.caption)


@dataclass(frozen=True)
class Row:
    case: Case
    result: dict[str, bool | None]

    @property
    def rendering(self) -> str:
        return self.case.style or "plain"


def held_out(n: int, rng: random.Random) -> list[Case]:
    """``n`` cases, a quarter of them in each style the model learnt and the rest plain."""
    styles: list[str | None] = [None, None, *RENDERINGS]
    return [Case(random_scene(rng), styles[i % len(styles)], rng.randrange(2**31))
            for i in range(n)]


def paraphrased(n: int, rng: random.Random, *, typo_rate: float = 0.1) -> list[Case]:
    """``n`` plain cases said as people type them, in the templates training never used
    (a third of the one-shape scenes at a named side), ``typo_rate`` of them with a typo."""
    cases = []
    for _ in range(n):
        scene = random_scene(rng, sided=0.33)
        prompt = describe(scene, rng, held_out=True, typo_rate=typo_rate)
        cases.append(Case(scene, None, rng.randrange(2**31), prompt))
    return cases


def at_sides(n: int, rng: random.Random) -> list[Case]:
    """``n`` plain cases of one shape at a named side ("a red circle on the left on ...")."""
    return [Case(random_scene(rng, two_shapes=0.0, sided=1.0), None, rng.randrange(2**31))
            for _ in range(n)]


def load(model: Path, device: str = "cpu") -> Any:
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(model, safety_checker=None,
                                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def draw(pipe: Any, cases: list[Case], *, steps: int = 20, guidance: float | None = None,
         batch: int = 8, size: int | None = None) -> list[Any]:
    """Each case drawn by ``pipe`` as Atelier would (its prompt through ``prepare_prompt``), at
    the model's own size (or ``size``²)."""
    import torch

    from engine.demo.train import picture_side

    guidance = guidance if guidance is not None else 5.0
    side = size or picture_side(pipe.vae)  # the model's own: 128² since issue 27
    styles, blocklist = default_registry(), Blocklist()
    count = token_counter(pipe.tokenizer)
    images = []
    for start in range(0, len(cases), batch):
        chunk = cases[start:start + batch]
        pairs = [prepare_prompt(GenerationRequest(prompt=c.prompt,
                                                  styles=(c.style,) if c.style else ()),
                                styles, blocklist, nsfw_allowed=False, count_tokens=count)[0]
                 for c in chunk]
        generators = [torch.Generator().manual_seed(c.seed) for c in chunk]
        images += pipe(prompt=[p for p, _ in pairs], negative_prompt=[n for _, n in pairs],
                       num_inference_steps=steps, guidance_scale=guidance,
                       generator=generators, height=side, width=side).images
    return images


def adherence(model: Path, cases: list[Case], *, steps: int = 20,
              guidance: float | None = None, batch: int = 8, device: str = "cpu",
              size: int | None = None) -> list[Row]:
    """Each case drawn as Atelier would (its prompt through ``prepare_prompt``) and scored
    against its scene."""
    images = draw(load(model, device), cases, steps=steps, guidance=guidance, batch=batch,
                  size=size)
    return [Row(c, score(img, c.scene)) for c, img in zip(cases, images, strict=True)]
