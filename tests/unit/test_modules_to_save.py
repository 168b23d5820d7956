"""ModulesToSaveWrapper and its helpers: per-adapter trainable copies, frozen original, state, pickle, unwrap."""
import copy
import pickle
from collections import OrderedDict

import pytest
import torch
from torch import nn

from conftest import make_tiny_llama
from rosa_peft.modules_to_save import (
    ModulesToSaveWrapper, find_modules_to_save, load_modules_to_save_state, modules_to_save_state_dict,
    modules_to_save_wrappers, unwrap_modules_to_save, wrap_modules_to_save,
)


def _mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(OrderedDict(lin0=nn.Linear(10, 20), relu=nn.ReLU(), lin1=nn.Linear(20, 2)))


def _x(seed=1):
    return torch.randn(8, 10, generator=torch.Generator().manual_seed(seed))


def _train_step(model, steps=1, lr=0.1):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        model(_x()).pow(2).sum().backward()
        opt.step()


def _wrapped_mlp(adapters=("a",)):
    model = _mlp()
    model.lin0.requires_grad_(False)
    for name in adapters:
        wrap_modules_to_save(model, ["lin1"], name)
    return model


# ---- wrapping, training, disabling ------------------------------------------------------------------------
def test_wrap_freezes_original_and_copy_is_trainable_and_identical():
    model = _mlp()
    before = model(_x()).detach()
    original = model.lin1
    assert wrap_modules_to_save(model, ["lin1"], "a") == ["lin1"]
    w = model.lin1
    assert isinstance(w, ModulesToSaveWrapper) and w.original_module is original
    assert not any(p.requires_grad for p in w.original_module.parameters())
    assert all(p.requires_grad for p in w.modules_to_save["a"].parameters())
    assert w.modules_to_save["a"].weight is not original.weight
    assert w.active_adapters == ["a"] and w.active_adapter == "a"
    torch.testing.assert_close(model(_x()), before, rtol=0, atol=0)
    assert modules_to_save_wrappers(model) == {"lin1": w}


def test_training_updates_the_copy_only_and_disable_uses_original():
    model = _wrapped_mlp()
    w = model.lin1
    orig_w = w.original_module.weight.detach().clone()
    copy_w = w.modules_to_save["a"].weight.detach().clone()
    lin0_w = model.lin0.weight.detach().clone()
    base_out = model(_x()).detach()
    _train_step(model, steps=3)
    assert torch.equal(w.original_module.weight, orig_w) and w.original_module.weight.grad is None
    assert torch.equal(model.lin0.weight, lin0_w)
    assert not torch.allclose(w.modules_to_save["a"].weight, copy_w)
    trained_out = model(_x()).detach()
    assert not torch.allclose(trained_out, base_out)
    w.enable_adapters(False)
    assert w.disable_adapters
    torch.testing.assert_close(model(_x()), base_out, rtol=0, atol=0)
    w.disable_adapters = False  # the flag is settable too, as on RosaLinear
    torch.testing.assert_close(model(_x()), trained_out, rtol=0, atol=0)
    # the original stays frozen through enable/disable
    assert not any(p.requires_grad for p in w.original_module.parameters())


def test_two_adapters_switching_and_conflicts():
    model = _wrapped_mlp(("a", "b"))
    w = model.lin1
    assert list(w.modules_to_save) == ["a", "b"] and w.active_adapters == ["a"]  # update does not activate
    with torch.no_grad():
        w.modules_to_save["b"].weight.add_(1.0)
    out_a = model(_x()).detach()
    w.set_adapter("b")
    out_b = model(_x()).detach()
    assert not torch.allclose(out_a, out_b)
    assert all(p.requires_grad for p in w.modules_to_save["b"].parameters())
    assert not any(p.requires_grad for p in w.modules_to_save["a"].parameters())
    _train_step(model)
    assert w.modules_to_save["a"].weight.grad is None and w.modules_to_save["b"].weight.grad is not None
    with pytest.raises(ValueError, match="'lin1'.*only one active adapter"):
        w.set_adapter(["a", "b"])
    w.set_adapter(["a", "other"])  # an adapter without a copy here may be active alongside
    torch.testing.assert_close(model(_x()), out_a, rtol=0, atol=0)
    w.set_adapter("other")  # no copy for it: the original runs
    with torch.no_grad():
        expected = w.original_module(torch.relu(model.lin0(_x())))
    torch.testing.assert_close(model(_x()), expected, rtol=0, atol=0)
    assert w.active_adapter == "other"
    w.set_adapter("b", trainable=False)
    assert not any(p.requires_grad for p in w.parameters())


