"""rosa_peft.reference_format: peft-rosa adapter directories <-> ours, checked against a re-statement of the
reference's on-disk format and its layer math (dense float64 W + S + s·B·A on a tiny Llama).

The "RE-STATEMENT" section below writes and reads the reference's files the way docs/migration.md describes
them (keys, dtypes, config fields, the per-layer pattern rule, ``nnz = int(d·out·in)``). It is written
independently of the module under test, so a wrong assumption in one shows up as a failing comparison.
"""
from __future__ import annotations

import json
import os
import re

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import make_tiny_llama
from rosa_peft import RosaConfig, RosaModel, compute_masks, get_rosa_model
from rosa_peft.reference_format import convert_reference_to_rosa, convert_rosa_to_reference
from rosa_peft.utils.checks import UserError

# ==== RE-STATEMENT of the peft-rosa (reference) on-disk format =========================================
PREFIX = "base_model.model."  # PEFT's PeftModel state-dict prefix; the adapter name ("default") is stripped


def ref_settings(cfg: dict, name: str):
    """The reference's (r, d, alpha) of a layer: the first key of rank/density/alpha patterns matching
    ``.*\\.{key}$`` selects the entry in every pattern."""
    pats = [cfg.get("rank_pattern") or {}, cfg.get("density_pattern") or {}, cfg.get("alpha_pattern") or {}]
    keys = [k for p in pats for k in p]
    key = next((k for k in keys if re.match(rf".*\.{k}$", name)), name)
    return pats[0].get(key, cfg["r"]), pats[1].get(key, cfg["d"]), pats[2].get(key, cfg["lora_alpha"])


def ref_config(**over) -> dict:
    cfg = {"peft_type": "ROSA", "auto_mapping": None, "base_model_name_or_path": None, "revision": None,
           "task_type": "CAUSAL_LM", "inference_mode": True, "r": 4, "d": 0.05, "lora_alpha": 8,
           "lora_dropout": 0.05, "impl": "auto", "spa_store_transpose": True, "spa_num_grads": 1,
           "grad_acc_mode": "mean_squared", "mask_load_path": None, "mask_save_path": None, "rosa_dtype": "bf16",
           "terminate_after_mask_generation": False, "schedule": "wl64", "fan_in_fan_out": False, "bias": "none",
           "use_rslora": False, "modules_to_save": None, "init_lora_weights": True, "layers_to_transform": None,
           "layers_pattern": None, "rank_pattern": {}, "density_pattern": {}, "alpha_pattern": {},
           "megatron_config": None, "megatron_core": "megatron.core", "loftq_config": {},
           "target_modules": []}
    cfg.update(over)
    return cfg


def ref_csr(mask: torch.Tensor):
    """The reference's SparseLinear.set_mask: row_offs int32, col_idx int16, row_idx = argsort(-nnz per row)."""
    rows, cols = mask.nonzero(as_tuple=True)
    row_offs = torch.zeros(mask.shape[0] + 1, dtype=torch.int64)
    row_offs[1:] = torch.cumsum(torch.bincount(rows, minlength=mask.shape[0]), 0)
    return row_offs.to(torch.int32), cols.to(torch.int16), torch.argsort(-row_offs.diff()).to(torch.int16)


