"""study/table.py: records -> results.json / results.md, as pure functions of the records."""
import json
import math

from rosa_peft.study import table


def _record(cell, task="sql", entry="lora-r8", method="lora", seed=0, r=8, density=0.0, params=1000,
            accuracy=0.5, execution=0.5, loss=1.0, masks=None):
    rec = {"cell": cell, "cell_json": f"cells/{cell}/cell.json", "task": task, "entry": entry, "method": method,
           "seed": seed, "budget": None,
           "train": {"r": r, "density": density, "trainable_params": params, "train_examples": 8,
                     "train_loss": loss, "global_steps": 2, "train_time_s": 3.0, "peak_rss_mb": 100.0},
           "eval": {"split": "test", "time_s": 1.0,
                    "summary": {"n": 4, "accuracy": accuracy, "primary_metric": "execution",
                                "exact_nocase": accuracy, "execution": execution}}}
    if masks is not None:
        rec["masks"] = masks
    return rec


def test_mean_sd_is_the_sample_standard_deviation():
    stat = table.mean_sd([1.0, 2.0, 3.0])
    assert stat == {"mean": 2.0, "sd": 1.0, "n": 3}
    assert table.mean_sd([5.0]) == {"mean": 5.0, "sd": 0.0, "n": 1}


def test_aggregate_groups_seeds_of_one_entry_in_grid_order():
    records = [_record("sql-lora-r8-s0", seed=0, accuracy=0.5, execution=0.25),
               _record("sql-spa-d0.01-s0", entry="spa-d0.01", method="spa", r=0, density=0.01),
               _record("sql-lora-r8-s1", seed=1, accuracy=0.7, execution=0.75)]
    rows = table.aggregate(records)
    assert [row["entry"] for row in rows] == ["lora-r8", "spa-d0.01"]
    lora = rows[0]
    assert lora["seeds"] == [0, 1]
    assert math.isclose(lora["accuracy"]["mean"], 60.0) and lora["accuracy"]["n"] == 2
    assert math.isclose(lora["execution"]["sd"], math.sqrt(2 * 25.0 ** 2))
    assert lora["slot_f1"] is None  # not a SQL metric: absent, not zero


def test_budget_order_lora_then_rosa_by_falling_rank_then_spa_and_fft_last():
    rows = [{"method": m, "trainable_params": p, "r": r} for m, p, r in
            (("fft", 10 ** 9, 0), ("spa", 2000, 0), ("rosa", 2010, 2), ("rosa", 2005, 6), ("lora", 2000, 8),
             ("lora", 1000, 4))]
    ordered = [(row["method"], row["r"]) for row in table.budget_order(rows)]
    assert ordered == [("lora", 4), ("lora", 8), ("rosa", 6), ("rosa", 2), ("spa", 0), ("fft", 0)]
    assert table.budget_groups([1000, 2000, 2030, 2050]) == [1000, 2000, 2050]
    assert table.in_budget(2030, 2000) and not table.in_budget(2050, 2000)


def test_render_is_deterministic_and_reads_every_number_from_the_records():
    masks = {"file": "mask_structure.json", "overall": {"density": 0.01, "empty_rows": 0.2,
                                                        "random_empty_rows": 0.3, "empty_cols": 0.1,
                                                        "random_empty_cols": 0.4}}
    records = [_record("sql-lora-r8-s0", execution=0.25),
               _record("sql-rosa-r4-d0.01-s0", entry="rosa-r4-d0.01", method="rosa", r=4, density=0.01,
                       execution=0.625, masks=masks)]
    md = table.render_markdown(records)
    assert md == table.render_markdown(list(records))
    assert "## sql (test, n = 4)" in md
    assert "| RoSA (rosa-r4-d0.01) | 4 | 1% | 1,000 | 0 | 50.0 | 62.5 |" in md
    assert "| LoRA (lora-r8) | 8 | - | 1,000 | 0 | 50.0 | 25.0 |" in md
    assert "| sql-rosa-r4-d0.01-s0 | 1.00 | 20.00 | 30.00 | 10.00 | 40.00 |" in md
    doc = json.loads(table.render_json(records))
    assert doc["format"] == table.RESULTS_FORMAT
    assert [c["cell"] for c in doc["cells"]] == ["sql-lora-r8-s0", "sql-rosa-r4-d0.01-s0"]
    assert doc["cells"][1]["eval"]["execution"] == 0.625
