"""PyTorch implementations of the sparse ops (CPU and GPU, any float dtype).

Conventions: ``grad_out`` is (T, out), ``x`` is (T, in); a sparse adapter covers an (out, in) weight.
All results that are gradients of the sparse values come back in float32 or float64 (accumulated in
at least float32), the caller casts them to the values' dtype.
"""
from __future__ import annotations

import warnings

import torch

from .storage import SparseAdapter

# Bound on the dense (rows x active cols) block the chunked SDDMM materialises at once (elements).
DEFAULT_CHUNK_ELEMENTS = 1 << 24


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def sddmm_dense_gather(
    grad_out: torch.Tensor, x: torch.Tensor, sp: SparseAdapter, chunk_elements: int = DEFAULT_CHUNK_ELEMENTS
) -> torch.Tensor:
    """(grad_outᵀ · x) at the mask positions, via dense GEMMs over row chunks.

    Structure-aware: only rows and columns that hold non-zeros take part (RoSA masks concentrate in a
    subset of rows and columns), and the dense block is chunked over rows so at most
    ``chunk_elements`` entries live at once.
    """
    acc = _acc_dtype(grad_out.dtype)
    rows = sp.row_indices()
    cols = sp.col_indices.to(torch.int64)
    out = torch.empty(sp.nnz, dtype=acc, device=grad_out.device)
    if sp.nnz == 0:
        return out
    active_cols, col_pos = torch.unique(cols, return_inverse=True)
    x_active = x.index_select(1, active_cols).to(acc)  # (T, C)
    row_counts = sp.row_offsets.to(torch.int64).diff()
    active_rows = torch.nonzero(row_counts, as_tuple=True)[0]
    offsets = sp.row_offsets.to(torch.int64)
    n_cols = max(1, active_cols.numel())
    step = max(1, chunk_elements // n_cols)
    for start in range(0, active_rows.numel(), step):
        block_rows = active_rows[start : start + step]
        g = grad_out.index_select(1, block_rows).to(acc).t() @ x_active  # (R, C)
        lo = int(offsets[block_rows[0]])
        hi = int(offsets[block_rows[-1] + 1])
        local_row = torch.searchsorted(block_rows, rows[lo:hi])
        out[lo:hi] = g[local_row, col_pos[lo:hi]]
    return out


def sddmm_dense_lowp(grad_out: torch.Tensor, x: torch.Tensor, sp: SparseAdapter,
                     chunk_elements: int = DEFAULT_CHUNK_ELEMENTS) -> torch.Tensor:
    """(grad_outᵀ · x) at the mask positions from the dense dW = grad_outᵀ · x in the inputs' 16-bit dtype.

    For bf16 / fp16 operands on CPU: one GEMM in that dtype (AMX / AVX-512-BF16 kernels, float32
    accumulation inside, the product rounded to the 16-bit dtype as the reference's bf16 gradients are),
    then a gather, returned in float32. The GEMM reads both operands in place (a transposed view costs
    nothing), where torch's CSR SDDMM needs float32 copies of both with the token axis contiguous; for
    small weights the whole GEMM costs less than those copies (see ``dispatch.DENSE_LOWP_MAX_SIZE``).
    Row chunks bound the dense block to ``chunk_elements``.
    """
    out = torch.empty(sp.nnz, dtype=torch.float32, device=grad_out.device)
    if sp.nnz == 0:
        return out
    flat = sp.flat_indices()
    x = x.to(grad_out.dtype)
    in_f = sp.in_features
    step = max(1, chunk_elements // max(1, in_f))
    offsets = sp.row_offsets.to(torch.int64)
    for start in range(0, sp.out_features, step):
        stop = min(sp.out_features, start + step)
        lo, hi = int(offsets[start]), int(offsets[stop])
        if lo == hi:
            continue
        block = grad_out[:, start:stop].t() @ x  # (rows, in)
        out[lo:hi] = block.view(-1)[flat[lo:hi] - start * in_f]
    return out


def _csr64(sp: SparseAdapter) -> tuple[torch.Tensor, torch.Tensor]:
    """int64 (row_offsets, col_indices), cached: torch's CSR kernels want int64 and converting per call costs."""
    return sp._cached("csr64", lambda: (sp.row_offsets.to(torch.int64), sp.col_indices.to(torch.int64)))


def _csr_tensor(crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor, size) -> torch.Tensor:
    """A CSR tensor over our own (already valid) indices, without torch's beta / invariant-check warnings."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta", category=UserWarning)
        warnings.filterwarnings("ignore", message="Sparse invariant checks are implicitly disabled", category=UserWarning)
        return torch.sparse_csr_tensor(crow, col, values, size=size, check_invariants=False)


def _transposed(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t.t()`` as a contiguous tensor in ``dtype``: the cast and the transpose in one pass over memory."""
    return t.t().to(dtype, memory_format=torch.contiguous_format)


def sddmm_sampled_addmm(grad_out: torch.Tensor, x: torch.Tensor, sp: SparseAdapter) -> torch.Tensor:
    """(grad_outᵀ · x) at the mask positions with ``torch.sparse.sampled_addmm`` (float32/64 CSR).

    The CPU kernel wants both operands with the token axis contiguous ((out, T) and (in, T)); each is
    produced by one fused cast + transpose, and ``x`` is handed over as a transposed view so the kernel
    does not copy it again.
    """
    acc = _acc_dtype(grad_out.dtype)
    if sp.nnz == 0:
        return torch.empty(0, dtype=acc, device=grad_out.device)
    crow, col = _csr64(sp)
    pattern = _csr_tensor(crow, col, torch.zeros(sp.nnz, dtype=acc, device=grad_out.device), size=sp.shape)
    res = torch.sparse.sampled_addmm(pattern, _transposed(grad_out, acc), _transposed(x, acc).t(), beta=0.0)
    return res.values()


def add_into(dense: torch.Tensor, sp: SparseAdapter, values: torch.Tensor) -> torch.Tensor:
    """dense[mask] += values (in place, in dense's dtype); returns dense."""
    if sp.nnz:
        dense.view(-1).index_add_(0, sp.flat_indices(), values.to(dense.dtype))
    return dense


def write_into(dense: torch.Tensor, sp: SparseAdapter, values: torch.Tensor) -> torch.Tensor:
    """dense[mask] = values (in place); returns dense."""
    if sp.nnz:
        dense.view(-1).index_copy_(0, sp.flat_indices(), values.to(dense.dtype))
    return dense


def _coords(sp: SparseAdapter) -> tuple[torch.Tensor, torch.Tensor]:
    return sp.row_indices(), sp.col_indices.to(torch.int64)


def add_into_strided(dense: torch.Tensor, sp: SparseAdapter, values: torch.Tensor) -> torch.Tensor:
    """:func:`add_into` for a non-contiguous ``dense`` (indexing by (row, col) instead of flat positions)."""
    if sp.nnz:
        dense.index_put_(_coords(sp), values.to(dense.dtype), accumulate=True)
    return dense


def write_into_strided(dense: torch.Tensor, sp: SparseAdapter, values: torch.Tensor) -> torch.Tensor:
    """:func:`write_into` for a non-contiguous ``dense``."""
    if sp.nnz:
        dense.index_put_(_coords(sp), values.to(dense.dtype))
    return dense


def gather_from(dense: torch.Tensor, sp: SparseAdapter) -> torch.Tensor:
    """dense[mask] as a flat (nnz,) tensor (any strides)."""
    if not dense.is_contiguous():
        return dense[_coords(sp)]
    return dense.reshape(-1).index_select(0, sp.flat_indices())


def spmm(x: torch.Tensor, sp: SparseAdapter, values: torch.Tensor, out_dtype=None) -> torch.Tensor:
    """x · Sᵀ for x (T, in) -> (T, out), computed in at least float32 through a CSR matmul.

    The result comes back in ``out_dtype`` (default: ``x.dtype``); pass the accumulation dtype to add
    it into another result with a single rounding."""
    acc = _acc_dtype(x.dtype)
    out_dtype = out_dtype or x.dtype
    if sp.nnz == 0:
        return x.new_zeros(x.shape[0], sp.out_features, dtype=out_dtype)
    crow, col = _csr64(sp)
    s = _csr_tensor(crow, col, values.to(acc), size=sp.shape)
    return (s @ _transposed(x, acc)).t().to(out_dtype)


def csr_transposed(sp: SparseAdapter) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The CSR structure of Sᵀ (in, out), cached: (row_offsets int64, col_indices int64, perm) with
    ``values[perm]`` the values of Sᵀ in its row-major order. Built once per mask (a stable sort)."""

    def build():
        rows = sp.row_indices()
        cols = sp.col_indices.to(torch.int64)
        perm = torch.sort(cols, stable=True).indices  # row-major order of Sᵀ: by column, then row
        counts = torch.bincount(cols, minlength=sp.in_features)
        crow = torch.zeros(sp.in_features + 1, dtype=torch.int64, device=cols.device)
        crow[1:] = torch.cumsum(counts, 0)
        return crow, rows.index_select(0, perm), perm

    return sp._cached("csr_t", build)


def spmm_t(grad_out: torch.Tensor, sp: SparseAdapter, values: torch.Tensor, out_dtype=None) -> torch.Tensor:
    """grad_out · S for grad_out (T, out) -> (T, in), through a CSR matmul over the transposed structure
    (:func:`csr_transposed`), in at least float32; result in ``out_dtype`` (default ``grad_out.dtype``)."""
    acc = _acc_dtype(grad_out.dtype)
    out_dtype = out_dtype or grad_out.dtype
    if sp.nnz == 0:
        return grad_out.new_zeros(grad_out.shape[0], sp.in_features, dtype=out_dtype)
    crow, col, perm = csr_transposed(sp)
    st = _csr_tensor(crow, col, values.to(acc).index_select(0, perm), size=(sp.in_features, sp.out_features))
    return (st @ _transposed(grad_out, acc)).t().to(out_dtype)
