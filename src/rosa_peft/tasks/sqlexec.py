"""Run a SQL query against mock tables in an in-memory sqlite3 database (stdlib only).

Used by the built-in ``sql-synth`` task to check every gold query at generation time, and
usable by evaluation for execution match on examples whose ``meta["tables"]`` is set.
"""
from __future__ import annotations

import sqlite3
from typing import Any, List, Mapping, Optional, Sequence, Tuple

Rows = Sequence[Mapping[str, Any]]


def _quote(identifier: str) -> str:
    return '"' + str(identifier).replace('"', '""') + '"'


def build_database(tables: Mapping[str, Rows], context: Optional[str] = None) -> sqlite3.Connection:
    """An in-memory database holding ``tables``.

    When ``context`` (CREATE TABLE statements) is given it is run first, so column types come
    from it; tables or columns it does not declare are created untyped from the rows.
    """
    conn = sqlite3.connect(":memory:")
    if context:
        try:
            conn.executescript(context if context.rstrip().endswith(";") else context + ";")
        except sqlite3.Error:
            # Some contexts are not valid sqlite; fall back to untyped tables from the rows.
            conn.close()
            conn = sqlite3.connect(":memory:")
    for table, rows in tables.items():
        columns: List[str] = []
        for row in rows:
            for column in row:
                if column not in columns:
                    columns.append(column)
        # sqlite identifiers are case-insensitive: compare names lowercased.
        existing = {r[1].lower() for r in conn.execute(f"PRAGMA table_info({_quote(table)})")}
        if not existing:
            cols = ", ".join(_quote(c) for c in columns) or '"_empty"'
            conn.execute(f"CREATE TABLE {_quote(table)} ({cols})")
            existing = {c.lower() for c in columns}
        for column in columns:
            if column.lower() not in existing:
                conn.execute(f"ALTER TABLE {_quote(table)} ADD COLUMN {_quote(column)}")
                existing.add(column.lower())
        for row in rows:
            keys = list(row)
            if not keys:
                continue
            placeholders = ", ".join("?" for _ in keys)
            conn.execute(
                f"INSERT INTO {_quote(table)} ({', '.join(_quote(k) for k in keys)}) VALUES ({placeholders})",
                [row[k] for k in keys],
            )
    return conn


def execute_sql(sql: str, tables: Mapping[str, Rows], context: Optional[str] = None) -> List[Tuple[Any, ...]]:
    """The rows ``sql`` returns on ``tables``; sqlite3.Error propagates for an invalid query."""
    conn = build_database(tables, context)
    try:
        return [tuple(row) for row in conn.execute(sql).fetchall()]
    finally:
        conn.close()

