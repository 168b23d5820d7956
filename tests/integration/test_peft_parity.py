"""PEFT-parity matrix: every generic check PEFT's LoRA passes must pass for rosa_peft too.

One table of (case, model factory, config kwargs) — tiny MLP, tiny Embedding model, tiny Llama, tiny
GPT-2 (Conv1D) — run in three rosa_peft flavours ("lora": r=8, density=0; "rosa": r=8 + masks;
"spa": r=0 + masks) times both implementations ("merged", "sp_add"), plus a "peft-lora" backend
that runs the same check with PEFT's own ``LoraConfig`` / ``get_peft_model`` as the reference.

Conventions assumed on the rosa_peft side (PEFT's, since the API is PEFT-shaped):
* adapter parameters/buffers have ``lora_`` or ``rosa_`` in their state_dict key, modules_to_save
  copies ``modules_to_save`` and the frozen original ``original_module``;
* ``model.rosa_layers()`` yields ``(name, layer)`` with the names ``set_masks`` takes, and a
  layer's mask shape is ``(layer.out_features, layer.in_features)`` (Embedding: the weight shape).
"""
from __future__ import annotations

import copy
import functools
import io
import os
import pickle

import pytest
import torch
from torch import nn

from conftest import make_tiny_llama

MERGE_ATOL = 1e-4  # fp32 merge/unmerge round trips
EXACT = dict(atol=1e-6, rtol=1e-6)  # "equal": same computation, maybe a different summation order


pytestmark = pytest.mark.usefixtures("one_thread")


# ==== base models ===================================================================================
class MLP(nn.Module):
    """PEFT's test MLP (test_custom_models.py shape): lin0 10->20, ReLU, dropout, lin1 20->2, LogSoftmax."""

    def __init__(self):
        super().__init__()
        self.lin0 = nn.Linear(10, 20)
        self.relu = nn.ReLU()
        self.drop = nn.Dropout(0.5)
        self.lin1 = nn.Linear(20, 2)
        self.sm = nn.LogSoftmax(dim=-1)

    def forward(self, X):
        return self.sm(self.lin1(self.drop(self.relu(self.lin0(X)))))


class EmbModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(100, 16)
        self.lin0 = nn.Linear(16, 8)

    def forward(self, input_ids):
        return self.lin0(self.emb(input_ids))


def _mlp():
    torch.manual_seed(0)
    return MLP()


def _emb():
    torch.manual_seed(0)
    return EmbModel()


def _gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=128, n_positions=64,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(cfg)


FACTORIES = {"mlp": _mlp, "emb": _emb, "llama": lambda: make_tiny_llama(seed=0), "gpt2": _gpt2}
LM_KINDS = ("llama", "gpt2")


@functools.lru_cache(maxsize=None)
def _pristine(kind: str) -> nn.Module:
    return FACTORIES[kind]().eval()


def make_base(kind: str, dtype=torch.float32) -> nn.Module:
    """A fresh copy of the (cached, never touched) base model."""
    return copy.deepcopy(_pristine(kind)).to(dtype).eval()


def pristine_state(kind: str) -> dict[str, torch.Tensor]:
    return _pristine(kind).state_dict()


# ==== the table ===================================================================================
CASES = [
    ("mlp-lin0", "mlp", dict(target_modules=["lin0"])),
    ("mlp-lin0+lin1", "mlp", dict(target_modules=["lin0", "lin1"])),
    ("mlp-lin0-save_lin1", "mlp", dict(target_modules=["lin0"], modules_to_save=["lin1"])),
    ("mlp-lin0-dropout-alpha4", "mlp", dict(target_modules=["lin0"], lora_dropout=0.1, lora_alpha=4)),
    ("llama-all_linear", "llama", dict(target_modules="all-linear")),
    ("llama-qv", "llama", dict(target_modules=["q_proj", "v_proj"])),
    ("llama-qv-layer0", "llama", dict(target_modules=["q_proj", "v_proj"], layers_to_transform=[0],
                                      layers_pattern="layers")),
    ("gpt2-c_attn", "gpt2", dict(target_modules=["c_attn"])),
    ("gpt2-c_attn+c_fc", "gpt2", dict(target_modules=["c_attn", "c_fc"])),
    ("emb", "emb", dict(target_modules=["emb"])),
    ("emb+lin0", "emb", dict(target_modules=["emb", "lin0"])),
]
PEFT_EXTRA = {"gpt2": dict(fan_in_fan_out=True)}  # PEFT needs to be told Conv1D stores W transposed
FLAVOURS = {"lora": dict(r=8, density=0.0), "rosa": dict(r=8, density=0.1), "spa": dict(r=0, density=0.1)}
VARIANTS = [("rosa", fl, impl) for fl in FLAVOURS for impl in ("merged", "sp_add")] + [("peft", "lora", None)]


