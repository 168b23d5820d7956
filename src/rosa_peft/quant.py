"""QRoSA's public 1.x import path (``rosa_peft.quant``), kept for compatibility: re-exports only.

The code lives in :mod:`rosa_peft.bases`: the backend registry (``bases.QUANT_BACKENDS``) in
``bases/__init__.py``, each backend in its own module (``bases/torchao_nf4.py``, ``bases/bnb_4bit.py``)
and the model-level operations below in ``bases/quantize.py``. Nothing here is imported by
``import rosa_peft``; the backend libraries are imported only when asked for.
"""
from __future__ import annotations

from .bases.quantize import (
    BACKENDS,
    backend_available,
    dense_weight,
    ensure_registered,
    is_quantized,
    merge_and_requantize,
    quantize_model,
    register_loaded_backends,
)

__all__ = [
    "BACKENDS", "backend_available", "dense_weight", "ensure_registered", "is_quantized", "merge_and_requantize",
    "quantize_model", "register_loaded_backends",
]
