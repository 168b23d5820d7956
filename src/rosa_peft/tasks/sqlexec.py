"""The one sqlite sandbox: build mock tables, run model-written or dataset SQL under guards, compare.

Every query of the project runs through this module: the SQL protocol's execution match
(:func:`sql_execution_result`, also exported by :mod:`rosa_peft.eval`) and the ``sql-synth``
generator's gold check (:func:`execute_sql`). Each call builds a fresh in-memory sqlite3
database from the tables (column types come from the ``CREATE TABLE`` context when it is valid
sqlite) and runs SQL under these guards:

* **read-only**: an authorizer allows only reads (``SELECT``, column reads, functions, recursive
  CTEs); a write, DDL, ``PRAGMA``, ``ATTACH``/``DETACH`` or transaction statement is refused before
  it runs; ``SQLITE_LIMIT_ATTACHED`` is 0; only one statement is accepted;
* **wall time**: a progress handler checks the clock every :data:`PROGRESS_EVERY` sqlite VM steps
  and stops the statement after ``timeout_s`` seconds. Because no single value may exceed
  :data:`MAX_VALUE_BYTES` (``SQLITE_LIMIT_LENGTH``), one expensive function call (``randomblob``,
  ``hex(zeroblob(...))``, ``replace``) takes milliseconds, so the bound holds for them too;
* **memory**: ``SQLITE_LIMIT_LENGTH`` caps every string/blob/row, ``SQLITE_LIMIT_SQL_LENGTH`` the
  statement, ``SQLITE_LIMIT_COMPOUND_SELECT`` the compound terms; temporary b-trees and sorters are
  kept in memory (``temp_store = MEMORY``, nothing touches the disk) under sqlite's hard heap limit
  (:data:`HEAP_LIMIT_BYTES`, see :func:`sqlite_memory_limit`); rows are fetched one at a time and
  the result is capped at ``max_rows`` rows and ``max_result_bytes`` bytes of returned values;
* the **dataset context** (its ``CREATE TABLE``/``INSERT`` script, used for the column types) runs
  in a scratch database under the same time and memory guards, with ``ATTACH`` and ``PRAGMA``
  refused. A context that times out or is too large gives the verdict ``"context: ..."``; a context
  that is merely invalid sqlite is ignored (the tables are then created untyped from the rows).

A prediction that errors, is refused, times out or is too large is wrong, and the reason is
returned. Results are compared as multisets of rows (row order is ignored; ``1`` equals ``1.0``).
``timeout_s`` must be a finite positive number (``nan``, ``inf``, 0 and negatives raise
ValueError naming ``sql_timeout``).

**Case.** By default (``case_insensitive=True``) text columns are declared ``COLLATE NOCASE`` and
text values in both results are lowercased before comparing. The mock-table SQL data set stores
lowercased rows and lowercased gold queries, while a model copies the question's capitalisation
into its literals (``WHERE name = 'Bob Goodlatte'``); under sqlite's default, case-sensitive ``=``
such a query finds nothing although it is the right query. ``NOCASE`` folds ASCII letters only.
Pass ``case_insensitive=False`` for sqlite's own semantics.
"""
from __future__ import annotations

import contextlib
import ctypes
import sqlite3
import threading
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any, Iterator, List, Mapping, Optional, Sequence, Tuple

from ..utils.checks import UserError, check_int, is_real

Rows = Sequence[Mapping[str, Any]]

PROGRESS_EVERY = 100  # sqlite VM steps between two clock checks
MAX_VALUE_BYTES = 1_000_000  # SQLITE_LIMIT_LENGTH: longest string, blob or row
MAX_SQL_BYTES = 100_000  # SQLITE_LIMIT_SQL_LENGTH: longest statement (and context script)
MAX_COMPOUND_SELECT = 100  # SQLITE_LIMIT_COMPOUND_SELECT
MAX_ROWS = 100_000  # rows a query may return
MAX_RESULT_BYTES = 16_000_000  # bytes of returned values a query may return
HEAP_LIMIT_BYTES = 128_000_000  # sqlite's hard heap limit while a guarded query runs

_LIMITS = {
    sqlite3.SQLITE_LIMIT_LENGTH: MAX_VALUE_BYTES,
    sqlite3.SQLITE_LIMIT_SQL_LENGTH: MAX_SQL_BYTES,
    sqlite3.SQLITE_LIMIT_COMPOUND_SELECT: MAX_COMPOUND_SELECT,
    sqlite3.SQLITE_LIMIT_ATTACHED: 0,
}
_ALLOWED = {sqlite3.SQLITE_SELECT, sqlite3.SQLITE_READ, sqlite3.SQLITE_FUNCTION,
            getattr(sqlite3, "SQLITE_RECURSIVE", 33)}
