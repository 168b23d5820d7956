"""RosaModel on a tiny Llama: implementations agree, W0 is restored exactly, save/load, merge, errors."""
import copy
import os

import re

import pytest
import torch

from conftest import make_tiny_llama
from rosa_peft import RosaConfig, RosaModel, get_rosa_model
from rosa_peft.layer import RosaLinear

PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _masks(model, density=0.1, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {n: torch.rand(l.out_features, l.in_features, generator=g) < density for n, l in model.rosa_layers()}


def _wrapped(impl, dtype=torch.float32, seed=0, **kw):
    base = make_tiny_llama(seed=0, dtype=dtype)
    cfg = RosaConfig(r=4, density=0.1, target_modules="all-linear", init_lora_weights=False, impl=impl,
                     adapter_dtype=kw.pop("adapter_dtype", None), **kw)
    torch.manual_seed(seed)
    model = get_rosa_model(base, cfg)
    torch.manual_seed(seed + 1)
    model.set_masks(_masks(model))
    return model


def _ids(batch=2, seq=9, seed=0):
    return torch.randint(0, 128, (batch, seq), generator=torch.Generator().manual_seed(seed))


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merged_and_sp_add_agree(dtype):
    a, b = _wrapped("merged", dtype), _wrapped("sp_add", dtype)
    ids = _ids()
    a.train(); b.train()
    la = a(input_ids=ids, labels=ids)
    lb = b(input_ids=ids, labels=ids)
    la.loss.backward(); lb.loss.backward()
    ga, gb = _grads(a), _grads(b)
    assert ga.keys() == gb.keys() and len(ga) == 2 * 7 * 3
    if dtype == torch.float32:
        assert torch.equal(la.logits, lb.logits)
        for k in ga:
            assert torch.equal(ga[k], gb[k]), k
    else:
        # the dense W + S is bit-identical; GEMMs may still order sums differently: one bf16 ulp
        ulp = torch.finfo(torch.bfloat16).eps
        diff = (la.logits.float() - lb.logits.float()).abs()
        assert (diff <= ulp * la.logits.float().abs().clamp_min(1.0)).all()
        for k in ga:
            assert torch.allclose(ga[k].float(), gb[k].float(), rtol=ulp, atol=ulp), k


def test_merged_base_tracks_optimizer_and_restores_w0():
    model = _wrapped("merged")
    w0 = {n: l.base_layer.weight.detach().clone() for n, l in model.rosa_layers()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for step in range(5):
        ids = _ids(seed=step)
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step(); opt.zero_grad()
    model(input_ids=_ids())  # the pre-hook syncs the last step
    for name, layer in model.rosa_layers():
        sp = layer.rosa_spa["default"]
        w = layer.base_layer.weight.detach()
        mask = sp.to_mask()
        expected = w0[name].clone()
        expected.view(-1)[sp.flat_indices()] += sp.values.detach()
        assert torch.equal(w, expected), name
        assert torch.equal(w[~mask], w0[name][~mask])
        assert sp.values.abs().sum() > 0
    with model.disable_adapter():
        for name, layer in model.rosa_layers():
            assert torch.equal(layer.base_layer.weight, w0[name])
        base_out = model(input_ids=_ids()).logits
    ref = make_tiny_llama(seed=0)
    assert torch.equal(base_out, ref(input_ids=_ids()).logits)
    for name, layer in model.rosa_layers():  # back in sync after the context
        assert not torch.equal(layer.base_layer.weight, w0[name])
    plain = model.unload()
    for name in w0:
        assert torch.equal(plain.get_submodule(name).weight, w0[name])
    assert not any(isinstance(m, RosaLinear) for m in plain.modules())


@pytest.mark.parametrize("impl", ["merged", "sp_add"])
def test_optimizer_built_before_the_masks_trains_the_sparse_values(impl):
    """A hand-written loop: one optimizer over the trainable parameters from the start, LoRA-only steps,
    then set_masks. The sparse values must train from there: the first set_masks keeps the values'
    Parameter object (now with nnz entries), which the optimizer holds. Before, it installed a new
    Parameter that no optimizer held, and the values silently stayed at zero. Replacing trained values
    (a second set_masks) installs a new Parameter, so no optimizer state for the old positions is applied
    to the new ones."""
    def run(optimizer_first):
        torch.manual_seed(0)
        model = get_rosa_model(make_tiny_llama(seed=0), RosaConfig(r=2, density=0.1, impl=impl, lora_dropout=0.0))
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-2) if optimizer_first else None
        if optimizer_first:  # warm-up: LoRA-only steps; the empty values get no gradient and no state
            for step in range(2):
                model(input_ids=_ids(seed=step), labels=_ids(seed=step)).loss.backward()
                opt.step(); opt.zero_grad()
        before = {n: l.rosa_spa["default"].values for n, l in model.rosa_layers()}
        model.set_masks(_masks(model, density=0.1, seed=3))
        for n, l in model.rosa_layers():
            assert l.rosa_spa["default"].values is before[n], n  # the same Parameter, now with nnz entries
        if not optimizer_first:
            opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        for step in range(3):
            model(input_ids=_ids(seed=10 + step), labels=_ids(seed=10 + step)).loss.backward()
            opt.step(); opt.zero_grad()
        values = {n: l.rosa_spa["default"].values for n, l in model.rosa_layers()}
        if optimizer_first:  # a re-mask: new Parameters, none of them held by the optimizer
            model.set_masks(_masks(model, density=0.1, seed=4))
            held = {id(p) for g in opt.param_groups for p in g["params"]}
            assert all(l.rosa_spa["default"].values is not values[n] and id(l.rosa_spa["default"].values) not in held
                       for n, l in model.rosa_layers())
        return {n: v.detach().clone() for n, v in values.items()}

    first, after = run(True), run(False)
    for name, values in first.items():
        assert values.numel() > 0 and bool((values != 0).all()), name  # every entry trained, none left at 0
        assert values.shape == after[name].shape and bool((after[name] != 0).all()), name


def test_save_load_roundtrip_and_merge(tmp_path):
    model = _wrapped("merged")
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    ids = _ids()
    model(input_ids=ids, labels=ids).loss.backward(); opt.step()
    model.eval()
    logits = model(input_ids=ids).logits
    model.save_pretrained(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    loaded = RosaModel.from_pretrained(make_tiny_llama(seed=0), str(tmp_path))
    assert torch.equal(loaded(input_ids=ids).logits, logits)
    assert not any(p.requires_grad for p in loaded.parameters())
    trainable = RosaModel.from_pretrained(make_tiny_llama(seed=0), str(tmp_path), is_trainable=True)
    assert any(p.requires_grad for p in trainable.parameters())
    merged = loaded.merge_and_unload()
    assert not any(isinstance(m, RosaLinear) for m in merged.modules())
    assert torch.allclose(merged(input_ids=ids).logits, logits, atol=1e-4)


def test_merge_adapter_unmerge():
    model = _wrapped("sp_add")
    model.eval()
    ids = _ids()
    before = model(input_ids=ids).logits
    model.merge_adapter()
    assert torch.allclose(model(input_ids=ids).logits, before, atol=1e-4)
    model.unmerge_adapter()
    assert torch.allclose(model(input_ids=ids).logits, before, atol=1e-4)


def test_multi_adapter_switch_and_delete(tmp_path):
    model = _wrapped("merged")
    model.eval()
    ids = _ids()
    out_default = model(input_ids=ids).logits
    model.add_adapter("other", RosaConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    model.set_masks({k: v for k, v in _masks(model, 0.2, seed=5).items() if k.endswith(("q_proj", "v_proj"))}, "other")
    model.set_adapter("other")
    out_other = model(input_ids=ids).logits
    assert not torch.allclose(out_other, out_default)
    model.set_adapter("default")
    assert torch.equal(model(input_ids=ids).logits, out_default)
    model.save_pretrained(tmp_path)
    assert os.path.isfile(tmp_path / "other" / "adapter_model.safetensors")
    model.delete_adapter("other")
    assert list(model.peft_config) == ["default"]
    assert torch.equal(model(input_ids=ids).logits, out_default)


def test_gradient_checkpointing_matches():
    a, b = _wrapped("merged"), _wrapped("merged")
    b.gradient_checkpointing_enable()
    a.train(); b.train()
    ids = _ids()
    a(input_ids=ids, labels=ids).loss.backward()
    b(input_ids=ids, labels=ids).loss.backward()
    ga, gb = _grads(a), _grads(b)
    for k in ga:
        assert torch.allclose(ga[k], gb[k], atol=1e-6), k


# ---- bad input: one clear error, nothing changed ----------------------------------------------------
@pytest.mark.parametrize("kwargs,match", [
    ({"density": 1.0}, "density"), ({"density": -0.1}, "density"), ({"r": -1}, "r must be"),
    ({"lora_dropout": 1.5}, "lora_dropout"), ({"impl": "fast"}, "impl"), ({"target_modules": "("}, "regex"),
    ({"density_pattern": {"q_proj": 2.0}}, "density_pattern"),
])
def test_config_rejects_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        RosaConfig(**kwargs)


def test_config_json_roundtrip(tmp_path):
    cfg = RosaConfig(r=3, density=0.01, target_modules=["q_proj"], rank_pattern={"q_proj": 5}, impl="sp_add")
    cfg.save_pretrained(tmp_path)
    back = RosaConfig.from_pretrained(str(tmp_path))
    assert back == cfg and back.rank_for("model.layers.0.self_attn.q_proj") == 5
    with pytest.raises(ValueError, match="unknown RosaConfig field"):
        RosaConfig.from_dict({"r": 2, "bogus": 1})


def test_no_matching_target_lists_names_and_changes_nothing():
    base = make_tiny_llama()
    before = copy.deepcopy(base.state_dict())
    with pytest.raises(ValueError, match=r"matches no Linear module.*q_proj.*up_proj"):
        get_rosa_model(base, RosaConfig(target_modules=["query"]))
    assert all(p.requires_grad for p in base.parameters())
    assert not any(isinstance(m, RosaLinear) for m in base.modules())
    assert all(torch.equal(before[k], v) for k, v in base.state_dict().items())


def test_wrong_mask_shape_changes_nothing():
    model = _wrapped("merged")
    masks = _masks(model)
    key = next(iter(masks))
    masks[key] = torch.ones(3, 3, dtype=torch.bool)
    nnz_before = {n: l.rosa_spa["default"].nnz for n, l in model.rosa_layers()}
    with pytest.raises(ValueError, match=f"mask for '{key}' has shape"):
        model.set_masks(masks)
    assert nnz_before == {n: l.rosa_spa["default"].nnz for n, l in model.rosa_layers()}


def test_adapter_that_does_not_fit_is_rejected(tmp_path):
    model = _wrapped("merged")
    model.save_pretrained(tmp_path)
    from transformers import LlamaConfig, LlamaForCausalLM
    other = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2))
    before = copy.deepcopy(other.state_dict())
    with pytest.raises(ValueError, match="has shape"):
        RosaModel.from_pretrained(other, str(tmp_path))
    assert not any(isinstance(m, RosaLinear) for m in other.modules())
    assert all(torch.equal(before[k], v) for k, v in other.state_dict().items())
    os.remove(tmp_path / "adapter_model.safetensors")
    with pytest.raises(FileNotFoundError, match="adapter_model.safetensors"):
        RosaModel.from_pretrained(make_tiny_llama(), str(tmp_path))


def test_all_linear_skips_lm_head_and_patterns_apply():
    model = get_rosa_model(make_tiny_llama(), RosaConfig(r=2, rank_pattern={"down_proj": 5},
                                                         exclude_modules=["layers.1.mlp.up_proj"]))
    names = [n for n, _ in model.rosa_layers()]
    assert "lm_head" not in names and len(names) == 2 * 7 - 1
    assert {n.split(".")[-1] for n in names} == set(PROJ)
    assert model.model.model.layers[0].mlp.down_proj.r["default"] == 5


def test_set_impl_switches_without_changing_outputs():
    torch.manual_seed(0)
    base = make_tiny_llama()
    w0 = {n: m.weight.detach().clone() for n, m in base.named_modules() if isinstance(m, torch.nn.Linear)}
    model = get_rosa_model(base, RosaConfig(r=2, density=0.05, init_lora_weights=False))
    g = torch.Generator().manual_seed(1)
    model.set_masks({n: torch.rand(l.out_features, l.in_features, generator=g) < 0.05 for n, l in model.rosa_layers()})
    ids = torch.randint(0, 128, (2, 8), generator=g)
    with torch.no_grad():
        merged = model(input_ids=ids).logits
        model.set_impl("sp_add")
        assert {layer.impl["default"] for _, layer in model.rosa_layers()} == {"sp_add"}
        assert model.peft_config["default"].impl == "sp_add"
        for name, layer in model.rosa_layers():  # the base weight holds plain W0 again
            assert torch.equal(layer.base_layer.weight, w0[name])
        assert torch.allclose(model(input_ids=ids).logits, merged, atol=1e-6)
        model.set_impl("merged")
        assert torch.allclose(model(input_ids=ids).logits, merged, atol=1e-6)
    with pytest.raises(ValueError, match="impl must be"):
        model.set_impl("dense")


def test_set_impl_is_all_or_nothing():
    """A layer that cannot take the implementation fails the call before any layer is switched."""
    model = get_rosa_model(make_tiny_llama(), RosaConfig(r=2, density=0.05))
    g = torch.Generator().manual_seed(2)
    model.set_masks({n: torch.rand(l.out_features, l.in_features, generator=g) < 0.05 for n, l in model.rosa_layers()})
    model.set_impl("sp_add")
    names = [n for n, _ in model.rosa_layers()]
    dict(model.rosa_layers())[names[-1]].tied = True  # as if its weight were shared: it cannot be merged into
    with pytest.raises(ValueError, match=re.escape(names[-1]) + ".*cannot edit this base weight"):
        model.set_impl("merged")
    assert {layer.impl["default"] for _, layer in model.rosa_layers()} == {"sp_add"}
    assert model.peft_config["default"].impl == "sp_add"
    model.set_impl("auto")  # auto resolves per layer: the tied one stays sp_add
    impls = {n: layer.impl["default"] for n, layer in model.rosa_layers()}
    assert impls[names[-1]] == "sp_add" and {impls[n] for n in names[:-1]} == {"merged"}
