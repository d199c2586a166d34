"""Training the demo ControlNet on the CPU (``atelier models train-demo-controlnet``): a
``ControlNetModel`` copied from the demo model's UNet (``from_unet``) that learns to follow the
Canny edges of a scene while the demo model itself stays frozen.

The data are the demo model's own scenes (``engine.demo.scenes``): each scene rendered, its
edge map made by the very preprocessor a person's picture goes through (``core.control``'s
Canny), and its caption prepared as a prompt the way ``train-demo`` prepares them. The map
decides where, the caption what: a share of the captions has its place words dropped
(``unplaced``) or turned to another side (``misplaced``), so where the shapes go is learnt from
the edges, and edges win over a caption that says otherwise.

Only the ControlNet copy learns (its down blocks, middle block, zero convolutions and a small
conditioning embedding); the autoencoder, text encoder and UNet are frozen, the latents and
text embeddings of the pool computed once. The same loss as the demo model's (epsilon, min-SNR
with a floor, a share of high-noise timesteps, where the layout is decided).
"""

from __future__ import annotations

import copy
import json
import logging
import platform
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from cluster.registry import DEMO_MODEL_DIR, PACKAGE_DATA_DIR
from core.control import canny
from core.prompts import Blocklist, prepare_prompt
from core.request import GenerationRequest
from core.styles import default_registry
from engine.demo.scenes import COLOURS, RENDERINGS, Scene, random_scene, render
from engine.demo.train import (
    SCHEDULER,
    as_pixels,
    descend,
    latent_factor,
    picture_side,
    with_overrides,
)
from engine.engine import token_counter
from engine.tiny import MAX_LENGTH

log = logging.getLogger(__name__)

DEMO_CONTROLNET_DIR = PACKAGE_DATA_DIR / "demo-canny"  # shipped as [controlnets.demo-canny]

# The way round each place word can be turned (a "misplaced" caption).
_OTHER_SIDE = {"left": "right", "right": "left", "top": "bottom", "bottom": "top"}
# Grey levels between a shape and its background for Canny (thresholds 100/200) to draw it.
MIN_CONTRAST = 80.0
_OTHER_RELATION = {"left": "right", "right": "left", "above": "below", "below": "above"}


@dataclass(frozen=True)
class ControlRecipe:
    seed: int = 0
    pool: int = 2500  # scenes rendered, edged and encoded once
    two_shapes: float = 0.4
    sided: float = 0.7  # share of one-shape scenes at a named side (else near the middle)
    styled: float = 0.3  # share drawn in one of RENDERINGS' styles (line-art: double edges)
    unplaced: float = 0.3  # share of one-shape captions without their place words
    misplaced: float = 0.5  # share of captions whose place words say the other side
    # Share with a negative prompt or none (half each): classifier-free guidance's other half,
    # which the ControlNet steers too.
    uncond: float = 0.2
    minutes: float = 14.0  # wall-clock budget of the whole training
    max_steps: int = 100_000
    batch: int = 16  # more, smaller steps: the zero convolutions move per step
    lr: float = 2e-3
    ema: float = 0.99
    noise_offset: float = 0.1
    snr_gamma: float = 5.0
    low_snr_floor: float = 0.3
    # Most steps where the layout is decided (where the edges matter): 80% from t=400.
    high_noise: float = 0.8
    high_noise_from: int = 400
    # The conditioning embedding: a 128-pixel map to the 16x16 latent grid in three stride-2
    # steps (one per channel count after the first; a 64-pixel model's takes two, e.g. 16,32,32).
    embedding: tuple[int, ...] = (16, 32, 32, 32)
    threads: int = 1
    # bf16 autocast (the weights and their updates stay fp32) where the CPU has native bf16:
    # measured slower here (3.1 vs 2.7 s a step of 64 on one thread), the tensors being small.
    bf16: bool = False
    # A demo ControlNet folder to go on training instead of copying the UNet afresh.
    init_from: str | None = None
    # The demo model folder whose UNet is copied and frozen; None: the shipped one.
    base: str | None = None

    def with_overrides(self, pairs: list[str]) -> ControlRecipe:
        """This recipe with ``field=value`` pairs applied; ValueError naming a bad pair."""
        return with_overrides(self, pairs)


