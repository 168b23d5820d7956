"""eval/export_command.py: `rosa export` end to end on a tiny saved base, and its one-line input errors."""
import json
import os

import pytest
import torch

from conftest import run_rosa, save_tiny_base, with_random_adapter


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, smol_tokenizer, one_thread):
    """A tiny base saved like a checkpoint and an adapter whose config names it (as `rosa train` writes)."""
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("export")
    save_tiny_base(root / "base", smol_tokenizer)
    base = AutoModelForCausalLM.from_pretrained(str(root / "base")).eval()
    with_random_adapter(base).save_pretrained(str(root / "run"))
    smol_tokenizer.save_pretrained(str(root / "run" / "tokenizer"))
    return root


def test_export_writes_a_plain_model_with_its_tokenizer(run_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rosa_peft import RosaModel

    out = tmp_path / "merged"
    rc, stdout, stderr = run_rosa("export", "--adapter", run_dir / "run", "--output", out, "--dtype", "bf16",
                                  "--device", "cpu")
    assert rc == 0, stderr
    assert "exported exact merge (bfloat16)" in stdout and "max |logit difference|" in stdout
    info = json.loads((out / "export_info.json").read_text(encoding="utf-8"))
    assert info["source_adapter"] == str(run_dir / "run") and info["base_model"] == str(run_dir / "base")
    assert info["tokenizer"] == str(run_dir / "run" / "tokenizer") and info["dtype"] == "bfloat16"
    assert info["check"]["merge_max_abs_diff"] <= info["check"]["merge_tolerance"]

    merged = AutoModelForCausalLM.from_pretrained(str(out), dtype="auto").eval()
    assert merged.dtype == torch.bfloat16
    assert not [k for k in merged.state_dict() if "base_layer" in k or "lora_" in k]
    tokenizer = AutoTokenizer.from_pretrained(str(out))
    ids = tokenizer("SELECT name FROM users", return_tensors="pt").input_ids
    base = AutoModelForCausalLM.from_pretrained(str(run_dir / "base")).eval()
    unmerged = RosaModel.from_pretrained(base, str(run_dir / "run"))
    with torch.no_grad():
        expected = unmerged(input_ids=ids).logits
        got = merged(input_ids=ids).logits.float()
    assert (got - expected).abs().max() <= 5e-2 * expected.abs().max()


def test_a_failed_check_exits_1_and_writes_nothing(run_dir, tmp_path, monkeypatch):
    import rosa_peft.export as export

    monkeypatch.setattr(export, "RELATIVE_TOLERANCE", {d: 0.0 for d in export.RELATIVE_TOLERANCE})
    rc, _, stderr = run_rosa("export", "--adapter", run_dir / "run", "--output", tmp_path / "out", "--device", "cpu")
    assert rc == 1 and "merge check failed" in stderr
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("case", ["missing adapter", "non-empty output", "requantize without nf4"])
def test_bad_input_is_one_line_and_exit_2(run_dir, tmp_path, case):
    adapter, output, extra = run_dir / "run", tmp_path / "out", []
    if case == "missing adapter":
        adapter, expected = tmp_path / "nope", "adapter directory"
    elif case == "non-empty output":
        output.mkdir()
        (output / "keep.txt").write_text("mine", encoding="utf-8")
        expected = "not empty"
    else:
        extra, expected = ["--requantize"], "--requantize needs a 4-bit base"
    rc, _, stderr = run_rosa("export", "--adapter", adapter, "--output", output, *extra)
    assert rc == 2
    assert stderr.count("\n") == 1 and stderr.startswith("rosa export: error:") and expected in stderr
    assert sorted(os.listdir(tmp_path)) == (["out"] if case == "non-empty output" else [])
    if case == "non-empty output":
        assert os.listdir(output) == ["keep.txt"]
