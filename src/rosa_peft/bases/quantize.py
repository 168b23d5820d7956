"""QRoSA's model-level operations over the quantization backends: quantize, merge and re-quantize, read.

Every function loops over (or looks up) ``bases.QUANT_BACKENDS``; what a backend does lives in its own
module (``torchao_nf4.py``, ``bnb_4bit.py``), imported only when asked for. Each backend contributes a
4-bit :class:`~rosa_peft.bases.BaseKind` (``supports_merged=False``), so ``RosaLinear`` runs the
``sp_add`` path: per call the 4-bit weight is de-quantised into a fresh temporary, S is added into it,
one GEMM runs, plus LoRA; backward de-quantises again. No dense copy outlives the step.

* ``quantize_model(model, backend="torchao"|"bnb", ...)`` converts a model's Linear layers in place.
* ``ensure_registered()`` registers the kinds of every importable backend (``quantize_model`` calls
  it); ``bases.resolve_base_kind`` registers the backends whose library is already imported, so an
  already-quantized model works with ``get_rosa_model`` / ``RosaModel.from_pretrained`` as it is.
* ``merge_and_requantize(rosa_model)``: ``merge_and_unload()`` then NF4 again (rounds; warns).
"""
from __future__ import annotations

import warnings
from typing import Iterable

import torch
from torch import nn

from ..layer import RosaLinear
from ..utils.checks import UserError
from . import QUANT_BACKENDS, QUANT_KINDS, backend_of_kind, register_loaded_backends, resolve_base_kind

BACKENDS = tuple(QUANT_BACKENDS)
COMPUTE_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def _check_backend_name(backend: str) -> None:
    if backend not in QUANT_BACKENDS:
        raise UserError(f"unknown quantization backend {backend!r}; choose one of {', '.join(BACKENDS)}")


def backend_available(backend: str) -> bool:
    _check_backend_name(backend)
    return QUANT_BACKENDS[backend].available()


def _require(backend: str):
    """The backend's module, its kinds registered; ImportError naming the package when not importable."""
    _check_backend_name(backend)
    mod = QUANT_BACKENDS[backend].load()
    if mod is None:
        pkg = QUANT_BACKENDS[backend].package
        raise ImportError(f"backend={backend!r} needs the {pkg} package (pip install {pkg}), which is not importable")
    return mod


def ensure_registered(backends: Iterable[str] = BACKENDS) -> list[str]:
    """Register the base kinds of the given (importable) backends; returns the registered ones."""
    backends = tuple(backends)
    for b in backends:
        _check_backend_name(b)
    return [b for b in backends if QUANT_BACKENDS[b].available()]


def is_quantized(module: nn.Module) -> bool:
    base = module.base_layer if isinstance(module, RosaLinear) else module
    kind = resolve_base_kind(base)
    return kind is not None and kind.name in QUANT_KINDS


