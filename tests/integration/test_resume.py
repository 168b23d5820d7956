"""`rosa train --resume` edge cases, through run_training on a tiny Llama (CPU, a few steps):
a finished run is a no-op; a resume with other options than the run started with is refused (a longer run,
other save / log intervals are not); after a kill and a resume the totals cover the whole run; stale
temporaries of a killed save are swept."""
import json
import os

import pytest
import torch
from safetensors.torch import load_file

from rosa_peft.train import outputs
from rosa_peft.train.run import TOTALS_FILE, TrainOptions, run_training

from conftest import save_tiny_base


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory, smol_tokenizer):
    root = tmp_path_factory.mktemp("resume_base")
    save_tiny_base(root / "base", smol_tokenizer)
    return root / "base"


def _opts(base, out, **over):
    kw = dict(model=str(base), task="sql-synth", method="rosa", r=2, density=0.05, max_steps=4, limit=8,
              batch_size=1, grad_accum=2, max_seq_len=128, warmup_steps=1, lr_warmup_steps=1, save_steps=2,
              lora_dropout=0.0, output_dir=str(out), progress=False, seed=0)
    kw.update(over)
    return TrainOptions(**kw)


def _snapshot(root):
    """{relative path: (bytes, mtime_ns)} of every file, plus every directory, under root."""
    files, dirs = {}, []
    for d, subdirs, names in os.walk(root):
        dirs += [os.path.relpath(os.path.join(d, s), root) for s in subdirs]
        for n in names:
            p = os.path.join(d, n)
            with open(p, "rb") as fh:
                files[os.path.relpath(p, root)] = (fh.read(), os.stat(p).st_mtime_ns)
    return files, sorted(dirs)


def test_resume_of_a_finished_run_is_a_no_op(tiny_base, tmp_path, capsys):
    out = tmp_path / "run"
    first = run_training(_opts(tiny_base, out))
    assert first["global_steps"] == 4 and (out / "run_config.json").is_file()
    before = _snapshot(out)
    capsys.readouterr()

    again = run_training(_opts(tiny_base, out, resume=True))
    assert f"run in {out} is already complete (4 steps); nothing to do" in capsys.readouterr().out
    assert again["already_complete"] is True and again["global_steps"] == 4
    assert again["train_loss"] == first["train_loss"]
    assert _snapshot(out) == before  # byte-identical files, unchanged mtimes, no new file or directory

    # asking for more steps is not "finished": the run continues (here: to 6 steps) and is rewritten
    more = run_training(_opts(tiny_base, out, resume=True, max_steps=6))
    assert "already_complete" not in more and more["global_steps"] == 6
    assert json.loads((out / "run_config.json").read_text())["global_steps"] == 6


def test_resume_with_other_options_is_refused_before_anything_changes(tiny_base, tmp_path):
    from rosa_peft.utils.checks import UserError

    out = tmp_path / "run"
    run_training(_opts(tiny_base, out, max_steps=2))  # checkpointed, so the starting options are recorded
    recorded = json.loads((out / "checkpoints" / "run_options.json").read_text())
    assert recorded["grad_accum"] == 2 and recorded["seed"] == 0 and "save_steps" not in recorded
    before = _snapshot(out)
    for over, flag, now, then in [({"grad_accum": 3}, "--grad-accum", 3, 2), ({"seed": 1}, "--seed", 1, 0),
                                  ({"method": "lora", "density": None}, "--method", "'lora'", "'rosa'")]:
        with pytest.raises(UserError) as info:
            run_training(_opts(tiny_base, out, resume=True, max_steps=4, **over))
        assert str(info.value).startswith(f"--resume: {flag} is {now} here but {then} in the run being resumed"), info.value
        assert "\n" not in str(info.value)
        assert _snapshot(out) == before  # nothing loaded, written or removed
    # a longer run, saved and logged at other intervals: allowed, and it continues from checkpoint-2
    more = run_training(_opts(tiny_base, out, resume=True, max_steps=4, save_steps=1, logging_steps=2))
    assert more["global_steps"] == 4 and json.loads((out / "checkpoints" / "run_options.json").read_text()) == recorded


