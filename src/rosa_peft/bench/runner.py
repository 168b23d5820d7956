"""Runs the suites a ``rosa bench`` invocation asked for and assembles one result dict."""
from __future__ import annotations

from typing import Callable

from . import methods as M
from .memory import measure_subprocess
from .ops import run_ops_suite
from .report import environment, step_table
from .step import add_ratios, run_step_suite

# Acceptance targets (issue "Kernels and benchmarks", acceptance 2) checked in the notes.
TARGET_TIME_RATIO = 1.10
TARGET_MEM_RATIO = 1.05


def _memory(block_results, preset, cfg, progress: bool, log) -> str:
    from tqdm.auto import tqdm

    how = None
    todo = [r for r in block_results if r.skipped is None]
    for r in tqdm(todo, desc=f"memory {preset.name}", disable=not progress, leave=False):
        spec = {"method": r.method, "dtype": cfg["dtype"], "device": cfg["device"], "preset": preset.to_dict(),
                "tokens": cfg["tokens"], "lora_rank": cfg["lora_rank"], "rosa_rank": cfg["rosa_rank"],
                "threads": cfg["threads"], "warmup": 1, "steps": 2}
        out = measure_subprocess(spec)
        if "error" in out:
            log(f"  memory of {r.method} not measured: {out['error']}")
            r.memory_detail = out
            continue
        r.peak_mb = out["peak_mb"]
        r.memory_detail = out
        how = out.get("how", how)
    return how or "not measured"


def acceptance_notes(results: list[dict]) -> list[str]:
    """Plain-language verdicts on the targets, computed from the rows (never hand-written)."""
    by = {r["method"]: r for r in results if not r.get("skipped")}
    notes = []
    ref = by.get(M.REFERENCE)
    if ref is None or not ref.get("median_s"):
        return ["PEFT LoRA was not measured: no ratios (install peft: pip install rosa-peft[bench])."]
    rosa = by.get("rosa-merged")
    if rosa and rosa.get("ratio_to_lora"):
        t = rosa["ratio_to_lora"]
        verdict = "meets" if t <= TARGET_TIME_RATIO else f"misses by {100 * (t / TARGET_TIME_RATIO - 1):.1f}%"
        cpu = f" (process CPU time: {rosa['cpu_ratio_to_lora']:.2f}×)" if rosa.get("cpu_ratio_to_lora") else ""
        notes.append(f"RoSA-merged step time = {t:.2f}× PEFT LoRA{cpu}: {verdict} the ≤ {TARGET_TIME_RATIO:.2f}× "
                     "target.")
    shira = by.get("peft-shira")
    if shira and shira.get("ratio_to_lora"):
        line = f"PEFT SHiRA step time = {shira['ratio_to_lora']:.2f}× PEFT LoRA"
        if rosa and rosa.get("median_s"):
            line += f" ({shira['median_s'] / rosa['median_s']:.2f}× RoSA-merged's step time)"
        notes.append(line + ".")
    if rosa and rosa.get("mem_ratio_to_lora"):
        m = rosa["mem_ratio_to_lora"]
        verdict = "within" if m <= TARGET_MEM_RATIO else f"above by {100 * (m / TARGET_MEM_RATIO - 1):.1f}% over"
        notes.append(f"RoSA-merged peak memory = {m:.3f}× PEFT LoRA: {verdict} the ≤ {TARGET_MEM_RATIO:.2f}× target.")
    counts = {r["method"]: r["trainable"] for r in by.values() if r["method"] != "fft"}
    if counts and ref["trainable"]:
        worst = max(abs(c / ref["trainable"] - 1) for c in counts.values())
        notes.append(f"Trainable parameters of the adapter methods differ from PEFT LoRA's by at most "
                     f"{100 * worst:.2f}%.")
    return notes


def run_all(cfg: dict, progress: bool = True, log: Callable[[str], None] = print) -> dict:

    result = {"config": {k: v for k, v in cfg.items() if k not in ("torch_dtype", "presets")},
              "environment": environment(cfg["device"], cfg["threads"]), "notes": [], "step": [], "ops": [],
              "profiles": {}}
    result["config"]["presets"] = [p.to_dict() for p in cfg["presets"]]
    if not cfg["device"].startswith("cuda"):
        result["notes"].append("CPU run: no GPU was used. Peak memory is process RSS (see memory.py); Triton "
                               "kernels are CUDA-only and do not appear.")
    for i, preset in enumerate(cfg["presets"]):
        log(f"step suite: {preset.name} ({len(cfg['methods'])} methods, {cfg['repeats']} repeats)")
        profile = cfg["profile"] if i == 0 else ()
        results, budget, profiles = run_step_suite(
            preset, cfg["methods"], dtype=cfg["torch_dtype"], device=cfg["device"], tokens=cfg["tokens"],
            repeats=cfg["repeats"], warmup=cfg["warmup"], lora_rank=cfg["lora_rank"], rosa_rank=cfg["rosa_rank"],
            progress=progress, log=log, profile=profile)
        how = None
        if cfg["memory"] == "subprocess":

            how = _memory(results, preset, cfg, progress, log)
            add_ratios(results)
        rows = [r.to_dict() for r in results]
        result["step"].append({"preset": preset.to_dict(), "budget": budget.to_dict(), "memory_how": how,
                               "results": rows, "notes": acceptance_notes(rows)})

        log(step_table(rows))
        for method, table in profiles.items():
            result["profiles"][f"{preset.name}/{method}"] = table
    if cfg["op_shapes"]:
        log(f"op suite: {len(cfg['op_shapes'])} shapes x {len(cfg['densities'])} densities")
        rows = run_ops_suite(cfg["op_shapes"], cfg["densities"], tokens=cfg["tokens"], dtype=cfg["torch_dtype"],
                             device=cfg["device"], repeats=cfg["repeats"], warmup=cfg["warmup"] or 1,
                             progress=progress)
        result["ops"] = [r.to_dict() for r in rows]
    return result
