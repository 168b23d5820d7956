"""Tests of rosa_peft.tasks: loaders, prompt formats, the built-in task and the registry.

Tokenisation and collation are tested in test_tasks_tokenize.py.
"""
from __future__ import annotations

import json
import os
import sqlite3
import sys
from pathlib import Path

import pytest

from rosa_peft.eval import protocols
from rosa_peft.eval.protocols import get_protocol
from rosa_peft.tasks import (TASKS, EvalProtocol, Example, Task, get_task, list_tasks, protocol_class, register_task,
                             task_names)
from rosa_peft.tasks.builtin import SQLSynthTask

_DEFAULT_DATA = Path(__file__).resolve().parents[3].parent / "shared" / "data"
DATA_DIR = Path(os.environ.get("ROSA_PEFT_DATA_DIR") or _DEFAULT_DATA)
needs_data = pytest.mark.skipif(not (DATA_DIR / "gsm8k" / "train.jsonl").is_file(),
                                reason=f"shared data not found at {DATA_DIR}")

VIGGO_INSTRUCTION = (
    "Given a target sentence construct the underlying meaning representation of the input sentence as a "
    "single function with attributes and attribute values. This function should describe the target string "
    "accurately and the function must be one of the following ['inform', 'request', 'give_opinion', "
    "'confirm', 'verify_attribute', 'suggest', 'request_explanation', 'recommend', 'request_attribute']. "
    "The attributes must be one of the following: ['name', 'exp_release_date', 'release_year', 'developer', "
    "'esrb', 'rating', 'genres', 'player_perspective', 'has_multiplayer', 'platforms', 'available_on_steam', "
    "'has_linux_release', 'has_mac_release', 'specifier']"
)


@pytest.fixture(scope="module")
def synth() -> SQLSynthTask:
    return get_task("sql-synth", seed=0, n_train=300, n_test=60)


# ---------------------------------------------------------------- real data (skipped if absent)

@needs_data
@pytest.mark.parametrize("name, counts", [
    ("gsm8k", {"train": 7473, "test": 1319}),
    ("viggo", {"train": 5103, "validation": 714, "test": 1083}),
    ("sql", {"train": 1000, "test": 770, "paper": 1000}),
])
def test_split_counts(name, counts):
    task = get_task(name, data_dir=DATA_DIR)
    assert task.splits == tuple(counts)
    for split, n in counts.items():
        assert len(task.load(split)) == n, (name, split)


@needs_data
def test_default_splits_and_limit():
    gsm = get_task("gsm8k", data_dir=DATA_DIR)
    assert (gsm.train_split, gsm.eval_split) == ("train", "test")
    assert get_task("viggo", data_dir=DATA_DIR).eval_split == "validation"
    assert get_task("sql", data_dir=DATA_DIR).eval_split == "test"
    first = gsm.load(limit=5)
    assert len(first) == 5
    assert [e.prompt for e in first] == [e.prompt for e in gsm.load("train", limit=10)[:5]]
    assert gsm.load("test", limit=0) == []
    with pytest.raises(ValueError, match="limit"):
        gsm.load(limit=-1)


@needs_data
def test_gsm8k_format():
    ex = get_task("gsm8k", data_dir=DATA_DIR).load("train", limit=1)[0]
    assert ex.prompt.startswith("Natalia sold clips to 48 of her friends in April")
    assert ex.prompt.endswith("in April and May?")  # raw question, no template
    assert ex.response == ex.meta["answer"]
    assert "<<48/2=24>>" in ex.response and ex.response.endswith("#### 72")


@needs_data
def test_viggo_exact_prompt():
    ex = get_task("viggo", data_dir=DATA_DIR).load("validation", limit=1)[0]
    target = ("SpellForce 3 is a pretty bad game. The developer Grimlore Games is clearly a bunch of "
              "no-talent hacks, and 2017 was a terrible year for games anyway.")
    expected = VIGGO_INSTRUCTION + "\n\n### Target sentence:\n" + target + "\n\n### Meaning representation:\n"
    assert ex.prompt == expected
    mr = "give_opinion(name[SpellForce 3], release_year[2017], developer[Grimlore Games], rating[poor])"
    assert ex.response == mr and ex.meta["meaning_representation"] == mr


