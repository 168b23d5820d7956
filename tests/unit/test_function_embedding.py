"""The RoSA embedding Function against autograd through a dense float64 reference."""
import pytest
import torch
import torch.nn.functional as F

from rosa_peft.function_embedding import rosa_embedding
from rosa_peft.sparse import SparseAdapter, add_into

V, D, R = 17, 9, 3
SCALING = 1.7


class _Merged:
    """The base already holds E0 + S."""

    def dense(self, weight, sp, values, dtype):
        return weight if weight.dtype == dtype else weight.to(dtype)


class _SpAdd:
    """A temporary E0 + S per call."""

    def dense(self, weight, sp, values, dtype):
        w = weight.clone()
        if sp is not None and values is not None and values.numel():
            add_into(w, sp, values)
        return w if w.dtype == dtype else w.to(dtype)


def _setup(r, density, seed=0):
    g = torch.Generator().manual_seed(seed)
    e0 = torch.randn(V, D, dtype=torch.float64, generator=g)
    a = torch.randn(r, V, dtype=torch.float64, generator=g) if r else None
    b = torch.randn(D, r, dtype=torch.float64, generator=g) if r else None
    sp = vals = None
    if density > 0:
        sp = SparseAdapter(V, D, dtype=torch.float64)
        mask = torch.rand(V, D, generator=g) < density
        mask[1, :] = True  # the padding row used below holds mask entries
        mask[3, 0] = True
        mask[V - 1, :] = False  # a row with no mask entries
        sp.set_mask(mask, torch.randn(int(mask.sum()), dtype=torch.float64, generator=g))
        vals = sp.values.detach().clone()
    return e0, a, b, sp, vals


def _ids(ndim, seed=1):
    g = torch.Generator().manual_seed(seed)
    shape = (7,) if ndim == 1 else (3, 5) if ndim == 2 else (2, 3, 4)
    ids = torch.randint(0, V, shape, generator=g)
    flat = ids.view(-1)
    flat[0] = 1  # padding row (when set) and repeated ids
    flat[-1] = 1
    flat[1] = 3
    flat[2] = 3
    flat[3] = V - 1
    return ids


def _reference(ids, e0, a, b, sp, vals, padding_idx, sgf):
    e = e0
    if sp is not None:
        dense_s = torch.zeros(V * D, dtype=vals.dtype).index_put((sp.flat_indices(),), vals).view(V, D)
        e = e0 + dense_s
    out = F.embedding(ids, e, padding_idx, scale_grad_by_freq=sgf)
    if a is not None:
        out = out + SCALING * F.embedding(ids, a.t(), padding_idx, scale_grad_by_freq=sgf) @ b.t()
    return out


def _base_for(impl, e0, sp, vals):
    weight = e0.clone()
    if impl == "merged" and sp is not None:
        add_into(weight, sp, vals.detach())
    return weight, (_Merged() if impl == "merged" else _SpAdd())


def _leaves(a, b, vals):
    leaves = {}
    if a is not None:
        leaves["A"] = a.clone().requires_grad_(True)
        leaves["B"] = b.clone().requires_grad_(True)
    if vals is not None:
        leaves["values"] = vals.clone().requires_grad_(True)
    return leaves


@pytest.mark.parametrize("r,density", [(R, 0.3), (0, 0.3), (R, 0.0)])
@pytest.mark.parametrize("ndim", [1, 2, 3])
@pytest.mark.parametrize("padding_idx", [None, 1, -V + 1])
@pytest.mark.parametrize("sgf", [False, True])
@pytest.mark.parametrize("impl", ["merged", "sp_add"])
def test_matches_dense_reference_fp64(r, density, ndim, padding_idx, sgf, impl):
    e0, a, b, sp, vals = _setup(r, density)
    ids = _ids(ndim)
    leaves = _leaves(a, b, vals)
    la, lb, lv = leaves.get("A"), leaves.get("B"), leaves.get("values")
    weight, source = _base_for(impl, e0, sp, vals)
    weight.requires_grad_(True)  # must never receive a gradient

    out = rosa_embedding(ids, weight, la, lb, lv, source, sp, SCALING, padding_idx=padding_idx, scale_grad_by_freq=sgf)
    ref = _reference(ids, e0, la, lb, sp, lv, padding_idx, sgf)
    assert out.shape == (*ids.shape, D) and out.dtype == torch.float64
    assert torch.allclose(out, ref, atol=1e-12, rtol=0)
    if padding_idx is not None:  # forward is not zeroed at the padding row (as F.embedding)
        assert out.reshape(-1, D)[0].abs().sum() > 0

    if not leaves:
        return
    gout = torch.randn_like(out)
    names = list(leaves)
    grads = torch.autograd.grad(out, [leaves[n] for n in names], gout)
    ref_grads = torch.autograd.grad(ref, [leaves[n] for n in names], gout)
    for name, g1, g2 in zip(names, grads, ref_grads):
        assert g1.dtype == g2.dtype and g1.shape == g2.shape, name
        assert torch.allclose(g1, g2, atol=1e-10, rtol=0), name
    got = dict(zip(names, grads))
    if padding_idx is not None:
        if "A" in got:
            assert torch.all(got["A"][:, 1] == 0)
        if "values" in got:
            assert torch.all(got["values"][sp.row_indices() == 1] == 0)
    if "values" in got:  # rows absent from ids get exactly zero
        absent = ~torch.isin(sp.row_indices(), ids.reshape(-1))
        assert absent.any() and torch.all(got["values"][absent] == 0)

    # weight never gets a gradient through a backward() call either
    out2 = rosa_embedding(ids, weight, la, lb, lv, source, sp, SCALING, padding_idx=padding_idx)
    out2.sum().backward()
    assert weight.grad is None