_ATTACH = {sqlite3.SQLITE_ATTACH, sqlite3.SQLITE_DETACH}
_CONTEXT_DENIED = _ATTACH | {sqlite3.SQLITE_PRAGMA}


@dataclass
class ExecutionResult:
    """The outcome of one comparison. ``reason`` is ``"match"``, ``"different results"``, or why
    the prediction (``"pred: ..."``), the gold query (``"gold: ..."``) or the dataset context
    (``"context: ..."``) could not be run."""

    match: bool
    reason: str
    pred_rows: Optional[List[Tuple[Any, ...]]] = None
    gold_rows: Optional[List[Tuple[Any, ...]]] = None


class QueryRefused(Exception):
    """A query was not run, or stopped, for a reason other than an sqlite error
    (not read-only, timeout, too many rows, too large)."""


def check_timeout(timeout_s: Any) -> float:
    """``timeout_s`` as a float; ValueError unless it is a finite number of seconds above 0."""
    if not is_real(timeout_s) or timeout_s <= 0:
        raise UserError(f"sql_timeout must be a finite number of seconds above 0, got {timeout_s!r}")
    return float(timeout_s)


# ---------------------------------------------------------------- process-wide heap limit

def _find_heap_limit_function():
    """sqlite3_hard_heap_limit64 of the sqlite library that the ``sqlite3`` module uses, or None."""
    if sqlite3.sqlite_version_info < (3, 31, 0):
        return None
    try:
        import _sqlite3  # noqa: PLC0415 - the C extension, to reach its sqlite library
        function = ctypes.CDLL(_sqlite3.__file__).sqlite3_hard_heap_limit64
        function.restype, function.argtypes = ctypes.c_int64, [ctypes.c_int64]
        # Check that it is the same library: a value set here must be what the pragma reports.
        probe = sqlite3.connect(":memory:")
        try:
            before = function(-1)
            marker = before - 1 if before > 1 else 987_654_321
            function(marker)
            same = probe.execute("PRAGMA hard_heap_limit").fetchone()[0] == marker
            function(before)
        finally:
            probe.close()
        return function if same else None
    except (ImportError, OSError, AttributeError, sqlite3.Error):
        return None


_heap_lock = threading.Lock()
_heap_users = 0
_heap_saved = 0
_heap_function = _find_heap_limit_function()
#: how the heap limit is applied: "restored" (set and restored around each guarded call),
#: "pragma" (this build only lets ``PRAGMA hard_heap_limit`` lower it; it then stays for the
#: process) or "unsupported" (sqlite older than 3.31).
HEAP_LIMIT_MODE = ("restored" if _heap_function is not None
                   else "pragma" if sqlite3.sqlite_version_info >= (3, 31, 0) else "unsupported")


@contextlib.contextmanager
def sqlite_memory_limit(limit: int = HEAP_LIMIT_BYTES) -> Iterator[None]:
    """Cap sqlite's heap at ``limit`` bytes inside the block (re-entrant and thread-safe).

    sqlite's hard heap limit is process-wide: other sqlite connections of the process share it
    while the block runs. The previous limit is restored when the last user leaves (where the
    build allows it; see :data:`HEAP_LIMIT_MODE`). An allocation past the limit fails, which
    stops the statement with an out-of-memory error.
    """
    global _heap_users, _heap_saved
    with _heap_lock:
        if _heap_users == 0:
            if _heap_function is not None:
                _heap_saved = _heap_function(-1)
                _heap_function(limit if _heap_saved <= 0 else min(limit, _heap_saved))
            elif HEAP_LIMIT_MODE == "pragma":
                scratch = sqlite3.connect(":memory:")
                try:
                    scratch.execute(f"PRAGMA hard_heap_limit = {int(limit)}")  # lowers only
                finally:
                    scratch.close()
        _heap_users += 1
    try:
        yield
    finally:
        with _heap_lock:
            _heap_users -= 1
            if _heap_users == 0 and _heap_function is not None:
                _heap_function(_heap_saved)


# ---------------------------------------------------------------- guarded connections

