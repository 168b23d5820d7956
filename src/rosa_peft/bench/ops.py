"""Op-level benchmark: the three sparse ops RoSA needs against their dense alternatives.

For a weight of shape (out, in), T tokens and a random mask at density d:

* ``sddmm``   dS = (dOᵀ·X) at the mask  vs  the dense weight gradient dOᵀ·X (what FFT / SHiRA / Supra pay);
* ``scatter`` W[mask] = W0 + S (the ``merged`` sync after an optimizer step)  vs  a dense W + ΔW;
* ``spmm``    X·Sᵀ  vs  X·ΔWᵀ with a dense ΔW.

Every backend registered in ``sparse.dispatch`` that can run on the device is timed (Triton only on
CUDA); the one the dispatch picks for that call is marked ``chosen``.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass
from typing import Callable, Optional

import torch

from ..sparse import SparseAdapter, dispatch

OPS = ("sddmm", "scatter", "spmm")
DEFAULT_DENSITIES = (0.001, 0.003, 0.01, 0.03)


@dataclass
class OpResult:
    op: str
    out_features: int
    in_features: int
    density: float
    nnz: int
    impl: str
    kind: str  # "sparse" or "dense"
    chosen: bool
    median_ms: float
    speedup_vs_dense: Optional[float] = None

    def to_dict(self) -> dict:
        return asdict(self)


def time_fn(fn: Callable[[], object], repeats: int, warmup: int, device: str) -> float:
    """Median wall time of ``fn`` in milliseconds."""
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1000


def random_adapter(out_f: int, in_f: int, density: float, device: str, seed: int = 0) -> SparseAdapter:
    gen = torch.Generator().manual_seed(seed)
    numel = out_f * in_f
    k = max(1, round(density * numel))
    flat = torch.zeros(numel, dtype=torch.bool)
    flat[torch.randperm(numel, generator=gen)[:k]] = True
    sp = SparseAdapter(out_f, in_f, dtype=torch.float32, device=device)
    sp.set_mask(flat.view(out_f, in_f).to(device))
    return sp


def _candidates(op: str, device: str):
    return dispatch.candidates(op, torch.device(device).type)


def bench_shape(out_f: int, in_f: int, density: float, *, tokens: int, dtype: torch.dtype, device: str,
                repeats: int, warmup: int = 1, ops=OPS) -> list[OpResult]:
    sp = random_adapter(out_f, in_f, density, device)
    gen = torch.Generator(device=device).manual_seed(1)
    x = torch.randn(tokens, in_f, dtype=dtype, device=device, generator=gen)
    g = torch.randn(tokens, out_f, dtype=dtype, device=device, generator=gen)
    w = torch.randn(out_f, in_f, dtype=dtype, device=device, generator=gen)
    vals = torch.randn(sp.nnz, dtype=torch.float32, device=device, generator=gen) * 1e-3
    dense_delta = torch.zeros_like(w)
    dispatch.add_into(dense_delta, sp, vals)
    w0 = dispatch.gather_from(w, sp).clone()
    rows: list[OpResult] = []

    def add(op, impl, kind, chosen, ms):
        rows.append(OpResult(op, out_f, in_f, density, sp.nnz, impl, kind, chosen, ms))

    t = lambda fn: time_fn(fn, repeats, warmup, device)  # noqa: E731
    if "sddmm" in ops:
        chosen = dispatch.choose("sddmm", torch.device(device).type, dtype, sp).name
        for b in _candidates("sddmm", device):
            add("sddmm", b.name, "sparse", b.name == chosen, t(lambda b=b: b.fn(g, x, sp)))
        add("sddmm", "dense dOᵀ·X", "dense", False, t(lambda: g.t() @ x))
    if "scatter" in ops:
        chosen = dispatch.choose("write_into", torch.device(device).type, dtype, sp).name
        for b in _candidates("write_into", device):
            add("scatter", b.name, "sparse", b.name == chosen, t(lambda b=b: b.fn(w, sp, w0 + vals)))
        add("scatter", "dense W + ΔW", "dense", False, t(lambda: w + dense_delta))
    if "spmm" in ops:
        chosen = dispatch.choose("spmm", torch.device(device).type, dtype, sp).name
        for b in _candidates("spmm", device):
            add("spmm", b.name, "sparse", b.name == chosen, t(lambda b=b: b.fn(x, sp, vals)))
        add("spmm", "dense X·ΔWᵀ", "dense", False, t(lambda: x @ dense_delta.t()))
    for op in {r.op for r in rows}:
        dense = next(r.median_ms for r in rows if r.op == op and r.kind == "dense")
        for r in rows:
            if r.op == op and r.kind == "sparse" and r.median_ms > 0:
                r.speedup_vs_dense = dense / r.median_ms
    return rows


def run_ops_suite(shapes: list[tuple[int, int]], densities=DEFAULT_DENSITIES, *, tokens: int = 512,
                  dtype: torch.dtype = torch.bfloat16, device: str = "cpu", repeats: int = 5, warmup: int = 1,
                  progress: bool = True) -> list[OpResult]:
    from tqdm.auto import tqdm

    rows: list[OpResult] = []
    combos = [(s, d) for s in shapes for d in densities]
    for (out_f, in_f), d in tqdm(combos, desc="ops", disable=not progress, leave=False):
        rows.extend(bench_shape(out_f, in_f, d, tokens=tokens, dtype=dtype, device=device, repeats=repeats,
                                warmup=warmup))
    return rows


def explain_lines(shapes: list[tuple[int, int]], densities, *, dtype: torch.dtype, device: str) -> list[str]:
    """The dispatch decision for every op at each shape and density (what ``--explain`` prints)."""
    lines = []
    for out_f, in_f in shapes:
        for d in densities:
            sp = random_adapter(out_f, in_f, d, "cpu")
            lines.append(dispatch.explain(torch.device(device).type, dtype, sp))
    return lines
