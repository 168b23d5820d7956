"""Triton kernels for the sparse ops: SDDMM (the sparse gradient), scatter into a dense weight, SpMM.

GPU path. Imported lazily by ``dispatch`` (never at ``import rosa_peft``); on CPU the kernels run only
under ``TRITON_INTERPRET=1`` set *before* this module (and triton) is imported, which the tests use.

Layout. All kernels read the activations transposed, ``(features, T)`` with T contiguous, so every
load runs along the token dimension (coalesced), whatever the mask looks like:

* ``sddmm``: one program per block of ``BLOCK_N`` consecutive non-zeros (CSR order, so perfect load
  balance whatever the row lengths). It walks T in tiles of ``BLOCK_T``, gathers the ``x`` rows of its
  columns and multiplies by the matching ``grad_out`` row, accumulating a ``BLOCK_N x BLOCK_T`` tile in
  fp32 (fp64 for fp64 inputs) reduced once at the end. RoSA masks put many non-zeros in a few rows, so
  most blocks sit inside a single row: that case loads the ``grad_out`` row once per T tile and
  broadcasts it; mixed blocks gather one ``grad_out`` row per non-zero (served by L1).
* ``scatter``: ``dense[mask] = [base +] values`` or ``dense[mask] += values``, one lane per non-zero,
  any dense dtype and strides. Rounding matches the torch ops (values are cast to the dense dtype
  first, the sum is formed in fp32 and rounded once), so merged/sp_add weights are bit-identical
  across backends.
* ``spmm``: ``x @ S^T``, one program per (row of S, T tile).
"""
from __future__ import annotations

import os
from typing import Callable, Optional

import torch
import triton
import triton.language as tl

from . import ops
from .storage import SparseAdapter

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
# dtypes the dispatch sends to these kernels automatically (fp64 works when called directly).
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Above this density the dispatch leaves the SDDMM to the dense-GEMM + gather backend. The Triton
# SDDMM reads ~nnz*T activation elements (memory bound) while cuBLAS does out*in*T MACs on tensor
# cores; the crossover has to be measured on the target GPU (estimate: around 1-3% at 7B shapes).
TRITON_SDDMM_MAX_DENSITY = 1.0


def _sddmm_configs() -> list:
    if INTERPRET:  # one small config: no benchmarking under the interpreter, and tiles that exercise
        return [triton.Config({"BLOCK_N": 16, "BLOCK_T": 16}, num_warps=1)]  # both paths at tiny shapes
    return [
        triton.Config({"BLOCK_N": 16, "BLOCK_T": 128}, num_warps=4),
        triton.Config({"BLOCK_N": 32, "BLOCK_T": 128}, num_warps=4),
        triton.Config({"BLOCK_N": 64, "BLOCK_T": 64}, num_warps=4),
        triton.Config({"BLOCK_N": 64, "BLOCK_T": 128}, num_warps=8),
        triton.Config({"BLOCK_N": 128, "BLOCK_T": 64}, num_warps=8),
    ]