@pytest.mark.parametrize("impl", ["merged", "sp_add"])
def test_fp32_close_to_fp64(impl):
    e0, a, b, sp64, vals = _setup(R, 0.3)
    ids = _ids(2)
    sp = SparseAdapter(V, D, dtype=torch.float32)
    sp.set_mask(sp64.to_mask(), vals.float())
    leaves = _leaves(a, b, vals)
    ref = _reference(ids, e0, leaves["A"], leaves["B"], sp64, leaves["values"], 1, False)
    a32, b32, v32 = (leaves[n].detach().float().requires_grad_() for n in ("A", "B", "values"))
    weight, source = _base_for(impl, e0.float(), sp, v32)
    out = rosa_embedding(ids, weight, a32, b32, v32, source, sp, SCALING, padding_idx=1)
    assert out.dtype == torch.float32
    assert torch.allclose(out.double(), ref, atol=1e-5, rtol=1e-5)
    gout = torch.randn_like(ref)
    grads = torch.autograd.grad(out, [a32, b32, v32], gout.float())
    ref_grads = torch.autograd.grad(ref, [leaves[n] for n in ("A", "B", "values")], gout)
    for g1, g2 in zip(grads, ref_grads):
        assert g1.dtype == torch.float32
        assert torch.allclose(g1.double(), g2, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("impl", ["merged", "sp_add"])
def test_bf16_weight_no_autocast(impl):
    e0, a, b, sp64, vals = _setup(R, 0.3)
    ids = _ids(3)
    sp = SparseAdapter(V, D, dtype=torch.bfloat16)
    sp.set_mask(sp64.to_mask(), vals.bfloat16())
    a16 = a.bfloat16().requires_grad_()
    b16 = b.bfloat16().requires_grad_()
    v16 = sp.values.detach().clone().requires_grad_()
    weight, source = _base_for(impl, e0.bfloat16(), sp, v16)
    out = rosa_embedding(ids, weight, a16, b16, v16, source, sp, SCALING, padding_idx=1)
    assert out.dtype == torch.bfloat16
    # reference from the bf16-rounded parameters, in float64
    leaves = {"A": a16.detach().double().requires_grad_(), "B": b16.detach().double().requires_grad_(),
              "values": v16.detach().double().requires_grad_()}
    ref = _reference(ids, e0.bfloat16().double(), leaves["A"], leaves["B"], sp64, leaves["values"], 1, False)
    assert torch.allclose(out.double(), ref, atol=0.1, rtol=0.02)
    gout = torch.randn(ref.shape, dtype=torch.float64).bfloat16()
    grads = torch.autograd.grad(out, [a16, b16, v16], gout)
    ref_grads = torch.autograd.grad(ref, list(leaves.values()), gout.double())
    for g1, g2 in zip(grads, ref_grads):
        assert g1.dtype == torch.bfloat16
        assert torch.allclose(g1.double(), g2, atol=0.1, rtol=0.02)


def test_autocast_computes_in_autocast_dtype():
    e0, a, b, sp64, vals = _setup(R, 0.3)
    sp = SparseAdapter(V, D, dtype=torch.float32)
    sp.set_mask(sp64.to_mask(), vals.float())
    v = sp.values.detach().clone().requires_grad_()
    a32, b32 = a.float().requires_grad_(), b.float().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = rosa_embedding(_ids(2), e0.float(), a32, b32, v, _SpAdd(), sp, SCALING)
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert a32.grad.dtype == b32.grad.dtype == v.grad.dtype == torch.float32


def test_gradcheck():
    # without padding_idx / scale_grad_by_freq: those deliberately alter the gradient (as F.embedding)
    e0, a, b, sp, vals = _setup(R, 0.3)
    ids = _ids(2)
    src = _SpAdd()
    fn = lambda a, b, v: rosa_embedding(ids, e0, a, b, v, src, sp, 0.5)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (a.requires_grad_(), b.requires_grad_(), vals.requires_grad_()))


def test_empty_ids():
    e0, a, b, sp, vals = _setup(R, 0.3)
    la, lb, lv = (t.clone().requires_grad_() for t in (a, b, vals))
    out = rosa_embedding(torch.zeros(2, 0, dtype=torch.int64), e0, la, lb, lv, _SpAdd(), sp, SCALING)
    assert out.shape == (2, 0, D)
    ga, gb, gv = torch.autograd.grad(out.sum(), [la, lb, lv], allow_unused=True)
    assert torch.all(ga == 0) and torch.all(gb == 0) and torch.all(gv == 0)


def test_unsupported_arguments_raise():
    e0, a, b, sp, vals = _setup(R, 0.3)
    ids = _ids(2)
    with pytest.raises(ValueError, match="max_norm"):
        rosa_embedding(ids, e0, a, b, vals, _SpAdd(), sp, SCALING, max_norm=1.0)
    with pytest.raises(ValueError, match="sparse"):
        rosa_embedding(ids, e0, a, b, vals, _SpAdd(), sp, SCALING, sparse=True)
    with pytest.raises(ValueError, match="padding_idx"):
        rosa_embedding(ids, e0, a, b, vals, _SpAdd(), sp, SCALING, padding_idx=V)
    with pytest.raises(ValueError, match="ids"):
        rosa_embedding(ids.float(), e0, a, b, vals, _SpAdd(), sp, SCALING)