def told(scene: Scene, rng: random.Random, recipe: ControlRecipe) -> Scene:
    """The scene as its training caption tells it: as drawn, without its side, or with its
    place words turned round (the edge map, made from the drawn scene, still shows the truth)."""
    draw = rng.random()
    if draw < recipe.misplaced:
        if scene.side is not None:
            return replace(scene, side=_OTHER_SIDE[scene.side])
        if scene.relation is not None:
            return replace(scene, relation=_OTHER_RELATION[scene.relation])
    elif draw < recipe.misplaced + recipe.unplaced and scene.side is not None:
        return replace(scene, side=None)
    return scene


def edge_map(image: Any) -> np.ndarray:
    """The scene's Canny map as the pipeline gets a person's (``core.control.control_map``,
    then Diffusers' control image processor): RGB, 0..255 here, 0..1 in the model."""
    return np.asarray(canny(image), dtype=np.uint8)


def luminance(colour: str) -> float:
    """The grey a colour becomes before Canny (ITU-R 601 luma, as Pillow's "L")."""
    r, g, b = COLOURS[colour]
    return 0.299 * r + 0.587 * g + 0.114 * b


def edged_scene(rng: random.Random, two_shapes: float, sided: float) -> Scene:
    """A random scene whose every shape shows in its Canny map. Canny sees grey, and it takes
    ~80 grey levels between a shape and its background here, which many pairs of the named
    colours lack (red, blue and purple are within 11): nearly half the scenes would give a
    blank map, teaching the ControlNet that the edges say nothing."""
    while True:
        scene = random_scene(rng, two_shapes, sided)
        back = luminance(scene.background)
        if all(abs(luminance(s.colour) - back) >= MIN_CONTRAST for s in scene.shapes):
            return scene


def native_bf16() -> bool:
    """Whether this CPU computes bf16 natively (else autocast would only emulate it)."""
    from engine.devices import best_device

    info = best_device()
    return info.kind == "cpu" and info.cpu_bf16


def make_pool(recipe: ControlRecipe, tokenizer: Any, size: int
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(scenes in [-1, 1] at ``size``², their edge maps as uint8 NCHW, prompt token ids)."""
    rng = random.Random(recipe.seed)
    styles, blocklist, count = default_registry(), Blocklist(), token_counter(tokenizer)
    images = np.empty((recipe.pool, size, size, 3), np.uint8)
    maps = np.empty((recipe.pool, size, size, 3), np.uint8)
    prompts: list[str] = []
    for i in range(recipe.pool):
        scene = edged_scene(rng, recipe.two_shapes, recipe.sided)
        style = rng.choice(list(RENDERINGS)) if rng.random() < recipe.styled else None
        picture = render(scene, size, style, seed=rng.randrange(2**31))
        images[i] = np.asarray(picture)
        maps[i] = edge_map(picture)
        caption = told(scene, rng, recipe).caption
        request = GenerationRequest(prompt=caption, styles=(style,) if style else (),
                                    raw=rng.random() < 0.2)
        ((prompt, negative),) = prepare_prompt(request, styles, blocklist,
                                               nsfw_allowed=rng.random() < 0.5,
                                               count_tokens=count)
        # What classifier-free guidance's other half runs on: a negative prompt or nothing.
        drop = rng.random()
        prompts.append(negative if drop < recipe.uncond / 2 else
                       "" if drop < recipe.uncond else prompt)
    ids = torch.as_tensor(tokenizer(prompts, padding="max_length", max_length=MAX_LENGTH,
                                    truncation=True, return_tensors="np").input_ids)
    return as_pixels(images), torch.from_numpy(maps).permute(0, 3, 1, 2).contiguous(), ids


def load_base(folder: Path) -> dict[str, Any]:
    """The frozen demo model's parts."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    parts: dict[str, Any] = {
        "tokenizer": CLIPTokenizer.from_pretrained(folder / "tokenizer"),
        "text_encoder": CLIPTextModel.from_pretrained(folder / "text_encoder"),
        "vae": AutoencoderKL.from_pretrained(folder / "vae"),
        "unet": UNet2DConditionModel.from_pretrained(folder / "unet"),
    }
    for name in ("text_encoder", "vae", "unet"):
        parts[name].requires_grad_(False).eval()
    return parts


