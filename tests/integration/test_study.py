"""`rosa study`: grid expansion, cells, resume (no retraining, identical table), redo of a half cell, bad configs."""
import argparse
import json
import os
import re

import pytest
import torch
import yaml
from conftest import REPO

from rosa_peft.study import command, load_config
from rosa_peft.study.config import StudyConfigError

from conftest import save_tiny_base

METHODS = [{"method": "rosa", "r": 2, "density": 0.05}, {"method": "lora", "r": 2}, {"method": "fft"},
           {"method": "rosa", "budget": 4096}]  # tiny Llama: one LoRA rank = 1,024 params -> r=2 + sparse half
TRAIN = {"max_steps": 2, "limit": 4, "batch_size": 1, "grad_accum": 1, "max_seq_len": 128, "warmup_steps": 1,
         "lr_warmup_steps": 1, "logging_steps": 1}
EVAL = {"limit": 2, "max_new_tokens": 4, "batch_size": 2}


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory, smol_tokenizer):
    root = tmp_path_factory.mktemp("study_base")
    save_tiny_base(root / "base", smol_tokenizer)
    return root / "base"


def write_config(path, out, model, **over):
    cfg = {"output_dir": str(out), "model": str(model), "tasks": ["sql-synth"], "methods": METHODS,
           "seeds": [0, 1], "train": TRAIN, "eval": EVAL, **over}
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def rosa_study(*argv):
    parser = argparse.ArgumentParser()
    command.add_arguments(parser)
    return command.run(parser.parse_args([str(a) for a in argv]))


def test_cli_maps_study_to_this_module():
    from rosa_peft.cli import SUBCOMMANDS

    assert SUBCOMMANDS["study"][0] == "rosa_peft.study.command"


def test_grid_expansion_counts_and_names(tmp_path):
    cfg = write_config(tmp_path / "s.yaml", tmp_path / "out", "m", tasks=["sql-synth", "viggo"],
                       methods=METHODS + [{"method": "spa", "density": 0.01}, {"method": "rosa", "budget": 1000}])
    study = load_config(str(cfg))
    assert len(study.cells) == 2 * 6 * 2
    names = [c.name for c in study.cells]
    assert names[:6] == ["sql-synth-rosa-r2-d0.05-s0", "sql-synth-rosa-r2-d0.05-s1", "sql-synth-lora-r2-s0",
                         "sql-synth-lora-r2-s1", "sql-synth-fft-s0", "sql-synth-fft-s1"]
    assert "viggo-spa-d0.01-s1" in names and "viggo-rosa-b1000-s0" in names
    assert len(set(names)) == len(names)
    assert study.output_dir == str(tmp_path / "out")
    cell = study.cells[0]
    assert cell.train["max_steps"] == 2 and cell.eval["limit"] == 2 and cell.seed == 0


def test_task_overrides_and_default_r_d(tmp_path):
    cfg = write_config(tmp_path / "s.yaml", tmp_path / "out", "m", methods=[{"method": "rosa"}, "lora"], seeds=[3],
                       task_overrides={"sql-synth": {"train": {"max_steps": 5}, "eval": {"limit": 1}}})
    study = load_config(str(cfg))
    assert [c.name for c in study.cells] == ["sql-synth-rosa-r16-d0.006-s3", "sql-synth-lora-r32-s3"]
    assert study.cells[0].train["max_steps"] == 5 and study.cells[0].eval == {**EVAL, "limit": 1}


