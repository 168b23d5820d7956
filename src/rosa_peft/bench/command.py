"""``rosa bench``: op-level and step-level speed / memory benchmarks against PEFT LoRA.

    rosa bench                                  # ops + step on llama2-7b and smollm2-135m shapes, bf16
    rosa bench --suite step --shapes llama2-7b --repeats 7 --output-dir benchmarks/results
    rosa bench --explain                        # which sparse kernel the dispatch picks, then exit
    rosa bench --suite step --quant             # add QLoRA / QSpA / QRoSA rows (NF4 bases)
"""
from __future__ import annotations

import argparse
import os
import re
import sys

from ..options import DTYPES, add_deprecated_alias
from ..utils.checks import UserError
from . import methods as M
from .ops import DEFAULT_DENSITIES
from .shapes import PRESETS, resolve_preset

DEFAULT_REPEATS = 5  # ops / step suites: timed repeats per method / op
DEFAULT_TRAIN_ROUNDS = 2  # --suite train: timed passes over every variant's micro-batches
SUITES = ("ops", "step", "all", "eval", "train")  # eval / train: end-to-end SmolLM2 rows (bench/*_speed.py)
DEFAULT_SHAPES = "llama2-7b,smollm2-135m"
_OP_SHAPE = re.compile(r"^(\d+)x(\d+)$")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--suite", default="all", choices=SUITES, help="what to run")
    parser.add_argument("--shapes", default=DEFAULT_SHAPES,
                        help=f"comma list of model presets ({', '.join(PRESETS)}, or "
                             "llama:HIDDEN:INTERMEDIATE:HEADS[:KV[:LAYERS]]); the op suite also takes OUTxIN")
    parser.add_argument("--methods", default=None,
                        help=f"step-level methods, comma list (default: {','.join(M.STEP_METHODS)}); "
                             f"known: {','.join(M.ALL_METHODS)}. With --suite train: the variants to run "
                             "(default: all; see docs/bench.md)")
    parser.add_argument("--quant", action="store_true",
                        help="add the 4-bit rows (PEFT QLoRA over bitsandbytes, QLoRA / QSpA / QRoSA over torchao NF4)")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (cuda when available)")
    parser.add_argument("--dtype", default="bfloat16", choices=DTYPES, help="base model / compute dtype")
    parser.add_argument("--tokens", type=int, default=512, metavar="N", help="tokens per step (batch 1)")
    parser.add_argument("--repeats", type=int, default=None, metavar="N",
                        help=f"timed repeats per method / op (default {DEFAULT_REPEATS}); with --suite train: "
                             f"timed rounds, each a pass over all micro-batches (default {DEFAULT_TRAIN_ROUNDS})")
    parser.add_argument("--warmup", type=int, default=1, metavar="N", help="discarded warm-up rounds")
    parser.add_argument("--densities", default=",".join(str(d) for d in DEFAULT_DENSITIES),
                        help="op-level densities, comma list of fractions (0.1%%..3%%)")
    parser.add_argument("--budget-rank", dest="lora_rank", type=int, default=16, metavar="R",
                        help="the trainable-parameter budget, as the LoRA rank that spends it (every method gets "
                             "about as many parameters as PEFT LoRA at this rank)")
    add_deprecated_alias(parser, "--lora-rank", "--budget-rank", "lora_rank", type=int)
    parser.add_argument("--rosa-rank", type=int, default=8, metavar="R",
                        help="RoSA's LoRA rank inside that budget (the rest goes to its sparse part)")
    parser.add_argument("--layers", type=int, default=None, metavar="N",
                        help="decoder layers per preset (default: the preset's)")
    parser.add_argument("--memory", default="subprocess", choices=("subprocess", "none"),
                        help="peak memory: subprocess (each method alone in a fresh process) or none")
    parser.add_argument("--threads", type=int, default=None, metavar="N",
                        help="torch threads (default: all usable cores)")
    parser.add_argument("--profile", default=None,
                        help="comma list of methods to profile one step of (torch.profiler) on the first preset "
                             "(default: none)")
    parser.add_argument("--output-dir", default="rosa-bench-results", metavar="DIR",
                        help="directory for the JSON / markdown / PNG results")
    add_deprecated_alias(parser, "--output", "--output-dir", "output_dir")
    parser.add_argument("--name", default=None, help="file stem (default: device, cores and dtype, "
                                                     "e.g. cpu-2core-bfloat16)")
    parser.add_argument("--explain", action="store_true",
                        help="print the sparse dispatch choice for each op, shape and density, then exit")
    parser.add_argument("--no-plot", action="store_true", help="do not write the PNG plot")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


