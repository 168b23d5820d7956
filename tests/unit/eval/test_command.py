"""`rosa eval`: reports, adapters, bad input (one error, nothing written), --compare, lm-eval helper."""
import argparse
import json
import os

import pytest
import torch

from rosa_peft.cli import main
from rosa_peft.eval import command

from conftest import save_tiny_base, with_random_adapter


def rosa_eval(*argv):
    """Run `rosa eval ARGV` as rosa_peft.cli does: (exit status, report of the error or None)."""
    parser = argparse.ArgumentParser()
    command.add_arguments(parser)
    try:
        return command.run(parser.parse_args([str(a) for a in argv])), None
    except (ValueError, FileNotFoundError) as exc:
        return 2, str(exc)


def test_cli_maps_eval_to_this_module():
    from rosa_peft.cli import SUBCOMMANDS

    assert SUBCOMMANDS["eval"][0] == "rosa_peft.eval.command"


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, smol_tokenizer):
    """A saved tiny base model (with the SmolLM2 tokenizer) and a RoSA adapter trained on nothing."""
    root = tmp_path_factory.mktemp("tiny")
    base = save_tiny_base(root / "base", smol_tokenizer)
    with_random_adapter(base).save_pretrained(str(root / "run"))
    return root / "base", root / "run"


def test_eval_with_adapter_writes_report_into_run_dir(tiny_run, capsys):
    base, run = tiny_run
    status, err = rosa_eval("--model", base, "--adapter", run, "--task", "sql-synth", "--limit", 3,
                            "--eval-batch-size", 2, "--max-new-tokens", 4, "--no-progress")
    assert (status, err) == (0, None)
    report = json.loads((run / "eval-sql-synth-test.json").read_text())
    assert report["format"] == "rosa-eval/1" and report["task"] == "sql-synth" and report["split"] == "test"
    assert report["model"]["adapter"] == str(run) and report["model"]["merged"] is True  # float base: merged
    assert report["summary"]["n"] == 3 and report["summary"]["primary_metric"] == "execution"
    for i, ex in enumerate(report["examples"]):
        assert ex["index"] == i and ex["prompt"].endswith("\n\n answer: ")
        assert {"generation", "prediction", "gold", "correct", "exec_reason"} <= set(ex)
        assert ex["gold"].startswith("SELECT ") and ex["correct"] is False  # 4 random tokens are no query
    assert "sql-synth / test" in capsys.readouterr().out

    out = run.parent / "merged.json"
    status, _ = rosa_eval("--model", base, "--adapter", run, "--merge", "--task", "sql-synth", "--limit", 3,
                          "--eval-batch-size", 3, "--max-new-tokens", 4, "--no-progress", "--output", out)
    merged = json.loads(out.read_text())
    assert status == 0 and merged["model"]["merged"] is True
    assert [e["generation"] for e in merged["examples"]] == [e["generation"] for e in report["examples"]]


def _listing(path):
    return sorted(os.listdir(path))


@pytest.mark.parametrize("argv, message", [
    (["--task", "nope"], "unknown task 'nope'"),
    (["--task", "jsonl"], "--task jsonl needs --data PATH"),
    (["--task", "viggo", "--data", "x.jsonl"], "--data is for --task jsonl"),
    (["--task", "jsonl", "--data", "missing.jsonl"], "file not found: missing.jsonl"),
    (["--task", "sql-synth", "--max-seq-len", "1"], "--max-seq-len must be an integer >= 2"),
    (["--task", "sql-synth", "--split", "validation"], "has no split 'validation'; available splits: train, test"),
    (["--task", "viggo", "--data-dir", "/nonexistent/data"], "data dir /nonexistent/data does not exist"),
    (["--task", "sql-synth", "--limit", "0"], "--limit must be a positive integer"),
    (["--task", "sql-synth", "--eval-batch-size", "0"], "--eval-batch-size must be a positive integer"),
    (["--limit", "3"], "--task is required"),
    (["--compare"], None),
])
def test_bad_input_one_error_nothing_written(tmp_path, monkeypatch, argv, message):
    monkeypatch.chdir(tmp_path)
    if message is None:  # argparse itself rejects --compare without directories
        with pytest.raises(SystemExit):
            rosa_eval(*argv)
        return
    status, err = rosa_eval(*argv, "--no-progress")
    assert status == 2 and message in err and "\n" not in err
    assert _listing(tmp_path) == []


