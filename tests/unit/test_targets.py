"""Targeting rules: layers_to_transform / layers_pattern (PEFT semantics), modules_to_save exclusion, config fields."""
import json
from collections import OrderedDict

import pytest
import torch
from torch import nn

from conftest import make_tiny_llama
from rosa_peft import RosaConfig
from rosa_peft.modules_to_save import wrap_modules_to_save
from rosa_peft.targets import COMMON_LAYERS_PATTERN, find_targets, find_targets_for, layer_index

PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(OrderedDict(lin0=nn.Linear(10, 20), relu=nn.ReLU(), lin1=nn.Linear(20, 2)))


class _GPT2ish(nn.Module):
    """Blocks under ``h`` (GPT-2 naming) plus a Linear outside any layer list."""

    def __init__(self):
        super().__init__()
        self.h = nn.ModuleList(nn.Sequential(OrderedDict(fc=nn.Linear(4, 4))) for _ in range(3))
        self.proj_out = nn.Linear(4, 4)


def _layer_names(idx):
    return [f"model.layers.{idx}.{'self_attn' if p in PROJ[:4] else 'mlp'}.{p}" for p in PROJ]


# ---- layers_to_transform / layers_pattern ---------------------------------------------------------
def test_layers_to_transform_with_pattern_keeps_only_that_layer(tiny_llama):
    names = find_targets(tiny_llama, "all-linear", layers_to_transform=[0], layers_pattern="layers")
    assert sorted(names) == sorted(_layer_names(0))
    assert "lm_head" not in names
    # without the filter both layers are targeted
    assert len(find_targets(tiny_llama, "all-linear")) == 14


def test_layers_pattern_list_and_int_form(tiny_llama):
    as_list = find_targets(tiny_llama, PROJ, layers_to_transform=1, layers_pattern=["blocks", "layers"])
    assert sorted(as_list) == sorted(_layer_names(1))
    assert find_targets(tiny_llama, PROJ, layers_to_transform=[1]) == as_list  # pattern None: common names
    assert sorted(find_targets(tiny_llama, ["q_proj"], layers_to_transform=[0, 1])) == [
        "model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]


def test_empty_layers_to_transform_means_every_layer(tiny_llama):
    assert find_targets(tiny_llama, PROJ, layers_to_transform=[]) == find_targets(tiny_llama, PROJ)


def test_layers_combine_with_exclude(tiny_llama):
    names = find_targets(tiny_llama, PROJ, exclude_modules=["o_proj"], layers_to_transform=[0])
    assert sorted(names) == sorted(n for n in _layer_names(0) if not n.endswith("o_proj"))


def test_names_without_the_pattern_are_dropped():
    model = _GPT2ish()
    assert find_targets(model, "all-linear") == ["h.0.fc", "h.1.fc", "h.2.fc", "proj_out"]
    assert find_targets(model, "all-linear", layers_to_transform=[0, 2]) == ["h.0.fc", "h.2.fc"]  # "h" is common
    assert find_targets(model, "all-linear", layers_to_transform=1, layers_pattern="h") == ["h.1.fc"]


def test_layers_errors_mention_layers_to_transform(tiny_llama):
    with pytest.raises(ValueError, match=r"layers_to_transform=\[5\]"):
        find_targets(tiny_llama, PROJ, layers_to_transform=[5], layers_pattern="layers")
    with pytest.raises(ValueError, match=r"layers_to_transform=\[0\].*'h'.*14 module\(s\) match without it"):
        find_targets(tiny_llama, PROJ, layers_to_transform=[0], layers_pattern="h")
    with pytest.raises(ValueError, match="layers_to_transform"):  # a plain MLP has no layer list at all
        find_targets(_mlp(), "all-linear", layers_to_transform=0)
    with pytest.raises(ValueError, match="matches no Linear module") as info:  # emptiness not caused by layers
        find_targets(tiny_llama, ["nope"], layers_to_transform=[0])
    assert "layers_to_transform" not in str(info.value)


def test_layer_index_rules():
    assert layer_index("model.layers.3.mlp.up_proj") == 3
    assert layer_index("layers.2.fc") == 2  # pattern at the start of the name
    assert layer_index("model.layers.1.experts.7.w1", "layers") == 1  # first index, not the expert's
    assert layer_index("encoder.block.4.layer.1.DenseReluDense.wi") == 4  # T5: "block" before "layer"
    assert layer_index("model.mylayers.3.fc", "layers") is None  # whole components only
    assert layer_index("model.layers.3.fc", "h") is None
    assert layer_index("model.layers.3", "layers") is None  # the layer itself, not a module inside it
    assert layer_index("a.decoder.layers.5.fc", "decoder.layers") == 5  # dotted pattern
    assert layer_index("a.blk.5.fc", "blk|block") == 5  # a regex, as in PEFT
    assert COMMON_LAYERS_PATTERN == ("layers", "h", "block", "blocks", "layer")


# ---- modules_to_save exclusion and wrapper internals ---------------------------------------------------
def test_find_targets_for_passes_every_field(tiny_llama):
    cfg = RosaConfig(target_modules=PROJ, exclude_modules=["k_proj"], layers_to_transform=[1], layers_pattern="layers")
    assert sorted(find_targets_for(tiny_llama, cfg)) == sorted(n for n in _layer_names(1) if not n.endswith("k_proj"))
    cfg = RosaConfig(target_modules="all-linear", modules_to_save=["lin1"])
    assert find_targets_for(_mlp(), cfg) == ["lin0"]
    # a whole saved block takes everything inside it out of the targets
    cfg = RosaConfig(target_modules="all-linear", modules_to_save=["layers.0"])
    assert sorted(find_targets_for(tiny_llama, cfg)) == sorted(_layer_names(1))


def test_wrapped_modules_are_not_candidates(tiny_llama):
    mlp = _mlp()
    wrap_modules_to_save(mlp, ["lin1"], "default")
    assert find_targets(mlp, "all-linear") == ["lin0"]  # neither lin1.original_module nor the copy
    wrap_modules_to_save(tiny_llama, ["layers.1.mlp"], "default")
    names = find_targets(tiny_llama, "all-linear")
    assert len(names) == 11 and not any(".original_module" in n or ".modules_to_save" in n for n in names)


# ---- config fields -------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, match", [
    (dict(layers_to_transform=-1), "layers_to_transform"),
    (dict(layers_to_transform=True), "layers_to_transform"),
    (dict(layers_to_transform=[0, "1"]), "layers_to_transform"),
    (dict(layers_to_transform=[0, False]), "layers_to_transform"),
    (dict(layers_to_transform=1.0), "layers_to_transform"),
    (dict(layers_to_transform=[0], layers_pattern=3), "layers_pattern"),
    (dict(layers_to_transform=[0], layers_pattern=["layers", ""]), "layers_pattern"),
    (dict(layers_to_transform=[0], layers_pattern=[]), "layers_pattern"),
    (dict(layers_to_transform=[0], layers_pattern="("), "layers_pattern"),
    (dict(layers_pattern="layers"), "layers_pattern is set but layers_to_transform is not"),
    (dict(target_modules=r".*proj", layers_to_transform=[0]), "layers_to_transform cannot be used"),
    (dict(target_modules=r".*proj", layers_to_transform=[], layers_pattern="layers"), "layers_to_transform cannot be used"),
    (dict(modules_to_save="lm_head"), "modules_to_save"),
    (dict(modules_to_save=["lm_head", 3]), "modules_to_save"),
    (dict(modules_to_save=[""]), "modules_to_save"),
])
def test_config_rejects_bad_layer_and_save_fields(kwargs, match):
    with pytest.raises(ValueError, match=match):
        RosaConfig(**kwargs)


