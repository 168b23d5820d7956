"""Render cell records (the ``cell.json`` files) into ``results.json`` and ``results.md``.

Pure functions of the records: no clock, no environment, so the same cells give byte-identical files.
Seeds are aggregated as mean ± sample standard deviation (± is omitted for a single seed).
"""
from __future__ import annotations

import json
import math
from collections import OrderedDict
from typing import Dict, Iterable, List, Optional, Sequence

from ..tasks import TASKS, Task
from ..train.methods import METHODS, label_of

RESULTS_FORMAT = "rosa-study/1"
# (column title, how to read the value from a record, format)
NUMERIC = (
    ("accuracy", lambda r: 100.0 * r["eval"]["summary"]["accuracy"], "{:.1f}"),
    ("exact", lambda r: 100.0 * r["eval"]["summary"]["exact"], "{:.1f}"),
    ("exact_nocase", lambda r: 100.0 * r["eval"]["summary"]["exact_nocase"], "{:.1f}"),
    ("slot_f1", lambda r: 100.0 * r["eval"]["summary"]["slot_f1"], "{:.1f}"),
    ("execution", lambda r: 100.0 * r["eval"]["summary"]["execution"], "{:.1f}"),
    ("train_loss", lambda r: r["train"]["train_loss"], "{:.4f}"),
    ("train_time_s", lambda r: r["train"]["train_time_s"], "{:.1f}"),
    ("peak_rss_mb", lambda r: r["train"]["peak_rss_mb"], "{:.0f}"),
)


def _group_key(record: dict) -> tuple:
    return (record["task"], record["entry"], record["method"], record["train"]["r"], record["train"]["density"],
            record["train"]["trainable_params"])


def mean_sd(values: Sequence[float]) -> Dict[str, float]:
    n = len(values)
    mean = sum(values) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return {"mean": mean, "sd": sd, "n": n}


def _value(getter, record):
    try:
        v = getter(record)
    except (KeyError, TypeError):
        return None
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def aggregate(records: Sequence[dict]) -> List[dict]:
    """One row per (task, method entry), in grid order, with mean/sd over its seeds."""
    groups: "OrderedDict[tuple, List[dict]]" = OrderedDict()
    for record in records:
        groups.setdefault(_group_key(record), []).append(record)
    rows = []
    for (task, label, method, r, density, params), members in groups.items():
        row = {"task": task, "entry": label, "method": method, "r": r, "density": density,
               "trainable_params": params, "seeds": [m["seed"] for m in members],
               "cells": [m["cell_json"] for m in members], "split": members[0]["eval"]["split"],
               "metric": members[0]["eval"]["summary"].get("primary_metric")}
        for key, getter, _ in NUMERIC:
            values = [v for v in (_value(getter, m) for m in members) if v is not None]
            row[key] = mean_sd(values) if values else None
        rows.append(row)
    return rows


def render_json(records: Sequence[dict], paired: Sequence[dict] = ()) -> str:
    cells = []
    for r in records:
        cells.append({"cell": r["cell"], "cell_json": r["cell_json"], "task": r["task"], "entry": r["entry"],
                      "method": r["method"],
                      "seed": r["seed"], "budget": r.get("budget"), **r["train"],
                      "split": r["eval"]["split"], "eval": r["eval"]["summary"], "eval_time_s": r["eval"]["time_s"]})
    doc = {"format": RESULTS_FORMAT, "cells": cells, "aggregate": aggregate(records)}
    if paired:
        doc["paired"] = list(paired)
    return json.dumps(doc, indent=2, sort_keys=False, allow_nan=False) + "\n"


def _density(d) -> str:
    return f"{100 * d:.3g}%" if isinstance(d, (int, float)) and d else "-"


def _stat(stat, fmt: str) -> str:
    if stat is None:
        return "-"
    text = fmt.format(stat["mean"])
    return text + (f" ± {fmt.format(stat['sd'])}" if stat["n"] > 1 else "")


def _line(cells) -> str:
    return "| " + " | ".join(cells) + " |"


# per task, the metric columns of the table: (title, aggregate key); "accuracy" is the protocol's primary metric
DEFAULT_COLUMNS = Task.table_columns


def task_columns(task: str) -> tuple:
    """The metric columns of ``task``'s table, ``(title, aggregate key)``: what its Task class declares
    (``table_columns``; "accuracy" is the protocol's primary metric)."""
    cls = TASKS.get(task)
    return cls.table_columns if cls is not None else DEFAULT_COLUMNS

_FMT = {key: fmt for key, _, fmt in NUMERIC}


BUDGET_TOLERANCE = 0.02  # trainable-parameter counts this close (relative) are one budget


def budget_groups(params: Iterable[int]) -> List[int]:
    """The smallest count of each budget: ``params`` sorted, merged when within ``BUDGET_TOLERANCE``."""
    groups: List[int] = []
    for p in sorted(params):
        if not groups or p > groups[-1] * (1 + BUDGET_TOLERANCE):
            groups.append(p)
    return groups


def in_budget(params: int, low: int) -> bool:
    """Whether ``params`` belongs to the budget whose smallest count is ``low``."""
    return low <= params <= low * (1 + BUDGET_TOLERANCE)


def has_budget(method: str) -> bool:
    """Whether a row of ``method`` belongs to a budget (FFT trains the whole model: it has none)."""
    return method not in METHODS or METHODS[method].wraps_adapter