@triton.jit
def _sddmm_kernel(
    gt_ptr, xt_ptr, rows_ptr, cols_ptr, out_ptr,
    nnz, T,
    stride_g_row, stride_g_t, stride_x_col, stride_x_t,
    t_bucket, nnz_bucket,  # autotune keys only
    ACC: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr,
):
    start = tl.program_id(0) * BLOCK_N
    offs_n = start + tl.arange(0, BLOCK_N)
    mask_n = offs_n < nnz
    cols = tl.load(cols_ptr + offs_n, mask=mask_n, other=0).to(tl.int64)
    x_rows = xt_ptr + cols[:, None] * stride_x_col
    offs_t = tl.arange(0, BLOCK_T)
    acc = tl.zeros([BLOCK_N, BLOCK_T], dtype=ACC)
    r_first = tl.load(rows_ptr + start)
    r_last = tl.load(rows_ptr + tl.minimum(start + BLOCK_N, nnz) - 1)
    if r_first == r_last:  # the whole block is in one row: load that grad_out row once per tile
        g_row = gt_ptr + r_first.to(tl.int64) * stride_g_row
        for t0 in range(0, T, BLOCK_T):
            t = t0 + offs_t
            mask_t = t < T
            g = tl.load(g_row + t * stride_g_t, mask=mask_t, other=0.0).to(ACC)
            xv = tl.load(x_rows + t[None, :] * stride_x_t, mask=mask_n[:, None] & mask_t[None, :], other=0.0)
            acc += xv.to(ACC) * g[None, :]
    else:
        rows = tl.load(rows_ptr + offs_n, mask=mask_n, other=0).to(tl.int64)
        g_rows = gt_ptr + rows[:, None] * stride_g_row
        for t0 in range(0, T, BLOCK_T):
            t = t0 + offs_t
            mask_2d = mask_n[:, None] & (t < T)[None, :]
            g = tl.load(g_rows + t[None, :] * stride_g_t, mask=mask_2d, other=0.0)
            xv = tl.load(x_rows + t[None, :] * stride_x_t, mask=mask_2d, other=0.0)
            acc += xv.to(ACC) * g.to(ACC)
    tl.store(out_ptr + offs_n, tl.sum(acc, axis=1), mask=mask_n)


_sddmm_tuned = triton.autotune(configs=_sddmm_configs(), key=["t_bucket", "nnz_bucket", "ACC"])(_sddmm_kernel)


@triton.jit
def _round_to(v, DTYPE: tl.constexpr, BF16_RTNE_BY_HAND: tl.constexpr):
    """fp32 -> DTYPE, round to nearest even. The interpreter truncates fp32 -> bf16, so it rounds by hand."""
    if BF16_RTNE_BY_HAND:
        bits = v.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return v.to(DTYPE)


@triton.jit
def _scatter_kernel(
    dense_ptr, rows_ptr, cols_ptr, vals_ptr, base_ptr,
    nnz, stride_r, stride_c,
    HAS_BASE: tl.constexpr, ACCUMULATE: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr, RTNE: tl.constexpr,
):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = offs < nnz
    r = tl.load(rows_ptr + offs, mask=m, other=0).to(tl.int64)
    c = tl.load(cols_ptr + offs, mask=m, other=0).to(tl.int64)
    ptrs = dense_ptr + r * stride_r + c * stride_c
    v = tl.load(vals_ptr + offs, mask=m, other=0.0).to(ACC)
    if HAS_BASE:
        v += tl.load(base_ptr + offs, mask=m, other=0.0).to(ACC)
    if ACCUMULATE:
        v += tl.load(ptrs, mask=m, other=0.0).to(ACC)
    tl.store(ptrs, _round_to(v, dense_ptr.dtype.element_ty, RTNE), mask=m)


@triton.jit
def _spmm_kernel(
    xt_ptr, offsets_ptr, cols_ptr, vals_ptr, outt_ptr,
    T, stride_x_col, stride_x_t, stride_o_row, stride_o_t,
    ACC: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr, RTNE: tl.constexpr,
):
    row = tl.program_id(0)
    t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    mask_t = t < T
    lo = tl.load(offsets_ptr + row)
    hi = tl.load(offsets_ptr + row + 1)
    acc = tl.zeros([BLOCK_N, BLOCK_T], dtype=ACC)
    for k0 in range(lo, hi, BLOCK_N):
        k = k0 + tl.arange(0, BLOCK_N)
        mask_k = k < hi
        c = tl.load(cols_ptr + k, mask=mask_k, other=0).to(tl.int64)
        v = tl.load(vals_ptr + k, mask=mask_k, other=0.0).to(ACC)
        xv = tl.load(xt_ptr + c[:, None] * stride_x_col + t[None, :] * stride_x_t,
                     mask=mask_k[:, None] & mask_t[None, :], other=0.0)
        acc += xv.to(ACC) * v[:, None]
    res = tl.sum(acc, axis=0)
    res = _round_to(res, outt_ptr.dtype.element_ty, RTNE)
    tl.store(outt_ptr + row.to(tl.int64) * stride_o_row + t * stride_o_t, res, mask=mask_t)