@needs_data
def test_sql_train_prompt_format():
    task = get_task("sql", data_dir=DATA_DIR)
    ex = task.load("train", limit=1)[0]
    assert ex.prompt == (
        "Write a SQL query to answer the question based on the table schema.\n\n"
        " context: CREATE TABLE table_29202276_2 (route_via VARCHAR, train_name VARCHAR)\n\n"
        " question: What is the route/via when the train name is Parasuram Express?\n\n answer: ")
    assert ex.response == "SELECT route_via FROM table_29202276_2 WHERE train_name = 'Parasuram Express'"
    assert ex.meta == {"gold_sql": ex.response, "tables": None,
                       "context": "CREATE TABLE table_29202276_2 (route_via VARCHAR, train_name VARCHAR)",
                       "question": "What is the route/via when the train name is Parasuram Express?"}
    paper = task.load("paper", limit=3)
    assert [e.prompt for e in paper] == [e.prompt for e in task.load("train", limit=3)]


@needs_data
def test_sql_test_split_tables_and_prompt():
    examples = get_task("sql", data_dir=DATA_DIR).load("test")
    ex = examples[0]
    assert ex.prompt == (
        "Write a SQL query to answer the question based on the table schema.\n\n"
        " context: CREATE TABLE table_name_64 (position VARCHAR, first_election VARCHAR)\n\n"
        " question: What is the Position of the person with a First Election of 1988 as Vice Mayor 2009?"
        "\n\n answer: ")
    assert ex.response == ex.meta["gold_sql"] == "select position from table_name_64 where first_election = '1988 as vice mayor 2009'"
    assert list(ex.meta["tables"]) == ["table_name_64"]
    rows = ex.meta["tables"]["table_name_64"]
    assert len(rows) == 10 and rows[0] == {"position": "mayor", "first_election": "1988 as vice mayor 2009"}
    assert ex.meta["idx"] == 31000
    assert all(isinstance(e.meta["tables"], dict) and e.meta["tables"] for e in examples)
    train_prompts = {e.prompt for e in get_task("sql", data_dir=DATA_DIR).load("train")}
    assert not train_prompts & {e.prompt for e in examples}  # test is disjoint from our train split


@needs_data
def test_data_dir_from_env_and_task_folder(monkeypatch):
    monkeypatch.setenv("ROSA_PEFT_DATA_DIR", str(DATA_DIR))
    assert len(get_task("gsm8k").load("test", limit=2)) == 2
    monkeypatch.delenv("ROSA_PEFT_DATA_DIR")
    assert len(get_task("gsm8k", data_dir=DATA_DIR / "gsm8k").load("test", limit=2)) == 2


# ---------------------------------------------------------------- missing / bad data

def test_no_data_dir_error_says_how_to_fix(monkeypatch):
    monkeypatch.delenv("ROSA_PEFT_DATA_DIR", raising=False)
    monkeypatch.setitem(sys.modules, "datasets", None)  # no HF fallback available
    for name in ("gsm8k", "viggo", "sql"):
        with pytest.raises(FileNotFoundError, match="--data-dir.*ROSA_PEFT_DATA_DIR"):
            get_task(name).load("train", limit=1)


def test_missing_file_and_missing_dir(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"gsm8k[/\\]test\.jsonl"):
        get_task("gsm8k", data_dir=tmp_path).load("test")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        get_task("viggo", data_dir=tmp_path / "nope")


def test_unknown_split_lists_splits(tmp_path):
    with pytest.raises(ValueError, match="validation.*available splits: train, test"):
        get_task("gsm8k", data_dir=tmp_path).load("validation")