class Setup:
    """One (case, backend, flavour, impl) cell: builds configs/models and runs them."""

    def __init__(self, case_name, kind, kw, backend, flavour, impl):
        self.case_name, self.kind, self.kw = case_name, kind, kw
        self.backend, self.flavour, self.impl = backend, flavour, impl
        self.r, self.density = FLAVOURS[flavour]["r"], FLAVOURS[flavour]["density"]

    def __repr__(self):
        return f"{self.case_name}-{self.variant}"

    @property
    def variant(self):
        return "peft-lora" if self.is_peft else f"{self.flavour}-{self.impl}"

    @property
    def is_peft(self):
        return self.backend == "peft"

    @property
    def lm(self):
        return self.kind in LM_KINDS

    # ---- building -------------------------------------------------------------------------------------
    def config(self, init=False):
        task_type = "CAUSAL_LM" if self.lm else None
        if self.is_peft:
            from peft import LoraConfig

            return LoraConfig(r=self.r, init_lora_weights=init, task_type=task_type,
                              **PEFT_EXTRA.get(self.kind, {}), **self.kw)
        from rosa_peft import RosaConfig

        return RosaConfig(r=self.r, density=self.density, init_lora_weights=init, impl=self.impl,
                          task_type=task_type, **self.kw)

    def config_class(self):
        if self.is_peft:
            from peft import LoraConfig

            return LoraConfig
        from rosa_peft import RosaConfig

        return RosaConfig

    def wrap(self, base=None, init=False, seed=0, dtype=torch.float32, masks=True):
        """Wrap a fresh base; ``init=False`` gives a non-identity adapter (B and S random)."""
        base = make_base(self.kind, dtype) if base is None else base
        torch.manual_seed(seed)
        if self.is_peft:
            from peft import get_peft_model

            model = get_peft_model(base, self.config(init))
        else:
            from rosa_peft import get_rosa_model

            model = get_rosa_model(base, self.config(init))
            if masks and self.density > 0:
                self.set_masks(model, "default", seed)
        return model.eval()

    def add(self, model, name="other", init=False, seed=1):
        torch.manual_seed(seed)
        model.add_adapter(name, self.config(init))
        if not self.is_peft and self.density > 0:
            self.set_masks(model, name, seed)

    def set_masks(self, model, adapter_name, seed):
        g = torch.Generator().manual_seed(1000 + seed)
        masks = {}
        for key, layer in model.rosa_layers():
            mask = torch.rand(layer.out_features, layer.in_features, generator=g) < self.density
            mask.view(-1)[0] = True  # never an empty mask, however small the layer
            masks[key] = mask
        torch.manual_seed(seed)  # init_lora_weights=False draws the initial S values
        model.set_masks(masks, adapter_name=adapter_name)

    def activate(self, model, names):
        if self.is_peft and isinstance(names, list):
            model.base_model.set_adapter(names)  # PeftModel.set_adapter takes one name only
        else:
            model.set_adapter(names)

    def from_pretrained(self, base, path, **kw):
        if self.is_peft:
            from peft import PeftModel

            return PeftModel.from_pretrained(base, str(path), **kw)
        from rosa_peft import RosaModel

        return RosaModel.from_pretrained(base, str(path), **kw)

    def get_state_dict(self, model, adapter_name="default"):
        if self.is_peft:
            from peft import get_peft_model_state_dict

            return get_peft_model_state_dict(model, adapter_name=adapter_name)
        import rosa_peft

        return rosa_peft.get_rosa_model_state_dict(model, adapter_name=adapter_name)

    def set_state_dict(self, model, sd, adapter_name="default"):
        if self.is_peft:
            from peft import set_peft_model_state_dict

            return set_peft_model_state_dict(model, sd, adapter_name=adapter_name)
        import rosa_peft

        return rosa_peft.set_rosa_model_state_dict(model, sd, adapter_name=adapter_name)

    # ---- running --------------------------------------------------------------------------------------
    def inputs(self, n=4, seed=0):
        g = torch.Generator().manual_seed(seed)
        if self.kind == "mlp":
            return torch.randn(n, 10, generator=g)
        if self.kind == "emb":
            return torch.randint(0, 100, (n, 5), generator=g)
        return torch.randint(0, 128, (n, 6), generator=g)

    def out(self, model, x, **kw):
        model.eval()  # compare in eval mode (PEFT leaves a newly added adapter's dropout in train mode)
        with torch.no_grad():
            if self.lm:
                return model(input_ids=x, **kw).logits
            return model(x, **kw)

    def loss(self, model, x):
        if self.lm:
            return model(input_ids=x, labels=x).loss
        return model(x).sum()

    def train(self, model, steps=3, lr=0.5):
        model.train()
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
        for step in range(steps):
            self.loss(model, self.inputs(seed=10 + step)).backward()
            opt.step()
            opt.zero_grad()
        model.eval()


