"""``--budget N``: choose r and d so LoRA, SpA and RoSA train about the same number of parameters.

As in the paper's tables, a budget is anchored on LoRA: N is rounded to the nearest whole LoRA rank
(one rank costs Σ(in + out) over the target layers), and that count is what every method spends.
LoRA takes all of it as rank, SpA all of it as density, and RoSA splits it — by default half low-rank,
half sparse (the paper's r=16, d=0.6% cell at its 80M budget has that shape); ``rosa_lora_fraction``
moves the split (the paper's mixes run from 1/4 to 3/4). The per-method split is
:meth:`rosa_peft.train.methods.Method.split_budget`.
"""
from __future__ import annotations

from torch import nn

from ..targets import find_targets
from .methods import METHODS, not_budgeted
from ..utils.checks import UserError


def budget_units(model: nn.Module, target_modules="all-linear", exclude_modules=None) -> tuple[int, int]:
    """(parameters per unit of LoRA rank, total weight entries) over the target layers."""
    per_rank = total = 0
    for name in find_targets(model, target_modules, exclude_modules):
        m = model.get_submodule(name)
        per_rank += m.in_features + m.out_features
        total += m.in_features * m.out_features
    return per_rank, total


def check_rosa_lora_fraction(rosa_lora_fraction: float) -> None:
    if not (0.0 < rosa_lora_fraction < 1.0):
        raise UserError(f"rosa_lora_fraction must be in (0, 1), got {rosa_lora_fraction}")


def resolve_budget(method: str, budget: int, per_rank: int, total: int,
                   rosa_lora_fraction: float = 0.5) -> tuple[int, float]:
    """Return (r, density) for ``method`` (a name in METHODS with an adapter) at ``budget`` trainable parameters."""
    check_rosa_lora_fraction(rosa_lora_fraction)
    lora_rank = round(budget / per_rank)
    if lora_rank < 1:
        raise UserError(f"budget {budget:,} is too small: one LoRA rank over the target layers costs {per_rank:,} "
                         f"parameters, so the smallest budget is {per_rank:,}")
    if method not in METHODS:
        raise not_budgeted(method)
    return METHODS[method].split_budget(budget, lora_rank, per_rank, total, rosa_lora_fraction)
