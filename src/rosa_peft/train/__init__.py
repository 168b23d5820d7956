"""Training: the one-process RoSA schedule on HF Trainer (or TRL's), optimizer groups, budgets, methods, `rosa train`.

The public names load on first use (PEP 562), so that ``rosa_peft.train.methods`` (the method registry,
read by the study, the benchmarks and ``rosa eval --compare``) imports neither transformers nor torch.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

# public name -> submodule defining it
_LAZY = {"RosaTrainer": "trainer", "ScheduleConfig": "schedule", "adapter_param_groups": "optim",
         "build_optimizer": "optim", "init_adapter_weights": "schedule", "resolve_budget": "budget",
         "METHODS": "methods", "Method": "methods", "rosa_trainer_class": "compose"}

if TYPE_CHECKING:
    from .budget import resolve_budget
    from .compose import rosa_trainer_class
    from .methods import METHODS, Method
    from .optim import adapter_param_groups, build_optimizer
    from .schedule import ScheduleConfig, init_adapter_weights
    from .trainer import RosaTrainer


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)


__all__ = ["METHODS", "Method", "RosaTrainer", "ScheduleConfig", "adapter_param_groups", "build_optimizer",
           "init_adapter_weights", "resolve_budget", "rosa_trainer_class"]
