"""The fused RoSA Function against autograd through a dense float64 reference."""
import pytest
import torch

from rosa_peft.function import dropout_keep_mask, rosa_linear
import dataclasses

from rosa_peft.layer import FLOAT_LINEAR, MergedSource, QuantSpmmSource, SpAddSource
from rosa_peft.sparse import SparseAdapter, add_into

OUT, IN, R = 13, 11, 3


def _setup(r, density, bias, seed=0):
    g = torch.Generator().manual_seed(seed)
    w0 = torch.randn(OUT, IN, dtype=torch.float64, generator=g)
    b = torch.randn(OUT, dtype=torch.float64, generator=g) if bias else None
    a = torch.randn(r, IN, dtype=torch.float64, generator=g) if r else None
    bb = torch.randn(OUT, r, dtype=torch.float64, generator=g) if r else None
    sp = None
    vals = None
    if density > 0:
        sp = SparseAdapter(OUT, IN, dtype=torch.float64)
        mask = torch.rand(OUT, IN, generator=g) < density
        mask[0, 0] = True
        sp.set_mask(mask, torch.randn(int(mask.sum()), dtype=torch.float64, generator=g))
        vals = sp.values.detach()
    return w0, b, a, bb, sp, vals


def _reference(x, w0, b, a, bb, sp, vals, scaling, keep, p):
    w = w0.clone()
    if sp is not None:
        dense_s = torch.zeros(OUT * IN, dtype=vals.dtype).index_put((sp.flat_indices(),), vals).view(OUT, IN)
        w = w + dense_s
    out = x @ w.t()
    if b is not None:
        out = out + b
    if a is not None:
        xl = x if keep is None else x * keep / (1 - p)
        out = out + scaling * (xl @ a.t()) @ bb.t()
    return out


def _matmul(w, x, dtype):
    return x @ w.to(dtype).t()


def _matmul_t(w, g, dtype, acc=None):
    return g @ w.to(dtype) if acc is None else acc.addmm_(g, w.to(dtype))


# a base kind with its own matmuls and no in-place merge: what the spmm source (4-bit bases) runs on
MATMUL_KIND = dataclasses.replace(FLOAT_LINEAR, name="matmul-test", supports_merged=False,
                                  matmul=_matmul, matmul_t=_matmul_t)


@pytest.mark.parametrize("r,density", [(R, 0.3), (0, 0.3), (R, 0.0)])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("ndim", [2, 3])
@pytest.mark.parametrize("dropout", [0.0, 0.4])
@pytest.mark.parametrize("impl", ["merged", "sp_add", "spmm"])
def test_gradients_match_dense_reference(r, density, bias, ndim, dropout, impl):
    if r == 0 and dropout:
        pytest.skip("dropout only touches the LoRA branch")
    w0, b, a, bb, sp, vals = _setup(r, density, bias)
    shape = (5, IN) if ndim == 2 else (2, 3, IN)
    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    scaling = 1.7
    leaves = {"x": x}
    if b is not None:
        b.requires_grad_(True); leaves["b"] = b
    if a is not None:
        a.requires_grad_(True); bb.requires_grad_(True); leaves["a"] = a; leaves["bb"] = bb
    if vals is not None:
        vals = vals.clone().requires_grad_(True); leaves["vals"] = vals

    weight = w0.clone()
    if impl == "merged" and sp is not None:
        add_into(weight, sp, vals.detach())  # the base holds W0 + S in place
    source = {"merged": MergedSource(FLOAT_LINEAR), "sp_add": SpAddSource(FLOAT_LINEAR),
              "spmm": QuantSpmmSource(MATMUL_KIND)}[impl]

    torch.manual_seed(123)
    out = rosa_linear(x, weight, b, a, bb, vals, source, sp, scaling, dropout)
    keep, keep_p = None, dropout
    if dropout and a is not None:
        torch.manual_seed(123)
        keep, scale = dropout_keep_mask(x.detach().reshape(-1, IN), dropout)
        keep, keep_p = keep.reshape(x.shape), 1 - 1 / scale
    ref = _reference(x, w0, b, a, bb, sp, vals, scaling, keep, keep_p)
    assert torch.allclose(out, ref, atol=1e-12, rtol=0)

    gout = torch.randn_like(out)
    grads = torch.autograd.grad(out, list(leaves.values()), gout)
    ref_grads = torch.autograd.grad(ref, list(leaves.values()), gout)
    for (name, _), g1, g2 in zip(leaves.items(), grads, ref_grads):
        assert torch.allclose(g1, g2, atol=1e-10, rtol=0), name


