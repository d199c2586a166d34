"""A prompt's words keyed by their account, for search indexes that read one person's entries
of a word and no one else's: ``'1xfox 1xcastle'`` for account 1's "Fox, castle!".

PostgreSQL computes the same in SQL (``atelier_account_words``, migration 0011) from
``to_tsvector('simple', ...)``; SQLite calls this function, registered on every connection
(``register``) and used by the triggers that keep ``images_words`` (an FTS5 table whose
tokens are these keyed words). Digits then ``x`` then the word: the account ends at the first
``x``, so no two (account, word) pairs give one token.
"""

from __future__ import annotations

import re
import unicodedata
from typing import Any

FUNCTION = "atelier_account_words"
# FTS5's unicode61 tokenizer: runs of letters and digits; case and diacritics folded.
_TOKEN = re.compile(r"[^\W_]+")


def words(text: str) -> list[str]:
    """The words of ``text`` as FTS5's unicode61 tokenizer reads them."""
    folded = unicodedata.normalize("NFKD", text.casefold())
    plain = "".join(c for c in folded if not unicodedata.combining(c))
    return _TOKEN.findall(plain)


def account_words(account_id: int | None, text: str | None) -> str | None:
    """Each distinct word of ``text`` prefixed with its account, space-separated."""
    if account_id is None or text is None:
        return None
    return " ".join(f"{int(account_id)}x{w}" for w in dict.fromkeys(words(text)))


def match_query(account_id: int, asked: list[str]) -> str:
    """An FTS5 query for images of ``account_id`` holding every asked word: each keyed word
    quoted, so user text never reaches the MATCH syntax."""
    keyed = account_words(account_id, " ".join(asked)) or ""
    return " ".join(f'"{w}"' for w in keyed.split())


def register(dbapi_conn: Any) -> None:
    """Make ``atelier_account_words`` callable on a sqlite3 connection (its triggers call it)."""
    dbapi_conn.create_function(FUNCTION, 2, account_words, deterministic=True)
