"""Training: the one-process RoSA schedule on HF Trainer, optimizer groups, budgets, `rosa train`."""
from .budget import resolve_budget
from .optim import adapter_param_groups, build_optimizer
from .schedule import ScheduleConfig, init_adapter_weights
from .trainer import RosaTrainer

__all__ = ["RosaTrainer", "ScheduleConfig", "adapter_param_groups", "build_optimizer", "init_adapter_weights",
           "resolve_budget"]
