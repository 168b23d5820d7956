"""``rosa eval``: evaluate a model (optionally with a RoSA adapter) on a task, or compare runs.

    rosa eval --task viggo --data-dir data --limit 50 [--adapter RUN_DIR] [--output FILE.json]
    rosa eval --compare RUN_DIR... [--output TABLE.md] [--plot FIG.png]
"""
from __future__ import annotations

import argparse
import codecs
import os
import sys

from .metrics import GSM8K_PROTOCOLS
from .protocols import PROTOCOL_TASKS


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="HF id or local path (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--adapter", default=None, help="RoSA adapter / rosa train run directory")
    p.add_argument("--merge", action="store_true", help="merge the adapter into the weights before evaluating")
    p.add_argument("--task", default=None, help=f"one of {', '.join(PROTOCOL_TASKS)}")
    p.add_argument("--data-dir", default=None, help="data folder (default: $ROSA_PEFT_DATA_DIR)")
    p.add_argument("--split", default=None, help="default: the task's eval split")
    p.add_argument("--limit", type=int, default=None, help="evaluate the first N examples")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=None, help="default: per task (gsm8k 256, viggo 128, sql 192)")
    p.add_argument("--stop", action="append", default=None, metavar="STR",
                   help="replace the task's stop strings (repeatable; escapes such as \\n are decoded)")
    p.add_argument("--gsm8k-protocol", choices=GSM8K_PROTOCOLS, default="paper",
                   help="paper = RoSA's lm-eval 2c18e367 zero-shot; strict/flexible = today's lm-eval filters")
    p.add_argument("--sql-paper-prompt", action="store_true",
                   help="reproduce the RoSA eval prompt quirk (the '\\n\\n answer: ' suffix twice)")
    p.add_argument("--sql-case-sensitive", action="store_true",
                   help="compare SQL execution results with sqlite's case-sensitive default")
    p.add_argument("--sql-timeout", type=float, default=2.0, help="seconds per SQL query (default 2)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument("--quantize", default=None, choices=["nf4"], help="4-bit NF4 base model (QRoSA adapters)")
    p.add_argument("--quant-backend", default="torchao", choices=["torchao", "bnb"],
                   help="package doing --quantize (default torchao)")
    p.add_argument("--output", default=None,
                   help="report path (default: ADAPTER/eval-TASK-SPLIT.json, else ./eval-TASK-SPLIT.json); "
                        "with --compare: the markdown table")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--compare", nargs="+", default=None, metavar="RUN_DIR",
                   help="render these run directories into one markdown table (and --plot PNG)")
    p.add_argument("--plot", default=None, help="with --compare: the PNG (default: beside --output)")


def _positive(name: str, value) -> None:
    if value is not None and value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value}")


def _default_output(args, task: str, split: str) -> str:
    name = f"eval-{task}-{split}.json"
    return os.path.join(args.adapter, name) if args.adapter else os.path.abspath(name)


def _check_output(path: str) -> None:
    if os.path.isdir(path):
        raise ValueError(f"--output {path} is a directory; give a file name")


def run_compare(args) -> int:
    from .compare import collect, markdown_table, plot

    if args.task or args.adapter:
        raise ValueError("--compare takes run directories only (no --task / --adapter)")
    rows = collect(args.compare)
    table = markdown_table(rows)
    png = args.plot
    if png is None and args.output:
        png = os.path.splitext(args.output)[0] + ".png"
    for path in (args.output, png):
        if path:
            _check_output(path)
    if args.output:
        from ..io import atomic_write_text

        atomic_write_text(args.output, table)
        print(f"wrote {args.output}", file=sys.stderr)
    if png and plot(rows, png):
        print(f"wrote {png}", file=sys.stderr)
    sys.stdout.write(table)
    return 0


def run(args: argparse.Namespace) -> int:
    if args.compare is not None:
        return run_compare(args)
    if not args.task:
        raise ValueError(f"--task is required (one of {', '.join(PROTOCOL_TASKS)}), or use --compare RUN_DIR...")
    _positive("--batch-size", args.batch_size)
    _positive("--max-new-tokens", args.max_new_tokens)
    _positive("--limit", args.limit)
    from .loading import check_adapter_dir, load_for_eval
    from .protocols import get_protocol
    from .runner import evaluate, format_summary, load_examples, write_report

    if args.adapter:
        check_adapter_dir(args.adapter)
    from ..tasks import TASKS

    stop = None if args.stop is None else [codecs.decode(s, "unicode_escape") for s in args.stop]
    options = dict(gsm8k_protocol=args.gsm8k_protocol, sql_paper_prompt=args.sql_paper_prompt,
                   sql_case_insensitive=not args.sql_case_sensitive, sql_timeout_s=args.sql_timeout,
                   stop=stop, max_new_tokens=args.max_new_tokens)
    if args.task.strip().lower().replace("_", "-") in TASKS:  # a known task without a protocol: say so first
        get_protocol(args.task, **options)
    task, split, examples = load_examples(args.task, args.split, args.limit, args.data_dir)
    protocol = get_protocol(task.name, **options)
    output = args.output or _default_output(args, task.name, split)
    _check_output(output)
    model, tokenizer, info = load_for_eval(args.model, args.adapter, dtype=args.dtype, device=args.device,
                                           merge=args.merge, quantize=args.quantize, quant_backend=args.quant_backend)
    report = evaluate(model, tokenizer, task, split=split, limit=args.limit, batch_size=args.batch_size,
                      protocol=protocol, examples=examples, progress=not args.no_progress, model_info=info)
    write_report(report, output)
    print(format_summary(report))
    print(f"wrote {output}", file=sys.stderr)
    return 0
