"""AdamW over two parameter groups (sparse values at ``lr``, LoRA factors at ``lora_lr``), as the paper."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..roles import LORA, OTHER, SPARSE, params_by_role


def adapter_param_groups(model: nn.Module, lr: float, lora_lr: Optional[float] = None,
                         weight_decay: float = 0.0) -> list[dict]:
    """Trainable parameters split into ``sparse`` (values of S) and ``lora`` (A, B) groups; anything
    else that is trainable (full fine-tuning) joins a third group at ``lr``. Roles: :mod:`rosa_peft.roles`."""
    by_role = params_by_role(model)
    groups = []
    for role, group_lr in ((SPARSE, lr), (LORA, lora_lr or lr), (OTHER, lr)):
        if by_role[role]:
            groups.append({"params": [p for _, p in by_role[role]], "lr": group_lr, "weight_decay": weight_decay,
                           "name": role})
    if not groups:
        raise ValueError("the model has no trainable parameters")
    return groups


def build_optimizer(model: nn.Module, lr: float, lora_lr: Optional[float] = None, weight_decay: float = 0.0,
                    betas=(0.9, 0.999), eps: float = 1e-8) -> torch.optim.Optimizer:
    """``torch.optim.AdamW`` over :func:`adapter_param_groups` (what :class:`~rosa_peft.train.RosaTrainer` uses)."""
    return torch.optim.AdamW(adapter_param_groups(model, lr, lora_lr, weight_decay), lr=lr, betas=betas, eps=eps)
