"""Loading an adapter refuses what does not describe this config's adapter on this base, and changes nothing.

Every corrupt case (table below) is one edit of a valid saved adapter (tiny Llama, r=2, density 0.05,
top-k masks, a modules_to_save copy of the norm); each must raise one ValueError whose message names the
file and the tensor key or layer, through every loading verb that reads that part, and leave the model
exactly as it was. Also: adapter_config.json without required keys, lora_alpha values, set_masks
refusals, and merge_and_unload of a 4-bit (bf16-compute) base made from an fp32 model.
"""
import copy
import json
import math
import os
import re
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import make_tiny_llama
from rosa_peft import RosaConfig, RosaModel, get_rosa_model, set_rosa_model_state_dict
from rosa_peft.layer import RosaLayer
from rosa_peft.masks import compute_masks
from rosa_peft.utils.checks import UserError

Q = "model.layers.0.self_attn.q_proj"
UP = "model.layers.1.mlp.up_proj"
NORM = "model.norm"
IDS = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))


def _adapter(seed=0, density=0.05, **kw):
    torch.manual_seed(seed)
    model = get_rosa_model(make_tiny_llama(), RosaConfig(r=2, density=density, init_lora_weights=False,
                                                         modules_to_save=[NORM], **kw))
    model.set_masks(compute_masks(model, None, criterion="random", seed=seed, progress=False))
    with torch.no_grad():
        for _, layer in model.rosa_layers():
            layer.rosa_spa["default"].values.normal_(0, 0.02)
    return model


@pytest.fixture(scope="module")
def protos():
    """(a named bare base, a RosaModel with another adapter on it): deep-copied per case (cheaper than building)."""
    base = make_tiny_llama()
    base.config._name_or_path = "/models/tiny-llama"
    model = _adapter(seed=1)
    model.model.config._name_or_path = "/models/tiny-llama"
    return base, model


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    path = tmp_path_factory.mktemp("valid") / "adapter"
    _adapter().save_pretrained(str(path))
    return path


def _copy(saved, tmp_path):
    target = tmp_path / "adapter"
    shutil.copytree(saved, target)
    return target


def _edit_tensors(fn):
    def apply(path):
        state = load_file(str(path / "adapter_model.safetensors"))
        fn(state)
        save_file(state, str(path / "adapter_model.safetensors"))
    return apply


def _edit_config(fn):
    def apply(path):
        data = json.loads((path / "adapter_config.json").read_text())
        fn(data)
        (path / "adapter_config.json").write_text(json.dumps(data))
    return apply


def _write_bytes(fn):
    def apply(path):
        f = path / "adapter_model.safetensors"
        f.write_bytes(fn(f.read_bytes()))
    return apply


def _set(key, value):
    def fn(state):
        t = state[key].clone()
        t.view(-1)[3] = value
        state[key] = t
    return fn


def _dup_col(state):
    offsets = state[f"{Q}.rosa_spa.row_offsets"].to(torch.int64)
    row = int(torch.nonzero(offsets.diff() >= 2)[0])
    cols = state[f"{Q}.rosa_spa.col_indices"].clone()
    cols[int(offsets[row]) + 1] = cols[int(offsets[row])]
    state[f"{Q}.rosa_spa.col_indices"] = cols


