"""LoRAs in requests: the --lora flag, A1111's <lora:name:w> prompt tags, their limits, styles
that name LoRAs, the batch key and the infotext."""

from __future__ import annotations

import pytest

from core.adapters import AdapterRef, extract_prompt_adapters, parse_adapter
from core.errors import InvalidRequest
from core.flags import format_request, parse_command
from core.infotext import format_infotext, infotext_for, parse_infotext
from core.recipe import batch_key
from core.request import GenerationRequest, build_request
from core.styles import StyleRegistry


def test_flag_value() -> None:
    assert parse_adapter("Ink:0.8") == AdapterRef(name="ink", weight=0.8)
    assert parse_adapter("ink") == AdapterRef(name="ink", weight=None)
    assert parse_adapter("ink:-1") == AdapterRef(name="ink", weight=-1.0)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("ink:5", "--lora: LoRA weight must be between -4 and 4, got 5"),
        ("ink:lots", "--lora: LoRA weight must be a number, got 'lots'"),
        ("in k:1", "--lora: expects a LoRA name like 'ink:0.8', got 'in k'"),
        (":1", "--lora needs a LoRA name, e.g. --lora ink:0.8"),
    ],
)
def test_flag_value_refusals(text: str, message: str) -> None:
    with pytest.raises(InvalidRequest) as exc:
        parse_adapter(text)
    assert exc.value.message == message


def test_prompt_tags_are_taken_out_of_the_prompt() -> None:
    prompt, refs = extract_prompt_adapters("a cat <lora:Ink:0.7>, on a mat <LORA:neon>")
    assert prompt == "a cat , on a mat"
    assert refs == (AdapterRef(name="ink", weight=0.7), AdapterRef(name="neon"))
    assert extract_prompt_adapters("a cat <lorax>") == ("a cat <lorax>", ())


def test_request_reads_prompt_tags() -> None:
    req = GenerationRequest(prompt="a cat <lora:ink:0.5>", adapters=[{"name": "neon"}])
    assert req.prompt == "a cat"
    assert [a.name for a in req.adapters] == ["neon", "ink"]
    assert req.adapters[1].weight == 0.5


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"prompt": "a <lora:ink:9>"}, "LoRA weight must be between -4 and 4, got 9"),
        ({"prompt": "a <lora:ink:1> <lora:ink:2>"}, "LoRA 'ink' is given twice"),
        ({"prompt": "a", "adapters": [{"name": n} for n in "abcde"]}, "at most 4 LoRAs"),
    ],
)
def test_request_refusals_name_the_problem(fields: dict[str, object], message: str) -> None:
    with pytest.raises(InvalidRequest) as exc:
        build_request(**fields)
    assert message in exc.value.message


def test_lora_flag_repeats_and_round_trips() -> None:
    req = parse_command("a lighthouse --lora ink:0.8 --lora neon --seed 3")
    assert req.adapters == (AdapterRef(name="ink", weight=0.8), AdapterRef(name="neon"))
    assert parse_command(format_request(req)) == req
    tagged = parse_command("a lighthouse <lora:ink:0.25> --lora neon:1.5")
    assert tagged.prompt == "a lighthouse"
    assert {(a.name, a.weight) for a in tagged.adapters} == {("ink", 0.25), ("neon", 1.5)}


def test_lora_flag_refusal_is_one_line() -> None:
    with pytest.raises(InvalidRequest) as exc:
        parse_command("a lighthouse --lora ink:7")
    assert exc.value.message == "--lora: LoRA weight must be between -4 and 4, got 7"
    with pytest.raises(InvalidRequest, match="at most 4 LoRAs"):
        parse_command("x " + " ".join(f"--lora l{i}" for i in range(5)))


def test_batch_key_splits_adapter_sets_and_weights() -> None:
    base = GenerationRequest(prompt="a", seed=1)
    ink = GenerationRequest(prompt="b <lora:ink:0.5>", seed=2)
    assert batch_key(ink) != batch_key(base)
    assert batch_key(ink) != batch_key(GenerationRequest(prompt="b <lora:ink:0.6>"))
    # The same set in another order shares a call.
    two = GenerationRequest(prompt="c <lora:ink:1> <lora:neon:1>")
    assert batch_key(two) == batch_key(GenerationRequest(prompt="d <lora:neon:1> <lora:ink:1>"))


def test_infotext_writes_tags_as_a1111_and_reads_them_back() -> None:
    req = GenerationRequest(
        prompt="a cat <lora:ink:0.8>", width=64, height=64, steps=4, guidance=7,
        scheduler="Euler", seed=5,
    )
    text = format_infotext(infotext_for(req, prompt=req.prompt, negative="", seed=5, model="m"))
    assert text.splitlines()[0] == "a cat <lora:ink:0.8>"
    back = GenerationRequest(prompt=parse_infotext(text).prompt)
    assert back.prompt == "a cat"
    assert back.adapters == (AdapterRef(name="ink", weight=0.8),)


def test_styles_may_name_loras() -> None:
    styles = StyleRegistry.from_toml(
        '[inked]\nlabel = "Inked"\nprompt = "ink drawing of {prompt}"\nloras = { ink = 0.6 }\n'
    )
    assert styles.get("inked").adapters() == (AdapterRef(name="ink", weight=0.6),)
    from core.errors import ConfigError

    with pytest.raises(ConfigError, match="LoRA weight must be between -4 and 4, got 9"):
        StyleRegistry.from_toml('[x]\nlabel = "X"\nprompt = "{prompt}"\nloras = { ink = 9 }\n')
