"""eval/loading.py: what `rosa eval` loads, and the checks that run before any model is loaded."""
import json

import pytest

from rosa_peft.eval import loading


def test_check_adapter_dir_names_the_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        loading.check_adapter_dir(str(tmp_path / "nope"))
    (tmp_path / "adapter_config.json").write_text("{}", encoding="utf-8")
    with pytest.raises(FileNotFoundError, match="has no adapter_model.safetensors"):
        loading.check_adapter_dir(str(tmp_path))


def test_check_adapter_dir_recognises_a_full_model(tmp_path):
    (tmp_path / "config.json").write_text("{}", encoding="utf-8")
    with pytest.raises(FileNotFoundError, match="full model.*--model"):
        loading.check_adapter_dir(str(tmp_path))


def test_check_adapter_dir_refuses_a_broken_config(tmp_path):
    (tmp_path / "adapter_config.json").write_text("{not json", encoding="utf-8")
    (tmp_path / "adapter_model.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="adapter_config.json"):
        loading.check_adapter_dir(str(tmp_path))
    (tmp_path / "adapter_config.json").write_text(json.dumps({"r": 4}), encoding="utf-8")
    assert loading.check_adapter_dir(str(tmp_path)) == str(tmp_path.resolve())


def test_merge_default_float_adapters_only():
    assert loading.default_merge("/a", None) is True
    assert loading.default_merge("/a", "nf4") is False
    assert loading.default_merge(None, None) is False


def test_eval_dtype_auto_resolves_and_explicit_is_kept(monkeypatch):
    assert loading.resolve_eval_dtype("float32", "cpu") == "float32"
    monkeypatch.setattr(loading, "cpu_supports_bf16", lambda: True)
    assert loading.resolve_eval_dtype("auto", "cpu") == "bfloat16"
    monkeypatch.setattr(loading, "cpu_supports_bf16", lambda: False)
    assert loading.resolve_eval_dtype("auto", "cpu") == "float32"


def test_bad_choices_fail_before_loading(tmp_path):
    with pytest.raises(ValueError, match="unknown --quantize 'int8'"):
        loading.load_for_eval(quantize="int8")
    with pytest.raises(ValueError, match="unknown --quant-backend 'gptq'"):
        loading.load_for_eval(quantize="nf4", quant_backend="gptq")
    with pytest.raises(ValueError, match="--merge needs --adapter"):
        loading.load_for_eval(merge=True)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        loading.load_for_eval(adapter=str(tmp_path / "missing"))
