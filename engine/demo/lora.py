"""Training the demo LoRA (``atelier models train-demo-lora``): a PEFT LoRA on the demo model's
UNet that draws every shape as an outline, for the very captions the model draws filled.

The recipe: scenes from ``engine.demo.scenes`` with plain prompts (what ``prepare_prompt``
makes of each caption, no style), each drawn as ``look`` (line-art: outlines) instead; the
base UNet, text encoder and autoencoder frozen; only the LoRA's low-rank matrices on the UNet
(attention projections and the ResNet convolutions: filled-or-outline is decided at the
16x16 latent, where the first and last blocks have convolutions only) learn the same
denoising loss as ``engine.demo.train``. Saved as Diffusers saves a trained LoRA
(``save_lora_weights``, safetensors), so the engine's ``load_lora_weights`` reads it like a
LoRA from Civitai or the hub; ``recipe.json`` beside it records how it was made.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from engine.demo.scenes import RENDERINGS
from engine.demo.train import (
    SCHEDULER,
    Recipe,
    descend,
    encode_pool,
    load_components,
    make_pool,
    picture_side,
    with_overrides,
)
from engine.tiny import MAX_LENGTH

log = logging.getLogger(__name__)

LORA_FILE = "outline.safetensors"
# Every Linear/Conv2d whose name ends so: cross- and self-attention, and each ResNet block's
# two convolutions (PEFT matches a module by the end of its dotted name).
TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2")


@dataclass(frozen=True)
class LoraRecipe:
    seed: int = 0
    look: str = "line-art"  # the style (scenes.RENDERINGS) every training scene is drawn in
    pool: int = 3000  # scenes rendered once and reused
    two_shapes: float = 0.5
    sided: float = 0.3
    rank: int = 4
    targets: tuple[str, ...] = TARGETS
    minutes: float = 10.0  # wall-clock budget
    max_steps: int = 100_000
    batch: int = 32
    lr: float = 2e-3
    uncond: float = 0.1  # as the base model: the LoRA moves the unconditional branch too
    noise_offset: float = 0.1
    snr_gamma: float = 5.0
    threads: int = 1  # a laptop's spare core; the engine's tests share the box

    def with_overrides(self, pairs: list[str]) -> LoraRecipe:
        """This recipe with ``field=value`` pairs applied; ValueError naming a bad pair."""
        recipe = with_overrides(self, pairs)
        if recipe.look not in RENDERINGS:
            raise ValueError(f"look must be one of {', '.join(RENDERINGS)}, got {recipe.look!r}")
        return recipe


def _contexts(text_encoder: Any, ids: torch.Tensor) -> torch.Tensor:
    """The frozen text encoder's output for each row of token ids (computed once)."""
    with torch.no_grad():
        return torch.cat([text_encoder(ids[i:i + 256])[0] for i in range(0, len(ids), 256)])


