"""Training recipes (``rosa train --recipe``): what each sets, what overrides it, the warm-ups the paper recipe
scales to the run length, and that ``--recipe paper`` trains as the reference does (bf16 parameters and AdamW
state, no gradient clipping, per-sequence loss average checked against a hand computation)."""
import json

import pytest
import torch
from safetensors import safe_open
from transformers import TrainerCallback, TrainingArguments

from conftest import make_tiny_llama, run_rosa, save_tiny_base
from rosa_peft import RosaConfig, get_rosa_model
from rosa_peft.labelled_loss import labelled_loss, sequence_mean_nll
from rosa_peft.train import RosaTrainer, ScheduleConfig
from rosa_peft.train.recipes import RECIPE_OPTIONS, RECIPES, get_recipe
from rosa_peft.train.run import TrainOptions


def test_default_recipe_keeps_the_previous_defaults():
    opts = TrainOptions()
    assert opts.recipe == "default"
    assert (opts.dtype, opts.adapter_dtype, opts.max_grad_norm, opts.loss_average) == ("float32", "float32", 1.0, "token")
    assert (opts.lr, opts.lora_lr, opts.lr_warmup_steps, opts.warmup_steps) == (2e-4, 7e-4, 20, 64)
    opts.resolve_warmups(3)  # the default recipe never scales its warm-ups
    assert (opts.lr_warmup_steps, opts.warmup_steps) == (20, 64)


def test_paper_recipe_sets_the_reference_semantics_and_scales_warmups_to_the_run():
    opts = TrainOptions(recipe="paper")
    assert (opts.dtype, opts.adapter_dtype, opts.max_grad_norm, opts.loss_average) == (
        "bfloat16", "bfloat16", 0.0, "sequence")
    assert (opts.lr, opts.lora_lr) == (2e-4, 7e-4)
    assert (opts.lr_warmup_steps, opts.warmup_steps) == (None, None)  # known once the run's length is
    opts.resolve_warmups(64)  # 2,048 examples at batch 32: 64/160 of the reference's ViGGO epoch
    assert (opts.lr_warmup_steps, opts.warmup_steps) == (8, 26)
    long_run = TrainOptions(recipe="paper")
    long_run.resolve_warmups(234)  # a run as long as the reference's (GSM8K: 234 steps) keeps its numbers
    assert (long_run.lr_warmup_steps, long_run.warmup_steps) == (20, 64)
    tiny = TrainOptions(recipe="paper")
    tiny.resolve_warmups(1)
    assert (tiny.lr_warmup_steps, tiny.warmup_steps) == (1, 1)  # never below one step


def test_explicit_options_override_the_recipe():
    opts = TrainOptions(recipe="paper", lr=1e-3, dtype="float32", max_grad_norm=0.5, warmup_steps=5,
                        loss_average="token")
    assert (opts.lr, opts.dtype, opts.max_grad_norm, opts.loss_average) == (1e-3, "float32", 0.5, "token")
    assert opts.adapter_dtype == "bfloat16" and opts.lora_lr == 7e-4
    opts.resolve_warmups(64)
    assert (opts.warmup_steps, opts.lr_warmup_steps) == (5, 8)


def test_every_recipe_sets_every_recipe_option():
    for recipe in RECIPES.values():
        opts = TrainOptions(recipe=recipe.name)
        opts.resolve_warmups(10**6)
        assert {name: getattr(opts, name) for name in RECIPE_OPTIONS} == {
            name: getattr(recipe, name) for name in RECIPE_OPTIONS}


@pytest.mark.parametrize("kwargs, message", [
    ({"recipe": "nope"}, "unknown recipe 'nope'; choose one of default, paper"),
    ({"loss_average": "batch"}, "unknown loss average 'batch'; choose one of token, sequence"),
    ({"adapter_dtype": "float16"}, "unknown adapter dtype 'float16'; choose one of float32, bfloat16"),
    ({"max_grad_norm": -1}, "max_grad_norm must be >= 0, got -1.0"),
])
def test_bad_recipe_values_are_refused_naming_the_option(kwargs, message):
    with pytest.raises(ValueError) as exc:
        TrainOptions(**kwargs)
    assert str(exc.value) == message
    with pytest.raises(ValueError, match="unknown recipe"):
        get_recipe("nope")


