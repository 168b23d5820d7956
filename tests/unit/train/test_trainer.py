"""A diverging run stops where it diverges: NaN/inf loss or gradient norm -> NonFiniteLossError naming the
step (RosaTrainer) and, through ``rosa train``, exit 2 with one error line and no final adapter; metrics.jsonl
stays strict JSON; a dead model (loss at ln|V|, gradient norm 0) is warned about once."""
import json
import logging
import math

import pytest
import torch
from transformers import TrainingArguments

from conftest import make_tiny_llama, run_rosa
from rosa_peft import RosaConfig, get_rosa_model
from rosa_peft.train import RosaTrainer, ScheduleConfig
from rosa_peft.train.outputs import MetricsWriter
from rosa_peft.train.trainer import NonFiniteLossError


def _strict_records(path):
    """Every line of a metrics.jsonl as JSON; NaN / Infinity tokens are not JSON and fail."""
    def refuse(token):
        raise AssertionError(f"{path}: non-JSON constant {token}")

    with open(path, encoding="utf-8") as fh:
        return [json.loads(line, parse_constant=refuse) for line in fh if line.strip()]


class _Data(torch.utils.data.Dataset):
    def __init__(self, n=16, seq=10):
        self.ids = torch.randint(0, 128, (n, seq), generator=torch.Generator().manual_seed(1))

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def _trainer(tmp_path, max_steps=6, save_steps=0, metrics=None):
    model = get_rosa_model(make_tiny_llama(), RosaConfig(r=2, density=0.05))
    args = TrainingArguments(
        output_dir=str(tmp_path / "ckpt"), max_steps=max_steps, per_device_train_batch_size=2,
        gradient_accumulation_steps=2, learning_rate=5e-3, warmup_steps=1, logging_steps=1,
        save_strategy="steps" if save_steps else "no", save_steps=save_steps or 10, report_to=[], use_cpu=True,
        disable_tqdm=True, seed=3, data_seed=3, remove_unused_columns=False)
    assert args.logging_nan_inf_filter  # the Trainer's filter is on (its default) and must not hide the NaN
    callbacks = [metrics] if metrics else []
    return RosaTrainer(model=model, args=args, train_dataset=_Data(), callbacks=callbacks,
                       phase_listener=metrics.phase if metrics else None,
                       schedule=ScheduleConfig(mode="rosa", warmup_steps=2, mask_grad_steps=1, seed=7))


def _poison(trainer, step, micro_batch, kind):
    """From now on, the ``micro_batch``-th micro-batch (0-based) of train-phase optimizer step ``step``
    gets a NaN loss (``kind="loss"``) or a finite loss whose gradients are inf (``kind="grad"``)."""
    orig = trainer.compute_loss
    seen = {}

    class InfGrad(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, g):
            return g * float("inf")

    def compute_loss(model, inputs, *args, **kwargs):
        loss = orig(model, inputs, *args, **kwargs)
        if trainer.phase != "train":
            return loss
        at = trainer.state.global_step + 1
        seen[at] = seen.get(at, -1) + 1
        if at == step and seen[at] == micro_batch:
            return loss * float("nan") if kind == "loss" else InfGrad.apply(loss)
        return loss

    trainer.compute_loss = compute_loss


@pytest.mark.parametrize("micro_batch", [0, 1])
def test_nan_loss_after_masks_stops_at_its_step(tmp_path, micro_batch, one_thread):
    metrics = MetricsWriter(str(tmp_path / "metrics.jsonl"))
    trainer = _trainer(tmp_path, save_steps=1, metrics=metrics)
    _poison(trainer, step=3, micro_batch=micro_batch, kind="loss")
    with pytest.raises(NonFiniteLossError, match=r"^non-finite loss \(nan\) at step 3 \(train phase\)") as exc:
        trainer.train()
    assert isinstance(exc.value, ValueError) and exc.value.step == 3 and math.isnan(exc.value.value)
    # the checkpoints before it stay; nothing of step 3 is written
    ckpts = sorted(p.name for p in (tmp_path / "ckpt").iterdir() if p.name.startswith("checkpoint-"))
    assert ckpts == ["checkpoint-1", "checkpoint-2"]
    records = _strict_records(tmp_path / "metrics.jsonl")
    train_logs = [r for r in records if r["event"] == "log" and r.get("phase") == "train"]
    assert [r["step"] for r in train_logs] == [1, 2]
    assert all(math.isfinite(r["loss"]) and r["loss"] > 0 for r in train_logs)
    assert [r["phase"] for r in records if r["event"] == "phase"] == ["warmup", "masks", "train"]


def test_infinite_gradient_stops_before_the_optimizer_step(tmp_path, one_thread):
    trainer = _trainer(tmp_path)
    _poison(trainer, step=2, micro_batch=1, kind="grad")
    with pytest.raises(NonFiniteLossError, match=r"^non-finite gradient norm \((nan|inf)\) at step 2 \(train phase\)"):
        trainer.train()
    # the poisoned step never reached the optimizer: every adapter weight is still finite
    for name, p in trainer.model.named_parameters():
        if p.requires_grad:
            assert torch.isfinite(p).all(), name