def _params():
    out = []
    for case_name, kind, kw in CASES:
        for backend, flavour, impl in VARIANTS:
            s = Setup(case_name, kind, kw, backend, flavour, impl)
            marks = []
            if flavour == "spa" and kw.get("lora_dropout"):
                marks.append(pytest.mark.skip(reason="lora_dropout acts on the LoRA branch; r=0 has none"))
            out.append(pytest.param(s, id=f"{case_name}-{s.variant}", marks=marks))
    return out


matrix = pytest.mark.parametrize("s", _params())


# ==== helpers =======================================================================================
ADAPTER_KEY_PARTS = ("lora_", "rosa_", "modules_to_save")


def is_adapter_key(key: str) -> bool:
    return any(part in key for part in ADAPTER_KEY_PARTS)


def is_adapter_layer(module: nn.Module) -> bool:
    return hasattr(module, "base_layer") and (hasattr(module, "lora_A") or hasattr(module, "rosa_spa"))


def inner(model):
    """The wrapped user model (PEFT: ``model.base_model.model``); falls back to get_base_model()."""
    base_model = getattr(model, "base_model", None)
    if base_model is not None and isinstance(getattr(base_model, "model", None), nn.Module):
        return base_model.model
    return model.get_base_model()


def wrapped_names(model) -> list[str]:
    return [n for n, m in inner(model).named_modules() if is_adapter_layer(m)]


def close(a, b, atol=EXACT["atol"], rtol=EXACT["rtol"]):
    torch.testing.assert_close(a, b, atol=atol, rtol=rtol)


def differs(a, b, tol=1e-4) -> bool:
    return (a.float() - b.float()).abs().max().item() > tol


def base_key_for(key: str, base_keys) -> str | None:
    """Map a wrapped model's state_dict key to the base model's key (longest dotted-suffix match)."""
    k = key.replace(".base_layer", "").replace(".original_module", "")
    hits = [bk for bk in base_keys if k == bk or k.endswith("." + bk)]
    return max(hits, key=len) if hits else None


def assert_base_weights_pristine(sd: dict, kind: str, what: str):
    ref = pristine_state(kind)
    for key, value in sd.items():
        if is_adapter_key(key):
            continue
        bk = base_key_for(key, ref)
        assert bk is not None, f"{what}: state_dict key {key!r} is neither an adapter key nor a base weight"
        assert torch.equal(value, ref[bk]), f"{what}: base weight {key!r} differs from the pretrained {bk!r}"


def clone_sd(sd):
    return {k: v.detach().clone() for k, v in sd.items()}


def field_of(obj, name):
    return obj[name] if isinstance(obj, dict) else getattr(obj, name)


def base_output(s, x):
    return s.out(make_base(s.kind), x)


