"""export.py: a merged RoSA model saved as a plain transformers model, checked against the unmerged logits."""
import json
import os
import warnings

import pytest
import torch
from safetensors import safe_open

from rosa_peft import RosaConfig, RosaModel, get_rosa_model
from rosa_peft.export import EXPORT_INFO, MergeCheckError, check_token_ids, export_merged
from rosa_peft.utils.checks import UserError
from rosa_peft.utils.io import default_file_mode
from conftest import peaked_tiny_llama, with_random_adapter


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


def tiny_llama(seed=0, hidden=32):
    """A tiny Llama with large-margin logits; ``hidden=64`` makes every Linear quantizable in NF4 blocks."""
    return peaked_tiny_llama(128, seed, hidden=hidden, max_positions=64, margin=20.0)


def saved_tensors(directory):
    """{name: dtype string} of every tensor in the folder's safetensors files."""
    out = {}
    for name in os.listdir(directory):
        if name.endswith(".safetensors"):
            with safe_open(os.path.join(directory, name), framework="pt") as fh:
                out.update({k: fh.get_slice(k).get_dtype() for k in fh.keys()})
    return out


def reload(directory):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(directory, dtype="auto").eval()


@torch.no_grad()
def logits(model, ids):
    return model(input_ids=ids).logits.float()


def test_export_loads_with_plain_transformers_and_matches_the_unmerged_adapter(tmp_path):
    model = with_random_adapter(tiny_llama())
    ids = check_token_ids(128, length=12, seed=3)
    expected = logits(model, ids)
    out = tmp_path / "merged"
    info = export_merged(model, str(out), info={"source_adapter": "somewhere"})

    keys = saved_tensors(out)
    assert keys and not [k for k in keys if "base_layer" in k or "lora_" in k or "rosa" in k]
    plain = reload(out)
    assert type(plain).__module__.startswith("transformers.")
    assert not [n for n, m in plain.named_modules() if "rosa" in type(m).__module__]
    torch.testing.assert_close(logits(plain, ids), expected, rtol=1e-4, atol=1e-4)

    written = json.loads((out / EXPORT_INFO).read_text(encoding="utf-8"))
    assert written == json.loads(json.dumps(info))
    assert written["source_adapter"] == "somewhere" and written["dtype"] == "float32" and written["merge"] == "exact"
    check = written["check"]
    assert check["merge_max_abs_diff"] <= check["merge_tolerance"] == pytest.approx(1e-4 * check["max_abs_logit"])
    assert check["max_abs_diff"] <= check["tolerance"] == check["merge_tolerance"]
    assert check["saved_tensors_reloaded_bit_for_bit"] == len(plain.state_dict())
    assert not [p for p in os.listdir(tmp_path) if p != "merged"]  # no staging leftovers
    assert {os.stat(f).st_mode & 0o777 for f in out.iterdir()} == {default_file_mode()}  # not mkstemp's 0600


def test_dtype_casts_the_saved_weights(tmp_path):
    model = with_random_adapter(tiny_llama())
    ids = check_token_ids(128)
    expected = logits(model, ids)
    info = export_merged(model, str(tmp_path / "bf16"), dtype="bf16")
    assert info["dtype"] == "bfloat16"
    assert set(saved_tensors(tmp_path / "bf16").values()) == {"BF16"}
    plain = reload(tmp_path / "bf16")
    assert plain.dtype == torch.bfloat16
    check = info["check"]  # the merge is checked in float32; the bf16 rounding is reported, end to end
    assert check["merge_tolerance"] == pytest.approx(1e-4 * check["max_abs_logit"])
    assert check["tolerance"] is None and check["saved_tensors_reloaded_bit_for_bit"] > 0
    assert check["max_abs_diff"] == pytest.approx(float((logits(plain, ids) - expected).abs().max()), abs=1e-6)


