"""Evaluate a model on a task: load examples, generate, score, summarise; write the JSON report.

>>> from rosa_peft.eval import evaluate, write_report
>>> report = evaluate(model, tokenizer, "viggo", data_dir="data", limit=50)     # doctest: +SKIP
>>> write_report(report, "eval-viggo-validation.json")                          # doctest: +SKIP

The report (``FORMAT`` = ``"rosa-eval/1"``)::

    {"format", "task", "split", "protocol": {name, stop, max_new_tokens, ...},
     "model": {model, adapter, merged, ...}, "settings": {batch_size, limit},
     "summary": {n, correct, accuracy, primary_metric, ...task metrics},
     "examples": [{index, prompt, generation, prediction, gold, correct, ...}], "time_s"}
"""
from __future__ import annotations

import json
import time
from typing import List, Optional, Sequence, Tuple

from ..tasks import get_task
from ..utils.checks import UserError, check_int
from ..utils.io import atomic_write_text
from .generate import generate
from .loss import response_loss
from .protocols import EvalProtocol, get_protocol, score_all

FORMAT = "rosa-eval/1"


def load_examples(task, split: Optional[str] = None, limit: Optional[int] = None,
                  data_dir: Optional[str] = None, **task_options) -> Tuple[object, str, List]:
    """``(task, split, examples)``; the split defaults to the task's eval split. Errors on no examples.

    ``task_options`` go to the task's constructor when ``task`` is a name (e.g. ``path=`` for jsonl)."""
    task_obj = get_task(task, data_dir=data_dir, **task_options) if isinstance(task, str) else task
    split = task_obj.check_split(split or task_obj.eval_split)
    if limit is not None:
        check_int("limit", limit, 1)
    examples = task_obj.load(split, limit=limit)
    if not examples:
        raise UserError(f"task {task_obj.name!r} split {split!r} has no examples")
    return task_obj, split, examples


def evaluate(model, tokenizer, task, *, split: Optional[str] = None, limit: Optional[int] = None,
             data_dir: Optional[str] = None, batch_size: int = 8, protocol: Optional[EvalProtocol] = None,
             examples: Optional[Sequence] = None, progress: bool = False, model_info: Optional[dict] = None,
             num_threads: Optional[int] = None, **protocol_options) -> dict:
    """Generate greedily on ``task``'s split (default: its eval split) and score every example.

    ``task`` is a name (``gsm8k``, ``viggo``, ``sql``, ``sql-synth``) or a Task (e.g. a ``jsonl`` task
    built with ``get_task("jsonl", path=...)``). ``protocol_options`` go to
    :func:`rosa_peft.eval.protocols.get_protocol` (``gsm8k_protocol``, ``sql_paper_prompt``,
    ``sql_case_insensitive``, ``sql_timeout_s``, ``stop``, ``max_new_tokens``, ``max_seq_len``). Pass
    ``examples`` (from :func:`load_examples`) to skip loading. A protocol with ``options["loss"]``
    (jsonl) also reports ``summary["loss"]``, the mean loss per response token. ``num_threads`` sets
    torch's intra-op threads while generating (None: leave them).

    For speed, evaluate a merged model (``RosaModel.merge_and_unload()``, as ``load_for_eval`` does by
    default for float bases): an unmerged adapter adds work to every generated token.
    """
    if examples is None:
        task_obj, split, examples = load_examples(task, split, limit, data_dir)
    else:
        task_obj = task
    task_name = task_obj if isinstance(task_obj, str) else task_obj.name
    if protocol is None:
        protocol = get_protocol(task_name, **protocol_options)
    protocol.prepare(tokenizer, examples)
    prompts = [protocol.prompt(e) for e in examples]
    t0 = time.time()
    generations = generate(model, tokenizer, prompts, batch_size=batch_size, max_new_tokens=protocol.max_new_tokens,
                           stop=protocol.stop, add_special_tokens=protocol.add_special_tokens, progress=progress,
                           desc=f"eval {task_name}", num_threads=num_threads)
    records = score_all(protocol, examples, generations, prompts)
    summary = protocol.summarize(records)
    if protocol.options.get("loss"):
        summary["loss"] = response_loss(model, tokenizer, examples, batch_size=batch_size,
                                        max_seq_len=protocol.options["loss_max_seq_len"])
    elapsed = time.time() - t0
    return {
        "format": FORMAT,
        "task": task_name,
        "split": split,
        "protocol": protocol.describe(),
        "model": dict(model_info or {}),
        "settings": {"batch_size": batch_size, "limit": limit},
        "summary": summary,
        "time_s": round(elapsed, 2),
        "examples": records,
    }


def write_report(report: dict, path: str) -> str:
    """Write ``report`` as JSON, atomically (no partial file on failure); returns ``path``."""
    atomic_write_text(path, json.dumps(report, indent=2, ensure_ascii=False, default=str) + "\n")
    return path


def format_summary(report: dict) -> str:
    """A small two-column text table of the summary metrics."""
    rows = [("task", f"{report['task']} / {report['split']}"), ("protocol", report["protocol"]["name"])]
    model = report.get("model") or {}
    if model.get("model"):
        rows.append(("model", str(model["model"])))
    if model.get("adapter"):
        rows.append(("adapter", f"{model['adapter']}{' (merged)' if model.get('merged') else ''}"))
    for key, value in report["summary"].items():
        rows.append((key, f"{value:.4f}" if isinstance(value, float) else str(value)))
    rows.append(("time_s", str(report.get("time_s"))))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)