def build_controlnet(unet: Any, recipe: ControlRecipe) -> Any:
    """A ControlNet copied from ``unet`` (its down and middle blocks' weights), with zero
    convolutions, and a conditioning embedding as small as the maps need."""
    from diffusers import ControlNetModel

    torch.manual_seed(recipe.seed)
    return ControlNetModel.from_unet(
        unet, conditioning_embedding_out_channels=recipe.embedding, load_weights_from_unet=True
    )


def check_embedding(recipe: ControlRecipe, vae: Any) -> None:
    """ValueError unless the recipe's conditioning embedding halves a map as often as the
    base model's autoencoder does (else the ControlNet's residuals would not fit its latents)."""
    halvings = latent_factor(vae).bit_length() - 1
    if len(recipe.embedding) - 1 != halvings:
        raise ValueError(
            f"embedding={','.join(map(str, recipe.embedding))} halves a map "
            f"{len(recipe.embedding) - 1} times; the base model's pictures are "
            f"{latent_factor(vae)} pixels a latent, which needs {halvings} "
            f"(e.g. embedding={','.join(['16'] + ['32'] * halvings)})")


def carry_controlnet(old: Any, unet: Any, recipe: ControlRecipe) -> Any:
    """A ControlNet for ``recipe.embedding`` going on from ``old``, whose embedding halves its
    maps fewer times (one trained for a smaller picture side): every weight but the embedding's
    copied; the embedding's first stages are ``old``'s, each added stage starts as a 2x2 average
    (its first convolution the identity), so the old features reach the old output layer."""
    new = build_controlnet(unet, recipe)
    state = new.state_dict()
    state.update({key: value for key, value in old.state_dict().items()
                  if key in state and state[key].shape == value.shape})
    for i in range(len(old.controlnet_cond_embedding.blocks),
                   len(new.controlnet_cond_embedding.blocks)):
        name = f"controlnet_cond_embedding.blocks.{i}"
        weight = state[f"{name}.weight"]
        init = torch.zeros_like(weight)
        for c in range(min(weight.shape[0], weight.shape[1])):
            if i % 2 == 0:
                init[c, c, 1, 1] = 1.0  # the stage's first convolution: the identity
            else:
                init[c, c, 1:, 1:] = 0.25  # its stride-2 one: the mean of a 2x2 block
        state[f"{name}.weight"], state[f"{name}.bias"] = init, torch.zeros_like(
            state[f"{name}.bias"])
    new.load_state_dict(state)
    return new