def test_cli_layers_recipe_then_config_then_flags(tmp_path):
    import argparse

    from rosa_peft.train.command import add_arguments, options_from_args

    cfg = tmp_path / "c.yaml"
    cfg.write_text("recipe: paper\nlr: 3.0e-4\n")
    p = argparse.ArgumentParser()
    add_arguments(p)
    opts = options_from_args(p.parse_args(["--config", str(cfg), "--lora-lr", "1e-3"]))
    assert (opts.recipe, opts.lr, opts.lora_lr, opts.dtype, opts.loss_average) == (
        "paper", 3e-4, 1e-3, "bfloat16", "sequence")


# ---- the per-sequence loss ---------------------------------------------------------------------------
def _labels(ids, prompt_lengths):
    labels = ids.clone()
    for i, n in enumerate(prompt_lengths):
        labels[i, :n] = -100
    return labels


def test_sequence_mean_nll_is_the_mean_of_per_sequence_means():
    torch.manual_seed(0)
    logits = torch.randn(3, 7, 11, dtype=torch.float64)
    ids = torch.randint(0, 11, (3, 7))
    labels = _labels(ids, [2, 5, 7])  # 5, 2 and 0 predicted tokens: the last sequence has none
    expected = []
    for b in range(2):
        nll = [-torch.log_softmax(logits[b, t - 1], -1)[labels[b, t]] for t in range(1, 7) if labels[b, t] != -100]
        expected.append(sum(nll) / len(nll))
    assert torch.allclose(sequence_mean_nll(logits, labels), (expected[0] + expected[1]) / 2, rtol=0, atol=1e-12)
    token_mean = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 11).float(), labels[:, 1:].reshape(-1))
    assert abs(float(sequence_mean_nll(logits, labels)) - float(token_mean)) > 1e-3  # the two averages differ


def test_sequence_mean_nll_without_labels_is_zero_with_zero_gradient():
    logits = torch.randn(2, 4, 5, requires_grad=True)
    loss = sequence_mean_nll(logits, torch.full((2, 4), -100))
    loss.backward()
    assert float(loss.detach()) == 0.0 and torch.count_nonzero(logits.grad) == 0


def test_labelled_loss_sequence_reduction_equals_the_full_forward():
    model = get_rosa_model(make_tiny_llama(dtype=torch.float64), RosaConfig(r=2, density=0.1, adapter_dtype="float64"))
    model.set_masks({n: m for n, m in _random_masks(model).items()})
    ids = torch.randint(0, 128, (3, 9), generator=torch.Generator().manual_seed(2))
    labels = _labels(ids, [3, 6, 1])
    fast = labelled_loss(model.model, {"input_ids": ids, "labels": labels}, reduction="sequence")
    fast_grads = torch.autograd.grad(fast, [p for p in model.parameters() if p.requires_grad])
    full = sequence_mean_nll(model(input_ids=ids).logits, labels)
    full_grads = torch.autograd.grad(full, [p for p in model.parameters() if p.requires_grad])
    assert torch.allclose(fast, full, rtol=0, atol=1e-12)
    assert all(torch.allclose(a, b, rtol=0, atol=1e-12) for a, b in zip(fast_grads, full_grads))
    via_forward = model(input_ids=ids, labels=labels, loss_only=True, loss_reduction="sequence").loss
    assert torch.allclose(via_forward, full, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="loss_reduction='sequence' needs loss_only=True"):
        model(input_ids=ids, labels=labels, loss_reduction="sequence")


def _random_masks(model):
    from rosa_peft.masks import compute_masks

    return compute_masks(model, [], criterion="random", seed=0)


