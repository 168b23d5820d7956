"""The ``fisher`` criterion (the paper's default): mean over micro-batches of dW⊙dW (the diagonal Fisher)."""
from __future__ import annotations

import torch

from . import Criterion, register


def _square(dw: torch.Tensor) -> torch.Tensor:
    return dw.square_()


FISHER = register(Criterion("fisher", needs="gradients", fold=_square))
