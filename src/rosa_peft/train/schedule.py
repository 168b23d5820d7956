"""The RoSA schedule, as data: which phases run and how masks are obtained.

``rosa``       N LoRA-only warm-up steps -> score gradients for ``mask_grad_steps`` steps -> masks ->
               fresh LoRA init (same seed) -> train LoRA + sparse from step 0 on the same LR schedule.
``lora_only``  no masks; LoRA trains from step 0.
``spa_only``   masks from the pretrained model (no warm-up), then sparse-only training.
``masks_file`` masks loaded from a file, then LoRA + sparse training.
The reference needs two launches (it exits after writing masks); here one process runs it all.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional

import torch
from torch import nn

from ..layer import RosaLayer
from ..utils.checks import UserError, check_choice, check_int

MODES = ("rosa", "lora_only", "spa_only", "masks_file")


@dataclass
class ScheduleConfig:
    mode: str = "rosa"
    warmup_steps: int = 64  # LoRA-only steps before scoring (the paper's wl64)
    mask_grad_steps: int = 1  # optimizer steps of gradients to accumulate (spa_num_grads)
    mask_criterion: str = "fisher"
    mask_budget: str = "per_layer"
    masks_path: Optional[str] = None
    seed: int = 42

    def __post_init__(self):
        check_choice("schedule mode", self.mode, MODES)
        check_int("warmup_steps", self.warmup_steps, minimum=0)
        check_int("mask_grad_steps", self.mask_grad_steps, minimum=1)
        if self.mode == "masks_file" and not self.masks_path:
            raise UserError("schedule mode 'masks_file' needs masks_path")
        if self.mode == "spa_only":
            self.warmup_steps = 0

    @property
    def needs_masks(self) -> bool:
        return self.mode != "lora_only"

    @property
    def scores_gradients(self) -> bool:
        return self.mode in ("rosa", "spa_only")

    def to_dict(self) -> dict:
        return asdict(self)


def init_adapter_weights(model: nn.Module, seed: int) -> None:
    """Fresh LoRA init of every RoSA layer from ``seed`` (deterministic, independent of global RNG)."""
    gen = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, RosaLayer):
            for name in module.lora_A:
                a = module.lora_A[name].weight
                g = gen if a.device.type == "cpu" else torch.Generator(a.device).manual_seed(int(torch.randint(0, 2**62, (1,), generator=gen)))
                module.reset_lora_parameters(name, generator=g)