class _Data(torch.utils.data.Dataset):
    """Sequences whose responses differ in length, so per-sequence and per-token averages differ."""

    def __init__(self, n=8, seq=10):
        g = torch.Generator().manual_seed(1)
        self.ids = torch.randint(0, 128, (n, seq), generator=g)
        self.prompt = [1 + (3 * i) % (seq - 2) for i in range(n)]

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": _labels(self.ids[i : i + 1], [self.prompt[i]])[0]}


class _FirstStep(TrainerCallback):
    """The accumulated gradients just before the first optimizer step."""

    def __init__(self):
        self.grads = None

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if self.grads is None:
            self.grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("full_finetuning", [False, True])
def test_sequence_average_step_gradient_matches_a_hand_computation(tmp_path, full_finetuning):
    torch.manual_seed(0)
    base = make_tiny_llama()
    model = base.train() if full_finetuning else get_rosa_model(base, RosaConfig(r=2, density=0.0, lora_dropout=0.0))
    if not full_finetuning:
        for p in model.parameters():  # LoRA B starts at zero; make every factor matter for the comparison
            if p.requires_grad:
                torch.nn.init.normal_(p, std=0.1)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    args = TrainingArguments(
        output_dir=str(tmp_path / "ckpt"), max_steps=1, per_device_train_batch_size=2, gradient_accumulation_steps=2,
        learning_rate=1e-3, max_grad_norm=0.0, report_to=[], use_cpu=True, disable_tqdm=True, seed=3, data_seed=3,
        remove_unused_columns=False, save_strategy="no")
    seen, grads = [], _FirstStep()
    trainer = RosaTrainer(model=model, args=args, train_dataset=_Data(), callbacks=[grads], loss_average="sequence",
                          schedule=ScheduleConfig(mode="lora_only") if not full_finetuning else None)
    orig = trainer.compute_loss

    def recording(model, inputs, *a, **kw):
        seen.append({k: v.clone() for k, v in inputs.items()})
        return orig(model, inputs, *a, **kw)

    trainer.compute_loss = recording
    result = trainer.train()
    assert len(seen) == 2 and all(b["input_ids"].shape[0] == 2 for b in seen)

    # by hand: the same model at its starting weights, each sequence's mean NLL, the mean over the 4 sequences
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(start[n])
    per_sequence = []
    for batch in seen:
        logits = model(input_ids=batch["input_ids"]).logits.double()
        for b in range(batch["input_ids"].shape[0]):
            labels = batch["labels"][b]
            terms = [-torch.log_softmax(logits[b, t - 1], -1)[labels[t]] for t in range(1, len(labels))
                     if labels[t] != -100]
            per_sequence.append(torch.stack(terms).mean())
    by_hand = torch.stack(per_sequence).mean()
    names = [n for n, p in model.named_parameters() if p.requires_grad and p.numel()]
    assert sorted(grads.grads) == sorted(names)
    expected = torch.autograd.grad(by_hand, [dict(model.named_parameters())[n] for n in names])
    assert abs(result.training_loss - float(by_hand.detach())) < 1e-5
    for n, g in zip(names, expected):
        assert torch.allclose(grads.grads[n], g, rtol=1e-4, atol=1e-6), n


def test_sequence_average_refuses_a_custom_loss(tmp_path):
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=1, report_to=[], use_cpu=True)
    model = get_rosa_model(make_tiny_llama(), RosaConfig(r=2, density=0.0))
    with pytest.raises(ValueError, match="cannot be combined with compute_loss_func"):
        RosaTrainer(model=model, args=args, train_dataset=_Data(), loss_average="sequence",
                    compute_loss_func=lambda outputs, labels, num_items_in_batch=None: outputs.logits.sum())
    with pytest.raises(ValueError, match="loss_average must be one of token, sequence"):
        RosaTrainer(model=model, args=args, train_dataset=_Data(), loss_average="batch")