@pytest.mark.parametrize("over, key", [
    ({"bogus": 1}, "bogus"),
    ({"tasks": ["nope"]}, "tasks[0]"),
    ({"tasks": ["jsonl"]}, "tasks[0]"),
    ({"methods": [{"method": "qlora"}]}, "methods[0].method"),
    ({"methods": [{"method": "rosa", "r": "eight"}]}, "methods[0].r"),
    ({"methods": [{"method": "lora", "r": 2, "rank": 2}]}, "methods[0]: unknown key(s) rank"),
    ({"methods": [{"method": "rosa", "r": 2, "budget": 10}]}, "methods[0]: give either budget"),
    ({"methods": [{"method": "lora", "r": 2}, {"method": "lora", "r": 2}]}, "share a directory"),
    ({"seeds": [0, "one"]}, "seeds"),
    ({"train": {"max_steps": "2"}}, "train.max_steps"),
    ({"train": {"seed": 1}}, "train: unknown key(s) seed"),
    ({"eval": {"limit": 0}}, "eval.limit"),
    ({"eval": {"dtype": "float16"}}, "eval.dtype: expected one of float32, bfloat16"),
    ({"eval": {"merge": "yes"}}, "eval.merge: expected true or false"),
    ({"task_overrides": {"viggo": {}}}, "task_overrides: unknown key(s) viggo"),
    ({"task_overrides": {"sql-synth": {"train": {"lr": "fast"}}}}, "task_overrides.sql-synth.train.lr"),
])
def test_bad_config_names_the_key_and_writes_nothing(tmp_path, over, key):
    out = tmp_path / "out"
    cfg = write_config(tmp_path / "s.yaml", out, tmp_path / "no-model", **over)
    with pytest.raises(StudyConfigError) as err:
        rosa_study(cfg, "--no-progress")
    assert key in str(err.value) and str(cfg) in str(err.value)
    assert not out.exists()


def test_bad_data_dir_fails_before_training(tmp_path, monkeypatch):
    from rosa_peft.train import run as train_run

    monkeypatch.setattr(train_run, "run_training", lambda opts: pytest.fail("trained"))
    cfg = write_config(tmp_path / "s.yaml", tmp_path / "out", tmp_path / "m", tasks=["viggo"],
                       data_dir=str(tmp_path / "missing"))
    with pytest.raises((ValueError, FileNotFoundError), match="missing"):
        rosa_study(cfg, "--no-progress")
    assert not (tmp_path / "out" / "cells").exists()


def _table_numbers(md):
    return re.findall(r"\| (sql-synth-\S+) \| (\d+) \| ([\d.]+) \| (\d+) \| ([\d.]+) \| (\d+) \| ([\d.]+) \|", md)