W = "adapter_model.safetensors"
C = "adapter_config.json"
# (id, edit, file named, regex the rest of the message must match, reaches the tensor-only verbs)
CASES = [
    ("nan-lora_A", _edit_tensors(_set(f"{Q}.lora_A.weight", float("nan"))), W, rf"'{Q}.lora_A.weight'.*nan", True),
    ("inf-lora_B", _edit_tensors(_set(f"{UP}.lora_B.weight", float("inf"))), W, rf"'{UP}.lora_B.weight'.*inf", True),
    ("nan-values", _edit_tensors(_set(f"{UP}.rosa_spa.values", float("-inf"))), W, rf"'{UP}.rosa_spa.values'.*inf", True),
    ("nan-modules_to_save", _edit_tensors(_set(f"{NORM}.modules_to_save.weight", float("nan"))), W,
     rf"'{NORM}.modules_to_save.weight'.*nan", True),
    ("missing-lora_B", _edit_tensors(lambda s: s.pop(f"{Q}.lora_B.weight")), W, rf"missing tensor '{Q}.lora_B.weight'", True),
    ("missing-lora_A", _edit_tensors(lambda s: s.pop(f"{Q}.lora_A.weight")), W, rf"missing tensor '{Q}.lora_A.weight'", True),
    ("values-without-row_offsets", _edit_tensors(lambda s: s.pop(f"{UP}.rosa_spa.row_offsets")), W,
     rf"missing tensor '{UP}.rosa_spa.row_offsets'", True),
    ("indices-without-values", _edit_tensors(lambda s: s.pop(f"{UP}.rosa_spa.values")), W,
     rf"missing tensor '{UP}.rosa_spa.values'", True),
    ("missing-modules_to_save", _edit_tensors(lambda s: s.pop(f"{NORM}.modules_to_save.weight")), W,
     rf"missing tensor '{NORM}.modules_to_save.weight'", True),
    ("extra-part", _edit_tensors(lambda s: s.update({f"{Q}.lora_C.weight": torch.zeros(2, 2)})), W,
     rf"unexpected tensor '{Q}.lora_C.weight'", True),
    ("extra-module", _edit_tensors(lambda s: s.update({"model.foo.lora_A.weight": torch.zeros(2, 32)})), W,
     r"unexpected tensor 'model.foo.lora_A.weight'", True),
    ("extra-modules_to_save", _edit_tensors(lambda s: s.update({"lm_head.modules_to_save.weight": torch.zeros(2)})),
     W, r"unexpected tensor 'lm_head.modules_to_save.weight'", True),
    ("shape-lora_A", _edit_tensors(lambda s: s.update({f"{Q}.lora_A.weight": torch.zeros(3, 32)})), W,
     rf"'{Q}.lora_A.weight' has shape \(3, 32\)", True),
    ("dtype-values", _edit_tensors(lambda s: s.update({f"{UP}.rosa_spa.values": s[f"{UP}.rosa_spa.values"].to(torch.int32)})),
     W, rf"'{UP}.rosa_spa.values' has dtype torch.int32", True),
    ("dtype-indices", _edit_tensors(lambda s: s.update({f"{UP}.rosa_spa.col_indices": s[f"{UP}.rosa_spa.col_indices"].float()})),
     W, rf"'{UP}.rosa_spa.col_indices' has dtype torch.float32", True),
    ("csr-offsets", _edit_tensors(lambda s: s[f"{Q}.rosa_spa.row_offsets"].__setitem__(-1, 0)), W,
     rf"layer '{Q}'.*row_offsets", True),
    ("csr-column-range", _edit_tensors(lambda s: s[f"{Q}.rosa_spa.col_indices"].__setitem__(0, 32)), W,
     rf"layer '{Q}'.*column 32", True),
    ("csr-duplicate", _edit_tensors(_dup_col), W, rf"layer '{Q}'.*repeats a column", True),
    ("nnz-over-density", _edit_config(lambda d: d.update(density=0.01)), W,
     r"more than the config's density allows.*layer 'model\.layers\.\d\.", False),
    ("density-0-with-sparse", _edit_config(lambda d: d.update(density_pattern={"up_proj": 0.0})), W,
     rf"sparse tensors for layer '{UP.replace('.1.', '.0.')}'.*density 0", False),
    ("rank-0-with-lora", _edit_config(lambda d: d.update(rank_pattern={"q_proj": 0})), W,
     rf"unexpected tensor '{Q}.lora_A.weight'.*rank 0", False),
    ("empty-file", _write_bytes(lambda b: b""), W, r"not a readable safetensors file", True),
    ("truncated-file", _write_bytes(lambda b: b[: len(b) // 2]), W, r"not a readable safetensors file", True),
    ("garbage-file", _write_bytes(lambda b: os.urandom(64)), W, r"not a readable safetensors file", True),
    ("no-lora_alpha", _edit_config(lambda d: d.pop("lora_alpha")), C, r"missing key 'lora_alpha'", False),
    ("no-density", _edit_config(lambda d: d.pop("density")), C, r"missing key 'density'", False),
    ("no-r", _edit_config(lambda d: d.pop("r")), C, r"missing key 'r'", False),
    ("lora_alpha-nan", lambda p: (p / C).write_text((p / C).read_text().replace('"lora_alpha": 16', '"lora_alpha": NaN')),
     C, r"lora_alpha must be a finite number > 0", False),
    ("lora_alpha-0", _edit_config(lambda d: d.update(lora_alpha=0)), C, r"lora_alpha", False),
    ("other-base-model", _edit_config(lambda d: d.update(base_model_name_or_path="org/another-model")), C,
     r"saved for base model 'org/another-model'.*'/models/tiny-llama'", False),
]


def _base():
    base = make_tiny_llama()
    base.config._name_or_path = "/models/tiny-llama"
    return base


def _snapshot(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _check(exc, path, fname, pattern):
    msg = str(exc.value)
    assert isinstance(exc.value, UserError), type(exc.value)  # `rosa`'s one-line error, not a traceback
    assert "\n" not in msg, msg
    assert msg.startswith(str(path / fname) + ": "), msg
    assert re.search(pattern, msg), msg


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_corrupt_adapter_is_refused_and_changes_nothing(case, saved, protos, tmp_path, one_thread):
    _, edit, fname, pattern, tensor_level = case
    path = _copy(saved, tmp_path)
    edit(path)
    # from_pretrained: the base model stays bare and unchanged
    base = copy.deepcopy(protos[0])
    before = _snapshot(base)
    with pytest.raises(ValueError) as exc:
        RosaModel.from_pretrained(base, str(path))
    _check(exc, path, fname, pattern)
    assert _same(before, _snapshot(base))
    assert not any(isinstance(m, RosaLayer) for m in base.modules())
    # load_adapter next to an existing adapter: nothing added, nothing changed
    model = copy.deepcopy(protos[1])
    before = _snapshot(model)
    with pytest.raises(ValueError) as exc:
        model.load_adapter(str(path), adapter_name="second")
    _check(exc, path, fname, pattern)
    assert list(model.peft_config) == ["default"] and _same(before, _snapshot(model))
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=IDS).logits).all()
    if not tensor_level:
        return
    # overwriting an existing adapter's tensors: refused before any change
    with pytest.raises(ValueError) as exc:
        model.load_adapter_weights(str(path))
    _check(exc, path, fname, pattern)
    assert _same(before, _snapshot(model))
    if fname == W and "file" not in case[0]:
        with pytest.raises(ValueError, match=pattern) as exc:
            set_rosa_model_state_dict(model, load_file(str(path / W)))
        assert str(exc.value).startswith("state_dict: ")
        assert _same(before, _snapshot(model))


def test_valid_adapter_loads_through_every_verb(saved):
    ref = _adapter()
    ref.eval()
    with torch.no_grad():
        want = ref(input_ids=IDS).logits
    loaded = RosaModel.from_pretrained(_base(), str(saved))  # tiny base with a name: the saved config has none
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=IDS).logits, want)
    other = _adapter(seed=1)
    other.load_adapter_weights(str(saved))
    other.eval()
    with torch.no_grad():
        assert torch.equal(other(input_ids=IDS).logits, want)


