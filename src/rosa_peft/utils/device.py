"""Where a model lives: the device of its parameters (HF models' ``.device`` first), CPU for none; and
whether a tensor is a shard (FSDP2 / tensor parallelism) rather than the whole tensor."""
from __future__ import annotations

import contextlib

import torch

try:  # torch builds without distributed support have no DTensor
    from torch.distributed.tensor import DTensor as _DTensor
except ImportError:  # pragma: no cover
    _DTensor = None


def is_sharded(tensor) -> bool:
    """A DTensor (FSDP2 / tensor-parallel shard) rather than a plain tensor."""
    return _DTensor is not None and isinstance(tensor, _DTensor)


def model_device(model) -> torch.device:
    """``model.device`` when it is a torch device (HF models), else its first parameter's device, else CPU."""
    device = getattr(model, "device", None)
    if isinstance(device, torch.device):
        return device
    with contextlib.suppress(StopIteration, AttributeError):
        return next(model.parameters()).device
    return torch.device("cpu")
