"""Correctness checks behind bench/train_speed.py (no timed assertions)."""
from __future__ import annotations

import pytest
import torch

from conftest import make_tiny_llama
from rosa_peft import RosaConfig, get_rosa_model
from rosa_peft.bench.train_speed import _scoring_like, run_train_speed
from rosa_peft.masks import compute_masks


def _batches(n=3, seq=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, 128, (2, seq), generator=g)
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()})
    return out


@pytest.mark.parametrize("criterion", ["fisher", "grad"])
@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_frozen_scoring_equals_the_earlier_scoring(criterion, dropout):
    """compute_masks now freezes every parameter while scoring; the masks (and the model's flags and
    gradients afterwards) are the same as with the earlier scoring that left parameters trainable."""
    model = get_rosa_model(make_tiny_llama(), RosaConfig(r=2, density=0.05, lora_dropout=dropout,
                                                         target_modules="all-linear"))
    with torch.no_grad():
        for _, layer in model.rosa_layers():
            for name in layer.lora_B:
                layer.lora_B[name].weight.normal_(0, 0.1)  # a warmed-up LoRA: dO depends on it
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    batches = _batches()
    new = compute_masks(model, batches, criterion=criterion, seed=3, progress=False)
    with _scoring_like(freeze=False):
        old = compute_masks(model, batches, criterion=criterion, seed=3, progress=False)
    assert list(new) == list(old)
    for name in new:
        assert torch.equal(new[name], old[name]), name
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(p.grad is None for p in model.parameters())


def test_run_train_speed_rejects_bad_arguments():
    with pytest.raises(ValueError, match="variants"):
        run_train_speed(variants=("fastest",))
    with pytest.raises(ValueError, match=">= 1"):
        run_train_speed(n_examples=0)


def test_before_code_emulation_is_scoped_and_restores_the_current_code():
    """``_code("before")`` puts back the bernoulli_ dropout mask and the full-vocabulary loss for the
    bench's "before" row, and only inside the block."""
    from rosa_peft import function
    from rosa_peft.bench.train_speed import _code

    model = get_rosa_model(make_tiny_llama(), RosaConfig(r=2, density=0.05, lora_dropout=0.1,
                                                         target_modules="all-linear"))
    batch = _batches(1)[0]
    current = function.dropout_keep_mask
    with torch.no_grad():
        assert model(**batch, loss_only=True).logits is None
        with _code("before"):
            assert function.dropout_keep_mask is not current
            x = torch.empty(4, 4)
            torch.manual_seed(0)
            keep = function.dropout_keep_mask(x, 0.1)[0]
            torch.manual_seed(0)
            assert torch.equal(keep, torch.empty(4, 4, dtype=torch.bool).bernoulli_(0.9))
            full = model(**batch, loss_only=True)
            assert full.logits is not None
        assert function.dropout_keep_mask is current
        model.eval()
        torch.testing.assert_close(model(**batch, loss_only=True).loss, model(**batch).loss)


def test_selection_is_timed_apart_from_scoring_and_the_selector_is_restored():
    """The bench reports selection once per compute_masks call, apart from the per-micro-batch scoring:
    timing it leaves the masks as they are and puts Selector's methods back."""
    from rosa_peft.bench.train_speed import _timed_selection
    from rosa_peft.masks import select

    model = get_rosa_model(make_tiny_llama(), RosaConfig(r=2, density=0.05, target_modules="all-linear"))
    batches = _batches()
    plain = compute_masks(model, batches, seed=1, progress=False)
    originals = (select.Selector.add, select.Selector.result)
    seconds = [0.0]
    with _timed_selection(seconds):
        assert select.Selector.add is not originals[0]
        timed = compute_masks(model, batches, seed=1, progress=False)
    assert (select.Selector.add, select.Selector.result) == originals
    assert seconds[0] > 0
    assert list(plain) == list(timed) and all(torch.equal(plain[n], timed[n]) for n in plain)


