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
from typing import Iterable, List, Optional, Sequence, Tuple

import torch

from ..utils.checks import check_int
from ..utils.device import model_device

__all__ = ["generate", "generate_with_counts", "torch_threads", "truncate_at_stop"]


def truncate_at_stop(text: str, stop: Sequence[str]) -> str:
    """``text`` up to (not including) the earliest occurrence of any stop string."""
    cut = len(text)
    for s in stop:
        if s:
            index = text.find(s)
            if 0 <= index < cut:
                cut = index
    return text[:cut]


# Why not transformers' ``generate(stop_strings=..., tokenizer=...)`` (StopStringCriteria): it gives
# different outputs in two cases, checked against transformers 5.24 with the SmolLM2 tokenizer:
# * it matches the stop string against the whole sequence, prompt included: a stop string that starts
#   in the prompt and ends in the first new token stops the row (stop ": " after a prompt ending ":"
#   and a first token " patrol" gave " patrol" instead of 8 tokens). Here only the new text counts,
#   as lm-evaluation-harness does, and the cut at the stop string (truncate_at_stop) assumes it;
# * it matches token strings, special tokens included: with ``<|im_end|>`` as a stop string (the
#   gsm8k strict/flexible protocols) and a model whose EOS is another token, it stops at
#   ``<|im_end|>``, while the decoded text (special tokens skipped) never contains it, so this class
#   lets the row go on.
# With the built-in protocols' stop strings on SmolLM2 both give the same outputs; the two cases above
# are reachable through ``--stop`` / ``generate(stop=...)`` and other tokenizers, so the hand-written
# criterion stays.
class _StopOnStrings:
    """A transformers StoppingCriteria: a row is done once its new text contains a stop string.

    Exactly "the decoded continuation (special tokens skipped) contains a stop string", with less
    per-token Python work: a row found done is remembered and not decoded again; a row whose newest
    token is a special token (EOS, pad: the padding after a finished row) has the same text as at the
    previous call, so it is not decoded again; the remaining rows go to one ``batch_decode`` call.
    """

    def __init__(self, tokenizer, stop: Sequence[str], prompt_len: int):
        self.tokenizer, self.stop, self.prompt_len = tokenizer, [s for s in stop if s], prompt_len
        self._special = torch.tensor(sorted(set(getattr(tokenizer, "all_special_ids", None) or [])), dtype=torch.long)
        self._done: Optional[torch.Tensor] = None
        self._last_len = -1

    def __call__(self, input_ids: torch.LongTensor, scores=None, **kwargs) -> torch.BoolTensor:
        n = input_ids.shape[0]
        if self._done is None or self._done.shape[0] != n:
            self._done, self._last_len = torch.zeros(n, dtype=torch.bool), -1
        if self.stop:
            new = input_ids[:, self.prompt_len:].cpu()
            todo = ~self._done
            if self._last_len == new.shape[1] - 1 and new.shape[1] > 0 and self._special.numel():
                todo &= ~torch.isin(new[:, -1], self._special)  # text unchanged since the last call
            self._last_len = new.shape[1]
            rows = todo.nonzero().flatten().tolist()
            if rows:
                texts = self.tokenizer.batch_decode(new[rows].tolist(), skip_special_tokens=True)
                for row, text in zip(rows, texts):
                    if any(s in text for s in self.stop):
                        self._done[row] = True
        return self._done.clone().to(input_ids.device)


_model_device = model_device  # (the name bench/eval_speed imports)


def _check(prompts, batch_size: int, max_new_tokens: int) -> List[str]:
    prompts = list(prompts)
    if not all(isinstance(p, str) for p in prompts):
        raise ValueError("prompts must be strings")
    check_int("batch_size", batch_size, 1)
    check_int("max_new_tokens", max_new_tokens, 1)
    return prompts


