"""Prompt processing: normalising text, quality enhancement, the blocklist and CLIP's token limit.

``prepare_prompt`` turns a request into the (prompt, negative) pairs the model will actually see.
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import cache
from importlib import resources
from pathlib import Path

from core.errors import ConfigError, ContentBlocked, PromptTooLong
from core.request import GenerationRequest
from core.styles import Style, StyleRegistry, merge_terms, split_terms, term_key

# CLIP's window is 77 tokens: 75 for the text plus the start and end tokens.
CLIP_TOKEN_LIMIT = 75

QUALITY_TERMS: tuple[str, ...] = ("highly detailed", "sharp focus", "high quality")
DEFAULT_NEGATIVE: tuple[str, ...] = (
    "lowres",
    "blurry",
    "bad anatomy",
    "bad hands",
    "extra fingers",
    "deformed",
    "disfigured",
    "watermark",
    "signature",
    "jpeg artifacts",
    "worst quality",
)
# Added to the negative where NSFW is not allowed, raw or not: a prompt that passed the
# blocklist can still drift into nudity, and this costs a sunny prompt nothing.
SAFE_NEGATIVE: tuple[str, ...] = ("nsfw", "nude")

TokenCounter = Callable[[str], int]

# Bidi embeddings/overrides/isolates and the other invisibles named here are all category Cf,
# but listing them keeps the intent readable and survives a Unicode version moving one.
_INVISIBLE = frozenset(
    [chr(c) for c in range(0x200B, 0x2010)]  # zero-width space/joiners, LRM, RLM
    + [chr(c) for c in range(0x202A, 0x202F)]  # bidi embeddings and overrides
    + [chr(c) for c in range(0x2060, 0x2070)]  # word joiner, invisible operators, isolates
    + ["\ufeff", "\u00ad", "\u061c", "\u180e", "\u034f"]
)


def _visible(ch: str) -> bool:
    if ch in _INVISIBLE:
        return False
    cat = unicodedata.category(ch)
    # Format characters are invisible by definition; control characters other than whitespace
    # (which the whitespace collapse handles) have no business in a prompt.
    if cat == "Cf":
        return False
    return not (cat == "Cc" and not ch.isspace())


def normalize(text: str) -> str:
    """NFKC, invisible and format characters removed, whitespace collapsed to single spaces."""
    cleaned = "".join(ch for ch in text if _visible(ch))
    cleaned = unicodedata.normalize("NFKC", cleaned)
    # NFKC can map a visible compatibility character onto nothing invisible, but run the
    # filter again so normalize() is idempotent whatever the Unicode tables do.
    cleaned = "".join(ch for ch in cleaned if _visible(ch))
    return " ".join(cleaned.split())


# Enhancement ----------------------------------------------------------------------------


def _append_terms(text: str, terms: Iterable[str]) -> str:
    text = text.strip().rstrip(",; ").strip()
    for term in terms:
        text = f"{text}, {term}" if text else term
    return text


def _new_terms(candidates: Iterable[str], *present: str) -> list[str]:
    """Candidates not already in any of the ``present`` fragments (compared loosely)."""
    seen = {term_key(t) for part in present for t in split_terms(part)}
    out = []
    for term in candidates:
        key = term_key(term)
        if key not in seen:
            seen.add(key)
            out.append(term)
    return out


def _quality_terms(prompt: str, negative: str) -> list[str]:
    # A term the negative asks to avoid (pixel-art: "highly detailed") is not added.
    return _new_terms(QUALITY_TERMS, prompt, negative)


def _default_negative_terms(prompt: str, negative: str) -> list[str]:
    # A term the prompt asks for (pixel-art: "low-res") is not pushed away.
    return _new_terms(DEFAULT_NEGATIVE, prompt, negative)


def enhance(prompt: str, negative: str = "", raw: bool = False) -> tuple[str, str]:
    """Append quality terms and the default negative (merged, no duplicates); raw: unchanged."""
    if raw:
        return prompt, negative
    better = _append_terms(prompt, _quality_terms(prompt, negative))
    return better, merge_terms(negative, ", ".join(_default_negative_terms(prompt, negative)))


# Blocklist ------------------------------------------------------------------------------

# Characters people substitute for a Latin letter: leetspeak and Cyrillic/Greek look-alikes.
# Compared after casefold + accent stripping, so only lower-case forms are needed.
_LOOKALIKES: dict[str, str] = {
    "a": "4@аαɑ",
    "b": "8вβь",
    "c": "сϲ¢",
    "d": "ԁ",
    "e": "3еε€ə",
    "f": "ƒ",
    "g": "96ɡ",
    "h": "һн",
    "i": "1!|іιɩӏ",
    "j": "ј",
    "k": "кκ",
    "l": "1|ӏɩ",
    "m": "м",
    "n": "ηп",
    "o": "0оοσө",
    "p": "рρ",
    "q": "ԛ",
    "r": "г",
    "s": "5$ѕ",
    "t": "7+тτ",
    "u": "υμ",
    "v": "νѵ",
    "w": "ωш",
    "x": "хχ×",
    "y": "уγ",
    "z": "2",
}
_SYMBOLS = "".join(sorted({c for v in _LOOKALIKES.values() for c in v if not c.isalnum()}))
# Punctuation that may sit inside a word as a disguise ("n.u.d.e", "nu-de"); the look-alike
# symbols are excluded so a character is either a letter or a gap, never both.
_GAP = rf"(?:[^\w\s{re.escape(_SYMBOLS)}]|_)"
_WORD_CHAR = r"[^\W_]"  # letters and digits: what a term may not touch on either side
_MAX_STRETCH = 40  # "nuuu...ude": extra repeats of one letter still matched


def _fold(text: str) -> str:
    """Matching form: normalised, casefolded, accents stripped ("Nüde" -> "nude")."""
    text = normalize(text).casefold()
    decomposed = unicodedata.normalize("NFKD", text)
    return "".join(ch for ch in decomposed if not unicodedata.combining(ch))


def _letter(ch: str) -> str:
    variants = _LOOKALIKES.get(ch, "")
    return "[" + re.escape(ch + variants) + "]"


def _runs(word: str) -> list[tuple[str, int]]:
    runs: list[tuple[str, int]] = []
    for ch in word:
        if runs and runs[-1][0] == ch:
            runs[-1] = (ch, runs[-1][1] + 1)
        else:
            runs.append((ch, 1))
    return runs


def _term_pattern(term: str) -> re.Pattern[str]:
    """A regex for one term, robust to look-alikes, disguising separators and repeated letters.

    Word boundaries are letters/digits on either side, so "ass" never matches inside "class".
    An optional plural "s"/"es" is allowed. Two shapes match: compact ("nuuude", "n.u.d.e",
    "child-porn") and spaced single letters ("n s f w", "c. p.").
    """
    words = re.findall(r"[^\W_]+", _fold(term))
    if not words:
        raise ConfigError(f"blocklist term {term!r} has no letters")
    compact_words = []
    for word in words:
        parts = []
        for ch, n in _runs(word):
            cls = _letter(ch)
            # Repeated letters stretch ("nuuude"); a doubled letter needs at least two. The
            # stretch is capped so each match attempt is bounded: linear time on any input.
            parts.append(f"{cls}(?:{_GAP}{{0,2}}{cls}){{{n - 1},{n + _MAX_STRETCH}}}")
        compact_words.append(f"{_GAP}{{0,2}}".join(parts))
    compact = r"[\W_]{0,3}".join(compact_words)
    letters = "".join(words)
    spaced = r"[\W_]{1,3}".join(_letter(ch) for ch in letters)
    pattern = rf"(?<!{_WORD_CHAR})(?:{compact}|{spaced})(?:e?s)?(?!{_WORD_CHAR})"
    return re.compile(pattern)


@dataclass(frozen=True)
class _Term:
    text: str
    pattern: re.Pattern[str]

    def found_in(self, folded: str) -> bool:
        """Whether the term occurs in ``folded``. A match with no letter at all ("10011" read as
        "loli") is a number, not a disguised word: it does not count."""
        return any(
            any(ch.isalpha() for ch in m.group()) for m in self.pattern.finditer(folded)
        )


class Blocklist:
    """Terms never allowed, and terms allowed only where the channel is marked NSFW."""

    def __init__(self, never: Iterable[str] = (), nsfw: Iterable[str] = ()) -> None:
        self.never = tuple(_Term(t, _term_pattern(t)) for t in never)
        self.nsfw = tuple(_Term(t, _term_pattern(t)) for t in nsfw)

    @classmethod
    def load(cls, path: str | Path | None = None) -> Blocklist:
        """Read a blocklist file (``[never]`` and ``[nsfw]`` sections, ``#`` comments)."""
        if path is None:
            source = "core/data/blocklist.txt"
            text = resources.files("core").joinpath("data/blocklist.txt").read_text("utf-8")
        else:
            source = str(path)
            try:
                text = Path(path).read_text("utf-8")
            except OSError as exc:
                raise ConfigError(f"cannot read blocklist file {source}: {exc.strerror}") from None
        return cls.parse(text, source=source)

    @classmethod
    def parse(cls, text: str, *, source: str = "<blocklist>") -> Blocklist:
        sections: dict[str, list[str]] = {"never": [], "nsfw": []}
        current: list[str] | None = None
        for lineno, raw_line in enumerate(text.splitlines(), start=1):
            line = raw_line.split("#", 1)[0].strip()
            if not line:
                continue
            header = re.fullmatch(r"\[\s*([A-Za-z_-]+)\s*\]", line)
            if header:
                name = header.group(1).lower()
                if name not in sections:
                    raise ConfigError(
                        f"{source}:{lineno}: unknown section [{name}]; use [never] or [nsfw]"
                    )
                current = sections[name]
            elif current is None:
                raise ConfigError(f"{source}:{lineno}: term before any [never]/[nsfw] section")
            else:
                current.append(line)
        return cls(never=sections["never"], nsfw=sections["nsfw"])

    def first_match(self, text: str) -> tuple[str, str] | None:
        """The first (section, term) that ``text`` matches, or None."""
        folded = _fold(text)
        for section, terms in (("never", self.never), ("nsfw", self.nsfw)):
            for term in terms:
                if term.found_in(folded):
                    return section, term.text
        return None

    def check(self, text: str, nsfw_allowed: bool) -> None:
        """Raise ContentBlocked if ``text`` may not be generated in this channel."""
        folded = _fold(text)
        for term in self.never:
            if term.found_in(folded):
                # Never echo these terms back: the reply may be posted in a public channel.
                raise ContentBlocked("your prompt contains a term that is not allowed here")
        if nsfw_allowed:
            return
        for term in self.nsfw:
            if term.found_in(folded):
                raise ContentBlocked(
                    f"your prompt contains a term that is not allowed here ({term.text!r}); "
                    "it is allowed only in channels marked NSFW"
                )


@cache
def default_blocklist() -> Blocklist:
    """The shipped blocklist, read once per process."""
    return Blocklist.load()


# Token limit ----------------------------------------------------------------------------

_CONTRACTIONS = ("'s", "'t", "'re", "'ve", "'m", "'ll", "'d")
# Letter runs this long are usually one CLIP token; longer ones cost one more per this many.
_LETTERS_PER_TOKEN = 10


def _kind(ch: str) -> str:
    if ch.isspace():
        return " "
    cat = unicodedata.category(ch)[0]
    return cat if cat in ("L", "N") else "P"


def _pretokens(text: str) -> list[tuple[int, int]]:
    """Spans of CLIP's pre-tokens: the regex ``'s|'t|'re|'ve|'m|'ll|'d|\\p{L}+|\\p{N}|
    [^\\s\\p{L}\\p{N}]+`` done by hand, since ``re`` has no ``\\p{...}`` classes."""
    spans = []
    i, n = 0, len(text)
    while i < n:
        ch = text[i]
        kind = _kind(ch)
        if kind == " ":
            i += 1
            continue
        contraction = next((c for c in _CONTRACTIONS if text[i : i + len(c)].lower() == c), None)
        if contraction is not None:
            j = i + len(contraction)
        elif kind == "N":
            j = i + 1  # CLIP splits numbers into single digits
        else:
            j = i + 1
            while j < n and _kind(text[j]) == kind:
                j += 1
        spans.append((i, j))
        i = j
    return spans


def _pretoken_cost(tok: str) -> int:
    if _kind(tok[0]) == "L":
        ascii_len = sum(1 for c in tok if c.isascii())
        # Common English words are single tokens; other scripts are near byte-level in CLIP's
        # vocabulary, so count every two UTF-8 bytes of a non-ASCII letter as a token.
        other = sum(math.ceil(len(c.encode()) / 2) for c in tok if not c.isascii())
        return max(1, math.ceil(ascii_len / _LETTERS_PER_TOKEN) + other)
    if _kind(tok[0]) == "P" and not tok.startswith("'"):
        return sum(1 if c.isascii() else math.ceil(len(c.encode()) / 2) for c in tok)
    return 1


def estimate_clip_tokens(text: str) -> int:
    """Estimate CLIP's token count for ``text`` (start/end tokens not counted).

    Exact on splitting (CLIP's pre-tokenizer rule, case-insensitive), approximate on BPE: a letter
    run costs ceil(len/10) tokens (at least 1), each non-ASCII letter one token per 2 UTF-8
    bytes, each digit 1, each punctuation character 1. That leans high for punctuation and
    other scripts and is right for ordinary English; a rare invented word may cost more than
    estimated, so the engine passes the real tokenizer for the final word.
    """
    text = normalize(text)
    return sum(_pretoken_cost(text[a:b].lower()) for a, b in _pretokens(text))


def _kept_prefix_estimated(text: str, limit: int) -> str:
    text = normalize(text)
    total, end = 0, 0
    for a, b in _pretokens(text):
        total += _pretoken_cost(text[a:b].lower())
        if total > limit:
            break
        end = b
    return text[:end]


def _kept_prefix_exact(text: str, limit: int, count: TokenCounter) -> str:
    words = text.split()
    lo, hi = 0, len(words)  # the longest word prefix that fits has length in [lo, hi)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if count(" ".join(words[:mid])) <= limit:
            lo = mid
        else:
            hi = mid - 1
    return " ".join(words[:lo])


def _tail(kept: str, words: int = 4, chars: int = 40) -> str:
    tail = " ".join(kept.split()[-words:])
    return tail[-chars:]


def check_token_limit(
    text: str,
    count_tokens: TokenCounter | None = None,
    limit: int = CLIP_TOKEN_LIMIT,
    *,
    what: str = "your prompt",
) -> int:
    """Return the token count, or raise PromptTooLong saying where the model would stop reading.

    ``count_tokens`` (the real tokenizer, without start/end tokens) makes the count exact;
    otherwise ``estimate_clip_tokens`` is used. Nothing is cut silently.
    """
    n = count_tokens(text) if count_tokens is not None else estimate_clip_tokens(text)
    if n <= limit:
        return n
    if count_tokens is not None:
        size = f"{n} tokens"
        kept = _kept_prefix_exact(text, limit, count_tokens)
    else:
        size = f"about {n} tokens"
        kept = _kept_prefix_estimated(text, limit)
    tail = _tail(kept)
    where = f"the part after '…{tail}'" if tail else "nearly all of it"
    raise PromptTooLong(
        f"{what} is {size}; the model reads {limit}, so {where} would be ignored. "
        "Shorten it or split it."
    )


def _fits(text: str, count_tokens: TokenCounter | None, limit: int) -> bool:
    n = count_tokens(text) if count_tokens is not None else estimate_clip_tokens(text)
    return n <= limit


def _extend_while_fits(
    base: str, extra: Sequence[str], count_tokens: TokenCounter | None, limit: int
) -> str:
    """Append our own terms one by one while the text still fits: ours are the ones to drop."""
    if not extra:
        return base
    # Usually everything fits: one count instead of one per term (counts only grow as terms
    # are appended, so then every shorter prefix fits too).
    everything = base
    for term in extra:  # exactly the text the loop below would build
        everything = _append_terms(everything, [term])
    if _fits(everything, count_tokens, limit):
        return everything
    out = base
    for term in extra:
        candidate = _append_terms(out, [term])
        if not _fits(candidate, count_tokens, limit):
            break
        out = candidate
    return out


# The whole pipeline ---------------------------------------------------------------------


def prepare_prompt(
    request: GenerationRequest,
    registry: StyleRegistry,
    blocklist: Blocklist,
    nsfw_allowed: bool,
    count_tokens: TokenCounter | None = None,
    *,
    limit: int = CLIP_TOKEN_LIMIT,
) -> list[tuple[str, str]]:
    """The (prompt, negative) pairs sent to the model: one per style, or one if no styles.

    Steps: normalise; check the user's prompt against the blocklist (not the negative, where
    "nude" is a request to avoid it); apply each style; check the user's words (with the
    style's template) fit the token window, or raise; then add what Atelier contributes
    (quality terms, safety and style and default negatives) only as far as it fits.
    """
    prompt = normalize(request.prompt)
    negative = merge_terms(normalize(request.negative))
    blocklist.check(prompt, nsfw_allowed)
    check_token_limit(negative, count_tokens, limit, what="your negative prompt")

    styles: list[Style | None] = [registry.get(name) for name in request.styles] or [None]
    pairs = []
    for style in styles:
        if style is None:
            styled, style_negative, what = prompt, "", "your prompt"
        else:
            styled, _ = style.apply(prompt)
            style_negative = style.negative
            what = f"your prompt with the {style.name!r} style"
        check_token_limit(styled, count_tokens, limit, what=what)

        # The user's negative first (it must fit, checked above), then ours in priority order.
        ours_negative = list(SAFE_NEGATIVE) if not nsfw_allowed else []
        ours_negative += split_terms(style_negative)
        quality: list[str] = []
        if not request.raw:
            quality = _quality_terms(styled, merge_terms(negative, style_negative))
            ours_negative += _default_negative_terms(styled, negative)
        final_prompt = _extend_while_fits(styled, quality, count_tokens, limit)
        extra_negative = _new_terms(ours_negative, negative, final_prompt)
        final_negative = _extend_while_fits(negative, extra_negative, count_tokens, limit)
        pairs.append((final_prompt, final_negative))
    return pairs
