"""``rosa eval``: evaluate a model (optionally with a RoSA adapter) on a task, or compare runs.

    rosa eval --task viggo --data-dir data --limit 50 [--adapter RUN_DIR] [--output FILE.json]
    rosa eval --task jsonl --data test.jsonl [--prompt-field F --response-field F] --adapter RUN_DIR
    rosa eval --compare RUN_DIR... [--output TABLE.md] [--plot FIG.png]
    rosa eval --harness TASK[,TASK] [--harness-include DIR] [--num-fewshot N] --adapter RUN_DIR  (lm-eval)
"""
from __future__ import annotations

import argparse
import codecs
import os
import re
import sys

from ..options import DTYPES, QUANT_BACKENDS, QUANTIZE, add_deprecated_alias, check_optional_dependencies
from ..tasks import TASKS, task_names
from ..tasks.gsm8k import GSM8K_PROTOCOLS
from ..tasks.registry import task_key
from ..utils.checks import UserError
from ..utils.io import atomic_write_text
from .loading import check_adapter_dir, load_for_eval
from .protocols import get_protocol
from .runner import evaluate, format_summary, load_examples, write_report


def _file_tasks() -> str:
    """The evaluable tasks read from a file the user names (``--data``), e.g. ``jsonl``."""
    return " / ".join(task_names(evaluable=True, needs_path=True))


def _bounds_help() -> str:
    """Each evaluable task's default generated-token bound, from its protocol."""
    parts = []
    for name in task_names(evaluable=True):
        protocol = get_protocol(name)
        parts.append(f"{name} {protocol.max_new_tokens or protocol.max_new_tokens_help}")
    return ", ".join(parts)


def add_arguments(p: argparse.ArgumentParser) -> None:
    m = p.add_argument_group("model")
    m.add_argument("--model", default=None,
                   help="base model: HF id or local path (default: the embedded SmolLM2-135M-Instruct)")
    m.add_argument("--adapter", default=None, metavar="DIR", help="RoSA adapter / rosa train run directory "
                                                                 "(default: none, the base model alone)")
    m.add_argument("--merge", action=argparse.BooleanOptionalAction, default=None,
                   help="merge the adapter into the weights before evaluating (default: merge float bases, which "
                        "generates faster with the same outputs; keep 4-bit bases unmerged, the paper's protocol)")
    m.add_argument("--threads", type=int, default=None, metavar="N",
                   help="torch threads while generating (default: torch's own; 1 is fastest on a busy 2-core CPU)")
    m.add_argument("--dtype", default="float32", choices=DTYPES, help="model dtype")
    m.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (cuda when available)")
    m.add_argument("--quantize", default="none", choices=QUANTIZE, help="nf4: 4-bit NF4 base model (QRoSA adapters)")
    m.add_argument("--quant-backend", default="torchao", choices=QUANT_BACKENDS,
                   help="package doing --quantize: torchao (extra [quant]) or bitsandbytes (extra [bnb])")
    d = p.add_argument_group("data")
    d.add_argument("--task", default=None,
                   help=f"one of {', '.join(task_names(evaluable=True))} ({_file_tasks()}: see --data); "
                        "required unless --compare (default: none)")
    d.add_argument("--data", default=None, metavar="PATH",
                   help="jsonl task: the .jsonl file to evaluate, one JSON object per line (default: none)")
    d.add_argument("--prompt-field", default="prompt", help="jsonl task: the field holding the prompt")
    d.add_argument("--response-field", default="response", help="jsonl task: the field holding the response")
    d.add_argument("--data-dir", default=None, metavar="DIR", help="data folder (default: $ROSA_PEFT_DATA_DIR)")
    d.add_argument("--split", default=None, help="split to evaluate (default: the task's eval split)")
    d.add_argument("--limit", type=int, default=None, metavar="N", help="evaluate the first N examples "
                                                                        "(default: all)")
    g = p.add_argument_group("generation and scoring")
    g.add_argument("--eval-batch-size", type=int, default=8, metavar="N", help="prompts per generate call")
    add_deprecated_alias(p, "--batch-size", "--eval-batch-size", "eval_batch_size", type=int)
    g.add_argument("--max-new-tokens", type=int, default=None, metavar="N",
                   help=f"generated-token bound (default: per task: {_bounds_help()})")
    g.add_argument("--max-seq-len", type=int, default=512, metavar="N",
                   help="jsonl task: tokens of prompt + response scored for the loss (as rosa train's)")
    g.add_argument("--stop", action="append", default=None, metavar="STR",
                   help="replace the task's stop strings (repeatable; escapes such as \\n are decoded) "
                        "(default: per task)")
    g.add_argument("--gsm8k-protocol", choices=GSM8K_PROTOCOLS, default="paper",
                   help="paper = RoSA's lm-eval 2c18e367 zero-shot; strict/flexible = today's lm-eval filters")
    g.add_argument("--sql-paper-prompt", action="store_true",
                   help="reproduce the RoSA eval prompt quirk (the '\\n\\n answer: ' suffix twice)")
    g.add_argument("--sql-case-sensitive", action="store_true",
                   help="compare SQL execution results with sqlite's case-sensitive default")
    g.add_argument("--sql-timeout", type=float, default=2.0, metavar="SECONDS", help="time limit per SQL query")
    o = p.add_argument_group("output")
    o.add_argument("--output", default=None, metavar="FILE",
                   help="report path (default: ADAPTER/eval-TASK-SPLIT.json, else ./eval-TASK-SPLIT.json); "
                        "with --compare: the markdown table (default: stdout only)")
    o.add_argument("--no-progress", action="store_true", help="no progress bar")
    o.add_argument("--compare", nargs="+", default=None, metavar="RUN_DIR",
                   help="render these run directories into one markdown table (and --plot PNG) (default: none)")
    o.add_argument("--plot", default=None, metavar="PNG", help="with --compare: the plot (default: beside --output)")
    h = p.add_argument_group("lm-evaluation-harness (pip install lm-eval)")
    h.add_argument("--harness", default=None, metavar="TASK[,TASK]",
                   help="evaluate with lm-eval on these tasks / groups instead of --task: the model and adapter load "
                        "as for --task and go to lm-eval in memory; --limit counts per task; the report goes to "
                        "--output, else ADAPTER/ or ./harness-TASKS.json (default: none)")
    h.add_argument("--harness-include", default=None, metavar="DIR",
                   help="with --harness: a folder of extra lm-eval task YAMLs, e.g. a local task (default: none)")
    h.add_argument("--num-fewshot", type=int, default=None, metavar="N",
                   help="with --harness: few-shot examples per prompt (default: each task's own)")


