"""The one place that decides which implementation of a sparse op runs.

Backends register per op; ``choose(op, ...)`` picks by device, dtype, shape and density. The decision
is inspectable: ``explain()`` returns it as text, and ``ROSA_PEFT_SPARSE_BACKEND=name`` forces one
backend for every op that has it (for tests and benchmarks). Backends with an optional dependency live
in their own module, listed in :data:`LAZY_BACKENDS` (name -> module, device types): such a module is
imported on the first call on one of its devices, or when its name is forced, and its
``register_backends(register, Backend)`` puts its kernels in the registry; ``ROSA_PEFT_NO_<NAME>=1``
(e.g. ``ROSA_PEFT_NO_TRITON=1``) keeps it out. A new kernel backend is that module plus one line here.
"""
from __future__ import annotations

import importlib
import logging
import os
from dataclasses import dataclass
from typing import Callable

import torch

from . import ops
from .storage import SparseAdapter

log = logging.getLogger("rosa_peft.sparse")

# CPU: torch's CSR SDDMM wins below this density; above it the dense GEMM + gather is cheaper.
SAMPLED_ADDMM_MAX_DENSITY = 0.05
# CPU, bf16/fp16 operands: the dense 16-bit GEMM + gather wins over the CSR SDDMM (whose float32,
# token-contiguous copies of both operands cost T·(out+in)) while its T·out·in multiply-adds stay small,
# i.e. while out·in/(out+in) is at most this (SmolLM2's 576x1536: 419; a 7B layer's 4096x4096: 2048).
DENSE_LOWP_MAX_SIZE = 512


@dataclass
class Backend:
    name: str
    fn: Callable
    supports: Callable[..., bool]  # (device_type, dtype, sp) -> bool
    note: str = ""


_REGISTRY: dict[str, list[Backend]] = {"sddmm": [], "add_into": [], "write_into": [], "spmm": [], "spmm_t": []}

# backend name -> (the module that registers it, the device types it runs on); imported on first use
LAZY_BACKENDS: dict[str, tuple[str, tuple[str, ...]]] = {
    "triton": ("rosa_peft.sparse.triton_ops", ("cuda",)),
}
_LOADED: set[str] = set()  # lazy backends already tried (loaded or not importable)


def register(op: str, backend: Backend, first: bool = False) -> None:
    entries = _REGISTRY.setdefault(op, [])
    entries[:] = [b for b in entries if b.name != backend.name]
    entries.insert(0 if first else len(entries), backend)


def backends(op: str) -> list[str]:
    """The names of the backends registered for ``op``, in the order :func:`choose` tries them."""
    return [b.name for b in _REGISTRY.get(op, [])]


def candidates(op: str, device_type: str) -> list[Backend]:
    """The registered backends of ``op`` that can run on ``device_type`` (loading lazy ones first)."""
    _load_lazy(device_type)
    return [b for b in _REGISTRY.get(op, [])
            if b.name not in LAZY_BACKENDS or device_type in LAZY_BACKENDS[b.name][1]]


def _density(sp: SparseAdapter) -> float:
    return sp.nnz / max(1, sp.out_features * sp.in_features)


register(
    "sddmm",
    Backend(
        "dense_lowp",
        ops.sddmm_dense_lowp,
        lambda device, dtype, sp: (device == "cpu" and dtype in (torch.bfloat16, torch.float16)
                                   and sp.out_features * sp.in_features
                                   <= DENSE_LOWP_MAX_SIZE * (sp.out_features + sp.in_features)),
        "dense 16-bit GEMM + gather (CPU, bf16/fp16, small weights)",
    ),
)
register(
    "sddmm",
    Backend(
        "sampled_addmm",
        ops.sddmm_sampled_addmm,
        lambda device, dtype, sp: device == "cpu" and _density(sp) <= SAMPLED_ADDMM_MAX_DENSITY,
        "torch CSR SDDMM in fp32 (CPU, low density)",
    ),
)
register(
    "sddmm",
    Backend("dense_gather", ops.sddmm_dense_gather, lambda device, dtype, sp: True, "row-chunked dense dOᵀX + gather"),
)


def _load_lazy(device_type: str) -> None:
    """Register the lazy backends (:data:`LAZY_BACKENDS`) this call needs; never at import."""
    forced = os.environ.get("ROSA_PEFT_SPARSE_BACKEND")
    for name, (module, devices) in LAZY_BACKENDS.items():
        if name in _LOADED or os.environ.get(f"ROSA_PEFT_NO_{name.upper()}") not in (None, "", "0"):
            continue
        if device_type not in devices and forced != name:
            continue
        _LOADED.add(name)
        try:
            register_backends = importlib.import_module(module).register_backends
        except Exception as exc:  # the optional dependency is absent or unusable: the torch backends stay
            log.debug("%s sparse backends unavailable: %s", name, exc)
            continue
        register_backends(register, Backend)