def budget_order(rows: Sequence[dict]) -> List[dict]:
    """Rows grouped by budget (:func:`budget_groups`, smallest first), inside a budget in ``table_order``
    (LoRA, then RoSA by falling rank, then SpA); FFT last. The order of a paper-style table."""
    groups = budget_groups(r["trainable_params"] for r in rows if has_budget(r["method"]))

    def key(row):
        if not has_budget(row["method"]) or not groups:
            return (len(groups), 0, 0)
        group = max(i for i, low in enumerate(groups) if row["trainable_params"] >= low)
        order = METHODS[row["method"]].table_order if row["method"] in METHODS else len(METHODS)
        return (group, order, -(row["r"] or 0))

    return sorted(rows, key=key)


def _metric_title(task: str, metric: str, primary: Optional[str]) -> str:
    """The table title of a compared metric, without its unit: "accuracy" (the primary metric) under the
    title of the column that shows the primary metric (SQL: execution), else under its name."""
    titles = {key: title for title, key in task_columns(task)}
    key = primary if metric == "accuracy" and metric not in titles and primary else metric
    return titles.get(key, key).replace(" (%)", "")


def _paired_lines(paired: Sequence[dict], primary: Dict[str, str]) -> List[str]:
    """The paired-differences section (``study.paired``): one line per compared pair of entries and metric."""
    out = ["", "## Paired differences", "",
           "Mean over the common seeds of the difference in each compared metric (percentage points; the "
           "task's primary metric first), a 95 % bootstrap interval over the evaluation examples (the same "
           "resample for every seed and both methods), and each seed's difference. Separated: the interval "
           "excludes 0.", "",
           _line(["Task", "Metric", "Method", "vs", "Seeds", "Difference (pp)", "95% CI (pp)", "Per seed (pp)",
                  "Separated"]),
           "|---|---|---|---|---|---:|---:|---:|---|"]
    for p in paired:
        out.append(_line([
            p["task"], _metric_title(p["task"], p.get("metric", "accuracy"), primary.get(p["task"])),
            f"{label_of(p['method'])} ({p['entry']})", f"{label_of(p['vs_method'])} ({p['vs_entry']})",
            ",".join(map(str, p["seeds"])), f"{p['diff']:+.1f}", f"[{p['ci'][0]:+.1f}, {p['ci'][1]:+.1f}]",
            " / ".join(f"{d:+.1f}" for d in p["per_seed"]), "yes" if p["separated"] else "no"]))
    return out


def render_markdown(records: Sequence[dict], paired: Sequence[dict] = ()) -> str:
    rows = aggregate(records)
    out = ["# Study results", "",
           f"{len(records)} cells; mean ± sample sd over seeds. Every number comes from a `cells/*/cell.json`."]
    for task in OrderedDict.fromkeys(row["task"] for row in rows):
        task_rows = budget_order([row for row in rows if row["task"] == task])
        columns = task_columns(task)
        n = sorted({m["eval"]["summary"].get("n") for m in records if m["task"] == task}, key=str)
        titles = ["Method", "r", "d", "Trainable params", "Seeds", *[t for t, _ in columns], "Train loss",
                  "Train time (s)", "Peak RSS (MB)"]
        out += ["", f"## {task} ({task_rows[0]['split']}, n = {', '.join(map(str, n))})", "",
                _line(titles), "|" + "|".join(["---"] * 5 + ["---:"] * (len(columns) + 3)) + "|"]
        for row in task_rows:
            out.append(_line([
                f"{label_of(row['method'])} ({row['entry']})",
                str(row["r"] or "-"), _density(row["density"]), f"{row['trainable_params']:,}",
                ",".join(map(str, row["seeds"])),
                *[_stat(row[key], _FMT[key]) for _, key in columns],
                *[_stat(row[key], _FMT[key]) for key in ("train_loss", "train_time_s", "peak_rss_mb")]]))
    if paired:
        primary = {r["task"]: r["eval"]["summary"].get("primary_metric") for r in records}
        out += _paired_lines(paired, primary)
    out += ["", "## Cells", "", _line(["Cell", "Seed", "Accuracy (%)", "n", "Train loss", "Steps", "Train time (s)",
                                      "Eval time (s)", "Peak RSS (MB)", "Record"]),
            "|" + "|".join(["---"] * 2 + ["---:"] * 7 + ["---"]) + "|"]
    for r in records:
        t, s = r["train"], r["eval"]["summary"]
        out.append(_line([r["cell"], str(r["seed"]), f"{100 * s['accuracy']:.1f}", str(s.get("n")),
                          f"{t['train_loss']:.4f}", str(t["global_steps"]), f"{t['train_time_s']:.1f}",
                          f"{r['eval']['time_s']:.1f}", f"{t['peak_rss_mb']:.0f}", f"`{r['cell_json']}`"]))
    sparse = [r for r in records if r.get("masks")]
    if sparse:
        out += ["", "## Mask structure", "",
                "Mean over the adapted weights of the fraction of rows / columns with no kept entry, next to the "
                "expectation for a uniformly random mask of the same density, (1 - d)^n.", "",
                _line(["Cell", "Density (%)", "Empty rows (%)", "Random (%)", "Empty columns (%)", "Random (%)"]),
                "|---|" + "---:|" * 5]
        for r in sparse:
            o = r["masks"]["overall"]
            out.append(_line([r["cell"], *[f"{100 * o[k]:.2f}" for k in (
                "density", "empty_rows", "random_empty_rows", "empty_cols", "random_empty_cols")]]))
    return "\n".join(out) + "\n"
