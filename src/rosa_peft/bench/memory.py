"""Peak training memory of one method, measured in a fresh process.

Why a subprocess: the step benchmark keeps every method's model alive in one process to time them
side by side, and process RSS cannot be split between them. Here one method runs alone:

* CUDA: ``torch.cuda.max_memory_allocated`` over the measured steps (after a warm-up step, so the
  optimizer state exists), weights included — the usual "peak memory" of training scripts.
* CPU: the process's peak resident set (``VmHWM``) over the measured steps, minus the RSS the process
  had before the model was built (Python, torch and transformers themselves, identical for every
  method). The high-water mark is reset after the warm-up step through ``/proc/self/clear_refs``
  (Linux); without it a sampling thread polls the RSS every millisecond instead.

Run as ``python -m rosa_peft.bench.memory '<json spec>'``; the last stdout line is the JSON result.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from typing import Optional

from . import methods as M
from .shapes import ModelPreset, build_model
from .step import make_batch, prepare, synchronize, train_step

MB = 1024 * 1024


def _status_kb(field: str) -> Optional[int]:
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def rss_mb() -> float:
    kb = _status_kb("VmRSS")
    if kb is not None:
        return kb / 1024
    import psutil

    return psutil.Process().memory_info().rss / MB


def reset_peak() -> bool:
    """Reset the kernel's RSS high-water mark (Linux >= 4.0); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as fh:
            fh.write("5")
        return _status_kb("VmHWM") is not None
    except OSError:
        return False


class PeakSampler:
    """RSS high-water mark over a block: the kernel's VmHWM when resettable, else a polling thread."""

    def __init__(self, interval_s: float = 0.001):
        self.interval_s = interval_s
        self.peak_mb = 0.0
        self.how = ""
        self._stop = threading.Event()
        self._thread = None

    def __enter__(self):
        if reset_peak():
            self.how = "VmHWM after clear_refs"
        else:
            self.how = "RSS sampled every %.0f ms" % (self.interval_s * 1000)
            self.peak_mb = rss_mb()
            self._thread = threading.Thread(target=self._poll, daemon=True)
            self._thread.start()
        return self

    def _poll(self):
        while not self._stop.is_set():
            self.peak_mb = max(self.peak_mb, rss_mb())
            time.sleep(self.interval_s)

    def __exit__(self, *exc):
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self.peak_mb = max(self.peak_mb, rss_mb())
        else:
            self.peak_mb = _status_kb("VmHWM") / 1024
        return False


def measure(spec: dict) -> dict:
    """Build ``spec['method']`` on the preset, run warm-up + measured steps, return peak memory in MB."""
    import gc

    import torch


    torch.set_num_threads(int(spec.get("threads") or torch.get_num_threads()))
    device = spec.get("device", "cpu")
    dtype = getattr(torch, spec["dtype"])
    preset = ModelPreset(**spec["preset"])
    M.preload(spec["method"])
    gc.collect()
    baseline = rss_mb()
    template = build_model(preset, dtype, device)
    budget = M.budget_for(template, spec["lora_rank"], spec["rosa_rank"])
    model, opt = prepare(spec["method"], lambda: template, budget)
    del template
    M.clear_mask_cache()
    ids = make_batch(preset, spec["tokens"], device)
    gc.collect()
    static = rss_mb()
    for _ in range(int(spec.get("warmup", 1))):
        train_step(model, opt, ids)
    synchronize(device)
    gc.collect()
    out = {"method": spec["method"], "baseline_rss_mb": baseline, "static_rss_mb": static}
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        for _ in range(int(spec.get("steps", 2))):
            train_step(model, opt, ids)
        synchronize(device)
        out.update(peak_mb=torch.cuda.max_memory_allocated() / MB, how="torch.cuda.max_memory_allocated")
        return out
    with PeakSampler() as sampler:
        for _ in range(int(spec.get("steps", 2))):
            train_step(model, opt, ids)
    out.update(peak_mb=sampler.peak_mb - baseline, peak_rss_mb=sampler.peak_mb,
               how=f"{sampler.how}, minus the RSS before the model was built")
    return out


def measure_subprocess(spec: dict, timeout_s: float = 900) -> dict:
    """Run :func:`measure` in a fresh interpreter; returns its dict, or ``{'error': ...}``."""
    env = dict(os.environ)
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        proc = subprocess.run([sys.executable, "-m", "rosa_peft.bench.memory", json.dumps(spec)],
                              capture_output=True, text=True, timeout=timeout_s, env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout_s:.0f} s"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        return {"error": f"exit {proc.returncode}: {tail[0][:300]}"}
    return json.loads(lines[-1])


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m rosa_peft.bench.memory '<json spec>'", file=sys.stderr)
        return 2
    print(json.dumps(measure(json.loads(argv[0]))), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