def has_modules_to_save(s):
    return bool(s.kw.get("modules_to_save"))


# ==== save / load ===================================================================================
@matrix
def test_save_load_roundtrip(s, tmp_path):
    model = s.wrap()
    x = s.inputs()
    expected = s.out(model, x)
    assert differs(expected, base_output(s, x)), "the test adapter must not be the identity"
    model.save_pretrained(str(tmp_path))
    files = set(os.listdir(tmp_path))
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md"} <= files
    assert not files & {"config.json", "model.safetensors", "pytorch_model.bin", "adapter_model.bin"}
    loaded = s.from_pretrained(make_base(s.kind), tmp_path)
    close(s.out(loaded, x), expected)
    assert not any(p.requires_grad for p in loaded.parameters()), "from_pretrained defaults to inference"


@matrix
def test_save_load_several_adapters(s, tmp_path):
    model = s.wrap()
    s.add(model)
    x = s.inputs()
    out_default = s.out(model, x)
    s.activate(model, "other")
    out_other = s.out(model, x)
    s.activate(model, "default")
    assert differs(out_default, out_other)
    model.save_pretrained(str(tmp_path), selected_adapters=["default", "other"])
    assert (tmp_path / "adapter_config.json").is_file()
    assert (tmp_path / "other" / "adapter_config.json").is_file()
    assert (tmp_path / "other" / "adapter_model.safetensors").is_file()
    loaded = s.from_pretrained(make_base(s.kind), tmp_path)
    loaded.load_adapter(str(tmp_path / "other"), adapter_name="other")
    close(s.out(loaded, x), out_default)
    s.activate(loaded, "other")
    close(s.out(loaded, x), out_other)
    only = tmp_path / "only_other"
    model.save_pretrained(str(only), selected_adapters=["other"])
    assert (only / "other" / "adapter_model.safetensors").is_file()
    assert not (only / "adapter_model.safetensors").exists()


# ==== merging =======================================================================================
@matrix
def test_merge_unmerge_and_unload(s):
    base = make_base(s.kind)
    model = s.wrap(base=base)
    x = s.inputs()
    expected = s.out(model, x)
    assert differs(expected, base_output(s, x))
    model.merge_adapter()
    close(s.out(model, x), expected, atol=MERGE_ATOL, rtol=0)
    model.unmerge_adapter()
    close(s.out(model, x), expected, atol=MERGE_ATOL, rtol=0)
    plain = model.merge_and_unload()
    assert type(plain) is type(base)
    assert not any(is_adapter_layer(m) for m in plain.modules())
    close(s.out(plain, x), expected, atol=MERGE_ATOL, rtol=0)


@matrix
def test_safe_merge(s):
    model = s.wrap()
    x = s.inputs()
    expected = s.out(model, x)
    model.merge_adapter(safe_merge=True)
    close(s.out(model, x), expected, atol=MERGE_ATOL, rtol=0)
    model.unmerge_adapter()
    plain = model.merge_and_unload(safe_merge=True)
    close(s.out(plain, x), expected, atol=MERGE_ATOL, rtol=0)


@matrix
def test_second_merge_warns(s):
    model = s.wrap()
    x = s.inputs()
    expected = s.out(model, x)
    model.merge_adapter()
    with pytest.warns(UserWarning):
        model.merge_adapter()
    close(s.out(model, x), expected, atol=MERGE_ATOL, rtol=0)  # not merged twice


# ==== training ======================================================================================
@matrix
def test_training_changes_only_adapter_params(s):
    model = s.wrap()
    sd0 = clone_sd(model.state_dict())
    assert_base_weights_pristine(sd0, s.kind, "before training")
    params0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    s.train(model)
    sd1 = model.state_dict()
    assert sd1.keys() == sd0.keys()
    assert_base_weights_pristine(sd1, s.kind, "after training")
    changed = [k for k in sd0 if not torch.equal(sd0[k], sd1[k])]
    assert changed, "training changed nothing"
    assert all(is_adapter_key(k) for k in changed), [k for k in changed if not is_adapter_key(k)]
    if s.is_peft or s.impl == "sp_add":  # the base Parameters themselves are never written
        for n, p in model.named_parameters():
            if not is_adapter_key(n):
                assert torch.equal(p.detach(), params0[n]), n


