"""SQL (sql-create-context, Anyscale chat format) in the RoSA training format, its metrics and protocol.

prompt = user content + ``"\\n\\n answer: "``, response = the SQL. Evaluation (also of ``sql-synth``,
which shares the format): the training prompt (``--sql-paper-prompt``: the suffix doubled, as the
paper's eval did), stop at a newline, at most 192 new tokens; the verdict is execution match
(:mod:`rosa_peft.tasks.sqlexec`) when the example has mock tables, else the paper's exact match.

The paper's training file is not available, so this package defines its own split (see
docs/tasks.md):

* ``train``: ``sql/valid.jsonl`` (1,000 rows; the paper's eval split, in the paper's format);
* ``test``: the 770 rows of ``sql/valid_including_mock_tables.jsonl`` (disjoint from valid.jsonl),
  put in the same prompt format, with the mock rows parsed into ``meta["tables"]`` so that
  execution accuracy can be measured. Its gold ``sql_query`` is lowercased and kept as is;
* ``paper``: ``sql/valid.jsonl`` again, for the paper's exact-match protocol. It is our training
  data, so scores on it are not held out.
"""
from __future__ import annotations

import json
import re
from typing import Dict, List, Optional, Sequence

from ..utils.checks import UserError
from ._files import get_field
from .base import Example, FileTask
from .protocol import EvalProtocol, mean
from .sqlexec import check_timeout, sql_execution_result

INSTRUCTION = "Write a SQL query to answer the question based on the table schema."
USER_TEMPLATE = INSTRUCTION + "\n\n context: {context}\n\n question: {question}"
ANSWER_SUFFIX = "\n\n answer: "

_USER_RE = re.compile(
    r"^Write a SQL query to answer the question based on the table schema\.\n\n context: (.*)\n\n question: (.*)$",
    re.DOTALL,
)


def sql_user_content(context: str, question: str) -> str:
    return USER_TEMPLATE.format(context=context, question=question)


def sql_prompt(context: str, question: str) -> str:
    """The RoSA SQL training prompt: user content followed by ``"\\n\\n answer: "``."""
    return sql_user_content(context, question) + ANSWER_SUFFIX


def parse_tables(text: str, source: str, lineno: int, field: str = "data_table") -> Dict[str, List[dict]]:
    """``{table_name: [row dict, ...]}`` from a JSON string; errors name field, file and line."""
    where = f"{source}, line {lineno}: field {field!r}"
    try:
        tables = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UserError(f"{where} is not valid JSON ({exc.msg})") from None
    if not isinstance(tables, dict) or not tables:
        raise UserError(f"{where} must map table names to lists of rows")
    for table, rows in tables.items():
        if not isinstance(rows, list) or not all(isinstance(row, dict) for row in rows):
            raise UserError(f"{where}: table {table!r} must be a list of row objects")
    return tables


_SQL_PAPER = re.compile(r"SELECT (.*)")
_SQL_ANY = re.compile(r"\bselect\b.*", re.IGNORECASE)


def sql_extract(text: str, paper: bool = True) -> str:
    """The predicted query: from the first ``SELECT`` to the end of its line, stripped; ``""`` if none.

    ``paper=True`` is RoSA's ``re.search('SELECT (.*)', decoded).group(0)`` (uppercase ``SELECT``
    followed by a space); ``paper=False`` also accepts lowercase/mixed-case ``select``.
    """
    match = (_SQL_PAPER if paper else _SQL_ANY).search(text)
    return match.group(0).strip() if match else ""


def sql_exact(pred: str, gold: str) -> bool:
    """RoSA's SQL metric: the paper-extracted query equals the stripped gold, case-sensitively."""
    return sql_extract(pred, paper=True) == gold.strip()


def sql_normalize(sql: str) -> str:
    """Lowercase, single spaces, no trailing ``;`` (for the case-insensitive exact variant)."""
    return " ".join(sql.strip().rstrip(";").split()).lower()


def sql_exact_nocase(pred: str, gold: str) -> bool:
    """Exact match after :func:`sql_normalize` on both sides (the mock-table gold is lowercased)."""
    return sql_normalize(sql_extract(pred, paper=False)) == sql_normalize(gold)


