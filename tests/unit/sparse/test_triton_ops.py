"""Triton kernels (rosa_peft.sparse.triton_ops) against float64 / torch-op references.

Without a GPU every kernel runs under TRITON_INTERPRET=1 in ONE subprocess: the interpreter has to be
switched on before triton is imported, and must not leak into the rest of the suite. With CUDA the same
checks also run natively in-process. Small shapes only (the interpreter is slow).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

REPO = Path(__file__).resolve().parents[3]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}

# name -> (op, T, out, in, mask pattern, density, input dtype, index dtype, extra)
CASES = {
    "sddmm_fp32_random": ("sddmm", 16, 24, 30, "random", 0.1, "fp32", "int32", {}),
    "sddmm_bf16_random": ("sddmm", 37, 40, 70, "random", 0.05, "bf16", "int32", {}),
    "sddmm_fp16_int16": ("sddmm", 20, 33, 27, "random", 0.2, "fp16", "int16", {}),
    "sddmm_fp32_empty_rows_dense_row": ("sddmm", 40, 40, 70, "rows", 0.1, "fp32", "int32", {}),
    "sddmm_bf16_empty_rows_dense_row_int16": ("sddmm", 33, 48, 65, "rows", 0.03, "bf16", "int16", {}),
    "sddmm_bf16_half_dense": ("sddmm", 24, 26, 31, "random", 0.5, "bf16", "int32", {}),
    "sddmm_fp32_single_nnz": ("sddmm", 17, 24, 24, "single", 0.0, "fp32", "int32", {}),
    "sddmm_fp32_no_nnz": ("sddmm", 16, 24, 24, "empty", 0.0, "fp32", "int32", {}),
    "sddmm_fp32_zero_tokens": ("sddmm", 0, 24, 24, "random", 0.2, "fp32", "int32", {}),
    "sddmm_fp64": ("sddmm", 19, 25, 29, "rows", 0.1, "fp64", "int32", {}),
    "sddmm_bf16_noncontig_inputs": ("sddmm", 24, 30, 36, "rows", 0.1, "bf16", "int32", {"noncontig": True}),
    "sddmm_fp32_blocks_32x64": ("sddmm", 40, 40, 70, "rows", 0.1, "fp32", "int32", {"blocks": (32, 64)}),
    "sddmm_bf16_blocks_64x16": ("sddmm", 40, 40, 70, "rows", 0.05, "bf16", "int16", {"blocks": (64, 16)}),
    "add_fp32": ("add", 0, 24, 30, "rows", 0.2, "fp32", "int32", {}),
    "add_bf16_fp32_values": ("add", 0, 40, 70, "rows", 0.1, "bf16", "int16", {"values": "fp32"}),
    "add_fp16": ("add", 0, 33, 27, "random", 0.3, "fp16", "int32", {}),
    "write_bf16": ("write", 0, 40, 70, "rows", 0.1, "bf16", "int32", {}),
    "write_fp32_strided_dense": ("write", 0, 24, 30, "random", 0.2, "fp32", "int16", {"noncontig": True}),
    "write_base_bf16": ("write_base", 0, 40, 70, "rows", 0.1, "bf16", "int32", {"values": "fp32"}),
    "write_base_fp16": ("write_base", 0, 33, 27, "random", 0.3, "fp16", "int16", {}),
    "add_no_nnz": ("add", 0, 24, 24, "empty", 0.0, "bf16", "int32", {}),
    "spmm_fp32": ("spmm", 21, 40, 70, "rows", 0.1, "fp32", "int32", {}),
    "spmm_bf16_int16": ("spmm", 18, 33, 27, "random", 0.2, "bf16", "int16", {}),
    "dispatch_forced_triton": ("dispatch", 24, 40, 70, "rows", 0.1, "bf16", "int32", {}),
}


def _mask(out_f, in_f, pattern, density, gen):
    if pattern == "empty":
        return torch.zeros(out_f, in_f, dtype=torch.bool)
    if pattern == "single":
        m = torch.zeros(out_f, in_f, dtype=torch.bool)
        m[out_f // 2, in_f - 1] = True
        return m
    m = torch.rand(out_f, in_f, generator=gen) < density
    if pattern == "rows":  # RoSA-like: empty rows, one dense row, a few heavy rows in a column subset
        m[: out_f // 4] = False
        m[out_f // 2 + 1 :: 5] = False
        m[out_f // 2] = True
        m[out_f // 3, ::2] = True
        m[-1, in_f // 3 :] = True
    return m


def _adapter(out_f, in_f, pattern, density, dtype, index_dtype, seed):
    from rosa_peft.sparse import SparseAdapter

    gen = torch.Generator().manual_seed(seed)
    mask = _mask(out_f, in_f, pattern, density, gen)
    sp = SparseAdapter(out_f, in_f, dtype=dtype, index_dtype=index_dtype)
    sp.set_mask(mask, torch.randn(int(mask.sum()), generator=gen).to(dtype))
    assert sp.col_indices.dtype == getattr(torch, index_dtype)
    return sp, mask


def run_case(name: str, device: str) -> None:
    """Raise AssertionError if the Triton kernel disagrees with its reference."""
    from rosa_peft import sparse
    from rosa_peft.sparse import ops, triton_ops

    op, T, out_f, in_f, pattern, density, dt, idx, extra = CASES[name]
    dtype = DTYPES[dt]
    torch.manual_seed(sum(map(ord, name)))
    sp, mask = _adapter(out_f, in_f, pattern, density, dtype, idx, seed=len(name))
    sp = sp.to(device)
    mask = mask.to(device)

    if op in ("sddmm", "dispatch"):
        g = torch.randn(T, out_f, device=device).to(dtype)
        x = torch.randn(T, in_f, device=device).to(dtype)
        if extra.get("noncontig"):
            g = torch.randn(out_f, T, device=device).to(dtype).t()  # (T, out) views, not contiguous
            x = torch.randn(T, 2 * in_f, device=device).to(dtype)[:, ::2]
        if op == "dispatch":
            os.environ["ROSA_PEFT_SPARSE_BACKEND"] = "triton"
            try:
                assert "sddmm: triton" in sparse.explain(device, dtype, sp), sparse.explain(device, dtype, sp)
                got = sparse.sddmm(g, x, sp)
                dense = torch.randn(out_f, in_f, device=device).to(dtype)
                vals = torch.randn(sp.nnz, device=device).to(dtype)
                assert torch.equal(sparse.add_into(dense.clone(), sp, vals), ops.add_into(dense.clone(), sp, vals))
                assert torch.equal(sparse.write_into(dense.clone(), sp, vals), ops.write_into(dense.clone(), sp, vals))
                assert sparse.choose("spmm", device, dtype, sp).name == "triton"
            finally:
                del os.environ["ROSA_PEFT_SPARSE_BACKEND"]
        elif "blocks" in extra:
            got = triton_ops.sddmm(g, x, sp, *extra["blocks"])
        else:
            got = triton_ops.sddmm(g, x, sp)
        ref = (g.double().t() @ x.double())[mask]
        assert got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32), got.dtype
        assert got.shape == (sp.nnz,)
        # inputs are exact in float64, so the only error is fp32 accumulation over T terms
        tol = 1e-10 if dtype == torch.float64 else 2e-5 * max(1.0, T) ** 0.5
        err = (got.double() - ref).abs().max().item() if sp.nnz else 0.0
        assert err <= tol * (1 + ref.abs().max().item() if sp.nnz else 1), f"max err {err}"
        return

    if op == "spmm":
        x = torch.randn(T, in_f, device=device).to(dtype)
        vals = torch.randn(sp.nnz, device=device).to(dtype)
        got = triton_ops.spmm(x, sp, vals)
        s = torch.zeros(out_f, in_f, dtype=torch.float64, device=device)
        s[mask] = vals.double()
        ref = x.double() @ s.t()
        assert got.dtype == dtype and got.shape == (T, out_f)
        # fp32 accumulation, then one rounding to the input dtype
        eps = torch.finfo(dtype).eps
        assert torch.allclose(got.double(), ref, atol=1e-4, rtol=eps), (got.double() - ref).abs().max().item()
        return

    vdtype = DTYPES[extra.get("values", dt)]
    dense = torch.randn(out_f, in_f, device=device).to(dtype)
    if extra.get("noncontig"):
        dense = torch.randn(out_f, in_f + 7, device=device).to(dtype)[:, 3 : 3 + in_f]
    vals = torch.randn(sp.nnz, device=device).to(vdtype)
    before = dense.clone()
    if op == "add":
        got = triton_ops.scatter(dense.clone(), sp, vals, accumulate=True)
        ref = ops.add_into(before.contiguous(), sp, vals)
    elif op == "write":
        got = triton_ops.scatter(dense.clone(), sp, vals)
        ref = ops.write_into(before.contiguous(), sp, vals)
    else:  # merged resync: dense[mask] = W0 + values, rounded like the layer does it
        base = torch.randn(sp.nnz, device=device).to(dtype)
        got = triton_ops.scatter(dense.clone(), sp, vals, base=base)
        ref = ops.write_into(before.contiguous(), sp, base + vals.to(base.dtype))
    assert got.dtype == dtype
    assert torch.equal(got, ref), f"{(got.double() - ref.double()).abs().max().item()} max diff vs torch op"
    assert torch.equal(got[~mask], before[~mask])


def _worker(names: list[str]) -> dict:
    results = {}
    for name in names:
        try:
            run_case(name, "cpu")
            results[name] = "ok"
        except Exception as exc:  # report every case, never stop at the first
            results[name] = f"{type(exc).__name__}: {exc}"
    return results


@pytest.fixture(scope="module")
def interpreted_results() -> dict:
    env = dict(os.environ, TRITON_INTERPRET="1")
    env.pop("ROSA_PEFT_SPARSE_BACKEND", None)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "src"), env.get("PYTHONPATH", "")])
    proc = subprocess.run(
        [sys.executable, __file__, "--worker"], cwd=REPO, env=env, capture_output=True, text=True, timeout=600
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULTS ")]
    if proc.returncode != 0 or not lines:
        pytest.fail(f"interpreter worker failed (rc={proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULTS ") :])


@pytest.mark.parametrize("name", list(CASES))
def test_kernel_under_interpreter(name, interpreted_results):
    assert interpreted_results.get(name) == "ok", interpreted_results.get(name)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", list(CASES))
def test_kernel_on_cuda(name):
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        pytest.skip("TRITON_INTERPRET is set in this process")
    run_case(name, "cuda")


def test_triton_not_imported_or_chosen_on_cpu():
    code = (
        "import sys, torch\n"
        "from rosa_peft import sparse\n"
        "sp = sparse.SparseAdapter(64, 64, torch.float32); sp.set_mask(torch.eye(64, dtype=torch.bool))\n"
        "print(sparse.explain('cpu', torch.bfloat16, sp))\n"
        "assert 'triton' not in sys.modules, 'triton imported on a CPU-only path'\n"
        "assert sparse.choose('add_into', 'cpu', torch.float32, sp).name == 'torch'\n"
    )
    env = dict(os.environ)
    env.pop("ROSA_PEFT_SPARSE_BACKEND", None)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "src"), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "sddmm: dense_lowp" in proc.stdout and "triton" not in proc.stdout


if __name__ == "__main__" and sys.argv[1:] == ["--worker"]:
    print("RESULTS " + json.dumps(_worker(list(CASES))), flush=True)