# ==== dtypes ========================================================================================
def _loose(ref):
    return 0.05 * (1.0 + ref.abs().max().item())


@matrix
def test_bf16_base_forward(s):
    ref = s.out(s.wrap(), s.inputs())
    model = s.wrap(dtype=torch.bfloat16)
    x = s.inputs()
    out = s.out(model, x.to(torch.bfloat16) if x.is_floating_point() else x)
    assert torch.isfinite(out).all()
    close(out.float(), ref, atol=_loose(ref), rtol=0)


@matrix
def test_autocast_bf16_forward(s):
    model = s.wrap()
    x = s.inputs()
    ref = s.out(model, x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = s.out(model, x)
    assert torch.isfinite(out).all()
    close(out.float(), ref, atol=_loose(ref), rtol=0)


# ==== enabling / disabling ==========================================================================
@matrix
def test_disable_adapter_context(s):
    model = s.wrap()
    x = s.inputs()
    adapted = s.out(model, x)
    base_out = base_output(s, x)
    with model.disable_adapter():
        close(s.out(model, x), base_out)
    close(s.out(model, x), adapted)
    with pytest.raises(RuntimeError, match="boom"):
        with model.disable_adapter():
            raise RuntimeError("boom")
    close(s.out(model, x), adapted)
    # PEFT semantics: a forward with adapters disabled while merged unmerges first
    model.merge_adapter()
    with model.disable_adapter():
        close(s.out(model, x), base_out, atol=MERGE_ATOL, rtol=0)
    close(s.out(model, x), adapted, atol=MERGE_ATOL, rtol=0)


@matrix
def test_enable_disable_adapter_layers(s):
    model = s.wrap()
    x = s.inputs()
    adapted = s.out(model, x)
    model.disable_adapter_layers()
    close(s.out(model, x), base_output(s, x))
    model.enable_adapter_layers()
    close(s.out(model, x), adapted)


# ==== several adapters ==============================================================================
@matrix
def test_adapter_switching(s):
    model = s.wrap()
    x = s.inputs()
    out_default = s.out(model, x)
    s.add(model, "other", seed=1)
    close(s.out(model, x), out_default)  # adding does not activate
    s.activate(model, "other")
    assert list(model.active_adapters) == ["other"]
    out_other = s.out(model, x)
    assert differs(out_other, out_default)
    s.activate(model, "default")
    close(s.out(model, x), out_default)


@matrix
def test_several_active_adapters(s):
    if has_modules_to_save(s):
        pytest.skip("PEFT: a modules_to_save wrapper holds one active adapter at a time")
    model = s.wrap()
    s.add(model)
    x = s.inputs()
    out_default = s.out(model, x)
    s.activate(model, "other")
    out_other = s.out(model, x)
    s.activate(model, ["default", "other"])
    assert sorted(model.active_adapters) == ["default", "other"]
    both = s.out(model, x)
    assert differs(both, out_default) and differs(both, out_other)
    model.merge_adapter(adapter_names=["default", "other"])  # W0 + delta_default + delta_other
    close(both, s.out(model, x), atol=MERGE_ATOL, rtol=0)


@matrix
def test_delete_inactive_and_active_adapter(s):
    model = s.wrap()
    x = s.inputs()
    out_default = s.out(model, x)
    s.add(model)
    model.delete_adapter("other")  # inactive
    assert list(model.peft_config) == ["default"]
    assert not any(".other" in k for k in model.state_dict())
    close(s.out(model, x), out_default)
    s.add(model, seed=2)
    s.activate(model, "other")
    model.delete_adapter("other")  # active: falls back to the remaining one
    assert list(model.active_adapters) == ["default"]
    close(s.out(model, x), out_default)


@matrix
def test_delete_merged_adapter(s):
    model = s.wrap()
    x = s.inputs()
    out_default = s.out(model, x)
    base_out = base_output(s, x)
    s.add(model)
    s.activate(model, "other")
    model.merge_adapter()
    try:
        model.delete_adapter("other")
    except ValueError as exc:  # PEFT refuses ("unmerge first") and changes nothing
        assert "merge" in str(exc).lower()
        model.unmerge_adapter()
        model.delete_adapter("other")
    assert list(model.peft_config) == ["default"]
    with model.disable_adapter():
        close(s.out(model, x), base_out, atol=1e-5, rtol=0)  # nothing of "other" stays baked in
    close(s.out(model, x), out_default, atol=1e-5, rtol=0)


@matrix
def test_add_weighted_adapter_cat(s):
    if has_modules_to_save(s):
        pytest.skip("PEFT refuses weighted adapters over modules_to_save")
    weights = (0.6, 1.5)

    def build():
        model = s.wrap()
        s.add(model)
        return model

    ref_sd = {k: v.clone() for k, v in pristine_state(s.kind).items()}
    for name, w in zip(("default", "other"), weights):
        model = build()
        s.activate(model, name)
        merged = model.merge_and_unload().state_dict()
        for k in ref_sd:
            ref_sd[k] += w * (merged[k] - pristine_state(s.kind)[k])
    ref = make_base(s.kind)
    ref.load_state_dict(ref_sd)
    model = build()
    model.add_weighted_adapter(["default", "other"], list(weights), "combo", combination_type="cat")
    s.activate(model, "combo")
    x = s.inputs()
    close(s.out(model, x), s.out(ref, x), atol=MERGE_ATOL, rtol=0)


@matrix
def test_mixed_batch(s):
    model = s.wrap()
    s.add(model)
    x = s.inputs(n=4)
    names = ["default", "other", "__base__", "default"]
    got = s.out(model, x, adapter_names=names)
    per = {"__base__": base_output(s, x)}
    for name in ("default", "other"):
        s.activate(model, name)
        per[name] = s.out(model, x)
    s.activate(model, "default")
    expected = torch.stack([per[name][i] for i, name in enumerate(names)])
    close(got, expected, atol=1e-5, rtol=1e-5)
    close(s.out(model, x), per["default"])  # nothing left switched after the mixed call


# ==== Llama-only: generate / gradient checkpointing ===================================================
GEN = dict(max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=0)


def _generate(model, ids, **kw):
    with torch.no_grad():
        return model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **GEN, **kw)


