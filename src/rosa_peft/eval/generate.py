"""Batched greedy generation with a KV cache, left padding, stop strings and a new-token bound.

Works on anything with a transformers-style ``generate``: a plain HF causal LM, a merged model, or
an unmerged :class:`rosa_peft.RosaModel` (its ``generate`` passes through to the wrapped model).

* Prompts are sorted by token length and cut into batches of ``batch_size`` (less padding); the
  outputs come back in the input order.
* Padding is on the left with an attention mask, so position ids are computed from the mask and
  greedy outputs do not depend on the batch size.
* A row stops when it emits EOS, when its decoded continuation contains one of ``stop``, or after
  ``max_new_tokens``. The returned text is cut just before the first stop string (the stop string
  itself is dropped, as lm-evaluation-harness does); special tokens are not decoded.
"""
from __future__ import annotations

import contextlib
from typing import Iterable, List, Optional, Sequence

import torch

__all__ = ["generate", "truncate_at_stop"]


def truncate_at_stop(text: str, stop: Sequence[str]) -> str:
    """``text`` up to (not including) the earliest occurrence of any stop string."""
    cut = len(text)
    for s in stop:
        if s:
            index = text.find(s)
            if 0 <= index < cut:
                cut = index
    return text[:cut]


class _StopOnStrings:
    """A transformers StoppingCriteria: a row is done once its new text contains a stop string."""

    def __init__(self, tokenizer, stop: Sequence[str], prompt_len: int):
        self.tokenizer, self.stop, self.prompt_len = tokenizer, [s for s in stop if s], prompt_len

    def __call__(self, input_ids: torch.LongTensor, scores=None, **kwargs) -> torch.BoolTensor:
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        if not self.stop:
            return done
        new = input_ids[:, self.prompt_len:]
        for row in range(new.shape[0]):
            text = self.tokenizer.decode(new[row], skip_special_tokens=True)
            done[row] = any(s in text for s in self.stop)
        return done


def _model_device(model) -> torch.device:
    device = getattr(model, "device", None)
    if isinstance(device, torch.device):
        return device
    with contextlib.suppress(StopIteration, AttributeError):
        return next(model.parameters()).device
    return torch.device("cpu")


def _check(prompts, batch_size: int, max_new_tokens: int) -> List[str]:
    prompts = list(prompts)
    if not all(isinstance(p, str) for p in prompts):
        raise ValueError("prompts must be strings")
    for label, value in (("batch_size", batch_size), ("max_new_tokens", max_new_tokens)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{label} must be a positive integer, got {value!r}")
    return prompts


@torch.no_grad()
def generate(model, tokenizer, prompts: Iterable[str], *, batch_size: int = 8, max_new_tokens: int = 256,
             stop: Optional[Sequence[str]] = None, add_special_tokens: bool = True,
             progress: bool = False, desc: str = "generate") -> List[str]:
    """Greedy continuations of ``prompts`` (one string each, in order), cut at the first stop string."""
    from transformers import GenerationConfig, StoppingCriteriaList

    prompts = _check(prompts, batch_size, max_new_tokens)
    stop = list(stop or [])
    if not prompts:
        return []
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad_id is None:
        raise ValueError("the tokenizer has neither a pad token nor an EOS token")
    encoded = [list(tokenizer(p, add_special_tokens=add_special_tokens)["input_ids"]) for p in prompts]
    empty = next((i for i, ids in enumerate(encoded) if not ids), None)
    if empty is not None:
        raise ValueError(f"prompt {empty} encodes to no tokens")
    order = sorted(range(len(prompts)), key=lambda i: (len(encoded[i]), i))
    device = _model_device(model)
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, use_cache=True,
                              pad_token_id=pad_id, eos_token_id=tokenizer.eos_token_id)
    outputs: List[Optional[str]] = [None] * len(prompts)
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(prompts), desc=desc, unit="ex")
    was_training = getattr(model, "training", False)
    if was_training:
        model.eval()
    try:
        for batch in batches:
            width = max(len(encoded[i]) for i in batch)
            ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, i in enumerate(batch):
                n = len(encoded[i])
                ids[row, width - n:] = torch.tensor(encoded[i], dtype=torch.long)
                mask[row, width - n:] = 1
            criteria = StoppingCriteriaList([_StopOnStrings(tokenizer, stop, width)])
            out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=config,
                                 stopping_criteria=criteria)
            for row, i in enumerate(batch):
                text = tokenizer.decode(out[row, width:], skip_special_tokens=True)
                outputs[i] = truncate_at_stop(text, stop)
            if bar is not None:
                bar.update(len(batch))
    finally:
        if bar is not None:
            bar.close()
        if was_training:
            model.train()
    return [o if o is not None else "" for o in outputs]
