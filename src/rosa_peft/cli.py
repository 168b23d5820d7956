"""`rosa` console script: a thin dispatcher; each subcommand lives beside the code it drives.

A subcommand module exposes ``add_arguments(parser)`` and ``run(args) -> int``. Modules are imported
only when their subcommand runs (or shows its --help), so ``rosa --help`` and ``rosa --version``
import neither torch nor transformers. An error the user must fix is one line and exit status 2
(:func:`user_error_message`); any other exception is a bug and keeps its traceback.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import sys

from . import __version__
from .options import HelpFormatter
from .utils.checks import UserError  # noqa: F401 - rosa_peft.cli.UserError stays importable

SUBCOMMANDS = {
    "train": ("rosa_peft.train.command", "fine-tune a model with RoSA / LoRA / SpA / FFT"),
    "eval": ("rosa_peft.eval.command", "evaluate a model or adapter on GSM8K / ViGGO / SQL / a JSONL file; "
                                       "compare runs"),
    "bench": ("rosa_peft.bench.command", "speed and memory benchmarks against PEFT LoRA"),
    "study": ("rosa_peft.study.command", "train and evaluate a grid of tasks x methods x budgets x seeds"),
    "export": ("rosa_peft.eval.export_command", "merge an adapter into its base model: a plain model for serving"),
    "demo": ("rosa_peft.demo", "fine-tune the embedded SmolLM2 with RoSA on the built-in task"),
    "convert-reference": ("rosa_peft.convert_reference", "convert a peft-rosa adapter to ours, or ours back to it"),
}


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser, but a bad flag is one line (``rosa train: error: argument --lr: ...``), no usage dump."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser(load: str | None = None) -> argparse.ArgumentParser:
    """The ``rosa`` parser; only subcommand ``load`` gets its options (importing its module)."""
    parser = ArgumentParser(prog="rosa", description="RoSA: robust adaptation (low-rank + sparse) "
                                     "fine-tuning", formatter_class=HelpFormatter)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text, formatter_class=HelpFormatter)
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
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, a bad flag: main() returns exit statuses
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
    if not args.command:
        parser.print_help()
        return 2
    module = importlib.import_module(SUBCOMMANDS[args.command][0])
    try:
        with _progress_bars(not getattr(args, "no_progress", False) and getattr(args, "progress", True) is not False):
            return int(module.run(args) or 0)
    except Exception as exc:  # noqa: BLE001 - sorted below: the user's mistake is one line, a bug keeps its traceback
        message = user_error_message(exc)
        if message is None or os.environ.get("ROSA_PEFT_DEBUG"):
            raise
        print(f"rosa {args.command}: error: {message}", file=sys.stderr)
        return 2


@contextlib.contextmanager
def _progress_bars(enabled: bool):
    """``--no-progress`` silences transformers' and huggingface_hub's own bars too (loading weights,
    downloads), not only rosa's; their previous state comes back afterwards."""
    if enabled:
        yield
        return
    from huggingface_hub import utils as hub_utils
    from transformers.utils import logging as hf_logging

    was_on = hf_logging.is_progress_bar_enabled(), not hub_utils.are_progress_bars_disabled()
    hf_logging.disable_progress_bar()
    hub_utils.disable_progress_bars()
    try:
        yield
    finally:
        if was_on[0]:
            hf_logging.enable_progress_bar()
        if was_on[1]:
            hub_utils.enable_progress_bars()


def user_error_message(exc: BaseException) -> str | None:
    """The one line ``rosa`` prints for an error the user must fix, or None for a bug (kept as a traceback).

    User errors: :class:`UserError` (input checks raise it on purpose; ``NonFiniteLossError`` is one), any
    ``OSError`` (a missing or existing file, a full disk), a file that is not JSON / UTF-8 text, and torch's
    failed-write ``RuntimeError``. Any other ``ValueError`` is a bug of rosa-peft (or of a library it calls)
    and keeps its traceback.
    """
    if isinstance(exc, (UserError, OSError, json.JSONDecodeError, UnicodeDecodeError)):
        return str(exc)
    if isinstance(exc, RuntimeError) and _is_write_failure(exc):  # torch.save: optimizer / scheduler states
        return f"could not write a file (is the disk full?): {_first_line(exc)}"
    return None


def _is_write_failure(exc: BaseException) -> bool:
    """torch's serializer (checkpoints: optimizer and scheduler states) wraps a failed write in RuntimeError."""
    text = str(exc)
    return isinstance(exc.__cause__, OSError) or "file write failed" in text or "failed writing file" in text


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[-1] if lines else type(exc).__name__


if __name__ == "__main__":
    raise SystemExit(main())