def _need_llama(s):
    if s.kind != "llama":
        pytest.skip("generate / gradient checkpointing checks run on the tiny Llama cases")


@matrix
def test_mixed_batch_generate(s):
    _need_llama(s)
    model = s.wrap()
    s.add(model)
    ids = s.inputs(n=3)[:, :5]
    names = ["default", "other", "__base__"]
    got = _generate(model, ids, adapter_names=names)
    for i, name in enumerate(names):
        if name == "__base__":
            with model.disable_adapter():
                ref = _generate(model, ids[i:i + 1])
        else:
            s.activate(model, name)
            ref = _generate(model, ids[i:i + 1])
        assert torch.equal(got[i], ref[0]), name


@matrix
def test_generate_equals_merged_generate(s):
    _need_llama(s)
    model = s.wrap()
    ids = s.inputs(n=2)[:, :5]
    before = _generate(model, ids)
    plain = model.merge_and_unload()
    assert torch.equal(_generate(plain, ids), before)


@matrix
def test_gradient_checkpointing(s):
    _need_llama(s)
    a, b = s.wrap(), s.wrap()
    if s.is_peft:
        b.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        b.gradient_checkpointing_enable()
    x = s.inputs(n=2)
    for m in (a, b):
        m.train()
        s.loss(m, x).backward()
    # (a 0-element parameter, e.g. the sparse values of a LoRA-only adapter, never gets a grad)
    ga = {n: p.grad for n, p in a.named_parameters() if p.requires_grad and p.numel()}
    gb = {n: p.grad for n, p in b.named_parameters() if p.requires_grad and p.numel()}
    assert ga.keys() == gb.keys() and ga
    for n in ga:
        assert gb[n] is not None, n
        close(gb[n], ga[n], atol=1e-6, rtol=1e-5)
    opt = torch.optim.SGD([p for p in b.parameters() if p.requires_grad], lr=0.5)
    opt.step()
    assert torch.isfinite(s.loss(b, x))


