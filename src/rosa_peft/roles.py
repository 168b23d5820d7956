"""Which part of a RoSA model each parameter is: sparse values, LoRA factors, or anything else.

The roles come from the layer contract, not from parameter-name substrings: a RoSA layer (like PEFT's
``BaseTunerLayer``) lists the attributes holding its adapters in ``adapter_layer_names``; a parameter
under one of them is ``sparse`` when it belongs to a :class:`~rosa_peft.sparse.storage.SparseAdapter`
and ``lora`` otherwise. Every other parameter (the base model's weights, ``modules_to_save`` copies)
is ``other``. (torchtune's ``get_adapter_params`` walks modules the same way.)
"""
from __future__ import annotations

from torch import nn

from .sparse.storage import SparseAdapter

SPARSE, LORA, OTHER = "sparse", "lora", "other"
ROLES = (SPARSE, LORA, OTHER)


def adapter_modules(module: nn.Module):
    """The adapter containers of ``module`` (``module.<name>`` for each of its ``adapter_layer_names``)."""
    for attr in getattr(module, "adapter_layer_names", ()):
        container = getattr(module, attr, None)
        if isinstance(container, nn.Module):
            yield container


def param_roles(model: nn.Module) -> dict[int, str]:
    """``{id(parameter): SPARSE or LORA}`` for every adapter parameter of ``model``."""
    roles = {}
    for module in model.modules():
        for container in adapter_modules(module):
            for sub in container.modules():
                role = SPARSE if isinstance(sub, SparseAdapter) else LORA
                for p in sub.parameters(recurse=False):
                    roles[id(p)] = role
    return roles


def params_by_role(model: nn.Module, trainable_only: bool = True) -> dict[str, list[tuple[str, nn.Parameter]]]:
    """``{role: [(name, parameter), ...]}`` for every role in :data:`ROLES`, in ``named_parameters`` order."""
    roles = param_roles(model)
    out: dict[str, list] = {role: [] for role in ROLES}
    for name, p in model.named_parameters():
        if p.requires_grad or not trainable_only:
            out[roles.get(id(p), OTHER)].append((name, p))
    return out