# ---- rosa train --recipe paper -----------------------------------------------------------------------
@pytest.mark.parametrize("recipe", ["default", "paper"])
def test_rosa_train_recipe_paper_trains_bf16_without_clipping(tmp_path, recipe, monkeypatch, smol_tokenizer,
                                                              one_thread):
    from accelerate import Accelerator

    clips, trainers = [], []
    orig_clip, orig_train = Accelerator.clip_grad_norm_, RosaTrainer.train

    def clip(self, parameters, max_norm, *a, **kw):
        clips.append(float(max_norm))
        return orig_clip(self, parameters, max_norm, *a, **kw)

    def train(self, *a, **kw):
        trainers.append(self)
        return orig_train(self, *a, **kw)

    monkeypatch.setattr(Accelerator, "clip_grad_norm_", clip)
    monkeypatch.setattr(RosaTrainer, "train", train)
    base = tmp_path / "base"
    save_tiny_base(base, smol_tokenizer)
    out = tmp_path / "run"
    rc, stdout, stderr = run_rosa(
        "train", "--model", base, "--task", "sql-synth", "--limit", 8, "--max-seq-len", 256, "--r", 2,
        "--density", 0.05, "--batch-size", 2, "--grad-accum", 2, "--recipe", recipe, "--no-progress",
        "--output-dir", out)
    assert rc == 0, stderr[-3000:]
    summary = json.loads((out / "run_config.json").read_text())
    trainer = trainers[0]
    adapter_params = [p for p in trainer.model.parameters() if p.requires_grad]
    states = [s for s in trainer.optimizer.state.values() if s]
    with safe_open(str(out / "adapter_model.safetensors"), "pt") as f:
        saved = {t.dtype for t in map(f.get_tensor, f.keys()) if t.is_floating_point()}
    if recipe == "paper":
        assert summary["global_steps"] == 2  # 8 examples, 4 per step
        assert (summary["lr_warmup_steps"], summary["warmup_steps"]) == (1, 1)  # 20 and 64 scaled by 2/160
        assert (summary["dtype"], summary["adapter_dtype"], summary["max_grad_norm"], summary["loss_average"]) == (
            "bfloat16", "bfloat16", 0.0, "sequence")
        # transformers still measures the norm (for the log and our divergence check) but never clips
        assert trainer.args.max_grad_norm == 0.0 and set(clips) <= {float("inf")}
        assert {p.dtype for p in adapter_params} == {torch.bfloat16} and saved == {torch.bfloat16}
        assert states and all(s["exp_avg"].dtype == s["exp_avg_sq"].dtype == torch.bfloat16 for s in states)
        assert next(trainer.model.model.parameters()).dtype == torch.bfloat16  # the base weights too
        assert trainer.loss_average == "sequence" and not trainer.model_accepts_loss_kwargs
    else:
        assert (summary["lr_warmup_steps"], summary["warmup_steps"], summary["max_grad_norm"]) == (20, 64, 1.0)
        assert 1.0 in clips and {p.dtype for p in adapter_params} == {torch.float32}
        assert all(s["exp_avg"].dtype == torch.float32 for s in states)



@pytest.mark.parametrize("task, r, density", [("gsm8k", 16, 0.018), ("viggo", 16, 0.006), ("sql", 4, 0.0045)])
def test_packaged_paper_configs_are_the_reference_runs(task, r, density):
    """``rosa train --config paper-TASK.yaml``: the reference's released bf16 run of that task (r, d, one epoch
    at global batch 32 = 1 x 32) under ``--recipe paper``."""
    import argparse

    from rosa_peft.train.command import add_arguments, options_from_args

    p = argparse.ArgumentParser()
    add_arguments(p)
    opts = options_from_args(p.parse_args(["--config", f"paper-{task}.yaml"]))
    assert (opts.recipe, opts.task, opts.method, opts.r, opts.density) == ("paper", task, "rosa", r, density)
    assert (opts.epochs, opts.batch_size, opts.grad_accum, opts.max_seq_len) == (1.0, 1, 32, 512)
    assert (opts.dtype, opts.adapter_dtype, opts.max_grad_norm, opts.loss_average, opts.lr, opts.lora_lr) == (
        "bfloat16", "bfloat16", 0.0, "sequence", 2e-4, 7e-4)
    opts.resolve_warmups(160)
    assert (opts.lr_warmup_steps, opts.warmup_steps) == (20, 64)
