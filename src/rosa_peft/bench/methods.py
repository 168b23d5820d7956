"""The methods the step-level benchmark compares, built at equal trainable parameters.

The budget is PEFT LoRA at rank ``lora_rank`` on all seven projections: ``sum r·(in + out)``.
* SHiRA at rank ``lora_rank`` has the same count by construction (``r·(in + out)`` entries per layer).
* RoSA at rank ``rosa_rank`` spends the rest on a sparse adapter at one uniform density ``d``.
* SpA (sparse only) and PEFT Super-Tuning with LoRA ("Supra") use the matching densities.
* FFT trains everything; its count is reported, not matched.
Masks for RoSA / SpA are random at the right density: which entries are chosen does not change speed.

The rosa-peft rows are :class:`Variant` s of the training methods (``rosa_peft.train.methods``: LoRA-only,
SpA, RoSA), optionally on a 4-bit base and with a chosen sparse ``impl``; their ``(r, density)`` at the
budget come from the same :meth:`~rosa_peft.train.methods.Method.at_budget` as ``rosa train --budget``.
The PEFT rows are built in ``peft_baselines`` (the only module that imports peft).
"""
from __future__ import annotations

import functools
import importlib.util
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from .. import quant
from ..config import RosaConfig
from ..model import get_rosa_model
from ..train.methods import METHODS
from ..utils.checks import UserError
from .shapes import LINEAR_NAMES, adapted_shapes

STEP_METHODS = ("fft", "peft-lora", "peft-shira", "peft-supra", "lora", "spa", "rosa-merged", "rosa-sp_add")
QUANT_METHODS = ("peft-qlora", "qlora", "qspa", "qrosa", "qrosa-spmm", "qlora-bnb", "qspa-bnb", "qrosa-bnb",
                 "qrosa-bnb-spmm")
ALL_METHODS = STEP_METHODS + QUANT_METHODS
REFERENCE = "peft-lora"

LABELS = {
    "fft": "FFT (full fine-tuning)",
    "peft-lora": "PEFT LoRA",
    "peft-shira": "PEFT SHiRA",
    "peft-supra": "PEFT Supra (Super-Tuning + LoRA)",
    "lora": "rosa-peft LoRA-only",
    "spa": "rosa-peft SpA (sparse only)",
    "rosa-merged": "rosa-peft RoSA merged",
    "rosa-sp_add": "rosa-peft RoSA sp_add",
    "peft-qlora": "PEFT QLoRA (bitsandbytes NF4)",
    "qlora": "rosa-peft QLoRA (torchao NF4)",
    "qspa": "rosa-peft QSpA (torchao NF4)",
    "qrosa": "rosa-peft QRoSA (torchao NF4, sp_add)",
    "qrosa-spmm": "rosa-peft QRoSA (torchao NF4, spmm)",
    "qlora-bnb": "rosa-peft QLoRA (bitsandbytes NF4)",
    "qspa-bnb": "rosa-peft QSpA (bitsandbytes NF4)",
    "qrosa-bnb": "rosa-peft QRoSA (bitsandbytes NF4, sp_add)",
    "qrosa-bnb-spmm": "rosa-peft QRoSA (bitsandbytes NF4, spmm)",
}


@dataclass(frozen=True)
class Variant:
    """A rosa-peft row: training method ``method`` (train.methods), on a base quantized by ``quant``
    (a quant backend, or None for the float base), with sparse implementation ``impl``."""

    method: str
    quant: Optional[str] = None
    impl: str = "auto"


VARIANTS = {
    "lora": Variant("lora"), "spa": Variant("spa"), "rosa-merged": Variant("rosa", impl="merged"),
    "rosa-sp_add": Variant("rosa", impl="sp_add"),
    "qlora": Variant("lora", "torchao"), "qspa": Variant("spa", "torchao"), "qrosa": Variant("rosa", "torchao"),
    "qrosa-spmm": Variant("rosa", "torchao", "spmm"),
    "qlora-bnb": Variant("lora", "bnb"), "qspa-bnb": Variant("spa", "bnb"), "qrosa-bnb": Variant("rosa", "bnb"),
    "qrosa-bnb-spmm": Variant("rosa", "bnb", "spmm"),
}
PEFT_QUANT = {"peft-qlora": "bnb"}  # PEFT rows on a quantized base: their quant backend
# quant backend -> why a row on it cannot run here
_NEEDS = {"torchao": "needs torchao for NF4 (pip install rosa-peft[quant])",
          "bnb": "needs bitsandbytes (pip install rosa-peft[bnb])"}


def base_quant(method: str) -> Optional[str]:
    """The quant backend of ``method``'s base model; None for a float base."""
    return VARIANTS[method].quant if method in VARIANTS else PEFT_QUANT.get(method)


def params_per_rank(shapes: dict) -> int:
    """Parameters of one LoRA rank over ``shapes`` ({module: (out, in)}): the sum of out + in."""
    return sum(o + i for o, i in shapes.values())