# ---- validation ---------------------------------------------------------------------------------------
def _usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _device(spec: str) -> str:
    import torch

    if spec == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if spec == "cpu" or re.fullmatch(r"cuda(:\d+)?", spec):
        if spec.startswith("cuda") and not torch.cuda.is_available():
            raise UserError(f"--device {spec}: CUDA is not available here (use --device cpu)")
        return spec
    raise UserError(f"--device {spec!r}: use cpu, cuda, cuda:N or auto")


def _positive(flag: str, value, minimum: int = 1) -> int:
    if value is None or value < minimum:
        raise UserError(f"{flag} must be an integer >= {minimum}, got {value!r}")
    return value


def _split(flag: str, text: str) -> list[str]:
    items = [s.strip() for s in (text or "").split(",") if s.strip()]
    if not items:
        raise UserError(f"{flag} is empty")
    return items


def _densities(text: str) -> list[float]:
    out = []
    for item in _split("--densities", text):
        try:
            d = float(item)
        except ValueError:
            raise UserError(f"--densities: {item!r} is not a number") from None
        if not 0.0 < d < 1.0:
            raise UserError(f"--densities: {item} is outside (0, 1) (give fractions, e.g. 0.01 for 1%)")
        out.append(d)
    return out


def _op_shapes(specs: list[str], layers) -> list[tuple[int, int]]:
    """Distinct (out, in) shapes: OUTxIN items as given, presets expanded to their projections."""
    seen = []
    for spec in specs:
        m = _OP_SHAPE.match(spec)
        if m:
            shape = (int(m.group(1)), int(m.group(2)))
            if min(shape) < 1:
                raise UserError(f"--shapes {spec!r}: dimensions must be positive")
            cand = [shape]
        else:
            cand = [(o, i) for _, o, i in resolve_preset(spec, layers).linear_shapes()]
        for shape in cand:
            if shape not in seen:
                seen.append(shape)
    return seen


def _step_presets(specs: list[str], layers):
    presets = []
    for spec in specs:
        if _OP_SHAPE.match(spec):
            raise UserError(f"--shapes {spec!r}: the step suite needs a model preset ({', '.join(PRESETS)}) "
                             "or llama:HIDDEN:INTERMEDIATE:HEADS[:KV[:LAYERS]]; use --suite ops for bare shapes")
        presets.append(resolve_preset(spec, layers))
    return presets


def _methods(args) -> list[str]:
    methods = _split("--methods", args.methods) if args.methods else list(M.STEP_METHODS)
    if args.quant:
        methods += [m for m in M.QUANT_METHODS if m not in methods]
    for m in methods:
        if m not in M.ALL_METHODS:
            raise UserError(f"--methods: unknown method {m!r}; choose from {', '.join(M.ALL_METHODS)}")
    return list(dict.fromkeys(methods))


