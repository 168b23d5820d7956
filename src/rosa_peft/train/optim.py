"""AdamW over two parameter groups (sparse values at ``lr``, LoRA factors at ``lora_lr``), as the paper."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn


def adapter_param_groups(model: nn.Module, lr: float, lora_lr: Optional[float] = None,
                         weight_decay: float = 0.0) -> list[dict]:
    """Trainable parameters split into ``sparse`` (values of S) and ``lora`` (A, B) groups; anything
    else that is trainable (full fine-tuning) joins a third group at ``lr``."""
    sparse, lora, other = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if ".rosa_spa." in name:
            sparse.append(p)
        elif ".lora_A." in name or ".lora_B." in name:
            lora.append(p)
        else:
            other.append(p)
    groups = []
    for group_name, params, group_lr in (("sparse", sparse, lr), ("lora", lora, lora_lr or lr), ("other", other, lr)):
        if params:
            groups.append({"params": params, "lr": group_lr, "weight_decay": weight_decay, "name": group_name})
    if not groups:
        raise ValueError("the model has no trainable parameters")
    return groups


def build_optimizer(model: nn.Module, lr: float, lora_lr: Optional[float] = None, weight_decay: float = 0.0,
                    betas=(0.9, 0.999), eps: float = 1e-8) -> torch.optim.Optimizer:
    return torch.optim.AdamW(adapter_param_groups(model, lr, lora_lr, weight_decay), lr=lr, betas=betas, eps=eps)