def _write(path: Path, lines) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_bad_records_name_file_line_and_field(tmp_path):
    _write(tmp_path / "gsm8k" / "train.jsonl",
           [json.dumps({"question": "q", "answer": "a"}), "", json.dumps({"question": "q2"})])
    with pytest.raises(ValueError, match=r"train\.jsonl, line 3: missing field 'answer'"):
        get_task("gsm8k", data_dir=tmp_path).load()
    bad_table = {"context": "CREATE TABLE t (a VARCHAR)", "question": "q", "sql_query": "select a from t",
                 "data_table": "{not json", "idx": 1}
    _write(tmp_path / "sql" / "valid_including_mock_tables.jsonl", [json.dumps(bad_table)])
    with pytest.raises(ValueError, match=r"line 1: field 'data_table' is not valid JSON"):
        get_task("sql", data_dir=tmp_path).load("test")
    msgs = {"messages": [{"role": "user", "content": "no template here"}, {"role": "assistant", "content": "SELECT 1"}]}
    _write(tmp_path / "sql" / "valid.jsonl", [json.dumps(msgs)])
    with pytest.raises(ValueError, match=r"valid\.jsonl, line 1: field 'messages\[0\]\.content'"):
        get_task("sql", data_dir=tmp_path).load("train")


# ---------------------------------------------------------------- jsonl task

def test_jsonl_task_loads_fields_and_meta(tmp_path):
    train = _write(tmp_path / "train.jsonl", [json.dumps({"q": "hi", "a": "there", "id": 7}),
                                              json.dumps({"q": "x", "a": "y", "id": 8})])
    test = _write(tmp_path / "test.jsonl", [json.dumps({"q": "t", "a": "u"})])
    task = get_task("jsonl", path=train, eval_path=test, prompt_field="q", response_field="a")
    assert task.splits == ("train", "test") and task.eval_split == "test"
    assert task.load() == [Example("hi", "there", {"id": 7}), Example("x", "y", {"id": 8})]
    assert task.load("test") == [Example("t", "u", {})]
    # relative paths are looked up under data_dir
    assert len(get_task("jsonl", data_dir=tmp_path, path="train.jsonl", prompt_field="q",
                        response_field="a").load()) == 2


def test_jsonl_errors_name_file_and_line(tmp_path):
    bad = _write(tmp_path / "bad.jsonl", [json.dumps({"prompt": "p", "response": "r"}), "",
                                          '{"prompt": "p", "response": '])
    with pytest.raises(ValueError, match=r"bad\.jsonl, line 3: malformed JSON"):
        get_task("jsonl", path=bad).load()
    assert len(get_task("jsonl", path=bad).load(limit=1)) == 1  # limit stops before the bad line
    missing = _write(tmp_path / "missing.jsonl", [json.dumps({"prompt": "p", "response": "r"}),
                                                  json.dumps({"prompt": "p", "answer": "r"})])
    with pytest.raises(ValueError, match=r"missing\.jsonl, line 2: missing field 'response'"):
        get_task("jsonl", path=missing).load()
    wrong = _write(tmp_path / "wrong.jsonl", [json.dumps({"prompt": 3, "response": "r"})])
    with pytest.raises(ValueError, match=r"wrong\.jsonl, line 1: field 'prompt' must be str"):
        get_task("jsonl", path=wrong).load()
    array = _write(tmp_path / "array.jsonl", ["[1, 2]"])
    with pytest.raises(ValueError, match=r"array\.jsonl, line 1: expected a JSON object"):
        get_task("jsonl", path=array).load()
    with pytest.raises(FileNotFoundError, match="nothere.jsonl"):
        get_task("jsonl", path=tmp_path / "nothere.jsonl")
    with pytest.raises(ValueError, match="needs path="):
        get_task("jsonl")
    with pytest.raises(ValueError, match="no split 'test'"):
        get_task("jsonl", path=bad).load("test")