def test_totals_after_kill_and_resume_equal_an_uninterrupted_run(tiny_base, tmp_path, monkeypatch):
    full = run_training(_opts(tiny_base, tmp_path / "full"))

    out = tmp_path / "killed"

    def kill_at_step_3(self, args, state, control, **kw):  # after checkpoint-2 is complete
        if state.global_step == 3:
            raise KeyboardInterrupt

    monkeypatch.setattr(outputs.MetricsWriter, "on_step_end", kill_at_step_3, raising=False)
    with pytest.raises(KeyboardInterrupt):
        run_training(_opts(tiny_base, out))
    monkeypatch.undo()
    assert not (out / "run_config.json").exists()
    partial = json.loads((out / "checkpoints" / "checkpoint-2" / TOTALS_FILE).read_text())
    assert partial["global_step"] == 2 and partial["loss_sum"] > 0 and partial["train_time_s"] > 0

    # what a SIGKILL during a save leaves: 0-byte temporaries, here and in the checkpoint
    stale = [out / ".tmp-a1b2c3d4adapter_model.safetensors", out / "checkpoints" / "checkpoint-2" / ".tmp-zz9_zz9zmasks.safetensors"]
    for p in stale:
        p.write_bytes(b"")

    import time

    t0 = time.time()
    resumed = run_training(_opts(tiny_base, out, resume=True))
    wall = time.time() - t0
    assert not any(p.exists() for p in stale)
    assert resumed["global_steps"] == full["global_steps"] == 4
    assert resumed["train_loss"] == pytest.approx(full["train_loss"], rel=1e-6, abs=1e-9)
    # the time of the whole run: the killed session up to its checkpoint + the resumed session
    assert partial["train_time_s"] < resumed["train_time_s"] <= round(partial["train_time_s"] + wall, 2) + 0.01
    assert json.loads((out / "run_config.json").read_text())["train_loss"] == resumed["train_loss"]
    final = json.loads((out / "checkpoints" / "checkpoint-4" / TOTALS_FILE).read_text())
    assert final["global_step"] == 4 and final["loss_sum"] == pytest.approx(4 * full["train_loss"], rel=1e-6)
    a, b = load_file(str(tmp_path / "full" / "adapter_model.safetensors")), load_file(str(out / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_a_directory_holding_only_stale_temporaries_can_be_trained_in(tiny_base, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    stale = out / ".tmp-0000abcdrun_config.json"
    stale.write_bytes(b"")
    summary = run_training(_opts(tiny_base, out, max_steps=1, save_steps=0, warmup_steps=0))
    assert summary["global_steps"] == 1 and not stale.exists()
    (out / "notes.txt").write_text("mine")
    os.remove(out / "run_config.json")
    with pytest.raises(FileExistsError, match="not empty"):
        run_training(_opts(tiny_base, out, max_steps=1, save_steps=0, warmup_steps=0))
    assert (out / "notes.txt").read_text() == "mine"


def test_kill_in_the_warmup_resumes_it_and_logs_every_step_once(tiny_base, tmp_path, monkeypatch):
    over = dict(warmup_steps=4, max_steps=6)
    full = run_training(_opts(tiny_base, tmp_path / "full", **over))

    out = tmp_path / "killed"
    calls = []

    def kill_at_warmup_step_3(self, args, state, control, **kw):  # after the warm-up's checkpoint-2
        calls.append(state.global_step)
        if len(calls) == 3:
            raise KeyboardInterrupt

    monkeypatch.setattr(outputs.MetricsWriter, "on_step_end", kill_at_warmup_step_3, raising=False)
    with pytest.raises(KeyboardInterrupt):
        run_training(_opts(tiny_base, out, **over))
    monkeypatch.undo()
    assert (out / "checkpoints" / "warmup" / "checkpoint-2").is_dir()
    assert not (out / "checkpoints" / "checkpoint-2").exists()

    resumed = run_training(_opts(tiny_base, out, resume=True, **over))
    assert resumed["global_steps"] == full["global_steps"] == 6
    assert resumed["train_loss"] == pytest.approx(full["train_loss"], rel=1e-6, abs=1e-9)
    a, b = load_file(str(tmp_path / "full" / "adapter_model.safetensors")), load_file(str(out / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    logged = [(r.get("phase"), r["step"]) for r in outputs.read_metrics(str(out / "metrics.jsonl"))
              if r.get("event") == "log" and "loss" in r]
    assert logged == [("warmup", s) for s in range(1, 5)] + [("train", s) for s in range(1, 7)]
    assert not (out / "checkpoints" / "warmup").exists()