def _positive(name: str, value) -> None:
    if value is not None and value < 1:
        raise UserError(f"{name} must be a positive integer, got {value}")


def _default_output(args, task: str, split: str) -> str:
    name = f"eval-{task}-{split}.json"
    return os.path.join(args.adapter, name) if args.adapter else os.path.abspath(name)


def _check_output(path: str) -> None:
    if os.path.isdir(path):
        raise UserError(f"--output {path} is a directory; give a file name")


def run_compare(args) -> int:
    from .compare import collect, markdown_table, plot

    if args.task or args.adapter:
        raise UserError("--compare takes run directories only (no --task / --adapter)")
    rows = collect(args.compare)
    table = markdown_table(rows)
    png = args.plot
    if png is None and args.output:
        png = os.path.splitext(args.output)[0] + ".png"
    for path in (args.output, png):
        if path:
            _check_output(path)
    if args.output:
        atomic_write_text(args.output, table)
        print(f"wrote {args.output}", file=sys.stderr)
    if png and plot(rows, png):
        print(f"wrote {png}", file=sys.stderr)
    sys.stdout.write(table)
    return 0


def run_harness(args) -> int:
    """``--harness``: lm-eval tasks on the loaded model; lm-eval's results JSON written atomically."""
    from . import lm_eval_helper as harness

    if args.task or args.compare or args.data:
        raise UserError("--harness takes lm-eval task names; it does not combine with --task / --data / --compare")
    _positive("--eval-batch-size", args.eval_batch_size)
    _positive("--limit", args.limit)
    _positive("--threads", args.threads)
    if args.num_fewshot is not None and args.num_fewshot < 0:
        raise UserError(f"--num-fewshot must be a non-negative integer, got {args.num_fewshot}")
    if args.harness_include and not os.path.exists(args.harness_include):
        raise FileNotFoundError(f"--harness-include {args.harness_include} does not exist")
    if not harness.lm_eval_available():
        raise UserError(f"--harness needs lm-evaluation-harness, which is not installed: {harness.INSTALL_HINT}")
    if args.adapter:
        check_adapter_dir(args.adapter)
    names, manager = harness.resolve_tasks(args.harness.split(","), args.harness_include)
    name = "harness-" + re.sub(r"[^\w.-]+", "_", args.harness.replace(",", "-")) + ".json"  # not eval*.json (--compare)
    output = args.output or (os.path.join(args.adapter, name) if args.adapter else os.path.abspath(name))
    _check_output(output)
    quantize = None if args.quantize == "none" else args.quantize
    check_optional_dependencies(args.model, quantize, args.quant_backend)
    device = None if args.device == "auto" else args.device
    model, tokenizer, info = load_for_eval(args.model, args.adapter, dtype=args.dtype, device=device,
                                           merge=args.merge, quantize=quantize, quant_backend=args.quant_backend)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    results = harness.evaluate_harness(model, tokenizer, names, num_fewshot=args.num_fewshot, limit=args.limit,
                                       batch_size=args.eval_batch_size, task_manager=manager)
    harness.write_harness_results(results, output, extra={"rosa_model": info})
    print(harness.format_harness_table(results))
    print(f"wrote {output}", file=sys.stderr)
    return 0