def test_study_runs_resumes_and_redoes_half_cells(tmp_path, tiny_base, monkeypatch, capsys):
    out = tmp_path / "results"
    cfg = write_config(tmp_path / "s.yaml", out, tiny_base)
    assert rosa_study(cfg, "--dry-run") == 0
    listing = capsys.readouterr().out
    assert listing.count(" todo") == 8 and "0 finished, 8 to run" in listing
    assert not out.exists()

    assert rosa_study(cfg, "--no-progress", "--in-process") == 0
    cells = sorted(os.listdir(out / "cells"))
    assert len(cells) == 8
    records = {}
    for name in cells:
        d = out / "cells" / name
        rec = json.loads((d / "cell.json").read_text())
        assert rec["format"] == "rosa-study-cell/1" and rec["cell"] == name
        assert rec["train"]["global_steps"] == 2 and rec["train"]["trainable_params"] > 0
        assert rec["eval"]["summary"]["n"] == 2
        assert (d / rec["eval"]["report"]).is_file() and (d / "run_config.json").is_file()
        records[name] = rec
    assert records["sql-synth-rosa-r2-d0.05-s0"]["train"]["r"] == 2
    assert records["sql-synth-lora-r2-s1"]["train"]["density"] == 0.0

    # every number of the per-cell table and results.json traces to a cell.json
    md = (out / "results.md").read_text()
    rows = _table_numbers(md)
    assert len(rows) == 8
    for name, seed, acc, n, loss, steps, ttime in rows:
        rec = records[name]
        assert int(seed) == rec["seed"] and int(n) == rec["eval"]["summary"]["n"]
        assert acc == f"{100 * rec['eval']['summary']['accuracy']:.1f}"
        assert loss == f"{rec['train']['train_loss']:.4f}" and int(steps) == rec["train"]["global_steps"]
        assert ttime == f"{rec['train']['train_time_s']:.1f}"
    results = json.loads((out / "results.json").read_text())
    for c in results["cells"]:
        rec = json.loads((out / c["cell_json"]).read_text())
        assert c["train_loss"] == rec["train"]["train_loss"] and c["eval"] == rec["eval"]["summary"]
    agg = {(a["entry"]): a for a in results["aggregate"]}
    assert set(agg) == {"rosa-r2-d0.05", "lora-r2", "fft", "rosa-b4096"}
    assert agg["rosa-b4096"]["r"] == 2 and 0 < agg["rosa-b4096"]["density"] < 1
    losses = [records[f"sql-synth-lora-r2-s{s}"]["train"]["train_loss"] for s in (0, 1)]
    assert agg["lora-r2"]["train_loss"]["mean"] == pytest.approx(sum(losses) / 2)
    assert agg["lora-r2"]["seeds"] == [0, 1] and agg["fft"]["trainable_params"] > agg["lora-r2"]["trainable_params"]
    assert "LoRA (lora-r2)" in md and " ± " in md

    # rosa cells record their mask structure; the figures are drawn from the cell files
    rosa_rec = records["sql-synth-rosa-r2-d0.05-s0"]
    structure = json.loads((out / "cells" / "sql-synth-rosa-r2-d0.05-s0" / "mask_structure.json").read_text())
    assert rosa_rec["masks"]["overall"] == structure["overall"] and structure["heatmaps"]
    assert rosa_rec["masks"]["overall"]["density"] == pytest.approx(0.05, rel=0.05)
    assert "masks" not in records["sql-synth-lora-r2-s0"]
    assert "## Mask structure" in md and f"| sql-synth-rosa-r2-d0.05-s0 | {100 * structure['overall']['density']:.2f} |" in md
    for png in ("results.png", "loss.png", "masks.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"

    # a second run trains nothing and regenerates the same table
    from rosa_peft.train import run as train_run

    def no_training(opts):
        raise AssertionError(f"trained {opts.output_dir}")

    monkeypatch.setattr(train_run, "run_training", no_training)
    before = {p: (out / p).read_bytes() for p in ("results.md", "results.json")}
    (out / "results.md").unlink()
    assert rosa_study(cfg, "--no-progress") == 0
    assert {p: (out / p).read_bytes() for p in before} == before
    monkeypatch.undo()

    # a half-finished cell (no cell.json) is removed and redone; the others are skipped
    half = out / "cells" / "sql-synth-lora-r2-s1"
    (half / "cell.json").unlink()
    (half / "junk.txt").write_text("left over")
    capsys.readouterr()
    assert rosa_study(cfg, "--dry-run") == 0
    assert re.search(r"sql-synth-lora-r2-s1\s+partial", capsys.readouterr().out)
    trained = []
    real = train_run.run_training
    monkeypatch.setattr(train_run, "run_training", lambda opts: trained.append(opts.output_dir) or real(opts))
    assert rosa_study(cfg, "--no-progress", "--in-process") == 0
    assert trained == [str(half)]
    assert (half / "cell.json").is_file() and not (half / "junk.txt").exists()

    # a finished cell whose settings changed is an error, not silently reused
    changed = write_config(tmp_path / "s2.yaml", out, tiny_base, train={**TRAIN, "max_steps": 3})
    with pytest.raises(StudyConfigError, match="other settings"):
        rosa_study(changed, "--no-progress")


def test_entry_seeds_and_train_overrides(tmp_path):
    methods = [{"method": "lora", "r": 2, "seeds": [0, 1, 2]}, {"method": "fft", "train": {"lr": 1e-5}}]
    study = load_config(str(write_config(tmp_path / "s.yaml", tmp_path / "out", "m", methods=methods, seeds=[5])))
    assert [c.name for c in study.cells] == ["sql-synth-lora-r2-s0", "sql-synth-lora-r2-s1", "sql-synth-lora-r2-s2",
                                             "sql-synth-fft-s5"]
    assert study.cells[-1].train == {**TRAIN, "lr": 1e-5} and study.cells[0].train == TRAIN
    for bad, key in (({"method": "lora", "seeds": [1, 1]}, "methods[0].seeds"),
                     ({"method": "fft", "train": {"seed": 3}}, "methods[0].train: unknown key(s) seed"),
                     ({"method": "fft", "train": {"lr": "x"}}, "methods[0].train.lr")):
        with pytest.raises(StudyConfigError, match=re.escape(key)):
            load_config(str(write_config(tmp_path / "b.yaml", tmp_path / "out", "m", methods=[bad])))


def test_cells_run_in_their_own_process_and_in_parts(tmp_path, tiny_base):
    out = tmp_path / "results"
    cfg = write_config(tmp_path / "s.yaml", out, tiny_base, methods=[{"method": "rosa", "r": 2, "density": 0.05}])
    assert rosa_study(cfg, "--no-progress", "--cells", "*-s1") == 0  # a fresh process per cell (the default)
    assert sorted(os.listdir(out / "cells")) == ["sql-synth-rosa-r2-d0.05-s1"]
    assert not (out / "results.md").exists()  # the grid is not finished: no table yet
    rec = json.loads((out / "cells" / "sql-synth-rosa-r2-d0.05-s1" / "cell.json").read_text())
    assert rec["train"]["peak_rss_mb"] > 0 and rec["masks"]["file"] == "mask_structure.json"
    with pytest.raises(StudyConfigError, match="no cell matches"):
        rosa_study(cfg, "--cells", "viggo-*")
    assert rosa_study(cfg, "--no-progress", "--in-process", "--cells", "*-s0") == 0
    assert "sql-synth-rosa-r2-d0.05-s1" in (out / "results.md").read_text()


@pytest.mark.parametrize("method", [{"method": "rosa", "r": 2, "density": 0.05}, {"method": "fft"}])
def test_paper_recipe_cell_is_evaluated_in_bf16_merged(tmp_path, tiny_base, method):
    out = tmp_path / "results"
    cfg = write_config(tmp_path / "s.yaml", out, tiny_base, methods=[method], seeds=[0],
                       train={**TRAIN, "recipe": "paper"}, eval={**EVAL, "dtype": "bfloat16", "merge": True})
    assert rosa_study(cfg, "--no-progress", "--in-process") == 0
    (cell,) = (out / "cells").iterdir()
    run = json.loads((cell / "run_config.json").read_text())
    assert (run["recipe"], run["dtype"], run["adapter_dtype"], run["loss_average"]) == (
        "paper", "bfloat16", "bfloat16", "sequence")
    rec = json.loads((cell / "cell.json").read_text())
    report = json.loads((cell / rec["eval"]["report"]).read_text())
    assert report["model"]["dtype"] == "bfloat16"
    assert report["model"]["merged"] is (method["method"] == "rosa")  # full fine-tuning has nothing to merge


# SmolLM2-135M: one LoRA rank over all linear weights = 305,280 parameters; the linear weights hold 106,168,320
SMOL_RANK_UNIT, SMOL_LINEAR = 305_280, 106_168_320


@pytest.mark.parametrize("name, task", [("study-viggo.yaml", "viggo"), ("study-sql.yaml", "sql")])
def test_shipped_study_configs(name, task):
    """The configs behind docs/results.md: 3 budgets x (LoRA, SpA, two RoSA mixes) + FFT, equal budgets."""
    root = str(REPO)
    study = load_config(os.path.join(root, "configs", name))
    assert study.tasks == [task] and len(study.cells) == 17
    budgets = {}
    for e in study.entries:
        if e["method"] == "fft":
            continue
        units = (e.get("r") or 0) + (e.get("density") or 0) * SMOL_LINEAR / SMOL_RANK_UNIT
        budgets.setdefault(round(units), []).append(e["method"])
        assert units == pytest.approx(round(units), rel=0.01), e["name"]
    assert {b: sorted(m) for b, m in budgets.items()} == {b: ["lora", "rosa", "rosa", "spa"] for b in (4, 8, 16)}
    two_seeds = {c.entry for c in study.cells if c.seed == 1}
    assert two_seeds == {"lora-r8", "rosa-r6-d0.0058", "spa-d0.023", "fft"}


@pytest.mark.parametrize("name, task, train_limit, eval_limit", [
    ("study-sql-full.yaml", "sql", None, None), ("study-viggo-2k.yaml", "viggo", 2048, 300),
    ("study-viggo-gpu.yaml", "viggo", None, None), ("study-gsm8k-gpu.yaml", "gsm8k", None, None)])
def test_shipped_full_scale_study_configs(name, task, train_limit, eval_limit):
    """The grids of issue #15 (and their GPU variants): the middle budget's LoRA, two RoSA mixes, SpA and FFT at
    seeds 0/1/2, a three-point LR sweep at seed 0 for LoRA, SpA and FFT, the paper recipe at global batch 32,
    bf16 merged evaluation."""
    study = load_config(os.path.join(str(REPO), "configs", name))
    assert study.tasks == [task] and len(study.cells) == 21
    main = {"lora-r8", "rosa-r6-d0.0058", "rosa-r4-d0.0115", "spa-d0.023", "fft"}
    for seed in (0, 1, 2):
        assert {c.entry for c in study.cells if c.seed == seed} >= main
    for e in study.entries:
        if e["method"] != "fft":
            units = (e.get("r") or 0) + (e.get("density") or 0) * SMOL_LINEAR / SMOL_RANK_UNIT
            assert units == pytest.approx(8, rel=0.01), e["name"]
    swept = {}
    for c in study.cells:
        opts = c.train_options(study, "unused")
        assert (opts.recipe, opts.batch_size * opts.grad_accum, opts.epochs) == ("paper", 32, 1.0)
        assert (opts.loss_average, opts.max_grad_norm, opts.adapter_dtype) == ("sequence", 0.0, "bfloat16")
        # full fine-tuning keeps float32 master weights under bf16 autocast; the adapters train in pure bf16
        assert (opts.dtype, opts.bf16) == (("float32", True) if c.method == "fft" else ("bfloat16", False))
        assert opts.limit == train_limit
        assert (c.eval.get("dtype"), c.eval.get("merge"), c.eval.get("limit")) == ("bfloat16", True, eval_limit)
        if c.entry not in main:
            assert c.seed == 0
        lr = opts.lora_lr if c.method == "lora" else opts.lr
        swept.setdefault(c.method, set()).add(lr)
    for method, centre in (("lora", 7e-4), ("spa", 2e-4), ("fft", 4e-5)):
        low, mid, high = sorted(swept[method])
        assert mid == centre and low == pytest.approx(centre / 3, rel=0.05) and high == pytest.approx(centre * 3, rel=0.05)


def _plain_and_killed_rosa_cell(tmp_path, tiny_base, monkeypatch, train_over: dict, phase: str, step: int):
    """One RoSA cell (seed 0) trained uninterrupted into ``tmp_path / "plain"``, and the same cell with
    ``checkpoint_steps: 1`` killed right after logging ``step`` of ``phase`` (so that step's checkpoint is
    never written). Returns (the killed study's config, its output directory)."""
    from rosa_peft.train import outputs

    methods = [{"method": "rosa", "r": 2, "density": 0.05}]
    train = {**TRAIN, **train_over, "lora_dropout": 0.0}
    plain = write_config(tmp_path / "plain.yaml", tmp_path / "plain", tiny_base, methods=methods, seeds=[0],
                         train=train)
    assert rosa_study(plain, "--no-progress", "--in-process") == 0

    out = tmp_path / "ckpt"
    cfg = write_config(tmp_path / "s.yaml", out, tiny_base, methods=methods, seeds=[0], train=train,
                       checkpoint_steps=1)
    real_on_log = outputs.MetricsWriter.on_log

    def kill_after_logging(self, args, state, control, logs=None, **kw):
        real_on_log(self, args, state, control, logs=logs, **kw)
        if logs and logs.get("phase") == phase and state.global_step == step:
            raise KeyboardInterrupt

    monkeypatch.setattr(outputs.MetricsWriter, "on_log", kill_after_logging)
    with pytest.raises(KeyboardInterrupt):
        rosa_study(cfg, "--no-progress", "--in-process")
    monkeypatch.undo()
    return cfg, out


def test_checkpointed_cell_continues_after_a_kill_and_matches_an_uninterrupted_one(tmp_path, tiny_base, monkeypatch,
                                                                                 capsys):
    from safetensors.torch import load_file

    from rosa_peft.train import outputs
    from rosa_peft.train import run as train_run

    name = "sql-synth-rosa-r2-d0.05-s0"
    cfg, out = _plain_and_killed_rosa_cell(tmp_path, tiny_base, monkeypatch, {"max_steps": 3}, "train", 2)
    cell = out / "cells" / name
    partial = out / "cells" / f"{name}.partial.json"
    assert not (cell / "cell.json").exists() and partial.is_file()
    # save_total_limit 1: only the newest checkpoint, next to the options the run started with
    assert sorted(os.listdir(cell / "checkpoints")) == ["checkpoint-1", "run_options.json"]
    capsys.readouterr()
    assert rosa_study(cfg, "--dry-run") == 0
    assert f"{name}  partial (continues from checkpoints/checkpoint-1)" in capsys.readouterr().out

    resumed = []
    real = train_run.run_training
    monkeypatch.setattr(train_run, "run_training", lambda opts: resumed.append(opts.resume) or real(opts))
    assert rosa_study(cfg, "--no-progress", "--in-process") == 0
    assert resumed == [True]
    assert sorted(os.listdir(out / "cells")) == [name]  # the spec file and the checkpoints are gone once finished
    assert not (cell / "checkpoints").exists()
    steps = [r["step"] for r in outputs.read_metrics(str(cell / "metrics.jsonl"))
             if r.get("event") == "log" and r.get("phase") == "train" and "loss" in r]
    assert steps == [1, 2, 3]  # step 2, logged by the killed session, is not there twice

    ref = tmp_path / "plain" / "cells" / name
    a, b = load_file(str(ref / "adapter_model.safetensors")), load_file(str(cell / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    rec, ref_rec = (json.loads((d / "cell.json").read_text()) for d in (cell, ref))
    assert rec["spec"] == ref_rec["spec"] and rec["eval"]["summary"] == ref_rec["eval"]["summary"]
    assert rec["train"]["train_loss"] == pytest.approx(ref_rec["train"]["train_loss"], rel=1e-6)

    # a partial cell whose stored spec is not the config's starts over instead of continuing
    (cell / "cell.json").unlink()
    (out / "cells" / f"{name}.partial.json").write_text(json.dumps({"seed": 99}))
    (cell / "checkpoints" / "checkpoint-3").mkdir(parents=True)
    resumed.clear()
    assert rosa_study(cfg, "--no-progress", "--in-process") == 0
    assert resumed == [False] and (cell / "cell.json").is_file()

    with pytest.raises(StudyConfigError, match="checkpoint_steps: expected an integer >= 0"):
        load_config(str(write_config(tmp_path / "b.yaml", out, tiny_base, checkpoint_steps=-1)))


def test_cell_killed_in_its_warmup_continues_the_warmup(tmp_path, tiny_base, monkeypatch, capsys):
    from safetensors.torch import load_file

    from rosa_peft.train import outputs

    name = "sql-synth-rosa-r2-d0.05-s0"
    cfg, out = _plain_and_killed_rosa_cell(tmp_path, tiny_base, monkeypatch, {"max_steps": 2, "warmup_steps": 3},
                                           "warmup", 2)
    cell = out / "cells" / name
    assert sorted(os.listdir(cell / "checkpoints" / "warmup")) == ["checkpoint-1"]
    capsys.readouterr()
    assert rosa_study(cfg, "--dry-run") == 0
    assert f"{name}  partial (continues from checkpoints/warmup/checkpoint-1)" in capsys.readouterr().out

    assert rosa_study(cfg, "--no-progress", "--in-process") == 0
    assert not (cell / "checkpoints").exists()
    logged = [(r["phase"], r["step"]) for r in outputs.read_metrics(str(cell / "metrics.jsonl"))
              if r.get("event") == "log" and "loss" in r]
    assert logged == [("warmup", 1), ("warmup", 2), ("warmup", 3), ("train", 1), ("train", 2)]
    ref = tmp_path / "plain" / "cells" / name
    a, b = load_file(str(ref / "adapter_model.safetensors")), load_file(str(cell / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    ma, mb = load_file(str(ref / "masks.safetensors")), load_file(str(cell / "masks.safetensors"))
    assert ma.keys() == mb.keys() and all(torch.equal(ma[k], mb[k]) for k in ma)
