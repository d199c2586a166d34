"""Training the demo model from scratch on the CPU (``atelier models train-demo``): a small
Stable Diffusion 1.5-family pipeline (AutoencoderKL with 8x smaller latents, as SD's, a CLIP text
encoder over our own tokenizer, a UNet2DConditionModel with cross-attention) that draws the
scenes of ``engine.demo.scenes`` from their captions.

The recipe, in two phases on one pool of seeded scenes:
1. the autoencoder learns to reconstruct the scenes (MSE, a tiny KL term); its latent scale
   (``scaling_factor``) is measured on the pool, as SD's was;
2. the UNet and the text encoder learn to denoise the pool's latents (epsilon prediction on
   SD's noise schedule, min-SNR loss weights, offset noise so whole-picture colour can move,
   the caption replaced by a negative prompt or nothing 10% of the time so classifier-free
   guidance works, an EMA of the weights, which is what is saved).
The prompts it learns from are what ``core.prompts.prepare_prompt`` makes of each caption (a
style's template, the quality terms), so what a person types reaches the model as in training.

Which of two shapes goes left (or on top) is learnt last, and only once the model can place
one shape at a named side: with ``sided`` scenes ("a red circle on the left on ...") in the
data, the relation word's token, which follows the first shape's words, learns to carry that
shape to its side (issue 13: going on 50 min on a CPU with such scenes took position from chance
to 98%; 800 steps without them stayed at chance). ``init_from`` goes on
training a saved model (``atelier models train-demo --from FOLDER --set field=value``).

Phrasing (issue 27): people do not type the captions' grammar ("red circle left of a yellow
star, white bg", "on a green background, a blue square above a red triangle"). ``phrasing``
is the share of the pool's captions said instead by ``engine.demo.phrasing.describe`` with its
training templates (synonyms, word orders, fillers, upper case), ``typos`` the share of those
with one mistyped word; the scenes and pictures are the same whatever the share. The tokenizer
then holds every phrasing word as one token (``engine.demo.vocab``): going on from a folder
whose tokenizer lacks them, its text encoder is carried over to the extended tokenizer first
(rows copied by token, a synonym's from its word's), so the grammar still reads as before.
``bench/demo_quality.py`` measures the held-out templates, which training never sees.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
import torch.nn.functional as F

from core.prompts import Blocklist, prepare_prompt
from core.request import GenerationRequest
from core.styles import default_registry
from engine.demo.phrasing import describe
from engine.demo.scenes import RENDERINGS, random_scene, render
from engine.demo.vocab import DEMO_WORDS, carry_text_encoder, lacks_phrase_words, phrase_tokenizer
from engine.engine import token_counter
from engine.tiny import MAX_LENGTH, build_tokenizer, text_config

log = logging.getLogger(__name__)
R = TypeVar("R")

# The pictures' side: 128² from a 16x16 latent grid (issue 27; the models before it drew 64²
# with a 4-to-1 autoencoder, and ``engine.demo.grow`` grew the shipped one's).
SIZE = 128
# SD 1.5's noise schedule and sampler config, so every scheduler Atelier offers applies.
SCHEDULER = {
    "num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
    "beta_schedule": "scaled_linear", "prediction_type": "epsilon", "steps_offset": 1,
    "timestep_spacing": "leading",
}


@dataclass(frozen=True)
class Recipe:
    seed: int = 0
    pool: int = 20_000  # scenes rendered once and reused
    two_shapes: float = 0.5
    sided: float = 0.0  # share of one-shape scenes placed at a named side ("on the left")
    styled: float = 0.4  # share of scenes drawn in one of RENDERINGS' styles
    # Share of captions said in a phrasing people use (engine.demo.phrasing's training
    # templates) instead of the grammar, and of those the share with one mistyped word.
    phrasing: float = 0.0
    typos: float = 0.0
    vae_steps: int = 3000
    vae_batch: int = 32
    vae_crop: int = 64  # trained on crops (it is all convolutions): 4x the scenes per second
    vae_lr: float = 2e-3
    vae_share: float = 0.3  # at most this share of the budget for the autoencoder
    minutes: float = 28.0  # wall-clock budget of the whole training, both phases
    max_steps: int = 100_000
    batch: int = 128  # 32 learns far less per minute, even on a CPU (issue 13's sweep)
    lr: float = 1e-3
    # "cosine": down to a tenth over the budget (steps or minutes, whichever ends first).
    lr_schedule: str = "constant"
    uncond: float = 0.1
    noise_offset: float = 0.1
    ema: float = 0.999
    snr_gamma: float = 5.0
    # Where the picture's layout is decided the epsilon loss weighs the picture almost nothing
    # (min-SNR gives it a weight of SNR, ~0.005 at t=999): ``low_snr_floor`` raises that
    # weight to at least this, and ``high_noise`` draws this share of each batch's timesteps
    # from [high_noise_from, 1000).
    low_snr_floor: float = 0.0
    high_noise: float = 0.0
    high_noise_from: int = 500
    threads: int = 2
    device: str = "cpu"  # "cuda" trains the same recipe on a GPU
    unet_channels: tuple[int, int, int] = (32, 64, 96)
    text_width: int = 64
    # A demo model folder to go on training: its tokenizer, autoencoder (kept as it is) and
    # weights (unet_channels and text_width are then its own).
    init_from: str | None = None

    def with_overrides(self, pairs: list[str]) -> Recipe:
        """This recipe with ``field=value`` pairs applied (each value read as its field's type);
        ValueError naming the pair for an unknown field or a value of the wrong kind."""
        return with_overrides(self, pairs)


def with_overrides(recipe: R, pairs: list[str]) -> R:
    """``recipe`` (a dataclass) with ``field=value`` pairs applied, each value read as its
    field's type (a tuple's as its first item's, comma-separated); ValueError naming the pair
    for an unknown field or a value of the wrong kind."""
    fields = recipe.__dataclass_fields__  # type: ignore[attr-defined]
    changes: dict[str, Any] = {}
    for pair in pairs:
        name, sep, text = pair.partition("=")
        name = name.strip().replace("-", "_")
        if not sep or name not in fields:
            raise ValueError(f"{pair!r}: expected field=value with one of {', '.join(fields)}")
        current = getattr(recipe, name)
        try:
            if isinstance(current, tuple):
                kind = type(current[0]) if current else int
                value: Any = tuple(kind(v.strip()) for v in text.split(","))
            elif current is None or isinstance(current, str):
                value = None if text in ("", "none", "None") else text
            else:
                value = type(current)(text)
        except ValueError:
            raise ValueError(f"{pair!r}: {text!r} is not a {type(current).__name__}") from None
        changes[name] = value
    return replace(recipe, **changes)  # type: ignore[type-var]


def build_components(recipe: Recipe) -> dict[str, Any]:
    """The untrained pipeline parts (the tokenizer's vocabulary holds the scene words, though
    its merges still split some of them, e.g. "purple" into three pieces)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    torch.manual_seed(recipe.seed)
    tokenizer = build_tokenizer(DEMO_WORDS)
    if recipe.phrasing:
        tokenizer = phrase_tokenizer(tokenizer)
    width = recipe.text_width
    text_encoder = CLIPTextModel(text_config(tokenizer, hidden=width, layers=3, heads=4,
                                             intermediate=2 * width))
    # Few channels per normalisation group (4+): with one, GroupNorm would erase each
    # channel's mean, and a flat background's colour is exactly that mean.
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, sample_size=SIZE,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        # No attention in the middle: at 16x16 it would cost more than the rest on a CPU.
        block_out_channels=(16, 16, 32, 64), layers_per_block=1, norm_num_groups=4,
        mid_block_add_attention=False,
    )
    unet = UNet2DConditionModel(
        sample_size=SIZE // 8, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=recipe.unet_channels,
        # Cross-attention at 8x8 and 4x4 only: at 16x16 it costs ~7x the step on a CPU.
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=width, attention_head_dim=8, norm_num_groups=8,
    )
    return {"tokenizer": tokenizer, "text_encoder": text_encoder, "vae": vae, "unet": unet}