def _shown(path: Path) -> str:
    """``path`` relative to the working directory where it is under it (the repository)."""
    try:
        return str(path.resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _machine(threads: int) -> str:
    from engine.devices import detect_devices

    cpu = detect_devices()[-1]
    return f"{cpu.name or 'CPU'} ({threads} of {cpu.cores} cores)"


def train_demo_lora(model: Path, out: Path, recipe: LoraRecipe | None = None,
                    progress: Callable[[str], None] = print) -> dict[str, Any]:
    """Train the demo LoRA on the demo model folder ``model`` into ``out`` (``LORA_FILE`` and
    ``recipe.json``); returns what was recorded."""
    from diffusers import DDPMScheduler, StableDiffusionPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    recipe = recipe or LoraRecipe()
    torch.set_num_threads(recipe.threads)
    started = time.monotonic()
    deadline = started + recipe.minutes * 60
    torch.manual_seed(recipe.seed)
    parts = load_components(model)
    unet, text_encoder, vae = parts["unet"], parts["text_encoder"], parts["vae"]
    for part in (unet, text_encoder, vae):
        part.requires_grad_(False)
        part.eval()

    # 1. The data: plain prompts, pictures drawn as the LoRA's look.
    progress(f"rendering {recipe.pool} scenes drawn as {recipe.look}")
    pool = Recipe(seed=recipe.seed, pool=recipe.pool, two_shapes=recipe.two_shapes,
                  sided=recipe.sided, styled=0.0)
    pixels, prompt_ids, negative_ids = make_pool(pool, parts["tokenizer"], drawn_as=recipe.look,
                                                 size=picture_side(vae))
    latents = encode_pool(vae, pixels, float(vae.config.scaling_factor))
    empty_ids = torch.as_tensor(parts["tokenizer"]([""], padding="max_length",
                                                   max_length=MAX_LENGTH,
                                                   return_tensors="np").input_ids)
    prompts, negatives = _contexts(text_encoder, prompt_ids), _contexts(text_encoder, negative_ids)
    empty = _contexts(text_encoder, empty_ids)[0]

    # 2. The LoRA: zero at first (B starts at zero), so training starts from the base model.
    unet.add_adapter(LoraConfig(r=recipe.rank, lora_alpha=recipe.rank,
                                target_modules=list(recipe.targets)))
    params = [p for p in unet.parameters() if p.requires_grad]
    count = sum(p.numel() for p in params)
    progress(f"LoRA rank {recipe.rank} on {', '.join(recipe.targets)}: {count:,} parameters; "
             f"training until {recipe.minutes:g} min or {recipe.max_steps} steps")
    opt = torch.optim.AdamW(params, lr=recipe.lr, weight_decay=0.0)

    # 3. Denoising, as the base model learnt it (epsilon, min-SNR weights, offset noise).
    noise_sched: Any = DDPMScheduler(**{k: v for k, v in SCHEDULER.items() if k != "steps_offset"})
    alphas = noise_sched.alphas_cumprod
    snr = alphas / (1 - alphas)
    weights = torch.clamp(snr, max=recipe.snr_gamma) / snr
    gen = torch.Generator().manual_seed(recipe.seed + 1)
    unet.train()
    step, losses = 0, []
    while step < recipe.max_steps and time.monotonic() < deadline:
        idx = torch.randint(len(latents), (recipe.batch,), generator=gen)
        context = prompts[idx].clone()
        drop = torch.rand(recipe.batch, generator=gen)
        negative = drop < recipe.uncond / 2
        context[negative] = negatives[idx][negative]
        context[(drop >= recipe.uncond / 2) & (drop < recipe.uncond)] = empty
        x0 = latents[idx]
        noise = torch.randn(x0.shape, generator=gen)
        noise += recipe.noise_offset * torch.randn((x0.shape[0], x0.shape[1], 1, 1),
                                                   generator=gen)
        t = torch.randint(0, noise_sched.config.num_train_timesteps, (recipe.batch,),
                          generator=gen)
        pred = unet(noise_sched.add_noise(x0, noise, t), t, encoder_hidden_states=context).sample
        loss = (F.mse_loss(pred, noise, reduction="none").mean(dim=(1, 2, 3)) * weights[t]).mean()
        descend(opt, loss, params)
        losses.append(loss.detach())
        step += 1
        if step % 100 == 0:
            rate = step / (time.monotonic() - started)
            progress(f"lora step {step}: loss {float(torch.stack(losses).mean()):.4f} "
                     f"({rate:.2f} steps/s overall)")
            losses = []
    unet.eval()

    # 4. Saved as Diffusers saves a trained LoRA, and the record beside it. In PEFT's key
    #    names (lora_A/lora_B): Diffusers' older names (lora.down/up) cover its attention
    #    layers only, and a file mixing both loads without the attention part.
    state = get_peft_model_state_dict(unet)
    out.mkdir(parents=True, exist_ok=True)
    StableDiffusionPipeline.save_lora_weights(out, unet_lora_layers=state, weight_name=LORA_FILE,
                                              safe_serialization=True)
    record = {
        "recipe": asdict(recipe),
        "base_model": _shown(model),
        "steps": step,
        "minutes": round((time.monotonic() - started) / 60, 1),
        "machine": _machine(recipe.threads),
        "torch": torch.__version__,
        "parameters": count,
        "bytes": (out / LORA_FILE).stat().st_size,
        "data": f"engine/demo/scenes.py: random_scene with plain prompts, each drawn as "
                f"{recipe.look} (render), seeded by recipe.seed",
    }
    (out / "recipe.json").write_text(json.dumps(record, indent=2) + "\n")
    return record