def run(args: argparse.Namespace) -> int:
    if args.harness is not None:
        return run_harness(args)
    if args.compare is not None:
        return run_compare(args)
    tasks = task_names(evaluable=True)
    if not args.task:
        raise UserError(f"--task is required (one of {', '.join(tasks)}), or use --compare RUN_DIR...")
    _positive("--eval-batch-size", args.eval_batch_size)
    _positive("--max-new-tokens", args.max_new_tokens)
    _positive("--limit", args.limit)
    _positive("--threads", args.threads)
    if args.max_seq_len < 2:
        raise UserError(f"--max-seq-len must be an integer >= 2, got {args.max_seq_len}")
    if args.adapter:
        check_adapter_dir(args.adapter)
    key = task_key(args.task)
    task_options = {}
    if key in TASKS and TASKS[key].needs_path:
        if not args.data:
            raise UserError(f"--task {key} needs --data PATH (the .jsonl file to evaluate)")
        task_options = dict(path=args.data, eval_path=args.data, prompt_field=args.prompt_field,
                            response_field=args.response_field)
    elif args.data:
        raise UserError(f"--data is for --task {_file_tasks()}; task {args.task!r} reads its files from --data-dir")
    stop = None if args.stop is None else [codecs.decode(s, "unicode_escape") for s in args.stop]
    options = dict(gsm8k_protocol=args.gsm8k_protocol, sql_paper_prompt=args.sql_paper_prompt,
                   sql_case_insensitive=not args.sql_case_sensitive, sql_timeout_s=args.sql_timeout,
                   stop=stop, max_new_tokens=args.max_new_tokens, max_seq_len=args.max_seq_len)
    if key in TASKS:  # a known task without a protocol: say so first
        get_protocol(args.task, **options)
    quantize = None if args.quantize == "none" else args.quantize
    check_optional_dependencies(args.model, quantize, args.quant_backend)
    task, split, examples = load_examples(args.task, args.split, args.limit, args.data_dir, **task_options)
    protocol = get_protocol(task.name, **options)
    output = args.output or _default_output(args, task.name, split)
    _check_output(output)
    device = None if args.device == "auto" else args.device
    model, tokenizer, info = load_for_eval(args.model, args.adapter, dtype=args.dtype, device=device,
                                           merge=args.merge, quantize=quantize, quant_backend=args.quant_backend)
    report = evaluate(model, tokenizer, task, split=split, limit=args.limit, batch_size=args.eval_batch_size,
                      protocol=protocol, examples=examples, progress=not args.no_progress, model_info=info,
                      num_threads=args.threads)
    write_report(report, output)
    print(format_summary(report))
    print(f"wrote {output}", file=sys.stderr)
    return 0