def load_components(folder: Path) -> dict[str, Any]:
    """A saved demo model's parts, to go on training them."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    return {
        "tokenizer": CLIPTokenizer.from_pretrained(folder / "tokenizer"),
        "text_encoder": CLIPTextModel.from_pretrained(folder / "text_encoder"),
        "vae": AutoencoderKL.from_pretrained(folder / "vae"),
        "unet": UNet2DConditionModel.from_pretrained(folder / "unet"),
    }


def descend(opt: torch.optim.Optimizer, loss: torch.Tensor, params: list[Any]) -> None:
    """One optimiser step on ``loss``, its gradient's norm clipped to 1 (every demo trainer)."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()


def as_pixels(images: np.ndarray) -> torch.Tensor:
    """uint8 NHWC pictures as the models take them: float NCHW in [-1, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1)


def picture_side(vae: Any) -> int:
    """The side of the pictures an autoencoder was made for (a model folder's own: 64 for the
    models before issue 27, 128 since)."""
    return int(vae.config.sample_size)


def latent_factor(vae: Any) -> int:
    """Pixels per latent along a side (Diffusers' ``vae_scale_factor``)."""
    return int(2 ** (len(vae.config.block_out_channels) - 1))


def make_pool(recipe: Recipe, tokenizer: Any, drawn_as: str | None = None, size: int = SIZE,
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(images in [-1, 1], prompt token ids, negative token ids) of ``recipe.pool`` scenes
    drawn at ``size``²; ``drawn_as``: every scene drawn in this style whatever its prompt says
    (a LoRA's look)."""
    rng = random.Random(recipe.seed)
    # The phrasings draw from their own generator: the scenes stay those of phrasing=0.
    words = random.Random(recipe.seed + 1)
    styles, blocklist, count = default_registry(), Blocklist(), token_counter(tokenizer)
    images = np.empty((recipe.pool, size, size, 3), np.uint8)
    prompts, negatives = [], []
    for i in range(recipe.pool):
        scene = random_scene(rng, recipe.two_shapes, recipe.sided)
        style = rng.choice(list(RENDERINGS)) if rng.random() < recipe.styled else None
        images[i] = np.asarray(render(scene, size, drawn_as or style, seed=rng.randrange(2**31)))
        caption = scene.caption
        if recipe.phrasing and words.random() < recipe.phrasing:
            caption = describe(scene, words, typo_rate=recipe.typos)
        request = GenerationRequest(prompt=caption, styles=(style,) if style else (),
                                    raw=rng.random() < 0.2)
        ((prompt, negative),) = prepare_prompt(request, styles, blocklist,
                                               nsfw_allowed=rng.random() < 0.5, count_tokens=count)
        prompts.append(prompt)
        negatives.append(negative)

    def ids(texts: list[str]) -> torch.Tensor:
        return torch.as_tensor(tokenizer(texts, padding="max_length", max_length=MAX_LENGTH,
                                         truncation=True, return_tensors="np").input_ids)

    return as_pixels(images), ids(prompts), ids(negatives)


def train_vae(vae: Any, pixels: torch.Tensor, recipe: Recipe, deadline: float) -> float:
    """Autoencoder phase; returns the latent scaling factor (1 / std of the pool's latents)."""
    opt = torch.optim.AdamW(vae.parameters(), lr=recipe.vae_lr, weight_decay=0.0)
    # One cycle: a warm-up over 5% of the steps, then a cosine down to almost nothing.
    cycle = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=recipe.vae_lr, total_steps=recipe.vae_steps,
        pct_start=min(0.5, max(0.05, 2 / recipe.vae_steps)))  # 1.0 divides by zero
    gen = torch.Generator().manual_seed(recipe.seed)
    side, grid = pixels.shape[-1], latent_factor(vae)
    crop = min(recipe.vae_crop, side)
    vae.train()
    for step in range(recipe.vae_steps):
        idx = torch.randint(len(pixels), (recipe.vae_batch,), generator=gen)
        # On the latent grid, so every crop sees the encoder's blocks as whole.
        ox, oy = (grid * (v // grid) for v in torch.randint(0, side - crop + 1, (2,),
                                                             generator=gen).tolist())
        batch = pixels[idx.to(pixels.device)][:, :, oy:oy + crop, ox:ox + crop]
        posterior = vae.encode(batch).latent_dist
        recon = vae.decode(posterior.mode()).sample  # a plain autoencoder: learns ~4x faster
        loss = F.mse_loss(recon, batch) + 1e-6 * posterior.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        cycle.step()
        if step % 100 == 0:
            log.info("vae step %d: loss %.4f", step, loss.item())
        if time.monotonic() > deadline:
            break
    vae.eval()
    with torch.no_grad():
        sample = torch.cat([vae.encode(pixels[i:i + 256]).latent_dist.mean
                            for i in range(0, min(len(pixels), 2048), 256)])
    return float(1.0 / sample.std())


def encode_pool(vae: Any, pixels: torch.Tensor, scale: float) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([vae.encode(pixels[i:i + 256]).latent_dist.mean * scale
                          for i in range(0, len(pixels), 256)])


def train_unet(parts: dict[str, Any], latents: torch.Tensor, prompt_ids: torch.Tensor,
               negative_ids: torch.Tensor, recipe: Recipe, deadline: float,
               progress: Callable[[str], None]) -> tuple[Any, Any, int]:
    """Denoising phase until ``deadline`` (or ``max_steps``); returns the EMA UNet and text
    encoder and the steps taken."""
    from diffusers import DDPMScheduler

    unet, text_encoder = parts["unet"], parts["text_encoder"]
    noise_sched: Any = DDPMScheduler(**{k: v for k, v in SCHEDULER.items() if k != "steps_offset"})
    noise_sched.alphas_cumprod = noise_sched.alphas_cumprod.to(latents.device)
    alphas = noise_sched.alphas_cumprod
    snr = alphas / (1 - alphas)
    # min-SNR for epsilon prediction (the picture's weight is min(SNR, gamma)), floored.
    weights = torch.clamp(torch.clamp(snr, max=recipe.snr_gamma), min=recipe.low_snr_floor) / snr
    empty = torch.as_tensor(parts["tokenizer"]([""], padding="max_length", max_length=MAX_LENGTH,
                                               return_tensors="np").input_ids)
    params = [*unet.parameters(), *text_encoder.parameters()]
    opt = torch.optim.AdamW(params, lr=recipe.lr, weight_decay=1e-2)
    ema_unet, ema_text = copy.deepcopy(unet).eval(), copy.deepcopy(text_encoder).eval()
    live = [*unet.parameters(), *text_encoder.parameters()]
    averaged = [*ema_unet.parameters(), *ema_text.parameters()]
    device = latents.device
    empty = empty.to(device)
    gen = torch.Generator().manual_seed(recipe.seed + 1)
    unet.train()
    text_encoder.train()
    step, started, losses = 0, time.monotonic(), []
    budget = max(deadline - started, 1.0)
    while step < recipe.max_steps and time.monotonic() < deadline:
        idx = torch.randint(len(latents), (recipe.batch,), generator=gen)
        x0 = latents[idx.to(device)]
        ids = prompt_ids[idx].clone()
        drop = torch.rand(recipe.batch, generator=gen)
        ids[drop < recipe.uncond / 2] = negative_ids[idx][drop < recipe.uncond / 2]
        ids[(drop >= recipe.uncond / 2) & (drop < recipe.uncond)] = empty[0].cpu()
        noise = torch.randn(x0.shape, generator=gen)
        noise += recipe.noise_offset * torch.randn((x0.shape[0], x0.shape[1], 1, 1),
                                                   generator=gen)
        t = torch.randint(0, noise_sched.config.num_train_timesteps, (recipe.batch,),
                          generator=gen)
        high = int(recipe.high_noise * recipe.batch)
        if high:
            t[:high] = torch.randint(recipe.high_noise_from, noise_sched.config.num_train_timesteps,
                                     (high,), generator=gen)
        ids, noise, t = ids.to(device), noise.to(device), t.to(device)
        noisy = noise_sched.add_noise(x0, noise, t)
        context = text_encoder(ids)[0]
        pred = unet(noisy, t, encoder_hidden_states=context).sample
        per_item = F.mse_loss(pred, noise, reduction="none").mean(dim=(1, 2, 3))
        loss = (per_item * weights[t]).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        if recipe.lr_schedule == "cosine":
            done = max(step / recipe.max_steps, (time.monotonic() - started) / budget)
            for group in opt.param_groups:
                group["lr"] = recipe.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(done, 1))))
        opt.step()
        decay = min(recipe.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_lerp_(averaged, live, 1 - decay)
        losses.append(loss.detach())
        step += 1
        if step % 250 == 0:
            rate = step / (time.monotonic() - started)
            mean = float(torch.stack(losses[-250:]).mean())
            losses = losses[-250:]
            progress(f"unet step {step}: loss {mean:.4f} ({rate:.1f} steps/s)")
    return ema_unet, ema_text, step


def machine(device: str, threads: int) -> str:
    """What a training ran on, for its recipe.json: the GPU's name, or the CPU's model and how
    many of its cores the training's threads had."""
    import os
    import platform

    if device.startswith("cuda") and torch.cuda.is_available():
        return f"cuda: {torch.cuda.get_device_name(torch.device(device))}"
    name = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    return f"cpu: {name}, {threads} threads on {os.cpu_count()} cores"


def train_demo(out: Path, recipe: Recipe | None = None,
               progress: Callable[[str], None] = print) -> dict[str, Any]:
    """Train the demo model into ``out`` (a Diffusers folder with ``recipe.json`` beside the
    weights); returns what was recorded there."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline

    recipe = recipe or Recipe()
    torch.set_num_threads(recipe.threads)
    started = time.monotonic()
    deadline = started + recipe.minutes * 60
    parent = Path(recipe.init_from) if recipe.init_from else None
    parts = load_components(parent) if parent else build_components(recipe)
    history = json.loads((parent / "recipe.json").read_text()) if parent and (
        parent / "recipe.json").exists() else None
    if parent and recipe.phrasing and lacks_phrase_words(parts["tokenizer"]):
        progress("carrying the text encoder over to a tokenizer with the phrasing words")
        tokenizer = phrase_tokenizer(parts["tokenizer"])
        carry_text_encoder(parts["text_encoder"], parts["tokenizer"], tokenizer)
        parts["tokenizer"] = tokenizer
    device = torch.device(recipe.device)
    for name in ("vae", "unet", "text_encoder"):
        parts[name].to(device)
    progress(f"rendering {recipe.pool} scenes")
    pixels, prompt_ids, negative_ids = make_pool(recipe, parts["tokenizer"],
                                                 size=picture_side(parts["vae"]))
    pixels = pixels.to(device)
    if parent:
        scale = float(parts["vae"].config.scaling_factor)
        progress(f"going on from {parent} (its autoencoder kept)")
    else:
        progress(f"autoencoder: {recipe.vae_steps} steps")
        scale = train_vae(parts["vae"], pixels, recipe,
                          started + recipe.minutes * 60 * recipe.vae_share)
    latents = encode_pool(parts["vae"], pixels, scale)
    progress(f"latents {tuple(latents.shape)}, scaling factor {scale:.3f}; denoiser until "
             f"{recipe.minutes:g} min")
    unet, text_encoder, steps = train_unet(parts, latents, prompt_ids, negative_ids, recipe,
                                           deadline, progress)
    parts["vae"].register_to_config(scaling_factor=scale)
    for model in (parts["vae"], unet, text_encoder):
        model.to("cpu")
    pipe: Any = StableDiffusionPipeline(
        vae=parts["vae"], text_encoder=text_encoder, tokenizer=parts["tokenizer"], unet=unet,
        scheduler=EulerDiscreteScheduler(**SCHEDULER), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False,
    )
    out.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(out, safe_serialization=True)
    record = {
        "recipe": asdict(recipe),
        "unet_steps": steps,
        "minutes": round((time.monotonic() - started) / 60, 1),
        "torch": torch.__version__,
        "machine": machine(recipe.device, recipe.threads),
        "data": "engine/demo/scenes.py: random_scene + render, seeded by recipe.seed; "
                "captions in engine/demo/phrasing.py's phrasings at recipe.phrasing",
        "parameters": {name: sum(p.numel() for p in parts[name].parameters())
                       for name in ("unet", "vae")} | {
                           "text_encoder": sum(p.numel() for p in text_encoder.parameters())},
    }
    if history is not None:
        record["continued_from"] = history
    (out / "recipe.json").write_text(json.dumps(record, indent=2) + "\n")
    return record