def test_refuses_a_non_empty_output_before_touching_the_model(tmp_path):
    (tmp_path / "keep.txt").write_text("mine", encoding="utf-8")
    model = with_random_adapter(tiny_llama())
    with pytest.raises(FileExistsError, match="not empty"):
        export_merged(model, str(tmp_path))
    assert isinstance(model, RosaModel) and list(model.rosa_layers())  # still wrapped, nothing merged
    assert os.listdir(tmp_path) == ["keep.txt"]
    empty = tmp_path / "empty"
    empty.mkdir()
    export_merged(model, str(empty), check=False)
    assert (empty / "config.json").is_file()


def test_a_failed_check_writes_nothing(tmp_path, monkeypatch):
    import rosa_peft.export as export

    monkeypatch.setattr(export, "RELATIVE_TOLERANCE", {d: 0.0 for d in export.RELATIVE_TOLERANCE})
    with pytest.raises(MergeCheckError, match="merge check failed.*nothing was written"):
        export_merged(with_random_adapter(tiny_llama()), str(tmp_path / "out"), dtype="bfloat16")
    assert os.listdir(tmp_path) == []


def test_a_weight_lost_on_reload_fails_the_save_check(tmp_path, monkeypatch):
    import rosa_peft.export as export

    real = export._reload

    def lossy(directory, device):  # as if transformers had not found lm_head and initialised it
        model = real(directory, device)
        torch.nn.init.normal_(model.lm_head.weight)
        return model

    monkeypatch.setattr(export, "_reload", lossy)
    with pytest.raises(MergeCheckError, match="save check failed: lm_head.weight differs"):
        export_merged(with_random_adapter(tiny_llama()), str(tmp_path / "out"))
    assert os.listdir(tmp_path) == []


def test_no_check_records_no_difference(tmp_path):
    info = export_merged(with_random_adapter(tiny_llama()), str(tmp_path / "out"), check=False)
    assert info["check"] is None
    assert json.loads((tmp_path / "out" / EXPORT_INFO).read_text(encoding="utf-8"))["check"] is None


def test_requantize_needs_a_4bit_base(tmp_path):
    with pytest.raises(UserError, match="4-bit"):
        export_merged(with_random_adapter(tiny_llama()), str(tmp_path / "out"), requantize=True)
    assert not (tmp_path / "out").exists()


def nf4_adapter():
    """An adapter on q_proj only over a torchao-NF4 base: the other 4-bit Linears must be de-quantized too."""
    pytest.importorskip("torchao")
    from rosa_peft import quantize_model

    base = quantize_model(tiny_llama(hidden=64), backend="torchao")
    torch.manual_seed(0)
    model = get_rosa_model(base, RosaConfig(r=2, density=0.05, target_modules=["q_proj"], init_lora_weights=False))
    model.set_masks({n: torch.rand(layer.out_features, layer.in_features) < 0.05 for n, layer in model.rosa_layers()})
    return model


def test_4bit_base_exports_the_dequantized_merge(tmp_path):
    model = nf4_adapter()
    ids = check_token_ids(128)
    expected = logits(model, ids)
    info = export_merged(model, str(tmp_path / "out"), token_ids=ids)
    assert info["merge"].startswith("de-quantized") and info["dequantized_layers"] == 2 * 6  # 7 Linears - q_proj
    assert set(saved_tensors(tmp_path / "out").values()) == {"F32"}
    torch.testing.assert_close(logits(reload(tmp_path / "out"), ids), expected, rtol=1e-4, atol=1e-4)


def test_requantize_warns_and_reports_the_rounding(tmp_path):
    model = nf4_adapter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        info = export_merged(model, str(tmp_path / "out"), requantize=True)
    assert any("rounds them again" in str(w.message) for w in caught)
    assert info["merge"].startswith("re-quantized") and info["check"]["merge_tolerance"] is None
    assert info["check"]["merge_max_abs_diff"] > 0 and info["check"]["tolerance"] is None
    assert set(saved_tensors(tmp_path / "out").values()) == {"F32"}  # the rounded values, stored dense