@contextlib.contextmanager
def torch_threads(num_threads: Optional[int]):
    """Run the block with ``torch.set_num_threads(num_threads)`` (None: leave it), then restore it.

    On a CPU that other processes share, fewer intra-op threads than cores is often much faster:
    OpenMP threads spin-wait on a busy core (measured 2-10x slower per decode step with 2 threads
    than with 1 on a 2-core machine with 3 other jobs)."""
    if num_threads is None:
        yield
        return
    check_int("num_threads", num_threads, 1)
    before = torch.get_num_threads()
    torch.set_num_threads(num_threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _encode(tokenizer, prompts: List[str], add_special_tokens: bool) -> List[List[int]]:
    """Token ids of every prompt, in one tokenizer call (the same ids as one call per prompt)."""
    encoded = [list(ids) for ids in tokenizer(prompts, add_special_tokens=add_special_tokens)["input_ids"]]
    empty = next((i for i, ids in enumerate(encoded) if not ids), None)
    if empty is not None:
        raise ValueError(f"prompt {empty} encodes to no tokens")
    return encoded


def _left_padded(encoded: List[List[int]], batch: List[int], pad_id: int):
    """``(input_ids, attention_mask, width)`` for the rows ``batch`` of ``encoded``, padded on the left.

    Not ``tokenizer.pad(..., padding_side="left")``: that raises for a tokenizer without a pad token
    (Llama-2, GPT-2), where this pads with EOS (:func:`_pad_id`), as ``generate`` then does too."""
    width = max(len(encoded[i]) for i in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, i in enumerate(batch):
        n = len(encoded[i])
        ids[row, width - n:] = torch.tensor(encoded[i], dtype=torch.long)
        mask[row, width - n:] = 1
    return ids, mask, width


def _batches(encoded: List[List[int]], batch_size: int) -> List[List[int]]:
    """Prompt indices sorted by token length (stable), cut into batches of ``batch_size``."""
    order = sorted(range(len(encoded)), key=lambda i: (len(encoded[i]), i))
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def _new_token_counts(new: torch.Tensor, pad_id: int, eos_id: Optional[int]) -> List[int]:
    """Generated tokens per row: up to (not counting) the first EOS / pad after which the row stopped."""
    counts = []
    for row in new.tolist():
        n = len(row)
        while n and row[n - 1] in (pad_id, eos_id):  # trailing padding of a finished row, and its EOS
            n -= 1
        counts.append(n)
    return counts


def _pad_id(tokenizer) -> int:
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad_id is None:
        raise ValueError("the tokenizer has neither a pad token nor an EOS token")
    return pad_id


def generate_with_counts(model, tokenizer, prompts: Iterable[str], *, batch_size: int = 8, max_new_tokens: int = 256,
                         stop: Optional[Sequence[str]] = None, add_special_tokens: bool = True,
                         progress: bool = False, desc: str = "generate",
                         num_threads: Optional[int] = None) -> Tuple[List[str], List[int]]:
    """:func:`generate`, also returning how many tokens each prompt's generation ran for."""
    from transformers import GenerationConfig, StoppingCriteriaList

    prompts = _check(prompts, batch_size, max_new_tokens)
    stop = list(stop or [])
    if not prompts:
        return [], []
    pad_id = _pad_id(tokenizer)
    encoded = _encode(tokenizer, prompts, add_special_tokens)
    device = _model_device(model)
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, use_cache=True,
                              pad_token_id=pad_id, eos_token_id=tokenizer.eos_token_id)
    outputs: List[Optional[str]] = [None] * len(prompts)
    counts = [0] * len(prompts)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(prompts), desc=desc, unit="ex")
    was_training = getattr(model, "training", False)
    if was_training:
        model.eval()
    try:
        with torch_threads(num_threads), torch.no_grad():
            for batch in _batches(encoded, batch_size):
                ids, mask, width = _left_padded(encoded, batch, pad_id)
                criteria = StoppingCriteriaList([_StopOnStrings(tokenizer, stop, width)]) if stop else None
                out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                                     generation_config=config, stopping_criteria=criteria)
                new = out[:, width:].cpu()
                texts = tokenizer.batch_decode(new.tolist(), skip_special_tokens=True)
                for row, (i, n) in enumerate(zip(batch, _new_token_counts(new, pad_id, tokenizer.eos_token_id))):
                    outputs[i], counts[i] = truncate_at_stop(texts[row], stop), n
                if bar is not None:
                    bar.update(len(batch))
    finally:
        if bar is not None:
            bar.close()
        if was_training:
            model.train()
    return [o if o is not None else "" for o in outputs], counts


def generate(model, tokenizer, prompts: Iterable[str], *, batch_size: int = 8, max_new_tokens: int = 256,
             stop: Optional[Sequence[str]] = None, add_special_tokens: bool = True,
             progress: bool = False, desc: str = "generate", num_threads: Optional[int] = None) -> List[str]:
    """Greedy continuations of ``prompts`` (one string each, in order), cut at the first stop string.

    ``num_threads`` sets torch's intra-op threads for the call (None: leave them; see :func:`torch_threads`).
    """
    return generate_with_counts(model, tokenizer, prompts, batch_size=batch_size, max_new_tokens=max_new_tokens,
                                stop=stop, add_special_tokens=add_special_tokens, progress=progress, desc=desc,
                                num_threads=num_threads)[0]
