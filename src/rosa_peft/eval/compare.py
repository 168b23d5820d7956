"""``rosa eval --compare RUN_DIR...``: several runs in one markdown table and one accuracy plot.

A run directory (as ``rosa train`` writes it, after ``rosa eval --adapter RUN_DIR``) must hold:

* ``run_config.json`` with at least ``method``, ``r``, ``density``, ``task`` and ``trainable_params``;
* one or more ``eval*.json`` reports from ``rosa eval`` (``format`` ``rosa-eval/1``; the task,
  split and ``summary.accuracy`` are read from each).

The table has the shape of the paper's Table 1: one row per (method, r, density, trainable
parameters), one column per evaluated task/split, cells = accuracy in percent (the mean when
several runs, e.g. seeds, share a cell; ``×k`` gives their number). The plot has the shape of its
Fig. 2: accuracy against trainable parameters (log scale), one line per method, one panel per task.
"""
from __future__ import annotations

import glob
import os
from collections import OrderedDict
from typing import Dict, List, Optional, Sequence

from ..train.methods import label_of
from ..utils.checks import UserError, check_int, is_real
from ..utils.io import read_json_object
from ..utils.plots import finish, pyplot_or_none

RUN_KEYS = ("method", "r", "density", "task", "trainable_params")


def read_run(run_dir: str) -> List[dict]:
    """One row per ``eval*.json`` of ``run_dir``; errors name the directory, file and key."""
    if not os.path.isdir(run_dir):
        raise FileNotFoundError(f"run directory {run_dir} does not exist")
    config_path = os.path.join(run_dir, "run_config.json")
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"run directory {run_dir} has no run_config.json (written by rosa train)")
    config = read_json_object(config_path)
    missing = [k for k in RUN_KEYS if k not in config]
    if missing:
        raise UserError(f"{config_path}: missing key(s) {', '.join(missing)}")
    params = config["trainable_params"]
    check_int(f"{config_path}: key 'trainable_params'", params, minimum=0)
    reports = sorted(glob.glob(os.path.join(run_dir, "eval*.json")))
    if not reports:
        raise FileNotFoundError(f"run directory {run_dir} has no eval*.json (run: rosa eval --adapter {run_dir} ...)")
    rows = []
    for path in reports:
        report = read_json_object(path)
        summary = report.get("summary")
        if report.get("format") != "rosa-eval/1" or not isinstance(summary, dict):
            raise UserError(f"{path}: not a rosa eval report (expected 'format': 'rosa-eval/1' and a 'summary')")
        accuracy = summary.get("accuracy")
        if not is_real(accuracy):
            raise UserError(f"{path}: key 'summary.accuracy' must be a number")
        rows.append({
            "run": os.path.basename(os.path.normpath(run_dir)), "run_dir": run_dir, "report": path,
            "method": str(config["method"]), "r": config["r"], "density": config["density"],
            "trainable_params": params, "train_task": config["task"],
            "task": str(report.get("task", config["task"])), "split": str(report.get("split", "")),
            "n": summary.get("n"), "accuracy": float(accuracy), "metric": summary.get("primary_metric", ""),
        })
    return rows


def collect(run_dirs: Sequence[str]) -> List[dict]:
    """All rows of all runs (every directory is checked before anything is rendered)."""
    if not run_dirs:
        raise UserError("--compare needs at least one run directory")
    rows: List[dict] = []
    for run_dir in run_dirs:
        rows.extend(read_run(run_dir))
    return rows


def _column(row: dict) -> str:
    return f"{row['task']}/{row['split']}" if row["split"] else row["task"]


def _density(value) -> str:
    return f"{100 * value:.2g}%" if isinstance(value, (int, float)) and value else "-"


def markdown_table(rows: Sequence[dict]) -> str:
    """The Table-1-shaped markdown table (accuracy in percent)."""
    columns = list(OrderedDict.fromkeys(_column(r) for r in rows))
    groups: "OrderedDict[tuple, Dict[str, List[float]]]" = OrderedDict()
    for row in sorted(rows, key=lambda r: (r["method"], r["trainable_params"], str(r["r"]), str(r["density"]))):
        key = (row["method"], row["r"], row["density"], row["trainable_params"])
        groups.setdefault(key, {}).setdefault(_column(row), []).append(row["accuracy"])
    header = ["Method", "r", "d", "Trainable params"] + columns
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * 4 + ["---:"] * len(columns)) + "|"]
    for (method, r, density, params), cells in groups.items():
        out = [label_of(method), str(r if r else "-"), _density(density), f"{params:,}"]
        for column in columns:
            values = cells.get(column)
            if not values:
                out.append("-")
            else:
                text = f"{100 * sum(values) / len(values):.1f}"
                out.append(text + (f" (×{len(values)})" if len(values) > 1 else ""))
        lines.append("| " + " | ".join(out) + " |")
    return "\n".join(lines) + "\n"


def plot(rows: Sequence[dict], png_path: str) -> Optional[str]:
    """Accuracy vs trainable parameters; returns the path, or None (with a message) without matplotlib."""
    plt = pyplot_or_none("rosa eval")
    if plt is None:
        return None
    columns = list(OrderedDict.fromkeys(_column(r) for r in rows))
    fig, axes = plt.subplots(1, len(columns), figsize=(4.5 * len(columns), 3.6), squeeze=False)
    for ax, column in zip(axes[0], columns):
        by_method: Dict[str, Dict[int, List[float]]] = OrderedDict()
        for row in rows:
            if _column(row) == column:
                by_method.setdefault(row["method"], {}).setdefault(row["trainable_params"], []).append(row["accuracy"])
        for method, points in sorted(by_method.items()):
            xs = sorted(points)
            ys = [100 * sum(points[x]) / len(points[x]) for x in xs]
            ax.plot([max(x, 1) for x in xs], ys, marker="o", label=label_of(method))
        ax.set_xscale("log")
        ax.set_xlabel("trainable parameters")
        ax.set_ylabel("accuracy (%)")
        ax.set_title(column)
        ax.grid(True, alpha=0.3)
        ax.legend()
    return finish(fig, plt, "accuracy vs trainable parameters", png_path, dpi=120)
