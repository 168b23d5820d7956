"""Training recipes: named sets of defaults for the options that decide *how* a run trains.

``rosa train --recipe NAME`` (``TrainOptions.recipe``) fills every option listed in :class:`Recipe` that
was not given (as a flag, a ``--config`` key or a Python argument); an option given explicitly always
wins. Two recipes:

* ``default``: rosa-peft's own defaults (float32 weights and adapters, transformers' gradient clipping
  at 1.0 and token-level loss average) with the paper's learning rates and warm-ups.
* ``paper``: the reference's training semantics (IST-DASLab/RoSA with peft-rosa, checked against its
  code; ``docs/training.md`` lists every difference): bf16 base weights, bf16 adapters and therefore bf16
  AdamW state (no float32 master copy), no gradient clipping, the loss averaged per sequence (each
  sequence's mean over its response tokens, then the mean over the sequences of the accumulated
  batch), LoRA LR 7e-4 and sparse LR 2e-4, and the reference's 20 LR warm-up steps and 64 LoRA
  warm-up steps, scaled down to the run's length (the reference's runs are one epoch of at least 160
  optimizer steps of 32 sequences; a shorter run keeps the same *fractions*: 20/160 and 64/160).

Adding a recipe is one entry in :data:`RECIPES`. This module imports neither torch nor transformers.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Optional

LOSS_AVERAGES = ("token", "sequence")  # labelled_loss.REDUCTIONS (not imported: it needs torch and transformers)


@dataclass(frozen=True)
class Recipe:
    name: str
    help: str
    dtype: str  # base model weights
    adapter_dtype: str  # A, B and the sparse values (and so their AdamW state)
    max_grad_norm: float  # 0: no clipping
    loss_average: str  # one of LOSS_AVERAGES
    lr: float  # sparse values (every weight for fft)
    lora_lr: float
    lr_warmup_steps: int
    warmup_steps: int  # RoSA's LoRA-only steps before the masks are scored
    # warm-ups given for a run of this many optimizer steps: a shorter run scales them by its length
    # (never below 1, never above the given value); None: they are fixed step counts
    reference_steps: Optional[int] = None

    def scaled(self, steps: int, run_steps: int) -> int:
        """A warm-up of ``steps`` (given for :attr:`reference_steps`) for a run of ``run_steps`` steps."""
        if self.reference_steps is None or run_steps >= self.reference_steps:
            return steps
        return max(1, min(steps, round(steps * run_steps / self.reference_steps)))


# the options a recipe sets (TrainOptions fields of the same names)
RECIPE_OPTIONS = tuple(f.name for f in fields(Recipe) if f.name not in ("name", "help", "reference_steps"))
# of those, the warm-ups a recipe may scale to the run length
SCALED_OPTIONS = ("lr_warmup_steps", "warmup_steps")

RECIPES = {
    "default": Recipe(
        name="default", help="float32 weights and adapters, gradient clipping at 1.0, token-level loss average",
        dtype="float32", adapter_dtype="float32", max_grad_norm=1.0, loss_average="token",
        lr=2e-4, lora_lr=7e-4, lr_warmup_steps=20, warmup_steps=64),
    "paper": Recipe(
        name="paper", help="the reference's: bf16 weights, adapters and optimizer state, no clipping, per-sequence "
                           "loss average, warm-ups scaled to the run length",
        dtype="bfloat16", adapter_dtype="bfloat16", max_grad_norm=0.0, loss_average="sequence",
        lr=2e-4, lora_lr=7e-4, lr_warmup_steps=20, warmup_steps=64, reference_steps=160),
}


def get_recipe(name: str) -> Recipe:
    try:
        return RECIPES[name]
    except KeyError:
        raise ValueError(f"unknown recipe {name!r}; choose one of {', '.join(RECIPES)}") from None


__all__ = ["LOSS_AVERAGES", "RECIPES", "RECIPE_OPTIONS", "Recipe", "SCALED_OPTIONS", "get_recipe"]
