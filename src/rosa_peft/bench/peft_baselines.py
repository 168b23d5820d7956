"""The PEFT rows of the step benchmark (LoRA, SHiRA, Super-Tuning with LoRA): the only module that imports peft.

Each builder takes a fresh base model (already quantized for PEFT QLoRA) and the shared
:class:`~rosa_peft.bench.methods.Budget`, and returns the PEFT model to train.
"""
from __future__ import annotations

from peft import LoraConfig, ShiraConfig, SupertuningConfig, get_peft_model

from .shapes import LINEAR_NAMES


def lora(model, budget):
    return get_peft_model(model, LoraConfig(r=budget.lora_rank, lora_alpha=2 * budget.lora_rank, lora_dropout=0.0,
                                            target_modules=list(LINEAR_NAMES), bias="none"))


def shira(model, budget):
    return get_peft_model(model, ShiraConfig(r=budget.lora_rank, target_modules=list(LINEAR_NAMES), random_seed=0))


def supra(model, budget):
    r = budget.rosa_rank or None
    density = budget.rosa_density if r else budget.spa_density
    return get_peft_model(model, SupertuningConfig(target_modules=list(LINEAR_NAMES), sparsity=1.0 - density, r=r,
                                                   lora_alpha=(2 * r) if r else None))


def train_lora(model, r: int, lora_alpha: float, lora_dropout: float, keep_base_dtype: bool):
    """PEFT LoRA on every linear layer (the train bench's baseline row); ``keep_base_dtype``: adapters in the
    base's dtype (``autocast_adapter_dtype=False``) instead of PEFT's default float32."""
    return get_peft_model(model, LoraConfig(r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                                            target_modules="all-linear"), autocast_adapter_dtype=not keep_base_dtype)


# benchmark method name -> builder (peft-qlora is LoRA on a bitsandbytes 4-bit base)
BUILDERS = {"peft-lora": lora, "peft-shira": shira, "peft-supra": supra, "peft-qlora": lora}