@pytest.mark.parametrize("impl", ["sp_add", "spmm"])
def test_gradcheck_all_inputs(impl):
    w0, b, a, bb, sp, vals = _setup(R, 0.3, True)
    x = torch.randn(4, IN, dtype=torch.float64, requires_grad=True)
    src = SpAddSource(FLOAT_LINEAR) if impl == "sp_add" else QuantSpmmSource(MATMUL_KIND)
    fn = lambda x, b, a, bb, v: rosa_linear(x, w0, b, a, bb, v, src, sp, 0.5, 0.0)  # noqa: E731
    args = (x, b.requires_grad_(), a.requires_grad_(), bb.requires_grad_(), vals.clone().requires_grad_())
    assert torch.autograd.gradcheck(fn, args)


def test_bf16_autocast_runs_in_bf16():
    w0, b, a, bb, sp, vals = _setup(R, 0.3, False)
    x = torch.randn(4, IN, dtype=torch.float32, requires_grad=True)
    w = w0.float()
    vals = vals.float().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = rosa_linear(x, w, None, a.float(), bb.float(), vals, SpAddSource(FLOAT_LINEAR), sp, 1.0, 0.0)
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert x.grad.dtype == torch.float32 and vals.grad.dtype == torch.float32


@pytest.mark.parametrize("p", [0.05, 0.1, 0.4, 0.9])
def test_cpu_dropout_mask_keeps_each_element_with_probability_one_minus_p(p):
    x = torch.empty(400, 1000)
    torch.manual_seed(0)
    keep, scale = dropout_keep_mask(x, p)
    assert keep.dtype == torch.uint8 and keep.shape == x.shape and int(keep.max()) == 1
    p_eff = 1 - 1 / scale
    assert abs(p_eff - p) <= 1e-3 * p  # p on the 1/65536 grid
    n = x.numel()
    sd = (p_eff * (1 - p_eff) / n) ** 0.5
    assert abs(1 - float(keep.float().mean()) - p_eff) < 5 * sd
    assert abs(float(keep.float().mean()) * scale - 1) < 5 * sd * scale  # unbiased: E[keep * scale] = 1
    # rows, columns and the two 16-bit halves of each random word carry no pattern
    assert abs(float(keep[:, 0::2].float().mean() - keep[:, 1::2].float().mean())) < 10 * sd
    assert abs(float(keep[:200].float().mean() - keep[200:].float().mean())) < 10 * sd


def test_cpu_dropout_mask_follows_torch_seed_and_differs_between_calls():
    x = torch.empty(64, 64)
    torch.manual_seed(5)
    first, second = dropout_keep_mask(x, 0.3)[0], dropout_keep_mask(x, 0.3)[0]
    torch.manual_seed(5)
    assert torch.equal(dropout_keep_mask(x, 0.3)[0], first)
    assert not torch.equal(first, second)
    with torch.random.fork_rng():
        dropout_keep_mask(x, 0.3)
    assert torch.equal(dropout_keep_mask(x, 0.3)[0], second)  # fork_rng left the stream where it was


@pytest.mark.parametrize("p", [1e-6, 0.999999])
def test_dropout_p_off_the_grid_uses_torch_bernoulli_exactly(p):
    x = torch.empty(8, 8)
    torch.manual_seed(1)
    keep, scale = dropout_keep_mask(x, p)
    torch.manual_seed(1)
    assert torch.equal(keep, torch.empty(8, 8, dtype=torch.uint8).bernoulli_(1 - p))
    assert scale == 1 / (1 - p)
