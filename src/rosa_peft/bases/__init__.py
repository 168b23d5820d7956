"""Base kinds: how to read a wrapped layer's weight (float, Conv1D, 4-bit NF4), and their registries.

A :class:`BaseKind` tells ``RosaLinear`` how to get a dense float weight out of the layer it wraps and
what it may do with it. One file per kind (``float.py``, ``torchao_nf4.py``, ``bnb_4bit.py``); this
module holds only the registries and imports neither torch nor a quantization library:

* ``BASE_KINDS`` / :func:`register_base_kind` / :func:`resolve_base_kind` / :func:`base_shape`: which
  kind a module is. The kinds register themselves lazily: ``resolve_base_kind`` loads the module of
  ours for every library in ``_LAZY_BACKENDS`` that is already imported (a 4-bit layer cannot exist
  before its library is imported, so this never imports torchao or bitsandbytes itself).
* ``QUANT_BACKENDS``: the ``quantize_model(backend=...)`` choices (``--quant-backend``), each knowing its
  pip package, its module and whether it is importable. ``QUANT_SCHEMES`` lists ``--quantize`` schemes.
"""
from __future__ import annotations

import importlib
import sys
from dataclasses import dataclass
from types import ModuleType
from typing import TYPE_CHECKING, Callable, Optional

if TYPE_CHECKING:
    import torch
    from torch import nn


@dataclass
class BaseKind:
    name: str
    matches: Callable[[nn.Module], bool]
    weight: Callable[[nn.Module], torch.Tensor]  # the (out, in) tensor handed to the autograd Function
    to_dense: Callable[[torch.Tensor, torch.dtype], torch.Tensor]  # may return the tensor itself (fresh_dense)
    supports_merged: bool  # W0 + S can be written into the base weight in place (impl="merged")
    compute_dtype: Callable[[nn.Module], torch.dtype]
    shape: Optional[Callable[[nn.Module], tuple]] = None  # (out, in); default: in_/out_features
    # 4-bit bases: the base's own matmuls, (weight, x, dtype) -> x·Wᵀ and (weight, g, dtype, acc) -> acc + g·W,
    # with no de-quantised weight outliving the call (QRoSA's ``spmm`` implementation)
    matmul: Optional[Callable] = None
    matmul_t: Optional[Callable] = None
    # to_dense always returns a fresh tensor the caller may modify (de-quantising kinds); False: it may
    # return the weight itself, so a caller that writes into it must copy first
    fresh_dense: bool = False


# ---- the base-kind registry ------------------------------------------------------------------------
BASE_KINDS: list[BaseKind] = []  # in match order; filled lazily (see resolve_base_kind)

_REGISTERED: dict[str, bool] = {}  # our backend module -> its kinds are registered (False: not importable)


def register_base_kind(kind: BaseKind, *, fallback: bool = False) -> None:
    """Add ``kind`` (replacing one of the same name) ahead of the others, or after them (``fallback``)."""
    BASE_KINDS[:] = [k for k in BASE_KINDS if k.name != kind.name]
    if fallback:
        BASE_KINDS.append(kind)
    else:
        BASE_KINDS.insert(0, kind)


def load_backend(module: str) -> Optional[ModuleType]:
    """Import one backend module of ours and let it register its kinds (once); None if not importable."""
    try:
        mod = importlib.import_module(module)
    except ImportError:  # the backend modules turn any failure of their library's import into this
        _REGISTERED[module] = False
        return None
    if not _REGISTERED.get(module):
        mod.register()
        _REGISTERED[module] = True
    return mod


def register_loaded_backends() -> None:
    """Register the kinds of every backend whose library is already imported (by anyone); cheap."""
    for top, module in _LAZY_BACKENDS.items():
        if module not in _REGISTERED and top in sys.modules:
            load_backend(module)


def resolve_base_kind(module: nn.Module) -> Optional[BaseKind]:
    register_loaded_backends()
    for kind in BASE_KINDS:
        if kind.matches(module):
            return kind
    return None


def base_shape(kind: BaseKind, module: nn.Module) -> tuple:
    """(out, in) of the weight a kind exposes."""
    if kind.shape is not None:
        return tuple(kind.shape(module))
    return (module.out_features, module.in_features)


# ---- the quantization backends ---------------------------------------------------------------------
@dataclass(frozen=True)
class QuantBackend:
    """One ``quantize_model(backend=...)`` choice. Its module defines ``KIND_NAME``, ``register()``,
    ``quantize(linear, compute_dtype, block_size, *, scaler_block_size, double_quant)`` (the module to
    put in the Linear's place) and ``spec(base)`` (the ``quantize`` keywords that re-create ``base``)."""

    name: str  # the --quant-backend spelling
    package: str  # the pip package, also its top-level import name
    module: str  # the module of ours that implements it
    kind: str  # the name of the BaseKind it registers
    block_sizes: Optional[tuple] = None  # the only block sizes it supports (None: any positive even int)

    def load(self) -> Optional[ModuleType]:
        """The backend module with its kinds registered, or None when its package is not importable."""
        return load_backend(self.module)

    def available(self) -> bool:
        return self.load() is not None


QUANT_SCHEMES = ("nf4",)
QUANT_BACKENDS: dict[str, QuantBackend] = {
    b.name: b for b in (
        QuantBackend("torchao", "torchao", "rosa_peft.bases.torchao_nf4", kind="torchao-nf4"),
        QuantBackend("bnb", "bitsandbytes", "rosa_peft.bases.bnb_4bit", kind="bnb-4bit",
                     block_sizes=(32, 64, 128, 256, 512, 1024, 2048, 4096)),
    )
}
QUANT_KINDS = tuple(b.kind for b in QUANT_BACKENDS.values())
# top-level library -> the module of ours that registers the kinds built on it (its ``register()``)
_LAZY_BACKENDS = {"torch": "rosa_peft.bases.float", **{b.package: b.module for b in QUANT_BACKENDS.values()}}


def backend_of_kind(kind_name: str) -> Optional[QuantBackend]:
    """The quantization backend whose kind is called ``kind_name`` (None for float kinds)."""
    return next((b for b in QUANT_BACKENDS.values() if b.kind == kind_name), None)


__all__ = [
    "BASE_KINDS", "BaseKind", "QUANT_BACKENDS", "QUANT_KINDS", "QUANT_SCHEMES", "QuantBackend", "backend_of_kind",
    "base_shape", "load_backend", "register_base_kind", "register_loaded_backends", "resolve_base_kind",
]