def test_adapter_dir_with_missing_files(tmp_path, tiny_run, capsys):
    base, run = tiny_run
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "adapter_config.json").write_text((run / "adapter_config.json").read_text())
    out = tmp_path / "report.json"
    status, err = rosa_eval("--model", base, "--adapter", broken, "--task", "sql-synth", "--output", out)
    assert status == 2 and err == f"adapter directory {broken} has no adapter_model.safetensors"
    status, err = rosa_eval("--adapter", tmp_path / "missing", "--task", "sql-synth", "--output", out)
    assert status == 2 and "does not exist" in err
    (broken / "adapter_model.safetensors").write_bytes((run / "adapter_model.safetensors").read_bytes())
    (broken / "adapter_config.json").write_text("{ not json")
    status, err = rosa_eval("--model", base, "--adapter", broken, "--task", "sql-synth", "--output", out)
    assert status == 2 and "adapter_config.json: not valid JSON (line 1" in err
    (broken / "adapter_config.json").write_text((run / "adapter_config.json").read_text())
    weights = broken / "adapter_model.safetensors"  # truncated: refused by the library's adapter-file check
    weights.write_bytes(weights.read_bytes()[:100])
    status = main(["eval", "--model", str(base), "--adapter", str(broken), "--task", "sql-synth", "--output", str(out),
                   "--no-progress"])  # through the CLI: a user error, one line, no traceback
    err = capsys.readouterr().err.strip()
    assert status == 2 and err.startswith(f"rosa eval: error: {weights}: not a readable safetensors file"), err
    assert "\n" not in err
    assert _listing(tmp_path) == ["broken"] and _listing(broken) == ["adapter_config.json", "adapter_model.safetensors"]


def test_quantize_backend_missing_is_a_clear_error(tmp_path, monkeypatch):
    quant = pytest.importorskip("rosa_peft.quant")
    monkeypatch.setattr(quant, "backend_available", lambda backend: False)
    status, err = rosa_eval("--task", "sql-synth", "--quantize", "nf4", "--quant-backend", "bnb",
                            "--output", tmp_path / "r.json")
    assert status == 2 and err == ("--quantize nf4 with --quant-backend bnb needs the bitsandbytes package "
                                   "(pip install bitsandbytes), which is not importable")
    assert _listing(tmp_path) == []


def test_quantized_base_with_unmerged_adapter(tmp_path, smol_tokenizer):
    quant = pytest.importorskip("rosa_peft.quant")
    if not quant.backend_available("torchao"):
        pytest.skip("torchao is not importable")
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)  # NF4 blocks of 64 need in_features divisible by 64
    base = LlamaForCausalLM(LlamaConfig(vocab_size=len(smol_tokenizer), hidden_size=64, intermediate_size=128,
                                        num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                                        tie_word_embeddings=False)).eval()
    base.save_pretrained(tmp_path / "base")
    smol_tokenizer.save_pretrained(tmp_path / "base")
    with_random_adapter(base).save_pretrained(str(tmp_path / "run"))
    status, err = rosa_eval("--model", tmp_path / "base", "--adapter", tmp_path / "run", "--quantize", "nf4",
                            "--task", "sql-synth", "--limit", 2, "--max-new-tokens", 3, "--no-progress")
    assert (status, err) == (0, None)
    report = json.loads((tmp_path / "run" / "eval-sql-synth-test.json").read_text())
    assert report["model"]["quantize"] == "nf4 (torchao)" and report["summary"]["n"] == 2


def _fake_run(root, name, method, r, density, params, task, accuracy, split="test"):
    run = root / name
    run.mkdir()
    (run / "run_config.json").write_text(json.dumps(
        {"method": method, "r": r, "density": density, "task": task, "trainable_params": params, "seed": 0}))
    (run / f"eval-{task}-{split}.json").write_text(json.dumps(
        {"format": "rosa-eval/1", "task": task, "split": split, "summary": {"n": 10, "accuracy": accuracy}}))
    return run


