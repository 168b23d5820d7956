"""The GPU check in one command: CUDA-only tests, 7B-shape benchmarks and a short SmolLM2 training.

    python -m rosa_peft.bench.gpu_check --output-dir benchmarks/results        # on a CUDA machine
    bash benchmarks/gpu.sh                                                     # the same
    python -m rosa_peft.bench.gpu_check --smoke --output-dir /tmp/check        # CPU, tiny shapes (CI)

Steps, each a subprocess with its own time limit, so one failure is recorded and the others still run:

1. ``tests``: the CUDA-only tests (Triton kernels against torch at bf16 / fp16 / fp32); on a machine
   without CUDA they skip, and the step says so.
2. ``bench``: ``rosa bench`` op and step suites at LLaMA-2-7B layer shapes for RoSA merged / sp_add,
   QRoSA, PEFT LoRA / QLoRA / SHiRA (``--smoke``: a tiny llama preset, one repeat).
3. ``train``: a short ``rosa train`` of the embedded SmolLM2 on the built-in task (``--smoke``: a
   tiny saved Llama, 2 steps), timed.

It writes ``<stem>.json`` and ``<stem>.md`` (device name, versions, each step's status, time and
output tail) plus the benchmark's own files under ``--output-dir``. Nothing is downloaded: it needs
the project's dependencies installed (wheels) and the embedded model package, no network. The whole
check is sized for under 8 minutes on one H100 / H200.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from typing import Optional

from ..utils.io import atomic_write_text

BENCH_METHODS = "peft-lora,peft-qlora,peft-shira,rosa-merged,rosa-sp_add,qrosa,qrosa-bnb"
SMOKE_METHODS = "peft-lora,rosa-merged,rosa-sp_add"
SMOKE_SHAPES = "llama:64:128:4:4:1"
TAIL_CHARS = 2000


def _device() -> dict:
    import torch

    info = {"torch": torch.__version__, "python": platform.python_version(), "cuda": torch.cuda.is_available()}
    if info["cuda"]:
        info["device"] = torch.cuda.get_device_name(0)
        info["cuda_version"] = torch.version.cuda
    else:
        info["device"] = f"cpu ({platform.processor() or platform.machine()})"
    return info


def _stem(info: dict, smoke: bool) -> str:
    name = info["device"].split(" (")[0].replace(" ", "-").lower() if info["cuda"] else "cpu"
    return f"{name}-gpucheck{'-smoke' if smoke else ''}"


def _step(name: str, argv: list, timeout_s: int, env: Optional[dict] = None) -> dict:
    start = time.perf_counter()
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s,
                              env={**os.environ, **(env or {})})
        status = "ok" if done.returncode == 0 else f"failed (exit {done.returncode})"
        output = done.stdout + done.stderr
    except subprocess.TimeoutExpired as exc:
        status = f"timed out after {timeout_s} s"
        output = (exc.stdout or b"").decode(errors="replace") if isinstance(exc.stdout, bytes) else (exc.stdout or "")
    return {"step": name, "command": [str(a) for a in argv], "status": status,
            "seconds": round(time.perf_counter() - start, 1), "tail": output[-TAIL_CHARS:]}


def _tiny_model(directory: str) -> str:
    """A tiny saved Llama with the embedded SmolLM2's tokenizer, for the smoke training (no download)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from ..utils.model_loading import default_model_dir

    tokenizer = AutoTokenizer.from_pretrained(str(default_model_dir()))
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    LlamaForCausalLM(cfg).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def plan(output_dir: str, smoke: bool, repo: str, work: str) -> list[tuple[str, list, int, dict]]:
    """The steps to run: (name, argv, time limit in s, extra environment)."""
    py = sys.executable
    stem = "smoke" if smoke else "gpucheck"
    tests = [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", os.path.join(repo, "tests", "unit", "sparse", "test_triton_ops.py")]
    bench = [py, "-m", "rosa_peft.cli", "bench", "--suite", "all", "--no-progress", "--no-plot",
             "--output-dir", output_dir, "--name", f"{stem}-bench"]
    if smoke:
        bench += ["--shapes", SMOKE_SHAPES, "--methods", SMOKE_METHODS, "--repeats", "1", "--warmup", "0",
                  "--memory", "none", "--densities", "0.01", "--budget-rank", "4", "--rosa-rank", "2"]
    else:
        bench += ["--shapes", "llama2-7b", "--methods", BENCH_METHODS, "--repeats", "5"]
    train = [py, "-m", "rosa_peft.cli", "train", "--task", "sql-synth", "--no-progress",
             "--output-dir", os.path.join(work, "train")]
    if smoke:
        train += ["--model", _tiny_model(os.path.join(work, "tiny")), "--max-steps", "2", "--limit", "8",
                  "--batch-size", "2", "--grad-accum", "1", "--warmup-steps", "1", "--lr-warmup-steps", "1",
                  "--max-seq-len", "64"]
    else:
        train += ["--max-steps", "60", "--limit", "512", "--batch-size", "8", "--grad-accum", "1",
                  "--warmup-steps", "8", "--lr-warmup-steps", "4", "--max-seq-len", "256", "--dtype", "bfloat16"]
    return [("tests", tests, 240, {}), ("bench", bench, 300 if not smoke else 240, {}), ("train", train, 180, {})]


def write_report(result: dict, output_dir: str, stem: str) -> list[str]:
    os.makedirs(output_dir, exist_ok=True)
    js = os.path.join(output_dir, f"{stem}.json")
    md = os.path.join(output_dir, f"{stem}.md")
    atomic_write_text(js, json.dumps(result, indent=2) + "\n")
    info = result["device"]
    lines = [f"# GPU check — {info['device']}", "",
             f"{result['started']} · torch {info['torch']} · python {info['python']}"
             + (f" · CUDA {info.get('cuda_version')}" if info["cuda"] else " · no CUDA device: CPU-runnable parts only"),
             "", "| step | status | seconds |", "|---|---|---:|"]
    lines += [f"| {s['step']} | {s['status']} | {s['seconds']} |" for s in result["steps"]]
    lines += ["", f"Total: {result['total_seconds']} s.", ""]
    for s in result["steps"]:
        lines += [f"## {s['step']}", "", "```", " ".join(s["command"]), "```", "", "```", s["tail"].rstrip(), "```", ""]
    atomic_write_text(md, "\n".join(lines))
    return [js, md]


def main(argv: Optional[list] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rosa_peft.bench.gpu_check", description=__doc__.split("\n")[0])
    parser.add_argument("--output-dir", default="benchmarks/results", help="where the JSON / markdown go")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes and a tiny model: the CPU-runnable parts")
    parser.add_argument("--steps", default="tests,bench,train", help="comma list of steps to run")
    args = parser.parse_args(argv)
    import tempfile

    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    wanted = [s for s in args.steps.split(",") if s]
    info = _device()
    stem = _stem(info, args.smoke)
    result = {"started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "device": info, "smoke": args.smoke, "steps": []}
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="rosa-gpucheck-") as work:
        for name, cmd, limit, env in plan(args.output_dir, args.smoke, repo, work):
            if name not in wanted:
                continue
            if name == "tests" and not os.path.isfile(cmd[-1]):
                result["steps"].append({"step": name, "command": cmd, "status": "skipped (no tests/ beside the package)",
                                        "seconds": 0.0, "tail": ""})
                continue
            print(f"gpu check: {name} ...", file=sys.stderr, flush=True)
            result["steps"].append(_step(name, cmd, limit, env))
    result["total_seconds"] = round(time.perf_counter() - start, 1)
    for path in write_report(result, args.output_dir, stem):
        print(f"wrote {path}")
    failed = [s["step"] for s in result["steps"] if s["status"] != "ok" and not s["status"].startswith("skipped")]
    if failed:
        print(f"gpu check: failed steps: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
