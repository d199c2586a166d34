"""Growing the demo model's pictures from 64² to 128² without training its UNet again
(``atelier models grow-demo``, issue 27).

The UNet draws on a 16x16 latent grid. A 64² autoencoder maps that grid to pixels 4 to 1; an
autoencoder with one more stage maps the same grid 8 to 1, so the same UNet, its text encoder
and tokenizer then draw 128² pictures, as SD 1.5 (8 to 1) does. The grown autoencoder keeps
the latent space the UNet learnt:

- its decoder learns to draw, from the old encoder's latent of a scene's 64² picture, the same
  scene rendered at 128² (``render`` places shapes by fractions of the side, so both sizes
  show one layout; a pixel-art cell stays 1/32 of the side);
- its encoder (img2img, inpainting, the ControlNet's latents) learns the old encoder's latent
  of the 64² picture from the 128² one.

Both start from the old weights: the old stages become the grown one's inner stages, the new
outer stage starts as nearest-neighbour upsampling (an identity convolution after it, residual
blocks whose last convolution is zero), so step 0 already draws the old picture at twice the
size, and training only has to add the detail.
"""

from __future__ import annotations

import json
import logging
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from engine.demo.scenes import RENDERINGS, random_scene, render
from engine.demo.train import (
    as_pixels,
    descend,
    encode_pool,
    latent_factor,
    machine,
    picture_side,
    with_overrides,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GrowRecipe:
    seed: int = 21
    pool: int = 6000  # scenes rendered at both sizes once
    two_shapes: float = 0.6
    sided: float = 0.4
    styled: float = 0.4
    minutes: float = 24.0  # wall-clock budget of both phases
    encoder_share: float = 0.25  # of the budget
    batch: int = 16
    crop: int = 64  # pixels of the 128² picture (8 latents): all convolutions, as train_vae
    lr: float = 1e-3  # the encoder's
    # The decoder's: at 1e-3 it diverged after ~900 steps (loss 0.011 -> 0.10).
    decoder_lr: float = 2e-4
    threads: int = 2
    max_steps: int = 100_000  # of each phase
    measured_on: int = 256  # held-out scenes the result is measured on (``measure``)

    def with_overrides(self, pairs: list[str]) -> GrowRecipe:
        """This recipe with ``field=value`` pairs applied; ValueError naming a bad pair."""
        return with_overrides(self, pairs)


def grown_vae(old: Any) -> Any:
    """An AutoencoderKL with one more (outer) stage than ``old``, its inner stages ``old``'s
    weights and its new stage an upsampling that starts as nearest-neighbour."""
    from diffusers import AutoencoderKL

    cfg = old.config
    first = cfg.block_out_channels[0]
    stages = len(cfg.block_out_channels) + 1
    vae: Any = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=cfg.latent_channels,
        sample_size=2 * cfg.sample_size,
        down_block_types=("DownEncoderBlock2D",) * stages,
        up_block_types=("UpDecoderBlock2D",) * stages,
        block_out_channels=(first, *cfg.block_out_channels),
        layers_per_block=cfg.layers_per_block, norm_num_groups=cfg.norm_num_groups,
        mid_block_add_attention=cfg.mid_block_add_attention,
        scaling_factor=cfg.scaling_factor,
    )
    old_state = old.state_dict()
    state = vae.state_dict()
    moved = {}
    for key, value in old_state.items():
        # The encoder's stages move one in (a new outer one reads pixels first, with the old
        # conv_in, and halves them); the decoder's keep their places, the new one goes last.
        new_key = key
        if key.startswith("encoder.down_blocks."):
            index = int(key.split(".")[2])
            new_key = key.replace(f"encoder.down_blocks.{index}.",
                                  f"encoder.down_blocks.{index + 1}.", 1)
        if new_key in state and state[new_key].shape == value.shape:
            moved[new_key] = value
    state.update(moved)
    # The decoder's new outermost stage: an identity upsampling convolution before it, residual
    # blocks that add nothing; the old outer stage's upsampler (new) is identity too.
    with torch.no_grad():
        up = f"decoder.up_blocks.{stages - 2}.upsamplers.0.conv"
        weight = torch.zeros_like(state[f"{up}.weight"])
        for c in range(weight.shape[0]):
            weight[c, c, 1, 1] = 1.0
        state[f"{up}.weight"], state[f"{up}.bias"] = weight, torch.zeros_like(state[f"{up}.bias"])
        for key in list(state):
            if key.startswith(f"decoder.up_blocks.{stages - 1}.resnets.") and ".conv2." in key:
                state[key] = torch.zeros_like(state[key])
    vae.load_state_dict(state)
    return vae


