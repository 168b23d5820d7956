"""The RoSA adapter over an ``nn.Embedding`` weight, as one autograd Function.

With the frozen table E0 (num_embeddings V, embedding_dim D), a sparse adapter S on a fixed mask over
E0's shape, LoRA factors A (r, V) and B (D, r) (PEFT's ``lora_embedding_A`` / ``lora_embedding_B``
shapes, so the LoRA delta weight is s·(B·A)ᵀ, shape (V, D)) and token ids x of any shape:

    out[t] = (E0 + S)[x_t] + s · (Aᵀ[x_t]) · Bᵀ

Backward (g_t = dO for token t; only A, B and the sparse values get gradients, never x or E0):

    G[i]          = Σ_{t: x_t = i} g_t                    (one row per *distinct* id in x)
    dvalues       = G at the mask positions               (rows not present in x get 0)
    dA[:, i]      = s · (G[i] · B)ᵀ
    dB            = s · Σ_t g_tᵀ · Aᵀ[x_t] = s · Σ_i G_raw[i]ᵀ · Aᵀ[i]

``G`` is built only over the distinct ids of x (``torch.unique`` + ``index_add``), an (U, D) block
with U ≤ number of tokens, so no dense (V, D) gradient is ever materialised. ``padding_idx`` and
``scale_grad_by_freq`` act as in ``F.embedding`` on both the table and the A lookup (PEFT passes them
to both): the padding row gets no gradient in ``values`` or ``A``, and with ``scale_grad_by_freq``
each G[i] is divided by the count of i in x. dB sees the raw (unscaled, unmasked) sum ``G_raw``,
because B's input is the looked-up row of A, which the forward does not zero for padding.

Not supported (ValueError naming the argument): ``max_norm`` (it renormalises the table in place,
which would rewrite the frozen/merged base weight) and ``sparse=True`` (sparse table gradients; the
base never gets a gradient here anyway). There is no dropout on the embedding path: PEFT's
embedding LoRA applies none, so this Function takes no dropout argument.

The dense E0+S comes from a weight source (``weight_source.WeightSource``), exactly as for
``function.RosaLinearFunction``: ``source.dense(weight, sp, values, dtype)``. For ``merged`` the base already holds E0+S; for
``sp_add`` it is a temporary. Compute dtype: the autocast dtype when autocast is on for the weight's
device, else the weight's dtype (an embedding's output follows its table, not its integer input);
a non-floating (quantized) table without autocast computes in float32. Gradients accumulate in
float32 (float64 when computing in float64) and are cast to the parameter dtypes.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .sparse.storage import SparseAdapter
from .weight_source import WeightSource


def embedding_compute_dtype(weight: torch.Tensor) -> torch.dtype:
    """``function.compute_dtype_for`` for embeddings: autocast dtype if on, else the table's dtype."""
    if torch.is_autocast_enabled(weight.device.type):
        return torch.get_autocast_dtype(weight.device.type)
    return weight.dtype if weight.is_floating_point() else torch.float32


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _mask_grad_for_rows(g_rows: torch.Tensor, rows: torch.Tensor, sp: SparseAdapter) -> torch.Tensor:
    """(nnz,) gradient of the sparse values given the dense gradient ``g_rows`` (U, D) of table rows
    ``rows`` (U,, distinct). Mask entries in rows outside ``rows`` are 0. Touches only the CSR ranges
    of ``rows``."""
    out = torch.zeros(sp.nnz, dtype=g_rows.dtype, device=g_rows.device)
    if sp.nnz == 0 or rows.numel() == 0:
        return out
    offsets = sp.row_offsets.to(torch.int64)
    starts = offsets.index_select(0, rows)
    lens = offsets.index_select(0, rows + 1) - starts
    total = int(lens.sum())
    if total == 0:
        return out
    owner = torch.repeat_interleave(torch.arange(rows.numel(), device=rows.device), lens, output_size=total)
    first = torch.cumsum(lens, 0) - lens  # position of each row's first entry in the gathered list
    pos = starts.index_select(0, owner) + (torch.arange(total, device=rows.device) - first.index_select(0, owner))
    cols = sp.col_indices.index_select(0, pos).to(torch.int64)
    out[pos] = g_rows[owner, cols]
    return out