# ==== status / state dicts / serialisation ===========================================================
@matrix
def test_layer_and_model_status(s):
    model = s.wrap()
    s.add(model)
    layers = model.get_layer_status()
    assert layers
    for st in layers:
        assert field_of(st, "enabled") is True
        assert list(field_of(st, "active_adapters")) == ["default"]
        assert list(field_of(st, "merged_adapters")) == []
        assert sorted(field_of(st, "available_adapters")) == ["default", "other"]
    ms = model.get_model_status()
    assert field_of(ms, "enabled") is True
    assert list(field_of(ms, "active_adapters")) == ["default"]
    assert list(field_of(ms, "merged_adapters")) == []
    assert sorted(field_of(ms, "available_adapters")) == ["default", "other"]
    model.merge_adapter()
    merged = [list(field_of(st, "merged_adapters")) for st in model.get_layer_status()]
    assert merged.count(["default"]) == len(wrapped_names(model))
    assert all(m in ([], ["default"]) for m in merged)
    model.unmerge_adapter()
    model.disable_adapter_layers()
    assert not any(field_of(st, "enabled") for st in model.get_layer_status())
    assert field_of(model.get_model_status(), "enabled") is False
    model.enable_adapter_layers()
    assert field_of(model.get_model_status(), "enabled") is True


@matrix
def test_adapter_state_dict_roundtrip(s):
    model = s.wrap()
    x = s.inputs()
    expected = s.out(model, x)
    sd = s.get_state_dict(model, adapter_name="default")
    saved_modules = s.kw.get("modules_to_save") or []

    def belongs_to_adapter(key):  # PEFT names a modules_to_save copy after the module itself
        return is_adapter_key(key) or any(f".{m}." in f".{key}" for m in saved_modules)

    assert sd and all(belongs_to_adapter(k) for k in sd), [k for k in sd if not belongs_to_adapter(k)]
    fresh = s.wrap(seed=123, masks=False)
    assert differs(s.out(fresh, x), expected)
    s.set_state_dict(fresh, sd, adapter_name="default")
    close(s.out(fresh, x), expected)


@matrix
def test_pickle_and_torch_save(s):
    model = s.wrap()
    x = s.inputs()
    expected = s.out(model, x)
    close(s.out(pickle.loads(pickle.dumps(model)), x), expected)
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    close(s.out(torch.load(buf, weights_only=False), x), expected)


@matrix
def test_deepcopy(s):
    model = s.wrap()
    x = s.inputs()
    expected = s.out(model, x)
    twin = copy.deepcopy(model)
    close(s.out(twin, x), expected)
    s.train(twin, steps=1)
    assert differs(s.out(twin, x), expected, tol=1e-7)
    close(s.out(model, x), expected)  # the original shares nothing with the copy


@matrix
def test_base_model_model_is_the_wrapped_model(s):
    base = make_base(s.kind)
    model = s.wrap(base=base)
    assert model.base_model.model is base
    assert model.get_base_model() is base


# ==== modules_to_save / layers_to_transform =========================================================
@matrix
def test_modules_to_save(s, tmp_path):
    if not has_modules_to_save(s):
        pytest.skip("case has no modules_to_save")
    model = s.wrap()
    x = s.inputs()
    sd0 = clone_sd(model.state_dict())
    s.train(model)
    sd1 = model.state_dict()
    copies = [k for k in sd0 if "modules_to_save" in k]
    originals = [k for k in sd0 if "original_module" in k]
    assert copies and originals
    assert any(not torch.equal(sd0[k], sd1[k]) for k in copies), "the modules_to_save copy did not train"
    assert all(torch.equal(sd0[k], sd1[k]) for k in originals), "the original module changed"
    expected = s.out(model, x)
    with model.disable_adapter():
        close(s.out(model, x), base_output(s, x))
    model.save_pretrained(str(tmp_path))
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert any("lin1" in k for k in saved), sorted(saved)
    loaded = s.from_pretrained(make_base(s.kind), tmp_path)
    close(s.out(loaded, x), expected)


@matrix
def test_layers_to_transform(s):
    if "layers_to_transform" not in s.kw:
        pytest.skip("case has no layers_to_transform")
    model = s.wrap()
    names = wrapped_names(model)
    assert len(names) == 2 and all(".layers.0." in n for n in names), names


