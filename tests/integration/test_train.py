"""The one-process RoSA schedule on HF Trainer (tiny Llama, CPU, fp32)."""
import json
import os

import pytest
import torch
from transformers import TrainerCallback, TrainingArguments

from conftest import make_tiny_llama
from rosa_peft import RosaConfig, RosaModel, get_rosa_model
from rosa_peft.train import RosaTrainer, ScheduleConfig, init_adapter_weights, resolve_budget
from rosa_peft.train.budget import budget_units
from rosa_peft.train.outputs import MetricsWriter, read_metrics


class _Data(torch.utils.data.Dataset):
    def __init__(self, n=24, seq=12):
        g = torch.Generator().manual_seed(1)
        self.ids = torch.randint(0, 128, (n, seq), generator=g)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def _trainer(tmp_path, model, max_steps=6, schedule=None, callbacks=(), save_steps=0, listener=None):
    args = TrainingArguments(
        output_dir=str(tmp_path / "ckpt"), max_steps=max_steps, per_device_train_batch_size=2,
        gradient_accumulation_steps=2, learning_rate=5e-3, warmup_steps=1, logging_steps=1,
        save_strategy="steps" if save_steps else "no", save_steps=save_steps or 10, report_to=[], use_cpu=True,
        disable_tqdm=True, seed=3, data_seed=3, remove_unused_columns=False)
    return RosaTrainer(model=model, args=args, train_dataset=_Data(), schedule=schedule, lora_lr=1e-2,
                       callbacks=list(callbacks), phase_listener=listener)


def _rosa(seed=0, dropout=0.1):
    return get_rosa_model(make_tiny_llama(seed), RosaConfig(r=2, density=0.05, lora_dropout=dropout))


def test_one_process_schedule_phases_restart_and_reload(tmp_path, caplog):
    model = _rosa()
    phases = []
    warmed = {}

    def listener(phase, info):
        phases.append(phase)
        if phase == "masks":  # the warm-up has run: its LoRA weights are what the restart throws away
            warmed.update({n: l.lora_B["default"].weight.detach().clone() for n, l in model.rosa_layers()})

    sched = ScheduleConfig(mode="rosa", warmup_steps=3, mask_grad_steps=1, seed=7)
    trainer = _trainer(tmp_path, model, schedule=sched, listener=listener)
    masks_seen = {}
    orig = trainer.obtain_masks

    def spy(**kw):
        masks = orig(**kw)
        masks_seen.update(masks)
        fresh = _rosa(seed=0)
        init_adapter_weights(fresh, 7)
        assert any(w.abs().sum() > 0 for w in warmed.values())  # the warm-up moved B away from its zero init
        for (n, l), (_, f) in zip(model.rosa_layers(), fresh.rosa_layers()):
            # after the restart: exactly a fresh init from the schedule's seed
            assert torch.equal(l.lora_A["default"].weight, f.lora_A["default"].weight), n
            assert torch.equal(l.lora_B["default"].weight, f.lora_B["default"].weight), n
        return masks

    trainer.obtain_masks = spy
    with caplog.at_level("INFO", logger="rosa_peft.train"):
        trainer.train()
    assert phases == ["warmup", "masks", "train"]
    assert "phase -> warmup" in caplog.text and "phase -> masks" in caplog.text and "phase -> train" in caplog.text
    assert trainer.state.global_step == 6
    for name, layer in model.rosa_layers():
        sp = layer.rosa_spa["default"]
        assert sp.nnz == int(0.05 * layer.in_features * layer.out_features)
        assert torch.equal(sp.to_mask(), masks_seen[name])
        assert sp.values.abs().sum() > 0
    model.save_pretrained(tmp_path / "final")
    model.eval()
    ids = _Data()[0]["input_ids"][None]
    loaded = RosaModel.from_pretrained(make_tiny_llama(0), str(tmp_path / "final"))
    assert torch.equal(loaded(input_ids=ids).logits, model(input_ids=ids).logits)


