"""rosa train's outputs: the loss plot is skipped with one line on stderr when matplotlib is missing."""
import json

from rosa_peft import plots
from rosa_peft.train import outputs


def test_loss_plot_without_matplotlib_says_how_to_install(tmp_path, monkeypatch, capsys):
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text(json.dumps({"event": "log", "step": 1, "loss": 1.0}) + "\n")
    monkeypatch.setattr(plots, "import_pyplot", lambda: None)
    assert outputs.plot_loss(str(metrics), str(tmp_path / "loss.png")) is None
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "matplotlib is not installed" in err[0] and "rosa-peft[plot]" in err[0]
    assert not (tmp_path / "loss.png").exists()