def choose(op: str, device_type: str, dtype: torch.dtype, sp: SparseAdapter) -> Backend:
    _load_lazy(device_type)
    entries = _REGISTRY[op]
    forced = os.environ.get("ROSA_PEFT_SPARSE_BACKEND")
    if forced:
        for b in entries:
            if b.name == forced:
                return b
    for b in entries:
        if b.supports(device_type, dtype, sp):
            return b
    return entries[-1]


def sddmm(grad_out: torch.Tensor, x: torch.Tensor, sp: SparseAdapter) -> torch.Tensor:
    """Gradient of the sparse values: (grad_outᵀ · x) at the mask positions, float32 or float64."""
    backend = choose("sddmm", grad_out.device.type, grad_out.dtype, sp)
    if log.isEnabledFor(logging.DEBUG):
        log.debug("sddmm %s nnz=%d dtype=%s -> %s", sp.shape, sp.nnz, grad_out.dtype, backend.name)
    return backend.fn(grad_out, x, sp)


def explain(device_type: str, dtype: torch.dtype, sp: SparseAdapter) -> str:
    lines = []
    for op in _REGISTRY:
        b = choose(op, device_type, dtype, sp)
        lines.append(f"{op}: {b.name} ({b.note}) for shape={sp.shape} nnz={sp.nnz} density={_density(sp):.4%} "
                     f"device={device_type} dtype={dtype}; candidates: {', '.join(backends(op))}")
    return "\n".join(lines)


_ALWAYS = lambda device, dtype, sp: True  # noqa: E731
register("add_into", Backend("torch", ops.add_into, _ALWAYS, "index_add_ on the flat weight"))
register("write_into", Backend("torch", ops.write_into, _ALWAYS, "index_copy_ on the flat weight"))
register("spmm", Backend("torch", ops.spmm, _ALWAYS, "torch CSR matmul"))
register("spmm_t", Backend("torch", ops.spmm_t, _ALWAYS, "torch CSR matmul over the transposed structure"))


def add_into(dense: torch.Tensor, sp: SparseAdapter, values: torch.Tensor) -> torch.Tensor:
    """dense[mask] += values (in place, in dense's dtype); returns dense. ``dense`` may be a strided view
    (e.g. the transposed weight of a GPT-2 ``Conv1D``): then the positions are written by (row, col)."""
    if not dense.is_contiguous():
        return ops.add_into_strided(dense, sp, values)
    return choose("add_into", dense.device.type, dense.dtype, sp).fn(dense, sp, values)


def write_into(dense: torch.Tensor, sp: SparseAdapter, values: torch.Tensor) -> torch.Tensor:
    """dense[mask] = values (in place); returns dense. Strided views as in :func:`add_into`."""
    if not dense.is_contiguous():
        return ops.write_into_strided(dense, sp, values)
    return choose("write_into", dense.device.type, dense.dtype, sp).fn(dense, sp, values)


def spmm(x: torch.Tensor, sp: SparseAdapter, values: torch.Tensor, out_dtype=None) -> torch.Tensor:
    """x · Sᵀ for x (T, in) -> (T, out), in ``out_dtype`` (default ``x.dtype``)."""
    return _call_spmm("spmm", x, sp, values, out_dtype)


def spmm_t(grad_out: torch.Tensor, sp: SparseAdapter, values: torch.Tensor, out_dtype=None) -> torch.Tensor:
    """grad_out · S for grad_out (T, out) -> (T, in), in ``out_dtype`` (default ``grad_out.dtype``)."""
    return _call_spmm("spmm_t", grad_out, sp, values, out_dtype)


def _call_spmm(op: str, a: torch.Tensor, sp: SparseAdapter, values: torch.Tensor, out_dtype) -> torch.Tensor:
    backend = choose(op, a.device.type, a.dtype, sp)
    if backend.fn in (ops.spmm, ops.spmm_t):  # the torch backends round once, straight into out_dtype
        return backend.fn(a, sp, values, out_dtype=out_dtype)
    res = backend.fn(a, sp, values)
    return res if out_dtype is None or res.dtype == out_dtype else res.to(out_dtype)


# Gather has a single torch implementation.
gather_from = ops.gather_from