def test_non_utf8_bytes_name_file_line_and_column(tmp_path):
    good = json.dumps({"prompt": "p", "response": "r"}).encode()
    bad_line = b'{"prompt": "caf\xe9", "response": "r"}'  # Latin-1, not UTF-8
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(good + b"\n" + good + b"\n" + bad_line + b"\n" + good + b"\n")
    with pytest.raises(ValueError, match=r"latin1\.jsonl, line 3: not valid UTF-8 \(byte 0xe9 at column 16\)"):
        get_task("jsonl", path=path).load()
    # the same through a file task, which the CLI reports as one line
    (tmp_path / "gsm8k").mkdir()
    record = json.dumps({"question": "q", "answer": "a #### 1"}).encode()
    (tmp_path / "gsm8k" / "train.jsonl").write_bytes(record + b"\n\xff\xfe\n")
    with pytest.raises(ValueError, match=r"train\.jsonl, line 2: not valid UTF-8 \(byte 0xff at column 1\)"):
        get_task("gsm8k", data_dir=tmp_path).load()


def test_limit_stops_reading_before_a_bad_line(tmp_path):
    good = json.dumps({"prompt": "p", "response": "r"}).encode()
    path = tmp_path / "tail.jsonl"
    # the bad lines sit in the same read-ahead chunk as the records kept
    path.write_bytes(good + b"\n\n" + good + b"\n" + b"\xff not utf-8\n" + b"{broken\n")
    task = get_task("jsonl", path=path)
    assert task.load(limit=2) == [Example("p", "r", {})] * 2
    assert task.load(limit=0) == []
    with pytest.raises(ValueError, match=r"tail\.jsonl, line 4: not valid UTF-8"):
        task.load(limit=3)
    (tmp_path / "gsm8k").mkdir()
    record = json.dumps({"question": "q", "answer": "a #### 1"}).encode()
    (tmp_path / "gsm8k" / "test.jsonl").write_bytes(record + b"\n\xc3(\n")
    assert len(get_task("gsm8k", data_dir=tmp_path).load("test", limit=1)) == 1


def test_utf8_bom_and_crlf_are_accepted(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps({"prompt": "\u00e9", "response": "r"}).encode() + b"\r\n"
                     + json.dumps({"prompt": "x", "response": "y"}, ensure_ascii=False).encode() + b"\r\n")
    assert get_task("jsonl", path=path).load() == [Example("\u00e9", "r", {}), Example("x", "y", {})]


# ---------------------------------------------------------------- built-in sql-synth

def _execute(context: str, tables: dict, sql: str):
    conn = sqlite3.connect(":memory:")
    conn.execute(context)
    for table, rows in tables.items():
        for row in rows:
            cols = ", ".join(row)
            conn.execute(f"INSERT INTO {table} ({cols}) VALUES ({', '.join('?' * len(row))})", list(row.values()))
    out = conn.execute(sql).fetchall()
    conn.close()
    return out


def test_synth_is_default_and_deterministic(synth):
    assert isinstance(get_task(), SQLSynthTask)
    again = get_task("sql-synth", seed=0, n_train=300, n_test=60)
    assert again.load() == synth.load() and again.load("test") == synth.load("test")
    other = get_task("sql-synth", seed=1, n_train=300, n_test=60)
    assert [e.prompt for e in other.load()] != [e.prompt for e in synth.load()]
    # the train split does not depend on the test size; limit takes the first N
    assert get_task("sql-synth", seed=0, n_train=300, n_test=5).load() == synth.load()
    assert synth.load(limit=10) == synth.load()[:10]


def test_synth_default_sizes_and_disjoint_splits():
    task = get_task("sql-synth")
    train, test = task.load("train"), task.load("test")
    assert (len(train), len(test)) == (2000, 200)
    prompts = [e.prompt for e in train + test]
    assert len(set(prompts)) == len(prompts)


def test_synth_format_and_every_gold_sql_executes(synth):
    kinds = set()
    for ex in synth.load("train") + synth.load("test"):
        meta = ex.meta
        assert ex.prompt == ("Write a SQL query to answer the question based on the table schema.\n\n"
                             f" context: {meta['context']}\n\n question: {meta['question']}\n\n answer: ")
        assert ex.response == meta["gold_sql"] and ex.response.startswith("SELECT ")
        assert meta["context"].startswith("CREATE TABLE ")
        n_cols = meta["context"].count(",") + 1
        assert 2 <= n_cols <= 4
        result = _execute(meta["context"], meta["tables"], meta["gold_sql"])
        assert result and result[0][0] is not None, ex
        kinds.add(meta["kind"])
        q = meta["question"]
        assert q.startswith(("What is the ", "How many ")) and q.endswith("?")
    assert kinds == {"select", "select_and", "select_gt", "count", "max", "min"}


