"""Optimizers and other ways of writing adapter values: what the model computes always matches its state.

For both implementations on a tiny fp32 Llama with RoSA masks (r=4, density 0.1):
* after 3 steps of each optimizer (fused / foreach / for-loop AdamW, SGD with momentum, transformers'
  Adafactor, bitsandbytes' AdamW8bit) the in-memory logits equal those of the saved-and-reloaded adapter,
  and ``model.state_dict()`` shows the pretrained base weights bit for bit at every step;
* the same through a plain ``transformers.Trainer``;
* writes through ``param.data``, ``torch.no_grad()`` in-place ops and ``load_state_dict`` reach the next
  forward (checked against a dense float64 reference), and ``merge_and_unload()`` right after
  ``optimizer.step()`` merges the current S.
"""
from __future__ import annotations

import pytest
import torch

from conftest import make_tiny_llama
from rosa_peft import RosaConfig, RosaModel, get_rosa_model

IMPLS = ["merged", "sp_add"]
STEPS = 3
RELOAD_ATOL = 1e-5
MERGE_ATOL = 1e-4


pytestmark = pytest.mark.usefixtures("one_thread")


def _pristine():
    return make_tiny_llama(seed=0)


PRISTINE_SD = None


def pristine_sd() -> dict[str, torch.Tensor]:
    global PRISTINE_SD
    if PRISTINE_SD is None:
        PRISTINE_SD = {k: v.clone() for k, v in _pristine().state_dict().items()}
    return PRISTINE_SD


def make_model(impl: str, seed: int = 0) -> RosaModel:
    cfg = RosaConfig(r=4, density=0.1, target_modules="all-linear", impl=impl)
    torch.manual_seed(seed)
    model = get_rosa_model(make_tiny_llama(seed=0), cfg)
    g = torch.Generator().manual_seed(100 + seed)
    masks = {}
    for name, layer in model.rosa_layers():
        mask = torch.rand(layer.out_features, layer.in_features, generator=g) < 0.1
        mask.view(-1)[0] = True
        masks[name] = mask
    model.set_masks(masks)
    return model


def ids(batch=2, seq=8, seed=0):
    return torch.randint(0, 128, (batch, seq), generator=torch.Generator().manual_seed(seed))


def logits(model, x=None):
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids(seed=99) if x is None else x).logits


def train_step(model, opt, step):
    model.train()
    x = ids(seed=step)
    model(input_ids=x, labels=x).loss.backward()
    opt.step()
    opt.zero_grad()


def _pristine_key(key: str, ref) -> str:
    k = key.replace(".base_layer", "")
    hits = [bk for bk in ref if k == bk or k.endswith("." + bk)]
    assert hits, f"state_dict key {key!r} matches no pretrained weight"
    return max(hits, key=len)


def assert_state_dict_base_pristine(model, when: str):
    ref = pristine_sd()
    sd = model.state_dict()
    keys = [k for k in sd if "base_layer.weight" in k]
    assert len(keys) == 2 * 7, keys
    for key in keys:
        assert torch.equal(sd[key], ref[_pristine_key(key, ref)]), f"{when}: {key} is not the pretrained weight"


def reloaded_logits(model, tmp_path, x=None):
    model.save_pretrained(str(tmp_path))
    loaded = RosaModel.from_pretrained(make_tiny_llama(seed=0), str(tmp_path))
    return logits(loaded, x)


def dense_reference_logits(model, base_sd=None, x=None):
    """float64 Llama whose targeted weights are W0 + S + s·B·A, read off the adapter's current tensors."""
    ref = make_tiny_llama(seed=0)
    if base_sd is not None:
        ref.load_state_dict(base_sd)
    ref = ref.double().eval()
    name = "default"
    with torch.no_grad():
        for key, layer in model.rosa_layers():
            w = ref.get_submodule(key).weight
            sp = layer.rosa_spa[name]
            s_dense = torch.zeros_like(w)
            s_dense[sp.to_mask()] = sp.values.detach().double()  # CSR order is row-major, as boolean indexing
            a = layer.lora_A[name].weight.detach().double()
            b = layer.lora_B[name].weight.detach().double()
            w.add_(s_dense).add_(b @ a, alpha=layer.scaling[name])
        return ref(input_ids=ids(seed=99) if x is None else x).logits.float()


# ==== optimizers ====================================================================================
def _adamw(**kw):
    return lambda params: torch.optim.AdamW(params, lr=1e-2, **kw)


def _adafactor(params):
    from transformers.optimization import Adafactor

    return Adafactor(params, scale_parameter=False, relative_step=False, lr=1e-3)


def _adamw8bit(params):
    try:
        import bitsandbytes as bnb
    except Exception as exc:  # noqa: BLE001 - any import failure means "not available here"
        pytest.skip(f"bitsandbytes not importable: {exc}")
    try:  # probe: the CPU 8-bit optimizer needs a CPU build with the 8-bit kernels
        probe = torch.nn.Parameter(torch.randn(4096))
        probe.grad = torch.randn(4096)
        bnb.optim.AdamW8bit([probe], lr=1e-3).step()
    except Exception as exc:  # noqa: BLE001
        pytest.skip(f"bitsandbytes' CPU AdamW8bit is unavailable: {type(exc).__name__}: {exc}")
    return bnb.optim.AdamW8bit(params, lr=1e-2)


