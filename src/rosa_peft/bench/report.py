"""Writing benchmark results: one JSON file, one markdown file, and an optional PNG plot."""
from __future__ import annotations

import datetime as _dt
import json
import os
import platform
from pathlib import Path
from typing import Optional

import torch

from ..utils.io import atomic_write_text
from ..utils.plots import close_png, import_pyplot


def environment(device: str, threads: int) -> dict:
    env = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "device": device,
        "threads": threads,
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu": _cpu_name(),
    }
    for mod in ("transformers", "peft", "triton", "torchao", "bitsandbytes"):
        try:
            env[mod] = __import__(mod).__version__
        except Exception:  # not installed or broken: recorded as absent
            env[mod] = None
    if device.startswith("cuda") and torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name()
    return env


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def default_stem(device: str, threads: int, dtype: str) -> str:
    if device.startswith("cuda") and torch.cuda.is_available():
        name = torch.cuda.get_device_name().lower().replace("nvidia", "").strip().replace(" ", "-")
        return f"cuda-{name}-{dtype}"
    return f"cpu-{threads}core-{dtype}"


# ---- markdown ---------------------------------------------------------------------------------------
def _fmt(v, spec: str = ".2f", none: str = "—") -> str:
    return none if v is None else format(v, spec)


def step_table(rows: list[dict]) -> str:
    head = ("| method | trainable params | median step (s) | tokens/s | × PEFT LoRA | CPU time × PEFT LoRA "
            "| peak memory (MB) | memory × PEFT LoRA |\n|---|---:|---:|---:|---:|---:|---:|---:|")
    lines = [head]
    for r in rows:
        if r.get("skipped"):
            lines.append(f"| {r['label']} | — | skipped: {r['skipped']} | | | | | |")
            continue
        lines.append(
            f"| {r['label']} | {r['trainable']:,} | {_fmt(r['median_s'], '.3f')} | {_fmt(r['tokens_per_s'], '.0f')} "
            f"| {_fmt(r['ratio_to_lora'])} | {_fmt(r.get('cpu_ratio_to_lora'))} | {_fmt(r['peak_mb'], '.0f')} | {_fmt(r['mem_ratio_to_lora'], '.3f')} |")
    return "\n".join(lines)


def ops_table(rows: list[dict]) -> str:
    head = ("| op | shape (out × in) | density | nnz | implementation | median (ms) | speed-up vs dense |\n"
            "|---|---|---:|---:|---|---:|---:|")
    lines = [head]
    for r in rows:
        impl = r["impl"] + (" (chosen)" if r["chosen"] else "")
        lines.append(f"| {r['op']} | {r['out_features']} × {r['in_features']} | {r['density']:.2%} | {r['nnz']:,} "
                     f"| {impl} | {r['median_ms']:.2f} | {_fmt(r['speedup_vs_dense'], '.1f')} |")
    return "\n".join(lines)


def markdown(result: dict) -> str:
    env, cfg = result["environment"], result["config"]
    out = [f"# rosa bench — {result['stem']}", "",
           f"{env['date']} · device {env['device']} ({env.get('gpu') or env['cpu']}) · {env['threads']} threads · "
           f"dtype {cfg['dtype']} · {cfg['tokens']} tokens per step · torch {env['torch']} · "
           f"transformers {env['transformers']} · peft {env['peft']}", ""]
    for note in result.get("notes", []):
        out.append(f"> {note}")
    if result.get("notes"):
        out.append("")
    for block in result.get("step", []):
        p, b = block["preset"], block["budget"]
        out += [f"## Step level: {p['name']} ({p['layers']} decoder layer(s), hidden {p['hidden']}, "
                f"MLP {p['intermediate']}, {p['heads']} heads / {p['kv_heads']} KV, vocab {p['vocab']})", "",
                f"Forward + backward + AdamW on {cfg['tokens']} tokens, all seven projections adapted. "
                f"Budget: PEFT LoRA r={b['lora_rank']} = {b['target_trainable']:,} trainable parameters; "
                f"RoSA r={b['rosa_rank']} + density {b['rosa_density']:.4%}; SpA density {b['spa_density']:.4%}. "
                f"Median of {cfg['repeats']} interleaved steps after {cfg['warmup']} warm-up round(s); "
                f"memory: {block.get('memory_how') or 'not measured'}.", "",
                step_table(block["results"]), ""]
        for note in block.get("notes", []):
            out.append(f"- {note}")
        if block.get("notes"):
            out.append("")
    if result.get("profile_files"):
        out += ["Profiles (one step each): " + ", ".join(f"[{n}]({n})" for n in result["profile_files"]), ""]
    if result.get("ops"):
        out += ["## Op level", "", f"{cfg['tokens']} tokens, dtype {cfg['dtype']}; median of {cfg['repeats']} runs. "
                "The dense rows are what a dense-compose implementation pays for the same op.", "",
                ops_table(result["ops"]), ""]
    return "\n".join(out)


# ---- plot -------------------------------------------------------------------------------------------
def plot(result: dict, path: Path) -> Optional[str]:
    """Bar chart of step time and memory relative to PEFT LoRA; returns a message when skipped."""
    plt = import_pyplot()
    if plt is None:
        return "matplotlib is not installed: no plot written (pip install rosa-peft[plot])"
    blocks = [b for b in result.get("step", []) if any(r.get("ratio_to_lora") for r in b["results"])]
    if not blocks:
        return "no step-level ratios to plot"
    fig, axes = plt.subplots(1, len(blocks), figsize=(6.5 * len(blocks), 4.2), squeeze=False)
    for ax, block in zip(axes[0], blocks):
        rows = [r for r in block["results"] if r.get("ratio_to_lora")]
        names = [r["method"] for r in rows]
        xs = range(len(rows))
        ax.bar([x - 0.2 for x in xs], [r["ratio_to_lora"] for r in rows], width=0.4, label="step time")
        ax.bar([x + 0.2 for x in xs], [r.get("mem_ratio_to_lora") or 0 for r in rows], width=0.4,
               label="peak memory")
        ax.axhline(1.0, color="gray", lw=0.8)
        ax.set_xticks(list(xs), names, rotation=40, ha="right")
        ax.set_ylabel("× PEFT LoRA")
        ax.set_title(block["preset"]["name"])
        ax.legend()
    close_png(fig, plt, str(path))
    return None


def write(result: dict, out_dir: str, want_plot: bool = True) -> list[str]:
    """Write ``<stem>.json`` and ``<stem>.md`` (+ ``<stem>.png``); returns messages for the user."""
    d = Path(out_dir)
    d.mkdir(parents=True, exist_ok=True)
    stem = result["stem"]
    messages = []
    profiles = result.pop("profiles", {}) or {}
    result["profile_files"] = []
    for key, table in profiles.items():
        name = f"{stem}-profile-{key.replace('/', '-')}.txt"
        atomic_write_text(str(d / name), f"# torch.profiler, one training step: {key}\n\n{table}\n")
        result["profile_files"].append(name)
    atomic_write_text(str(d / f"{stem}.json"), json.dumps(result, indent=2) + "\n")
    atomic_write_text(str(d / f"{stem}.md"), markdown(result) + "\n")
    messages.append(f"wrote {d / (stem + '.json')} and {d / (stem + '.md')}")
    if want_plot:
        msg = plot(result, d / f"{stem}.png")
        messages.append(msg or f"wrote {d / (stem + '.png')}")
    return messages
