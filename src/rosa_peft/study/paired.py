"""Paired comparisons of methods in a study: RoSA − LoRA and RoSA − SpA at equal budget, over seeds, with a
bootstrap confidence interval over evaluation examples.

Two entries are compared on the seeds both have (at least :data:`MIN_SEEDS`); every seed evaluated the same
examples, so the difference is paired twice: per seed (the two runs share the seed) and per example. Each
metric of the task's ``paired_fields`` is compared (the primary metric first; e.g. ViGGO's slot F1 too). The
estimate is the mean over those seeds of the difference in the metric (percentage points); its
interval resamples the evaluation examples with replacement (:data:`N_BOOT` times, the same resample for
every seed and both methods) and takes the 2.5 % and 97.5 % quantiles. It covers the sampling of
evaluation examples, not the seed-to-seed spread, which is reported next to it (the per-seed
differences). A difference is *separated* when its interval excludes 0.

Pure: integer arithmetic (per-example values in units of :data:`UNIT`, 0/1 metrics exactly) and one fixed
generator, so the same cells give byte-identical tables.
"""
from __future__ import annotations

import json
import os
from typing import Dict, List, Optional, Sequence

import numpy as np

from ..tasks import TASKS, Task
from .table import in_budget

N_BOOT = 2000
BOOT_SEED = 0
MIN_SEEDS = 2
# (the method compared, the methods it is compared against)
PAIRS = (("rosa", ("lora", "spa")),)
UNIT = 10 ** 6  # a per-example value v in [0, 1] is compared as the integer round(v * UNIT)


def paired_fields(task: str) -> tuple:
    """``(summary key, per-example field)`` of the metrics compared for ``task`` (its Task class's)."""
    cls = TASKS.get(task)
    return cls.paired_fields if cls is not None else Task.paired_fields


def _as_units(value) -> Optional[int]:
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return UNIT if value.lower() == "true" else 0
    if isinstance(value, bool):
        return UNIT if value else 0
    if isinstance(value, (int, float)) and 0 <= value <= 1:
        return int(round(value * UNIT))
    return None


def example_vectors(report_path: str, fields: Sequence[str]) -> Optional[Dict[str, List[int]]]:
    """``{field: per-example values in UNIT}`` (in ``index`` order) of the report's per-example records, for
    the fields every record holds as a boolean or a number in [0, 1]; None without per-example records."""
    try:
        with open(report_path, encoding="utf-8") as fh:
            examples = json.load(fh).get("examples")
    except (OSError, ValueError):
        return None
    if not examples:
        return None
    ordered = sorted(examples, key=lambda e: int(e["index"]))
    out = {}
    for field in fields:
        values = [_as_units(e.get(field)) for e in ordered]
        if all(v is not None for v in values):
            out[field] = values
    return out


def load_vectors(records: Sequence[dict], cell_dirs: Sequence[str]) -> Dict[str, Dict[str, List[int]]]:
    """``{cell name: {field: vector}}`` for the records whose report has per-example records."""
    vectors = {}
    for record, directory in zip(records, cell_dirs):
        fields = [f for _, f in paired_fields(record["task"])]
        vec = example_vectors(os.path.join(directory, record["eval"]["report"]), fields)
        if vec is not None:
            vectors[record["cell"]] = vec
    return vectors


def bootstrap_difference(a: np.ndarray, b: np.ndarray, n_boot: int = N_BOOT, seed: int = BOOT_SEED,
                         unit: int = 1) -> dict:
    """``a``, ``b``: (seeds, examples) integer arrays of the two methods' per-example values in ``unit``s
    (0/1 with the default unit 1), seed rows aligned. The mean over seeds of the difference (percentage
    points), its bootstrap 95 % interval over examples, and the per-seed differences."""
    d = a.astype(np.int64) - b.astype(np.int64)
    seeds, n = d.shape
    per_example = d.sum(0)
    idx = np.random.default_rng(seed).integers(0, n, size=(n_boot, n))
    boot = per_example[idx].sum(1)  # exact integers: the same on every machine
    lo, hi = np.quantile(boot, [0.025, 0.975], method="inverted_cdf")
    scale = 100.0 / (seeds * n * unit)
    return {"diff": float(per_example.sum()) * scale, "ci": [float(lo) * scale, float(hi) * scale],
            "per_seed": [100.0 * float(x) / (n * unit) for x in d.sum(1)], "n": n, "n_boot": n_boot}


def _same_budget(a: dict, b: dict) -> bool:
    low, high = sorted((a["trainable_params"], b["trainable_params"]))
    return in_budget(high, low)


def paired_differences(records: Sequence[dict], vectors: Dict[str, Dict[str, List[int]]]) -> List[dict]:
    """Every (RoSA entry, LoRA or SpA entry) of one task at the same budget (trainable parameters within
    ``table.BUDGET_TOLERANCE``, as the table groups them), per metric of the task's ``paired_fields``, over
    the seeds (at least :data:`MIN_SEEDS`) whose reports hold that metric per example with equal lengths."""
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
                for metric, field in paired_fields(a["task"]):
                    def vector(entry, s):
                        return vectors.get(entry["cells"][s]["cell"], {}).get(field)

                    seeds = sorted(s for s in set(a["cells"]) & set(b["cells"])
                                   if vector(a, s) is not None and vector(b, s) is not None)
                    if len(seeds) < MIN_SEEDS:
                        continue
                    rows_a = [vector(a, s) for s in seeds]
                    rows_b = [vector(b, s) for s in seeds]
                    if len({len(v) for v in rows_a + rows_b}) != 1:
                        continue  # evaluated on different examples: not paired
                    stats = bootstrap_difference(np.array(rows_a), np.array(rows_b), unit=UNIT)
                    out.append({"task": a["task"], "metric": metric, "entry": a["entry"], "method": method,
                                "vs_entry": b["entry"], "vs_method": b["method"], "seeds": seeds, **stats,
                                "separated": stats["ci"][0] > 0 or stats["ci"][1] < 0})
    return out


__all__ = ["BOOT_SEED", "MIN_SEEDS", "N_BOOT", "PAIRS", "UNIT", "bootstrap_difference", "example_vectors",
           "load_vectors", "paired_differences", "paired_fields"]
