"""The demo tokenizer with the phrasing words (issue 27) and a text encoder carried over to it:
the new words are whole tokens, the grammar's tokens and hidden states stay as they were, and
a synonym reads as its word until training tells them apart. A tiny random text encoder
stands in for the shipped one (the carry-over is the same at any size)."""

from __future__ import annotations

import random
from typing import Any

import pytest
import torch
from transformers import CLIPTextModel, CLIPTokenizer

from cluster.registry import DEMO_MODEL_DIR
from engine.demo.scenes import random_scene
from engine.demo.vocab import (
    DEMO_WORDS,
    NEW_WORDS,
    carry_text_encoder,
    lacks_phrase_words,
    phrase_tokenizer,
)
from engine.tiny import BOS, EOS, MAX_LENGTH, build_tokenizer, text_config

CAPTIONS = [random_scene(random.Random(i), sided=0.5).caption for i in range(12)]


def _ids(tokenizer: Any, texts: list[str]) -> torch.Tensor:
    return torch.as_tensor(tokenizer(texts, padding="max_length", max_length=MAX_LENGTH,
                                     truncation=True, return_tensors="np").input_ids)


@pytest.fixture(scope="module")
def encoder() -> tuple[Any, Any]:
    torch.manual_seed(0)
    tokenizer = build_tokenizer(DEMO_WORDS)
    model: Any = CLIPTextModel(text_config(tokenizer, hidden=32, layers=2, heads=2,
                                           intermediate=64))
    return tokenizer, model.eval()


@pytest.mark.parametrize("shipped", [False, True])
def test_every_phrasing_word_is_one_token_and_the_grammar_keeps_its_tokens(
        shipped: bool) -> None:
    old = (CLIPTokenizer.from_pretrained(DEMO_MODEL_DIR / "tokenizer") if shipped
           else build_tokenizer(DEMO_WORDS))
    new = phrase_tokenizer(old)
    # The shipped model was trained on phrasings: its tokenizer already holds every word.
    assert lacks_phrase_words(old) is not shipped
    assert not lacks_phrase_words(new)
    assert all(new.tokenize(w) == [f"{w}</w>"] for w in NEW_WORDS)
    rng = random.Random(1)
    for _ in range(500):
        caption = random_scene(rng, sided=0.5).caption
        assert new.tokenize(caption) == old.tokenize(caption), caption
    # The start and end tokens stay last, as CLIP lays them out.
    assert new.convert_tokens_to_ids([BOS, EOS]) == [len(new) - 2, len(new) - 1]


def test_the_carried_encoder_reads_the_grammar_as_before(encoder: tuple[Any, Any]) -> None:
    old, model = encoder
    new = phrase_tokenizer(old)
    with torch.no_grad():
        before = model(_ids(old, CAPTIONS))
        carried = carry_text_encoder(_copy(model), old, new)
        after = carried(_ids(new, CAPTIONS))
    assert not torch.equal(_ids(old, CAPTIONS), _ids(new, CAPTIONS))  # the ids did move
    assert carried.config.vocab_size == len(new) == carried.get_input_embeddings().num_embeddings
    assert carried.config.eos_token_id == new.convert_tokens_to_ids(EOS)
    torch.testing.assert_close(after.last_hidden_state, before.last_hidden_state)
    torch.testing.assert_close(after.pooler_output, before.pooler_output)


def test_a_synonym_reads_as_its_word(encoder: tuple[Any, Any]) -> None:
    old, model = encoder
    new = phrase_tokenizer(old)
    carried = carry_text_encoder(_copy(model), old, new)
    texts = ["a red circle on a blue background", "a red circle on a blue bg",
             "a red circle on a blue backdrop", "a red circle on a blue please"]
    with torch.no_grad():
        states = carried(_ids(new, texts)).last_hidden_state
    torch.testing.assert_close(states[1], states[0])
    torch.testing.assert_close(states[2], states[0])
    assert not torch.allclose(states[3], states[0])  # a filler is not "background"
    rows = carried.get_input_embeddings().weight
    old_rows = model.get_input_embeddings().weight
    circle = old("circle", add_special_tokens=False).input_ids
    assert len(circle) > 1  # split in the grammar's tokenizer: the ball starts at its mean
    torch.testing.assert_close(rows[new.convert_tokens_to_ids("ball</w>")],
                               old_rows[circle].mean(dim=0))
    torch.testing.assert_close(rows[new.convert_tokens_to_ids("please</w>")],
                               old_rows.mean(dim=0))


def _copy(model: Any) -> Any:
    import copy

    return copy.deepcopy(model)


def test_the_pool_says_the_asked_share_of_its_captions_in_phrasings() -> None:
    """``Recipe.phrasing``: the same scenes and pictures, about that share of the captions
    said otherwise; a model built afresh for it has the phrasing words."""
    from dataclasses import replace

    from engine.demo.train import Recipe, build_components, make_pool

    recipe = replace(Recipe(), pool=80, styled=0.0, phrasing=0.5, typos=0.5,
                     unet_channels=(8, 16, 16), text_width=16)
    tokenizer = build_components(recipe)["tokenizer"]
    assert not lacks_phrase_words(tokenizer)
    grammar = make_pool(replace(recipe, phrasing=0.0), tokenizer)
    phrased = make_pool(recipe, tokenizer)
    assert torch.equal(grammar[0], phrased[0])  # the same pictures
    differ = (grammar[1] != phrased[1]).any(dim=1).float().mean().item()
    assert 0.3 < differ < 0.7, differ
    words = {w for ids in phrased[1].tolist() for w in tokenizer.convert_ids_to_tokens(ids)}
    assert words & {f"{w}</w>" for w in NEW_WORDS if w not in ("a", "an", "i", "me")}