@pytest.mark.parametrize("saved_name, base_name, ok", [
    ("org/tiny-llama", "/models/tiny-llama", True),
    ("/home/me/models/tiny-llama/", "org/tiny-llama", True),
    ("org/tiny-llama", "/cache/hub/models--org--tiny-llama/snapshots/0123abcd", True),
    ("smollm2-135m", "/root/.cache/rosa_peft/smollm2-135m-instruct", True),
    ("HuggingFaceTB/SmolLM2-135M-Instruct", "/root/.cache/rosa_peft/smollm2-135m-instruct", True),
    ("org/tiny-llama", "org/tiny-llama-chat", False),
    ("org/llama-a", "/cache/hub/models--org--llama-b/snapshots/0123abcd", False),
])
def test_base_model_name_is_compared_leniently(saved, tmp_path, saved_name, base_name, ok):
    path = _copy(saved, tmp_path)
    _edit_config(lambda d: d.update(base_model_name_or_path=saved_name))(path)
    base = make_tiny_llama()
    base.config._name_or_path = base_name
    if ok:
        RosaModel.from_pretrained(base, str(path))
        return
    with pytest.raises(ValueError, match=re.escape(f"saved for base model {saved_name!r}, but the base model is "
                                                   f"{base_name!r}")):
        RosaModel.from_pretrained(base, str(path))
    # the documented way round: a config without a base name
    config = RosaConfig.from_pretrained(str(path))
    config.base_model_name_or_path = None
    RosaModel.from_pretrained(base, str(path), config=config)


def test_density_rounding_of_top_k_is_allowed(tmp_path):
    """ceil(d·numel) entries per layer load (top-k rounds to int(d·numel); a global budget may shift
    entries between layers but keeps the total)."""
    model = _adapter(density=0.05)
    masks = compute_masks(model, None, criterion="random", seed=3, budget="global", progress=False)
    model.set_masks(masks)
    model.save_pretrained(str(tmp_path))
    RosaModel.from_pretrained(make_tiny_llama(), str(tmp_path))
    per_layer = {n: l.rosa_spa["default"].nnz for n, l in model.rosa_layers()}
    assert sum(per_layer.values()) <= sum(math.ceil(0.05 * l.out_features * l.in_features)
                                          for _, l in model.rosa_layers())


