"""Where a model lives: the device of its parameters (HF models' ``.device`` first), CPU for none."""
from __future__ import annotations

import contextlib

import torch


def model_device(model) -> torch.device:
    """``model.device`` when it is a torch device (HF models), else its first parameter's device, else CPU."""
    device = getattr(model, "device", None)
    if isinstance(device, torch.device):
        return device
    with contextlib.suppress(StopIteration, AttributeError):
        return next(model.parameters()).device
    return torch.device("cpu")