OPTIMIZERS = {
    "adamw-fused": _adamw(fused=True),
    "adamw-foreach": _adamw(foreach=True),
    "adamw-forloop": _adamw(foreach=False),
    "sgd-momentum": lambda params: torch.optim.SGD(params, lr=0.1, momentum=0.9),
    "adafactor": _adafactor,
    "adamw8bit-bnb": _adamw8bit,
}


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
def test_optimizer_steps_match_reloaded_adapter(opt_name, impl, tmp_path):
    model = make_model(impl)
    values0 = {k: l.rosa_spa["default"].values.detach().clone() for k, l in model.rosa_layers()}
    opt = OPTIMIZERS[opt_name]([p for p in model.parameters() if p.requires_grad])
    assert_state_dict_base_pristine(model, "before training")
    for step in range(STEPS):
        train_step(model, opt, step)
        assert_state_dict_base_pristine(model, f"right after step {step}")  # no forward in between
        logits(model)
        assert_state_dict_base_pristine(model, f"after the forward following step {step}")
    assert any(not torch.equal(l.rosa_spa["default"].values, values0[k]) for k, l in model.rosa_layers()), \
        "the optimizer did not move S"
    got = logits(model)
    torch.testing.assert_close(got, reloaded_logits(model, tmp_path), atol=RELOAD_ATOL, rtol=0)
    torch.testing.assert_close(got, dense_reference_logits(model), atol=RELOAD_ATOL, rtol=0)


@pytest.mark.parametrize("impl", IMPLS)
def test_trainer_matches_reloaded_adapter(impl, tmp_path):
    from transformers import Trainer, TrainerCallback, TrainingArguments

    model = make_model(impl)
    values0 = {k: l.rosa_spa["default"].values.detach().clone() for k, l in model.rosa_layers()}
    data = [{"input_ids": ids(1, 8, seed=i)[0], "labels": ids(1, 8, seed=i)[0]} for i in range(8)]
    seen = []

    class CheckBase(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            assert_state_dict_base_pristine(model, f"trainer step {state.global_step}")
            seen.append(state.global_step)

    args = TrainingArguments(output_dir=str(tmp_path / "out"), max_steps=3, per_device_train_batch_size=2,
                             report_to=[], save_strategy="no", use_cpu=True)
    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[CheckBase()])
    trainer.train()
    assert seen == [1, 2, 3]
    assert any(not torch.equal(l.rosa_spa["default"].values, values0[k]) for k, l in model.rosa_layers())
    assert_state_dict_base_pristine(model, "after trainer.train()")
    got = logits(model)
    torch.testing.assert_close(got, reloaded_logits(model, tmp_path / "adapter"), atol=RELOAD_ATOL, rtol=0)


# ==== other writers ===================================================================================
def _first(model):
    key, layer = next(iter(model.rosa_layers()))
    return key, layer


def _edit_data_inplace(model):
    _, layer = _first(model)
    layer.rosa_spa["default"].values.data.add_(0.5)  # bypasses the Parameter's version counter
    layer.lora_B["default"].weight.data.add_(0.1)


def _edit_data_assign(model):
    _, layer = _first(model)
    v = layer.rosa_spa["default"].values
    v.data = torch.full_like(v.data, 0.25)  # a fresh storage behind the same Parameter


def _edit_no_grad(model):
    with torch.no_grad():
        for _, layer in model.rosa_layers():
            layer.rosa_spa["default"].values.add_(1.0)


EDITS = {"param.data-inplace": _edit_data_inplace, "param.data-assign": _edit_data_assign,
         "no_grad-add_": _edit_no_grad}


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("edit", list(EDITS))
def test_value_edits_reach_next_forward(edit, impl):
    model = make_model(impl)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    train_step(model, opt, 0)
    before = logits(model)  # the merged implementation has synced S into the base weight now
    EDITS[edit](model)
    after = logits(model)
    assert (after - before).abs().max() > 1e-3, "the edit did not change the output"
    torch.testing.assert_close(after, dense_reference_logits(model), atol=RELOAD_ATOL, rtol=0)
    assert_state_dict_base_pristine(model, f"after {edit}")


@pytest.mark.parametrize("impl", IMPLS)
def test_load_state_dict_reaches_next_forward(impl):
    model = make_model(impl)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    train_step(model, opt, 0)
    logits(model)
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    values_keys = [k for k in sd if k.endswith("rosa_spa.default.values")]
    base_keys = [k for k in sd if k.endswith("base_layer.weight")]
    assert values_keys and base_keys
    for k in values_keys:
        sd[k] += 0.3
    new_base = {k: v.clone() for k, v in pristine_sd().items()}
    bumped = base_keys[0]  # loading a new W0 for one layer must reach the forward as well
    sd[bumped] += 0.01
    new_base[_pristine_key(bumped, new_base)] += 0.01
    model.load_state_dict(sd)
    for name, layer in model.rosa_layers():
        (k,) = [k for k in values_keys if k.endswith(f"{name}.rosa_spa.default.values")]
        assert torch.equal(layer.rosa_spa["default"].values.detach(), sd[k]), k
    got = logits(model)
    torch.testing.assert_close(got, dense_reference_logits(model, base_sd=new_base), atol=RELOAD_ATOL, rtol=0)
    sd_back = model.state_dict()
    assert torch.equal(sd_back[bumped], sd[bumped]), "state_dict must show the newly loaded W0"


@pytest.mark.parametrize("impl", IMPLS)
def test_merge_and_unload_right_after_step(impl, tmp_path):
    model = make_model(impl)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for step in range(STEPS):
        train_step(model, opt, step)  # no forward after the last step: S is not synced yet
    ref = reloaded_logits(model, tmp_path)
    torch.testing.assert_close(ref, dense_reference_logits(model), atol=RELOAD_ATOL, rtol=0)
    plain = model.merge_and_unload()
    torch.testing.assert_close(logits(plain), ref, atol=MERGE_ATOL, rtol=0)
