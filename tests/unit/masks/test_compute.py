"""Mask generation on a tiny Llama: scores against a plain dense autograd reference, selection, files."""
import copy
import os

import pytest
import torch

from conftest import make_tiny_llama
from rosa_peft import RosaConfig, get_rosa_model
from rosa_peft.masks import (GradientCollector, compute_masks, load_masks, magnitude_scores, save_masks,
                             select_masks)

DENSITY = 0.05


def _batches(n=3, batch=2, seq=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, 128, (batch, seq), generator=g)
        out.append({"input_ids": ids, "labels": ids})
    return out


def _rosa(r=2, **kw):
    return get_rosa_model(make_tiny_llama(), RosaConfig(r=r, density=DENSITY, target_modules="all-linear", **kw))


def _names(model):
    return [n for n, _ in model.rosa_layers()]


def _dense_reference(batches, names, criterion):
    """Per micro-batch dW from plain autograd on a copy of the base model with trainable weights."""
    fold, finish = {"fisher": (lambda g: g * g, lambda s: s), "grad": (lambda g: g, torch.abs),
                    "mean_abs": (torch.abs, lambda s: s)}[criterion]
    ref = make_tiny_llama()
    ref.train()
    for p in ref.parameters():
        p.requires_grad_(True)
    acc = {n: torch.zeros_like(ref.get_submodule(n).weight) for n in names}
    for b in batches:
        ref.zero_grad()
        ref(**b).loss.backward()
        for n in names:
            acc[n] += fold(ref.get_submodule(n).weight.grad)
    return {n: finish(a / len(batches)) for n, a in acc.items()}


def _assert_topk(mask, score, k, rtol=1e-4):
    """mask is the top-k of score, up to entries within rtol of the k-th value (float-order noise)."""
    assert int(mask.sum()) == k
    flat = score.reshape(-1)
    kth = torch.sort(flat, descending=True).values[k - 1]
    sure_in = flat > kth * (1 + rtol)
    sure_out = flat < kth * (1 - rtol)
    m = mask.reshape(-1)
    assert m[sure_in].all() and not m[sure_out].any()


@pytest.mark.parametrize("criterion", ["fisher", "grad"])
@pytest.mark.parametrize("r", [2, 0])
def test_gradient_masks_match_dense_reference(criterion, r):
    model = _rosa(r=r)
    if r == 0:
        assert not any(p.requires_grad and p.numel() for p in model.parameters())
    batches = _batches()
    masks = compute_masks(model, batches, criterion=criterion, progress=False)
    ref = _dense_reference(batches, _names(model), criterion)
    assert list(masks) == _names(model)
    for n, m in masks.items():
        assert m.dtype == torch.bool and m.device.type == "cpu"
        _assert_topk(m, ref[n], int(DENSITY * m.numel()))


def test_collector_scores_equal_reference_and_respect_num_batches():
    model = _rosa()
    batches = _batches(n=4)
    ref = _dense_reference(batches[:2], _names(model), "fisher")
    model.train()
    with GradientCollector(model, "fisher") as col:
        for b in batches[:2]:
            model(**b).loss.backward()
    assert col.num_batches == 2 and not col.attached
    scores = col.scores()
    for n in ref:
        assert scores[n].dtype == torch.float32 and scores[n].device.type == "cpu"
        torch.testing.assert_close(scores[n], ref[n], rtol=1e-4, atol=1e-12)
    # compute_masks with num_batches=2 uses the same two micro-batches
    m = compute_masks(model, batches, num_batches=2, progress=False)
    for n in m:
        _assert_topk(m[n], ref[n], int(DENSITY * m[n].numel()))


def test_collector_leaves_optimizer_step_unchanged():
    a = _rosa(init_lora_weights=False)
    g = torch.Generator().manual_seed(5)  # masks installed: LoRA and sparse values both train
    a.set_masks({n: torch.rand(l.out_features, l.in_features, generator=g) < 0.1 for n, l in a.rosa_layers()})
    b = copy.deepcopy(a)
    ids = _batches(n=1)[0]
    grads, weights = [], []
    for model, collect in ((a, True), (b, False)):
        model.train()
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
        col = GradientCollector(model, "fisher", device=None) if collect else None
        model(**ids).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
        opt.step()
        weights.append({n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad})
        if col is not None:
            assert col.num_batches == 1 and col.missing() == []
            col.detach()
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 0
    for n in grads[0]:
        assert torch.equal(grads[0][n], grads[1][n]), n
        assert torch.equal(weights[0][n], weights[1][n]), n


