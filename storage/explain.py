"""Query plans of the statements a repository call runs: captured as they execute, explained
(PostgreSQL ``EXPLAIN (FORMAT JSON)``, SQLite ``EXPLAIN QUERY PLAN``) and searched for full
scans of the big tables. For the plan tests and ``bench.store``."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Connection, Engine, event

# The tables that grow with use: a hot path must never read one of them whole.
BIG_TABLES = frozenset({
    "images", "image_styles", "jobs", "credit_ledger", "reservations", "credit_buckets",
    "identities", "accounts",
})


@dataclass
class Captured:
    """The statements run on an engine while ``capture`` was open, with their parameters."""

    statements: list[tuple[str, Any]] = field(default_factory=list)


@contextmanager
def capture(engine: Engine) -> Iterator[Captured]:
    """Record every statement (with its parameters) the engine runs inside the block."""
    out = Captured()

    def hook(conn: Any, cursor: Any, statement: str, params: Any, context: Any, many: bool) -> None:
        if not many and statement.lstrip().upper().startswith(("SELECT", "UPDATE", "DELETE",
                                                               "INSERT", "WITH")):
            out.statements.append((statement, params))

    event.listen(engine, "before_cursor_execute", hook)
    try:
        yield out
    finally:
        event.remove(engine, "before_cursor_execute", hook)


def plan(conn: Connection, statement: str, params: Any) -> Any:
    """The plan of one captured statement (not executed): PostgreSQL's JSON plan tree, or
    SQLite's query-plan rows as ``[(id, parent, detail), ...]``."""
    if conn.dialect.name == "postgresql":
        raw = conn.exec_driver_sql("EXPLAIN (FORMAT JSON) " + statement, params).scalar_one()
        return raw if isinstance(raw, list) else json.loads(raw)
    rows = conn.exec_driver_sql("EXPLAIN QUERY PLAN " + statement, params).all()
    return [(r[0], r[1], r[3]) for r in rows]


def full_scans(conn: Connection, tree: Any, tables: frozenset[str] = BIG_TABLES) -> list[str]:
    """The big tables a plan reads whole: PostgreSQL ``Seq Scan`` nodes, SQLite ``SCAN t``
    without an index."""
    found: list[str] = []
    if conn.dialect.name == "postgresql":

        def walk(node: Any) -> None:
            if isinstance(node, list):
                for item in node:
                    walk(item)
            elif isinstance(node, dict):
                if node.get("Node Type") == "Seq Scan" and node.get("Relation Name") in tables:
                    found.append(str(node["Relation Name"]))
                for value in node.values():
                    if isinstance(value, list | dict):
                        walk(value)

        walk(tree)
        return found
    for _id, _parent, detail in tree:
        words = str(detail).split()
        if len(words) >= 2 and words[0] == "SCAN" and words[1] in tables and "INDEX" not in words:
            found.append(words[1])
    return found


def summary(conn: Connection, tree: Any) -> str:
    """A one-line outline of a plan: its node types and the relations and indexes they use."""
    if conn.dialect.name != "postgresql":
        return "; ".join(str(d) for _i, _p, d in tree)
    parts: list[str] = []

    def walk(node: Any) -> None:
        if isinstance(node, list):
            for item in node:
                walk(item)
            return
        if not isinstance(node, dict):
            return
        if "Node Type" in node:
            name = node["Node Type"]
            on = node.get("Index Name") or node.get("Relation Name")
            parts.append(f"{name}({on})" if on else name)
        for key in ("Plan", "Plans"):
            if key in node:
                walk(node[key])

    walk(tree)
    return " > ".join(parts)
