"""SQL execution match: run the predicted and the gold query on mock tables, compare the results.

Each call builds a fresh in-memory sqlite3 database from the tables (column types come from the
``CREATE TABLE`` context when it is valid sqlite), then runs each query under guards:

* an authorizer allows only reads (``SELECT``, column reads, functions, recursive CTEs); a write,
  DDL, ``PRAGMA``, ``ATTACH``/``DETACH`` or transaction statement is refused before it runs;
* a progress handler aborts a query that runs longer than ``timeout_s`` (wall clock);
* at most ``max_rows`` rows are fetched; only one statement is accepted.

A prediction that errors, is refused, times out or returns too many rows is wrong, and the reason
is returned. Results are compared as multisets of rows (row order is ignored; ``1`` equals ``1.0``).

**Case.** By default (``case_insensitive=True``) text columns are declared ``COLLATE NOCASE`` and
text values in both results are lowercased before comparing. The mock-table SQL data set stores
lowercased rows and lowercased gold queries, while a model copies the question's capitalisation
into its literals (``WHERE name = 'Bob Goodlatte'``); under sqlite's default, case-sensitive ``=``
such a query finds nothing although it is the right query. ``NOCASE`` folds ASCII letters only.
Pass ``case_insensitive=False`` for sqlite's own semantics.
"""
from __future__ import annotations

import sqlite3
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any, List, Mapping, Optional, Sequence, Tuple

Rows = Sequence[Mapping[str, Any]]

_ALLOWED = {sqlite3.SQLITE_SELECT, sqlite3.SQLITE_READ, sqlite3.SQLITE_FUNCTION,
            getattr(sqlite3, "SQLITE_RECURSIVE", 33)}
_ATTACH = {sqlite3.SQLITE_ATTACH, sqlite3.SQLITE_DETACH}
_PROGRESS_EVERY = 1000  # sqlite VM instructions between two time checks


@dataclass
class ExecutionResult:
    """The outcome of one comparison. ``reason`` is ``"match"``, ``"different results"``, or why
    the prediction (``"pred: ..."``) or the gold query (``"gold: ..."``) could not be run."""

    match: bool
    reason: str
    pred_rows: Optional[List[Tuple[Any, ...]]] = None
    gold_rows: Optional[List[Tuple[Any, ...]]] = None


class QueryRefused(Exception):
    """A query was not run, or stopped, for a reason other than an sqlite error."""


def _quote(identifier: str) -> str:
    return '"' + str(identifier).replace('"', '""') + '"'


