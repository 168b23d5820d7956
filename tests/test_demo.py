"""`rosa demo` (what `make demo` runs), at a few steps: every stage runs and reports before/after."""
import json

import pytest

from rosa_peft.cli import main

pytestmark = pytest.mark.slow


def test_demo_trains_evaluates_and_reports(smollm2, tmp_path, capsys):
    out = tmp_path / "demo"
    argv = ["demo", "--steps", "2", "--warmup-steps", "1", "--batch-size", "2", "--eval-limit", "2",
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
    assert "--steps must be >= 1" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("user data")
    assert main(["demo", "--output-dir", str(foreign)]) == 2
    assert "not an earlier demo" in capsys.readouterr().err
    assert (foreign / "keep.txt").read_text() == "user data"


def test_demo_replaces_only_an_earlier_demo(tmp_path):
    import argparse

    from rosa_peft.demo import DEMO_MARKER, _check, add_arguments

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    earlier = tmp_path / "demo"
    earlier.mkdir()
    (earlier / DEMO_MARKER).write_text("{}")
    (earlier / "adapter_model.safetensors").write_text("old")
    _check(parser.parse_args(["--output-dir", str(earlier)]))
    assert not earlier.exists()
