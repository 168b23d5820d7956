"""Sparse storage and the torch sparse ops, against dense float64 references."""
import pytest
import torch

from rosa_peft import sparse
from rosa_peft.sparse import SparseAdapter, coords_to_csr, mask_to_csr, ops


def _adapter(out_f, in_f, density, seed=0, dtype=torch.float64, index_dtype="int32"):
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(out_f, in_f, generator=g) < density
    sp = SparseAdapter(out_f, in_f, dtype=dtype, index_dtype=index_dtype)
    sp.set_mask(mask, torch.randn(int(mask.sum()), generator=g, dtype=dtype))
    return sp, mask


def test_csr_from_mask_and_coords_agree():
    sp, mask = _adapter(9, 7, 0.3)
    rows, cols = mask.nonzero(as_tuple=True)
    perm = torch.randperm(rows.numel())
    ro, ci = coords_to_csr(rows[perm], cols[perm], (9, 7))
    assert torch.equal(ro, sp.row_offsets) and torch.equal(ci, sp.col_indices)
    assert sp.row_offsets.dtype == torch.int32 and sp.col_indices.dtype == torch.int32
    assert torch.equal(sp.to_mask(), mask)
    dense = sp.to_dense()
    assert torch.equal(dense[mask], sp.values.detach())
    assert (dense[~mask] == 0).all()


def test_duplicate_and_out_of_range_coords_rejected():
    with pytest.raises(ValueError, match="duplicate"):
        coords_to_csr(torch.tensor([0, 0]), torch.tensor([1, 1]), (2, 2))
    with pytest.raises(ValueError, match="column index out of range"):
        coords_to_csr(torch.tensor([0]), torch.tensor([5]), (2, 2))


def test_int16_only_where_it_fits():
    sp, _ = _adapter(5, 40, 0.3, index_dtype="int16")
    assert sp.col_indices.dtype == torch.int16
    with pytest.raises(ValueError, match="int16"):
        SparseAdapter(4, 40000, dtype=torch.float32, index_dtype="int16")


def test_indices_correct_for_40000_by_64_layer():
    out_f, in_f = 40000, 64
    mask = torch.zeros(out_f, in_f, dtype=torch.bool)
    rows = torch.tensor([0, 1, 32767, 32768, 32769, 39999, 39999])
    cols = torch.tensor([0, 63, 5, 6, 7, 0, 63])
    mask[rows, cols] = True
    sp = SparseAdapter(out_f, in_f, dtype=torch.float64)
    sp.set_mask(mask, torch.arange(1, 8, dtype=torch.float64))
    assert sp.row_offsets.dtype == torch.int32
    assert torch.equal(sp.row_indices(), rows)
    assert torch.equal(sp.to_mask(), mask)
    dense = sp.to_dense()
    assert dense[39999, 63] == 7 and dense[32768, 6] == 4
    # and through the ops: gradient and scatter at rows beyond int16
    g = torch.randn(3, out_f, dtype=torch.float64)
    x = torch.randn(3, in_f, dtype=torch.float64)
    ref = (g.t() @ x)[rows, cols]
    for name in ("dense_gather", "sampled_addmm"):
        fn = {"dense_gather": ops.sddmm_dense_gather, "sampled_addmm": ops.sddmm_sampled_addmm}[name]
        assert torch.allclose(fn(g, x, sp), ref, atol=1e-12), name
    w = torch.zeros(out_f, in_f, dtype=torch.float64)
    sparse.add_into(w, sp, sp.values.detach())
    assert torch.equal(w, dense)


@pytest.mark.parametrize("density", [0.0, 0.02, 0.3, 1.0])
@pytest.mark.parametrize("fn", [ops.sddmm_dense_gather, ops.sddmm_sampled_addmm])
def test_sddmm_matches_dense_reference(density, fn):
    sp, mask = _adapter(37, 23, density, seed=1)
    g = torch.randn(19, 37, dtype=torch.float64)
    x = torch.randn(19, 23, dtype=torch.float64)
    ref = (g.t() @ x)[mask]
    got = fn(g, x, sp)
    assert got.dtype == torch.float64
    assert torch.allclose(got, ref, atol=1e-12)


def test_sddmm_chunking_and_empty_rows():
    sp, mask = _adapter(50, 30, 0.05, seed=2)
    mask_rows_empty = (~mask.any(1)).sum()
    assert mask_rows_empty > 0
    g = torch.randn(7, 50, dtype=torch.float64)
    x = torch.randn(7, 30, dtype=torch.float64)
    ref = (g.t() @ x)[mask]
    got = ops.sddmm_dense_gather(g, x, sp, chunk_elements=16)  # forces many tiny chunks
    assert torch.allclose(got, ref, atol=1e-12)


@pytest.mark.parametrize("backend", ["dense_gather", "sampled_addmm"])
def test_sddmm_bf16_inputs_accumulate_in_fp32(backend, monkeypatch):
    monkeypatch.setenv("ROSA_PEFT_SPARSE_BACKEND", backend)
    sp, mask = _adapter(33, 21, 0.1, seed=3, dtype=torch.bfloat16)
    g = torch.randn(64, 33).bfloat16()
    x = torch.randn(64, 21).bfloat16()
    ref = (g.double().t() @ x.double())[mask]
    got = sparse.sddmm(g, x, sp)
    assert got.dtype == torch.float32
    assert torch.allclose(got.double(), ref, atol=1e-3, rtol=1e-3)


