"""The methods the step-level benchmark compares, built at equal trainable parameters.

The budget is PEFT LoRA at rank ``lora_rank`` on all seven projections: ``sum r·(in + out)``.
* SHiRA at rank ``lora_rank`` has the same count by construction (``r·(in + out)`` entries per layer).
* RoSA at rank ``rosa_rank`` spends the rest on a sparse adapter at one uniform density ``d``.
* SpA (sparse only) and PEFT Super-Tuning with LoRA ("Supra") use the matching densities.
* FFT trains everything; its count is reported, not matched.
Masks for RoSA / SpA are random at the right density: which entries are chosen does not change speed.
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from .shapes import LINEAR_NAMES, adapted_shapes

STEP_METHODS = ("fft", "peft-lora", "peft-shira", "peft-supra", "lora", "spa", "rosa-merged", "rosa-sp_add")
QUANT_METHODS = ("peft-qlora", "qlora", "qspa", "qrosa", "qrosa-spmm", "qlora-bnb", "qspa-bnb", "qrosa-bnb",
                 "qrosa-bnb-spmm")
_BNB_METHODS = ("peft-qlora", "qlora-bnb", "qspa-bnb", "qrosa-bnb", "qrosa-bnb-spmm")
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
            raise ValueError(f"--budget-rank must be >= 1, got {lora_rank}")
        if not 0 <= rosa_rank < lora_rank:
            raise ValueError(f"--rosa-rank must be in [0, --budget-rank), got {rosa_rank} (lora rank {lora_rank})")
        for name, (o, i) in shapes.items():
            if lora_rank > min(o, i):
                raise ValueError(f"--budget-rank {lora_rank} exceeds min(out, in) = {min(o, i)} of {name}")
        numel = sum(o * i for o, i in shapes.values())
        target = sum(lora_rank * (o + i) for o, i in shapes.values())
        rosa_lora = sum(rosa_rank * (o + i) for o, i in shapes.values())
        b = cls(lora_rank, rosa_rank, dict(shapes), target)
        b.rosa_density = (target - rosa_lora) / numel
        b.spa_density = target / numel
        return b

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
    if method in ("qlora", "qspa", "qrosa", "qrosa-spmm"):
        from .. import quant

        if not quant.backend_available("torchao"):
            return "needs torchao for NF4 (pip install rosa-peft[quant])"
    if method in _BNB_METHODS:
        from .. import quant

        if not quant.backend_available("bnb"):
            return "needs bitsandbytes (pip install rosa-peft[bnb])"
    return None


def preload(method: str) -> None:
    """Import the libraries of *every* method (and the quant backend ``method`` needs), so that a
    memory baseline taken afterwards excludes library code equally for all methods."""
    from transformers import LlamaForCausalLM  # noqa: F401

    from .. import model  # noqa: F401
    from ..sparse import ops  # noqa: F401

    if have("peft"):
        import peft  # noqa: F401
        from peft import LoraConfig, ShiraConfig, SupertuningConfig  # noqa: F401
    if method in QUANT_METHODS:
        from .. import quant

        quant.ensure_registered(["bnb"] if method in _BNB_METHODS else ["torchao"])


def clear_mask_cache() -> None:
    _MASK_CACHE.clear()


# ---- builders: each takes a fresh base model and returns the model to train -------------------------
def _peft(model, config):
    from peft import get_peft_model

    return get_peft_model(model, config)


def _targets() -> list[str]:
    return list(LINEAR_NAMES)


def _build_fft(model, budget: Budget):
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def _build_peft_lora(model, budget: Budget):
    from peft import LoraConfig

    return _peft(model, LoraConfig(r=budget.lora_rank, lora_alpha=2 * budget.lora_rank, lora_dropout=0.0,
                                   target_modules=_targets(), bias="none"))


def _build_peft_shira(model, budget: Budget):
    from peft import ShiraConfig

    return _peft(model, ShiraConfig(r=budget.lora_rank, target_modules=_targets(), random_seed=0))


def _build_peft_supra(model, budget: Budget):
    from peft import SupertuningConfig

    r = budget.rosa_rank or None
    density = budget.rosa_density if r else budget.spa_density
    return _peft(model, SupertuningConfig(target_modules=_targets(), sparsity=1.0 - density, r=r,
                                          lora_alpha=(2 * r) if r else None))


def _rosa(model, budget: Budget, r: int, density: float, impl: str = "auto"):
    from ..config import RosaConfig
    from ..model import get_rosa_model

    cfg = RosaConfig(r=r, lora_alpha=2 * max(r, 1), density=density, target_modules=_targets(), impl=impl)
    rm = get_rosa_model(model, cfg)
    if density > 0:
        device = next(model.parameters()).device
        rm.set_masks(random_masks(budget, density, device=device))
    return rm


def _build_lora(model, budget):
    return _rosa(model, budget, budget.lora_rank, 0.0)


def _build_spa(model, budget):
    return _rosa(model, budget, 0, budget.spa_density)


def _build_rosa_merged(model, budget):
    return _rosa(model, budget, budget.rosa_rank, budget.rosa_density, "merged")


def _build_rosa_sp_add(model, budget):
    return _rosa(model, budget, budget.rosa_rank, budget.rosa_density, "sp_add")


def _quantized(model, backend: str):
    from ..quant import quantize_model

    dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
    return quantize_model(model, backend=backend, compute_dtype=dtype)


def _build_peft_qlora(model, budget):
    return _build_peft_lora(_quantized(model, "bnb"), budget)


def _build_qlora(model, budget):
    return _rosa(_quantized(model, "torchao"), budget, budget.lora_rank, 0.0)


def _build_qspa(model, budget):
    return _rosa(_quantized(model, "torchao"), budget, 0, budget.spa_density)


def _build_qrosa(model, budget):
    return _rosa(_quantized(model, "torchao"), budget, budget.rosa_rank, budget.rosa_density)


def _build_qrosa_spmm(model, budget):
    return _rosa(_quantized(model, "torchao"), budget, budget.rosa_rank, budget.rosa_density, "spmm")


def _build_qrosa_bnb_spmm(model, budget):
    return _rosa(_quantized(model, "bnb"), budget, budget.rosa_rank, budget.rosa_density, "spmm")


def _build_qlora_bnb(model, budget):
    return _rosa(_quantized(model, "bnb"), budget, budget.lora_rank, 0.0)


def _build_qspa_bnb(model, budget):
    return _rosa(_quantized(model, "bnb"), budget, 0, budget.spa_density)


def _build_qrosa_bnb(model, budget):
    return _rosa(_quantized(model, "bnb"), budget, budget.rosa_rank, budget.rosa_density)


BUILDERS: dict[str, Callable] = {
    "fft": _build_fft, "peft-lora": _build_peft_lora, "peft-shira": _build_peft_shira,
    "peft-supra": _build_peft_supra, "lora": _build_lora, "spa": _build_spa, "rosa-merged": _build_rosa_merged,
    "rosa-sp_add": _build_rosa_sp_add, "peft-qlora": _build_peft_qlora, "qlora": _build_qlora,
    "qspa": _build_qspa, "qrosa": _build_qrosa, "qlora-bnb": _build_qlora_bnb, "qspa-bnb": _build_qspa_bnb,
    "qrosa-bnb": _build_qrosa_bnb, "qrosa-spmm": _build_qrosa_spmm, "qrosa-bnb-spmm": _build_qrosa_bnb_spmm,
}


def build(method: str, base_factory: Callable[[], torch.nn.Module], budget: Budget):
    """A fresh base model wrapped by ``method``; returns (model, trainable parameters list)."""
    if method not in BUILDERS:
        raise ValueError(f"--methods: unknown method {method!r}; choose from {', '.join(ALL_METHODS)}")
    model = BUILDERS[method](base_factory(), budget)
    params = [p for p in model.parameters() if p.requires_grad]
    return model, params


def budget_for(model, lora_rank: int, rosa_rank: int) -> Budget:
    return Budget.for_shapes(adapted_shapes(model), lora_rank, rosa_rank)