def test_config_file_must_be_an_object(tmp_path):
    (tmp_path / C).write_text("[1, 2]")
    with pytest.raises(ValueError, match=re.escape(f"{tmp_path / C}: must hold a JSON object")):
        RosaConfig.from_pretrained(str(tmp_path))


@pytest.mark.parametrize("alpha", [0, -1.0, float("nan"), float("inf"), True, "16"])
def test_lora_alpha_must_be_finite_positive(alpha):
    with pytest.raises(ValueError, match="lora_alpha must be a finite number > 0"):
        RosaConfig(lora_alpha=alpha)


def test_from_dict_without_a_file_keeps_defaults():
    assert RosaConfig.from_dict({"r": 4}).lora_alpha == RosaConfig().lora_alpha


# ---- set_masks ------------------------------------------------------------------------------------------
def test_set_masks_refuses_full_and_all_empty_masks():
    model = get_rosa_model(make_tiny_llama(), RosaConfig(r=2, density=0.05))
    shapes = {n: (l.out_features, l.in_features) for n, l in model.rosa_layers()}
    full = {n: torch.zeros(s, dtype=torch.bool) for n, s in shapes.items()}
    full[UP] = torch.ones(shapes[UP], dtype=torch.bool)
    with pytest.raises(ValueError, match=rf"mask for '{UP}' selects all 2048 entries.*density must be < 1"):
        model.set_masks(full)
    with pytest.raises(ValueError, match=r"masks select no entry in any layer .*'model\.layers\.0\.self_attn\.q_proj'"):
        model.set_masks({n: torch.zeros(s, dtype=torch.bool) for n, s in shapes.items()})
    assert model.get_masks() == {}
    # an empty mask in some layers is fine (per-layer top-k of a tiny layer can be 0)
    ok = {n: torch.zeros(s, dtype=torch.bool) for n, s in shapes.items()}
    ok[UP][0, 0] = True
    model.set_masks(ok)
    assert list(model.get_masks()) == [UP]
    with pytest.raises(ValueError, match="unknown adapter 'nope'"):
        model.set_masks(ok, adapter_name="nope")


# ---- merge_and_unload of a 4-bit base ---------------------------------------------------------------------
def test_merge_and_unload_of_nf4_base_from_fp32_runs_in_fp32():
    quant = pytest.importorskip("rosa_peft.quant")
    if not quant.backend_available("torchao"):
        pytest.skip("torchao not installed")
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                        tie_word_embeddings=False)).float().eval()
    quant.quantize_model(base, backend="torchao")  # default compute dtype bf16, the rest of the model fp32
    model = get_rosa_model(base, RosaConfig(r=4, density=0.05, init_lora_weights=False))
    model.set_masks(compute_masks(model, None, criterion="random", progress=False))
    model.eval()
    with torch.no_grad():
        want = model(input_ids=IDS).logits
        merged = model.merge_and_unload()
        got = merged(input_ids=IDS).logits
    down = merged.model.layers[0].mlp.down_proj
    assert type(down) is torch.nn.Linear and down.weight.dtype == torch.float32
    assert got.dtype == torch.float32
    # the unmerged path ran its GEMMs in bf16: agreement to bf16 rounding
    assert (got - want).abs().max() <= 0.05 * want.abs().max(), (got - want).abs().max()


@pytest.mark.parametrize("config_density", [0.0, 0.01])
def test_masks_denser_than_the_config_save_and_reload(tmp_path, config_density):
    """Masks installed with another density than the config's (e.g. compute_masks(density=...)) are
    recorded in the saved config's density_pattern, so the saved adapter loads and matches."""
    from conftest import make_tiny_llama
    from rosa_peft import RosaConfig, RosaModel, get_rosa_model

    model = get_rosa_model(make_tiny_llama(), RosaConfig(r=2, density=config_density, init_lora_weights=False))
    g = torch.Generator().manual_seed(0)
    model.set_masks({n: torch.rand(l.out_features, l.in_features, generator=g) < 0.1 for n, l in model.rosa_layers()})
    with torch.no_grad():
        for _, layer in model.rosa_layers():
            layer.rosa_spa["default"].values.normal_(0, 0.1, generator=g)
    ids = torch.randint(0, 128, (2, 6), generator=g)
    model.eval()
    with torch.no_grad():
        want = model(input_ids=ids).logits
    model.save_pretrained(tmp_path)
    assert model.peft_config["default"].density_pattern == {}  # the in-memory config is left alone
    loaded = RosaModel.from_pretrained(make_tiny_llama(), tmp_path)
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, want)