def dense_weight(module: nn.Module, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A fresh dense copy of a (RosaLinear's) base weight, de-quantised if 4-bit: for magnitude scores."""
    if isinstance(module, RosaLinear):
        kind, base = module.kind, module.base_layer
    else:
        kind, base = resolve_base_kind(module), module
        if kind is None:
            raise TypeError(f"dense_weight: {type(module).__name__} is not a Linear of a known kind")
    with torch.no_grad():
        w = kind.to_dense(kind.weight(base), dtype)
        return w if kind.fresh_dense else w.clone()


# ---- quantize_model --------------------------------------------------------------------------------
def _matches(spec, name: str) -> bool:
    return any(name == t or name.endswith("." + t) for t in spec)


def _tied_ids(model: nn.Module) -> set[int]:
    return {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}


def _quantizable(model: nn.Module, skip_modules) -> list[tuple[str, nn.Linear]]:
    tied = _tied_ids(model)
    out = []
    for name, m in model.named_modules():
        if not isinstance(m, nn.Linear) or _matches(skip_modules, name) or is_quantized(m):
            continue
        if id(m.weight) in tied:  # an output head tied to the embeddings stays float with them
            continue
        out.append((name, m))
    return out


def _validate_layer(name: str, m: nn.Linear, block_size: int) -> None:
    w = m.weight
    if type(w.data) is not torch.Tensor or w.dtype not in COMPUTE_DTYPES:
        raise UserError(f"quantize_model: layer {name!r} has an unsupported weight dtype {w.dtype} "
                         f"({type(w.data).__name__}); NF4 needs float32, bfloat16 or float16")
    if w.is_meta:
        raise UserError(f"quantize_model: layer {name!r} is on the meta device (load its weights first)")
    if m.in_features % block_size:
        raise UserError(f"quantize_model: layer {name!r} has in_features={m.in_features}, not divisible by the "
                         f"quantization block size {block_size}; add it to skip_modules or change block_size")


def _replace(model: nn.Module, name: str, old: nn.Module, new: nn.Module) -> None:
    """Put a backend's quantized module in ``old``'s place (torchao converts in place: nothing to do)."""
    if new is not old:
        model.set_submodule(name, new)


def quantize_model(model: nn.Module, backend: str = "torchao", skip_modules: Iterable[str] = ("lm_head",),
                   compute_dtype: torch.dtype = torch.bfloat16, block_size: int = 64, *,
                   scaler_block_size: int = 256, double_quant: bool = True) -> nn.Module:
    """Convert ``model``'s ``nn.Linear`` layers to 4-bit NF4 in place and return ``model``.

    ``skip_modules`` (exact names or dotted suffixes), embeddings and an output head tied to them stay in
    the model's float dtype. The weight is cast to ``compute_dtype`` and quantized in blocks of
    ``block_size`` along each row, with double quantization of the block scales (torchao always; bnb
    ``compress_statistics=double_quant``). De-quantisation returns ``compute_dtype``. Everything is
    checked before any layer changes.
    """
    _check_backend_name(backend)
    if compute_dtype not in COMPUTE_DTYPES:
        raise UserError(f"quantize_model: compute_dtype {compute_dtype} is unsupported; use bfloat16, float16 or float32")
    if not isinstance(block_size, int) or block_size <= 0 or block_size % 2:
        raise UserError(f"quantize_model: block_size must be a positive even int, got {block_size!r}")
    entry = QUANT_BACKENDS[backend]
    if entry.block_sizes is not None and block_size not in entry.block_sizes:
        raise UserError(f"quantize_model: {entry.package} supports block sizes {entry.block_sizes}, got {block_size}")
    if isinstance(skip_modules, str):
        skip_modules = (skip_modules,)
    skip_modules = tuple(skip_modules or ())
    mod = _require(backend)
    wrapped = [n for n, m in model.named_modules() if isinstance(m, RosaLinear)]
    if wrapped:
        raise UserError(f"quantize_model: {wrapped[0]!r} already carries a RoSA adapter; quantize the base "
                         "model before get_rosa_model")
    layers = _quantizable(model, skip_modules)
    for name, m in layers:  # validate everything first: a bad layer leaves the model untouched
        _validate_layer(name, m, block_size)
    for name, m in layers:
        _replace(model, name, m, mod.quantize(m, compute_dtype, block_size, scaler_block_size=scaler_block_size,
                                              double_quant=double_quant))
    return model


# ---- merging ---------------------------------------------------------------------------------------
def merge_and_requantize(rosa_model, safe_merge: bool = False) -> nn.Module:
    """``merge_and_unload()`` then re-quantize the formerly 4-bit layers (same backend and block size).

    NF4 rounding applies to ``W_deq + S + s·B·A`` again, so outputs differ from the unmerged model by
    about the quantization error (PEFT warns the same for its bnb 4-bit merge).
    """
    specs = {}
    for key, layer in rosa_model.rosa_layers():
        entry = backend_of_kind(layer.kind.name)
        if entry is not None:
            mod = _require(entry.name)
            specs[key] = (mod, mod.spec(layer.base_layer))
    warnings.warn("merge_and_requantize: re-quantizing the merged weights to NF4 rounds them again; outputs "
                  "may differ from the unmerged adapter. Use merge_and_unload() for an exact (dequantized) merge.",
                  UserWarning, stacklevel=2)
    model = rosa_model.merge_and_unload(safe_merge=safe_merge)
    for key, (mod, spec) in specs.items():
        m = model.get_submodule(key)
        _replace(model, key, m, mod.quantize(m, **spec))
    return model


__all__ = [
    "BACKENDS", "backend_available", "dense_weight", "ensure_registered", "is_quantized", "merge_and_requantize",
    "quantize_model", "register_loaded_backends",
]
