"""study/figures.py: labels, loss reading and the PNGs the study writes."""
import json

import pytest

from rosa_peft.study import figures


def _record(method, r, density, params, task="sql", entry=None, seed=0):
    return {"task": task, "method": method, "entry": entry or f"{method}-r{r}", "seed": seed,
            "train": {"r": r, "density": density, "trainable_params": params},
            "eval": {"summary": {"accuracy": 0.5, "exact_nocase": 0.5, "execution": 0.4}}}


def test_series_label_tells_rosa_mixes_apart():
    assert figures.series_label(_record("lora", 8, 0.0, 100)) == "LoRA"
    assert figures.series_label(_record("rosa", 6, 0.0058, 100)) == "RoSA r6 d0.58%"
    assert figures.series_label(_record("fft", 0, 0.0, 100)) == "FFT"


def test_rosa_mix_is_its_share_of_the_lora_cell_with_the_same_budget():
    records = [_record("lora", 8, 0.0, 1000), _record("rosa", 6, 0.005, 1010), _record("rosa", 2, 0.01, 5000)]
    assert figures.rosa_mix(records[1], records) == "3/4"
    assert figures.rosa_mix(records[2], records) is None


def test_read_losses_keeps_train_step_logs_only(tmp_path):
    lines = [{"event": "log", "phase": "train", "step": 1, "loss": 2.0},
             {"event": "log", "phase": "warmup", "step": 1, "loss": 3.0},
             {"event": "log", "phase": "train", "step": 2},
             {"event": "summary", "phase": "train", "step": 2, "loss": 9.0},
             {"event": "log", "phase": "train", "step": 2, "loss": 1.5}]
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines), encoding="utf-8")
    assert figures.read_losses(str(path)) == [(1, 2.0), (2, 1.5)]


def test_plots_are_pngs(tmp_path):
    pytest.importorskip("matplotlib")
    records = [_record("lora", 8, 0.0, 1000), _record("rosa", 6, 0.005, 1010, entry="rosa-r6"),
               _record("fft", 0, 0.0, 10 ** 6, entry="fft")]
    out = figures.plot_accuracy(records, str(tmp_path / "results.png"))
    assert out is not None and (tmp_path / "results.png").read_bytes()[:4] == b"\x89PNG"
    cells = []
    for i, r in enumerate(records):
        d = tmp_path / f"c{i}"
        d.mkdir()
        (d / "metrics.jsonl").write_text(json.dumps({"event": "log", "phase": "train", "step": 1, "loss": 1.0})
                                         + "\n", encoding="utf-8")
        cells.append(str(d))
    figures.plot_losses(records, cells, str(tmp_path / "loss.png"))
    assert (tmp_path / "loss.png").read_bytes()[:4] == b"\x89PNG"
