"""rosa_peft.utils.checks (argument checks, UserError) and rosa_peft.roles (parameter roles from the layer contract)."""
from __future__ import annotations

import math
import re

import pytest
import torch

from conftest import make_tiny_llama
from rosa_peft import RosaConfig, get_rosa_model
from rosa_peft.roles import LORA, OTHER, SPARSE, param_roles, params_by_role
from rosa_peft.sparse import SparseAdapter
from rosa_peft.train.optim import adapter_param_groups
from rosa_peft.utils.checks import UserError, check_choice, check_fraction, check_int, is_int, is_real


# ---- check_int ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("value, minimum, allow_none", [(0, 0, False), (5, 1, False), (-3, None, False),
                                                        (None, 1, True), (2, 2, False)])
def test_check_int_accepts(value, minimum, allow_none):
    assert check_int("n", value, minimum=minimum, allow_none=allow_none) == value


@pytest.mark.parametrize("value, minimum, allow_none, message", [
    (0, 1, False, "limit must be a positive integer, got 0"),
    (True, 1, False, "limit must be a positive integer, got True"),
    (2.0, 1, False, "limit must be a positive integer, got 2.0"),
    (-1, 0, True, "limit must be a non-negative integer or None, got -1"),
    (None, 0, False, "limit must be a non-negative integer, got None"),
    (1, 2, False, "limit must be an integer >= 2, got 1"),
    ("3", None, False, "limit must be an integer, got '3'"),
])
def test_check_int_rejects_naming_the_field(value, minimum, allow_none, message):
    with pytest.raises(UserError) as info:
        check_int("limit", value, minimum=minimum, allow_none=allow_none)
    assert str(info.value) == message
    assert isinstance(info.value, ValueError)  # callers catching ValueError keep working


# ---- check_fraction ----------------------------------------------------------------------------------
@pytest.mark.parametrize("closed, low_ok, high_ok, text", [("left", True, False, "[0, 1)"),
                                                           ("right", False, True, "(0, 1]"),
                                                           ("both", True, True, "[0, 1]"),
                                                           ("neither", False, False, "(0, 1)")])
def test_check_fraction_bounds(closed, low_ok, high_ok, text):
    assert check_fraction("density", 0.5, closed=closed) == 0.5
    for value, ok in ((0, low_ok), (1.0, high_ok)):
        if ok:
            assert check_fraction("density", value, closed=closed) == float(value)
        else:
            with pytest.raises(UserError, match="^" + re.escape(f"density must be a number in {text}, got {value!r}")):
                check_fraction("density", value, closed=closed)


@pytest.mark.parametrize("value", [math.nan, math.inf, -0.1, True, "0.5", None])
def test_check_fraction_rejects_non_numbers_and_out_of_range(value):
    with pytest.raises(UserError) as info:
        check_fraction("d", value)
    assert str(info.value) == f"d must be a number in [0, 1), got {value!r}"


def test_check_fraction_other_bounds_and_bad_closed():
    assert check_fraction("x", 5, low=2, high=10, closed="both") == 5.0
    with pytest.raises(UserError, match=r"x must be a number in \(2, 10\), got 10"):
        check_fraction("x", 10, low=2, high=10, closed="neither")
    with pytest.raises(ValueError, match="closed must be one of"):
        check_fraction("x", 0.5, closed="open")


# ---- check_choice ------------------------------------------------------------------------------------
def test_check_choice_messages():
    assert check_choice("impl", "merged", ("auto", "merged")) == "merged"
    with pytest.raises(UserError) as info:
        check_choice("impl", "x", ("auto", "merged", "sp_add"))
    assert str(info.value) == "impl must be 'auto', 'merged' or 'sp_add', got 'x'"
    with pytest.raises(UserError) as info:
        check_choice("bias", "all", ("none",), why=" (biases stay frozen)")
    assert str(info.value) == "bias must be 'none' (biases stay frozen), got 'all'"
    with pytest.raises(UserError) as info:
        check_choice("index_dtype", "int8", ("int32", "int16"))
    assert str(info.value) == "index_dtype must be 'int32' or 'int16', got 'int8'"


def test_predicates():
    assert is_int(3) and not is_int(True) and not is_int(3.0)
    assert is_real(0.5) and is_real(2) and not is_real(False) and not is_real(math.nan) and not is_real("1")


def test_rosa_config_uses_the_checks():
    with pytest.raises(UserError, match=r"^r must be a non-negative integer, got -1$"):
        RosaConfig(r=-1)
    with pytest.raises(UserError, match=r"^density_pattern\['q_proj'\] must be a number in \[0, 1\), got 1\.0$"):
        RosaConfig(density_pattern={"q_proj": 1.0})
    with pytest.raises(UserError, match="init_lora_weights must be True, False or 'gaussian', got 'x'"):
        RosaConfig(init_lora_weights="x")
    with pytest.raises(UserError, match="layers_to_transform must be an integer >= 0 or a list of them"):
        RosaConfig(layers_to_transform=[True])


# ---- parameter roles -----------------------------------------------------------------------------------
def _model(**kw):
    model = get_rosa_model(make_tiny_llama(), RosaConfig(r=2, density=0.05, **kw))
    masks = {name: torch.rand(layer.out_features, layer.in_features, generator=torch.Generator().manual_seed(0)) < 0.05
             for name, layer in model.rosa_layers()}
    model.set_masks(masks)
    return model


def _by_name_rule(name: str) -> str:
    """The parameter-name substring rule the roles replace (kept here as the reference)."""
    if ".rosa_spa." in name:
        return SPARSE
    if ".lora_A." in name or ".lora_B." in name:
        return LORA
    return OTHER


def test_roles_come_from_the_layer_contract_and_match_the_name_rule():
    model = _model(modules_to_save=["lm_head"])
    by_role = params_by_role(model)
    assert by_role[SPARSE] and by_role[LORA] and by_role[OTHER]  # the lm_head copy trains: "other"
    for role, pairs in by_role.items():
        for name, _ in pairs:
            assert _by_name_rule(name) == role, (name, role)
    sparse_values = {id(m.values) for m in model.modules() if isinstance(m, SparseAdapter)}
    assert {id(p) for _, p in by_role[SPARSE]} == sparse_values
    every = params_by_role(model, trainable_only=False)
    assert sum(len(v) for v in every.values()) == len(list(model.named_parameters()))
    assert all(id(p) not in param_roles(model) for _, p in every[OTHER])


def test_param_groups_follow_the_roles():
    model = _model()
    groups = adapter_param_groups(model, lr=1e-3, lora_lr=2e-3, weight_decay=0.1)
    assert [(g["name"], g["lr"], g["weight_decay"]) for g in groups] == [("sparse", 1e-3, 0.1), ("lora", 2e-3, 0.1)]
    expected = [p for _, p in model.named_parameters() if p.requires_grad]
    assert [id(p) for g in groups for p in g["params"]] == [id(p) for p in expected if ".rosa_spa." in _name(model, p)] \
        + [id(p) for p in expected if ".lora_" in _name(model, p)]
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        adapter_param_groups(model, lr=1e-3)


def _name(model, param) -> str:
    return next(n for n, p in model.named_parameters() if p is param)
