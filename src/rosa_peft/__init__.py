"""rosa-peft: RoSA (Robust Adaptation) fine-tuning with a PEFT-shaped API."""
from .config import RosaConfig
from .layer import RosaLinear
from .model import RosaModel, get_rosa_model
from .models import load_model

__version__ = "0.1.0"

__all__ = ["RosaConfig", "RosaLinear", "RosaModel", "get_rosa_model", "load_model", "__version__"]
