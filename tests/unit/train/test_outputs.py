"""rosa train's outputs: the loss plot is skipped with one line on stderr when matplotlib is missing; a resumed
run's metrics.jsonl forgets the records after its checkpoint."""
import json
import os

import pytest

from rosa_peft.train import outputs
from rosa_peft.utils import plots


def test_loss_plot_without_matplotlib_says_how_to_install(tmp_path, monkeypatch, capsys):
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text(json.dumps({"event": "log", "step": 1, "loss": 1.0}) + "\n")
    monkeypatch.setattr(plots, "import_pyplot", lambda: None)
    assert outputs.plot_loss(str(metrics), str(tmp_path / "loss.png")) is None
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "matplotlib is not installed" in err[0] and "rosa-peft[plot]" in err[0]
    assert not (tmp_path / "loss.png").exists()


def test_loss_plot_and_bench_plot_go_through_the_one_png_writer(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    from rosa_peft.bench import report

    written = []
    real = plots.save_png
    monkeypatch.setattr(plots, "save_png", lambda fig, path, dpi=110: written.append(path) or real(fig, path, dpi))
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("".join(json.dumps({"event": "log", "step": s, "loss": 2.0 / s, "phase": "train"}) + "\n"
                               for s in (1, 2, 3)))
    loss_png = str(tmp_path / "loss.png")
    assert outputs.plot_loss(str(metrics), loss_png) == loss_png
    block = {"preset": {"name": "tiny"}, "results": [{"method": "rosa", "ratio_to_lora": 1.2, "mem_ratio_to_lora": 0.9}]}
    assert report.plot({"step": [block]}, tmp_path / "bench.png") is None
    assert written == [loss_png, str(tmp_path / "bench.png")]
    for name in ("loss.png", "bench.png"):
        data = (tmp_path / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and b"Software" not in data  # byte-stable: no version stamp
    assert sorted(os.listdir(tmp_path)) == ["bench.png", "loss.png", "metrics.jsonl"]  # no temporary file left


def test_resume_at_drops_only_the_train_logs_after_the_checkpoint(tmp_path):
    path = tmp_path / "metrics.jsonl"
    records = ([{"event": "phase", "phase": "warmup"}]
               + [{"event": "log", "step": s, "loss": 1.0, "phase": "warmup"} for s in (1, 2, 3)]
               + [{"event": "phase", "phase": "train"}]
               + [{"event": "log", "step": s, "loss": 1.0 / s, "phase": "train"} for s in (1, 2, 3)]
               + [{"event": "log", "step": 3, "train_runtime": 9.0}])  # HF's end-of-train record has no phase
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    writer = outputs.MetricsWriter(str(path), append=True)
    assert writer.resume_at(1) == 3
    kept = outputs.read_metrics(str(path))
    assert kept == records[:6]  # the warm-up's steps 2 and 3 are not the restarted run's
    assert writer.resume_at(1) == 0 and outputs.read_metrics(str(path)) == kept
    writer.phase("train", {"resumed_from": "checkpoint-1"})
    assert outputs.read_metrics(str(path))[-1]["resumed_from"] == "checkpoint-1"
    assert not [n for n in os.listdir(tmp_path) if n != "metrics.jsonl"]  # rewritten in place, no temporary left
    assert outputs.MetricsWriter(str(tmp_path / "none.jsonl"), enabled=False).resume_at(0) == 0


def test_resume_at_a_warmup_step_drops_later_warmup_logs_and_the_whole_main_run(tmp_path):
    path = tmp_path / "metrics.jsonl"
    records = ([{"event": "phase", "phase": "warmup"}]
               + [{"event": "log", "step": s, "loss": 1.0, "phase": "warmup"} for s in (1, 2, 3)]
               + [{"event": "phase", "phase": "train"}]
               + [{"event": "log", "step": s, "loss": 1.0 / s, "phase": "train"} for s in (1, 2)])
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    writer = outputs.MetricsWriter(str(path), append=True)
    assert writer.resume_at(2, phase="warmup") == 3
    assert outputs.read_metrics(str(path)) == records[:3] + [records[4]]  # phase events stay
    with pytest.raises(ValueError, match="phase must be one of warmup, train"):
        writer.resume_at(0, phase="masks")