def test_logged_nan_is_refused_and_written_as_null(tmp_path):
    """The callback behind the per-step checks: a NaN reaching the logs (from any path) stops the run,
    after metrics.jsonl got the record as strict JSON (null)."""
    metrics = MetricsWriter(str(tmp_path / "metrics.jsonl"))
    trainer = _trainer(tmp_path, metrics=metrics)
    trainer.state.global_step = 4
    with pytest.raises(NonFiniteLossError, match=r"^non-finite loss \(nan\) at step 4"):
        trainer.log({"loss": float("nan"), "grad_norm": 1.0, "learning_rate": 1e-3})
    with pytest.raises(NonFiniteLossError, match=r"^non-finite gradient norm \(-inf\) at step 4"):
        trainer.log({"loss": 1.0, "grad_norm": float("-inf")})
    records = _strict_records(tmp_path / "metrics.jsonl")
    assert records[0]["loss"] is None and records[0]["grad_norm"] == 1.0
    assert records[1]["grad_norm"] is None
    metrics._write({"nested": [float("inf"), {"x": float("nan")}], "ok": 2.5})
    assert _strict_records(tmp_path / "metrics.jsonl")[-1]["nested"] == [None, {"x": None}]


def test_dead_model_is_warned_once(tmp_path, caplog):
    trainer = _trainer(tmp_path)
    dead = math.log(128)  # the tiny Llama's vocabulary: uniform predictions
    with caplog.at_level(logging.WARNING, logger="rosa_peft.train"):
        trainer.log({"loss": dead, "grad_norm": 0.0})
        trainer.log({"loss": dead, "grad_norm": 0.5})  # a gradient: the count restarts
        for _ in range(2):
            trainer.log({"loss": dead * 0.99, "grad_norm": 0.0})
        assert not [r for r in caplog.records if "dead model" in r.getMessage()]
        trainer.log({"loss": dead, "grad_norm": 0.0})
        for _ in range(3):
            trainer.log({"loss": dead, "grad_norm": 0.0})
    warned = [r for r in caplog.records if "dead model" in r.getMessage()]
    assert len(warned) == 1 and warned[0].levelno == logging.WARNING
    assert "ln(vocab size 128)" in warned[0].getMessage()
    # a healthy loss never warns
    fresh = _trainer(tmp_path / "b")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="rosa_peft.train"):
        for _ in range(5):
            fresh.log({"loss": dead * 0.9, "grad_norm": 0.0})
    assert not caplog.records


# ---- rosa train ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory):
    """A tiny Llama over the SmolLM2 tokenizer (so the built-in task tokenises), saved as a model folder."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from rosa_peft.utils.model_loading import default_model_dir

    try:
        tok = AutoTokenizer.from_pretrained(str(default_model_dir()))
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    root = tmp_path_factory.mktemp("tinybase")
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32,
                                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                         max_position_embeddings=512, tie_word_embeddings=False))
    model.save_pretrained(root)
    tok.save_pretrained(root)
    return root


def _rosa_train(argv):
    return run_rosa("train", *argv)


@pytest.mark.parametrize("save_steps", [0, 1])
def test_rosa_train_nan_exits_2_and_writes_no_adapter(tmp_path, tiny_base, monkeypatch, save_steps, one_thread):
    orig = RosaTrainer.compute_loss

    def compute_loss(self, model, inputs, *args, **kwargs):
        loss = orig(self, model, inputs, *args, **kwargs)
        return loss * float("nan") if self.phase == "train" and self.state.global_step + 1 == 3 else loss

    monkeypatch.setattr(RosaTrainer, "compute_loss", compute_loss)
    out = tmp_path / "run"
    rc, stdout, stderr = _rosa_train([
        "--model", tiny_base, "--task", "sql-synth", "--limit", 4, "--max-seq-len", 256, "--r", 2, "--density", 0.05,
        "--batch-size", 1, "--grad-accum", 2, "--max-steps", 5, "--warmup-steps", 1, "--mask-grad-steps", 1,
        "--lr-warmup-steps", 0, "--save-steps", save_steps, "--no-progress", "--output-dir", out])
    errors = [line for line in stderr.splitlines() if "error:" in line]
    assert rc == 2, stderr[-3000:]
    assert errors == ["rosa train: error: non-finite loss (nan) at step 3 (train phase); training stopped"], stderr
    assert "wrote" not in stdout
    for final in ("adapter_model.safetensors", "adapter_config.json", "run_config.json", "masks.safetensors", "loss.png"):
        assert not (out / final).exists(), final
    if save_steps:  # the checkpoints before the bad step stay, with a strict-JSON metrics file
        ckpts = sorted(p.name for p in (out / "checkpoints").iterdir())
        assert ckpts == ["checkpoint-1", "checkpoint-2", "run_options.json"]  # what --resume checks
        records = _strict_records(out / "metrics.jsonl")
        assert [r["step"] for r in records if r["event"] == "log" and r.get("phase") == "train"] == [1, 2]
    else:  # nothing worth resuming: no partial directory
        assert not out.exists()