def write_reference_dir(path, base, cfg: dict, seed=0, dtype=torch.bfloat16, masks="file"):
    """A peft-rosa adapter directory for ``base`` with random adapters: returns {layer: float64 delta}."""
    g = torch.Generator().manual_seed(seed)
    os.makedirs(path)
    tensors, mask_of, deltas = {}, {}, {}
    for name in cfg["target_modules"]:
        lin = base.get_submodule(name)
        out_f, in_f = lin.weight.shape
        r, d, alpha = ref_settings(cfg, name)
        delta = torch.zeros(out_f, in_f, dtype=torch.float64)
        if r > 0:
            a = (torch.randn(r, in_f, generator=g) * 0.3).to(dtype)
            b = (torch.randn(out_f, r, generator=g) * 0.3).to(dtype)
            tensors[f"{PREFIX}{name}.rosa_A.weight"], tensors[f"{PREFIX}{name}.rosa_B.weight"] = a, b
            delta += alpha / r * (b.double() @ a.double())
        if d > 0:
            nnz = int(d * out_f * in_f)
            idx = torch.randperm(out_f * in_f, generator=g)[:nnz]
            mask = torch.zeros(out_f * in_f, dtype=torch.bool)
            mask[idx] = True
            mask = mask.view(out_f, in_f)
            row_offs, col_idx, row_idx = ref_csr(mask)
            values = (torch.randn(nnz, generator=g) * 0.5).to(dtype)
            key = f"{PREFIX}{name}.rosa_spa."
            tensors.update({key + "values": values, key + "row_offs": row_offs, key + "col_idx": col_idx,
                            key + "row_idx": row_idx})
            delta += torch.sparse_csr_tensor(row_offs.long(), col_idx.long(), values.double(), (out_f, in_f)).to_dense()
            mask_of["model." + name] = mask  # named after the tuner's modules (its .model is the HF model)
        deltas[name] = delta
    save_file(tensors, os.path.join(path, "adapter_model.safetensors"))
    with open(os.path.join(path, "adapter_config.json"), "w") as fh:
        json.dump(cfg, fh, indent=2)
    if masks == "file":  # the scheduler's torch.save({name: bool mask})
        torch.save(mask_of, os.path.join(path, "masks.pt"))
    elif masks == "dir":  # the later layout: one <name>.mask file each holding {"name", "mask"}
        os.makedirs(os.path.join(path, "masks"))
        for name, mask in mask_of.items():
            torch.save({"name": name, "mask": mask}, os.path.join(path, "masks", name + ".mask"))
    return deltas


def read_reference_deltas(path, base) -> dict:
    """What the reference computes from a directory: checks the allocation (shapes, dtypes, nnz = int(d·numel))
    and returns {layer: float64 s·B·A + S}."""
    cfg = json.load(open(os.path.join(path, "adapter_config.json")))
    tensors = load_file(os.path.join(path, "adapter_model.safetensors"))
    seen, deltas = set(), {}
    for name in cfg["target_modules"]:
        out_f, in_f = base.get_submodule(name).weight.shape
        r, d, alpha = ref_settings(cfg, name)
        delta = torch.zeros(out_f, in_f, dtype=torch.float64)
        key = PREFIX + name
        if r > 0:
            a, b = tensors[key + ".rosa_A.weight"], tensors[key + ".rosa_B.weight"]
            assert a.shape == (r, in_f) and b.shape == (out_f, r)
            scale = alpha / (r ** 0.5 if cfg["use_rslora"] else r)
            delta += scale * (b.double() @ a.double())
            seen |= {key + ".rosa_A.weight", key + ".rosa_B.weight"}
        if d > 0:
            sp = {p: tensors[f"{key}.rosa_spa.{p}"] for p in ("values", "row_offs", "col_idx", "row_idx")}
            assert sp["values"].numel() == int(d * out_f * in_f), name
            assert sp["row_offs"].dtype == torch.int32 and sp["row_offs"].shape == (out_f + 1,)
            assert sp["col_idx"].dtype == torch.int16 and sp["row_idx"].dtype == torch.int16
            assert sorted(sp["row_idx"].tolist()) == list(range(out_f))
            assert bool((sp["row_offs"].diff()[sp["row_idx"].long()].diff() <= 0).all())  # rows by descending nnz
            delta += torch.sparse_csr_tensor(sp["row_offs"].long(), sp["col_idx"].long(), sp["values"].double(),
                                             (out_f, in_f)).to_dense()
            seen |= {f"{key}.rosa_spa.{p}" for p in sp}
        deltas[name] = delta
    assert seen == set(tensors), sorted(set(tensors) - seen)
    return deltas
# ==== end of the re-statement ===========================================================================


L0, L1 = "model.layers.0.", "model.layers.1."
TARGETS = [L0 + "self_attn.q_proj", L0 + "self_attn.v_proj", L0 + "mlp.up_proj", L0 + "mlp.down_proj",
           L1 + "self_attn.q_proj", L1 + "self_attn.v_proj", L1 + "mlp.up_proj", L1 + "mlp.down_proj"]


