"""Growing a demo model's pictures (``atelier models grow-demo``, engine/demo/grow.py): the
autoencoder gains an outer stage that starts as the old one's picture upscaled, the grown
folder is a pipeline that draws twice the side from the same UNet, and the record says how."""

from __future__ import annotations

import json
import random
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from engine.demo.grow import GrowRecipe, grown_vae
from engine.demo.quality import adherence, held_out
from engine.demo.train import latent_factor, picture_side

pytestmark = pytest.mark.pipelines


def small_vae() -> torch.nn.Module:
    """An autoencoder shaped as the demo models before issue 27 were: 64² pictures, 4 to 1."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, sample_size=64,
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(16, 32, 64), layers_per_block=1, norm_num_groups=4,
        mid_block_add_attention=False, scaling_factor=1.5,
    ).eval()


def test_a_grown_autoencoder_starts_as_the_old_picture_upscaled() -> None:
    old = small_vae()
    vae = grown_vae(old).eval()
    assert (picture_side(vae), latent_factor(vae)) == (128, 8)
    assert vae.config.scaling_factor == 1.5  # the latents' scale is the UNet's: unchanged
    # The old stages are the grown encoder's inner ones, and the decoder's.
    for a, b in zip(old.encoder.down_blocks, vae.encoder.down_blocks[1:], strict=True):
        assert all(torch.equal(p, q) for p, q in zip(a.resnets.parameters(),
                                                     b.resnets.parameters(), strict=True))
    assert torch.equal(old.decoder.up_blocks[0].resnets[0].conv1.weight,
                       vae.decoder.up_blocks[0].resnets[0].conv1.weight)
    z = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = old.decode(z).sample
        after = vae.decode(z).sample
    assert after.shape == (2, 3, 128, 128)
    upscaled = F.interpolate(before, scale_factor=2, mode="nearest")
    # Nearly the old picture at twice the side (the last 3x3 convolution now reads a finer
    # grid), far nearer than the old picture is to a fresh decoder's.
    fresh = grown_vae(small_vae())
    torch.nn.init.normal_(fresh.decoder.conv_out.weight)
    with torch.no_grad():
        other = fresh.decode(z).sample
    near = (after - upscaled).abs().mean().item()
    assert near < 0.25 * (other - upscaled).abs().mean().item(), near


def test_growing_a_model_keeps_its_unet_and_draws_twice_the_side(tmp_path: Path) -> None:
    from diffusers import StableDiffusionPipeline

    from atelier.cli import app
    from engine.demo.train import Recipe, train_demo

    recipe = replace(Recipe(), pool=32, vae_steps=4, vae_batch=4, max_steps=2, batch=4)
    train_demo(tmp_path / "demo", recipe, progress=lambda _: None)
    grown = CliRunner().invoke(app, [
        "models", "grow-demo", "--from", str(tmp_path / "demo"), "--out", str(tmp_path / "big"),
        "--steps", "2", "--set", "pool=24", "--set", "measured_on=4",
        "--minutes", "2"], env={"COLUMNS": "200"})
    assert grown.exit_code == 0, grown.output
    assert "grown:" in grown.output
    record = json.loads((tmp_path / "big" / "recipe.json").read_text())
    assert record["grown"]["encoder_steps"] == record["grown"]["decoder_steps"] == 2
    assert record["grown"]["recipe"]["pool"] == 24
    assert record["unet_steps"] == 2  # the model's own record is kept beneath
    for part in ("unet/diffusion_pytorch_model.safetensors",
                 "text_encoder/model.safetensors", "tokenizer/tokenizer.json"):
        assert (tmp_path / "big" / part).read_bytes() == (tmp_path / "demo" / part).read_bytes()
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "big", safety_checker=None,
                                                   requires_safety_checker=False)
    assert picture_side(pipe.vae) == 2 * picture_side(
        StableDiffusionPipeline.from_pretrained(tmp_path / "demo", safety_checker=None,
                                                requires_safety_checker=False).vae)
    # The scorer's path draws at the model's own side.
    rows = adherence(tmp_path / "big", held_out(1, random.Random(1)), steps=1)
    assert rows[0].result["background"] is not None


def test_growing_something_else_is_refused_by_name(tmp_path: Path) -> None:
    from atelier.cli import app

    done = CliRunner().invoke(app, ["models", "grow-demo", "--from", str(tmp_path)],
                              env={"COLUMNS": "200"})
    assert done.exit_code != 0
    assert "is not a demo model folder (no vae/ in it)" in done.output
    with pytest.raises(ValueError, match="'poool=3'"):
        GrowRecipe().with_overrides(["poool=3"])


def test_the_shipped_model_draws_its_default_size_grown(tmp_path: Path) -> None:
    """The shipped model's autoencoder was grown to 128² (issue 27), the catalogue's default
    size for it is that, and its decoder draws the scenes at that size better than the 64²
    model's pictures upscaled did (PSNR on held-out scenes, measured when it was grown)."""
    from diffusers import AutoencoderKL

    from cluster.registry import DEMO_MODEL_DIR, ModelRegistry
    from core.settings import load_settings

    record = json.loads((DEMO_MODEL_DIR / "recipe.json").read_text())
    grown = record["grown"]
    assert grown["psnr_grown_decoder"] >= grown["psnr_old_decoder_upscaled"] + 1.0, grown
    vae = AutoencoderKL.from_pretrained(DEMO_MODEL_DIR / "vae")
    spec = ModelRegistry.load(load_settings(data_dir=tmp_path, _env_file=None)).get("demo")
    assert picture_side(vae) == spec.default_width == spec.default_height == 128
