"""rosa-peft: RoSA (Robust Adaptation) fine-tuning with a PEFT-shaped API."""
from .config import RosaConfig
from .layer import RosaLinear
from .masks import compute_masks, load_masks, save_masks
from .model import RosaModel, get_rosa_model
from .models import load_model

__version__ = "0.1.0"


def quantize_model(model, *args, **kwargs):
    """4-bit NF4 base for QRoSA; see :func:`rosa_peft.quant.quantize_model` (imported on first call)."""
    from .quant import quantize_model as _quantize_model

    return _quantize_model(model, *args, **kwargs)


__all__ = [
    "RosaConfig", "RosaLinear", "RosaModel", "get_rosa_model", "load_model", "quantize_model",
    "compute_masks", "save_masks", "load_masks", "__version__",
]
