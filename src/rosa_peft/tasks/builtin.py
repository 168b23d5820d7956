"""``sql-synth``: the offline default task, a seeded generator of sql-create-context-style examples.

It is evaluated with the SQL task's protocol (:class:`rosa_peft.tasks.sql.SQLProtocol`): every example
has mock tables, so the verdict is execution match.

Each example has a CREATE TABLE with 2-4 columns, a short English question in a fixed phrasing,
a gold SQL query and 3-6 seeded mock rows. Every gold query is executed in sqlite3 at generation
time and must return a non-empty, non-NULL result. The prompt format is the SQL task's
(``"Write a SQL query ... context: ... question: ...\\n\\n answer: "``), so a model fine-tuned here
sees the same layout as on the real SQL task. Short prompts and consistent phrasing make it
learnable by a ~135M model in a few dozen steps.

Question templates (X, Y, W: columns; z, v: values; k: a number):

* ``What is the X when the Y is z?``                 -> ``SELECT x FROM t WHERE y = 'z'``
* ``What is the X when the Y is z and the W is v?``  -> ``SELECT x FROM t WHERE y = 'z' AND w = 'v'``
* ``What is the X when the N is greater than k?``    -> ``SELECT x FROM t WHERE n > k``
* ``How many T have a Y of z?``                      -> ``SELECT COUNT(*) FROM t WHERE y = 'z'``
* ``What is the highest N when the Y is z?``         -> ``SELECT MAX(n) FROM t WHERE y = 'z'``
* ``What is the lowest N when the Y is z?``          -> ``SELECT MIN(n) FROM t WHERE y = 'z'``
"""
from __future__ import annotations

import random
import sqlite3
from typing import Dict, Iterable, List, Optional, Set, Tuple

from ..utils.checks import check_int
from ._synth_vocab import TABLES, TEXT_POOLS, Pool, is_numeric, sql_type, words
from .base import Example, Task
from .sql import SQLProtocol, sql_prompt
from .sqlexec import QueryRefused, execute_sql

KINDS = ("select", "select_and", "select_gt", "count", "max", "min")
WEIGHTS = (4, 1, 1, 2, 1, 1)


def _value(rng: random.Random, pool: Pool):
    if is_numeric(pool):
        low, high = pool  # type: ignore[misc]
        return rng.randint(low, high)
    return rng.choice(TEXT_POOLS[pool])  # type: ignore[index]


def _literal(value) -> str:
    if isinstance(value, int):
        return str(value)
    return "'" + str(value).replace("'", "''") + "'"


def _pick_columns(rng: random.Random, table: str, kind: str) -> Tuple[Dict[str, str], List[str]]:
    """The roles of the columns the query uses, and the list of columns needed."""
    columns = [name for name, _ in TABLES[table]]
    text = [name for name, pool in TABLES[table] if not is_numeric(pool)]
    numeric = [name for name, pool in TABLES[table] if is_numeric(pool)]
    if kind == "select":
        y = rng.choice(text)
        roles = {"x": rng.choice([c for c in columns if c != y]), "y": y}
    elif kind == "select_and":
        y, w = rng.sample(text, 2)
        roles = {"x": rng.choice([c for c in columns if c not in (y, w)]), "y": y, "w": w}
    elif kind == "select_gt":
        roles = {"x": rng.choice(text), "n": rng.choice(numeric)}
    elif kind == "count":
        roles = {"y": rng.choice(text)}
    else:  # max / min
        roles = {"x": rng.choice(numeric), "y": rng.choice(text)}
    return roles, list(roles.values())


