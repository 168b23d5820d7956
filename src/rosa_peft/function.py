"""The fused RoSA autograd Function: one op for X·(W+S)ᵀ + s·dropout(X)·Aᵀ·Bᵀ + b.

Forward saves X once (plus the tiny X·Aᵀ and, with dropout, a uint8 keep-mask from
:func:`dropout_keep_mask`). Backward:
    dA = s·(dO·B)ᵀ·Xd          dB = s·dOᵀ·(Xd·Aᵀ)
    dS = (dOᵀ·X) at the mask    (SDDMM; never a dense dW beyond one chunk)
    dX = dO·(W+S) + s·((dO·B)·A) ⊙ keep/(1-p)
where Xd = X ⊙ keep/(1-p). Dropout touches the LoRA branch only and reuses the same keep-mask in
backward; the 1/(1-p) is applied to the rank-r products (X ⊙ keep)·Aᵀ and dO·B, not to X. Both products with W+S go through a *weight source* (``source.matmul`` for X·(W+S)ᵀ,
``source.matmul_t`` for dO·(W+S)): for the ``merged`` implementation the dense W+S is the base weight
itself (no copy); for ``sp_add`` a temporary built per call; for ``spmm`` (4-bit bases,
``weight_source.QuantSpmmSource``) no dense W+S at all: the base's own 4-bit matmul plus an SpMM on S's CSR.
Nothing de-quantised is ever saved for backward (only the 4-bit weight itself).
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from . import sparse
from .weight_source import WeightSource


# CPU dropout masks: 16 random bits per element from numpy's PCG64 (seeded from torch's generator), five
# times faster than torch's CPU bernoulli_, which draws a double per element from one mt19937 stream. Used
# when p on the 1/65536 grid is within this relative error of the requested p; the scale uses that p.
_FAST_MASK_REL_ERROR = 1e-3
_GRID = 1 << 16


def dropout_keep_mask(x: torch.Tensor, p: float) -> tuple[torch.Tensor, float]:
    """A keep-mask of ``x``'s shape, uint8 0/1 (each element kept with probability 1 - p, independently),
    and the scale 1 / P(keep) that makes the dropped-out tensor unbiased. On CUDA (and for a p far off the
    1/65536 grid) torch's ``bernoulli_``; on CPU, 16-bit uniforms compared with p rounded to that grid.

    uint8, not bool: torch's CPU kernels do not vectorise bool operands (``where(keep, t, 0)`` costs six
    times ``t * keep.to(t.dtype)``), while a uint8 -> float cast is as fast as a copy. Saved for backward as
    uint8 (half a bf16 mask's memory)."""
    dropped = round(p * _GRID)
    if x.device.type != "cpu" or not 0 < dropped < _GRID or abs(dropped / _GRID - p) > _FAST_MASK_REL_ERROR * p:
        return torch.empty_like(x, dtype=torch.uint8).bernoulli_(1.0 - p), 1.0 / (1.0 - p)
    n = x.numel()
    seed = int(torch.randint(0, 2**62, (), device="cpu"))  # torch.manual_seed / fork_rng govern the mask
    words = np.random.Generator(np.random.PCG64(seed)).bit_generator.random_raw((n + 3) // 4)
    keep = words.view(np.int16)[:n] >= dropped - _GRID // 2  # each uniform in [-32768, 32767]
    return torch.from_numpy(keep.view(np.uint8)).view(x.shape), _GRID / (_GRID - dropped)


def _masked(t: torch.Tensor, keep: Optional[torch.Tensor]) -> torch.Tensor:
    """``t ⊙ keep`` (``t`` itself without a mask); ``keep`` is the uint8 mask or that mask cast to ``t``'s
    dtype. A uint8 operand is promoted inside the multiply: on CPU that costs about the cast plus a
    same-dtype multiply (bf16, 2128x576, one thread: 0.83 ms against 0.34 + 0.50 ms), without the cast's
    temporary, so one use takes the uint8 mask and backward's two uses share one cast. The dropout scale
    1 / P(keep) is never applied to ``t``: the callers fold it into the rank-r factor of the same product
    (``(t ⊙ keep)·Aᵀ·scale``, ``((dO·B)·scale·A) ⊙ keep``), which is r / in_features of the work of a pass
    over ``t``."""
    return t if keep is None else t.mul(keep)


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
        keep_scale = 1.0
        if lora_A is not None:
            a = lora_A.to(cdt)
            b = lora_B.to(cdt)
            if dropout_p > 0.0:
                keep, keep_scale = dropout_keep_mask(xc, dropout_p)
            xa = _masked(xc, keep) @ a.t()  # Xd·Aᵀ with Xd = X ⊙ keep · keep_scale
            if keep_scale != 1.0:
                xa.mul_(keep_scale)
            out = out.addmm(xa, b.t(), alpha=scaling)
        ctx.source = source
        ctx.sp = sp
        ctx.scaling = scaling
        ctx.keep_scale = keep_scale
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
            if keep is not None and (need_a or need_x):
                keep = keep.to(cdt)  # one cast for both uses below (each would otherwise promote it)
            gb = g @ b  # (T, r)
            s_keep = s * ctx.keep_scale
            if need_a:
                d_a = (gb.t() @ _masked(xc, keep)).mul_(s_keep).to(lora_A.dtype)
            if need_b:
                d_b = (g.t() @ xa).mul_(s).to(lora_B.dtype)
            if need_x:
                dx_lora = gb.mul(s_keep) @ a
                dx = dx_lora if keep is None else dx_lora.mul_(keep)
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