# ---- host wrappers ---------------------------------------------------------------------------------
def _acc(dtype: torch.dtype):
    return (torch.float64, tl.float64) if dtype == torch.float64 else (torch.float32, tl.float32)


def _check_device(*tensors: torch.Tensor) -> None:
    for t in tensors:
        if t.device.type == "cpu" and not INTERPRET:
            raise RuntimeError(
                "rosa_peft Triton kernels need CUDA tensors (or TRITON_INTERPRET=1 set before triton is imported)"
            )


def _by_hand(t: torch.Tensor) -> bool:
    return INTERPRET and t.dtype == torch.bfloat16


def _rows_i32(sp: SparseAdapter) -> torch.Tensor:
    """int32 row label per non-zero, cached on the adapter next to its other derived index views."""
    return sp._cached("rows_i32", lambda: sp.row_indices().to(torch.int32))


def _bucket(n: int) -> int:
    return triton.next_power_of_2(max(1, n))


def sddmm(
    grad_out: torch.Tensor, x: torch.Tensor, sp: SparseAdapter,
    block_n: Optional[int] = None, block_t: Optional[int] = None, num_warps: int = 4,
) -> torch.Tensor:
    """(grad_outᵀ · x) at the mask positions; grad_out (T, out), x (T, in) -> fp32 (fp64 for fp64) (nnz,).

    ``block_n``/``block_t`` pin the tile sizes (tests); by default they are autotuned per (T, nnz) bucket.
    """
    if grad_out.dim() != 2 or x.dim() != 2 or grad_out.shape[0] != x.shape[0]:
        raise ValueError(
            f"sddmm expects grad_out (T, out) and x (T, in), got {tuple(grad_out.shape)}, {tuple(x.shape)}"
        )
    if grad_out.shape[1] != sp.out_features or x.shape[1] != sp.in_features:
        raise ValueError(f"sddmm shapes {tuple(grad_out.shape)}, {tuple(x.shape)} do not fit a {sp.shape} adapter")
    acc_t, acc_tl = _acc(grad_out.dtype)
    nnz, T = sp.nnz, grad_out.shape[0]
    out = torch.empty(nnz, dtype=acc_t, device=grad_out.device)
    if nnz == 0:
        return out
    if T == 0:
        return out.zero_()
    _check_device(grad_out, x)
    gt = grad_out.t().contiguous()  # (out, T): loads along T are contiguous
    xt = x.t().contiguous()  # (in, T)
    args = (gt, xt, _rows_i32(sp), sp.col_indices, out, nnz, T, gt.stride(0), gt.stride(1), xt.stride(0), xt.stride(1),
            _bucket(T), _bucket(nnz))
    if block_n is None and block_t is None:
        _sddmm_tuned[lambda meta: (triton.cdiv(nnz, meta["BLOCK_N"]),)](*args, ACC=acc_tl)
    else:
        bn, bt = block_n or 32, block_t or 64
        _sddmm_kernel[(triton.cdiv(nnz, bn),)](*args, ACC=acc_tl, BLOCK_N=bn, BLOCK_T=bt, num_warps=num_warps)
    return out


def scatter(
    dense: torch.Tensor, sp: SparseAdapter, values: torch.Tensor,
    base: Optional[torch.Tensor] = None, accumulate: bool = False, block: int = 1024,
) -> torch.Tensor:
    """In place: ``dense[mask] = values`` (``+ base`` if given), or ``dense[mask] += values``; returns dense.

    ``values`` is cast to ``base``'s dtype (or dense's) first, then the sum is formed in fp32 and rounded
    once to dense's dtype, which reproduces ``ops.add_into`` / ``ops.write_into(dense, sp, base + values)``.
    ``dense`` may be any 2-D strided view. Not differentiable: callers run under no_grad.
    """
    if tuple(dense.shape) != sp.shape:
        raise ValueError(f"dense shape {tuple(dense.shape)} does not match the adapter shape {sp.shape}")
    if accumulate and base is not None:
        raise ValueError("scatter: base is only meaningful when writing (accumulate=False)")
    nnz = sp.nnz
    if values.numel() != nnz or (base is not None and base.numel() != nnz):
        raise ValueError(f"scatter: {values.numel()} values for {nnz} mask positions")
    if nnz == 0:
        return dense
    _check_device(dense)
    values = values.detach().reshape(-1).to((base if base is not None else dense).dtype).contiguous()
    base_t = base.detach().reshape(-1).contiguous() if base is not None else values
    _, acc_tl = _acc(dense.dtype)
    _scatter_kernel[(triton.cdiv(nnz, block),)](
        dense, _rows_i32(sp), sp.col_indices, values, base_t, nnz, dense.stride(0), dense.stride(1),
        HAS_BASE=base is not None, ACCUMULATE=accumulate, ACC=acc_tl, BLOCK=block, RTNE=_by_hand(dense),
    )
    return dense