# ==== PEFT keywords ================================================================================
@matrix
def test_peft_keywords_accepted(s, tmp_path):
    model = s.wrap()
    x = s.inputs()
    expected = s.out(model, x)
    model.save_pretrained(str(tmp_path))
    cfg = s.config_class().from_pretrained(str(tmp_path))
    loaded = s.from_pretrained(make_base(s.kind), tmp_path, config=cfg, low_cpu_mem_usage=True)
    close(s.out(loaded, x), expected)
    loaded.load_adapter(str(tmp_path), adapter_name="again", is_trainable=True, low_cpu_mem_usage=False)
    s.activate(loaded, "again")
    close(s.out(loaded, x), expected)
    assert any(p.requires_grad for p in loaded.parameters())
    loaded.add_adapter("third", s.config(), low_cpu_mem_usage=False)
    assert "third" in loaded.peft_config


@matrix
def test_unsupported_keywords_raise(s, tmp_path):
    if s.is_peft:
        pytest.skip("PEFT supports these keywords (rosa_peft writes safetensors only)")
    model = s.wrap()
    with pytest.raises(ValueError, match="safe_serialization"):
        model.save_pretrained(str(tmp_path / "a"), safe_serialization=False)
    with pytest.raises((TypeError, ValueError), match="no_such_option"):
        model.save_pretrained(str(tmp_path / "b"), no_such_option=1)
    model.save_pretrained(str(tmp_path / "c"))
    with pytest.raises((TypeError, ValueError), match="no_such_option"):
        s.from_pretrained(make_base(s.kind), tmp_path / "c", no_such_option=1)


def _adapter_flags(model, adapter):
    """{parameter name: requires_grad} of one adapter's parameters (LoRA, sparse, modules_to_save copies)."""
    return {n: p.requires_grad for n, p in model.named_parameters() if is_adapter_key(n) and f".{adapter}." in f"{n}."}


@matrix
def test_set_requires_grad_and_adapter_properties(s):
    model = s.wrap()
    s.add(model)
    base = {n for n, p in model.named_parameters() if not is_adapter_key(n)}
    assert set(_adapter_flags(model, "default").values()) == {True}  # active: trainable
    assert set(_adapter_flags(model, "other").values()) == {False}
    model.set_requires_grad("other")
    assert set(_adapter_flags(model, "other").values()) == {True}
    assert set(_adapter_flags(model, "default").values()) == {True}
    model.set_requires_grad(["default", "other"], requires_grad=False)
    assert not any(p.requires_grad for _, p in model.named_parameters())
    model.set_requires_grad("default")
    assert set(_adapter_flags(model, "default").values()) == {True}
    assert not any(p.requires_grad for n, p in model.named_parameters() if n in base)

    assert model.has_active_enabled_adapter is True
    with model.disable_adapter():
        assert model.has_active_enabled_adapter is False
    assert model.has_active_enabled_adapter is True
    assert model.modules_to_save == ({"lin1"} if has_modules_to_save(s) else None)
    assert model.base_model_torch_dtype == getattr(inner(model), "dtype", None)


def test_set_requires_grad_names_an_unknown_adapter_and_set_masks_sets_the_flags_anew():
    from rosa_peft import RosaConfig, get_rosa_model

    model = get_rosa_model(make_tiny_llama(0), RosaConfig(r=2, density=0.05, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="unknown adapter 'nope'"):
        model.set_requires_grad(["default", "nope"])
    model.set_requires_grad("default", requires_grad=False)
    assert not any(p.requires_grad for _, p in model.named_parameters())
    masks = {k: torch.rand(l.out_features, l.in_features) < 0.05 for k, l in model.rosa_layers()}
    model.set_masks(masks)  # like set_adapter: the active adapter trainable again, its new sparse values too
    assert all(l.rosa_spa["default"].values.requires_grad and l.lora_A["default"].weight.requires_grad
               for _, l in model.rosa_layers())
    model.set_requires_grad("default", requires_grad=False)
    assert not any(l.rosa_spa["default"].values.requires_grad for _, l in model.rosa_layers())