def test_dispatch_choice_is_explained():
    sp, _ = _adapter(40, 40, 0.01)
    assert sparse.choose("sddmm", "cpu", torch.float32, sp).name == "sampled_addmm"
    dense_sp, _ = _adapter(40, 40, 0.5)
    assert sparse.choose("sddmm", "cpu", torch.float32, dense_sp).name == "dense_gather"
    text = sparse.explain("cpu", torch.float32, sp)
    assert "sddmm: sampled_addmm" in text and "candidates" in text
    assert "sddmm: dense_lowp" in sparse.explain("cpu", torch.bfloat16, sp)


def _sized(out_f, in_f):
    """An adapter of that shape (a diagonal mask: only the shape matters for the choice)."""
    sp = SparseAdapter(out_f, in_f, dtype=torch.bfloat16)
    sp.set_mask(torch.eye(out_f, in_f, dtype=torch.bool))
    return sp


@pytest.mark.parametrize("shape, dtype, device, expected", [
    ((576, 1536), torch.bfloat16, "cpu", "dense_lowp"),  # SmolLM2's MLP: the GEMM costs less than the copies
    ((192, 576), torch.float16, "cpu", "dense_lowp"),
    ((4096, 4096), torch.bfloat16, "cpu", "sampled_addmm"),  # a 7B layer: the dense GEMM would cost more
    ((576, 1536), torch.float32, "cpu", "sampled_addmm"),  # float32 keeps the exact CSR SDDMM
])
def test_sddmm_dispatch_by_dtype_and_shape(shape, dtype, device, expected):
    assert sparse.choose("sddmm", device, dtype, _sized(*shape)).name == expected


def test_sddmm_dense_lowp_is_the_bf16_gemm_at_the_mask():
    sp, mask = _adapter(50, 30, 0.05, seed=4, dtype=torch.bfloat16)
    assert (~mask.any(1)).sum() > 0  # empty rows, and chunks with no non-zero
    g = torch.randn(40, 50).bfloat16()
    x = torch.randn(40, 30).bfloat16()
    gemm = (g.t() @ x)[mask].float()  # what the reference's bf16 weight gradient holds at the mask
    for chunk in (1 << 24, 30, 90):  # one block; one row per block; three rows per block
        got = ops.sddmm_dense_lowp(g, x, sp, chunk_elements=chunk)
        assert got.dtype == torch.float32 and torch.equal(got, gemm), chunk
    exact = (g.double().t() @ x.double())[mask]
    assert torch.allclose(got.double(), exact, rtol=2 ** -7, atol=1e-2)
    empty = SparseAdapter(50, 30, dtype=torch.bfloat16)
    assert ops.sddmm_dense_lowp(g, x, empty).numel() == 0


def test_scatter_write_gather_spmm():
    sp, mask = _adapter(12, 8, 0.4, seed=4)
    w = torch.randn(12, 8, dtype=torch.float64)
    w0 = w.clone()
    sparse.add_into(w, sp, sp.values.detach())
    assert torch.equal(w, w0 + sp.to_dense())
    sparse.write_into(w, sp, sparse.gather_from(w0, sp))
    assert torch.equal(w, w0)
    x = torch.randn(5, 8, dtype=torch.float64)
    assert torch.allclose(sparse.spmm(x, sp, sp.values.detach()), x @ sp.to_dense().t(), atol=1e-12)
    bf = sparse.spmm(x.bfloat16(), sp, sp.values.detach())
    assert bf.dtype == torch.bfloat16


def test_mask_to_csr_rejects_non_2d():
    with pytest.raises(ValueError, match="2-D"):
        mask_to_csr(torch.ones(2, 2, 2, dtype=torch.bool))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_spmm_and_transposed_spmm_match_dense(dtype):
    from rosa_peft.sparse import ops, spmm, spmm_t

    g = torch.Generator().manual_seed(5)
    out_f, in_f, t = 37, 23, 9
    mask = torch.rand(out_f, in_f, generator=g) < 0.2
    mask[:, 4] = False  # an empty column of S = an empty row of Sᵀ
    mask[7] = False
    sp = SparseAdapter(out_f, in_f, dtype=torch.float64)
    sp.set_mask(mask, torch.randn(int(mask.sum()), dtype=torch.float64, generator=g))
    dense = sp.to_dense()
    x = torch.randn(t, in_f, dtype=torch.float64, generator=g)
    go = torch.randn(t, out_f, dtype=torch.float64, generator=g)
    vals = sp.values.detach().to(dtype)
    dense = torch.zeros(out_f * in_f, dtype=torch.float64).index_put((sp.flat_indices(),), vals.double()).view(out_f, in_f)
    tol = 1e-12 if dtype == torch.float64 else 2e-2
    y = spmm(x.to(dtype), sp, vals, out_dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    assert y.shape == (t, out_f) and torch.allclose(y.double(), x.to(dtype).double() @ dense.t(), atol=tol)
    dx = spmm_t(go.to(dtype), sp, vals)
    assert dx.dtype == dtype and dx.shape == (t, in_f)
    assert torch.allclose(dx.double(), go.to(dtype).double() @ dense, rtol=1e-2, atol=tol)
    crow, col, perm = ops.csr_transposed(sp)
    assert crow.shape == (in_f + 1,) and int(crow[5] - crow[4]) == 0
    assert ops.csr_transposed(sp)[2] is perm  # cached per mask
    empty = SparseAdapter(out_f, in_f, dtype=torch.float32)
    assert torch.equal(spmm_t(go.float(), empty, empty.values), torch.zeros(t, in_f))
