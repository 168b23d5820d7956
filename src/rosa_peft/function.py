"""The fused RoSA autograd Function: one op for X·(W+S)ᵀ + s·dropout(X)·Aᵀ·Bᵀ + b.

Forward saves X once (plus the tiny X·Aᵀ and, with dropout, a bool keep-mask). Backward:
    dA = s·(dO·B)ᵀ·Xd          dB = s·dOᵀ·(Xd·Aᵀ)
    dS = (dOᵀ·X) at the mask    (SDDMM; never a dense dW beyond one chunk)
    dX = dO·(W+S) + s·((dO·B)·A) ⊙ keep/(1-p)
where Xd = X ⊙ keep/(1-p). Dropout touches the LoRA branch only and reuses the same keep-mask in
backward. Both products with W+S go through a *weight source* (``source.matmul`` for X·(W+S)ᵀ,
``source.matmul_t`` for dO·(W+S)): for the ``merged`` implementation the dense W+S is the base weight
itself (no copy); for ``sp_add`` a temporary built per call; for ``spmm`` (4-bit bases,
``weight_source.QuantSpmmSource``) no dense W+S at all: the base's own 4-bit matmul plus an SpMM on S's CSR.
Nothing de-quantised is ever saved for backward (only the 4-bit weight itself).
"""
from __future__ import annotations

from typing import Optional

import torch

from . import sparse
from .weight_source import WeightSource


def compute_dtype_for(x: torch.Tensor) -> torch.dtype:
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


class RosaLinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, values, source: WeightSource, sp, scaling: float,
                dropout_p: float, cdt: torch.dtype):
        # arguments as in rosa_linear (below); cdt is the compute dtype. source.matmul gives x·(W+S)ᵀ,
        # source.matmul_t g·(W+S); sp is the SparseAdapter (or None)
        in_f = x.shape[-1]
        x2 = x.reshape(-1, in_f)
        xc = x2 if x2.dtype == cdt else x2.to(cdt)
        out = source.matmul(xc, weight, sp, values, cdt)
        if bias is not None:
            out = out + bias.to(cdt)
        keep = None
        xa = None
        if lora_A is not None:
            a = lora_A.to(cdt)
            b = lora_B.to(cdt)
            if dropout_p > 0.0:
                keep = torch.empty_like(xc, dtype=torch.bool).bernoulli_(1.0 - dropout_p)
                xl = xc.mul(keep).mul_(1.0 / (1.0 - dropout_p))  # one temporary, same rounding
            else:
                xl = xc
            xa = xl @ a.t()
            out = out.addmm(xa, b.t(), alpha=scaling)
        ctx.source = source
        ctx.sp = sp
        ctx.scaling = scaling
        ctx.dropout_p = dropout_p
        ctx.cdt = cdt
        ctx.x_shape = x.shape
        ctx.x_dtype = x.dtype
        ctx.has_bias = bias is not None
        ctx.save_for_backward(x2, weight, lora_A, lora_B, values, keep, xa)
        return out.reshape(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x2, weight, lora_A, lora_B, values, keep, xa = ctx.saved_tensors
        cdt = ctx.cdt
        s = ctx.scaling
        g = grad_out.reshape(-1, grad_out.shape[-1])
        g = g if g.dtype == cdt else g.to(cdt)
        xc = x2 if x2.dtype == cdt else x2.to(cdt)
        need_x, _, need_bias, need_a, need_b, need_vals = ctx.needs_input_grad[:6]

        dx = d_a = d_b = d_vals = d_bias = None
        if lora_A is not None and (need_x or need_a or need_b):
            a = lora_A.to(cdt)
            b = lora_B.to(cdt)
            gb = g @ b  # (T, r)
            if need_a:
                xl = xc.mul(keep).mul_(1.0 / (1.0 - ctx.dropout_p)) if keep is not None else xc
                d_a = (gb.t() @ xl).mul_(s).to(lora_A.dtype)
            if need_b:
                d_b = (g.t() @ xa).mul_(s).to(lora_B.dtype)
            if need_x:
                dx_lora = (gb @ a).mul_(s)
                if keep is not None:
                    dx_lora = dx_lora.mul_(keep).mul_(1.0 / (1.0 - ctx.dropout_p))  # dx_lora is our own
                dx = dx_lora
        if need_x:
            dx = ctx.source.matmul_t(g, weight, ctx.sp, values, cdt, dx)
            dx = dx.reshape(ctx.x_shape).to(ctx.x_dtype)
        if need_vals and values is not None and values.numel():
            d_vals = sparse.sddmm(g, xc, ctx.sp).to(values.dtype)
        if need_bias and ctx.has_bias:
            d_bias = g.sum(0).to(grad_out.dtype)
        return dx, None, d_bias, d_a, d_b, d_vals, None, None, None, None, None


def rosa_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    lora_A: Optional[torch.Tensor],
    lora_B: Optional[torch.Tensor],
    values: Optional[torch.Tensor],
    source: WeightSource,
    sp,
    scaling: float,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """Functional entry point; ``dropout_p`` is the effective probability (0 in eval mode)."""
    cdt = compute_dtype_for(x)
    with torch.autocast(device_type=x.device.type, enabled=False):
        return RosaLinearFunction.apply(
            x, weight, bias, lora_A, lora_B, values, source, sp, float(scaling), float(dropout_p), cdt
        )