def _declared_types(context: Optional[str]) -> dict:
    """``{table: {column_lower: declared type}}`` from CREATE TABLE statements ({} if invalid)."""
    if not context:
        return {}
    scratch = sqlite3.connect(":memory:")
    # The context is data: never let it attach (create) a database file.
    scratch.set_authorizer(lambda action, *_: sqlite3.SQLITE_DENY if action in _ATTACH else sqlite3.SQLITE_OK)
    try:
        scratch.executescript(context if context.rstrip().endswith(";") else context + ";")
        tables = [r[0] for r in scratch.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        return {t.lower(): {r[1].lower(): (r[1], r[2]) for r in scratch.execute(f"PRAGMA table_info({_quote(t)})")}
                for t in tables}
    except sqlite3.Error:
        return {}
    finally:
        scratch.close()


def build_database(tables: Mapping[str, Rows], context: Optional[str] = None,
                   case_insensitive: bool = True) -> sqlite3.Connection:
    """An in-memory database holding ``tables`` (``{name: [row dict, ...]}``)."""
    if not isinstance(tables, Mapping) or not tables:
        raise ValueError("tables must map table names to lists of row dicts")
    declared = _declared_types(context)
    conn = sqlite3.connect(":memory:")
    for table, rows in tables.items():
        columns: List[str] = []
        types = declared.get(str(table).lower(), {})
        for _, (name, _type) in types.items():
            columns.append(name)
        for row in rows:
            if not isinstance(row, Mapping):
                raise ValueError(f"table {table!r}: every row must be a dict, got {type(row).__name__}")
            for column in row:
                if str(column).lower() not in {c.lower() for c in columns}:
                    columns.append(str(column))
        specs = []
        for column in columns or ["_empty"]:
            col_type = types.get(column.lower(), (column, ""))[1]
            collate = "COLLATE NOCASE" if case_insensitive else ""
            specs.append(" ".join(part for part in (_quote(column), col_type, collate) if part))
        conn.execute(f"CREATE TABLE {_quote(table)} ({', '.join(specs)})")
        for row in rows:
            if row:
                keys = list(row)
                conn.execute(f"INSERT INTO {_quote(table)} ({', '.join(_quote(k) for k in keys)}) "
                             f"VALUES ({', '.join('?' for _ in keys)})", [_cell(row[k]) for k in keys])
    conn.commit()
    return conn


def _cell(value: Any) -> Any:
    if value is None or isinstance(value, (int, float, str, bytes)):
        return value
    return str(value)


def run_readonly(conn: sqlite3.Connection, sql: str, timeout_s: float = 2.0,
                 max_rows: int = 100_000) -> List[Tuple[Any, ...]]:
    """Rows of ``sql``; QueryRefused (write/attach/timeout/too many rows) or sqlite3.Error otherwise."""
    denied: List[str] = []

    def authorizer(action, arg1, arg2, db_name, source):
        if action in _ALLOWED:
            return sqlite3.SQLITE_OK
        denied.append("attach" if action in _ATTACH else "write")
        return sqlite3.SQLITE_DENY

    deadline = time.monotonic() + timeout_s
    timed_out: List[bool] = []

    def progress():
        if time.monotonic() > deadline:
            timed_out.append(True)
            return 1
        return 0

    conn.set_authorizer(authorizer)
    conn.set_progress_handler(progress, _PROGRESS_EVERY)
    try:
        cursor = conn.execute(sql)
        rows: List[Tuple[Any, ...]] = []
        while True:
            chunk = cursor.fetchmany(1000)
            if not chunk:
                break
            rows.extend(tuple(r) for r in chunk)
            if len(rows) > max_rows:
                raise QueryRefused(f"more than {max_rows} rows")
        return rows
    except (sqlite3.Error, sqlite3.Warning) as exc:
        if timed_out:
            raise QueryRefused(f"timeout after {timeout_s:g} s") from None
        if denied:
            raise QueryRefused("attaches a database" if denied[0] == "attach" else "not a read-only query") from None
        raise
    finally:
        conn.set_authorizer(None)
        conn.set_progress_handler(None, _PROGRESS_EVERY)
        if conn.in_transaction:
            conn.rollback()


def _fold(rows: List[Tuple[Any, ...]], case_insensitive: bool) -> Counter:
    if not case_insensitive:
        return Counter(rows)
    return Counter(tuple(v.lower() if isinstance(v, str) else v for v in row) for row in rows)


def _try(conn, sql, who, timeout_s, max_rows):
    if not sql or not sql.strip():
        return None, f"{who}: empty query"
    try:
        return run_readonly(conn, sql, timeout_s, max_rows), None
    except QueryRefused as exc:
        return None, f"{who}: {exc}"
    except (sqlite3.Error, sqlite3.Warning) as exc:
        return None, f"{who}: error: {exc}"


def sql_execution_result(pred_sql: str, gold_sql: str, tables: Mapping[str, Rows], context: Optional[str] = None,
                         case_insensitive: bool = True, timeout_s: float = 2.0,
                         max_rows: int = 100_000) -> ExecutionResult:
    """Run both queries read-only on ``tables`` and compare their result multisets, with the reason."""
    conn = build_database(tables, context, case_insensitive)
    try:
        gold_rows, gold_err = _try(conn, gold_sql, "gold", timeout_s, max_rows)
        if gold_err:
            return ExecutionResult(False, gold_err)
        pred_rows, pred_err = _try(conn, pred_sql, "pred", timeout_s, max_rows)
        if pred_err:
            return ExecutionResult(False, pred_err, gold_rows=gold_rows)
        same = _fold(pred_rows, case_insensitive) == _fold(gold_rows, case_insensitive)
        return ExecutionResult(same, "match" if same else "different results", pred_rows, gold_rows)
    finally:
        conn.close()


def sql_execution_match(pred_sql: str, gold_sql: str, tables: Mapping[str, Rows], context: Optional[str] = None,
                        case_insensitive: bool = True, timeout_s: float = 2.0) -> bool:
    """True when ``pred_sql`` returns the same multiset of rows as ``gold_sql`` on ``tables``."""
    return sql_execution_result(pred_sql, gold_sql, tables, context, case_insensitive, timeout_s).match
