"""Loading what ``rosa eval`` evaluates: a base model, optionally quantized, with an optional adapter.

Every check that can fail on bad input (adapter files, quantize backend) runs before the model is
loaded, so a mistake is reported in a second rather than after the model load.
"""
from __future__ import annotations

import os
from typing import Optional

from ..bases import QUANT_BACKENDS, QUANT_SCHEMES
from ..utils.checks import UserError
from ..utils.io import read_json_object

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
QUANTIZE_CHOICES = QUANT_SCHEMES


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
        raise UserError(f"unknown --quantize {quantize!r}; choose from {', '.join(QUANTIZE_CHOICES)}")
    import rosa_peft

    fn = getattr(rosa_peft, "quantize_model", None)
    if fn is None:
        raise UserError(f"--quantize {quantize} is not available: this rosa_peft build has no quantize_model")
    if backend not in QUANT_BACKENDS:
        raise UserError(f"unknown --quant-backend {backend!r}; choose from {', '.join(QUANT_BACKENDS)}")
    from .. import quant  # imports torch: only once a quantized load is asked for

    if not quant.backend_available(backend):
        pkg = QUANT_BACKENDS[backend].package
        raise UserError(f"--quantize {quantize} with --quant-backend {backend} needs the {pkg} package "
                         f"(pip install {pkg}), which is not importable")
    return fn


def cpu_supports_bf16() -> bool:
    """Whether this CPU has native bf16 matmul (AVX512-BF16 or AMX-BF16): there bf16 is ~2-4x faster."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            flags = set(f.read().split())
    except OSError:
        return False
    return bool(flags & {"avx512_bf16", "amx_bf16"})


def resolve_eval_dtype(dtype: str, device: str) -> str:
    """``dtype``, with ``"auto"`` resolved: bfloat16 where the device computes it natively, else float32.

    bf16 changes the numbers, so greedy outputs can differ from a float32 evaluation; it is opt-in."""
    if dtype != "auto":
        return dtype
    import torch

    if str(device).startswith("cuda"):
        return "bfloat16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "float32"
    return "bfloat16" if str(device) == "cpu" and cpu_supports_bf16() else "float32"


def default_merge(adapter: Optional[str], quantize: Optional[str]) -> bool:
    """Merge by default: yes for an adapter on a float base (same outputs up to rounding, no adapter
    overhead per token: decode steps were ~1.7x slower unmerged), no on a quantized base (the paper
    evaluated its 4-bit QRoSA adapters unmerged) or without an adapter."""
    return adapter is not None and quantize is None


def load_for_eval(model: Optional[str] = None, adapter: Optional[str] = None, dtype: str = "float32",
                  device: Optional[str] = None, merge: Optional[bool] = None, quantize: Optional[str] = None,
                  quant_backend: str = "torchao"):
    """``(model, tokenizer, info)``: base model (+ quantization) (+ adapter, merged unless told not to).

    ``merge=None`` (the default) merges a float adapter (:func:`default_merge`) and keeps an adapter on
    a quantized base unmerged; ``True`` / ``False`` force it (``True`` needs an adapter).
    ``quantize="nf4"`` quantizes the base with ``rosa_peft.quantize_model(backend=quant_backend)``
    (as ``rosa train --quantize nf4`` does) before the adapter is attached, unmerged, as the paper's
    4-bit evaluation did. ``dtype="auto"``: :func:`resolve_eval_dtype`. ``info`` records what was
    loaded (``model``, ``adapter``, ``merged``, ``quantize``, ``dtype``, ``device``).
    """
    adapter_path = check_adapter_dir(adapter) if adapter else None
    quantize_fn = _quantizer(quantize, quant_backend)
    if merge and adapter_path is None:
        raise UserError("--merge needs --adapter")
    if merge is None:
        merge = default_merge(adapter_path, quantize)
    import torch

    from ..utils.model_loading import load_model

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = resolve_eval_dtype(dtype, device)
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
