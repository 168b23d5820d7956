"""QRoSA: RoSA over a 4-bit NF4 base (torchao; bitsandbytes where installed), against dense references."""
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from rosa_peft import RosaConfig, RosaModel, bases, get_rosa_model, quantize_model
from rosa_peft import quant
from rosa_peft.bases import quantize as bases_quantize
from rosa_peft.layer import RosaLinear

pytest.importorskip("transformers")
BACKENDS = [
    "torchao",
    pytest.param("bnb", marks=pytest.mark.skipif(not quant.backend_available("bnb"), reason="bitsandbytes not installed")),
]
if not quant.backend_available("torchao"):
    pytestmark = pytest.mark.skip(reason="torchao not installed")


def tiny_llama(seed=0):
    """hidden 64 / intermediate 128: every Linear splits into whole 64-blocks."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=False)
    return LlamaForCausalLM(cfg).float().eval()


def ids(batch=2, seq=7, seed=0):
    return torch.randint(0, 128, (batch, seq), generator=torch.Generator().manual_seed(seed))


def masks_for(model, density=0.05, seed=1):
    g = torch.Generator().manual_seed(seed)
    return {n: torch.rand(l.out_features, l.in_features, generator=g) < density for n, l in model.rosa_layers()}


def cfg(**kw):
    return RosaConfig(**{"r": 4, "density": 0.05, "init_lora_weights": False, **kw})


def quantized(backend, seed=0, dtype=torch.float32):
    return quantize_model(tiny_llama(seed), backend=backend, compute_dtype=dtype)


def dequantized_twin(rosa_model, seed=0):
    """The same tiny Llama with each 4-bit Linear replaced by a float Linear holding W_deq."""
    dense = tiny_llama(seed)
    for name, layer in rosa_model.rosa_layers():
        with torch.no_grad():
            dense.get_submodule(name).weight.copy_(quant.dense_weight(layer))
    return dense


def copy_adapter(src: RosaModel, dst: RosaModel):
    dst.set_masks(src.get_masks())
    with torch.no_grad():
        for name, layer in src.rosa_layers():
            other = dst.model.get_submodule(name)
            other.lora_A["default"].weight.copy_(layer.lora_A["default"].weight)
            other.lora_B["default"].weight.copy_(layer.lora_B["default"].weight)
            other.rosa_spa["default"].values.copy_(layer.rosa_spa["default"].values)


def adapted(backend, seed=0, **kw):
    torch.manual_seed(seed)
    model = get_rosa_model(quantized(backend), cfg(**kw))
    model.set_masks(masks_for(model))
    return model


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


# ---- quantize_model ---------------------------------------------------------------------------------
def test_import_rosa_peft_imports_no_backend():
    code = ("import sys, rosa_peft, rosa_peft.layer, rosa_peft.bases; from rosa_peft import RosaModel; "
            "bad = [m for m in ('torchao', 'bitsandbytes', 'rosa_peft.quant', 'rosa_peft.bases.quantize', "
            "'rosa_peft.bases.torchao_nf4', 'rosa_peft.bases.bnb_4bit') if m in sys.modules]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})


def test_quant_module_is_the_compatible_path():
    """``rosa_peft.quant`` re-exports the 1.x names from ``bases.quantize``; the choice lists of the
    commands come from the one registry."""
    from rosa_peft import options

    for name in quant.__all__:
        assert getattr(quant, name) is getattr(bases_quantize, name), name
    assert quant.BACKENDS == ("torchao", "bnb") == options.QUANT_BACKENDS == tuple(bases.QUANT_BACKENDS)
    assert options.QUANTIZE == ("none", "nf4")
    assert not hasattr(quant, "add_quant_arguments") and not hasattr(quant, "maybe_quantize")
    assert {b.kind for b in bases.QUANT_BACKENDS.values()} == set(bases.QUANT_KINDS)
    assert all(bases.backend_of_kind(b.kind) is b for b in bases.QUANT_BACKENDS.values())
    assert bases.backend_of_kind("float") is None


@pytest.mark.parametrize("backend", BACKENDS)
def test_quantize_model_converts_linears_only(backend):
    ref = tiny_llama()
    model = quantize_model(tiny_llama(), backend=backend, compute_dtype=torch.bfloat16)
    lin = [n for n, m in ref.named_modules() if isinstance(m, nn.Linear)]
    assert len(lin) == 15
    for name in lin:
        m = model.get_submodule(name)
        if name == "lm_head":
            assert not quant.is_quantized(m) and m.weight.dtype == torch.float32
            assert torch.equal(m.weight, ref.lm_head.weight)
        else:
            assert quant.is_quantized(m), name
            assert bases.resolve_base_kind(m).compute_dtype(m) == torch.bfloat16
            w = quant.dense_weight(m)
            w0 = ref.get_submodule(name).weight
            assert w.dtype == torch.float32 and w.shape == w0.shape
            assert (w - w0).abs().max() <= 0.25 * w0.abs().max()  # 4-bit: within a quantization step
    assert model.model.embed_tokens.weight.dtype == torch.float32
    assert torch.equal(model.model.embed_tokens.weight, ref.model.embed_tokens.weight)
    out = model(input_ids=ids()).logits  # the plain quantized model still runs
    assert out.shape == (2, 7, 128) and torch.isfinite(out).all()


def test_quantize_model_keeps_tied_head():
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True))
    quantize_model(model, skip_modules=(), compute_dtype=torch.float32)
    assert model.lm_head.weight is model.model.embed_tokens.weight and not quant.is_quantized(model.lm_head)


# ---- acceptance 1: forward and gradients equal RoSA over the dequantized weights -----------------------
IMPLS = ["spmm", "sp_add"]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_forward_and_grads_match_rosa_on_dequantized_weights(backend, impl):
    q = adapted(backend, impl=impl)
    d = get_rosa_model(dequantized_twin(q), cfg())
    copy_adapter(q, d)
    assert all(l.impl["default"] == impl and l.kind.name in bases.QUANT_KINDS for _, l in q.rosa_layers())
    q.train(); d.train()
    x = ids()
    out_q = q(input_ids=x, labels=x)
    out_d = d(input_ids=x, labels=x)
    assert (out_q.logits - out_d.logits).abs().max() <= 1e-5
    out_q.loss.backward(); out_d.loss.backward()
    gq, gd = grads(q), grads(d)
    assert gq.keys() == gd.keys() and len(gq) == 14 * 3  # A, B and S of 14 layers
    for k in gq:
        assert torch.allclose(gq[k], gd[k], rtol=1e-4, atol=1e-6), k


@pytest.mark.parametrize("chunked", [False, True])
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_layer_matches_explicit_dense_autograd(backend, impl, chunked, monkeypatch):
    """One 4-bit layer against float64 autograd on W_deq + S + s·B·A (bias included); ``chunked``
    de-quantises the bitsandbytes weight a few rows at a time (several chunks, a ragged last one)."""
    if chunked and backend == "bnb":
        monkeypatch.setattr("rosa_peft.bases.bnb_4bit.DEQUANT_CHUNK_ELEMENTS", 128 * 9)
    torch.manual_seed(0)
    net = nn.Sequential()
    net.add_module("proj", nn.Linear(128, 64))
    quantize_model(net, backend=backend, compute_dtype=torch.float32)
    model = get_rosa_model(net, cfg(r=3, target_modules=["proj"], impl=impl))
    mask = torch.rand(64, 128, generator=torch.Generator().manual_seed(3)) < 0.1
    model.set_masks({"proj": mask})
    layer = model.model.proj
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    vals = layer.rosa_spa["default"].values
    x = torch.randn(5, 128, requires_grad=True)
    y = model(x)
    g = torch.randn_like(y)
    y.backward(g)

    A2, B2, v2 = (t.detach().double().requires_grad_() for t in (A, B, vals))
    x2 = x.detach().double().requires_grad_()
    S = torch.zeros(64, 128, dtype=torch.float64).index_put((mask.nonzero()[:, 0], mask.nonzero()[:, 1]), v2)
    W = quant.dense_weight(layer, torch.float64)
    y2 = x2 @ (W + S).t() + layer.scaling["default"] * (x2 @ A2.t()) @ B2.t() + layer.base_layer.bias.double()
    y2.backward(g.double())
    assert (y - y2).abs().max() <= 1e-5
    for got, want in ((A.grad, A2.grad), (B.grad, B2.grad), (vals.grad, v2.grad), (x.grad, x2.grad)):
        assert torch.allclose(got.double(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_spmm_and_sp_add_agree_in_bf16(backend):
    """bf16 compute over the 4-bit base: the two implementations agree to bf16 rounding."""
    outs = {}
    for impl in IMPLS:
        torch.manual_seed(0)
        model = get_rosa_model(quantized(backend, dtype=torch.bfloat16), cfg(impl=impl, adapter_dtype="float32"))
        model.set_masks(masks_for(model))
        model.train()
        loss = model(input_ids=ids(), labels=ids()).loss
        loss.backward()
        outs[impl] = (loss.detach(), grads(model))
    (l1, g1), (l2, g2) = outs["spmm"], outs["sp_add"]
    assert abs(float(l1) - float(l2)) <= 2e-2 * abs(float(l2))
    for k in g1:
        scale = g2[k].abs().max().clamp_min(1e-6)
        assert (g1[k] - g2[k]).abs().max() <= 0.1 * scale, k


@pytest.mark.parametrize("double_quant,impl", [(True, "sp_add"), (True, "spmm"), (False, "auto")])
@pytest.mark.skipif(not quant.backend_available("bnb"), reason="bitsandbytes not installed")
def test_bnb_double_quant_end_to_end(double_quant, impl, tmp_path):
    """The paper's QRoSA: bnb NF4 (double quantization) -> get_rosa_model -> masks from gradient scores
    -> train steps -> save / load -> merge_and_unload, against the dequantized dense twin throughout."""
    from rosa_peft.masks import compute_masks

    base = quantize_model(tiny_llama(), backend="bnb", compute_dtype=torch.float32, double_quant=double_quant)
    qs = base.model.layers[0].mlp.up_proj.weight.quant_state
    assert bool(qs.nested) is double_quant
    torch.manual_seed(0)
    model = get_rosa_model(base, cfg(init_lora_weights=True, impl=impl))
    assert all(l.impl["default"] == ("sp_add" if impl == "auto" else impl) for _, l in model.rosa_layers())
    batches = [{"input_ids": ids(seed=s), "labels": ids(seed=s)} for s in range(2)]
    masks = compute_masks(model, batches, criterion="fisher", progress=False)  # dW scores through the 4-bit base
    assert all(int(m.sum()) == int(0.05 * m.numel()) for m in masks.values())
    model.set_masks(masks)
    model.zero_grad(set_to_none=True)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(3):
        loss = model(input_ids=ids(), labels=ids()).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert all(l.rosa_spa["default"].values.abs().sum() > 0 for _, l in model.rosa_layers())
    # the trained adapter over the 4-bit base equals the same adapter over the dequantized weights
    d = get_rosa_model(dequantized_twin(model), cfg())
    copy_adapter(model, d)
    model.eval(); d.eval()
    x = ids(seed=3)
    with torch.no_grad():
        want = model(input_ids=x).logits
        assert (d(input_ids=x).logits - want).abs().max() <= 1e-4
    model.save_pretrained(str(tmp_path))
    fresh = quantize_model(tiny_llama(), backend="bnb", compute_dtype=torch.float32, double_quant=double_quant)
    loaded = RosaModel.from_pretrained(fresh, str(tmp_path))
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=x).logits, want)
        merged = loaded.merge_and_unload()
        assert (merged(input_ids=x).logits - want).abs().max() <= 1e-3
    assert not any(quant.is_quantized(m) or isinstance(m, RosaLinear) for m in merged.modules())


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_no_dense_weight_saved_for_backward(backend, impl):
    model = adapted(backend, impl=impl)
    model.train()
    shapes = {(l.out_features, l.in_features) for _, l in model.rosa_layers()}
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(input_ids=ids(), labels=ids()).loss
    params = {p.data_ptr() for p in model.parameters() if type(p.data) is torch.Tensor}  # e.g. the float lm_head
    dense = [t for t in saved if type(t) is torch.Tensor and t.is_floating_point() and tuple(t.shape) in shapes
             and t.data_ptr() not in params]
    assert not dense, [tuple(t.shape) for t in dense]
    loss.backward()


@pytest.mark.parametrize("backend", BACKENDS)
def test_impl_auto_is_sp_add_and_merged_is_refused(backend):
    rosa = get_rosa_model(quantized(backend), cfg())
    assert {l.impl["default"] for _, l in rosa.rosa_layers()} == {"sp_add"}
    with pytest.raises(ValueError, match="spmm"):  # spmm needs a 4-bit base
        get_rosa_model(tiny_llama(), cfg(impl="spmm"))
    model = quantized(backend)
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.q_proj.*merged"):
        get_rosa_model(model, cfg(impl="merged"))
    rosa = get_rosa_model(quantized(backend), cfg())
    with pytest.raises(ValueError, match="merge_and_unload"):
        rosa.merge_adapter()


# ---- acceptance 3: merge -------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_merge_and_unload_matches_unmerged(backend):
    model = adapted(backend)
    x = ids()
    with torch.no_grad():
        want = model(input_ids=x).logits
        merged = model.merge_and_unload()
        got = merged(input_ids=x).logits
    assert (got - want).abs().max() <= 1e-3
    for name, m in merged.named_modules():
        assert not isinstance(m, RosaLinear) and not quant.is_quantized(m), name
    assert type(merged.model.layers[0].mlp.down_proj) is nn.Linear


@pytest.mark.parametrize("backend", BACKENDS)
def test_merge_and_requantize(backend):
    model = adapted(backend)
    want = {name: layer.merged_weight("default") for name, layer in model.rosa_layers()}
    with pytest.warns(UserWarning, match="rounds"):
        merged = quant.merge_and_requantize(model)
    assert not any(isinstance(m, RosaLinear) for m in merged.modules())
    kind = bases.QUANT_BACKENDS[backend].kind
    for name, w in want.items():
        m = merged.get_submodule(name)
        assert bases.resolve_base_kind(m).name == kind, name
        got = quant.dense_weight(m)
        # NF4 rounding: half the widest code gap (0.28) of a block's absmax, plus the 8-bit scale error
        assert ((got - w).abs() <= 0.2 * w.abs().amax(dim=1, keepdim=True)).all(), name
        fresh = nn.Linear(w.shape[1], w.shape[0], bias=False)
        with torch.no_grad():
            fresh.weight.copy_(w)
        ref = quant.dense_weight(quantize_model(_net(x=fresh), backend=backend, compute_dtype=torch.float32).x)
        assert torch.equal(got, ref), name  # same block size, dtype and double quantization as before
    assert not quant.is_quantized(merged.lm_head)
    with torch.no_grad():
        assert torch.isfinite(merged(input_ids=ids()).logits).all()


# ---- save / load ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_save_and_load_like_rosa(backend, tmp_path):
    model = adapted(backend)
    model.eval()
    x = ids()
    with torch.no_grad():
        want = model(input_ids=x).logits
    model.save_pretrained(str(tmp_path))
    files = sorted(os.listdir(tmp_path))
    assert files == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    loaded = RosaModel.from_pretrained(quantized(backend), str(tmp_path))
    with torch.no_grad():
        got = loaded(input_ids=x).logits
    assert torch.equal(got, want)
    # the same file loads onto the float base too (QRoSA adapters are RoSA adapters)
    RosaModel.from_pretrained(tiny_llama(), str(tmp_path))


def test_from_pretrained_registers_kinds_lazily(tmp_path):
    """A model quantized elsewhere (kinds not registered yet) is still found by all-linear."""
    model = adapted("torchao")
    model.save_pretrained(str(tmp_path))
    base = quantized("torchao")
    saved_kinds, saved_registered = list(bases.BASE_KINDS), dict(bases._REGISTERED)
    try:
        bases.BASE_KINDS[:] = [k for k in bases.BASE_KINDS if k.name not in bases.QUANT_KINDS]
        bases._REGISTERED.clear()
        loaded = RosaModel.from_pretrained(base, str(tmp_path))
        assert len(list(loaded.rosa_layers())) == 14
        assert {l.kind.name for _, l in loaded.rosa_layers()} == {bases.QUANT_BACKENDS["torchao"].kind}
        assert [k.name for k in bases.BASE_KINDS][-2:] == ["float", "conv1d"]  # the float kinds match last
    finally:
        bases.BASE_KINDS[:] = saved_kinds
        bases._REGISTERED.clear()
        bases._REGISTERED.update(saved_registered)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fresh_dense_is_what_callers_may_modify(backend):
    """``fresh_dense``: the 4-bit kinds de-quantise into a new tensor; the float kind hands out its
    weight, so ``dense_weight`` and ``sp_add`` copy it and the base weight never changes."""
    from rosa_peft.sparse import SparseAdapter
    from rosa_peft.weight_source import SpAddSource

    float_lin = nn.Linear(64, 64)
    quant_lin = quantize_model(_net(x=nn.Linear(64, 64)), backend=backend, compute_dtype=torch.float32).x
    kinds = {m: bases.resolve_base_kind(m) for m in (float_lin, quant_lin)}
    assert not kinds[float_lin].fresh_dense and kinds[quant_lin].fresh_dense
    before = float_lin.weight.detach().clone()
    quantized_before = quant.dense_weight(quant_lin)
    sp = torch.zeros(64, 64, dtype=torch.bool)
    sp[0, :3] = True
    adapter = SparseAdapter(64, 64, dtype=torch.float32)
    adapter.set_mask(sp, torch.ones(3))
    for m, kind in kinds.items():
        quant.dense_weight(m).add_(1.0)  # the caller owns the copy
        w_s = SpAddSource(kind).dense(kind.weight(m), adapter, adapter.values.detach(), torch.float32)
        assert torch.allclose(w_s - quant.dense_weight(m), torch.where(sp, 1.0, 0.0), atol=1e-6)
    assert torch.equal(float_lin.weight, before)
    assert torch.equal(quant.dense_weight(quant_lin), quantized_before)


# ---- masks: scores and hooks see ordinary tensors --------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_magnitude_scores_and_hooks(backend):
    torch.manual_seed(0)
    model = get_rosa_model(quantized(backend), cfg(density=0.05))  # warm-up: LoRA only, no masks yet
    layer = model.model.model.layers[0].mlp.up_proj
    w = layer.kind.to_dense(layer.kind.weight(layer.base_layer), torch.float32)
    assert type(w) is torch.Tensor and w.shape == (128, 64)
    assert torch.equal(w, quant.dense_weight(layer))
    seen = {}
    layer.register_forward_hook(lambda m, i, o: seen.update(x=i[0], y=o))
    layer.register_full_backward_hook(lambda m, gi, go: seen.update(gy=go[0]))
    model.train()
    model(input_ids=ids(), labels=ids()).loss.backward()
    for k in ("x", "y", "gy"):
        assert type(seen[k]) is torch.Tensor and seen[k].dtype == torch.float32, k
    dw = seen["gy"].reshape(-1, 128).t() @ seen["x"].reshape(-1, 64)  # the dW a gradient scorer builds
    assert dw.shape == w.shape and torch.isfinite(dw).all()
    # after installing masks from those scores, training continues on the 4-bit base
    top = dw.abs().flatten().topk(int(0.05 * dw.numel())).indices
    mask = torch.zeros(dw.numel(), dtype=torch.bool)
    mask[top] = True
    model.set_masks({"model.layers.0.mlp.up_proj": mask.view_as(dw)})
    model(input_ids=ids(), labels=ids()).loss.backward()
    assert layer.rosa_spa["default"].values.grad is not None


@pytest.mark.parametrize("backend", BACKENDS)
def test_sparse_only_over_4bit_base(backend):
    torch.manual_seed(0)
    model = get_rosa_model(quantized(backend), cfg(r=0, density=0.05))
    x = ids()
    with torch.no_grad():
        before = model(input_ids=x).logits
    with model.disable_adapter(), torch.no_grad():
        base = model(input_ids=x).logits
    assert torch.allclose(before, base, atol=1e-5)  # r = 0 and no masks: the base model
    model.set_masks(masks_for(model))
    model.train()
    model(input_ids=x, labels=x).loss.backward()
    assert all(l.rosa_spa["default"].values.grad is not None for _, l in model.rosa_layers())


def test_bnb_cpu_packed_layout_still_dequantizes():
    """bitsandbytes repacks weights in place on an eval, no-grad CPU forward; to_dense must follow."""
    if not quant.backend_available("bnb"):
        pytest.skip("bitsandbytes not installed")
    torch.manual_seed(0)
    net = nn.Sequential()
    net.add_module("proj", nn.Linear(128, 64, bias=False))
    quantize_model(net, backend="bnb", compute_dtype=torch.bfloat16)
    lin = net.proj
    before = quant.dense_weight(lin)
    lin.eval()
    x = torch.randn(4, 128, dtype=torch.bfloat16)
    with torch.no_grad():
        y = lin(x)
    after = quant.dense_weight(lin)
    if getattr(lin.weight.quant_state, "packing_format_for_cpu", False):
        assert after.shape == before.shape
        assert (after - before).abs().max() <= 1e-2 * before.abs().max()  # absmax rounded to bf16 by bnb
    assert torch.allclose(y.float(), x.float() @ after.t(), rtol=2e-2, atol=2e-2)


# ---- acceptance 5: bad input -----------------------------------------------------------------------------
def _net(**layers):
    net = nn.Module()
    for name, m in layers.items():
        net.add_module(name, m)
    return net


def test_bad_block_size_names_layer_and_changes_nothing():
    net = _net(good=nn.Linear(64, 64), bad=nn.Linear(30, 64))
    with pytest.raises(ValueError, match=r"'bad'.*in_features=30.*block size 64"):
        quantize_model(net, compute_dtype=torch.float32)
    assert type(net.good.weight.data) is torch.Tensor and not quant.is_quantized(net.good)
    quantize_model(net, skip_modules=("bad",), compute_dtype=torch.float32)
    assert quant.is_quantized(net.good) and not quant.is_quantized(net.bad)


@pytest.mark.parametrize("backend", BACKENDS)
def test_unsupported_dtype_names_layer(backend):
    net = _net(good=nn.Linear(64, 64), odd=nn.Linear(64, 64).double())
    with pytest.raises(ValueError, match=r"'odd'.*unsupported weight dtype torch\.float64"):
        quantize_model(net, backend=backend)
    assert not quant.is_quantized(net.good)


def test_bad_arguments():
    net = _net(good=nn.Linear(64, 64))
    with pytest.raises(ValueError, match="compute_dtype"):
        quantize_model(net, compute_dtype=torch.int8)
    with pytest.raises(ValueError, match="backend"):
        quantize_model(net, backend="gptq")
    with pytest.raises(ValueError, match="block_size"):
        quantize_model(net, block_size=0)
    with pytest.raises(ValueError, match="already carries a RoSA adapter"):
        quantize_model(get_rosa_model(tiny_llama(), cfg()))
    if quant.backend_available("bnb"):
        with pytest.raises(ValueError, match="block sizes"):
            quantize_model(net, backend="bnb", block_size=48)
    assert not quant.is_quantized(net.good)