class SQLProtocol(EvalProtocol):
    """Execution match where the example has mock tables, else exact match; also ``exact`` and
    ``exact_nocase`` for every example."""

    @classmethod
    def for_task(cls, task: str, sql_paper_prompt: bool = False, sql_case_insensitive: bool = True,
                 sql_timeout_s: float = 2.0, **_) -> "SQLProtocol":
        check_timeout(sql_timeout_s)  # finite and > 0: nan / inf would switch the guard off
        return cls(task, "sql-paper-prompt" if sql_paper_prompt else "sql", ("\n",), 192, True,
                   {"sql_paper_prompt": bool(sql_paper_prompt), "sql_case_insensitive": bool(sql_case_insensitive),
                    "sql_timeout_s": float(sql_timeout_s)})

    def prompt(self, example) -> str:
        return example.prompt + (ANSWER_SUFFIX if self.options["sql_paper_prompt"] else "")

    def score(self, example, generation: str) -> dict:
        gold = example.meta.get("gold_sql", example.response).strip()
        pred = sql_extract(generation, paper=False)
        record = {"prediction": pred, "gold": gold, "exact": sql_exact(generation, gold),
                  "exact_nocase": sql_exact_nocase(generation, gold), "execution": None}
        tables = example.meta.get("tables")
        if tables:
            result = sql_execution_result(pred, gold, tables, example.meta.get("context"),
                                          case_insensitive=self.options["sql_case_insensitive"],
                                          timeout_s=self.options["sql_timeout_s"])
            record["execution"], record["exec_reason"] = result.match, result.reason
        record["correct"] = record["execution"] if tables else record["exact"]
        return record

    def summarize(self, records: Sequence[dict]) -> dict:
        out = super().summarize(records)
        n = len(records)
        executed = [r for r in records if r["execution"] is not None]
        out["exact"] = mean(records, "exact")
        out["exact_nocase"] = mean(records, "exact_nocase")
        out["n_executed"] = len(executed)
        if executed:
            out["execution"] = mean(executed, "execution")
            out["gold_errors"] = sum(r["exec_reason"].startswith("gold:") for r in executed)
            out["pred_errors"] = sum(r["exec_reason"].startswith("pred:") for r in executed)
        out["primary_metric"] = ("execution" if len(executed) == n else "exact" if not executed
                                 else "execution where tables exist, else exact")
        return out


class SQLTask(FileTask):
    name = "sql"
    description = ("text-to-SQL with CREATE TABLE context (train 1,000 = RoSA valid.jsonl / "
                   "test 770 with mock tables / paper 1,000)")
    splits = ("train", "test", "paper")
    train_split = "train"
    eval_split = "test"
    subdir = "sql"
    files = {"train": "valid.jsonl", "test": "valid_including_mock_tables.jsonl", "paper": "valid.jsonl"}
    hf_id = None  # our split is defined by the local files only
    protocol = SQLProtocol
    # the test split's gold queries are lower-cased, so exact match is compared without case
    table_columns = (("Exact match, no case (%)", "exact_nocase"), ("Execution acc. (%)", "execution"))
    paired_fields = (("accuracy", "correct"), ("exact_nocase", "exact_nocase"))

    def convert(self, record: dict, source: str, lineno: int, split: str) -> Example:
        if split == "test":
            return self._convert_mock(record, source, lineno)
        return self._convert_messages(record, source, lineno)

    @staticmethod
    def _convert_messages(record: dict, source: str, lineno: int) -> Example:
        messages = get_field(record, "messages", source, lineno, list)
        if len(messages) < 2 or not all(isinstance(m, dict) for m in messages[:2]):
            raise UserError(f"{source}, line {lineno}: field 'messages' must hold a user and an assistant message")
        user = get_field(messages[0], "content", source, lineno)
        sql = get_field(messages[1], "content", source, lineno)
        match = _USER_RE.match(user)
        if match is None:
            raise UserError(
                f"{source}, line {lineno}: field 'messages[0].content' does not follow the "
                f"'{INSTRUCTION} context: ... question: ...' format"
            )
        context, question = match.group(1), match.group(2)
        meta = {"gold_sql": sql, "tables": None, "context": context, "question": question}
        return Example(prompt=user + ANSWER_SUFFIX, response=sql, meta=meta)

    @staticmethod
    def _convert_mock(record: dict, source: str, lineno: int) -> Example:
        context = get_field(record, "context", source, lineno)
        question = get_field(record, "question", source, lineno)
        sql = get_field(record, "sql_query", source, lineno)
        tables = parse_tables(get_field(record, "data_table", source, lineno), source, lineno)
        meta = {"gold_sql": sql, "tables": tables, "context": context, "question": question}
        idx: Optional[int] = record.get("idx") if isinstance(record.get("idx"), int) else None
        if idx is not None:
            meta["idx"] = idx
        return Example(prompt=sql_prompt(context, question), response=sql, meta=meta)
