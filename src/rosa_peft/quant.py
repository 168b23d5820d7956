"""QRoSA: RoSA over a 4-bit NF4 base (torchao ``NF4Tensor`` or bitsandbytes ``Linear4bit``).

Nothing here is imported by ``import rosa_peft``; the backends are imported only when asked for.
Each backend contributes a :class:`~rosa_peft.layer.BaseKind` (``supports_merged=False``), so
``RosaLinear`` runs the ``sp_add`` path: per call the 4-bit weight is de-quantised into a fresh
temporary, S is added into it, one GEMM runs, plus LoRA; backward de-quantises again. No dense copy
outlives the step.

* ``quantize_model(model, backend="torchao"|"bnb", ...)`` converts a model's Linear layers in place.
* ``ensure_registered()`` registers the kinds of every importable backend (``quantize_model`` calls
  it); ``layer.resolve_base_kind`` calls :func:`register_loaded_backends` so an already-quantized model
  works with ``get_rosa_model`` / ``RosaModel.from_pretrained`` without importing this module first.
* ``merge_and_requantize(rosa_model)``: ``merge_and_unload()`` then NF4 again (rounds; warns).
* ``add_quant_arguments(parser)`` / ``maybe_quantize(model, args)`` for the CLI commands.
"""
from __future__ import annotations

import importlib
import math
import sys
import warnings
from typing import Iterable, Optional

import torch
from torch import nn

from .layer import BaseKind, RosaLinear, register_base_kind, resolve_base_kind

BACKENDS = ("torchao", "bnb")
TORCHAO_KIND = "torchao-nf4"
BNB_KIND = "bnb-4bit"
QUANT_KINDS = (TORCHAO_KIND, BNB_KIND)
COMPUTE_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
BNB_BLOCK_SIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
_TOP_MODULE = {"torchao": "torchao", "bnb": "bitsandbytes"}
_TORCHAO_PATHS = ("torchao.quantization.quantize_.workflows.nf4.nf4_tensor", "torchao.dtypes.nf4tensor")
_TRIED: dict[str, bool] = {}  # backend -> registered (False: not importable)


# ---- backends --------------------------------------------------------------------------------------
def _torchao_nf4():
    """The torchao module defining ``NF4Tensor`` / ``to_nf4`` (its path moved between releases)."""
    for path in _TORCHAO_PATHS:
        try:
            mod = importlib.import_module(path)
        except ImportError:
            continue
        if hasattr(mod, "NF4Tensor") and hasattr(mod, "to_nf4"):
            return mod
    return None


def _bnb():
    try:
        import bitsandbytes  # noqa: F401
        import bitsandbytes.functional  # noqa: F401
        import bitsandbytes.nn  # noqa: F401
    except Exception:  # ImportError, or a broken binary raising at import
        return None
    return sys.modules["bitsandbytes"]


def backend_available(backend: str) -> bool:
    _check_backend_name(backend)
    return (_torchao_nf4() if backend == "torchao" else _bnb()) is not None


def _check_backend_name(backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"unknown quantization backend {backend!r}; choose one of {', '.join(BACKENDS)}")


def _require(backend: str):
    _check_backend_name(backend)
    mod = _torchao_nf4() if backend == "torchao" else _bnb()
    if mod is None:
        pkg = "torchao" if backend == "torchao" else "bitsandbytes"
        raise ImportError(f"backend={backend!r} needs the {pkg} package (pip install {pkg}), which is not importable")
    ensure_registered((backend,))
    return mod


