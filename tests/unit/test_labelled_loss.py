"""``RosaModel(..., loss_only=True)``: transformers' causal-LM loss with the head run at labelled rows only.

In float64 on tiny Llama / GPT-2 / OPT models with RoSA adapters (masks set, so the sparse path runs):
the loss and every trainable gradient equal the full forward's, with and without ``num_items_in_batch``,
with an adapted ``lm_head``; inputs or models it is not exact for fall back to the full forward.
"""
import math

import pytest
import torch

from conftest import make_tiny_llama
from rosa_peft import RosaConfig, get_rosa_model
from rosa_peft.labelled_loss import PLAIN_HEAD_MODEL_TYPES, labelled_loss


def _tiny(kind: str):
    from transformers import GPT2Config, GPT2LMHeadModel, OPTConfig, OPTForCausalLM

    if kind == "llama":
        return make_tiny_llama(0, torch.float64)
    torch.manual_seed(0)  # dropout off: train mode must be deterministic to compare two forwards
    if kind == "gpt2":
        return GPT2LMHeadModel(GPT2Config(vocab_size=128, n_positions=64, n_embd=32, n_layer=2, n_head=4, resid_pdrop=0.0,
                                          embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)).double()
    return OPTForCausalLM(OPTConfig(vocab_size=128, hidden_size=32, ffn_dim=64, num_hidden_layers=2,
                                    num_attention_heads=4, max_position_embeddings=64, word_embed_proj_dim=32,
                                    dropout=0.0, attention_dropout=0.0, layerdrop=0.0)).double()


def _rosa(kind: str, targets=None):
    cfg = RosaConfig(r=2, density=0.1, lora_dropout=0.0, target_modules=targets or "all-linear",
                     init_lora_weights=False)
    model = get_rosa_model(_tiny(kind), cfg)
    g = torch.Generator().manual_seed(1)
    masks = {}
    for name, layer in model.rosa_layers():
        out_f, in_f = layer.rosa_spa[model.active_adapter].shape
        masks[name] = torch.rand(out_f, in_f, generator=g) < 0.1
    model.set_masks(masks)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".rosa_spa." in n:
                p.normal_(0, 0.05, generator=g)
    return model.train()


def _batch(padded: bool = True):
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, 128, (3, 12), generator=g)
    labels = ids.clone()
    labels[:, :7] = -100  # a prompt without labels
    labels[1, 7:9] = -100
    mask = torch.ones_like(ids)
    if padded:
        mask[2, -3:] = 0
        labels[2, -3:] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _loss_and_grads(model, batch, **kw):
    model.zero_grad(set_to_none=True)
    out = model(**batch, **kw)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return out, grads


@pytest.mark.parametrize("kind", ["llama", "gpt2", "opt"])
@pytest.mark.parametrize("num_items", [None, 5])
def test_loss_and_gradients_equal_the_full_forward(kind, num_items):
    model, batch = _rosa(kind), _batch()
    if num_items is not None:
        batch["num_items_in_batch"] = torch.tensor(num_items)
    full, want = _loss_and_grads(model, batch)
    fast, got = _loss_and_grads(model, batch, loss_only=True)
    assert fast.logits is None and full.logits is not None  # the fast path ran
    torch.testing.assert_close(fast.loss, full.loss, rtol=1e-12, atol=1e-12)
    assert want and set(got) == set(want)
    assert any(".rosa_spa." in n for n in want)
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=1e-10, atol=1e-12, msg=n)


def test_an_adapted_lm_head_still_runs_and_trains():
    model, batch = _rosa("llama", targets=["q_proj", "lm_head"]), _batch(padded=False)
    full, want = _loss_and_grads(model, batch)
    fast, got = _loss_and_grads(model, batch, loss_only=True)
    assert fast.logits is None
    torch.testing.assert_close(fast.loss, full.loss, rtol=1e-12, atol=1e-12)
    head = [n for n in want if "lm_head" in n]
    assert head and all(got[n].abs().sum() > 0 for n in head)
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=1e-10, atol=1e-12, msg=n)


def test_no_labelled_token_gives_nan_like_transformers():
    model, batch = _rosa("llama"), _batch()
    batch["labels"][:] = -100
    with torch.no_grad():
        assert math.isnan(float(model(**batch).loss))
        assert math.isnan(float(model(**batch, loss_only=True).loss))


def test_unsupported_inputs_and_models_fall_back_to_the_full_forward():
    model, batch = _rosa("llama"), _batch()
    with torch.no_grad():
        assert labelled_loss(model.get_base_model(), {k: v for k, v in batch.items() if k != "labels"}) is None
        assert labelled_loss(model.get_base_model(), {**batch, "shift_labels": batch["labels"]}) is None
        mixed = model(**batch, loss_only=True, adapter_names=["default"] * 3)
        assert mixed.logits is not None
        inner = model.get_base_model()
        inner.loss_function = lambda logits, labels, vocab_size, **kw: logits.float().mean()  # a custom loss
        custom = model(**batch, loss_only=True)
        assert custom.logits is not None and torch.equal(custom.loss, custom.logits.float().mean())
        del inner._loss_function
        assert model(**batch, loss_only=True).logits is None
        model.get_base_model().config.model_type = "granite"  # scaled logits: not a plain head
        assert model(**batch, loss_only=True).logits is not None
    assert "granite" not in PLAIN_HEAD_MODEL_TYPES and "llama" in PLAIN_HEAD_MODEL_TYPES
