"""Paired method differences of a study (``rosa_peft.study.paired``): the estimate, its bootstrap interval over
evaluation examples, which entries are paired, and the section of results.md that shows them."""
import json

import numpy as np
import pytest

from rosa_peft.study.paired import UNIT, bootstrap_difference, example_vectors, load_vectors, paired_differences
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
    vectors = {r["cell"]: {"correct": list(UNIT * (rng.random(30) < 0.5))} for r in records}
    paired = paired_differences(records, vectors)
    assert [(p["entry"], p["vs_entry"], p["seeds"], p["metric"]) for p in paired] == [
        ("rosa-r6", "lora-r8", [0, 1, 2], "accuracy"), ("rosa-r6", "spa-d0.02", [0, 1], "accuracy")]
    for p in paired:
        assert p["separated"] == (p["ci"][0] > 0 or p["ci"][1] < 0)
    del vectors["sql-spa-d0.02-s1"]  # a report without per-example records leaves too few seeds
    assert [p["vs_entry"] for p in paired_differences(records, vectors)] == ["lora-r8"]


def test_example_vectors_read_reports_in_index_order(tmp_path):
    report = tmp_path / "eval.json"
    report.write_text(json.dumps({"examples": [
        {"index": "1", "correct": "False", "slot_f1": 0.5, "execution": None},
        {"index": "0", "correct": True, "slot_f1": 1.0, "execution": True},
        {"index": "2", "correct": "True", "slot_f1": 0.25, "execution": False}]}))
    got = example_vectors(str(report), ["correct", "slot_f1", "execution", "missing"])
    # a field some record lacks (or holds as None) is not compared
    assert got == {"correct": [UNIT, 0, UNIT], "slot_f1": [UNIT, UNIT // 2, UNIT // 4]}
    assert example_vectors(str(tmp_path / "missing.json"), ["correct"]) is None
    (tmp_path / "empty.json").write_text("{}")
    assert example_vectors(str(tmp_path / "empty.json"), ["correct"]) is None
    viggo = _record("viggo", "lora-r8", "lora", 0, 1)  # ViGGO compares slot F1 too
    assert load_vectors([viggo], [str(tmp_path)]) == {"viggo-lora-r8-s0": {"correct": [UNIT, 0, UNIT],
                                                                           "slot_f1": [UNIT, UNIT // 2, UNIT // 4]}}


def test_graded_metric_difference_in_percentage_points():
    a = np.array([[UNIT, UNIT // 2, 0, UNIT // 4]] * 2)
    b = np.array([[UNIT // 2, UNIT // 2, 0, 0]] * 2)
    stats = bootstrap_difference(a, b, unit=UNIT)
    assert stats["diff"] == pytest.approx(100 * (0.5 + 0.25) / 4) and stats["per_seed"] == [18.75, 18.75]
    assert 0 <= stats["ci"][0] <= stats["diff"] <= stats["ci"][1] <= 100 * 0.75 / 4 * 2


def test_viggo_pairs_compare_exact_match_and_slot_f1():
    records = [_record("viggo", e, m, s, 100) for e, m in (("rosa-r6", "rosa"), ("lora-r8", "lora")) for s in (0, 1)]
    rng = np.random.default_rng(3)
    vectors = {r["cell"]: {"correct": [0] * 20, "slot_f1": list((rng.random(20) * UNIT).astype(int))} for r in records}
    paired = paired_differences(records, vectors)
    assert [p["metric"] for p in paired] == ["accuracy", "slot_f1"]
    assert paired[0]["diff"] == 0 and not paired[0]["separated"]


def test_results_show_the_paired_section_only_when_there_are_pairs():
    def full(rec, acc):
        rec["train"].update(r=2, density=0.0, train_loss=1.0, global_steps=2, train_time_s=1.0, peak_rss_mb=1.0)
        rec["eval"].update(split="test", time_s=1.0, summary={"n": 4, "accuracy": acc, "primary_metric": "exact"})
        rec["cell_json"] = f"cells/{rec['cell']}/cell.json"
        return rec

    records = [full(_record("sql", "rosa-r6", "rosa", s, 100), 0.5) for s in (0, 1)]
    records += [full(_record("sql", "lora-r8", "lora", s, 100), 0.25) for s in (0, 1)]
    vectors = {r["cell"]: {"correct": ([UNIT, UNIT, 0, 0] if r["method"] == "rosa" else [UNIT, 0, 0, 0])}
               for r in records}
    paired = paired_differences(records, vectors)
    md = render_markdown(records, paired)
    assert "## Paired differences" in md
    assert "| sql | Execution acc. | RoSA (rosa-r6) | LoRA (lora-r8) | 0,1 | +25.0 |" not in md
    assert "| sql | exact | RoSA (rosa-r6) | LoRA (lora-r8) | 0,1 | +25.0 |" in md  # primary "exact": no column
    assert json.loads(render_json(records, paired))["paired"][0]["diff"] == 25.0
    assert "## Paired differences" not in render_markdown(records)
    assert "paired" not in json.loads(render_json(records))