@dataclass
class Budget:
    """Equal-parameter configuration shared by all methods in one run."""

    lora_rank: int
    rosa_rank: int
    shapes: dict  # {module: (out, in)}
    target: int = 0  # trainable parameters of LoRA at lora_rank
    rosa_density: float = 0.0
    spa_density: float = 0.0
    notes: list = field(default_factory=list)

    @classmethod
    def for_shapes(cls, shapes: dict, lora_rank: int = 16, rosa_rank: int = 8) -> "Budget":
        if lora_rank < 1:
            raise UserError(f"--budget-rank must be >= 1, got {lora_rank}")
        if not 0 <= rosa_rank < lora_rank:
            raise UserError(f"--rosa-rank must be in [0, --budget-rank), got {rosa_rank} (lora rank {lora_rank})")
        for name, (o, i) in shapes.items():
            if lora_rank > min(o, i):
                raise UserError(f"--budget-rank {lora_rank} exceeds min(out, in) = {min(o, i)} of {name}")
        b = cls(lora_rank, rosa_rank, dict(shapes), lora_rank * params_per_rank(shapes))
        b.rosa_density = b.rank_density("rosa")[1]
        b.spa_density = b.rank_density("spa")[1]
        return b

    def rank_density(self, method: str) -> tuple[int, float]:
        """``(r, density)`` of training method ``method`` at this budget (as ``rosa train --budget``)."""
        return METHODS[method].at_budget(self.lora_rank, self.rosa_rank, params_per_rank(self.shapes), self.numel)

    @property
    def numel(self) -> int:
        return sum(o * i for o, i in self.shapes.values())

    def nnz(self, density: float) -> dict[str, int]:
        return {n: max(1, round(density * o * i)) for n, (o, i) in self.shapes.items()}

    def to_dict(self) -> dict:
        return {"lora_rank": self.lora_rank, "rosa_rank": self.rosa_rank, "target_trainable": self.target,
                "rosa_density": self.rosa_density, "spa_density": self.spa_density, "adapted_weights": self.numel,
                "adapted_modules": len(self.shapes)}


_MASK_CACHE: dict = {}


def random_masks(budget: Budget, density: float, device="cpu", seed: int = 0) -> dict[str, torch.Tensor]:
    """Bool masks with exactly round(density·numel) entries per layer (cached per density)."""
    key = (density, str(device), seed, tuple(sorted(budget.shapes.items())))
    if key not in _MASK_CACHE:
        gen = torch.Generator().manual_seed(seed)
        out = {}
        for name, k in budget.nnz(density).items():
            o, i = budget.shapes[name]
            flat = torch.zeros(o * i, dtype=torch.bool)
            flat[torch.randperm(o * i, generator=gen)[:k]] = True
            out[name] = flat.view(o, i).to(device)
        _MASK_CACHE.clear()  # one density at a time keeps memory bounded at 7B shapes
        _MASK_CACHE[key] = out
    return _MASK_CACHE[key]


def trainable_count(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def have(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def requirement(method: str) -> Optional[str]:
    """None when ``method`` can run here, else a one-line reason."""
    if method.startswith("peft-") and not have("peft"):
        return "needs the 'peft' package (pip install rosa-peft[bench])"
    backend = base_quant(method)
    if backend is not None and not quant.backend_available(backend):
        return _NEEDS[backend]
    return None


def preload(method: str) -> None:
    """Import the libraries of *every* method (and the quant backend ``method`` needs), so that a
    memory baseline taken afterwards excludes library code equally for all methods (rosa-peft's own
    modules are imported with this one)."""
    from transformers import LlamaForCausalLM  # noqa: F401

    if have("peft"):
        from . import peft_baselines  # noqa: F401  (peft itself)
    if method in QUANT_METHODS:
        quant.ensure_registered([base_quant(method)])


def clear_mask_cache() -> None:
    _MASK_CACHE.clear()


# ---- builders: each takes a fresh base model and returns the model to train -------------------------
def _quantized(model, backend: Optional[str]):
    if backend is None:
        return model
    dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
    return quant.quantize_model(model, backend=backend, compute_dtype=dtype)


def _build_fft(model, budget: Budget):
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def _build_peft(name: str, model, budget: Budget):
    from . import peft_baselines  # peft is optional: imported only for a PEFT row

    return peft_baselines.BUILDERS[name](_quantized(model, PEFT_QUANT.get(name)), budget)


def _build_variant(variant: Variant, model, budget: Budget):
    """A rosa-peft row: the (quantized) base wrapped at the budget's (r, density) of the variant's method."""
    model = _quantized(model, variant.quant)
    r, density = budget.rank_density(variant.method)
    cfg = RosaConfig(r=r, lora_alpha=2 * max(r, 1), density=density, target_modules=list(LINEAR_NAMES),
                     impl=variant.impl)
    rm = get_rosa_model(model, cfg)
    if density > 0:
        device = next(model.parameters()).device
        rm.set_masks(random_masks(budget, density, device=device))
    return rm


BUILDERS: dict[str, Callable] = {
    "fft": _build_fft,
    **{name: functools.partial(_build_peft, name) for name in ALL_METHODS if name.startswith("peft-")},
    **{name: functools.partial(_build_variant, variant) for name, variant in VARIANTS.items()},
}


def build(method: str, base_factory: Callable[[], torch.nn.Module], budget: Budget):
    """A fresh base model wrapped by ``method``; returns (model, trainable parameters list)."""
    if method not in BUILDERS:
        raise UserError(f"--methods: unknown method {method!r}; choose from {', '.join(ALL_METHODS)}")
    model = BUILDERS[method](base_factory(), budget)
    params = [p for p in model.parameters() if p.requires_grad]
    return model, params


def budget_for(model, lora_rank: int, rosa_rank: int) -> Budget:
    return Budget.for_shapes(adapted_shapes(model), lora_rank, rosa_rank)