def test_synth_meta_is_a_copy(synth):
    ex = synth.load(limit=1)[0]
    table = next(iter(ex.meta["tables"]))
    ex.meta["tables"][table].clear()
    assert synth.load(limit=1)[0].meta["tables"][table]


def test_synth_bad_options():
    with pytest.raises(ValueError, match="n_train"):
        get_task("sql-synth", n_train=-3)
    with pytest.raises(ValueError, match="unknown option.*sizes"):
        get_task("sql-synth", sizes=3)


# ---------------------------------------------------------------- registry

def test_registry_names_and_unknown_task():
    assert list_tasks() == ["gsm8k", "viggo", "sql", "sql-synth", "jsonl"]
    with pytest.raises(ValueError) as info:
        get_task("mnli")
    for name in list_tasks():
        assert name in str(info.value)
    assert isinstance(get_task("SQL_SYNTH", n_train=2, n_test=1), SQLSynthTask)


def test_register_task():
    class Echo(Task):
        name, splits = "echo", ("train", "test")

        def _load(self, split, limit):
            return [Example(f"{split} {i}", str(i), {}) for i in range(4)]

    register_task("echo", Echo)
    try:
        assert get_task("echo").load("test", limit=2) == [Example("test 0", "0", {}), Example("test 1", "1", {})]
    finally:
        TASKS.pop("echo")
    with pytest.raises(ValueError, match="not a subclass"):
        register_task("bad", dict)


def test_each_task_names_its_protocol_once():
    assert task_names(evaluable=True, needs_path=False) == ["gsm8k", "viggo", "sql", "sql-synth"]
    assert task_names(evaluable=True, needs_path=True) == ["jsonl"]
    assert task_names() == list_tasks() == list(TASKS)
    assert protocols.PROTOCOL_TASKS == ("gsm8k", "viggo", "sql", "sql-synth")  # read from the registry
    assert protocols.FILE_PROTOCOL_TASKS == ("jsonl",)
    for name in task_names(evaluable=True):
        assert type(get_protocol(name)) is TASKS[name].protocol is protocol_class(name.upper())
    assert TASKS["sql-synth"].protocol is TASKS["sql"].protocol  # same format, same scoring


def test_a_new_task_and_its_protocol_are_one_registration():
    class EchoProtocol(EvalProtocol):
        @classmethod
        def for_task(cls, task, **_):
            return cls(task, "echo-exact", ("\n",), 4, True)

        def score(self, example, generation):
            return {"prediction": generation, "gold": example.response, "correct": generation == example.response}

    class Echo(Task):
        name, splits, protocol = "echo", ("train", "test"), EchoProtocol

        def _load(self, split, limit):
            return [Example(f"{split} {i}", str(i), {}) for i in range(4)]

    register_task("echo", Echo)
    try:
        assert task_names(evaluable=True, needs_path=False)[-1] == "echo" and "echo" in protocols.PROTOCOL_TASKS
        proto = get_protocol("Echo", max_new_tokens=2, stop=["."])
        assert isinstance(proto, EchoProtocol) and (proto.task, proto.max_new_tokens, proto.stop) == ("echo", 2, (".",))
        example = get_task("echo").load("test", limit=1)[0]
        assert proto.summarize([proto.score(example, "0")])["accuracy"] == 1.0
    finally:
        TASKS.pop("echo")
    assert "echo" not in task_names()
    with pytest.raises(ValueError, match="task 'echo' has no evaluation protocol"):
        get_protocol("echo")

    class NoProtocol(Task):
        name, splits, protocol = "bad", ("train",), dict

    with pytest.raises(ValueError, match="not a subclass of rosa_peft.tasks.EvalProtocol"):
        register_task("bad", NoProtocol)