# ---- base kinds ------------------------------------------------------------------------------------
def _torchao_kind(nf4) -> BaseKind:
    NF4Tensor = nf4.NF4Tensor

    def matches(m: nn.Module) -> bool:
        return isinstance(m, nn.Linear) and isinstance(m.weight, NF4Tensor)

    def to_dense(w, dtype: torch.dtype) -> torch.Tensor:
        # a fresh tensor in the NF4 tensor's own dtype (as torchao's linear_nf4 de-quantises), then cast
        return w.get_original_weight().to(dtype)

    def matmul(w, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return x @ to_dense(w, dtype).t()  # torchao's linear_nf4: de-quantise per call, one GEMM

    def matmul_t(w, g: torch.Tensor, dtype: torch.dtype, acc: Optional[torch.Tensor] = None) -> torch.Tensor:
        deq = to_dense(w, dtype)
        return g @ deq if acc is None else acc.addmm_(g, deq)

    return BaseKind(name=TORCHAO_KIND, matches=matches, weight=lambda m: m.weight, to_dense=to_dense,
                    supports_merged=False, compute_dtype=lambda m: m.weight.dtype, matmul=matmul, matmul_t=matmul_t)


def _bnb_quant_state(w):
    qs = getattr(w, "quant_state", None)
    if qs is None:
        qs = getattr(getattr(w, "module", None), "quant_state", None)
    if qs is None:
        raise RuntimeError("bitsandbytes 4-bit weight has no quant_state: it is not quantized yet "
                           "(quantize with rosa_peft.quantize_model or move the Linear4bit to a device first)")
    return qs


def _bnb_unpack_cpu(packed: torch.Tensor, qs) -> torch.Tensor:
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


# Rows of the weight de-quantised at once by the QRoSA matmuls (bounded temporaries; elements).
DEQUANT_CHUNK_ELEMENTS = 1 << 22


def _bnb_scales(bnb, qs) -> torch.Tensor:
    """float32 per-block scales, double quantization resolved (a few MB at 7B shapes; per call)."""
    if qs.nested:
        return (bnb.functional.dequantize_blockwise(qs.absmax, qs.state2) + qs.offset).float()
    return qs.absmax.float()


def _bnb_row_chunks(bnb, w, dtype: torch.dtype):
    """Yield (lo, hi, W[lo:hi] de-quantised in ``dtype``) through bitsandbytes' own 4-bit de-quantisation
    op, a bounded chunk of rows at a time: no full dense weight ever exists. Falls back to one chunk for
    layouts the chunking cannot slice (CPU inference packing, rows not a whole number of blocks)."""
    qs = _bnb_quant_state(w)
    n, k = qs.shape
    bs = qs.blocksize
    if getattr(qs, "packing_format_for_cpu", False) or k % bs or qs.quant_type not in ("nf4", "fp4"):
        yield 0, n, _bnb_kind_to_dense(bnb, w, dtype)
        return
    packed = w.data.reshape(-1)
    if packed.dtype != torch.uint8:
        packed = packed.view(torch.uint8)
    scales = _bnb_scales(bnb, qs)
    step = max(1, DEQUANT_CHUNK_ELEMENTS // k)
    per_row = k // bs
    deq = torch.ops.bitsandbytes.dequantize_4bit.default
    qdtype = getattr(qs, "dtype", dtype)
    for lo in range(0, n, step):
        hi = min(n, lo + step)
        c = deq(packed[lo * k // 2: hi * k // 2], scales[lo * per_row: hi * per_row], bs, qs.quant_type,
                (hi - lo, k), qdtype)
        yield lo, hi, (c if c.dtype == dtype else c.to(dtype))


def _bnb_kind_to_dense(bnb, w, dtype: torch.dtype) -> torch.Tensor:
    qs = _bnb_quant_state(w)
    if getattr(qs, "packing_format_for_cpu", False):
        return _bnb_unpack_cpu(w.data, qs).to(getattr(qs, "original_dtype", qs.dtype)).to(dtype)
    return bnb.functional.dequantize_4bit(w.data, qs).to(dtype)


def _chunked_matmul(chunks):
    """x·Wᵀ and g·W over row chunks of W (each chunk a temporary that dies in the loop)."""

    def matmul(w, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        out = None
        for lo, hi, c in chunks(w, dtype):
            if out is None:
                if lo == 0 and hi == _rows(w):  # a single chunk: no output copy
                    return x @ c.t()
                out = x.new_empty(x.shape[0], _rows(w), dtype=dtype)
            out[:, lo:hi] = x @ c.t()
        return out

    def matmul_t(w, g: torch.Tensor, dtype: torch.dtype, acc: Optional[torch.Tensor] = None) -> torch.Tensor:
        for lo, hi, c in chunks(w, dtype):
            gc = g[:, lo:hi]
            acc = gc @ c if acc is None else acc.addmm_(gc, c)
        return acc

    return matmul, matmul_t


def _rows(w) -> int:
    return int(_bnb_quant_state(w).shape[0])


def _bnb_kind(bnb) -> BaseKind:
    Linear4bit = bnb.nn.Linear4bit

    def to_dense(w, dtype: torch.dtype) -> torch.Tensor:
        return _bnb_kind_to_dense(bnb, w, dtype)

    def compute_dtype(m: nn.Module) -> torch.dtype:
        if getattr(m, "compute_dtype", None) is not None:
            return m.compute_dtype
        qs = _bnb_quant_state(m.weight)
        return getattr(qs, "original_dtype", None) or qs.dtype

    matmul, matmul_t = _chunked_matmul(lambda w, dtype: _bnb_row_chunks(bnb, w, dtype))
    return BaseKind(name=BNB_KIND, matches=lambda m: isinstance(m, Linear4bit), weight=lambda m: m.weight,
                    to_dense=to_dense, supports_merged=False, compute_dtype=compute_dtype,
                    matmul=matmul, matmul_t=matmul_t)


def _register(backend: str) -> bool:
    if backend not in _TRIED:
        mod = _torchao_nf4() if backend == "torchao" else _bnb()
        if mod is not None:
            register_base_kind(_torchao_kind(mod) if backend == "torchao" else _bnb_kind(mod))
        _TRIED[backend] = mod is not None
    return _TRIED[backend]


def ensure_registered(backends: Iterable[str] = BACKENDS) -> list[str]:
    """Register the base kinds of the given (importable) backends; returns the registered ones."""
    return [b for b in backends if _register(b)]


def register_loaded_backends() -> None:
    """Cheap lazy hook (called by ``layer.resolve_base_kind``): register only backends already imported
    by someone else — a 4-bit layer cannot exist before its library is imported."""
    for backend, top in _TOP_MODULE.items():
        if backend not in _TRIED and top in sys.modules:
            _register(backend)


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
        return w.clone() if kind.supports_merged else w


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
        raise ValueError(f"quantize_model: layer {name!r} has an unsupported weight dtype {w.dtype} "
                         f"({type(w.data).__name__}); NF4 needs float32, bfloat16 or float16")
    if w.is_meta:
        raise ValueError(f"quantize_model: layer {name!r} is on the meta device (load its weights first)")
    if m.in_features % block_size:
        raise ValueError(f"quantize_model: layer {name!r} has in_features={m.in_features}, not divisible by the "
                         f"quantization block size {block_size}; add it to skip_modules or change block_size")


def _scaler_block(n_blocks: int, wanted: int) -> int:
    """torchao double-quantises the per-block scales in groups that must divide their count."""
    return math.gcd(n_blocks, wanted)


def _to_torchao(nf4, m: nn.Linear, compute_dtype, block_size: int, scaler_block_size: int) -> nn.Linear:
    w = m.weight.detach().to(compute_dtype).contiguous()
    q = nf4.to_nf4(w, block_size, _scaler_block(w.numel() // block_size, scaler_block_size))
    m.weight = nn.Parameter(q, requires_grad=False)
    return m


def _to_bnb(bnb, m: nn.Linear, compute_dtype, block_size: int, double_quant: bool) -> nn.Module:
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
        raise ValueError(f"quantize_model: compute_dtype {compute_dtype} is unsupported; use bfloat16, float16 or float32")
    if not isinstance(block_size, int) or block_size <= 0 or block_size % 2:
        raise ValueError(f"quantize_model: block_size must be a positive even int, got {block_size!r}")
    if backend == "bnb" and block_size not in BNB_BLOCK_SIZES:
        raise ValueError(f"quantize_model: bitsandbytes supports block sizes {BNB_BLOCK_SIZES}, got {block_size}")
    if isinstance(skip_modules, str):
        skip_modules = (skip_modules,)
    skip_modules = tuple(skip_modules or ())
    mod = _require(backend)
    wrapped = [n for n, m in model.named_modules() if isinstance(m, RosaLinear)]
    if wrapped:
        raise ValueError(f"quantize_model: {wrapped[0]!r} already carries a RoSA adapter; quantize the base "
                         "model before get_rosa_model")
    layers = _quantizable(model, skip_modules)
    for name, m in layers:  # validate everything first: a bad layer leaves the model untouched
        _validate_layer(name, m, block_size)
    for name, m in layers:
        if backend == "torchao":
            _to_torchao(mod, m, compute_dtype, block_size, scaler_block_size)
        else:
            model.set_submodule(name, _to_bnb(mod, m, compute_dtype, block_size, double_quant))
    return model


# ---- merging ---------------------------------------------------------------------------------------
def _spec(layer: RosaLinear) -> dict:
    base = layer.base_layer
    if layer.kind.name == TORCHAO_KIND:
        w = base.weight
        return {"backend": "torchao", "block_size": w.block_size, "scaler_block_size": w.scaler_block_size,
                "compute_dtype": w.dtype}
    qs = _bnb_quant_state(base.weight)
    return {"backend": "bnb", "block_size": qs.blocksize, "compute_dtype": layer.kind.compute_dtype(base),
            "double_quant": bool(getattr(qs, "original_nested", qs.nested))}


def merge_and_requantize(rosa_model, safe_merge: bool = False) -> nn.Module:
    """``merge_and_unload()`` then re-quantize the formerly 4-bit layers (same backend and block size).

    NF4 rounding applies to ``W_deq + S + s·B·A`` again, so outputs differ from the unmerged model by
    about the quantization error (PEFT warns the same for its bnb 4-bit merge).
    """
    specs = {key: _spec(layer) for key, layer in rosa_model.rosa_layers() if layer.kind.name in QUANT_KINDS}
    warnings.warn("merge_and_requantize: re-quantizing the merged weights to NF4 rounds them again; outputs "
                  "may differ from the unmerged adapter. Use merge_and_unload() for an exact (dequantized) merge.",
                  UserWarning, stacklevel=2)
    model = rosa_model.merge_and_unload(safe_merge=safe_merge)
    for key, spec in specs.items():
        m = model.get_submodule(key)
        if spec["backend"] == "torchao":
            _to_torchao(_require("torchao"), m, spec["compute_dtype"], spec["block_size"], spec["scaler_block_size"])
        else:
            model.set_submodule(key, _to_bnb(_require("bnb"), m, spec["compute_dtype"], spec["block_size"],
                                               spec["double_quant"]))
    return model


# ---- CLI helpers -----------------------------------------------------------------------------------
def add_quant_arguments(parser):
    """Add ``--quantize {none,nf4}`` and ``--quant-backend {torchao,bnb}`` to an argparse parser."""
    group = parser.add_argument_group("quantization (QRoSA)")
    group.add_argument("--quantize", choices=("none", "nf4"), default="none",
                       help="load the base model's Linear layers as 4-bit NF4 (QRoSA); lm_head and embeddings stay float")
    group.add_argument("--quant-backend", choices=BACKENDS, default="torchao",
                       help="NF4 implementation: torchao (pure PyTorch, default) or bitsandbytes")
    return parser


def _float_dtype(model: nn.Module) -> torch.dtype:
    for p in model.parameters():
        if p.dtype in COMPUTE_DTYPES and type(p.data) is torch.Tensor:
            return p.dtype
    return torch.float32


def maybe_quantize(model: nn.Module, args, compute_dtype: Optional[torch.dtype] = None) -> nn.Module:
    """Apply ``--quantize`` / ``--quant-backend``; compute dtype defaults to the model's float dtype."""
    mode = getattr(args, "quantize", None) or "none"
    if mode == "none":
        return model
    if mode != "nf4":
        raise ValueError(f"--quantize {mode!r}: choose none or nf4")
    return quantize_model(model, backend=getattr(args, "quant_backend", None) or "torchao",
                          compute_dtype=compute_dtype or _float_dtype(model))


__all__ = [
    "BACKENDS", "add_quant_arguments", "backend_available", "dense_weight", "ensure_registered", "is_quantized",
    "maybe_quantize", "merge_and_requantize", "quantize_model", "register_loaded_backends",
]
