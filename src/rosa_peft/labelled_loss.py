"""The causal-LM loss with the output head run only at labelled positions (``RosaModel(..., loss_only=True)``).

Instruction data trains on the response only: on ViGGO about one token in seven carries a label, yet a
causal LM's forward projects every position onto the whole vocabulary, upcasts those logits to float32
and takes a log-softmax over them. :func:`labelled_loss` runs the model's decoder, keeps the hidden states
whose next-token label is not ``-100``, calls the output head module on those rows only (so an adapter on
the head still runs) and computes transformers' ``ForCausalLMLoss`` on them: the same cross-entropy,
``sum / num_items_in_batch`` when that is given, else the mean over labelled tokens; or, with
``reduction="sequence"``, :func:`sequence_mean_nll`'s per-sequence average (the reference's loss).

It is exact only for models whose logits are ``lm_head(decoder(x))`` with nothing after it, so it applies
to the model types in :data:`PLAIN_HEAD_MODEL_TYPES` (checked against their transformers forwards: no
logit scaling, soft-capping or auxiliary loss) whose ``loss_function`` is still ``ForCausalLMLoss``, and
to the plain inputs below; anything else returns None and the caller runs the full forward.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn
from transformers.loss.loss_utils import ForCausalLMLoss

from .utils.device import is_sharded

# model_type -> its *ForCausalLM forward is ``logits = lm_head(base_model(...).last_hidden_state)``, then
# transformers' ForCausalLMLoss; MoE models (an auxiliary loss), Gemma 2/3 (soft-capping), Cohere and
# Granite (scaled logits) are not here.
PLAIN_HEAD_MODEL_TYPES = frozenset({
    "llama", "mistral", "qwen2", "qwen3", "phi", "phi3", "gemma", "gpt2", "gpt_neox", "opt", "olmo", "olmo2",
    "starcoder2", "smollm3", "stablelm",
})
# inputs the decoder takes as they are; any other key (pixel values, a cache, shift_labels ...) falls back
DECODER_INPUTS = frozenset({"input_ids", "attention_mask", "position_ids", "inputs_embeds", "token_type_ids"})
IGNORE_INDEX = -100
REDUCTIONS = ("token", "sequence")  # transformers' mean over labelled tokens; the reference's per-sequence mean


def _head_and_decoder(model: nn.Module) -> Optional[tuple[nn.Module, nn.Module]]:
    config = getattr(model, "config", None)
    if getattr(config, "model_type", None) not in PLAIN_HEAD_MODEL_TYPES:
        return None
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    decoder = getattr(model, "base_model", None)
    if not isinstance(head, nn.Module) or not isinstance(decoder, nn.Module) or decoder is model:
        return None
    if is_sharded(getattr(head, "weight", None)):  # FSDP2: leave the gathering to the model
        return None
    if getattr(model, "loss_function", ForCausalLMLoss) is not ForCausalLMLoss:  # a loss_type or a custom loss
        return None
    return head, decoder


def check_reduction(reduction: str) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"loss reduction must be one of {', '.join(REDUCTIONS)}, got {reduction!r}")


def _per_sequence_mean_nll(logits: torch.Tensor, target: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """``logits`` (N, V) at the N positions where ``keep`` (B, T) is True, ``target`` (B, T): the mean over
    sequences (those with a kept position) of each sequence's mean NLL (16-bit logits upcast to float32);
    0, with a zero gradient, when nothing is kept."""
    logits = logits.float() if logits.dtype in (torch.bfloat16, torch.float16) else logits
    nll = nn.functional.cross_entropy(logits, target[keep], reduction="none")
    sequence = keep.nonzero()[:, 0]
    n_sequences = keep.shape[0]
    sums = torch.zeros(n_sequences, dtype=nll.dtype, device=nll.device).index_add(0, sequence, nll)
    counts = torch.bincount(sequence, minlength=n_sequences)
    has = counts > 0
    return (sums[has] / counts[has]).sum() / has.sum().clamp(min=1)


def sequence_mean_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The causal-LM loss averaged per sequence, as the reference trains: each sequence's mean next-token
    NLL over its labelled positions (label != -100, shifted by one as transformers does), then the mean
    over the sequences that have any. ``logits`` (B, T, V; 16-bit ones are upcast to float32); ``labels`` (B, T)."""
    target = labels[:, 1:].to(logits.device)
    keep = target != IGNORE_INDEX
    return _per_sequence_mean_nll(logits[:, :-1][keep], target, keep)


def labelled_loss(model: nn.Module, inputs: dict, reduction: str = "token") -> Optional[torch.Tensor]:
    """transformers' causal-LM loss of ``model(**inputs)`` (``inputs`` with ``labels``, optionally
    ``num_items_in_batch``), computing logits only where a label is; None when ``model`` or ``inputs``
    are not ones it is exact for (then call the model's own forward). ``reduction="sequence"``: the
    per-sequence average of :func:`sequence_mean_nll` instead (``num_items_in_batch`` is then ignored)."""
    check_reduction(reduction)
    labels = inputs.get("labels")
    if labels is None or not isinstance(labels, torch.Tensor) or labels.dim() != 2:
        return None
    num_items = inputs.get("num_items_in_batch")
    decoder_inputs = {k: v for k, v in inputs.items() if k not in ("labels", "num_items_in_batch")}
    if set(decoder_inputs) - DECODER_INPUTS:
        return None
    parts = _head_and_decoder(model)
    if parts is None:
        return None
    head, decoder = parts
    hidden = decoder(**decoder_inputs, use_cache=False).last_hidden_state
    target = labels[:, 1:].to(hidden.device)
    keep = target != IGNORE_INDEX
    logits = head(hidden[:, :-1][keep])
    if reduction == "sequence":
        return _per_sequence_mean_nll(logits, target, keep)
    logits = logits.float()  # as ForCausalLMLoss
    if num_items is None:
        return nn.functional.cross_entropy(logits, target[keep], reduction="mean")
    loss = nn.functional.cross_entropy(logits, target[keep], reduction="sum")
    if torch.is_tensor(num_items):
        num_items = num_items.to(loss.device)
    return loss / num_items


__all__ = ["DECODER_INPUTS", "PLAIN_HEAD_MODEL_TYPES", "REDUCTIONS", "check_reduction", "labelled_loss",
           "sequence_mean_nll"]