def make_pairs(recipe: GrowRecipe, small: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(the pool at ``small``², the same scenes at 2 x ``small``²), both in [-1, 1]."""
    rng = random.Random(recipe.seed)
    lows = np.empty((recipe.pool, small, small, 3), np.uint8)
    highs = np.empty((recipe.pool, 2 * small, 2 * small, 3), np.uint8)
    for i in range(recipe.pool):
        scene = random_scene(rng, recipe.two_shapes, recipe.sided)
        style = rng.choice(list(RENDERINGS)) if rng.random() < recipe.styled else None
        seed = rng.randrange(2**31)
        lows[i] = np.asarray(render(scene, small, style, seed=seed))
        highs[i] = np.asarray(render(scene, 2 * small, style, seed=seed))
    return as_pixels(lows), as_pixels(highs)


def grow(old_folder: Path, out: Path, recipe: GrowRecipe | None = None,
         progress: Callable[[str], None] = print) -> dict[str, Any]:
    """``old_folder``'s demo model with its autoencoder grown one stage, written to ``out``
    (the other parts copied as they are); returns what ``recipe.json`` records of it."""
    import shutil

    from diffusers import AutoencoderKL

    recipe = recipe or GrowRecipe()
    torch.set_num_threads(recipe.threads)
    started = time.monotonic()
    old: Any = AutoencoderKL.from_pretrained(old_folder / "vae").eval()
    small = picture_side(old)
    vae = grown_vae(old)
    progress(f"rendering {recipe.pool} scenes at {small}² and {2 * small}²")
    lows, highs = make_pairs(recipe, small)
    latents = encode_pool(old, lows, 1.0)  # unscaled, as the autoencoder's own
    factor = latent_factor(vae)
    crop = min(recipe.crop, 2 * small)
    gen = torch.Generator().manual_seed(recipe.seed)
    budget = recipe.minutes * 60 - (time.monotonic() - started)
    record: dict[str, Any] = {}

    def phase(name: str, params: list[torch.nn.Parameter], seconds: float, peak: float,
              loss_of: Callable[[torch.Tensor, int, int], torch.Tensor]) -> None:
        opt = torch.optim.AdamW(params, lr=peak, weight_decay=0.0)
        until, step, losses = time.monotonic() + seconds, 0, []
        while time.monotonic() < until and step < recipe.max_steps:
            idx = torch.randint(len(highs), (recipe.batch,), generator=gen)
            ox, oy = (factor * (v // factor) for v in torch.randint(
                0, 2 * small - crop + 1, (2,), generator=gen).tolist())
            lr = peak * min(1.0, (step + 1) / 50) * max(
                0.05, (until - time.monotonic()) / seconds)  # warm-up, then down to 5%
            for group in opt.param_groups:
                group["lr"] = lr
            loss = loss_of(idx, ox, oy)
            descend(opt, loss, params)
            losses.append(loss.item())
            step += 1
            if step % 100 == 0:
                progress(f"{name} step {step}: loss {np.mean(losses[-100:]):.5f}")
        record[f"{name}_steps"] = step
        record[f"{name}_loss"] = round(float(np.mean(losses[-100:])), 6) if losses else None

    def encoder_loss(idx: torch.Tensor, ox: int, oy: int) -> torch.Tensor:
        pixels = highs[idx][:, :, oy:oy + crop, ox:ox + crop]
        want = latents[idx][:, :, oy // factor:(oy + crop) // factor,
                            ox // factor:(ox + crop) // factor]
        return F.mse_loss(vae.encode(pixels).latent_dist.mean, want)

    def decoder_loss(idx: torch.Tensor, ox: int, oy: int) -> torch.Tensor:
        # The decoder reads the latents the UNet makes: the old encoder's, of the small picture.
        z = latents[idx][:, :, oy // factor:(oy + crop) // factor,
                         ox // factor:(ox + crop) // factor]
        drawn = vae.decode(z).sample
        want = highs[idx][:, :, oy:oy + crop, ox:ox + crop]
        # L1 beside the MSE: edges drawn sharp (MSE alone settles for a blur between colours).
        return F.mse_loss(drawn, want) + F.l1_loss(drawn, want)

    vae.train()
    encoder_params = [*vae.encoder.parameters(), *vae.quant_conv.parameters()]
    decoder_params = [*vae.decoder.parameters(), *vae.post_quant_conv.parameters()]
    phase("encoder", encoder_params, budget * recipe.encoder_share, recipe.lr, encoder_loss)
    # The rest of the budget, less a little for the measuring.
    phase("decoder", decoder_params,
          max(1.0, started + recipe.minutes * 60 - time.monotonic() - 20), recipe.decoder_lr,
          decoder_loss)
    vae.eval()
    record.update(measure(old, vae, recipe, recipe.measured_on))
    progress(json.dumps(record))

    out.mkdir(parents=True, exist_ok=True)
    for part in ("text_encoder", "tokenizer", "unet", "scheduler", "model_index.json"):
        source = old_folder / part
        if source.resolve() == (out / part).resolve():
            continue
        if source.is_dir():
            shutil.copytree(source, out / part, dirs_exist_ok=True)
        else:
            shutil.copy2(source, out / part)
    vae.save_pretrained(out / "vae", safe_serialization=True)
    history_file = old_folder / "recipe.json"
    history = json.loads(history_file.read_text()) if history_file.exists() else {}
    history["grown"] = {
        "recipe": asdict(recipe),
        "minutes": round((time.monotonic() - started) / 60, 1),
        "machine": machine("cpu", recipe.threads),
        "torch": torch.__version__,
        "how": "engine/demo/grow.py: the autoencoder grown one stage (64² -> 128² pictures from "
               "the same 16x16 latents); the UNet, text encoder and tokenizer unchanged",
        "vae_parameters": sum(p.numel() for p in vae.parameters()),
        "measured_on": f"{recipe.measured_on} held-out scenes, the recipe's seed + 1 "
                       "(engine/demo/grow.py measure)",
        **record,
    }
    (out / "recipe.json").write_text(json.dumps(history, indent=2) + "\n")
    return dict(history["grown"])


def measure(old: Any, vae: Any, recipe: GrowRecipe, n: int = 256) -> dict[str, float]:
    """On ``n`` held-out scenes (the recipe's seed + 1), PSNR (dB) against their larger
    renders of: the old decoder's picture upscaled (bicubic), the grown decoder's, and the
    grown autoencoder's round trip; and how near the grown encoder's latents are to the old
    encoder's (relative RMS error)."""
    lows, highs = make_pairs(replace(recipe, seed=recipe.seed + 1, pool=n), picture_side(old))
    latents = encode_pool(old, lows, 1.0)
    with torch.no_grad():
        before = F.interpolate(old.decode(latents).sample, scale_factor=2, mode="bicubic")
        after = vae.decode(latents).sample
        mine = vae.encode(highs).latent_dist.mean
        trip = vae.decode(mine).sample

    def psnr(x: torch.Tensor) -> float:
        mse = F.mse_loss(x.clamp(-1, 1), highs).item()
        return round(float(10 * np.log10(4.0 / max(mse, 1e-12))), 2)

    return {
        "psnr_old_decoder_upscaled": psnr(before),
        "psnr_grown_decoder": psnr(after),
        "psnr_grown_round_trip": psnr(trip),
        "encoder_relative_error": round(float((mine - latents).pow(2).mean().sqrt()
                                              / latents.pow(2).mean().sqrt()), 4),
    }