def test_lr_schedule_of_warmup_matches_full_run(tmp_path):
    lrs = {}

    class Rec(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "learning_rate" in logs:
                lrs.setdefault(logs.get("phase"), []).append(logs["learning_rate"])

    model = _rosa()
    trainer = _trainer(tmp_path, model, max_steps=6, schedule=ScheduleConfig(warmup_steps=3, seed=7), callbacks=[Rec()])
    trainer.train()
    assert lrs["warmup"] == lrs["train"][:3]


def _assert_same_run(a, b):
    ma, mb = a.get_masks(), b.get_masks()
    assert list(ma) == list(mb) and all(torch.equal(ma[n], mb[n]) for n in ma)
    fa, fb = a.adapter_state_dict(), b.adapter_state_dict()
    assert fa.keys() == fb.keys()
    for k in fa:
        assert torch.equal(fa[k], fb[k]), k


class _StopAfter(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_save(self, args, state, control, **kw):
        if state.global_step >= self.step:
            control.should_training_stop = True


def test_resume_after_kill_matches_uninterrupted(tmp_path):
    sched = lambda: ScheduleConfig(mode="rosa", warmup_steps=2, seed=5)  # noqa: E731
    full = _rosa()
    _trainer(tmp_path / "a", full, max_steps=6, schedule=sched()).train()

    killed = _rosa()
    _trainer(tmp_path / "b", killed, max_steps=6, schedule=sched(), save_steps=3, callbacks=[_StopAfter(3)]).train()
    ckpt = tmp_path / "b" / "ckpt" / "checkpoint-3"
    assert (ckpt / "masks.safetensors").is_file() and (ckpt / "adapter_model.safetensors").is_file()
    assert json.loads((ckpt / "rosa_schedule.json").read_text())["phase"] == "train"

    resumed = _rosa()
    phases = []
    t = _trainer(tmp_path / "b", resumed, max_steps=6, schedule=sched(), save_steps=3,
                 listener=lambda p, info: phases.append(p))
    t.train(resume_from_checkpoint=str(ckpt))
    assert phases == ["masks", "train"]  # masks came from the checkpoint: no warm-up, no scoring
    _assert_same_run(full, resumed)


class _Killed(Exception):
    pass


class _KillInWarmup(TrainerCallback):
    """Dies right after the warm-up saved its checkpoint at ``step`` (what a SIGKILL then would leave)."""

    def __init__(self, step):
        self.step, self.trainer = step, None

    def on_save(self, args, state, control, **kw):
        if self.trainer.phase == "warmup" and state.global_step == self.step:
            raise _Killed


@pytest.mark.parametrize("how", ["true", "path"])
def test_kill_in_warmup_resumes_the_warmup_and_matches_uninterrupted(tmp_path, how):
    sched = lambda: ScheduleConfig(mode="rosa", warmup_steps=4, seed=5)  # noqa: E731
    full = _rosa()
    _trainer(tmp_path / "a", full, max_steps=8, schedule=sched()).train()
    assert not (tmp_path / "a" / "ckpt" / "warmup").exists()  # no checkpointing asked: no warm-up files

    killed = _rosa()
    kill = _KillInWarmup(2)
    t = _trainer(tmp_path / "b", killed, max_steps=8, schedule=sched(), save_steps=2, callbacks=[kill])
    kill.trainer = t
    with pytest.raises(_Killed):
        t.train()
    out = tmp_path / "b" / "ckpt"
    warm = out / "warmup" / "checkpoint-2"
    assert json.loads((warm / "rosa_schedule.json").read_text())["phase"] == "warmup"
    assert (warm / "adapter_model.safetensors").is_file() and (warm / "optimizer.pt").is_file()
    assert not [n for n in os.listdir(out) if n.startswith("checkpoint-")]  # the main run has none yet

    resumed = _rosa()
    events = []
    t = _trainer(tmp_path / "b", resumed, max_steps=8, schedule=sched(), save_steps=2,
                 listener=lambda p, info: events.append((p, info.get("resumed_from"))))
    t.train(resume_from_checkpoint=True if how == "true" else str(warm))
    assert events == [("warmup", str(warm)), ("masks", None), ("train", "-")]
    _assert_same_run(full, resumed)
    assert not (out / "warmup").exists()  # gone once the main run saved its first checkpoint
    assert sorted(n for n in os.listdir(out) if n.startswith("checkpoint-")) == [
        "checkpoint-2", "checkpoint-4", "checkpoint-6", "checkpoint-8"]


def _full_and_killed_at_phase(tmp_path, sched, max_steps: int, phase: str):
    """An uninterrupted run (returned) and one saving every 2 steps into ``tmp_path / "b"``, killed as it
    enters ``phase`` of the schedule (``masks``: after the warm-up; ``train``: after the scoring)."""
    full = _rosa()
    _trainer(tmp_path / "a", full, max_steps=max_steps, schedule=sched()).train()

    def die(entered, info):
        if entered == phase:
            raise _Killed

    with pytest.raises(_Killed):
        _trainer(tmp_path / "b", _rosa(), max_steps=max_steps, schedule=sched(), save_steps=2, listener=die).train()
    return full


def test_kill_while_scoring_takes_the_finished_warmup_without_another_step(tmp_path):
    sched = lambda: ScheduleConfig(mode="rosa", warmup_steps=4, seed=5)  # noqa: E731
    full = _full_and_killed_at_phase(tmp_path, sched, max_steps=8, phase="masks")
    warm = tmp_path / "b" / "ckpt" / "warmup"
    assert sorted(os.listdir(warm)) == ["checkpoint-2", "checkpoint-4"] and not (warm / "masks.safetensors").exists()

    resumed = _rosa()
    steps = []

    class Steps(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            steps.append(state.global_step)

    t = _trainer(tmp_path / "b", resumed, max_steps=8, schedule=sched(), save_steps=2, callbacks=[Steps()])
    t.train(resume_from_checkpoint=True)
    assert steps == list(range(1, 9))  # the warm-up took no fifth step: only the main run's 8
    _assert_same_run(full, resumed)


def test_kill_after_scoring_resumes_from_the_saved_masks(tmp_path):
    sched = lambda: ScheduleConfig(mode="rosa", warmup_steps=3, seed=5)  # noqa: E731
    full = _full_and_killed_at_phase(tmp_path, sched, max_steps=6, phase="train")
    warm = tmp_path / "b" / "ckpt" / "warmup"
    assert os.listdir(warm) == ["masks.safetensors"]  # the warm-up's checkpoints went once the masks were saved

    resumed = _rosa()
    phases = []
    t = _trainer(tmp_path / "b", resumed, max_steps=6, schedule=sched(), save_steps=2,
                 listener=lambda p, info: phases.append((p, info.get("source"))))
    t.train(resume_from_checkpoint=True)
    assert phases == [("masks", str(warm / "masks.safetensors")), ("train", None)]  # no warm-up, no scoring
    _assert_same_run(full, resumed)


def test_resume_with_nothing_saved_says_so(tmp_path):
    t = _trainer(tmp_path, _rosa(), max_steps=2, schedule=ScheduleConfig(mode="rosa", warmup_steps=1, seed=5))
    with pytest.raises(ValueError, match="no checkpoint found in"):
        t.train(resume_from_checkpoint=True)


def test_spa_only_and_lora_only_modes(tmp_path):
    spa = get_rosa_model(make_tiny_llama(), RosaConfig(r=0, density=0.05))
    phases = []
    _trainer(tmp_path / "s", spa, max_steps=2, schedule=ScheduleConfig(mode="spa_only", seed=1),
             listener=lambda p, i: phases.append(p)).train()
    assert phases == ["masks", "train"]
    assert all(l.rosa_spa["default"].values.abs().sum() > 0 for _, l in spa.rosa_layers())
    lora = get_rosa_model(make_tiny_llama(), RosaConfig(r=2))
    phases.clear()
    _trainer(tmp_path / "l", lora, max_steps=2, listener=lambda p, i: phases.append(p)).train()
    assert phases == ["train"] and not lora.get_masks()


def test_two_optimizer_groups(tmp_path):
    model = _rosa()
    model.set_masks({n: torch.rand(l.out_features, l.in_features) < 0.1 for n, l in model.rosa_layers()})
    opt = _trainer(tmp_path, model).create_optimizer()
    by_name = {g["name"]: g for g in opt.param_groups}
    assert by_name["sparse"]["lr"] == 5e-3 and by_name["lora"]["lr"] == 1e-2
    assert all(p.dim() == 1 for p in by_name["sparse"]["params"])


def test_budget_equalises_trainable_counts():
    base = make_tiny_llama()
    per_rank, total = budget_units(base)
    counts = {}
    for method in ("lora", "spa", "rosa"):
        r, d = resolve_budget(method, 8 * per_rank, per_rank, total)
        counts[method] = r * per_rank + sum(int(d * base.get_submodule(n).weight.numel())
                                            for n in [n for n, m in base.named_modules() if n.endswith("_proj")])
    assert max(counts.values()) / min(counts.values()) < 1.02, counts
    with pytest.raises(ValueError, match="too small"):
        resolve_budget("rosa", per_rank, per_rank, total)
    with pytest.raises(ValueError, match="too small"):
        resolve_budget("lora", per_rank // 3, per_rank, total)


def test_budget_arithmetic_by_hand():
    # per_rank 100, total 10,000: a 2,000 budget is 20 LoRA ranks
    assert resolve_budget("lora", 2_000, 100, 10_000) == (20, 0.0)
    assert resolve_budget("spa", 2_000, 100, 10_000) == (0, 0.2)
    assert resolve_budget("rosa", 2_000, 100, 10_000, rosa_lora_fraction=0.25) == (5, 0.15)
    with pytest.raises(ValueError, match="--budget applies to .*not 'fft'"):
        resolve_budget("fft", 2_000, 100, 10_000)
    with pytest.raises(ValueError, match="exceeds the 1,000 weight entries SpA can train"):
        resolve_budget("spa", 2_000, 100, 1_000)
    with pytest.raises(ValueError, match=r"rosa_lora_fraction must be in \(0, 1\)"):
        resolve_budget("rosa", 2_000, 100, 10_000, rosa_lora_fraction=1.0)


def test_method_registry_is_the_one_home_of_each_method():
    from rosa_peft.train.methods import METHODS, label_of

    assert list(METHODS) == ["rosa", "lora", "spa", "fft"]
    rosa, lora, spa, fft = (METHODS[n] for n in ("rosa", "lora", "spa", "fft"))
    assert rosa.resolve() == (16, 0.006) and lora.resolve() == (32, 0.0) and spa.resolve() == (0, 0.012)
    assert fft.resolve(r=4, density=0.1) == (0, 0.0)  # full fine-tuning has neither part
    assert lora.resolve(8, 0.5) == (8, 0.0) and spa.resolve(8, 0.5) == (0, 0.5)
    with pytest.raises(ValueError, match="--method lora needs --r >= 1"):
        lora.resolve(r=0)
    with pytest.raises(ValueError, match="--method spa needs --density > 0"):
        spa.resolve(density=0.0)
    assert [m.schedule() for m in (rosa, lora, spa, fft)] == ["rosa", "lora_only", "spa_only", "lora_only"]
    assert [m.schedule(masks_file=True) for m in (rosa, lora, spa, fft)] == ["masks_file", "lora_only",
                                                                             "masks_file", "lora_only"]
    assert [m.wraps_adapter for m in (rosa, lora, spa, fft)] == [True, True, True, False]
    assert fft.weight_files[0] == "model.safetensors" and rosa.weight_files == ("adapter_model.safetensors",)
    assert (rosa.cell_name(16, 0.006), lora.cell_name(8, 0.0), spa.cell_name(0, 0.023), fft.cell_name(0, 0.0),
            lora.cell_name(None, None, 1200)) == ("rosa-r16-d0.006", "lora-r8", "spa-d0.023", "fft", "lora-b1200")
    assert [label_of(n) for n in ("rosa", "LoRA", "spa", "fft", "other")] == ["RoSA", "LoRA", "SpA", "FFT", "other"]
    assert sorted(METHODS, key=lambda n: METHODS[n].table_order) == ["lora", "rosa", "spa", "fft"]


def test_bench_budget_uses_the_training_split():
    from rosa_peft.bench.methods import Budget
    from rosa_peft.train.methods import METHODS

    shapes = {"a": (64, 32), "b": (32, 96)}
    b = Budget.for_shapes(shapes, lora_rank=8, rosa_rank=3)
    per_rank, numel = 64 + 32 + 32 + 96, 64 * 32 + 32 * 96
    assert b.target == 8 * per_rank
    assert b.spa_density == 8 * per_rank / numel and b.rosa_density == (8 - 3) * per_rank / numel
    assert b.rank_density("lora") == (8, 0.0) and b.rank_density("spa") == (0, b.spa_density)
    assert b.rank_density("rosa") == METHODS["rosa"].at_budget(8, 3, per_rank, numel) == (3, b.rosa_density)


@pytest.mark.parametrize("values, needle", [
    ({"method": "qlora"}, "unknown method 'qlora'; choose one of rosa, lora, spa, fft"),
    ({"mask_criterion": "wanda"}, "unknown mask criterion 'wanda'"),
    ({"mask_budget": "row"}, "unknown mask budget 'row'"),
    ({"dtype": "int8"}, "unknown dtype 'int8'"),
    ({"quantize": "int4"}, "unknown quantize 'int4'"),
    ({"quant_backend": "gptq"}, "unknown quant backend 'gptq'"),
    ({"grad_accum": 0}, "grad_accum must be >= 1"),
    ({"dtype": "float16"}, "--dtype float16 is not supported for training"),
    ({"task": "jsonl"}, "--task jsonl needs --data PATH"),
    ({"data": "x.jsonl"}, "--data is for --task jsonl"),
    ({"method": "lora", "r": 0}, "--method lora needs --r >= 1"),
    ({"method": "rosa", "density": 0.0}, "--method rosa needs --density > 0"),
    ({"budget": 1000, "density": 0.01}, "give either --budget or --r/--density, not both"),
    ({"budget": 1000, "rosa_lora_fraction": 0.0}, "rosa_lora_fraction must be in (0, 1)"),
    ({"method": "fft", "quantize": "nf4"}, "full fine-tuning (fft) cannot train a quantized model"),
])
def test_train_options_are_checked_when_built(values, needle):
    from rosa_peft.train.run import TrainOptions

    with pytest.raises(ValueError) as err:
        TrainOptions(**values)
    assert needle in str(err.value)


def test_metrics_writer(tmp_path):
    w = MetricsWriter(str(tmp_path / "m.jsonl"))
    w.phase("warmup", {"steps": 3})
    recs = read_metrics(str(tmp_path / "m.jsonl"))
    assert recs[0]["event"] == "phase" and recs[0]["phase"] == "warmup"
    assert os.path.getsize(tmp_path / "m.jsonl") > 0


def test_no_deprecated_checkpointing_or_sparse_beta_warnings(tmp_path):
    """TrainingArguments built as run_training builds them warn nothing about `gradient_checkpointing`, and
    our CSR ops warn nothing about torch's sparse beta (run in a fresh process: torch warns only once)."""
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent(f"""
        import warnings
        import torch
        from transformers import TrainingArguments
        from rosa_peft.sparse import SparseAdapter, ops
        from rosa_peft.train.run import _checkpointing_args

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for on in (False, True):
                args = TrainingArguments(output_dir={str(tmp_path)!r}, use_cpu=True, report_to=[],
                                         **_checkpointing_args(on))
                assert bool(getattr(args, "activation_checkpointing", args.gradient_checkpointing)) is on
            sp = SparseAdapter(4, 6, torch.float32)
            sp.set_mask(torch.rand(4, 6, generator=torch.Generator().manual_seed(0)) < 0.5)
            x, g = torch.randn(3, 6), torch.randn(3, 4)
            y = ops.spmm(x, sp, torch.randn(sp.nnz))
            s = ops.sddmm_sampled_addmm(g, x, sp)
            assert torch.allclose(s, ops.sddmm_dense_gather(g, x, sp), atol=1e-5)
        bad = [str(w.message)[:90] for w in caught
               if "gradient_checkpointing" in str(w.message) or "Sparse" in str(w.message)]
        assert not bad, bad
        print("clean")
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "clean" in proc.stdout, proc.stderr[-3000:]
    assert "Sparse CSR tensor support is in beta" not in proc.stderr
    assert "gradient_checkpointing` is deprecated" not in proc.stderr