def validate(args) -> dict:
    """Check every flag before any work; returns the resolved settings."""
    import torch

    if args.suite not in SUITES:
        raise UserError(f"--suite {args.suite!r}: choose {', '.join(SUITES)}")
    if args.dtype not in DTYPES:
        raise UserError(f"--dtype {args.dtype!r}: choose {', '.join(DTYPES)}")
    if args.memory not in ("subprocess", "none"):
        raise UserError(f"--memory {args.memory!r}: choose subprocess or none")
    _positive("--tokens", args.tokens)
    repeats = _positive("--repeats", args.repeats) if args.repeats is not None else DEFAULT_REPEATS
    _positive("--warmup", args.warmup, 0)
    if args.layers is not None:
        _positive("--layers", args.layers)
    threads = _positive("--threads", args.threads) if args.threads is not None else _usable_cores()
    shapes = _split("--shapes", args.shapes)
    run_ops = args.suite in ("ops", "all") or args.explain
    run_step = args.suite in ("step", "all") and not args.explain
    cfg = {
        "suite": args.suite, "device": _device(args.device), "dtype": args.dtype,
        "torch_dtype": getattr(torch, args.dtype), "tokens": args.tokens, "repeats": repeats,
        "warmup": args.warmup, "threads": threads, "lora_rank": args.lora_rank, "rosa_rank": args.rosa_rank,
        "memory": args.memory, "densities": _densities(args.densities),
        "op_shapes": _op_shapes(shapes, args.layers) if run_ops else [],
        "presets": _step_presets(shapes, args.layers) if run_step else [],
        "methods": _methods(args),
        "profile": _split("--profile", args.profile) if args.profile else [],
    }
    for m in cfg["profile"]:
        if m not in cfg["methods"]:
            raise UserError(f"--profile: {m!r} is not among the benchmarked methods ({', '.join(cfg['methods'])})")
    if run_step:
        for p in cfg["presets"]:  # rank checks against the real shapes, before any model is built
            M.Budget.for_shapes({n: (o, i) for n, o, i in p.linear_shapes()}, args.lora_rank, args.rosa_rank)
    return cfg


# ---- run ------------------------------------------------------------------------------------------------
def _run_speed(args) -> int:
    """``--suite eval`` (rosa eval vs plain generate tokens/s) or ``--suite train`` (s per training example,
    mask scoring / step): one JSON + markdown row file under --output-dir."""
    import json

    from ..utils.io import atomic_write_text

    data_dir = os.environ.get("ROSA_PEFT_DATA_DIR")
    if args.suite == "eval":
        from .eval_speed import run_eval_speed

        result = run_eval_speed(data_dir=data_dir, dtype=args.dtype, num_threads=args.threads)
    else:
        from .train_speed import run_train_speed

        threads = _positive("--threads", args.threads) if args.threads is not None else _usable_cores()
        rounds = _positive("--repeats", args.repeats) if args.repeats is not None else DEFAULT_TRAIN_ROUNDS
        variants = _split("--methods", args.methods) if args.methods else None
        result = run_train_speed(data_dir=data_dir, threads=threads, rounds=rounds, variants=variants,
                                 progress=not args.no_progress)
    stem = args.name or f"{args.suite}-speed"
    os.makedirs(args.output_dir, exist_ok=True)
    atomic_write_text(os.path.join(args.output_dir, f"{stem}.json"), json.dumps(result, indent=2, default=str) + "\n")
    rows = result.get("rows") or [{k: v for k, v in result.items() if not isinstance(v, (dict, list))}]
    keys = [k for k in rows[0] if not isinstance(rows[0][k], (dict, list))]
    md = [f"# rosa bench --suite {args.suite}", "", "| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    md += ["| " + " | ".join(str(r.get(k)) for k in keys) + " |" for r in rows]
    atomic_write_text(os.path.join(args.output_dir, f"{stem}.md"), "\n".join(md) + "\n")
    print("\n".join(md))
    return 0


def run(args) -> int:
    if args.suite in ("eval", "train"):
        return _run_speed(args)
    cfg = validate(args)
    import torch

    torch.set_num_threads(cfg["threads"])
    progress = not args.no_progress
    if args.explain:
        from .ops import explain_lines

        print(f"sparse dispatch on {cfg['device']}, dtype {cfg['dtype']}, {cfg['tokens']} tokens:")
        for block in explain_lines(cfg["op_shapes"], cfg["densities"], dtype=cfg["torch_dtype"],
                                   device=cfg["device"]):
            print(block)
        return 0

    from . import report
    from .runner import run_all

    result = run_all(cfg, progress=progress, log=lambda msg: print(msg, file=sys.stderr, flush=True))
    result["stem"] = args.name or report.default_stem(cfg["device"], cfg["threads"], cfg["dtype"])
    for msg in report.write(result, args.output_dir, want_plot=not args.no_plot):
        print(msg)
    for block in result.get("step", []):
        print(f"\n{block['preset']['name']}:")
        print(report.step_table(block["results"]))
        for note in block.get("notes", []):
            print(f"  {note}")
    return 0
