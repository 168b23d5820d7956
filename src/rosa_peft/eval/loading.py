"""Loading what ``rosa eval`` evaluates: a base model, optionally quantized, with an optional adapter.

Every check that can fail on bad input (adapter files, quantize backend) runs before the model is
loaded, so a mistake is reported in a second rather than after the model load.
"""
from __future__ import annotations

import os
from typing import Optional

from ..io import read_json_object

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
QUANTIZE_CHOICES = ("nf4",)


def check_adapter_dir(adapter_dir: str) -> str:
    """``adapter_dir`` as an absolute path; FileNotFoundError/ValueError name the missing or bad file."""
    path = os.path.abspath(os.path.expanduser(adapter_dir))
    if not os.path.isdir(path):
        raise FileNotFoundError(f"adapter directory {adapter_dir} does not exist")
    missing = [f for f in ADAPTER_FILES if not os.path.isfile(os.path.join(path, f))]
    if missing:
        hint = ""
        if os.path.isfile(os.path.join(path, "config.json")):
            hint = " (it looks like a full model, e.g. from --method fft: pass it as --model instead)"
        raise FileNotFoundError(f"adapter directory {adapter_dir} has no {' or '.join(missing)}{hint}")
    read_json_object(os.path.join(path, ADAPTER_FILES[0]))  # a clear error for a broken config
    return path


def _quantizer(quantize: Optional[str], backend: str):
    """The quantize function, after checking the choice and that the backend package imports."""
    if quantize is None:
        return None
    if quantize not in QUANTIZE_CHOICES:
        raise ValueError(f"unknown --quantize {quantize!r}; choose from {', '.join(QUANTIZE_CHOICES)}")
    import rosa_peft

    fn = getattr(rosa_peft, "quantize_model", None)
    if fn is None:
        raise ValueError(f"--quantize {quantize} is not available: this rosa_peft build has no quantize_model")
    try:
        from ..quant import BACKENDS, backend_available
    except ImportError:
        return fn
    if backend not in BACKENDS:
        raise ValueError(f"unknown --quant-backend {backend!r}; choose from {', '.join(BACKENDS)}")
    if not backend_available(backend):
        pkg = {"torchao": "torchao", "bnb": "bitsandbytes"}.get(backend, backend)
        raise ValueError(f"--quantize {quantize} with --quant-backend {backend} needs the {pkg} package "
                         f"(pip install {pkg}), which is not importable")
    return fn


def load_for_eval(model: Optional[str] = None, adapter: Optional[str] = None, dtype: str = "float32",
                  device: Optional[str] = None, merge: bool = False, quantize: Optional[str] = None,
                  quant_backend: str = "torchao"):
    """``(model, tokenizer, info)``: base model (+ quantization) (+ adapter, merged if asked).

    ``quantize="nf4"`` quantizes the base with ``rosa_peft.quantize_model(backend=quant_backend)``
    (as ``rosa train --quantize nf4`` does) before the adapter is attached, unmerged, as the paper's
    4-bit evaluation did. ``info`` records what was loaded (``model``, ``adapter``, ``merged``,
    ``quantize``, ``dtype``, ``device``).
    """
    adapter_path = check_adapter_dir(adapter) if adapter else None
    quantize_fn = _quantizer(quantize, quant_backend)
    if merge and adapter_path is None:
        raise ValueError("--merge needs --adapter")
    import torch

    from ..models import load_model

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    base, tokenizer = load_model(model, dtype=dtype, device=device)
    if quantize_fn is not None:
        base = quantize_fn(base, backend=quant_backend)
    wrapped = base
    if adapter_path is not None:
        from ..model import RosaModel

        wrapped = RosaModel.from_pretrained(base, adapter_path, is_trainable=False)
        wrapped.to(device)
        if merge:
            wrapped = wrapped.merge_and_unload()
    wrapped.eval()
    info = {"model": model or "smollm2-135m (embedded)", "adapter": adapter_path, "merged": bool(merge),
            "quantize": f"{quantize} ({quant_backend})" if quantize else None, "dtype": dtype, "device": str(device)}
    return wrapped, tokenizer, info
