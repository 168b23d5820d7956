"""`rosa train`: fine-tune with RoSA / LoRA / SpA / FFT.

The flags are generated from :class:`rosa_peft.train.run.TrainOptions` (one per field, its help from
the field's metadata). Values layer as: the dataclass defaults, then a ``--config`` YAML file (keys
are the field names, e.g. ``max_seq_len``), then the flags given on the command line.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging

import yaml

from ..options import add_dataclass_arguments, coerce_mapping, find_config, packaged_configs
from ..utils.checks import UserError
from .run import TrainOptions, is_main_process, run_training


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE",
                   help="YAML file of options (keys: the flag names with underscores, e.g. max_seq_len); flags "
                        "override it. A name not found here is looked up among the packaged recipes: "
                        + ", ".join(packaged_configs()) + " (default: none)")
    add_dataclass_arguments(p, TrainOptions)


def _read_config(path: str) -> dict:
    path = find_config(path)
    try:
        with open(path, encoding="utf-8") as fh:
            loaded = yaml.safe_load(fh) or {}
    except yaml.YAMLError as exc:
        raise UserError(f"{path}: not valid YAML ({exc})") from None
    if not isinstance(loaded, dict):
        raise UserError(f"{path}: expected a mapping of option names to values")
    values = {str(k).replace("-", "_"): v for k, v in loaded.items()}
    known = {f.name for f in dataclasses.fields(TrainOptions)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise UserError(f"{path}: unknown option(s) {', '.join(unknown)}")
    return coerce_mapping(TrainOptions, values, path)


def options_from_args(args: argparse.Namespace) -> TrainOptions:
    """TrainOptions from the dataclass defaults < ``--config`` < the flags given."""
    values: dict = {}
    if getattr(args, "config", None):
        values.update(_read_config(args.config))
    values.update({k: v for k, v in vars(args).items() if k not in ("command", "config")})
    return TrainOptions(**values)


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("rosa_peft").setLevel(logging.INFO)
    opts = options_from_args(args)
    summary = run_training(opts)
    if not is_main_process() or summary.get("already_complete"):
        return 0  # a finished run: run_training has said so and changed nothing
    keys = ("method", "task", "r", "density", "trainable_params", "global_steps", "train_loss", "train_time_s")
    print(json.dumps({k: summary.get(k) for k in keys}, indent=2))
    print(f"wrote {opts.output_dir}")
    return 0
