"""Measuring the demo model's adherence: held-out scenes drawn by the pipeline and scored.
Used by ``bench/demo_quality.py`` and the tests."""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core.prompts import Blocklist, prepare_prompt
from core.request import GenerationRequest
from core.styles import default_registry
from engine.demo.scenes import RENDERINGS, Scene, random_scene
from engine.demo.score import score
from engine.engine import token_counter

GOALS = {"background": 0.95, "colour": 0.90, "kind": 0.80, "position": 0.80}


@dataclass(frozen=True)
class Case:
    scene: Scene
    style: str | None
    seed: int


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
         batch: int = 8) -> list[Any]:
    """Each case drawn by ``pipe`` as Atelier would (its prompt through ``prepare_prompt``)."""
    import torch

    guidance = guidance if guidance is not None else 5.0
    styles, blocklist = default_registry(), Blocklist()
    count = token_counter(pipe.tokenizer)
    images = []
    for start in range(0, len(cases), batch):
        chunk = cases[start:start + batch]
        pairs = [prepare_prompt(GenerationRequest(prompt=c.scene.caption,
                                                  styles=(c.style,) if c.style else ()),
                                styles, blocklist, nsfw_allowed=False, count_tokens=count)[0]
                 for c in chunk]
        generators = [torch.Generator().manual_seed(c.seed) for c in chunk]
        images += pipe(prompt=[p for p, _ in pairs], negative_prompt=[n for _, n in pairs],
                       num_inference_steps=steps, guidance_scale=guidance,
                       generator=generators, height=64, width=64).images
    return images


def adherence(model: Path, cases: list[Case], *, steps: int = 20,
              guidance: float | None = None, batch: int = 8, device: str = "cpu") -> list[Row]:
    """Each case drawn as Atelier would (its prompt through ``prepare_prompt``) and scored."""
    images = draw(load(model, device), cases, steps=steps, guidance=guidance, batch=batch)
    return [Row(c, score(img, c.scene)) for c, img in zip(cases, images, strict=True)]
