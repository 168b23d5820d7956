"""What a training run leaves behind: a metrics jsonl (written as it goes) and a loss-curve PNG.

``metrics.jsonl`` is strict JSON, one object a line (``json.loads`` with any ``parse_constant`` reads it):
a non-finite number in a log record (NaN, inf, -inf; e.g. the loss of a diverged step logged by a caller's
own Trainer) is written as ``null``, never as the bare ``NaN`` / ``Infinity`` tokens that Python's
``json`` would emit and that are not JSON. The loss plot skips such points.
"""
from __future__ import annotations

import json
import math
import os
import time
from typing import Optional

from transformers import TrainerCallback

from ..utils.io import atomic_write_text, read_jsonl
from ..utils.plots import close_png, pyplot_or_none


PHASE_ORDER = ("warmup", "train")  # the schedule phases that log training steps, in run order


class MetricsWriter(TrainerCallback):
    """Appends every Trainer log record and every schedule phase change to ``metrics.jsonl``."""

    def __init__(self, path: str, append: bool = False, enabled: bool = True):
        self.path = path
        self.t0 = time.time()
        self.enabled = enabled  # False on the non-zero ranks of a DDP run: one process writes the file
        if not enabled:
            return
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        if not append:
            open(path, "w", encoding="utf-8").close()

    def resume_at(self, step: int, phase: str = "train") -> int:
        """Forget the log records of ``phase`` after optimizer step ``step`` (the checkpoint a resumed run
        restarts from) and those of every later phase: the killed session logged them, the resumed one logs
        them again. Phase events and the records of earlier phases stay. Returns how many were dropped."""
        if phase not in PHASE_ORDER:
            raise ValueError(f"phase must be one of {', '.join(PHASE_ORDER)}, got {phase!r}")
        if not self.enabled or not os.path.isfile(self.path):
            return 0
        later = set(PHASE_ORDER[PHASE_ORDER.index(phase) + 1:])

        def replayed(r: dict) -> bool:
            if r.get("event") != "log":
                return False
            p = r.get("phase", "train")
            return p in later or (p == phase and isinstance(r.get("step"), int) and r["step"] > step)

        records = read_metrics(self.path)
        kept = [r for r in records if not replayed(r)]
        if len(kept) != len(records):
            atomic_write_text(self.path, "".join(map(_jsonl_line, kept)))
        return len(records) - len(kept)

    def _write(self, record: dict) -> None:
        if not self.enabled:
            return
        record = {"time_s": round(time.time() - self.t0, 3), **record}
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(_jsonl_line(record))

    def phase(self, phase: str, info: dict) -> None:
        self._write({"event": "phase", "phase": phase, **{k: str(v) for k, v in info.items()}})

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs:
            self._write({"event": "log", "step": state.global_step, **logs})


def _jsonl_line(record: dict) -> str:
    """One line of ``metrics.jsonl``: strict JSON (non-finite numbers as null)."""
    return json.dumps(strict_json(record), allow_nan=False) + "\n"


def strict_json(value):
    """``value`` with every non-finite float (at any depth of dicts / lists / tuples) replaced by None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(v) for v in value]
    return value


def read_metrics(path: str) -> list[dict]:
    """The records of a ``metrics.jsonl``."""
    return read_jsonl(path)


def plot_loss(metrics_path: str, png_path: str, title: Optional[str] = None) -> Optional[str]:
    """Loss per optimizer step, one line per phase (warm-up and the restarted run). None without matplotlib
    (then one line on stderr says how to install it)."""
    plt = pyplot_or_none(f"loss plot {png_path}")
    if plt is None:
        return None
    series: dict[str, tuple[list, list]] = {}
    for rec in read_metrics(metrics_path):
        if rec.get("event") == "log" and isinstance(rec.get("loss"), (int, float)):
            xs, ys = series.setdefault(rec.get("phase") or "train", ([], []))
            xs.append(rec["step"])
            ys.append(rec["loss"])
    fig, ax = plt.subplots(figsize=(6.4, 3.8), dpi=110)
    for phase, (xs, ys) in series.items():
        ax.plot(xs, ys, marker="." if len(xs) < 60 else None, label=phase)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss (response tokens)")
    ax.set_title(title or "loss")
    ax.grid(alpha=0.3)
    if series:
        ax.legend()
    return close_png(fig, plt, png_path)