def test_compare_renders_table_and_plot(tmp_path, capsys):
    runs = [_fake_run(tmp_path, "lora", "lora", 32, 0.0, 1000, "viggo", 0.5, "validation"),
            _fake_run(tmp_path, "rosa", "rosa", 16, 0.006, 1000, "viggo", 0.75, "validation"),
            _fake_run(tmp_path, "rosa-sql", "rosa", 16, 0.006, 1000, "sql", 0.25),
            _fake_run(tmp_path, "rosa-big", "rosa", 32, 0.012, 2000, "viggo", 0.8, "validation")]
    status, err = rosa_eval("--compare", *runs, "--output", tmp_path / "out" / "table.md")
    assert (status, err) == (0, None)
    table = (tmp_path / "out" / "table.md").read_text()
    assert table == capsys.readouterr().out
    lines = table.splitlines()
    assert lines[0] == "| Method | r | d | Trainable params | viggo/validation | sql/test |"
    assert "| LoRA | 32 | - | 1,000 | 50.0 | - |" in lines
    assert "| RoSA | 16 | 0.6% | 1,000 | 75.0 | 25.0 |" in lines
    assert "| RoSA | 32 | 1.2% | 2,000 | 80.0 | - |" in lines
    png = tmp_path / "out" / "table.png"
    pytest.importorskip("matplotlib")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_compare_bad_run_dirs(tmp_path):
    good = _fake_run(tmp_path, "good", "rosa", 16, 0.006, 1000, "viggo", 0.5)
    empty = tmp_path / "empty"
    empty.mkdir()
    status, err = rosa_eval("--compare", good, empty, "--output", tmp_path / "t.md")
    assert status == 2 and err == f"run directory {empty} has no run_config.json (written by rosa train)"
    (empty / "run_config.json").write_text(json.dumps({"method": "lora", "r": 8}))
    status, err = rosa_eval("--compare", good, empty, "--output", tmp_path / "t.md")
    assert status == 2 and "missing key(s) density, task, trainable_params" in err
    (empty / "run_config.json").write_text(json.dumps(
        {"method": "lora", "r": 8, "density": 0, "task": "viggo", "trainable_params": 5}))
    status, err = rosa_eval("--compare", good, empty, "--output", tmp_path / "t.md")
    assert status == 2 and "has no eval*.json" in err
    (empty / "eval.json").write_text("[1, 2")
    status, err = rosa_eval("--compare", good, empty, "--output", tmp_path / "t.md")
    assert status == 2 and "eval.json: not valid JSON" in err
    assert not (tmp_path / "t.md").exists() and not (tmp_path / "t.png").exists()


def test_to_hflm_without_lm_eval_says_how_to_install(tiny_llama):
    import importlib.util

    if importlib.util.find_spec("lm_eval") is not None:
        pytest.skip("lm_eval is installed")
    from rosa_peft.eval.lm_eval_helper import to_hflm

    with pytest.raises(ImportError, match="pip install lm-eval"):
        to_hflm(tiny_llama, tokenizer=object())


@pytest.mark.slow
def test_viggo_on_embedded_model_writes_report(tmp_path, data_dir):
    out = tmp_path / "viggo.json"
    status, err = rosa_eval("--task", "viggo", "--data-dir", data_dir, "--limit", 3, "--max-new-tokens", 4,
                            "--no-progress", "--output", out)
    assert (status, err) == (0, None)
    report = json.loads(out.read_text())
    assert report["split"] == "validation" and report["summary"]["n"] == 3
    assert report["protocol"]["stop"] == ["\n"] and report["protocol"]["add_special_tokens"] is True
    for ex in report["examples"]:
        assert ex["prompt"].endswith("### Meaning representation:\n")
        assert "\n" not in ex["generation"] and ex["prediction"] == ex["generation"].strip()
        assert 0.0 <= ex["slot_f1"] <= 1.0 and ex["gold"].endswith(")")
