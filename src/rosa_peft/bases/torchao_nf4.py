"""The torchao NF4 base kind: an ``nn.Linear`` whose weight is a torchao ``NF4Tensor``; quantize and spec.

The only module that imports torchao. Importing it raises ImportError when torchao (or its NF4 tensor)
is not importable; ``bases.QUANT_BACKENDS["torchao"]`` loads it on demand.
"""
from __future__ import annotations

import importlib
import math
from typing import Optional

import torch
import torchao  # noqa: F401  (ImportError here: the backend is not available)
from torch import nn

from . import QUANT_BACKENDS, BaseKind, register_base_kind

KIND_NAME = QUANT_BACKENDS["torchao"].kind
_NF4_PATHS = ("torchao.quantization.quantize_.workflows.nf4.nf4_tensor", "torchao.dtypes.nf4tensor")


def _nf4_module():
    """The torchao module defining ``NF4Tensor`` / ``to_nf4`` (its path moved between releases)."""
    for path in _NF4_PATHS:
        try:
            mod = importlib.import_module(path)
        except ImportError:
            continue
        if hasattr(mod, "NF4Tensor") and hasattr(mod, "to_nf4"):
            return mod
    raise ImportError("torchao with an NF4 tensor (NF4Tensor / to_nf4) is not importable")


nf4 = _nf4_module()
NF4Tensor = nf4.NF4Tensor


def _matches(m: nn.Module) -> bool:
    return isinstance(m, nn.Linear) and isinstance(m.weight, NF4Tensor)


def _to_dense(w, dtype: torch.dtype) -> torch.Tensor:
    # a fresh tensor in the NF4 tensor's own dtype (as torchao's linear_nf4 de-quantises), then cast
    return w.get_original_weight().to(dtype)


def _matmul(w, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return x @ _to_dense(w, dtype).t()  # torchao's linear_nf4: de-quantise per call, one GEMM


def _matmul_t(w, g: torch.Tensor, dtype: torch.dtype, acc: Optional[torch.Tensor] = None) -> torch.Tensor:
    deq = _to_dense(w, dtype)
    return g @ deq if acc is None else acc.addmm_(g, deq)


KIND = BaseKind(name=KIND_NAME, matches=_matches, weight=lambda m: m.weight, to_dense=_to_dense,
                supports_merged=False, compute_dtype=lambda m: m.weight.dtype, matmul=_matmul, matmul_t=_matmul_t,
                fresh_dense=True)


def register() -> None:
    register_base_kind(KIND)


def _scaler_block(n_blocks: int, wanted: int) -> int:
    """torchao double-quantises the per-block scales in groups that must divide their count."""
    return math.gcd(n_blocks, wanted)


def quantize(m: nn.Linear, compute_dtype: torch.dtype, block_size: int, *, scaler_block_size: int = 256,
             double_quant: bool = True) -> nn.Linear:
    """``m`` itself, its weight now NF4 (torchao always double-quantises; ``double_quant`` is ignored)."""
    w = m.weight.detach().to(compute_dtype).contiguous()
    q = nf4.to_nf4(w, block_size, _scaler_block(w.numel() // block_size, scaler_block_size))
    m.weight = nn.Parameter(q, requires_grad=False)
    return m


def spec(base: nn.Module) -> dict:
    """The :func:`quantize` keywords that quantize a merged ``base`` the way it was."""
    w = base.weight
    return {"block_size": w.block_size, "scaler_block_size": w.scaler_block_size, "compute_dtype": w.dtype}