def test_delete_adapter():
    model = _wrapped_mlp(("a", "b"))
    w = model.lin1
    w.set_adapter("a")
    w.delete_adapter("a")
    assert list(w.modules_to_save) == ["b"] and w.active_adapters == []
    with torch.no_grad():
        torch.testing.assert_close(model(_x()), w.original_module(torch.relu(model.lin0(_x()))), rtol=0, atol=0)
    w.delete_adapter("never-added")  # a no-op, so a model can call it on every wrapper
    assert list(w.modules_to_save) == ["b"]


def test_getattr_reads_the_module_forward_runs():
    model = _wrapped_mlp()
    w = model.lin1
    assert w.in_features == 20 and w.out_features == 2
    assert w.weight is w.modules_to_save["a"].weight
    w.enable_adapters(False)
    assert w.weight is w.original_module.weight
    w.enable_adapters(True)
    w.set_adapter("none-here")
    assert w.weight is w.original_module.weight
    with pytest.raises(AttributeError, match="no_such_thing"):
        w.no_such_thing
    assert "adapters=['a']" in repr(w) and "module='lin1'" in repr(w)


def test_update_is_idempotent_and_wrapping_twice_is_refused():
    model = _wrapped_mlp()
    w = model.lin1
    with torch.no_grad():
        w.modules_to_save["a"].weight.fill_(3.0)
    assert wrap_modules_to_save(model, ["lin1"], "a") == ["lin1"]  # existing copy kept
    assert model.lin1 is w and torch.all(w.modules_to_save["a"].weight == 3.0)
    with pytest.raises(TypeError):
        ModulesToSaveWrapper(w, "b")


@pytest.mark.parametrize("make, inp", [
    (lambda: nn.LayerNorm(6), lambda: torch.randn(3, 6)),
    (lambda: nn.Embedding(11, 4), lambda: torch.tensor([[1, 2, 10]])),
    (lambda: nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)), lambda: torch.randn(3, 6)),
])
def test_any_module_type(make, inp):
    torch.manual_seed(0)
    module = make()
    x = inp()
    ref = module(x).detach()
    w = ModulesToSaveWrapper(module, "a")
    torch.testing.assert_close(w(x), ref, rtol=0, atol=0)
    opt = torch.optim.SGD([p for p in w.parameters() if p.requires_grad], lr=0.5)
    w(x).float().pow(2).sum().backward()
    opt.step()
    assert not torch.allclose(w(x), ref)
    torch.testing.assert_close(w.original_module(x), ref, rtol=0, atol=0)
    w.enable_adapters(False)
    torch.testing.assert_close(w(x), ref, rtol=0, atol=0)