class RosaEmbeddingFunction(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx,
        x: torch.Tensor,
        weight: torch.Tensor,
        lora_A: Optional[torch.Tensor],
        lora_B: Optional[torch.Tensor],
        values: Optional[torch.Tensor],
        source: WeightSource,  # dense(weight, sp, values, dtype) -> E0+S
        sp,  # SparseAdapter or None
        scaling: float,
        padding_idx: Optional[int],
        scale_grad_by_freq: bool,
        cdt: torch.dtype,
    ):
        ids = x.reshape(-1)
        table = source.dense(weight, sp, values, cdt)
        out = F.embedding(ids, table, padding_idx)  # (T, D); padding_idx only matters for gradients
        if out.dtype != cdt:
            out = out.to(cdt)
        if lora_A is not None:
            xa = lora_A.index_select(1, ids).t().to(cdt)  # Aᵀ[x]: (T, r), cast after the gather
            out = out.addmm(xa, lora_B.to(cdt).t(), alpha=scaling)
        ctx.source = source
        ctx.sp = sp
        ctx.scaling = scaling
        ctx.padding_idx = padding_idx
        ctx.scale_grad_by_freq = scale_grad_by_freq
        ctx.cdt = cdt
        ctx.has_values = values is not None and values.numel() > 0 and sp is not None
        ctx.values_dtype = values.dtype if values is not None else None
        ctx.save_for_backward(ids, lora_A, lora_B)
        return out.reshape(*x.shape, out.shape[-1])

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        ids, lora_A, lora_B = ctx.saved_tensors
        need_a, need_b, need_vals = ctx.needs_input_grad[2:5]
        need_a = need_a and lora_A is not None
        need_b = need_b and lora_A is not None
        need_vals = need_vals and ctx.has_values
        d_a = d_b = d_vals = None
        if not (need_a or need_b or need_vals):
            return None, None, None, None, None, None, None, None, None, None, None

        acc = _acc_dtype(ctx.cdt)
        s = ctx.scaling
        g = grad_out.reshape(-1, grad_out.shape[-1]).to(acc)  # (T, D)
        rows, inv = torch.unique(ids, sorted=True, return_inverse=True)
        g_raw = torch.zeros(rows.numel(), g.shape[1], dtype=acc, device=g.device).index_add_(0, inv, g)  # (U, D)

        if need_b:
            a_rows = lora_A.index_select(1, rows).to(acc)  # (r, U)
            d_b = (g_raw.t() @ a_rows.t()).mul_(s).to(lora_B.dtype)  # (D, r)

        if need_a or need_vals:
            g_rows = g_raw
            if ctx.scale_grad_by_freq:
                counts = torch.bincount(inv, minlength=rows.numel()).to(acc)
                g_rows = g_rows / counts.unsqueeze(1)
            if ctx.padding_idx is not None:
                g_rows = g_rows.masked_fill((rows == ctx.padding_idx).unsqueeze(1), 0.0)
            if need_a:
                d_a = torch.zeros(lora_A.shape, dtype=acc, device=g.device)
                d_a[:, rows] = (g_rows @ lora_B.to(acc)).t().mul_(s)  # (r, U) into columns x
                d_a = d_a.to(lora_A.dtype)
            if need_vals:
                d_vals = _mask_grad_for_rows(g_rows, rows, ctx.sp).to(ctx.values_dtype)
        return None, None, d_a, d_b, d_vals, None, None, None, None, None, None


def rosa_embedding(x: torch.Tensor, weight: torch.Tensor, lora_A: Optional[torch.Tensor],
                   lora_B: Optional[torch.Tensor], values: Optional[torch.Tensor], source: WeightSource, sp,
                   scaling: float, padding_idx: Optional[int] = None, max_norm: Optional[float] = None,
                   norm_type: float = 2.0, scale_grad_by_freq: bool = False, sparse: bool = False) -> torch.Tensor:
    """(E0+S)[x] + scaling·Aᵀ[x]·Bᵀ with gradients for ``lora_A``, ``lora_B`` and ``values`` only.

    Arguments after ``scaling`` mirror ``F.embedding``; ``max_norm`` and ``sparse=True`` raise
    ValueError (``norm_type`` only matters with ``max_norm`` and is ignored). ``lora_A=None`` means
    r = 0; ``sp=None`` or ``values=None`` means no sparse adapter.
    """
    if max_norm is not None:
        raise ValueError("max_norm is not supported by the RoSA embedding (it renormalises the base table in place)")
    if sparse:
        raise ValueError("sparse=True is not supported by the RoSA embedding (no sparse table gradients)")
    if x.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"embedding ids must be int64 or int32, got {x.dtype}")
    if (lora_A is None) != (lora_B is None):
        raise ValueError("lora_A and lora_B must both be given or both be None")
    num_embeddings = weight.shape[0] if sp is None else sp.out_features
    if padding_idx is not None:
        if not -num_embeddings <= padding_idx < num_embeddings:
            raise ValueError(f"padding_idx {padding_idx} out of range for {num_embeddings} embeddings")
        if padding_idx < 0:
            padding_idx += num_embeddings
    cdt = embedding_compute_dtype(weight)
    with torch.autocast(device_type=weight.device.type, enabled=False):
        return RosaEmbeddingFunction.apply(
            x.to(torch.int64), weight, lora_A, lora_B, values, source, sp, float(scaling),
            padding_idx, bool(scale_grad_by_freq), cdt,
        )