def _needs_autograd(*tensors: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def add_into(dense: torch.Tensor, sp: SparseAdapter, values: torch.Tensor) -> torch.Tensor:
    """dense[mask] += values (in place); the torch op where autograd must see it."""
    if _needs_autograd(dense, values):
        return ops.add_into(dense, sp, values)
    return scatter(dense, sp, values, accumulate=True)


def write_into(dense: torch.Tensor, sp: SparseAdapter, values: torch.Tensor) -> torch.Tensor:
    """dense[mask] = values (in place); the torch op where autograd must see it."""
    if _needs_autograd(dense, values):
        return ops.write_into(dense, sp, values)
    return scatter(dense, sp, values)


def spmm(
    x: torch.Tensor, sp: SparseAdapter, values: torch.Tensor,
    block_n: Optional[int] = None, block_t: Optional[int] = None,
) -> torch.Tensor:
    """x · Sᵀ for x (T, in) -> (T, out) in x's dtype, accumulated in fp32 (fp64 for fp64). Not differentiable."""
    if _needs_autograd(x, values):
        return ops.spmm(x, sp, values)
    if x.dim() != 2 or x.shape[1] != sp.in_features:
        raise ValueError(f"spmm expects x (T, {sp.in_features}), got {tuple(x.shape)}")
    T = x.shape[0]
    if sp.nnz == 0 or T == 0:
        return x.new_zeros(T, sp.out_features)
    outt = torch.empty(sp.out_features, T, dtype=x.dtype, device=x.device)  # every row is written
    _check_device(x)
    _, acc_tl = _acc(x.dtype)
    bn, bt = (block_n or 16, block_t or 16) if INTERPRET else (block_n or 32, block_t or 64)
    xt = x.t().contiguous()
    _spmm_kernel[(sp.out_features, triton.cdiv(T, bt))](
        xt, sp.row_offsets, sp.col_indices, values.detach().contiguous(), outt,
        T, xt.stride(0), xt.stride(1), outt.stride(0), outt.stride(1),
        ACC=acc_tl, BLOCK_N=bn, BLOCK_T=bt, RTNE=_by_hand(x),
    )
    return outt.t()


# ---- registration ------------------------------------------------------------------------------------
def register_backends(register: Callable, backend_cls) -> None:
    """Put the Triton kernels first in the dispatch registry (CUDA, fp32/bf16/fp16); name ``triton``."""

    def on_gpu(device, dtype, sp):
        return device == "cuda" and dtype in SUPPORTED_DTYPES

    def sddmm_ok(device, dtype, sp):
        density = sp.nnz / max(1, sp.out_features * sp.in_features)
        return on_gpu(device, dtype, sp) and density <= TRITON_SDDMM_MAX_DENSITY

    note = "Triton SDDMM, nnz blocks x T tiles, fp32 accumulation"
    register("sddmm", backend_cls("triton", sddmm, sddmm_ok, note), first=True)
    register("add_into", backend_cls("triton", add_into, on_gpu, "Triton scatter-add"), first=True)
    register("write_into", backend_cls("triton", write_into, on_gpu, "Triton scatter-write"), first=True)
    register("spmm", backend_cls("triton", spmm, on_gpu, "Triton CSR x Tᵀ (no autograd)"), first=True)
