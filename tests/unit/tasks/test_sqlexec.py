"""The sqlite sandbox holds against time and memory attacks (issue #13), in model SQL and in contexts."""
import math
import sqlite3
import sys
import time

import pytest

from rosa_peft import eval as rosa_eval
from rosa_peft.eval import metrics
from rosa_peft.tasks import builtin
from rosa_peft.tasks import sqlexec as sql_exec
from rosa_peft.tasks.sqlexec import (QueryRefused, build_database, execute_sql, run_readonly,
                                     sql_execution_result, sqlite_memory_limit)

TABLES = {"t": [{"name": "ann", "n": 1}, {"name": "bob", "n": 2}, {"name": "cy", "n": 3}]}
CONTEXT = "CREATE TABLE t (name VARCHAR, n INTEGER)"
GOLD = "select name from t where n = 2"
COUNT_TO_1E9 = "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < 1000000000)"

ATTACKS = {
    "zeroblob 50 MB hex": "SELECT hex(zeroblob(50000000)) FROM t",
    "randomblob big": "SELECT randomblob(500000000) FROM t",
    "randomblob just under the value limit, many rows":
        COUNT_TO_1E9 + " SELECT randomblob(999999) FROM c",
    "many big columns in one row": "SELECT " + ", ".join(["zeroblob(999999)"] * 300),
    "distinct big blobs (memory in a temp b-tree)":
        COUNT_TO_1E9 + " SELECT COUNT(DISTINCT randomblob(100000)) FROM c",
    "recursive CTE counting to 1e9": COUNT_TO_1E9 + " SELECT COUNT(*) FROM c",
    "cartesian product blowup (count)": "SELECT COUNT(*) FROM " + ", ".join(f"t t{i}" for i in range(25)),
    "cartesian product blowup (rows)": "SELECT * FROM " + ", ".join(f"t t{i}" for i in range(12)),
}


def _timed(call):
    start = time.monotonic()
    result = call()
    return result, time.monotonic() - start


@pytest.mark.parametrize("sql", list(ATTACKS.values()), ids=list(ATTACKS))
def test_attack_in_model_sql_is_stopped_fast_with_a_verdict(sql):
    result, wall = _timed(lambda: sql_execution_result(sql, GOLD, TABLES, CONTEXT, timeout_s=2.0))
    assert wall < 3.0
    assert not result.match
    assert result.reason.startswith("pred: ")
    assert any(word in result.reason for word in ("timeout after 2 s", "too large", "more than 100000 rows")), \
        result.reason
    assert result.gold_rows == [("bob",)]  # the gold query still ran normally


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="ru_maxrss is in KiB on Linux only")
def test_attacks_keep_peak_memory_bounded():
    import resource  # noqa: PLC0415 - POSIX only
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for sql in ATTACKS.values():
        if "COUNT(*)" not in sql:  # the time-only attacks add nothing here
            sql_execution_result(sql, GOLD, TABLES, CONTEXT)
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert grown_mb < 600  # the zeroblob attack alone held 5.3 GB before the guards


def test_single_expensive_values_are_refused_as_too_large_at_once():
    for sql in (ATTACKS["zeroblob 50 MB hex"], ATTACKS["randomblob big"]):
        result, wall = _timed(lambda: sql_execution_result(sql, GOLD, TABLES, CONTEXT))
        assert wall < 0.5 and result.reason.startswith("pred: too large: string or blob too big"), result.reason


def test_result_size_counts_bytes_not_rows():
    sql = COUNT_TO_1E9 + " SELECT randomblob(999999) FROM c"
    result = sql_execution_result(sql, GOLD, TABLES, CONTEXT)
    assert result.reason == "pred: result too large (over 16000000 bytes)"
    conn = build_database(TABLES, CONTEXT)
    try:
        with pytest.raises(QueryRefused, match=r"result too large \(over 1000 bytes\)"):
            run_readonly(conn, "SELECT zeroblob(600) FROM t", max_result_bytes=1000)
        assert len(run_readonly(conn, "SELECT zeroblob(600) FROM t LIMIT 1", max_result_bytes=1000)) == 1
    finally:
        conn.close()