# ---- find / wrap on a real model ------------------------------------------------------------------------
def test_find_modules_to_save_matching_and_errors():
    model = make_tiny_llama()
    assert find_modules_to_save(model, ["lm_head", "norm"]) == ["model.norm", "lm_head"]
    assert find_modules_to_save(model, ["mlp"]) == ["model.layers.0.mlp", "model.layers.1.mlp"]
    assert find_modules_to_save(model, ["layers.1.mlp", "model.layers.1.mlp"]) == ["model.layers.1.mlp"]
    with pytest.raises(ValueError, match="'nope' matches no module"):
        find_modules_to_save(model, ["lm_head", "nope"])
    with pytest.raises(ValueError, match="'model.layers.0.mlp' is inside 'model.layers.0'"):
        find_modules_to_save(model, ["layers.0", "mlp"])
    with pytest.raises(ValueError, match="modules_to_save"):
        find_modules_to_save(model, "lm_head")
    assert wrap_modules_to_save(model, ["lm_head", "embed_tokens"], "a") == ["model.embed_tokens", "lm_head"]
    assert find_modules_to_save(model, ["lm_head"]) == ["lm_head"]  # returned by its wrapper name
    with pytest.raises(ValueError, match="inside"):  # only exists inside a wrapper now
        find_modules_to_save(model, ["original_module"])
    with pytest.raises(ValueError, match="contains the existing wrapper"):
        find_modules_to_save(model, ["model"])


def test_tiny_llama_head_and_embeddings_train_as_copies():
    model = make_tiny_llama()
    model.requires_grad_(False)
    ids = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(0))
    ref = model(ids).logits.detach()
    wrap_modules_to_save(model, ["lm_head", "embed_tokens"], "default")
    torch.testing.assert_close(model(ids).logits, ref, rtol=0, atol=0)
    assert model.get_input_embeddings() is model.model.embed_tokens
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"model.embed_tokens.modules_to_save.default.weight", "lm_head.modules_to_save.default.weight"}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    model(ids, labels=ids).loss.backward()
    opt.step()
    assert not torch.allclose(model(ids).logits, ref)
    for w in modules_to_save_wrappers(model).values():
        w.enable_adapters(False)
    torch.testing.assert_close(model(ids).logits, ref, rtol=0, atol=0)


# ---- state ---------------------------------------------------------------------------------------------
def test_state_dict_keys_and_round_trip():
    model = _wrapped_mlp(("a", "b"))
    _train_step(model)
    state = modules_to_save_state_dict(model, "a")
    assert set(state) == {"lin1.modules_to_save.weight", "lin1.modules_to_save.bias"}
    assert torch.equal(state["lin1.modules_to_save.weight"], model.lin1.modules_to_save["a"].weight)
    assert modules_to_save_state_dict(model, "missing") == {}
    fresh = _wrapped_mlp(("a", "b"))
    assert not torch.equal(fresh.lin1.modules_to_save["a"].weight, model.lin1.modules_to_save["a"].weight)
    b_before = fresh.lin1.modules_to_save["b"].weight.detach().clone()
    load_modules_to_save_state(fresh, {k: v.clone() for k, v in state.items()}, "a")
    torch.testing.assert_close(fresh(_x()), model(_x()), rtol=0, atol=0)
    assert torch.equal(fresh.lin1.modules_to_save["b"].weight, b_before)  # other adapter untouched
    assert fresh.lin1.modules_to_save["a"].weight.requires_grad  # loading keeps the parameters


def test_load_state_validates_before_changing_anything():
    model = _mlp()
    model.requires_grad_(False)
    wrap_modules_to_save(model, ["lin0", "lin1"], "a")
    good = {k: torch.full_like(v, 7.0) for k, v in modules_to_save_state_dict(model, "a").items()}
    snapshot = {k: v.clone() for k, v in modules_to_save_state_dict(model, "a").items()}

    def unchanged():
        return all(torch.equal(v, snapshot[k]) for k, v in modules_to_save_state_dict(model, "a").items())

    missing = dict(good)
    del missing["lin1.modules_to_save.bias"]
    with pytest.raises(ValueError, match=r"'lin1'.*missing keys \['bias'\]"):
        load_modules_to_save_state(model, missing, "a")
    with pytest.raises(ValueError, match=r"'lin1'.*unexpected keys \['extra'\]"):
        load_modules_to_save_state(model, {**good, "lin1.modules_to_save.extra": torch.zeros(1)}, "a")
    with pytest.raises(ValueError, match=r"lin2.modules_to_save.weight"):
        load_modules_to_save_state(model, {**good, "lin2.modules_to_save.weight": torch.zeros(1)}, "a")
    with pytest.raises(ValueError, match=r"'weight' has shape \(3, 20\), expected \(2, 20\)"):
        load_modules_to_save_state(model, {**good, "lin1.modules_to_save.weight": torch.zeros(3, 20)}, "a")
    with pytest.raises(ValueError, match="key"):  # adapter without copies: nothing may be loaded for it
        load_modules_to_save_state(model, good, "b")
    assert unchanged()
    load_modules_to_save_state(model, good, "a")
    assert all(torch.all(v == 7.0) for v in modules_to_save_state_dict(model, "a").values())