def _question_and_sql(kind: str, table: str, roles: Dict[str, str], anchor: dict,
                      rng: random.Random) -> Tuple[str, str]:
    x, y = roles.get("x"), roles.get("y")
    if kind == "select":
        z = anchor[y]
        return (f"What is the {words(x)} when the {words(y)} is {z}?",
                f"SELECT {x} FROM {table} WHERE {y} = {_literal(z)}")
    if kind == "select_and":
        w = roles["w"]
        z, v = anchor[y], anchor[w]
        return (f"What is the {words(x)} when the {words(y)} is {z} and the {words(w)} is {v}?",
                f"SELECT {x} FROM {table} WHERE {y} = {_literal(z)} AND {w} = {_literal(v)}")
    if kind == "select_gt":
        n = roles["n"]
        low, high = dict(TABLES[table])[n]  # type: ignore[misc]
        k = anchor[n] - rng.randint(1, max(1, (high - low) // 5))
        return (f"What is the {words(x)} when the {words(n)} is greater than {k}?",
                f"SELECT {x} FROM {table} WHERE {n} > {k}")
    z = anchor[y]
    if kind == "count":
        return (f"How many {words(table)} have a {words(y)} of {z}?",
                f"SELECT COUNT(*) FROM {table} WHERE {y} = {_literal(z)}")
    word, func = ("highest", "MAX") if kind == "max" else ("lowest", "MIN")
    return (f"What is the {word} {words(x)} when the {words(y)} is {z}?",
            f"SELECT {func}({x}) FROM {table} WHERE {y} = {_literal(z)}")


def generate_example(rng: random.Random) -> Example:
    """One example drawn from ``rng``; its gold SQL is executed on its mock rows."""
    table = rng.choice(sorted(TABLES))
    spec = dict(TABLES[table])
    kind = rng.choices(KINDS, weights=WEIGHTS)[0]
    roles, needed = _pick_columns(rng, table, kind)
    size = rng.randint(max(2, len(needed)), 4)
    extra = [c for c in spec if c not in needed]
    columns = needed + rng.sample(extra, size - len(needed))
    rng.shuffle(columns)

    rows = [{c: _value(rng, spec[c]) for c in columns} for _ in range(rng.randint(3, 6))]
    anchor = rng.choice(rows)
    condition = roles.get("y")
    if condition is not None and rng.random() < 0.4:  # let some values repeat (COUNT 2, MAX over 2 rows)
        other = rng.choice(rows)
        other[condition] = anchor[condition]

    question, sql = _question_and_sql(kind, table, roles, anchor, rng)
    context = f"CREATE TABLE {table} (" + ", ".join(f"{c} {sql_type(spec[c])}" for c in columns) + ")"
    tables = {table: rows}
    _check(sql, tables, context, kind)
    meta = {"gold_sql": sql, "tables": tables, "context": context, "question": question, "kind": kind}
    return Example(prompt=sql_prompt(context, question), response=sql, meta=meta)


def _check(sql: str, tables: dict, context: str, kind: str) -> None:
    try:
        result = execute_sql(sql, tables, context)
    except (sqlite3.Error, QueryRefused) as exc:  # a generator bug, never a user error
        raise RuntimeError(f"sql-synth generated a query that does not run: {sql!r} ({exc})") from exc
    if not result or result[0][0] is None or (kind == "count" and result[0][0] < 1):
        raise RuntimeError(f"sql-synth generated a query with an empty result: {sql!r} on {tables!r}")


def generate_examples(n: int, seed: int, exclude: Optional[Iterable[str]] = None) -> List[Example]:
    """``n`` examples with distinct prompts (none in ``exclude``), deterministic for ``seed``."""
    rng = random.Random(seed)
    seen: Set[str] = set(exclude or ())
    out: List[Example] = []
    attempts = 0
    while len(out) < n:
        attempts += 1
        if attempts > 50 * n + 1000:
            raise RuntimeError(f"sql-synth could not find {n} distinct examples")
        example = generate_example(rng)
        if example.prompt in seen:
            continue
        seen.add(example.prompt)
        out.append(example)
    return out


class SQLSynthTask(Task):
    """Seeded synthetic text-to-SQL; ``train`` and ``test`` never share a prompt.

    Train is the first ``n_train`` distinct examples of the seeded stream and test the next
    ``n_test``, so the train split does not depend on ``n_test``.
    """

    name = "sql-synth"
    description = "built-in offline synthetic text-to-SQL with mock tables (train 2,000 / test 200)"
    splits = ("train", "test")
    train_split = "train"
    eval_split = "test"
    protocol = SQLProtocol

    def __init__(self, seed: int = 0, n_train: int = 2000, n_test: int = 200):
        self.seed = check_int("task 'sql-synth': seed", seed)
        self.n_train = check_int("task 'sql-synth': n_train", n_train, 0)
        self.n_test = check_int("task 'sql-synth': n_test", n_test, 0)
        self._cache: Optional[Dict[str, List[Example]]] = None

    def _splits(self) -> Dict[str, List[Example]]:
        if self._cache is None:
            stream = generate_examples(self.n_train + self.n_test, self.seed)
            self._cache = {"train": stream[: self.n_train], "test": stream[self.n_train:]}
        return self._cache

    def _load(self, split: str, limit: Optional[int]) -> List[Example]:
        examples = self._splits()[split]
        chosen = examples if limit is None else examples[:limit]
        # Copies, so callers that edit an example or its meta do not change the cache.
        return [Example(e.prompt, e.response, _copy_meta(e.meta)) for e in chosen]


def _copy_meta(meta: dict) -> dict:
    copied = dict(meta)
    copied["tables"] = {t: [dict(r) for r in rows] for t, rows in meta["tables"].items()}
    return copied