class _Deadline:
    """The progress handler: stops the running statement once the wall-clock budget is spent."""

    def __init__(self, timeout_s: float):
        self.timeout_s = timeout_s
        self.end = time.monotonic() + timeout_s
        self.expired = False

    def __call__(self) -> int:
        if time.monotonic() > self.end:
            self.expired = True
            return 1
        return 0

    def check(self) -> None:
        if self.expired or time.monotonic() > self.end:
            raise QueryRefused(self.message())

    def message(self) -> str:
        return f"timeout after {self.timeout_s:g} s"


def connect() -> sqlite3.Connection:
    """A fresh in-memory database with the sandbox's size limits and in-memory temp storage."""
    conn = sqlite3.connect(":memory:")
    for category, value in _LIMITS.items():
        conn.setlimit(category, value)
    conn.execute("PRAGMA temp_store = MEMORY")  # sorters / temp b-trees count under the heap limit
    return conn


def _too_large(exc: BaseException) -> Optional[str]:
    """The 'too large' reason for a size-limit failure, else None."""
    if isinstance(exc, MemoryError):
        return f"too large: out of memory (sqlite heap limit {HEAP_LIMIT_BYTES // 1_000_000} MB)"
    if isinstance(exc, sqlite3.DataError) or getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_TOOBIG:
        return f"too large: {exc} (limit {MAX_VALUE_BYTES} bytes per value, {MAX_SQL_BYTES} per statement)"
    return None


def _quote(identifier: str) -> str:
    return '"' + str(identifier).replace('"', '""') + '"'


