"""`rosa train`: fine-tune with RoSA / LoRA / SpA / FFT. Flags override a YAML --config."""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging

from .run import METHODS, TrainOptions, is_main_process, run_training

S = argparse.SUPPRESS


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML file of options (same names as the flags, with underscores)")
    p.add_argument("--model", default=S, help="HF id or local path (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--task", default=S, help="gsm8k | viggo | sql | sql-synth (built-in, default) | jsonl")
    p.add_argument("--data-dir", dest="data_dir", default=S, help="folder with the task data (default $ROSA_PEFT_DATA_DIR)")
    p.add_argument("--train-split", dest="train_split", default=S)
    p.add_argument("--limit", type=int, default=S, help="use only the first N training examples")
    p.add_argument("--prompt-field", dest="prompt_field", default=S, help="jsonl task: prompt field")
    p.add_argument("--response-field", dest="response_field", default=S, help="jsonl task: response field")
    # checked by run.validate (one error line, like every other bad value) rather than by argparse choices
    p.add_argument("--method", default=S, help=" | ".join(METHODS) + " (default rosa)")
    p.add_argument("--r", "--rank", dest="r", type=int, default=S,
                   help="LoRA rank (--rank: the same, for torchrun, whose parser rejects --r as ambiguous)")
    p.add_argument("--density", type=float, default=S, help="sparse density d (fraction of each weight)")
    p.add_argument("--budget", type=int, default=S, help="trainable-parameter budget: picks r / d per method")
    p.add_argument("--rosa-lora-fraction", dest="rosa_lora_fraction", type=float, default=S,
                   help="share of a --budget that RoSA spends on the low-rank part (default 0.5)")
    p.add_argument("--lora-alpha", dest="lora_alpha", type=float, default=S)
    p.add_argument("--lora-dropout", dest="lora_dropout", type=float, default=S)
    p.add_argument("--impl", choices=("auto", "merged", "sp_add"), default=S)
    p.add_argument("--epochs", type=float, default=S)
    p.add_argument("--max-steps", dest="max_steps", type=int, default=S, help="optimizer steps (overrides --epochs)")
    p.add_argument("--lr", type=float, default=S, help="learning rate of the sparse values (and FFT)")
    p.add_argument("--lora-lr", dest="lora_lr", type=float, default=S, help="learning rate of the LoRA factors")
    p.add_argument("--lr-warmup-steps", dest="lr_warmup_steps", type=int, default=S)
    p.add_argument("--batch-size", dest="batch_size", type=int, default=S, help="micro-batch size")
    p.add_argument("--grad-accum", dest="grad_accum", type=int, default=S)
    p.add_argument("--max-seq-len", dest="max_seq_len", type=int, default=S)
    p.add_argument("--mask-criterion", dest="mask_criterion", choices=("fisher", "grad", "magnitude", "random"), default=S)
    p.add_argument("--mask-budget", dest="mask_budget", choices=("per_layer", "global"), default=S)
    p.add_argument("--warmup-steps", dest="warmup_steps", type=int, default=S, help="LoRA-only steps before masks")
    p.add_argument("--mask-grad-steps", dest="mask_grad_steps", type=int, default=S)
    p.add_argument("--masks", default=S, help="use masks from this file instead of scoring gradients")
    p.add_argument("--output-dir", dest="output_dir", default=S)
    p.add_argument("--seed", type=int, default=S)
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default=S, help="base model dtype")
    p.add_argument("--bf16", action="store_true", default=S, help="bf16 autocast")
    p.add_argument("--gradient-checkpointing", dest="gradient_checkpointing", action="store_true", default=S)
    p.add_argument("--save-steps", dest="save_steps", type=int, default=S, help="checkpoint every N steps (0 = never)")
    p.add_argument("--resume", action="store_true", default=S, help="continue from the last checkpoint in --output-dir")
    p.add_argument("--quantize", choices=("none", "nf4"), default=S, help="4-bit NF4 base (QRoSA)")
    p.add_argument("--quant-backend", dest="quant_backend", choices=("torchao", "bnb"), default=S)
    p.add_argument("--no-progress", dest="progress", action="store_false", default=S)


def options_from_args(args: argparse.Namespace) -> TrainOptions:
    values: dict = {}
    if getattr(args, "config", None):
        import yaml

        try:
            with open(args.config, encoding="utf-8") as fh:
                loaded = yaml.safe_load(fh) or {}
        except FileNotFoundError:
            raise FileNotFoundError(f"config file {args.config!r} does not exist") from None
        except yaml.YAMLError as exc:
            raise ValueError(f"{args.config}: not valid YAML ({exc})") from None
        if not isinstance(loaded, dict):
            raise ValueError(f"{args.config}: expected a mapping of option names to values")
        values.update({k.replace("-", "_"): v for k, v in loaded.items()})
    values.update({k: v for k, v in vars(args).items() if k not in ("command", "config")})
    known = {f.name for f in dataclasses.fields(TrainOptions)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown option(s) in {args.config or 'flags'}: {', '.join(unknown)}")
    return TrainOptions(**values)


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("rosa_peft").setLevel(logging.INFO)
    opts = options_from_args(args)
    summary = run_training(opts)
    if not is_main_process():
        return 0
    keys = ("method", "task", "r", "density", "trainable_params", "global_steps", "train_loss", "train_time_s")
    print(json.dumps({k: summary[k] for k in keys}, indent=2))
    print(f"wrote {opts.output_dir}")
    return 0
