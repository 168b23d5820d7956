"""`rosa` console script: a thin dispatcher; each subcommand lives beside the code it drives.

A subcommand module exposes ``add_arguments(parser)`` and ``run(args) -> int``. Modules are imported
only when their subcommand runs, so ``rosa --help`` stays fast and optional extras stay optional.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import sys

SUBCOMMANDS = {
    "train": ("rosa_peft.train.command", "fine-tune a model with RoSA / LoRA / SpA / FFT"),
    "eval": ("rosa_peft.eval.command", "evaluate a model or adapter on GSM8K / ViGGO / SQL; compare runs"),
    "bench": ("rosa_peft.bench.command", "speed and memory benchmarks against PEFT LoRA"),
    "study": ("rosa_peft.study.command", "train and evaluate a grid of tasks x methods x budgets x seeds"),
    "demo": ("rosa_peft.demo", "fine-tune the embedded SmolLM2 with RoSA on the built-in task"),
}


class UserError(Exception):
    """Bad input from the user: printed as one line, exit status 2, no traceback."""


def _available() -> dict:
    out = {}
    for name, (module, help_text) in SUBCOMMANDS.items():
        try:
            found = importlib.util.find_spec(module) is not None
        except ModuleNotFoundError:  # its parent package is not installed either
            found = False
        if found:
            out[name] = (module, help_text)
    return out


def build_parser(load: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rosa", description="RoSA: robust adaptation (low-rank + sparse) fine-tuning")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in _available().items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == load:
            importlib.import_module(module).add_arguments(p)
    return parser


# Optional backends that transformers' Trainer imports log load failures of kernels that cannot
# exist on this machine (CUDA-only .so files, hub kernels); the CLI keeps only their errors.
_QUIET_LOGGERS = ("torchao", "bitsandbytes", "torch.utils._pytree")


def main(argv: list[str] | None = None) -> int:
    import logging

    for name in _QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(load=command if command in SUBCOMMANDS else None)
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 2
    module = importlib.import_module(_available()[args.command][0])
    try:
        return int(module.run(args) or 0)
    except (UserError, OSError, ValueError) as exc:  # a missing / existing file, bad values
        if os.environ.get("ROSA_PEFT_DEBUG"):
            raise
        print(f"rosa {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
