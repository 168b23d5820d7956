"""The study's figures, drawn only from files the cells wrote (``cell.json``, ``metrics.jsonl``,
``mask_structure.json``), so that ``rosa study`` over finished cells redraws them without training.

* ``results.png`` — each task metric of the table vs trainable parameters, one panel per (task, metric),
  one line per method and per RoSA mix, seed spread as error bars (the paper's Fig. 2 shape);
* ``loss.png`` — training loss per step of every entry's first seed (after RoSA's restart), one panel
  per budget;
* ``masks.png`` — empty-row/column fractions of every sparse entry against a uniformly random mask of
  the same density, and max-pooled heatmaps of the densest RoSA mask (the paper's Figs. 4-5 observation).
"""
from __future__ import annotations

import json
import os
from collections import OrderedDict
from fractions import Fraction
from typing import Dict, List, Optional, Sequence

import numpy as np

from ..train.methods import METHODS, label_of
from ..utils.io import read_jsonl
from ..utils.plots import finish, pyplot_or_none
from .table import BUDGET_TOLERANCE, NUMERIC, budget_groups, has_budget, in_budget, mean_sd, task_columns


def _pyplot():
    return pyplot_or_none("rosa study")


def _is(method: str, kind: str) -> bool:
    """Whether ``method`` is ``mixed`` / ``rank_only`` (see :class:`Method`); False for an unknown name."""
    return method in METHODS and getattr(METHODS[method], kind)


def series_label(record: dict) -> str:
    """RoSA entries are told apart by the low-rank share of their budget; other methods by name."""
    label = label_of(record["method"])
    if _is(record["method"], "mixed"):
        r, d = record["train"]["r"], record["train"]["density"]
        return f"{label} r{r} d{100 * d:.2g}%"
    return label


def rosa_mix(record: dict, records: Sequence[dict]) -> Optional[str]:
    """A RoSA cell's share of its budget in the low-rank part ("3/4"), found from the LoRA cell of the same
    task with (within ``BUDGET_TOLERANCE``) the same trainable parameters; None when there is none."""
    params = record["train"]["trainable_params"]
    for other in records:
        if (other["task"] == record["task"] and _is(other["method"], "rank_only") and other["train"]["r"]
                and abs(other["train"]["trainable_params"] - params) <= BUDGET_TOLERANCE * params):
            return str(Fraction(record["train"]["r"], other["train"]["r"]).limit_denominator(16))
    return None


def metric_panels(records: Sequence[dict]) -> List[tuple]:
    """(task, column title, getter) per panel: the task's table metrics (``table.task_columns``)."""
    getters = {key: getter for key, getter, _ in NUMERIC}
    panels = []
    for task in OrderedDict.fromkeys(r["task"] for r in records):
        for title, key in task_columns(task):
            panels.append((task, title, getters[key]))
    return panels


def plot_accuracy(records: Sequence[dict], path: str) -> Optional[str]:
    """Each task metric vs trainable parameters: LoRA / SpA as lines, RoSA one line per mix, FFT a dashed
    level; error bars are the seed spread. Cells without the metric are left out of its panel."""
    plt = _pyplot()
    if plt is None:
        return None
    panels = metric_panels(records)
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.2), squeeze=False)
    for ax, (task, title, getter) in zip(axes[0], panels):
        points: Dict[tuple, List[float]] = OrderedDict()
        for r in records:
            if r["task"] != task:
                continue
            try:
                value = float(getter(r))
            except (KeyError, TypeError):
                continue
            key = (r["method"], r["entry"], r["train"]["trainable_params"], series_label(r))
            points.setdefault(key, []).append(value)
        lines: Dict[str, list] = OrderedDict()
        for (method, entry, params, label), values in points.items():
            stat = mean_sd(values)
            mean, sd = stat["mean"], stat["sd"]
            if not has_budget(method):  # full fine-tuning: one level, no budget
                ax.axhline(mean, color="black", linestyle="--", linewidth=1,
                           label=f"{label_of(method)} ({params / 1e6:.0f}M params)" + (f", ±{sd:.1f}" if len(values) > 1 else ""))
                continue
            series = label_of(method)
            if _is(method, "mixed"):
                rec = next(r for r in records if r["task"] == task and r["entry"] == entry)
                mix = rosa_mix(rec, records)
                series = f"{series}, {mix} of the budget low-rank" if mix else label
            lines.setdefault(series, []).append((params, mean, sd, method))
        for series, pts in lines.items():
            pts.sort()
            xs, ys, es = [p[0] for p in pts], [p[1] for p in pts], [p[2] for p in pts]
            marker = METHODS[pts[0][3]].marker if pts[0][3] in METHODS else "o"
            ax.errorbar(xs, ys, yerr=es, marker=marker, capsize=3, label=series,
                        linestyle="-" if len(pts) > 1 else "none")
        ax.set_xscale("log")
        ax.set_xlabel("trainable parameters")
        ax.set_ylabel(title)
        ax.set_title(f"{task}: {title}")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    return finish(fig, plt, "task metrics vs trainable parameters (mean ± sd over seeds)", path)


def read_losses(metrics_path: str) -> List[tuple]:
    """(step, loss) of the ``train`` phase's per-step logs in a ``metrics.jsonl``."""
    return [(rec["step"], rec["loss"]) for rec in read_jsonl(metrics_path)
            if rec.get("event") == "log" and rec.get("phase") == "train" and "loss" in rec and "step" in rec]


