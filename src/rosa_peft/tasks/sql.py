"""SQL (sql-create-context, Anyscale chat format) in the RoSA training format.

prompt = user content + ``"\\n\\n answer: "``, response = the SQL.

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
from typing import Dict, List, Optional

from .base import Example, FileTask
from ._files import get_field

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
        raise ValueError(f"{where} is not valid JSON ({exc.msg})") from None
    if not isinstance(tables, dict) or not tables:
        raise ValueError(f"{where} must map table names to lists of rows")
    for table, rows in tables.items():
        if not isinstance(rows, list) or not all(isinstance(row, dict) for row in rows):
            raise ValueError(f"{where}: table {table!r} must be a list of row objects")
    return tables


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

    def convert(self, record: dict, source: str, lineno: int, split: str) -> Example:
        if split == "test":
            return self._convert_mock(record, source, lineno)
        return self._convert_messages(record, source, lineno)

    @staticmethod
    def _convert_messages(record: dict, source: str, lineno: int) -> Example:
        messages = get_field(record, "messages", source, lineno, list)
        if len(messages) < 2 or not all(isinstance(m, dict) for m in messages[:2]):
            raise ValueError(f"{source}, line {lineno}: field 'messages' must hold a user and an assistant message")
        user = get_field(messages[0], "content", source, lineno)
        sql = get_field(messages[1], "content", source, lineno)
        match = _USER_RE.match(user)
        if match is None:
            raise ValueError(
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