def encode(parts: dict[str, Any], pixels: torch.Tensor, ids: torch.Tensor
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """The pool's latents (scaled as the pipeline's) and text embeddings, once."""
    scale = float(parts["vae"].config.scaling_factor)
    with torch.no_grad():
        latents = torch.cat([parts["vae"].encode(pixels[i:i + 256]).latent_dist.mean * scale
                             for i in range(0, len(pixels), 256)])
        context = torch.cat([parts["text_encoder"](ids[i:i + 256])[0]
                             for i in range(0, len(ids), 256)])
    return latents, context


def train_controlnet(
    controlnet: Any, unet: Any, latents: torch.Tensor, maps: torch.Tensor,
    context: torch.Tensor, recipe: ControlRecipe, deadline: float,
    progress: Callable[[str], None], *, bf16: bool = False,
) -> tuple[Any, int]:
    """Until ``deadline`` (or ``max_steps``); returns the EMA ControlNet and the steps taken."""
    from diffusers import DDPMScheduler

    noise_sched: Any = DDPMScheduler(**{k: v for k, v in SCHEDULER.items() if k != "steps_offset"})
    alphas = noise_sched.alphas_cumprod
    snr = alphas / (1 - alphas)
    weights = torch.clamp(torch.clamp(snr, max=recipe.snr_gamma), min=recipe.low_snr_floor) / snr
    params = [p for p in controlnet.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=recipe.lr, weight_decay=1e-2)
    ema = copy.deepcopy(controlnet).eval().requires_grad_(False)
    live, averaged = list(controlnet.parameters()), list(ema.parameters())
    gen = torch.Generator().manual_seed(recipe.seed + 1)
    controlnet.train()
    step, started, losses = 0, time.monotonic(), []
    while step < recipe.max_steps and time.monotonic() < deadline:
        idx = torch.randint(len(latents), (recipe.batch,), generator=gen)
        x0, ctx = latents[idx], context[idx]
        cond = maps[idx].float().div(255)
        noise = torch.randn(x0.shape, generator=gen)
        noise += recipe.noise_offset * torch.randn((x0.shape[0], x0.shape[1], 1, 1),
                                                   generator=gen)
        t = torch.randint(0, noise_sched.config.num_train_timesteps, (recipe.batch,),
                          generator=gen)
        high = int(recipe.high_noise * recipe.batch)
        if high:
            t[:high] = torch.randint(recipe.high_noise_from,
                                     noise_sched.config.num_train_timesteps, (high,),
                                     generator=gen)
        noisy = noise_sched.add_noise(x0, noise, t)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            down, mid = controlnet(noisy, t, encoder_hidden_states=ctx, controlnet_cond=cond,
                                   return_dict=False)
            pred = unet(noisy, t, encoder_hidden_states=ctx,
                        down_block_additional_residuals=down,
                        mid_block_additional_residual=mid).sample
        per_item = F.mse_loss(pred.float(), noise, reduction="none").mean(dim=(1, 2, 3))
        loss = (per_item * weights[t]).mean()
        descend(opt, loss, params)
        decay = min(recipe.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_lerp_(averaged, live, 1 - decay)
        losses.append(loss.detach())
        step += 1
        if step % 50 == 0:
            rate = step / (time.monotonic() - started)
            mean = float(torch.stack(losses[-50:]).mean())
            losses = losses[-50:]
            progress(f"controlnet step {step}: loss {mean:.4f} ({rate:.2f} steps/s)")
    return ema, step


def train_demo_controlnet(out: Path, recipe: ControlRecipe | None = None,
                          progress: Callable[[str], None] = print, *, check: int = 32
                          ) -> dict[str, Any]:
    """Train the demo ControlNet into ``out`` (a Diffusers ControlNet folder with
    ``recipe.json`` beside its weights), then measure how it steers on ``check`` held-out
    scenes (``follows``; 0: not); returns what was recorded there."""
    recipe = recipe or ControlRecipe()
    torch.set_num_threads(recipe.threads)
    started = time.monotonic()
    deadline = started + recipe.minutes * 60
    base = Path(recipe.base) if recipe.base else DEMO_MODEL_DIR
    parts = load_base(base)
    check_embedding(recipe, parts["vae"])
    side = picture_side(parts["vae"])
    progress(f"rendering and edging {recipe.pool} scenes at {side}²")
    pixels, maps, ids = make_pool(recipe, parts["tokenizer"], side)
    latents, context = encode(parts, pixels, ids)
    del pixels
    if recipe.init_from:
        from diffusers import ControlNetModel

        controlnet = ControlNetModel.from_pretrained(recipe.init_from)
        if len(controlnet.config.conditioning_embedding_out_channels) < len(recipe.embedding):
            progress(f"carrying {recipe.init_from} over to the embedding {recipe.embedding}")
            controlnet = carry_controlnet(controlnet, parts["unet"], recipe)
    else:
        controlnet = build_controlnet(parts["unet"], recipe)
    progress(f"pool ready in {time.monotonic() - started:.0f} s; training until "
             f"{recipe.minutes:g} min")
    bf16 = recipe.bf16 and native_bf16()
    progress(f"bf16 autocast {'on' if bf16 else 'off'}")
    ema, steps = train_controlnet(controlnet, parts["unet"], latents, maps, context, recipe,
                                  deadline, progress, bf16=bf16)
    out.mkdir(parents=True, exist_ok=True)
    ema.save_pretrained(out, safe_serialization=True)
    history = (json.loads((Path(recipe.init_from) / "recipe.json").read_text())
               if recipe.init_from and (Path(recipe.init_from) / "recipe.json").is_file()
               else None)
    record: dict[str, Any] = {
        "recipe": asdict(recipe),
        "steps": steps,
        "minutes": round((time.monotonic() - started) / 60, 1),
        "machine": f"{platform.machine()} CPU, {recipe.threads} torch thread(s), bf16 "
                   f"autocast {'on' if bf16 else 'off'}",
        "torch": torch.__version__,
        "data": "engine/demo/scenes.py random_scene + render, core/control.py canny, seeded "
                "by recipe.seed",
        "parameters": sum(p.numel() for p in ema.parameters()),
        "frozen": f"{_shown(base)} (autoencoder, text encoder, UNet)",
    }
    if history is not None:
        record["continued_from"] = history
    if check:
        progress(f"checking it on {check} held-out scenes")
        record["adherence"] = follows(base, out, check) | {
            "held_out": f"{check} one-shape scenes at a side whose caption names the other side "
                        "(engine/demo/controlnet.py follows, seed 12345, 20 steps, guidance 5)"}
    (out / "recipe.json").write_text(json.dumps(record, indent=2) + "\n")
    return record



def follows(model: Path, controlnet: Path, n: int = 32, *, seed: int = 12345, steps: int = 20,
            guidance: float = 5.0, batch: int = 8) -> dict[str, float]:
    """How well the ControlNet steers, on ``n`` held-out scenes of one shape at a side whose
    caption names the opposite side (the edges from the scene as drawn): the share drawn at
    the edges' side with it (``edges_side``; and of the asked colour and kind, ``edges_kind``),
    and at the caption's side without it (``caption_side``)."""
    from diffusers import ControlNetModel, StableDiffusionControlNetPipeline

    from engine.demo.quality import load
    from engine.demo.score import read

    rng = random.Random(seed)
    scenes = [edged_scene(rng, two_shapes=0.0, sided=1.0) for _ in range(n)]
    plain = load(model)
    side = picture_side(plain.vae)
    maps = [canny(render(s, side, seed=rng.randrange(2**31))) for s in scenes]
    told_ = [replace(s, side=_OTHER_SIDE[s.side or "left"]) for s in scenes]
    seeds = [rng.randrange(2**31) for _ in scenes]
    steered: Any = StableDiffusionControlNetPipeline(
        **plain.components, controlnet=ControlNetModel.from_pretrained(controlnet))
    steered.set_progress_bar_config(disable=True)
    styles, blocklist = default_registry(), Blocklist()
    count = token_counter(plain.tokenizer)
    at_side = {"left": lambda f: f.x < 0.5, "right": lambda f: f.x > 0.5,
               "top": lambda f: f.y < 0.5, "bottom": lambda f: f.y > 0.5}
    tally = {"edges_side": 0, "edges_kind": 0, "caption_side": 0}
    for start in range(0, n, batch):
        chunk = range(start, min(start + batch, n))
        pairs = [prepare_prompt(GenerationRequest(prompt=told_[i].caption), styles, blocklist,
                                nsfw_allowed=False, count_tokens=count)[0] for i in chunk]
        common = {"prompt": [p for p, _ in pairs], "negative_prompt": [q for _, q in pairs],
                  "num_inference_steps": steps, "guidance_scale": guidance, "height": side,
                  "width": side}
        with torch.inference_mode():
            with_edges = steered(image=[maps[i] for i in chunk], **common, generator=[
                torch.Generator().manual_seed(seeds[i]) for i in chunk]).images
            without = plain(**common, generator=[
                torch.Generator().manual_seed(seeds[i]) for i in chunk]).images
        for i, a, b in zip(chunk, with_edges, without, strict=True):
            shape = scenes[i].shapes[0]
            found = read(a).shape(shape.colour)
            if found is not None and at_side[scenes[i].side or "left"](found):
                tally["edges_side"] += 1
                tally["edges_kind"] += bool(found.kind == shape.kind)
            other = read(b).shape(shape.colour)
            tally["caption_side"] += bool(
                other is not None and at_side[told_[i].side or "left"](other))
    return {k: round(v / n, 3) for k, v in tally.items()}


def _shown(folder: Path) -> str:
    """``folder`` as the repository names it when it is the package's own."""
    try:
        return str(folder.resolve().relative_to(PACKAGE_DATA_DIR.parents[1]))
    except ValueError:
        return str(folder)
