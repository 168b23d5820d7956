"""SQL execution match: equivalent queries match, different results do not, unsafe/broken queries are wrong."""
import os

import pytest

from rosa_peft.eval.metrics import sql_execution_match, sql_execution_result
from rosa_peft.eval.protocols import get_protocol
from rosa_peft.tasks import Example

TABLES = {"table_1": [
    {"player": "bob goodlatte", "district": "virginia 6", "votes": 120},
    {"player": "tom davis", "district": "virginia 11", "votes": 95},
    {"player": "jim moran", "district": "virginia 8", "votes": 95},
]}
CONTEXT = "CREATE TABLE table_1 (player VARCHAR, district VARCHAR, votes INTEGER)"
GOLD = "select district from table_1 where votes = 95"


def test_textually_different_equivalent_queries_match():
    variants = [
        "SELECT district FROM table_1 WHERE votes = 95",
        "SELECT t.district FROM table_1 AS t WHERE t.votes < 100 ORDER BY district DESC",
        "SELECT district FROM table_1 WHERE player IN ('tom davis', 'jim moran')",
    ]
    for pred in variants:
        result = sql_execution_result(pred, GOLD, TABLES, CONTEXT)
        assert result.match and result.reason == "match", pred
    assert sql_execution_match("SELECT COUNT(*) FROM table_1 WHERE votes = 95",
                               "select count(player) from table_1 where votes < 100", TABLES, CONTEXT)


def test_different_results_do_not_match():
    result = sql_execution_result("SELECT district FROM table_1 WHERE votes = 120", GOLD, TABLES, CONTEXT)
    assert not result.match and result.reason == "different results"
    # multisets: a duplicated row is a different result
    assert not sql_execution_match("SELECT district FROM table_1 UNION ALL SELECT district FROM table_1",
                                   "SELECT district FROM table_1", TABLES, CONTEXT)


def test_case_insensitive_by_default_and_optional():
    pred = "SELECT district FROM table_1 WHERE player = 'Bob Goodlatte'"  # capitalised like the question
    gold = "select district from table_1 where player = 'bob goodlatte'"
    assert sql_execution_match(pred, gold, TABLES, CONTEXT)
    result = sql_execution_result(pred, gold, TABLES, CONTEXT, case_insensitive=False)
    assert not result.match and result.pred_rows == [] and result.gold_rows == [("virginia 6",)]


@pytest.mark.parametrize("pred, reason", [
    ("SELECT nope FROM table_1", "pred: error: no such column: nope"),
    ("SELEC district FROM table_1", "pred: error:"),
    ("", "pred: empty query"),
    ("DELETE FROM table_1", "pred: not a read-only query"),
    ("UPDATE table_1 SET votes = 95", "pred: not a read-only query"),
    ("DROP TABLE table_1", "pred: not a read-only query"),
    ("PRAGMA table_info(table_1)", "pred: not a read-only query"),
    ("SELECT district FROM table_1; DELETE FROM table_1", "pred: error:"),
])
def test_errors_and_writes_are_wrong_with_reason(pred, reason):
    result = sql_execution_result(pred, GOLD, TABLES, CONTEXT)
    assert not result.match
    assert result.reason.startswith(reason)


def test_attach_is_refused_and_creates_no_file(tmp_path):
    target = tmp_path / "evil.db"
    result = sql_execution_result(f"ATTACH DATABASE '{target}' AS evil", GOLD, TABLES, CONTEXT)
    assert not result.match and result.reason == "pred: attaches a database"
    assert not os.path.exists(target)


def test_timeout_is_wrong():
    endless = "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT COUNT(*) FROM c"
    result = sql_execution_result(endless, GOLD, TABLES, CONTEXT, timeout_s=0.2)
    assert not result.match and result.reason == "pred: timeout after 0.2 s"


def test_gold_error_is_recorded_and_counts_wrong():
    result = sql_execution_result("SELECT 1", "select x as :_bad from table_1", TABLES, CONTEXT)
    assert not result.match and result.reason.startswith("gold: error:")


def test_tables_without_valid_context_and_bad_tables():
    assert sql_execution_match("SELECT votes FROM table_1 WHERE votes > 100", "select 120", TABLES,
                               context="CREATE TABLE oops (")
    with pytest.raises(ValueError, match="tables must map"):
        sql_execution_result("SELECT 1", "SELECT 1", {})


def test_sql_protocol_records_execution_verdict_and_reason():
    proto = get_protocol("sql")
    ex = Example("prompt", GOLD, {"gold_sql": GOLD, "tables": TABLES, "context": CONTEXT})
    good = proto.score(ex, " SELECT district FROM table_1 WHERE votes < 100")
    assert good["correct"] is True and good["execution"] is True and good["exact"] is False
    bad = proto.score(ex, " DELETE FROM table_1")
    assert bad["correct"] is False and bad["exec_reason"] == "pred: empty query"  # no SELECT extracted
    summary = proto.summarize([good, bad])
    assert summary["accuracy"] == 0.5 and summary["execution"] == 0.5 and summary["primary_metric"] == "execution"
