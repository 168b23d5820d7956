"""The bitsandbytes 4-bit base kind: ``bitsandbytes.nn.Linear4bit``; quantize, spec, chunked matmuls.

The only module that imports bitsandbytes. Importing it raises ImportError when bitsandbytes is not
importable (a broken binary included); ``bases.QUANT_BACKENDS["bnb"]`` loads it on demand. The QRoSA
matmuls de-quantise a bounded chunk of rows at a time through bitsandbytes' own op, so no full dense
weight exists; bitsandbytes' CPU inference packing is de-quantised too (:func:`_unpack_cpu`).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from . import QUANT_BACKENDS, BaseKind, register_base_kind

try:
    import bitsandbytes as bnb
    import bitsandbytes.functional  # noqa: F401
    import bitsandbytes.nn  # noqa: F401
except Exception as exc:  # ImportError, or a broken binary raising at import
    raise ImportError(f"bitsandbytes is not importable: {exc}") from exc

KIND_NAME = QUANT_BACKENDS["bnb"].kind
# Rows of the weight de-quantised at once by the QRoSA matmuls (bounded temporaries; elements).
DEQUANT_CHUNK_ELEMENTS = 1 << 22


def _quant_state(w):
    qs = getattr(w, "quant_state", None)
    if qs is None:
        qs = getattr(getattr(w, "module", None), "quant_state", None)
    if qs is None:
        raise RuntimeError("bitsandbytes 4-bit weight has no quant_state: it is not quantized yet "
                           "(quantize with rosa_peft.quantize_model or move the Linear4bit to a device first)")
    return qs


def _unpack_cpu(packed: torch.Tensor, qs) -> torch.Tensor:
    """De-quantise bitsandbytes' CPU inference layout (made in place by ``Linear4bit.forward`` in eval
    mode without grad): nibbles interleaved in 32-row groups, un-nested absmax stored (in/bs, out) bf16."""
    n, k = qs.shape
    bs = qs.blocksize
    if packed.dtype != torch.uint8 or tuple(packed.shape) != (n, k // 2) or n % 32 or k % bs:
        raise RuntimeError(f"unrecognised bitsandbytes CPU-packed 4-bit layout (weight {tuple(packed.shape)}, "
                           f"shape {tuple(qs.shape)}, blocksize {bs})")
    p = packed.reshape(-1, 32)
    codes = torch.cat([p & 0xF, p >> 4], dim=-1).reshape(n // 32, k // 2, 32, 2).transpose(1, 2).reshape(n, k)
    scale = qs.absmax.t().float().repeat_interleave(bs, dim=1)
    return qs.code.to(device=packed.device, dtype=torch.float32)[codes.long()].mul_(scale)


def _scales(qs) -> torch.Tensor:
    """float32 per-block scales, double quantization resolved (a few MB at 7B shapes; per call)."""
    if qs.nested:
        return (bnb.functional.dequantize_blockwise(qs.absmax, qs.state2) + qs.offset).float()
    return qs.absmax.float()


def _to_dense(w, dtype: torch.dtype) -> torch.Tensor:
    qs = _quant_state(w)
    if getattr(qs, "packing_format_for_cpu", False):
        return _unpack_cpu(w.data, qs).to(getattr(qs, "original_dtype", qs.dtype)).to(dtype)
    return bnb.functional.dequantize_4bit(w.data, qs).to(dtype)


def _row_chunks(w, dtype: torch.dtype):
    """Yield (lo, hi, W[lo:hi] de-quantised in ``dtype``) through bitsandbytes' own 4-bit de-quantisation
    op, a bounded chunk of rows at a time: no full dense weight ever exists. Falls back to one chunk for
    layouts the chunking cannot slice (CPU inference packing, rows not a whole number of blocks)."""
    qs = _quant_state(w)
    n, k = qs.shape
    bs = qs.blocksize
    if getattr(qs, "packing_format_for_cpu", False) or k % bs or qs.quant_type not in ("nf4", "fp4"):
        yield 0, n, _to_dense(w, dtype)
        return
    packed = w.data.reshape(-1)
    if packed.dtype != torch.uint8:
        packed = packed.view(torch.uint8)
    scales = _scales(qs)
    step = max(1, DEQUANT_CHUNK_ELEMENTS // k)
    per_row = k // bs
    deq = torch.ops.bitsandbytes.dequantize_4bit.default
    qdtype = getattr(qs, "dtype", dtype)
    for lo in range(0, n, step):
        hi = min(n, lo + step)
        c = deq(packed[lo * k // 2: hi * k // 2], scales[lo * per_row: hi * per_row], bs, qs.quant_type,
                (hi - lo, k), qdtype)
        yield lo, hi, (c if c.dtype == dtype else c.to(dtype))


def _rows(w) -> int:
    return int(_quant_state(w).shape[0])


def _matmul(w, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x·Wᵀ over row chunks of W (each chunk a temporary that dies in the loop)."""
    out = None
    for lo, hi, c in _row_chunks(w, dtype):
        if out is None:
            if lo == 0 and hi == _rows(w):  # a single chunk: no output copy
                return x @ c.t()
            out = x.new_empty(x.shape[0], _rows(w), dtype=dtype)
        out[:, lo:hi] = x @ c.t()
    return out