def test_wrapper_level_state_is_strict():
    w = ModulesToSaveWrapper(nn.Linear(3, 2), "a")
    state = w.adapter_state_dict("a")
    assert set(state) == {"weight", "bias"}
    with pytest.raises(ValueError, match=r"missing keys \['bias'\]"):
        w.load_adapter_state("a", {"weight": state["weight"]})
    with pytest.raises(ValueError, match=r"unexpected keys \['x'\]"):
        w.load_adapter_state("a", {**state, "x": torch.zeros(1)})
    with pytest.raises(ValueError, match="no copy for adapter 'zz'"):
        w.load_adapter_state("zz", state)
    with pytest.raises(ValueError, match="no copy for adapter 'zz'"):
        w.adapter_state_dict("zz")
    w.load_adapter_state("a", {k: torch.ones_like(v) for k, v in state.items()})
    assert torch.all(w.modules_to_save["a"].weight == 1) and not torch.all(w.original_module.weight == 1)


# ---- pickle, deepcopy, unwrap ------------------------------------------------------------------------
def test_pickle_and_deepcopy_round_trip():
    model = _wrapped_mlp(("a", "b"))
    model.lin1.set_adapter("b")
    _train_step(model)
    out = model(_x()).detach()
    for clone in (pickle.loads(pickle.dumps(model)), copy.deepcopy(model)):
        w = clone.lin1
        assert isinstance(w, ModulesToSaveWrapper) and w.active_adapters == ["b"] and list(w.modules_to_save) == ["a", "b"]
        assert w.weight is w.modules_to_save["b"].weight
        torch.testing.assert_close(clone(_x()), out, rtol=0, atol=0)
        assert w.modules_to_save["b"].weight.requires_grad and not w.original_module.weight.requires_grad
        with torch.no_grad():
            w.modules_to_save["b"].weight.zero_()
        assert not torch.all(model.lin1.modules_to_save["b"].weight == 0)  # independent storage
    w = ModulesToSaveWrapper(nn.LayerNorm(4), "a")
    w2 = pickle.loads(pickle.dumps(w))
    assert w2.normalized_shape == (4,) and "adapters=['a']" in repr(w2)


def test_unwrap_to_copy_or_original():
    model = _wrapped_mlp(("a", "b"))
    _train_step(model)
    trained = model.lin1.modules_to_save["a"]
    original = model.lin1.original_module
    assert model.lin1.unwrap("a") is trained and model.lin1.unwrap(None) is original
    assert model.lin1.unwrap("absent") is original
    out = model(_x()).detach()
    merged = copy.deepcopy(model)
    assert unwrap_modules_to_save(merged, "a") == ["lin1"]
    assert type(merged.lin1) is nn.Linear and modules_to_save_wrappers(merged) == {}
    torch.testing.assert_close(merged(_x()), out, rtol=0, atol=0)
    plain = copy.deepcopy(model)
    unwrap_modules_to_save(plain, None)
    torch.testing.assert_close(plain.lin1.weight, original.weight, rtol=0, atol=0)
    fallback = copy.deepcopy(model)
    unwrap_modules_to_save(fallback, "c")  # no copy for c: the original
    torch.testing.assert_close(fallback.lin1.weight, original.weight, rtol=0, atol=0)