def _declared_types(context: Optional[str], timeout_s: float) -> dict:
    """``{table: {column_lower: (name, declared type)}}`` from the context's CREATE TABLE statements.

    {} when the context is not valid sqlite; QueryRefused when it times out or is too large.
    """
    if not context:
        return {}
    scratch = connect()
    deadline = _Deadline(timeout_s)
    # The context is data: it may create and fill tables, never attach (create) a database file
    # or change a setting (PRAGMA hard_heap_limit, temp_store, ...).
    scratch.set_authorizer(lambda action, *_: sqlite3.SQLITE_DENY if action in _CONTEXT_DENIED
                           else sqlite3.SQLITE_OK)
    scratch.set_progress_handler(deadline, PROGRESS_EVERY)
    try:
        with sqlite_memory_limit():
            try:
                scratch.executescript(context if context.rstrip().endswith(";") else context + ";")
            except (sqlite3.Error, sqlite3.Warning, MemoryError) as exc:
                if deadline.expired:
                    raise QueryRefused(deadline.message()) from None
                reason = _too_large(exc)
                if reason:
                    raise QueryRefused(reason) from None
                return {}
        scratch.set_authorizer(None)
        scratch.set_progress_handler(None, PROGRESS_EVERY)
        tables = [r[0] for r in scratch.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        return {t.lower(): {r[1].lower(): (r[1], r[2]) for r in scratch.execute(f"PRAGMA table_info({_quote(t)})")}
                for t in tables}
    except sqlite3.Error:
        return {}
    finally:
        scratch.close()


def build_database(tables: Mapping[str, Rows], context: Optional[str] = None,
                   case_insensitive: bool = True, timeout_s: float = 2.0) -> sqlite3.Connection:
    """A guarded in-memory database holding ``tables`` (``{name: [row dict, ...]}``).

    ``context`` (CREATE TABLE statements) gives the column types; it runs under the sandbox's
    guards and raises QueryRefused when it times out or is too large. ValueError for bad tables.
    """
    timeout_s = check_timeout(timeout_s)
    if not isinstance(tables, Mapping) or not tables:
        raise UserError("tables must map table names to lists of row dicts")
    declared = _declared_types(context, timeout_s)
    conn = connect()
    try:
        _fill(conn, tables, declared, case_insensitive)
    except BaseException:
        conn.close()
        raise
    return conn


def _fill(conn: sqlite3.Connection, tables: Mapping[str, Rows], declared: dict, case_insensitive: bool) -> None:
    for table, rows in tables.items():
        columns: List[str] = []
        types = declared.get(str(table).lower(), {})
        for _, (name, _type) in types.items():
            columns.append(name)
        for row in rows:
            if not isinstance(row, Mapping):
                raise UserError(f"table {table!r}: every row must be a dict, got {type(row).__name__}")
            for column in row:
                if str(column).lower() not in {c.lower() for c in columns}:
                    columns.append(str(column))
        specs = []
        for column in columns or ["_empty"]:
            col_type = types.get(column.lower(), (column, ""))[1]
            collate = "COLLATE NOCASE" if case_insensitive else ""
            specs.append(" ".join(part for part in (_quote(column), col_type, collate) if part))
        conn.execute(f"CREATE TABLE {_quote(table)} ({', '.join(specs)})")
        for number, row in enumerate(rows, start=1):
            if row:
                keys = list(row)
                try:
                    conn.execute(f"INSERT INTO {_quote(table)} ({', '.join(_quote(k) for k in keys)}) "
                                 f"VALUES ({', '.join('?' for _ in keys)})", [_cell(row[k]) for k in keys])
                except sqlite3.DataError as exc:
                    raise UserError(f"table {table!r}, row {number}: {exc} (a value may hold at most "
                                     f"{MAX_VALUE_BYTES} bytes)") from None
    conn.commit()


def _cell(value: Any) -> Any:
    if value is None or isinstance(value, (int, float, str, bytes)):
        return value
    return str(value)


def _value_bytes(value: Any) -> int:
    return len(value) if isinstance(value, (str, bytes)) else 8


def run_readonly(conn: sqlite3.Connection, sql: str, timeout_s: float = 2.0, max_rows: int = MAX_ROWS,
                 max_result_bytes: int = MAX_RESULT_BYTES) -> List[Tuple[Any, ...]]:
    """Rows of ``sql`` under the guards; QueryRefused (not read-only, attach, timeout, too many rows,
    too large) or sqlite3.Error otherwise. ValueError for an invalid ``timeout_s`` or cap."""
    timeout_s = check_timeout(timeout_s)
    max_rows = check_int("max_rows", max_rows, 1)
    max_result_bytes = check_int("max_result_bytes", max_result_bytes, 1)
    denied: List[str] = []

    def authorizer(action, arg1, arg2, db_name, source):
        if action in _ALLOWED:
            return sqlite3.SQLITE_OK
        denied.append("attach" if action in _ATTACH else "write")
        return sqlite3.SQLITE_DENY

    for category, value in _LIMITS.items():  # also for a connection that connect() did not make
        conn.setlimit(category, min(value, conn.getlimit(category)))
    deadline = _Deadline(timeout_s)
    cursor = None
    with sqlite_memory_limit():
        conn.set_authorizer(authorizer)
        conn.set_progress_handler(deadline, PROGRESS_EVERY)
        try:
            cursor = conn.execute(sql)
            rows: List[Tuple[Any, ...]] = []
            size = 0
            for row in cursor:  # one row at a time: a cap is checked before the next row is built
                deadline.check()
                rows.append(tuple(row))
                size += sum(_value_bytes(v) for v in row)
                if len(rows) > max_rows:
                    raise QueryRefused(f"more than {max_rows} rows")
                if size > max_result_bytes:
                    raise QueryRefused(f"result too large (over {max_result_bytes} bytes)")
            return rows
        except (sqlite3.Error, sqlite3.Warning, MemoryError) as exc:
            if deadline.expired:
                raise QueryRefused(deadline.message()) from None
            if denied:
                raise QueryRefused("attaches a database" if denied[0] == "attach" else "not a read-only query") from None
            reason = _too_large(exc)
            if reason:
                raise QueryRefused(reason) from None
            raise
        finally:
            if cursor is not None:
                cursor.close()
            conn.set_authorizer(None)
            conn.set_progress_handler(None, PROGRESS_EVERY)
            if conn.in_transaction:
                conn.rollback()


def execute_sql(sql: str, tables: Mapping[str, Rows], context: Optional[str] = None, timeout_s: float = 2.0,
                case_insensitive: bool = False) -> List[Tuple[Any, ...]]:
    """The rows ``sql`` returns on ``tables`` (sqlite's own case semantics by default), under the
    guards; sqlite3.Error for an invalid query, QueryRefused for a refused or stopped one."""
    timeout_s = check_timeout(timeout_s)
    with sqlite_memory_limit():
        conn = build_database(tables, context, case_insensitive, timeout_s)
        try:
            return run_readonly(conn, sql, timeout_s)
        finally:
            conn.close()


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
                         max_rows: int = MAX_ROWS) -> ExecutionResult:
    """Run both queries read-only on ``tables`` and compare their result multisets, with the reason."""
    timeout_s = check_timeout(timeout_s)
    max_rows = check_int("max_rows", max_rows, 1)
    with sqlite_memory_limit():
        try:
            conn = build_database(tables, context, case_insensitive, timeout_s)
        except QueryRefused as exc:
            return ExecutionResult(False, f"context: {exc}")
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