def _matmul_t(w, g: torch.Tensor, dtype: torch.dtype, acc: Optional[torch.Tensor] = None) -> torch.Tensor:
    """acc + g·W over row chunks of W."""
    for lo, hi, c in _row_chunks(w, dtype):
        gc = g[:, lo:hi]
        acc = gc @ c if acc is None else acc.addmm_(gc, c)
    return acc


def _compute_dtype(m: nn.Module) -> torch.dtype:
    if getattr(m, "compute_dtype", None) is not None:
        return m.compute_dtype
    qs = _quant_state(m.weight)
    return getattr(qs, "original_dtype", None) or qs.dtype


KIND = BaseKind(name=KIND_NAME, matches=lambda m: isinstance(m, bnb.nn.Linear4bit), weight=lambda m: m.weight,
                to_dense=_to_dense, supports_merged=False, compute_dtype=_compute_dtype,
                matmul=_matmul, matmul_t=_matmul_t, fresh_dense=True)


def register() -> None:
    register_base_kind(KIND)


def quantize(m: nn.Linear, compute_dtype: torch.dtype, block_size: int, *, scaler_block_size: int = 256,
             double_quant: bool = True) -> nn.Module:
    """A new ``Linear4bit`` (NF4) holding ``m``'s weight; ``double_quant`` is ``compress_statistics``
    (bitsandbytes groups the scales by 256 itself; ``scaler_block_size`` is ignored)."""
    w = m.weight.detach().to(compute_dtype).contiguous()
    data, qs = bnb.functional.quantize_4bit(w, blocksize=block_size, compress_statistics=double_quant,
                                            quant_type="nf4")
    new = bnb.nn.Linear4bit(m.in_features, m.out_features, bias=m.bias is not None, compute_dtype=compute_dtype,
                            compress_statistics=double_quant, quant_type="nf4", device="meta")
    new.weight = bnb.nn.Params4bit(data, requires_grad=False, quant_state=qs, blocksize=block_size,
                                   compress_statistics=double_quant, quant_type="nf4", bnb_quantized=True, module=new)
    new.quant_state = qs
    if m.bias is not None:
        new.bias = nn.Parameter(m.bias.detach().clone(), requires_grad=m.bias.requires_grad)
    new.train(m.training)
    return new


def spec(base: nn.Module) -> dict:
    """The :func:`quantize` keywords that quantize a merged ``base`` the way it was."""
    qs = _quant_state(base.weight)
    return {"block_size": qs.blocksize, "compute_dtype": _compute_dtype(base),
            "double_quant": bool(getattr(qs, "original_nested", qs.nested))}
