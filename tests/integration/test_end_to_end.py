"""`rosa train` then `rosa eval` on the embedded SmolLM2 and the shared ViGGO data, CI sizes.

The adapter `rosa eval` reads is the one `rosa train` wrote (RoSA over the float base, and QRoSA over
a torchao NF4 base evaluated with `--quantize nf4`).
"""
import json

import pytest

from rosa_peft.cli import main

pytestmark = pytest.mark.slow


def _train(run, data_dir, *extra):
    argv = ["train", "--task", "viggo", "--data-dir", str(data_dir), "--method", "rosa", "--limit", "8",
            "--max-seq-len", "256", "--batch-size", "1", "--grad-accum", "1", "--warmup-steps", "2",
            "--lr-warmup-steps", "2", "--r", "2", "--density", "0.001", "--output-dir", str(run), "--no-progress",
            *extra]
    assert main(argv) == 0
    summary = json.loads((run / "run_config.json").read_text())
    for name in ("adapter_config.json", "adapter_model.safetensors", "masks.safetensors", "metrics.jsonl"):
        assert (run / name).is_file(), name
    return summary


def _eval(run, data_dir, *extra):
    argv = ["eval", "--adapter", str(run), "--task", "viggo", "--data-dir", str(data_dir), "--limit", "3",
            "--max-new-tokens", "8", "--no-progress", *extra]
    assert main(argv) == 0
    report = json.loads((run / "eval-viggo-validation.json").read_text())
    assert report["model"]["adapter"] == str(run) and report["summary"]["n"] == 3
    assert all(0.0 <= ex["slot_f1"] <= 1.0 for ex in report["examples"])
    return report


def test_rosa_train_then_eval_viggo(tmp_path, data_dir):
    run = tmp_path / "rosa"
    summary = _train(run, data_dir, "--max-steps", "4")
    assert summary["global_steps"] == 4 and summary["method"] == "rosa"
    report = _eval(run, data_dir)
    assert report["model"]["quantize"] is None


def test_qrosa_train_then_eval_viggo(tmp_path, data_dir):
    pytest.importorskip("torchao")
    run = tmp_path / "qrosa"
    summary = _train(run, data_dir, "--max-steps", "3", "--quantize", "nf4")
    assert summary["global_steps"] == 3 and summary["quantize"] == "nf4"
    report = _eval(run, data_dir, "--quantize", "nf4")
    assert report["model"]["quantize"] == "nf4 (torchao)"