def mixed_config(**over):
    """Per-layer overrides of every kind: an SpA-only layer (r 0), a LoRA-only one (d 0), another rank and
    density, and an alpha_pattern (which our config folds into B)."""
    return ref_config(target_modules=TARGETS,
                      rank_pattern={r"layers\.1\.self_attn\.v_proj": 0, r"layers\.0\.mlp\.up_proj": 2},
                      density_pattern={r"layers\.1\.self_attn\.v_proj": 0.1, r"layers\.1\.mlp\.down_proj": 0.0,
                                       r"layers\.0\.mlp\.up_proj": 0.08},
                      alpha_pattern={r"layers\.0\.mlp\.up_proj": 32}, **over)


def _check_outputs(model: RosaModel, base, deltas: dict):
    for name, delta in deltas.items():
        layer = model.model.get_submodule(name)
        w = base.get_submodule(name).weight.detach().double()
        xin = torch.randn(4, w.shape[1], generator=torch.Generator().manual_seed(2))
        expected = xin.double() @ (w + delta).T
        got = layer(xin).double()
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5, msg=name)
    merged = make_tiny_llama()
    with torch.no_grad():
        for name, delta in deltas.items():
            merged.get_submodule(name).weight += delta.float()
    ids = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(model(input_ids=ids).logits, merged(input_ids=ids).logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("masks", ["file", "dir", None])
def test_reference_to_rosa_computes_the_reference_layers(tmp_path, masks):
    ref_dir, out = tmp_path / "ref", tmp_path / "ours"
    deltas = write_reference_dir(ref_dir, make_tiny_llama(), mixed_config(), masks=masks)
    mask_arg = {"file": ref_dir / "masks.pt", "dir": ref_dir / "masks", None: None}[masks]
    if masks is None:  # the SpA-only layer's column count is not in the adapter file
        with pytest.raises(UserError, match=r"layers\.1\.self_attn\.v_proj.*rank 0.*--masks"):
            convert_reference_to_rosa(str(ref_dir), str(out))
        assert not out.exists()
        convert_reference_to_rosa(str(ref_dir), str(out), base_model=make_tiny_llama())
    else:
        convert_reference_to_rosa(str(ref_dir), str(out), masks=str(mask_arg))
    model = RosaModel.from_pretrained(make_tiny_llama(), str(out))
    _check_outputs(model, make_tiny_llama(), deltas)
    config = RosaConfig.from_pretrained(str(out))
    assert config.rank_for(L1 + "self_attn.v_proj") == 0 and config.rank_for(L0 + "mlp.up_proj") == 2
    assert model.get_masks()[L1 + "self_attn.v_proj"].sum() == int(0.1 * 16 * 32)  # v_proj: (16, 32)
    assert L1 + "mlp.down_proj" not in model.get_masks()


def test_rosa_to_reference_round_trips(tmp_path):
    # ours -> reference -> ours: the same tensors, and the reference's own rules allocate what was written
    torch.manual_seed(0)
    model = get_rosa_model(make_tiny_llama(), RosaConfig(r=2, density=0.05, init_lora_weights=False,
                                                         target_modules=["q_proj", "v_proj", "down_proj"],
                                                         rank_pattern={"down_proj": 3}))
    model.set_masks(compute_masks(model, None, criterion="random", seed=0, progress=False))
    with torch.no_grad():
        for _, layer in model.rosa_layers():
            layer.rosa_spa["default"].values.normal_(0, 0.1)
    ours, ref, back = tmp_path / "ours", tmp_path / "ref", tmp_path / "back"
    model.save_pretrained(str(ours))
    written = convert_rosa_to_reference(str(ours), str(ref), write_masks=True)
    assert written["rosa_dtype"] == "fp32"
    base = make_tiny_llama()
    deltas = read_reference_deltas(ref, base)
    masks = torch.load(ref / "masks.pt", weights_only=True)
    assert {k[len("model."):] for k in masks} == set(model.get_masks())
    for name, mask in model.get_masks().items():
        assert torch.equal(masks["model." + name], mask)
    _check_outputs(model, base, deltas)
    convert_reference_to_rosa(str(ref), str(back), masks=str(ref / "masks.pt"))
    a, b = load_file(ours / "adapter_model.safetensors"), load_file(back / "adapter_model.safetensors")
    assert sorted(a) == sorted(b)
    for key in a:
        assert torch.equal(a[key].to(b[key].dtype), b[key]), key
    _check_outputs(RosaModel.from_pretrained(make_tiny_llama(), str(back)), base, deltas)


def test_reference_to_rosa_to_reference_keeps_the_reference_math(tmp_path):
    ref, ours, back = tmp_path / "ref", tmp_path / "ours", tmp_path / "back"
    base = make_tiny_llama()
    deltas = write_reference_dir(ref, base, mixed_config(), masks="file")
    convert_reference_to_rosa(str(ref), str(ours), masks=str(ref / "masks.pt"))
    convert_rosa_to_reference(str(ours), str(back), rosa_dtype="bf16", base_model=base)
    again = read_reference_deltas(back, base)
    for name in deltas:
        torch.testing.assert_close(again[name], deltas[name], rtol=0, atol=0, msg=name)  # x4 folds are exact
    first, second = load_file(ref / "adapter_model.safetensors"), load_file(back / "adapter_model.safetensors")
    for key in first:
        if "rosa_spa" in key and not key.endswith("row_idx"):  # row_idx: ties may come in any order
            assert torch.equal(first[key], second[key]), key  # the CSR and its int16 indices as the reference


def _our_dir(path, lora_a_shape, lora_b_shape):
    config = RosaConfig(r=lora_a_shape[0], density=0.001, target_modules=["model.big"])
    config.save_pretrained(str(path))
    out_f = lora_b_shape[0]
    offsets = torch.zeros(out_f + 1, dtype=torch.int32)
    offsets[1:] = 1
    save_file({"model.big.lora_A.weight": torch.zeros(lora_a_shape), "model.big.lora_B.weight": torch.zeros(lora_b_shape),
               "model.big.rosa_spa.values": torch.ones(1), "model.big.rosa_spa.row_offsets": offsets,
               "model.big.rosa_spa.col_indices": torch.tensor([5], dtype=torch.int32)},
              str(path / "adapter_model.safetensors"))


@pytest.mark.parametrize("a_shape,b_shape,what", [((2, 40000), (8, 2), "40000 columns"),
                                                  ((2, 8), (32769, 2), "32769 rows")])
def test_rosa_to_reference_refuses_what_int16_cannot_address(tmp_path, a_shape, b_shape, what):
    src, out = tmp_path / "ours", tmp_path / "ref"
    _our_dir(src, a_shape, b_shape)
    with pytest.raises(UserError, match=rf"^layer 'model\.big': its {what} do not fit the reference's int16"):
        convert_rosa_to_reference(str(src), str(out))
    assert not out.exists() and os.listdir(tmp_path) == ["ours"]


def _edit(ref_dir, fn):
    path = ref_dir / "adapter_model.safetensors"
    tensors = load_file(path)
    fn(tensors)
    save_file(tensors, path)


K = PREFIX + L0 + "self_attn.q_proj."


@pytest.mark.parametrize("edit,match", [
    (lambda t: t.__setitem__(K + "rosa_spa.col_idx", -t[K + "rosa_spa.col_idx"] - 1), "int16 overflow"),
    (lambda t: t.__setitem__(PREFIX + L0 + "self_attn.q_proj.bias", torch.zeros(32)), "not part of a RoSA"),
    (lambda t: t.pop(K + "rosa_spa.col_idx"), "needs values, row_offs and col_idx"),
    (lambda t: t.__setitem__(K + "rosa_B.weight", t[K + "rosa_B.weight"][:, :1].contiguous()), "rosa_A .* rosa_B"),
    (lambda t: t[K + "rosa_spa.values"].__setitem__(0, float("nan")), "finite"),
])
def test_bad_reference_adapters_are_one_line_errors(tmp_path, edit, match):
    ref, out = tmp_path / "ref", tmp_path / "ours"
    write_reference_dir(ref, make_tiny_llama(), mixed_config(), masks=None)
    _edit(ref, edit)
    with pytest.raises(UserError, match=match) as info:
        convert_reference_to_rosa(str(ref), str(out), base_model=make_tiny_llama())
    assert "\n" not in str(info.value) and not out.exists()


def test_masks_must_agree_with_the_adapter_and_fill_a_missing_structure(tmp_path):
    ref, out = tmp_path / "ref", tmp_path / "ours"
    deltas = write_reference_dir(ref, make_tiny_llama(), mixed_config(), masks="file")
    masks = torch.load(ref / "masks.pt", weights_only=True)
    name = "model." + L0 + "self_attn.q_proj"
    wrong = dict(masks)
    wrong[name] = ~masks[name]
    torch.save(wrong, tmp_path / "wrong.pt")
    with pytest.raises(UserError, match=r"q_proj'.*the mask in .* differs"):
        convert_reference_to_rosa(str(ref), str(out), masks=str(tmp_path / "wrong.pt"))
    # an adapter saved before its mask was set (row_offs all zero): the mask file supplies the structure
    values = {}
    _edit(ref, lambda t: (values.setdefault("v", t[K + "rosa_spa.values"]),
                          t.__setitem__(K + "rosa_spa.row_offs", torch.zeros(33, dtype=torch.int32)),
                          t.__setitem__(K + "rosa_spa.col_idx", torch.zeros_like(t[K + "rosa_spa.col_idx"]))))
    with pytest.raises(UserError, match="no sparse structure.*--masks"):
        convert_reference_to_rosa(str(ref), str(out), base_model=make_tiny_llama())
    convert_reference_to_rosa(str(ref), str(out), masks=str(ref / "masks.pt"))
    _check_outputs(RosaModel.from_pretrained(make_tiny_llama(), str(out)), make_tiny_llama(), deltas)


def test_config_and_output_dir_checks(tmp_path):
    ref, out = tmp_path / "ref", tmp_path / "ours"
    write_reference_dir(ref, make_tiny_llama(), mixed_config(), masks="file")
    out.mkdir()
    with pytest.raises(FileExistsError, match="--overwrite"):
        convert_reference_to_rosa(str(ref), str(out), masks=str(ref / "masks.pt"))
    convert_reference_to_rosa(str(ref), str(out), masks=str(ref / "masks.pt"), overwrite=True)
    assert sorted(os.listdir(out)) == ["adapter_config.json", "adapter_model.safetensors"]
    cfg = json.load(open(ref / "adapter_config.json"))
    for key, value, match in (("peft_type", "LORA", "not 'ROSA'"), ("bias", "all", "bias='all'"),
                              ("r", None, "non-numeric 'r'")):
        json.dump({**cfg, key: value}, open(ref / "adapter_config.json", "w"))
        with pytest.raises(UserError, match=match):
            convert_reference_to_rosa(str(ref), str(tmp_path / "x"), masks=str(ref / "masks.pt"))
    assert not (tmp_path / "x").exists()


def test_with_the_base_model_only_linear_adapters_convert(tmp_path):
    model = get_rosa_model(make_tiny_llama(), RosaConfig(r=2, target_modules=["embed_tokens", "q_proj"]))
    model.save_pretrained(str(tmp_path / "ours"))
    with pytest.raises(UserError, match=r"layer 'model\.embed_tokens': not an nn\.Linear of the base model"):
        convert_rosa_to_reference(str(tmp_path / "ours"), str(tmp_path / "ref"), base_model=make_tiny_llama())
    ref = tmp_path / "ref2"
    write_reference_dir(ref, make_tiny_llama(), mixed_config(), masks=None)
    with pytest.raises(UserError, match="convert it the other way"):
        convert_rosa_to_reference(str(ref), str(tmp_path / "x"))
    assert not (tmp_path / "ref").exists() and not (tmp_path / "x").exists()
