"""The ``grad`` criterion: |mean over micro-batches of dW|."""
from __future__ import annotations

import torch

from . import Criterion, register


def _magnitude(mean: torch.Tensor) -> torch.Tensor:
    return mean.abs_()


GRAD = register(Criterion("grad", needs="gradients", finish=_magnitude))
