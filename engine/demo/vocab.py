"""The demo model's words: the tokenizer that holds the phrasings' words (issue 27), and a
trained text encoder carried over to it, so training on phrasings goes on from what the model
already reads instead of starting the text side again."""

from __future__ import annotations

from typing import Any

from engine.demo.phrasing import KINDS, PHRASE_WORDS
from engine.demo.scenes import COLOURS, RELATIONS, SHAPES, SIDES
from engine.tiny import BOS, EOS, extend_tokenizer

# The captions' grammar: the words the demo tokenizer was built with (some split in pieces,
# which the trained model has learnt as they are, so they stay so).
DEMO_WORDS = (*COLOURS, *SHAPES, *" ".join([*RELATIONS.values(), *SIDES.values()]).split(),
              "background")
# The phrasings' other words (synonyms, fillers, connectors), each made one whole token.
NEW_WORDS = tuple(w for w in PHRASE_WORDS if w not in DEMO_WORDS)
# A new word's embedding starts as its meaning's (its pieces' mean when that is split).
SAME_AS = {name: kind for kind, names in KINDS.items() for name in names[1:]} | {
    "bg": "background", "backdrop": "background", "over": "above", "under": "below",
    "beneath": "below", "underneath": "below"}


def lacks_phrase_words(tokenizer: Any) -> bool:
    """Whether some phrasing word is not one whole token of ``tokenizer``."""
    return any(len(tokenizer.tokenize(w)) != 1 for w in NEW_WORDS)


def phrase_tokenizer(tokenizer: Any) -> Any:
    """``tokenizer`` with every phrasing word a whole token (the grammar's tokens unchanged)."""
    return extend_tokenizer(tokenizer, NEW_WORDS)


def carry_text_encoder(text_encoder: Any, old: Any, new: Any) -> Any:
    """``text_encoder`` (trained over the tokenizer ``old``) made to read ``new``'s ids, in
    place: each token's embedding row copied by its string (ids move: the start and end tokens
    stay last), a new synonym's row from its canonical word's, other new rows the mean row;
    so text ``old`` reads gets the same hidden states as before."""
    import torch

    rows = text_encoder.get_input_embeddings().weight.detach()
    old_ids, mean = old.get_vocab(), rows.mean(dim=0)
    table = torch.empty((len(new), rows.shape[1]), dtype=rows.dtype)
    for token, i in new.get_vocab().items():
        word = token.removesuffix("</w>")
        if token in old_ids:
            table[i] = rows[old_ids[token]]
        elif token.endswith("</w>") and word in SAME_AS:
            pieces = old(SAME_AS[word], add_special_tokens=False).input_ids
            table[i] = rows[pieces].mean(dim=0)
        else:
            table[i] = mean
    text_encoder.set_input_embeddings(torch.nn.Embedding.from_pretrained(table, freeze=False))
    bos, eos = (int(new.convert_tokens_to_ids(t)) for t in (BOS, EOS))
    text_encoder.config.update({"vocab_size": len(new), "bos_token_id": bos,
                                "eos_token_id": eos, "pad_token_id": eos})
    # Pooling reads it from an attribute set at construction (on the inner text model in
    # older transformers).
    getattr(text_encoder, "text_model", text_encoder).eos_token_id = eos
    return text_encoder
