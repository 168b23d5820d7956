"""Paired comparisons of methods in a study: RoSA − LoRA and RoSA − SpA at equal budget, over seeds, with a
bootstrap confidence interval over evaluation examples.

Two entries are compared on the seeds both have (at least :data:`MIN_SEEDS`); every seed evaluated the same
examples, so the difference is paired twice: per seed (the two runs share the seed) and per example. The
estimate is the mean over those seeds of the difference in the primary metric (percentage points); its
interval resamples the evaluation examples with replacement (:data:`N_BOOT` times, the same resample for
every seed and both methods) and takes the 2.5 % and 97.5 % quantiles. It covers the sampling of
evaluation examples, not the seed-to-seed spread, which is reported next to it (the per-seed
differences). A difference is *separated* when its interval excludes 0.

Pure: integer counts and one fixed generator, so the same cells give byte-identical tables.
"""
from __future__ import annotations

import json
import os
from typing import Dict, List, Optional, Sequence

import numpy as np

from .table import in_budget

N_BOOT = 2000
BOOT_SEED = 0
MIN_SEEDS = 2
# (the method compared, the methods it is compared against)
PAIRS = (("rosa", ("lora", "spa")),)


def correct_vector(report_path: str) -> Optional[List[bool]]:
    """Per evaluation example (in ``index`` order), whether it counts as correct under the primary metric;
    None when the report holds no per-example records."""
    try:
        with open(report_path, encoding="utf-8") as fh:
            examples = json.load(fh).get("examples")
    except (OSError, ValueError):
        return None
    if not examples:
        return None
    ordered = sorted(examples, key=lambda e: int(e["index"]))
    return [str(e["correct"]).lower() == "true" for e in ordered]


def load_vectors(records: Sequence[dict], cell_dirs: Sequence[str]) -> Dict[str, List[bool]]:
    """``{cell name: correct vector}`` for the records whose report has per-example records."""
    vectors = {}
    for record, directory in zip(records, cell_dirs):
        vec = correct_vector(os.path.join(directory, record["eval"]["report"]))
        if vec is not None:
            vectors[record["cell"]] = vec
    return vectors


def bootstrap_difference(a: np.ndarray, b: np.ndarray, n_boot: int = N_BOOT, seed: int = BOOT_SEED) -> dict:
    """``a``, ``b``: (seeds, examples) 0/1 arrays of the two methods, seed rows aligned. The mean over seeds
    of the difference in accuracy (percentage points), its bootstrap 95 % interval over examples, and the
    per-seed differences."""
    d = a.astype(np.int64) - b.astype(np.int64)
    seeds, n = d.shape
    per_example = d.sum(0)
    idx = np.random.default_rng(seed).integers(0, n, size=(n_boot, n))
    boot = per_example[idx].sum(1)  # exact integers: the same on every machine
    lo, hi = np.quantile(boot, [0.025, 0.975], method="inverted_cdf")
    scale = 100.0 / (seeds * n)
    return {"diff": float(per_example.sum()) * scale, "ci": [float(lo) * scale, float(hi) * scale],
            "per_seed": [100.0 * float(x) / n for x in d.sum(1)], "n": n, "n_boot": n_boot}


def _same_budget(a: dict, b: dict) -> bool:
    low, high = sorted((a["trainable_params"], b["trainable_params"]))
    return in_budget(high, low)


def paired_differences(records: Sequence[dict], vectors: Dict[str, List[bool]]) -> List[dict]:
    """Every (RoSA entry, LoRA or SpA entry) of one task at the same budget (trainable parameters within
    ``table.BUDGET_TOLERANCE``, as the table groups them) with at least :data:`MIN_SEEDS` common seeds whose
    reports have per-example records of equal length."""
    entries: Dict[tuple, dict] = {}
    for r in records:
        key = (r["task"], r["entry"])
        e = entries.setdefault(key, {"task": r["task"], "entry": r["entry"], "method": r["method"],
                                     "trainable_params": r["train"]["trainable_params"], "cells": {}})
        e["cells"][r["seed"]] = r
    out = []
    for method, others in PAIRS:
        for a in (e for e in entries.values() if e["method"] == method):
            for b in entries.values():
                if b["method"] not in others or b["task"] != a["task"] or not _same_budget(a, b):
                    continue
                seeds = sorted(s for s in set(a["cells"]) & set(b["cells"])
                               if a["cells"][s]["cell"] in vectors and b["cells"][s]["cell"] in vectors)
                if len(seeds) < MIN_SEEDS:
                    continue
                rows_a = [vectors[a["cells"][s]["cell"]] for s in seeds]
                rows_b = [vectors[b["cells"][s]["cell"]] for s in seeds]
                if len({len(v) for v in rows_a + rows_b}) != 1:
                    continue  # evaluated on different examples: not paired
                va, vb = np.array(rows_a), np.array(rows_b)
                stats = bootstrap_difference(va, vb)
                out.append({"task": a["task"], "entry": a["entry"], "method": method, "vs_entry": b["entry"],
                            "vs_method": b["method"], "seeds": seeds, **stats,
                            "separated": stats["ci"][0] > 0 or stats["ci"][1] < 0})
    return out


__all__ = ["BOOT_SEED", "MIN_SEEDS", "N_BOOT", "PAIRS", "bootstrap_difference", "correct_vector", "load_vectors",
           "paired_differences"]
