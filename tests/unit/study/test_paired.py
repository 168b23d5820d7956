"""Paired method differences of a study (``rosa_peft.study.paired``): the estimate, its bootstrap interval over
evaluation examples, which entries are paired, and the section of results.md that shows them."""
import json

import numpy as np
import pytest

from rosa_peft.study.paired import bootstrap_difference, correct_vector, load_vectors, paired_differences
from rosa_peft.study.table import render_json, render_markdown


def test_bootstrap_of_identical_and_opposite_methods():
    ones, zeros = np.ones((3, 50), dtype=bool), np.zeros((3, 50), dtype=bool)
    same = bootstrap_difference(ones, ones)
    assert same["diff"] == 0.0 and same["ci"] == [0.0, 0.0] and same["per_seed"] == [0.0, 0.0, 0.0]
    apart = bootstrap_difference(ones, zeros)
    assert apart["diff"] == 100.0 and apart["ci"] == [100.0, 100.0]


def test_bootstrap_estimate_interval_and_determinism():
    rng = np.random.default_rng(1)
    a = rng.random((3, 400)) < 0.6
    b = rng.random((3, 400)) < 0.5
    stats = bootstrap_difference(a, b)
    expected = 100 * float((a.mean(1) - b.mean(1)).mean())
    assert stats["diff"] == pytest.approx(expected, abs=1e-12)
    assert stats["per_seed"] == pytest.approx(list(100 * (a.mean(1) - b.mean(1))), abs=1e-12)
    lo, hi = stats["ci"]
    assert lo < stats["diff"] < hi
    # the interval's half-width is about 1.96 standard errors of the example-level mean difference
    se = 100 * (a.astype(int) - b.astype(int)).mean(0).std(ddof=1) / np.sqrt(400)
    assert (hi - lo) / 2 == pytest.approx(1.96 * se, rel=0.15)
    assert bootstrap_difference(a, b) == stats  # a fixed generator: the same table every time


def _record(task, entry, method, seed, params):
    return {"cell": f"{task}-{entry}-s{seed}", "task": task, "entry": entry, "method": method, "seed": seed,
            "train": {"trainable_params": params}, "eval": {"report": "eval.json"}}


def test_pairs_rosa_with_lora_and_spa_at_equal_budget_on_common_seeds():
    records = [
        *[_record("sql", "rosa-r6", "rosa", s, 1000) for s in (0, 1, 2)],
        *[_record("sql", "lora-r8", "lora", s, 1010) for s in (0, 1, 2)],
        *[_record("sql", "spa-d0.02", "spa", s, 995) for s in (0, 1)],
        _record("sql", "lora-r8-lr2e-3", "lora", 0, 1010),  # a sweep point: one seed, not paired
        *[_record("sql", "lora-r16", "lora", s, 2000) for s in (0, 1)],  # another budget
        *[_record("sql", "fft", "fft", s, 10**6) for s in (0, 1)],
    ]
    rng = np.random.default_rng(0)
    vectors = {r["cell"]: list(rng.random(30) < 0.5) for r in records}
    paired = paired_differences(records, vectors)
    assert [(p["entry"], p["vs_entry"], p["seeds"]) for p in paired] == [
        ("rosa-r6", "lora-r8", [0, 1, 2]), ("rosa-r6", "spa-d0.02", [0, 1])]
    for p in paired:
        assert p["separated"] == (p["ci"][0] > 0 or p["ci"][1] < 0)
    del vectors["sql-spa-d0.02-s1"]  # a report without per-example records leaves too few seeds
    assert [p["vs_entry"] for p in paired_differences(records, vectors)] == ["lora-r8"]


def test_correct_vector_reads_reports_in_index_order(tmp_path):
    report = tmp_path / "eval.json"
    report.write_text(json.dumps({"examples": [{"index": "1", "correct": "False"}, {"index": "0", "correct": True},
                                               {"index": "2", "correct": "True"}]}))
    assert correct_vector(str(report)) == [True, False, True]
    assert correct_vector(str(tmp_path / "missing.json")) is None
    (tmp_path / "empty.json").write_text("{}")
    assert correct_vector(str(tmp_path / "empty.json")) is None
    rec = _record("sql", "lora-r8", "lora", 0, 1)
    assert load_vectors([rec], [str(tmp_path)]) == {"sql-lora-r8-s0": [True, False, True]}


def test_results_show_the_paired_section_only_when_there_are_pairs():
    def full(rec, acc):
        rec["train"].update(r=2, density=0.0, train_loss=1.0, global_steps=2, train_time_s=1.0, peak_rss_mb=1.0)
        rec["eval"].update(split="test", time_s=1.0, summary={"n": 4, "accuracy": acc, "primary_metric": "exact"})
        rec["cell_json"] = f"cells/{rec['cell']}/cell.json"
        return rec

    records = [full(_record("sql", "rosa-r6", "rosa", s, 100), 0.5) for s in (0, 1)]
    records += [full(_record("sql", "lora-r8", "lora", s, 100), 0.25) for s in (0, 1)]
    vectors = {r["cell"]: ([True, True, False, False] if r["method"] == "rosa" else [True, False, False, False])
               for r in records}
    paired = paired_differences(records, vectors)
    md = render_markdown(records, paired)
    assert "## Paired differences" in md
    assert "| sql | RoSA (rosa-r6) | LoRA (lora-r8) | 0,1 | +25.0 |" in md
    assert json.loads(render_json(records, paired))["paired"][0]["diff"] == 25.0
    assert "## Paired differences" not in render_markdown(records)
    assert "paired" not in json.loads(render_json(records))