def test_recursive_cte_in_the_dataset_context_times_out():
    context = CONTEXT + "; " + COUNT_TO_1E9 + " SELECT COUNT(*) FROM c"
    result, wall = _timed(lambda: sql_execution_result(GOLD, GOLD, TABLES, context, timeout_s=1.0))
    assert wall < 3.0
    assert not result.match and result.reason == "context: timeout after 1 s"
    with pytest.raises(QueryRefused, match="timeout"):
        execute_sql(GOLD, TABLES, context, timeout_s=0.5)  # the sql-synth path has the same guard


def test_memory_attack_in_the_dataset_context_is_too_large():
    context = ("CREATE TABLE t (name VARCHAR, n INTEGER); CREATE TABLE big AS " + COUNT_TO_1E9
               + " SELECT randomblob(100000) AS b FROM c")
    result, wall = _timed(lambda: sql_execution_result(GOLD, GOLD, TABLES, context))
    assert wall < 3.0
    assert result.reason in ("context: timeout after 2 s",) or result.reason.startswith("context: too large"), \
        result.reason
    one_huge_value = CONTEXT + "; SELECT hex(zeroblob(50000000))"
    assert sql_execution_result(GOLD, GOLD, TABLES, one_huge_value).reason.startswith(
        "context: too large: string or blob too big")


def test_context_may_not_attach_or_change_settings(tmp_path):
    target = tmp_path / "evil.db"
    for context in (f"ATTACH DATABASE '{target}' AS evil; " + CONTEXT, "PRAGMA hard_heap_limit = 0; " + CONTEXT):
        result = sql_execution_result(GOLD, GOLD, TABLES, context)
        assert result.match  # an invalid context is ignored: the tables come from the rows
    assert not target.exists()


def test_heap_limit_is_set_inside_and_restored_after():
    probe = sqlite3.connect(":memory:")
    try:
        before = probe.execute("PRAGMA hard_heap_limit").fetchone()[0]
        with sqlite_memory_limit():
            inside = probe.execute("PRAGMA hard_heap_limit").fetchone()[0]
        after = probe.execute("PRAGMA hard_heap_limit").fetchone()[0]
    finally:
        probe.close()
    if sql_exec.HEAP_LIMIT_MODE == "unsupported":
        pytest.skip(f"sqlite {sqlite3.sqlite_version} has no hard heap limit")
    assert 0 < inside <= sql_exec.HEAP_LIMIT_BYTES
    if sql_exec.HEAP_LIMIT_MODE == "restored":
        assert after == before


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf, 0, 0.0, -1, True, "2", None])
def test_invalid_timeouts_are_refused(bad):
    with pytest.raises(ValueError, match="sql_timeout must be a finite number of seconds above 0"):
        sql_execution_result(GOLD, GOLD, TABLES, CONTEXT, timeout_s=bad)
    with pytest.raises(ValueError, match="sql_timeout"):
        execute_sql(GOLD, TABLES, CONTEXT, timeout_s=bad)


def test_one_sqlite_module():
    # evaluation scores with the very functions the sql-synth generator checks its gold queries with
    assert metrics.sql_execution_result is sql_execution_result is rosa_eval.sql_execution_result
    assert metrics.sql_execution_match is sql_exec.sql_execution_match is rosa_eval.sql_execution_match
    assert builtin.execute_sql is execute_sql and builtin.QueryRefused is QueryRefused


def test_normal_queries_keep_their_results():
    assert execute_sql("SELECT name FROM t WHERE n > 1 ORDER BY n", TABLES, CONTEXT) == [("bob",), ("cy",)]
    # sqlite's own case semantics on the sql-synth path, NOCASE by default for evaluation
    assert execute_sql("SELECT n FROM t WHERE name = 'BOB'", TABLES, CONTEXT) == []
    assert sql_execution_result("SELECT name FROM t WHERE name = 'BOB'", GOLD, TABLES, CONTEXT).match
    # a legitimate recursive CTE and big-but-allowed values still run
    assert execute_sql("WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < 1000) "
                       "SELECT SUM(x), length(zeroblob(900000)) FROM c", TABLES) == [(500500, 900000)]
    with pytest.raises(sqlite3.OperationalError, match="no such column"):
        execute_sql("SELECT nope FROM t", TABLES, CONTEXT)
    with pytest.raises(QueryRefused, match="not a read-only query"):
        execute_sql("DELETE FROM t", TABLES, CONTEXT)


def test_oversized_table_value_names_table_and_row():
    with pytest.raises(ValueError, match=r"table 't', row 2: string or blob too big"):
        build_database({"t": [{"a": "x"}, {"a": "x" * 1_000_001}]})
