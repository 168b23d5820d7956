"""Step-level benchmark: forward + backward + AdamW step per method, side by side in one process.

Timing: every method is built once (a fresh copy of the same random base model), then the methods
take turns — one step each per round, the starting method rotating every round — so slow drifts of
a shared machine hit all methods alike. Warm-up rounds are discarded; the median of the remaining
step times is reported, with tokens/s and the ratio to PEFT LoRA.

Peak memory is measured separately (``memory.py``): each method runs a few steps in a fresh
subprocess, because process RSS cannot be attributed to one of several models living in one process.
``--profile`` runs one more step of a method under ``torch.profiler`` (:func:`profile_step`).
"""
from __future__ import annotations

import copy
import gc
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional

import torch
from torch.profiler import ProfilerActivity
from torch.profiler import profile as torch_profile
from tqdm.auto import tqdm

from . import methods as M
from .shapes import ModelPreset, build_model


@dataclass
class StepResult:
    method: str
    label: str
    trainable: int
    times_s: list = field(default_factory=list)
    cpu_times_s: list = field(default_factory=list)
    median_s: Optional[float] = None
    median_cpu_s: Optional[float] = None
    tokens_per_s: Optional[float] = None
    ratio_to_lora: Optional[float] = None
    cpu_ratio_to_lora: Optional[float] = None
    peak_mb: Optional[float] = None
    mem_ratio_to_lora: Optional[float] = None
    skipped: Optional[str] = None
    memory_detail: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def make_batch(preset: ModelPreset, tokens: int, device: str, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, preset.vocab, (1, tokens), generator=gen).to(device)


def train_step(model, optimizer, ids: torch.Tensor) -> None:
    optimizer.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    optimizer.step()


def profile_step(model, optimizer, ids: torch.Tensor, device: str, rows: int = 25) -> str:
    """Run one step under the profiler; return the top ``rows`` ops by self time as a text table."""
    activities = [ProfilerActivity.CPU]
    sort = "self_cpu_time_total"
    if device.startswith("cuda"):
        activities.append(ProfilerActivity.CUDA)
        sort = "self_cuda_time_total"
    train_step(model, optimizer, ids)  # not profiled: caches, lazy state
    synchronize(device)
    with torch_profile(activities=activities, record_shapes=True) as prof:
        train_step(model, optimizer, ids)
        synchronize(device)
    return prof.key_averages(group_by_input_shape=True).table(sort_by=sort, row_limit=rows, max_name_column_width=48,
                                                              max_shapes_column_width=60)


def make_optimizer(params):
    return torch.optim.AdamW(params, lr=1e-5)


def prepare(method: str, base_factory: Callable, budget: M.Budget):
    model, params = M.build(method, base_factory, budget)
    return model, make_optimizer(params)


def add_ratios(results: list[StepResult], reference: str = M.REFERENCE) -> None:
    """Fill ``ratio_to_lora`` / ``mem_ratio_to_lora`` against the reference row (PEFT LoRA)."""
    ref = next((r for r in results if r.method == reference and r.skipped is None), None)
    for r in results:
        if ref is not None and r.median_s is not None and ref.median_s:
            r.ratio_to_lora = r.median_s / ref.median_s
        if ref is not None and r.median_cpu_s is not None and ref.median_cpu_s:
            r.cpu_ratio_to_lora = r.median_cpu_s / ref.median_cpu_s
        if ref is not None and r.peak_mb is not None and ref.peak_mb:
            r.mem_ratio_to_lora = r.peak_mb / ref.peak_mb


def run_step_suite(preset: ModelPreset, methods: list[str], *, dtype: torch.dtype, device: str = "cpu",
                   tokens: int = 512, repeats: int = 5, warmup: int = 1, lora_rank: int = 16, rosa_rank: int = 8,
                   progress: bool = True, log: Callable[[str], None] = print,
                   profile: tuple = ()) -> tuple[list[StepResult], M.Budget, dict]:
    """Time ``methods`` interleaved on one preset.

    Returns per-method results, the shared budget, and {method: profiler table} for ``profile``.
    """
    template = build_model(preset, dtype, device)
    budget = M.budget_for(template, lora_rank, rosa_rank)
    results, live = [], {}
    for method in methods:
        reason = M.requirement(method)
        if reason:
            log(f"  skipping {method}: {reason}")
            results.append(StepResult(method, M.LABELS[method], 0, skipped=reason))
            continue
        try:
            model, opt = prepare(method, lambda: copy.deepcopy(template), budget)
        except Exception as exc:  # an optional method that cannot run here must not sink the run
            log(f"  skipping {method}: {type(exc).__name__}: {exc}")
            results.append(StepResult(method, M.LABELS[method], 0, skipped=f"{type(exc).__name__}: {exc}"))
            continue
        live[method] = (model, opt)
        results.append(StepResult(method, M.LABELS[method], M.trainable_count(model)))
    del template
    M.clear_mask_cache()
    gc.collect()
    ids = make_batch(preset, tokens, device)
    order = list(live)
    by_name = {r.method: r for r in results}
    total = (warmup + repeats) * len(order)
    bar = tqdm(total=total, desc=f"step {preset.name}", disable=not progress, leave=False)
    for rnd in range(warmup + repeats):
        shift = rnd % max(1, len(order))
        for method in order[shift:] + order[:shift]:
            model, opt = live[method]
            gc.collect()
            synchronize(device)
            c0, t0 = time.process_time(), time.perf_counter()
            train_step(model, opt, ids)
            synchronize(device)
            dt, dc = time.perf_counter() - t0, time.process_time() - c0
            if rnd >= warmup:
                by_name[method].times_s.append(dt)
                by_name[method].cpu_times_s.append(dc)
            bar.update(1)
    bar.close()
    profiles = {}
    for method in profile:
        if method in live:
            profiles[method] = profile_step(*live[method], ids, device)
    for r in results:
        if r.times_s:
            r.median_s = statistics.median(r.times_s)
            r.median_cpu_s = statistics.median(r.cpu_times_s)
            r.tokens_per_s = tokens / r.median_s
    live.clear()
    gc.collect()
    add_ratios(results)
    return results, budget, profiles
