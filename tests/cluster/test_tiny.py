"""Tiny random-weight pipelines: built offline, saved, loaded back like real models, and fast."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest
import torch
from transformers import CLIPTokenizer

from engine.loading import load_pipeline
from engine.tiny import (
    BOS,
    EOS,
    MAX_LENGTH,
    SD15_TEXT,
    build_tiny_pipeline,
    clip_vocab,
    sd15_shaped_components,
    write_tokenizer_files,
)

if TYPE_CHECKING:
    from tests.cluster.conftest import TinyModels


def test_vocab_follows_clip_layout(tmp_path: Path) -> None:
    vocab, merges = clip_vocab()
    ids = sorted(vocab.values())
    assert ids == list(range(len(vocab)))
    # The end token is last, the start token just before it, as in CLIP's own vocab.
    assert vocab[EOS] == len(vocab) - 1
    assert vocab[BOS] == len(vocab) - 2
    assert vocab["a"] < 256 and vocab["a</w>"] >= 256
    assert all(m.replace(" ", "") in vocab for m in merges)

    write_tokenizer_files(tmp_path)
    assert json.loads((tmp_path / "vocab.json").read_text("utf-8")) == vocab
    tok = CLIPTokenizer.from_pretrained(tmp_path, model_max_length=MAX_LENGTH)
    ids = tok("The lighthouse at dusk!", padding="max_length", max_length=MAX_LENGTH).input_ids
    assert len(ids) == MAX_LENGTH
    assert ids[0] == vocab[BOS]
    assert vocab[EOS] in ids
    assert vocab["the</w>"] in ids  # merges apply (and the text is lower-cased)


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_builds_are_deterministic(family: str) -> None:
    a = build_tiny_pipeline(family, seed=3)  # type: ignore[arg-type]
    b = build_tiny_pipeline(family, seed=3)  # type: ignore[arg-type]
    c = build_tiny_pipeline(family, seed=4)  # type: ignore[arg-type]
    sa, sb, sc = a.unet.state_dict(), b.unet.state_dict(), c.unet.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)


def test_text_encoder_ids_match_tokenizer() -> None:
    pipe = build_tiny_pipeline("sdxl")
    for enc, tok in ((pipe.text_encoder, pipe.tokenizer), (pipe.text_encoder_2, pipe.tokenizer_2)):
        assert enc.config.eos_token_id == tok.eos_token_id == tok.convert_tokens_to_ids(EOS)
        assert enc.config.bos_token_id == tok.bos_token_id
        assert enc.config.vocab_size >= len(tok)
        assert enc.config.max_position_embeddings == tok.model_max_length == MAX_LENGTH


def test_sdxl_unet_conditioning_dims() -> None:
    pipe = build_tiny_pipeline("sdxl")
    cfg = pipe.unet.config
    assert cfg.addition_embed_type == "text_time"
    assert cfg.cross_attention_dim == (
        pipe.text_encoder.config.hidden_size + pipe.text_encoder_2.config.hidden_size
    )
    # Six micro-conditioning numbers each embedded to addition_time_embed_dim + pooled text.
    assert cfg.projection_class_embeddings_input_dim == (
        6 * cfg.addition_time_embed_dim + pipe.text_encoder_2.config.projection_dim
    )


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_tiny_loads_through_registry_and_generates(tiny_models: TinyModels, family: str) -> None:
    spec = tiny_models.registry.get(tiny_models.name(family))
    assert spec.path == tiny_models.path(family)
    assert (spec.path / "model_index.json").is_file()

    pipe = load_pipeline(spec, torch_dtype=torch.float32, device="cpu", offline=True)
    assert type(pipe).__name__ == spec.family.pipeline_class
    assert pipe.vae_scale_factor == 8  # same pixel -> latent ratio as the real models

    def run() -> np.ndarray:
        out = pipe(
            "a lighthouse at dusk",
            num_inference_steps=4,
            width=64,
            height=64,
            generator=torch.Generator().manual_seed(7),
            output_type="np",
        )
        return out.images

    first, second = run(), run()
    assert first.shape == (1, 64, 64, 3)
    assert np.isfinite(first).all()
    np.testing.assert_array_equal(first, second)  # same seed, same image
    # Tiny is what keeps 4 steps at ~50 ms on 2 CPU cores (a wall-clock bound would be flaky
    # on a shared machine).
    modules = (pipe.unet, pipe.vae, pipe.text_encoder)
    params = sum(p.numel() for m in modules for p in m.parameters())
    assert params < 3_000_000

    image = pipe("x", num_inference_steps=2, width=64, height=64).images[0]
    assert image.size == (64, 64)


def test_sd15_shaped_configs_match_published_counts() -> None:
    # Meta tensors: shapes and counts without allocating ~4 GB or running anything.
    parts = sd15_shaped_components(None)
    counts = {
        k: sum(p.numel() for p in parts[k].parameters())  # type: ignore[attr-defined]
        for k in ("unet", "vae", "text_encoder")
    }
    assert counts == {"unet": 859_520_964, "vae": 83_653_863, "text_encoder": 123_060_480}
    assert parts["text_encoder"].config.vocab_size == SD15_TEXT["vocab_size"]  # type: ignore[attr-defined]
    assert parts["vae"].config.scaling_factor == 0.18215  # type: ignore[attr-defined]
