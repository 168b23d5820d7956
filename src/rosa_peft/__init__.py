"""rosa-peft: RoSA (Robust Adaptation) fine-tuning with a PEFT-shaped API.

The public names are imported on first use (PEP 562), so ``import rosa_peft`` (and the ``rosa``
console script's ``--help`` / ``--version``) does not import torch or transformers.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

# public name -> submodule defining it
_LAZY = {
    "AutoRosaModel": "auto", "AutoRosaModelForCausalLM": "auto", "AutoRosaModelForSequenceClassification": "auto",
    "RosaConfig": "config",
    "RosaEmbedding": "embedding",
    "MergeCheckError": "export", "export_merged": "export",
    "RosaLayer": "layer", "RosaLinear": "layer",
    "compute_masks": "masks", "load_masks": "masks", "save_masks": "masks",
    "RosaModel": "model", "TunerLayerStatus": "model", "TunerModelStatus": "model", "get_rosa_model": "model",
    "get_rosa_model_state_dict": "model", "set_rosa_model_state_dict": "model",
    "load_model": "utils.model_loading",
    "ModulesToSaveWrapper": "modules_to_save",
}

if TYPE_CHECKING:  # for type checkers and IDEs; at run time these resolve through __getattr__
    from .auto import AutoRosaModel, AutoRosaModelForCausalLM, AutoRosaModelForSequenceClassification
    from .config import RosaConfig
    from .embedding import RosaEmbedding
    from .export import MergeCheckError, export_merged
    from .layer import RosaLayer, RosaLinear
    from .masks import compute_masks, load_masks, save_masks
    from .model import (
        RosaModel,
        TunerLayerStatus,
        TunerModelStatus,
        get_rosa_model,
        get_rosa_model_state_dict,
        set_rosa_model_state_dict,
    )
    from .modules_to_save import ModulesToSaveWrapper
    from .utils.model_loading import load_model


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__():
    return sorted(set(globals()) | set(_LAZY))


def quantize_model(model, *args, **kwargs):
    """4-bit NF4 base for QRoSA; see :func:`rosa_peft.bases.quantize.quantize_model` (imported on first call)."""
    from .bases.quantize import quantize_model as _quantize_model

    return _quantize_model(model, *args, **kwargs)


def get_layer_status(model) -> list:
    """PEFT's ``get_layer_status`` for a :class:`RosaModel`."""
    return model.get_layer_status()


def get_model_status(model):
    """PEFT's ``get_model_status`` for a :class:`RosaModel`."""
    return model.get_model_status()


__all__ = [
    "AutoRosaModel", "AutoRosaModelForCausalLM", "AutoRosaModelForSequenceClassification", "ModulesToSaveWrapper",
    "RosaConfig", "RosaEmbedding", "RosaLayer", "RosaLinear", "RosaModel", "TunerLayerStatus", "TunerModelStatus",
    "compute_masks", "export_merged", "MergeCheckError", "get_layer_status", "get_model_status", "get_rosa_model", "get_rosa_model_state_dict",
    "load_masks", "load_model", "quantize_model", "save_masks", "set_rosa_model_state_dict", "__version__",
]