def plot_losses(records: Sequence[dict], cell_dirs: Sequence[str], path: str) -> Optional[str]:
    """Training loss per optimizer step of every entry's first seed: one row per task, one panel per budget
    (entries within 2% of the same trainable parameters), FFT drawn in every panel."""
    plt = _pyplot()
    if plt is None:
        return None
    tasks = list(OrderedDict.fromkeys(r["task"] for r in records))
    budgets = {t: budget_groups(r["train"]["trainable_params"] for r in records
                                if r["task"] == t and has_budget(r["method"])) or [0] for t in tasks}
    ncols = max(len(b) for b in budgets.values())
    fig, axes = plt.subplots(len(tasks), ncols, figsize=(5.0 * ncols, 3.8 * len(tasks)), squeeze=False)
    for row, task in enumerate(tasks):
        for col in range(ncols):
            ax = axes[row][col]
            if col >= len(budgets[task]):
                ax.axis("off")
                continue
            low = budgets[task][col]
            seen = set()
            for r, d in zip(records, cell_dirs):
                params = r["train"]["trainable_params"]
                inside = not has_budget(r["method"]) or in_budget(params, low)
                if r["task"] != task or r["entry"] in seen or not inside:
                    continue
                seen.add(r["entry"])
                metrics = os.path.join(d, "metrics.jsonl")
                pts = read_losses(metrics) if os.path.isfile(metrics) else []
                if pts:
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], linewidth=1,
                            linestyle="-" if has_budget(r["method"]) else "--",
                            label=f"{r['entry']} ({params / 1e6:.3g}M), seed {r['seed']}")
            ax.set_xlabel("optimizer step")
            ax.set_ylabel("training loss")
            ax.set_title(f"{task}, {low / 1e6:.3g}M trainable parameters")
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=6)
    return finish(fig, plt, "training loss per step (response tokens; RoSA after its warm-up and restart)", path)


def read_structures(records: Sequence[dict], cell_dirs: Sequence[str]) -> List[tuple]:
    """(record, structure) for every cell that recorded a ``mask_structure.json``."""
    out = []
    for r, d in zip(records, cell_dirs):
        info = r.get("masks")
        if info:
            with open(os.path.join(d, info["file"]), encoding="utf-8") as fh:
                out.append((r, json.load(fh)))
    return out


def plot_masks(records: Sequence[dict], cell_dirs: Sequence[str], path: str) -> Optional[str]:
    """Empty rows/columns of each sparse entry (first seed) vs random, and the densest RoSA mask's heatmaps."""
    firsts, seen = [], set()
    for r, s in read_structures(records, cell_dirs):
        if (r["task"], r["entry"]) not in seen:
            seen.add((r["task"], r["entry"]))
            firsts.append((r, s))
    if not firsts:
        return None
    plt = _pyplot()
    if plt is None:
        return None
    rosa = [(r, s) for r, s in firsts if _is(r["method"], "mixed")] or firsts
    shown_r, shown = max(rosa, key=lambda rs: rs[0]["train"]["density"])
    maps = shown["heatmaps"]
    ncols = max(len(maps), 1)
    fig = plt.figure(figsize=(max(3.0 * ncols, 10), 8.5))
    grid = fig.add_gridspec(2, ncols, height_ratios=[1.0, 1.3])
    ax = fig.add_subplot(grid[0, :])
    labels = [f"{r['task']}: {r['entry']}" for r, _ in firsts]
    xs = list(range(len(firsts)))
    width = 0.2
    ax.bar([x - 1.5 * width for x in xs], [s["overall"]["empty_rows"] for _, s in firsts], width, label="empty rows")
    ax.bar([x - 0.5 * width for x in xs], [s["overall"]["random_empty_rows"] for _, s in firsts], width,
           label="empty rows, random mask", alpha=0.5)
    ax.bar([x + 0.5 * width for x in xs], [s["overall"]["empty_cols"] for _, s in firsts], width,
           label="empty columns")
    ax.bar([x + 1.5 * width for x in xs], [s["overall"]["random_empty_cols"] for _, s in firsts], width,
           label="empty columns, random mask", alpha=0.5)
    ax.set_xticks(xs)
    ax.set_xticklabels(labels, rotation=20, ha="right", fontsize=7)
    ax.set_ylabel("fraction (mean over weights)")
    ax.set_title("rows / columns of the masks with no kept entry: the masks vs uniformly random masks of equal density")
    ax.legend(fontsize=7)
    ax.grid(True, axis="y", alpha=0.3)
    for i, pic in enumerate(maps):
        a = fig.add_subplot(grid[1, i])
        img = np.array([[c == "1" for c in row] for row in pic["rows"]], dtype=float)
        a.imshow(img, cmap="Greys", interpolation="nearest", aspect="auto")
        a.set_title(f"{pic['name'].replace('model.layers.', 'L')}\n{pic['shape'][0]}x{pic['shape'][1]}",
                    fontsize=7)
        a.set_xticks([])
        a.set_yticks([])
    return finish(fig, plt, f"mask structure; heatmaps: {shown_r['cell']} ({shown['pool']}x{shown['pool']} "
                            f"max-pooled, black = block holds a kept entry)", path)
