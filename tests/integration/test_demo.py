"""`rosa demo` (what `make demo` runs), at a few steps: every stage runs and reports before/after."""
import json
import os

import pytest

from rosa_peft.cli import main

from conftest import save_tiny_base

pytestmark = pytest.mark.slow


def test_demo_trains_evaluates_and_reports(smollm2, tmp_path, capsys):
    out = tmp_path / "demo"
    argv = ["demo", "--max-steps", "2", "--warmup-steps", "1", "--batch-size", "2", "--eval-limit", "2",
            "--samples", "1", "--output-dir", str(out)]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "held-out response loss" in text and "SQL execution accuracy" in text and "[sample 1]" in text
    record = json.loads((out / "demo.json").read_text())
    for stage in ("before", "after"):
        assert record[stage]["loss"] > 0 and 0.0 <= record[stage]["accuracy"] <= 1.0
    assert record["eval_examples"] == 2 and record["train"]["global_steps"] == 2
    for name in ("adapter_config.json", "adapter_model.safetensors", "masks.safetensors", "metrics.jsonl",
                 "run_config.json"):
        assert (out / name).is_file(), name
    phases = [json.loads(line).get("phase") for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert "warmup" in phases and "masks" in phases and "train" in phases


def test_demo_bad_input_changes_nothing(tmp_path, capsys):
    assert main(["demo", "--steps", "0", "--output-dir", str(tmp_path / "x")]) == 2
    assert "--max-steps must be >= 1" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("user data")
    assert main(["demo", "--output-dir", str(foreign)]) == 2
    assert "not an earlier demo" in capsys.readouterr().err
    assert (foreign / "keep.txt").read_text() == "user data"


def test_demo_check_keeps_an_earlier_demo_and_refuses_a_file(tmp_path):
    import argparse

    from rosa_peft.demo import DEMO_MARKER, _check, add_arguments

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    earlier = tmp_path / "demo"
    earlier.mkdir()
    (earlier / DEMO_MARKER).write_text("{}")
    (earlier / "adapter_model.safetensors").write_text("old")
    _check(parser.parse_args(["--output-dir", str(earlier)]))
    assert (earlier / "adapter_model.safetensors").read_text() == "old"  # replaced only once a new one is complete
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(FileExistsError, match="not a directory"):
        _check(parser.parse_args(["--output-dir", str(a_file)]))


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory, smol_tokenizer):
    root = tmp_path_factory.mktemp("demo_base")
    save_tiny_base(root / "base", smol_tokenizer)
    return root / "base"


def test_interrupted_demo_keeps_the_previous_one_and_the_next_run_succeeds(tiny_base, tmp_path, monkeypatch, capsys):
    from rosa_peft.model import RosaModel

    out = tmp_path / "demo"
    argv = ["demo", "--model", str(tiny_base), "--max-steps", "2", "--warmup-steps", "1", "--batch-size", "1",
            "--eval-limit", "1", "--samples", "0", "--output-dir", str(out)]
    assert main(argv) == 0
    previous = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    assert "demo.json" in previous and "adapter_model.safetensors" in previous

    def interrupted(*a, **kw):  # Ctrl-C after training, while the fine-tuned model is evaluated
        raise KeyboardInterrupt

    monkeypatch.setattr(RosaModel, "from_pretrained", classmethod(interrupted))
    with pytest.raises(KeyboardInterrupt):
        main(argv)
    monkeypatch.undo()
    assert os.listdir(tmp_path) == ["demo"]  # no staging directory left
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == previous

    # a SIGKILL leaves its staging directory: the next run removes it and completes
    killed = tmp_path / ".demo.tmp-k1ll3d_x"
    killed.mkdir()
    (killed / "metrics.jsonl").write_text("{}\n")
    capsys.readouterr()
    assert main(argv) == 0
    assert os.listdir(tmp_path) == ["demo"]
    record = json.loads((out / "demo.json").read_text())
    assert record["train"]["global_steps"] == 2
    assert json.loads((out / "run_config.json").read_text())["output_dir"] == str(out)
    assert f"in {out}" in capsys.readouterr().out