def test_config_accepts_and_normalises():
    cfg = RosaConfig(layers_to_transform=(0, 2), layers_pattern=("layers", "h"), modules_to_save=("lm_head",))
    assert cfg.layers_to_transform == [0, 2] and cfg.layers_pattern == ["layers", "h"]
    assert cfg.modules_to_save == ["lm_head"]
    assert RosaConfig(layers_to_transform=3).layers_to_transform == 3  # "all-linear" is allowed with layers
    assert RosaConfig(target_modules=["q_proj"], layers_to_transform=[0], layers_pattern="layers").layers_pattern == "layers"
    default = RosaConfig()
    assert (default.layers_to_transform, default.layers_pattern, default.modules_to_save) == (None, None, None)


@pytest.mark.parametrize("kwargs", [
    dict(layers_to_transform=[0, 3], layers_pattern=["layers", "h"], modules_to_save=["lm_head", "model.norm"]),
    dict(layers_to_transform=2, layers_pattern="layers", modules_to_save=[]),
    dict(),
])
def test_config_json_roundtrip_of_new_fields(tmp_path, kwargs):
    cfg = RosaConfig(target_modules=["q_proj", "v_proj"], **kwargs)
    assert RosaConfig.from_dict(json.loads(cfg.to_json_string())) == cfg
    cfg.save_pretrained(str(tmp_path))
    loaded = RosaConfig.from_pretrained(str(tmp_path))
    assert loaded == cfg
    for key in ("layers_to_transform", "layers_pattern", "modules_to_save"):
        assert getattr(loaded, key) == kwargs.get(key) and type(getattr(loaded, key)) is type(kwargs.get(key))


def test_old_config_without_new_keys_loads(tmp_path):
    data = RosaConfig(r=4, target_modules=["q_proj"]).to_dict()
    for key in ("layers_to_transform", "layers_pattern", "modules_to_save"):
        del data[key]
    (tmp_path / "adapter_config.json").write_text(json.dumps(data))
    cfg = RosaConfig.from_pretrained(str(tmp_path))
    assert cfg.r == 4 and cfg.layers_to_transform is None and cfg.layers_pattern is None and cfg.modules_to_save is None
