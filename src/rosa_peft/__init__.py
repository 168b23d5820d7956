"""rosa-peft: RoSA (Robust Adaptation) fine-tuning with a PEFT-shaped API."""
from .auto import AutoRosaModel, AutoRosaModelForCausalLM, AutoRosaModelForSequenceClassification
from .config import RosaConfig
from .embedding import RosaEmbedding
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
from .models import load_model
from .modules_to_save import ModulesToSaveWrapper

__version__ = "0.1.0"


def quantize_model(model, *args, **kwargs):
    """4-bit NF4 base for QRoSA; see :func:`rosa_peft.quant.quantize_model` (imported on first call)."""
    from .quant import quantize_model as _quantize_model

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
    "compute_masks", "get_layer_status", "get_model_status", "get_rosa_model", "get_rosa_model_state_dict",
    "load_masks", "load_model", "quantize_model", "save_masks", "set_rosa_model_state_dict", "__version__",
]