def test_train_speed_variants_load_their_settings_and_report_rows(tmp_path, smol_tokenizer, data_dir, monkeypatch):
    """On a tiny saved base: each RoSA variant's model is loaded with its attention kernel and adapter dtype
    (``paper-b8-eager`` is what ``--recipe paper --attn-implementation eager`` trains), the PEFT LoRA row is
    PEFT's own model with bf16 adapters and no scoring columns, and every row carries its projections and
    its ratio to the PEFT row."""
    from conftest import save_tiny_base

    from rosa_peft.bench import peft_baselines, train_speed

    save_tiny_base(tmp_path / "base", smol_tokenizer)
    built, peft_models = [], []
    real_get, real_lora = train_speed.get_rosa_model, peft_baselines.train_lora

    def recording(base, cfg):
        built.append((base.config._attn_implementation, cfg.adapter_dtype, base.dtype))
        return real_get(base, cfg)

    def recording_lora(base, **kwargs):
        peft_models.append(real_lora(base, **kwargs))
        return peft_models[-1]

    monkeypatch.setattr(train_speed, "get_rosa_model", recording)
    monkeypatch.setattr(peft_baselines, "train_lora", recording_lora)
    from rosa_peft import model as model_module
    labelled, real_labelled = [], model_module.labelled_loss

    def counting(model, inputs, **kwargs):  # RosaModel(..., loss_only=True): the RoSA rows' timed steps
        labelled.append(model)
        return real_labelled(model, inputs, **kwargs)

    monkeypatch.setattr(model_module, "labelled_loss", counting)
    result = run_train_speed(model_name=str(tmp_path / "base"), data_dir=str(data_dir), n_examples=2, threads=1,
                             rounds=1, max_seq_len=512, variants=("bf16-b8", "paper-b8-eager", "peft-lora-b8-eager"),
                             r=2, density=0.05)
    assert built == [("sdpa", "float32", torch.bfloat16)] * 2 + [("eager", "bfloat16", torch.bfloat16)] * 2
    (peft_model,) = peft_models
    # each RoSA variant: first-call + warm-up + first main + main step (1 micro-batch of 2 examples), all
    # through the labelled-positions loss, as RosaTrainer trains; the PEFT row never goes through it
    assert len(labelled) >= 2 * 4 and peft_model.base_model.model not in labelled
    assert peft_model.base_model.model.config._attn_implementation == "eager"
    lora_weights = [p for n, p in peft_model.named_parameters() if "lora_" in n]
    assert len(lora_weights) == 2 * 7 * 2 and all(p.dtype == torch.bfloat16 and p.requires_grad for p in lora_weights)
    rows = {row["variant"]: row for row in result["rows"]}
    assert list(rows) == ["bf16-b8", "paper-b8-eager", "peft-lora-b8-eager"] and result["skipped"] == {}
    assert rows["paper-b8-eager"]["attn"] == "eager" and rows["paper-b8-eager"]["adapter_dtype"] == "bfloat16"
    peft_row = rows["peft-lora-b8-eager"]
    for row in rows.values():
        assert row["examples"] == 2 and row["s_per_example_train"] > 0
        # both are rounded (0.1 min, 1e-4 s): equal within those roundings
        assert row["epoch_train_min"] == pytest.approx(5103 * row["s_per_example_train"] / 60, abs=0.06)
        assert row["train_over_peft_lora"] == round(row["s_per_example_train"] / peft_row["s_per_example_train"], 3)
    for name in ("bf16-b8", "paper-b8-eager"):
        assert rows[name]["score_s_per_microbatch"] > 0 and rows[name]["rosa_run_min"] > rows[name]["epoch_train_min"]
    assert peft_row["score_s_per_microbatch"] is None and peft_row["s_per_example_warmup"] is None
    assert peft_row["rosa_run_min"] == peft_row["epoch_train_min"] and peft_row["train_over_peft_lora"] == 1.0
    assert rows["bf16-b8"]["speedup_vs_bf16-b8"] == 1.0
    # one value per phase and round: a pass over all micro-batches, not one per micro-batch
    assert {k: len(v) for k, v in result["raw"]["paper-b8-eager"].items()} == dict.fromkeys(
        ("warmup_step", "score", "select", "train_step"), 1)
    assert len(result["raw"]["peft-lora-b8-eager"]["train_step"]) == 1


def test_per_round_stats_are_a_whole_pass_over_the_micro_batches():
    """Micro-batches differ in length: a round's value is its whole pass, so the per-example time is the
    mean over the bench's examples (a minimum over single micro-batches would be the shortest one's)."""
    from rosa_peft.bench.train_speed import _per_round_stats

    times = {"train_step": [12.0, 10.0, 11.0], "score": [15.0, 13.0, 14.0], "select": [2.0, 1.0, 3.0], "warmup_step": []}
    per_batch, per_example = _per_round_stats(times, examples=16, batches=2, stat="min")
    assert per_batch == {"train_step": 5.0, "score": 6.5, "select": 1.0}
    assert per_example == {"train_step": 10.0 / 16, "score": 13.0 / 16, "select": 1.0}
    per_batch, _ = _per_round_stats(times, examples=16, batches=2, stat="median")
    assert per_batch == {"train_step": 5.5, "score": 7.0, "select": 2.0}


def test_without_peft_the_default_variants_skip_the_peft_row_and_naming_it_raises(monkeypatch):
    from rosa_peft.bench import train_speed

    everything = list(train_speed.VARIANTS)
    assert train_speed._resolve_variants(None) == (everything, {})
    monkeypatch.setattr(train_speed, "have", lambda module: module != "peft")
    run, skipped = train_speed._resolve_variants(None)
    assert run == [v for v in everything if v != "peft-lora-b8-eager"]
    assert list(skipped) == ["peft-lora-b8-eager"] and "pip install rosa-peft[bench]" in skipped["peft-lora-b8-eager"]
    with pytest.raises(ValueError, match="PEFT LoRA row needs the 'peft' package"):
        run_train_speed(variants=("paper-b8", "peft-lora-b8-eager"))
