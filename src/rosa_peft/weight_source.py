"""Weight sources: how ``W + S`` reaches the fused Function's two GEMMs (merged, sp_add, spmm, S alone).

A source is handed to :func:`rosa_peft.function.rosa_linear` / ``rosa_embedding`` with the base weight
(the tensor a :class:`~rosa_peft.bases.BaseKind` exposes), the sparse structure ``sp`` and its
``values``; it returns ``x·(W+S)ᵀ``, ``g·(W+S)`` or the dense ``W + S`` (the :class:`WeightSource`
protocol). Which one a layer uses is ``RosaLinear``'s choice (its ``impl``).
"""
from __future__ import annotations

from typing import Optional, Protocol

import torch

from . import sparse
from .bases import BaseKind


class WeightSource(Protocol):
    """What the fused Functions ask of a source (``sp``: a ``SparseAdapter`` or None; ``values``: its
    values or None; ``dtype``: the compute dtype)."""

    def dense(self, weight: torch.Tensor, sp, values: Optional[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
        """The dense ``W + S`` in ``dtype`` (may be the base weight itself: do not modify it)."""

    def matmul(self, x: torch.Tensor, weight: torch.Tensor, sp, values: Optional[torch.Tensor],
               dtype: torch.dtype) -> torch.Tensor:
        """``x·(W+S)ᵀ``."""

    def matmul_t(self, g: torch.Tensor, weight: torch.Tensor, sp, values: Optional[torch.Tensor],
                 dtype: torch.dtype, acc: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``g·(W+S)``, added into ``acc`` when given."""


class _DenseSource:
    """A source that hands the fused Function a dense W (+ S): both products are plain GEMMs on it."""

    def matmul(self, x, weight, sp, values, dtype):
        return x @ self.dense(weight, sp, values, dtype).t()

    def matmul_t(self, g, weight, sp, values, dtype, acc=None):
        w = self.dense(weight, sp, values, dtype)
        return g @ w if acc is None else acc.addmm_(g, w)


class MergedSource(_DenseSource):
    """The base weight already holds W0 + S: use it as is."""

    def __init__(self, kind: BaseKind):
        self.kind = kind

    def dense(self, weight, sp, values, dtype):
        return self.kind.to_dense(weight, dtype)


class SpAddSource(_DenseSource):
    """Build W + S in a temporary (rounded in the base dtype, exactly as ``merged`` stores it)."""

    def __init__(self, kind: BaseKind):
        self.kind = kind

    def dense(self, weight, sp, values, dtype):
        if sp is None or values is None or values.numel() == 0:
            return self.kind.to_dense(weight, dtype)
        if self.kind.fresh_dense:  # e.g. a de-quantised 4-bit weight: add S into that temporary
            return sparse.add_into(self.kind.to_dense(weight, dtype), sp, values)
        # the weight itself (float bases): add S into a copy in the base dtype, then cast
        w = self.kind.to_dense(weight, weight.dtype).clone(memory_format=torch.contiguous_format)
        sparse.add_into(w, sp, values)
        return w if w.dtype == dtype else w.to(dtype)


class SparseOnlySource(_DenseSource):
    """S alone as a dense temporary (no base weight): the extra adapters of a multi-adapter forward."""

    def dense(self, weight, sp, values, dtype):
        w = torch.zeros(sp.shape, dtype=dtype, device=values.device)
        return sparse.add_into(w, sp, values)


class QuantSpmmSource:
    """4-bit bases without a dense ``W + S``: x·Wᵀ and g·W through the base kind's own 4-bit matmuls
    (bounded, per-call de-quantisation), x·Sᵀ and g·S as SpMMs on the CSR (g·S over the cached transposed
    structure), each added in float32 with a single rounding. ``dense`` (for callers that want W + S) is
    ``SpAddSource``'s."""

    def __init__(self, kind: BaseKind):
        self.kind = kind

    def dense(self, weight, sp, values, dtype):
        return SpAddSource(self.kind).dense(weight, sp, values, dtype)

    @staticmethod
    def _has_sparse(sp, values) -> bool:
        return sp is not None and values is not None and values.numel() > 0

    def matmul(self, x, weight, sp, values, dtype):
        out = self.kind.matmul(weight, x, dtype)
        if self._has_sparse(sp, values):
            out = out.add_(sparse.spmm(x, sp, values, out_dtype=_acc_dtype(dtype)))
        return out

    def matmul_t(self, g, weight, sp, values, dtype, acc=None):
        acc = self.kind.matmul_t(weight, g, dtype, acc)
        if self._has_sparse(sp, values):
            acc = acc.add_(sparse.spmm_t(g, sp, values, out_dtype=_acc_dtype(dtype)))
        return acc


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


__all__ = ["MergedSource", "QuantSpmmSource", "SpAddSource", "SparseOnlySource", "WeightSource"]