def test_grads_mode_and_flags_restored():
    model = _rosa()
    model.eval()
    model.model.model.layers[0].train()  # a mixed state must come back as it was
    params = [p for p in model.parameters() if p.requires_grad]
    for i, p in enumerate(params):
        p.grad = torch.full_like(p, float(i)) if i % 2 else None
    before = [p.grad for p in params]
    modes = {n: m.training for n, m in model.named_modules()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    compute_masks(model, _batches(n=2), progress=False)
    assert all(p.grad is g for p, g in zip(params, before))
    assert {n: m.training for n, m in model.named_modules()} == modes
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags


def test_magnitude_masks_are_top_abs_w0():
    model = _rosa(impl="merged")
    w0 = {n: l.base_layer.weight.detach().clone() for n, l in model.rosa_layers()}
    # install masks with non-zero values so the merged base holds W0 + S: magnitude must still see W0
    g = torch.Generator().manual_seed(3)
    model.set_masks({n: torch.rand(l.out_features, l.in_features, generator=g) < 0.2 for n, l in model.rosa_layers()})
    with torch.no_grad():
        for _, l in model.rosa_layers():
            l.rosa_spa["default"].values.fill_(5.0)
    model(input_ids=_batches(n=1)[0]["input_ids"])  # syncs W0 + S into the base weight
    assert not torch.equal(model.model.get_submodule(_names(model)[0]).base_layer.weight, w0[_names(model)[0]])
    masks = compute_masks(model, None, criterion="magnitude", progress=False)
    expected = select_masks({n: w.abs() for n, w in w0.items()}, DENSITY)
    for n in masks:
        assert torch.equal(masks[n], expected[n]), n
        assert torch.equal(magnitude_scores(model.model.get_submodule(n)), w0[n].abs())


def test_random_masks_seeded():
    model = _rosa()
    a = compute_masks(model, None, criterion="random", seed=1, progress=False)
    b = compute_masks(model, None, criterion="random", seed=1, progress=False)
    c = compute_masks(model, None, criterion="random", seed=2, progress=False)
    d = compute_masks(model, None, criterion="random", seed=1, budget="global", max_layers_per_pass=2, progress=False)
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert any(not torch.equal(a[n], c[n]) for n in a)
    for n, m in a.items():
        assert int(m.sum()) == int(DENSITY * m.numel())
    assert sum(int(m.sum()) for m in d.values()) == sum(int(m.sum()) for m in a.values())


# ---- the criteria registry --------------------------------------------------------------------------
def test_criteria_come_from_the_registry_one_module_each():
    import pkgutil

    from rosa_peft.masks import CRITERIA, GRAD_CRITERIA, criteria

    assert CRITERIA == ("fisher", "grad", "magnitude", "random")
    assert CRITERIA == tuple(sorted(m.name for m in pkgutil.iter_modules(criteria.__path__)))
    assert GRAD_CRITERIA == ("fisher", "grad")
    assert [criteria.get_criterion(n).needs for n in CRITERIA] == ["gradients", "gradients", "nothing", "nothing"]
    with pytest.raises(ValueError, match=r"criterion must be one of \('fisher', 'grad', 'magnitude', 'random'\), got 'x'"):
        criteria.get_criterion("x")
    with pytest.raises(ValueError, match="'fisher' is already registered"):
        criteria.register(criteria.Criterion("fisher", needs="gradients"))
    with pytest.raises(ValueError, match="needs must be one of"):
        criteria.Criterion("x", needs="activations")
    with pytest.raises(ValueError, match="must give score"):
        criteria.Criterion("x", needs="nothing")


def _row_index_scores(name, layer, adapter, seed):
    rows = torch.arange(layer.out_features, dtype=torch.float32)[:, None]
    return rows.expand(layer.out_features, layer.in_features).contiguous()


def test_a_registered_criterion_is_all_compute_masks_and_the_collector_need(monkeypatch):
    """What a new criterion module does (register a Criterion) is enough: no other file names it."""
    from rosa_peft.masks import criteria

    monkeypatch.setattr(criteria, "_REGISTRY", dict(criteria._REGISTRY))
    criteria.register(criteria.Criterion("last_rows", needs="nothing", score=_row_index_scores))
    criteria.register(criteria.Criterion("mean_abs", needs="gradients", fold=torch.abs))
    model = _rosa()
    for n, m in compute_masks(model, criterion="last_rows", progress=False).items():
        k = int(DENSITY * m.numel())
        expected = torch.zeros(m.numel(), dtype=torch.bool)
        expected[-k:] = True  # the last rows; the lowest columns of the partial row (ties: lowest index)
        expected = expected.view(m.shape)
        partial = k % m.shape[1]
        if partial:
            row = m.shape[0] - k // m.shape[1] - 1
            expected[row] = False
            expected[row, :partial] = True
        assert torch.equal(m, expected), n
    batches = _batches()
    ref = _dense_reference(batches, _names(model), "mean_abs")
    for n, m in compute_masks(model, batches, criterion="mean_abs", progress=False).items():
        _assert_topk(m, ref[n], int(DENSITY * m.numel()))
    model.train()
    with GradientCollector(model, "mean_abs") as col:
        for b in batches:
            model(**b).loss.backward()
    for n, s in col.scores().items():
        torch.testing.assert_close(s, ref[n], rtol=1e-4, atol=1e-12)
    with pytest.raises(ValueError, match=r"GradientCollector criterion must be one of \('fisher', 'grad', 'mean_abs'\)"):
        GradientCollector(model, "last_rows")


def test_global_budget_total_and_distribution():
    model = _rosa()
    batches = _batches()
    per_layer = compute_masks(model, batches, progress=False)
    glob = compute_masks(model, batches, budget="global", progress=False)
    total = sum(int(DENSITY * m.numel()) for m in per_layer.values())
    assert sum(int(m.sum()) for m in glob.values()) == total
    assert [int(m.sum()) for m in glob.values()] != [int(m.sum()) for m in per_layer.values()]
    # and it is the top-K of all scores together
    ref = _dense_reference(batches, _names(model), "fisher")
    flat = torch.cat([ref[n].reshape(-1) for n in _names(model)])
    kth = torch.sort(flat, descending=True).values[total - 1]
    for n, m in glob.items():
        assert m[ref[n] > kth * (1 + 1e-4)].all() and not m[ref[n] < kth * (1 - 1e-4)].any()


def test_select_masks_matches_stable_sort_reference_with_ties():
    g = torch.Generator().manual_seed(0)
    scores = {f"l{i}": torch.randint(0, 4, (6, 10), generator=g).float() for i in range(4)}
    dens = {"l0": 0.1, "l1": 0.3, "l2": 0.0, "l3": 0.5}
    flat = torch.cat([s.reshape(-1) for s in scores.values()])
    for budget in ("per_layer", "global"):
        masks = select_masks(scores, dens, budget=budget)
        if budget == "per_layer":
            for n, s in scores.items():
                k = int(dens[n] * s.numel())
                idx = torch.sort(s.reshape(-1), descending=True, stable=True).indices[:k]
                assert torch.equal(masks[n].reshape(-1).nonzero().squeeze(1), idx.sort().values)
        else:
            total = sum(int(dens[n] * 60) for n in scores)
            elig = torch.cat([torch.full((60,), dens[n] > 0) for n in scores])
            order = torch.sort(torch.where(elig, flat, -1.0), descending=True, stable=True).indices[:total]
            got = torch.cat([masks[n].reshape(-1) for n in scores]).nonzero().squeeze(1)
            assert torch.equal(got, order.sort().values)
            assert not masks["l2"].any()


def test_ties_pick_lowest_flat_indices():
    scores = {"a": torch.ones(4, 5), "b": torch.ones(3, 5)}
    per = select_masks(scores, 0.2)
    assert per["a"].reshape(-1).nonzero().squeeze(1).tolist() == [0, 1, 2, 3]
    assert per["b"].reshape(-1).nonzero().squeeze(1).tolist() == [0, 1, 2]
    glob = select_masks(scores, 0.2, budget="global")  # 7 entries: the earlier layer first
    assert int(glob["a"].sum()) == 7 and not glob["b"].any()
    assert glob["a"].reshape(-1).nonzero().squeeze(1).tolist() == list(range(7))


@pytest.mark.parametrize("budget", ["per_layer", "global"])
def test_max_layers_per_pass_gives_identical_masks(budget):
    model = _rosa(r=0)
    batches = _batches()
    one = compute_masks(model, batches, budget=budget, progress=False)
    grouped = compute_masks(model, lambda: iter(batches), budget=budget, max_layers_per_pass=3, progress=False)
    assert one.keys() == grouped.keys()
    assert all(torch.equal(one[n], grouped[n]) for n in one)
    with pytest.raises(ValueError, match="one-shot iterator"):
        compute_masks(model, iter(batches), max_layers_per_pass=3, progress=False)


def test_density_from_config_pattern_and_dict():
    cfg = RosaConfig(r=2, density=0.05, target_modules="all-linear", density_pattern={r"mlp\.down_proj": 0.2})
    model = get_rosa_model(make_tiny_llama(), cfg)
    masks = compute_masks(model, _batches(n=1), progress=False)
    for n, m in masks.items():
        assert int(m.sum()) == int((0.2 if "down_proj" in n else 0.05) * m.numel())
    explicit = {n: 0.1 for n in masks}
    masks = compute_masks(model, None, criterion="random", density=explicit, progress=False)
    assert all(int(m.sum()) == int(0.1 * m.numel()) for m in masks.values())


def test_save_load_round_trip(tmp_path):
    model = _rosa()
    masks = compute_masks(model, None, criterion="random", progress=False)
    path = tmp_path / "sub" / "masks.safetensors"
    save_masks(masks, path)
    loaded = load_masks(path)
    assert list(loaded) == list(masks)
    assert all(loaded[n].dtype == torch.bool and torch.equal(loaded[n], masks[n]) for n in masks)
    assert [f for f in os.listdir(path.parent)] == ["masks.safetensors"]  # no temporary left behind
    model.set_masks(loaded)
    assert all(torch.equal(model.get_masks()[n], masks[n]) for n in masks)


def test_file_errors_name_the_file(tmp_path):
    from safetensors.torch import save_file

    missing = tmp_path / "nope.safetensors"
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        load_masks(missing)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file at all")
    with pytest.raises(ValueError, match="junk.safetensors"):
        load_masks(junk)
    floats = tmp_path / "floats.safetensors"
    save_file({"x": torch.zeros(2, 2)}, str(floats))
    with pytest.raises(ValueError, match="floats.safetensors.*'x'.*float32"):
        load_masks(floats)
    twos = tmp_path / "twos.safetensors"
    save_file({"x": torch.full((2, 2), 2, dtype=torch.uint8)}, str(twos))
    with pytest.raises(ValueError, match="twos.safetensors.*0 and 1"):
        load_masks(twos)
    with pytest.raises(ValueError, match=r"masks\['w'\] must be a bool"):
        save_masks({"w": torch.zeros(2, 2)}, tmp_path / "out.safetensors")


def test_input_errors():
    model = _rosa()
    batches = _batches(n=1)
    with pytest.raises(ValueError, match="criterion"):
        compute_masks(model, batches, criterion="hessian", progress=False)
    with pytest.raises(ValueError, match="budget"):
        compute_masks(model, batches, budget="uniform", progress=False)
    with pytest.raises(ValueError, match="density"):
        compute_masks(model, batches, density=1.5, progress=False)
    with pytest.raises(ValueError, match="density has no entry for layer"):
        compute_masks(model, batches, density={"model.layers.0.self_attn.q_proj": 0.1}, progress=False)
    with pytest.raises(ValueError, match="no loss"):
        compute_masks(model, [{"input_ids": batches[0]["input_ids"]}], progress=False)
    with pytest.raises(ValueError, match="needs batches"):
        compute_masks(model, None, progress=False)
    with pytest.raises(ValueError, match="no micro-batch"):
        compute_masks(model, [], progress=False)
    with pytest.raises(ValueError, match="NaN"):
        select_masks({"a": torch.tensor([[float("nan"), 1.0]])}, 0.5)
    with pytest.raises(ValueError, match="not a RoSA layer"):
        GradientCollector(model, layers=["lm_head"])
    with pytest.raises(ValueError, match="criterion"):
        GradientCollector(model, criterion="magnitude")
    zero = get_rosa_model(make_tiny_llama(), RosaConfig(r=2, density=0.0, target_modules="all-linear"))
    with pytest.raises(ValueError, match="select no weight entry"):
        compute_masks(zero, batches, progress=False)


def test_loss_fn_and_float64():
    base = make_tiny_llama(dtype=torch.float64)
    model = get_rosa_model(base, RosaConfig(r=2, density=DENSITY, target_modules="all-linear"))
    batches = _batches(n=2)

    def loss_fn(m, b):
        return m(input_ids=b["input_ids"], labels=b["labels"]).loss * 3.0  # a uniform scale: same masks

    with GradientCollector(model, "fisher") as col:
        for b in batches:
            model(**b).loss.backward()
    assert all(s.dtype == torch.float64 for s in col.scores().values())
    masks = compute_masks(model, batches, loss_fn=loss_fn, progress=False)
    expected = select_masks(col.scores(), DENSITY)
    assert all(torch.equal(masks[n], expected[n]) for n in masks)


def test_magnitude_on_4bit_base_uses_dequantized_weight():
    from rosa_peft import quant, quantize_model

    if not quant.backend_available("torchao"):
        pytest.skip("torchao not installed")
    base = quantize_model(make_tiny_llama(), backend="torchao", compute_dtype=torch.float32, block_size=32)
    model = get_rosa_model(base, RosaConfig(r=2, density=DENSITY, target_modules="all-linear"))
    masks = compute_masks(model, None, criterion="magnitude", progress=False)
    expected = select_masks({n: quant.dense_weight(l).abs() for n, l in model.rosa_layers()}, DENSITY)
    assert all(torch.equal(masks[n], expected[n]) for n in masks)
    fisher = compute_masks(model, _batches(n=1), progress=False)  # frozen 4-bit W: hooks still score it
    assert all(int(m.sum()) == int(DENSITY * m.numel()) for m in fisher.values())


def test_gradient_checkpointing_gives_the_same_masks():
    batches = _batches(n=2)
    plain = compute_masks(_rosa(r=0), batches, progress=False)
    model = _rosa(r=0)
    model.gradient_checkpointing_enable()  # non-reentrant: the recomputed forward is not recorded twice
    ckpt = compute_masks(model, batches, progress=False)
    assert all(torch.equal(plain[n], ckpt[n]) for n in plain)


def test_layer_called_twice_sums_its_calls_per_micro_batch():
    from torch import nn

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin, self.head = nn.Linear(6, 6), nn.Linear(6, 3)

        def forward(self, x, labels):
            out = self.head(torch.tanh(self.lin(torch.tanh(self.lin(x)))))
            return {"loss": ((out - labels) ** 2).mean()}

    torch.manual_seed(0)
    net = Net()
    ref = copy.deepcopy(net)
    model = get_rosa_model(net, RosaConfig(r=0, density=0.25, target_modules=["lin", "head"]))
    batches = [{"x": torch.randn(4, 6), "labels": torch.randn(4, 3)} for _ in range(3)]
    with GradientCollector(model) as col:  # nothing trainable: the collector's taps carry dO
        for b in batches:
            model(**b)["loss"].backward()
    expected = {"lin": 0.0, "head": 0.0}
    for b in batches:
        ref.zero_grad()
        ref(**b)["loss"].backward()
        for n in expected:
            expected[n] = expected[n] + getattr(ref, n).weight.grad ** 2 / len(batches)
    assert col.num_batches == 3
    scores = col.scores()
    for n in expected:
        torch.testing.assert_close(scores[n], expected[n], rtol=1e-5, atol=1e-10)


def test_collector_without_engine_callback_closes_micro_batches_lazily(monkeypatch):
    from rosa_peft.masks import collector

    model = _rosa()
    batches = _batches(n=2)
    model.train()
    with GradientCollector(model) as eager:
        for b in batches:
            model(**b).loss.backward()
    monkeypatch.setattr(collector, "_at_end_of_backward", lambda fn: False)
    with GradientCollector(model) as lazy:
        for b in batches:
            model(**b).loss.backward()
    assert lazy.num_batches == 1  # the second one closes on the next forward or on scores()
    a, b = eager.scores(), lazy.scores()
    assert lazy.num_batches == 2 and all(torch.equal(a[n], b[n]) for n in a)


def test_collector_on_conv1d_and_embedding_equals_autograd_weight_grads():
    """GPT-2 Conv1D ((in, out) weights) and nn.Embedding targets: the collected dW is the base weight's
    own gradient in the adapter's (out, in) / (V, D) layout, and compute_masks works through them."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=64, n_positions=32, tie_word_embeddings=False)
    base = GPT2LMHeadModel(cfg).eval()
    ref = copy.deepcopy(base)
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(1))
    ids[0, 0] = ids[0, 3] = ids[1, 5]  # a repeated token: its rows must add up
    model = get_rosa_model(base, RosaConfig(r=2, density=0.05, target_modules=["wte", "c_attn"]))
    with GradientCollector(model, criterion="grad", device=None) as col:
        model(input_ids=ids, labels=ids).loss.backward()
    scores = col.scores()
    for p in ref.parameters():
        p.requires_grad_(True)
    ref(input_ids=ids, labels=ids).loss.backward()
    want = {"transformer.wte": ref.transformer.wte.weight.grad.abs(),
            "transformer.h.0.attn.c_attn": ref.transformer.h[0].attn.c_attn.weight.grad.t().abs()}
    assert set(scores) == set(want)
    for name, w in want.items():
        assert scores[name].shape == w.shape
        assert torch.allclose(scores[name], w, atol=1e-6, rtol=1e-4), name
    masks = compute_masks(model, [{"input_ids": ids, "labels": ids}], criterion="fisher")
    assert masks["transformer.wte"].shape == (64, 16) and masks["transformer.h.0.attn.c_attn"].shape == (48, 16)
    model.set_masks(masks)
    assert model.rosa_layers() and all(l.rosa_spa["default"].nnz > 0 for _, l in model.rosa_layers())


# ---- compact (CSR) masks files -------------------------------------------------------------------------
def _mixed_masks():
    g = torch.Generator().manual_seed(3)
    return {"z.wide": torch.rand(6, 40000, generator=g) < 0.001,  # > 32768 columns: int32 column indices
            "a.proj": torch.rand(48, 80, generator=g) < 0.2,
            "m.empty": torch.zeros(3, 5, dtype=torch.bool),
            "b.full": torch.ones(2, 3, dtype=torch.bool)}


def test_compact_round_trip_keeps_order_shapes_and_uses_indices(tmp_path):
    from safetensors import safe_open

    masks = _mixed_masks()
    path = tmp_path / "masks.safetensors"
    save_masks(masks, path)
    loaded = load_masks(path)
    assert list(loaded) == list(masks)  # the saved (model) order, not safetensors' sorted one
    for n in masks:
        assert loaded[n].dtype == torch.bool and torch.equal(loaded[n], masks[n]), n
    with safe_open(str(path), framework="pt") as fh:
        stored = {k: fh.get_tensor(k) for k in fh.keys()}
    assert stored["a.proj.row_offsets"].dtype == torch.int32 and stored["a.proj.row_offsets"].shape == (49,)
    assert stored["a.proj.col_indices"].dtype == torch.int16
    assert stored["a.proj.col_indices"].numel() == int(masks["a.proj"].sum())
    assert stored["z.wide.col_indices"].dtype == torch.int32
    assert stored["m.empty.col_indices"].numel() == 0
    assert all(t.dtype != torch.uint8 for t in stored.values())  # no dense tensor stored


def test_masks_file_size_is_proportional_to_nnz(tmp_path):
    g = torch.Generator().manual_seed(0)
    shape = (512, 1024)
    sizes = {}
    for d in (0.002, 0.01, 0.05):
        m = torch.rand(shape, generator=g) < d
        path = tmp_path / f"m{d}.safetensors"
        save_masks({"layer": m}, path)
        sizes[d] = (int(m.sum()), os.path.getsize(path))
    (n1, s1), (n2, s2), (n3, s3) = sizes.values()
    per_entry = (s3 - s1) / (n3 - n1)
    assert 1.9 < per_entry < 2.1  # int16 column indices: two bytes per kept entry
    assert abs((s2 - s1) - per_entry * (n2 - n1)) < 64
    fixed = s1 - 2 * n1  # row offsets + header, independent of nnz
    assert fixed < 4 * (shape[0] + 1) + 1024
    assert s3 < shape[0] * shape[1] / 4  # the dense uint8 format would take 524,288 bytes


@pytest.mark.parametrize("tagged", [True, False])
def test_dense_uint8_files_of_earlier_versions_still_load(tmp_path, tagged):
    import json

    from safetensors.torch import save_file

    masks = {n: m for n, m in _mixed_masks().items() if n != "z.wide"}
    path = tmp_path / "old.safetensors"

    def old_format(ms):  # what save_masks wrote before the compact format
        meta = {"format": "pt", "rosa_peft_masks": "1", "order": json.dumps(list(ms))} if tagged else None
        save_file({n: m.to(torch.uint8) for n, m in ms.items()}, str(path), metadata=meta)

    old_format(masks)
    loaded = load_masks(path)
    assert sorted(loaded) == sorted(masks)
    if tagged:
        assert list(loaded) == list(masks)
    assert all(torch.equal(loaded[n], masks[n]) for n in masks)
    model = _rosa()  # an old file written for a model still installs
    real = compute_masks(model, None, criterion="random", progress=False)
    old_format(real)
    model.set_masks(load_masks(path))
    assert all(torch.equal(model.get_masks()[n], real[n]) for n in real)


def test_damaged_compact_files_are_errors_naming_the_file(tmp_path):
    import json

    from safetensors.torch import save_file

    def write(name, tensors, shapes, order=None):
        path = tmp_path / name
        meta = {"format": "pt", "rosa_peft_masks": "2", "order": json.dumps(order or list(shapes)),
                "shapes": json.dumps(shapes)}
        save_file(tensors, str(path), metadata=meta)
        return path

    rows = torch.tensor([0, 1, 2], dtype=torch.int32)
    cases = {
        "colrange.safetensors": ({"w.row_offsets": rows, "w.col_indices": torch.tensor([0, 9], dtype=torch.int16)},
                                 {"w": [2, 3]}, "out of range"),
        "repeat.safetensors": ({"w.row_offsets": torch.tensor([0, 2, 2], dtype=torch.int32),
                                "w.col_indices": torch.tensor([1, 1], dtype=torch.int16)}, {"w": [2, 3]}, "repeated"),
        "rows.safetensors": ({"w.row_offsets": rows, "w.col_indices": torch.tensor([0], dtype=torch.int16)},
                             {"w": [2, 3]}, "row offsets"),
        "noshape.safetensors": ({"w.row_offsets": rows, "w.col_indices": torch.tensor([0, 1], dtype=torch.int16)},
                                {"v": [2, 3]}, "shapes"),
        "half.safetensors": ({"w.row_offsets": rows}, {"w": [2, 3]}, "col_indices"),
    }
    for name, (tensors, shapes, needle) in cases.items():
        path = write(name, tensors, shapes, order=["w"])
        with pytest.raises(ValueError, match=f"{name}.*{needle}"):
            load_masks(path)
    future = tmp_path / "future.safetensors"
    save_file({"w": torch.zeros(1)}, str(future), metadata={"rosa_peft_masks": "9"})
    with pytest.raises(ValueError, match="future.safetensors.*version '9'"):
        load_masks(future)


def test_bf16_model_scores_match_a_float64_reference_within_bf16_rounding():
    """A bf16 model's dW comes from one bf16 GEMM (each entry rounded to bf16, as its own weight
    gradient would be), squared and summed in float32: within 2^-7 of the float64 Fisher of the same
    layer inputs and output gradients."""
    model = get_rosa_model(make_tiny_llama(dtype=torch.bfloat16),
                           RosaConfig(r=2, density=DENSITY, target_modules="all-linear"))
    batches = _batches(n=2)
    seen = {n: [] for n in _names(model)}
    hooks = []
    for n, layer in model.rosa_layers():
        def keep(module, args, output, n=n):
            output.register_hook(lambda g, x=args[0]: seen[n].append((x.detach(), g)))
        hooks.append(layer.register_forward_hook(keep))
    model.train()
    with GradientCollector(model, "fisher") as col:
        for b in batches:
            model(**b).loss.backward()
    for h in hooks:
        h.remove()
    scores = col.scores()
    for n, pairs in seen.items():
        assert len(pairs) == 2
        flat = [(x.reshape(-1, x.shape[-1]), g.reshape(-1, g.shape[-1])) for x, g in pairs]
        assert all(x.dtype == g.dtype == torch.bfloat16 for x, g in flat)
        ref = sum((g.double().t() @ x.double()) ** 2 for x, g in flat) / 2
        rounded = sum((g.t() @ x).float() ** 2 for x, g in flat) / 2  # the bf16 GEMM, squared in float32
        assert scores[n].dtype == torch.float32
        torch.testing.assert_close(scores[n], rounded, rtol=1e-6, atol=0)
        torch.testing.assert_close(scores[n].double(), ref, rtol=2 ** -7, atol=1e-12 * float(ref.max()))
