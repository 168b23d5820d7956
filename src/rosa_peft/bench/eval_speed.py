"""Evaluation speed: ``rosa_peft.eval.generate`` vs plain transformers ``generate`` (a benchmark row).

Both run on the same (merged) model, the same task prompts, the same length-sorted batches and the
same stop strings (plain: transformers' own ``stop_strings=``), alternating, in one process. The row
gives generated tokens per second for each and their ratio (acceptance: >= 0.9), and projects the
time of ``rosa eval`` over the whole split from the measured seconds per example.

>>> row = run_eval_speed(task="viggo", data_dir="data", n_prompts=16)     # doctest: +SKIP
>>> row["ratio"], row["projected_split_s"]                                # doctest: +SKIP
"""
from __future__ import annotations

import time
from typing import Optional

import torch

from ..eval.generate import (
    _batches,
    _check,
    _encode,
    _model_device,
    _new_token_counts,
    _pad_id,
    generate_with_counts,
    torch_threads,
    truncate_at_stop,
)
from ..eval.loading import load_for_eval
from ..eval.protocols import get_protocol
from ..eval.runner import load_examples
from ..utils.checks import check_int

__all__ = ["run_eval_speed"]


def _plain_generate(model, tokenizer, encoded, batches, pad_id, max_new_tokens, stop):
    """Plain ``model.generate`` over ``batches``: ``(texts, token counts)`` in prompt order."""

    texts, counts = [None] * len(encoded), [0] * len(encoded)
    device = _model_device(model)
    extra = dict(stop_strings=list(stop), tokenizer=tokenizer) if stop else {}
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        for batch in batches:
            padded = tokenizer.pad({"input_ids": [encoded[i] for i in batch]}, return_tensors="pt")
            ids = padded["input_ids"].to(device)
            with torch.no_grad():
                out = model.generate(input_ids=ids, attention_mask=padded["attention_mask"].to(device),
                                     max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                                     pad_token_id=pad_id, **extra)
            new = out[:, ids.shape[1]:].cpu()
            decoded = tokenizer.batch_decode(new.tolist(), skip_special_tokens=True)
            for row, (i, n) in enumerate(zip(batch, _new_token_counts(new, pad_id, tokenizer.eos_token_id))):
                texts[i], counts[i] = truncate_at_stop(decoded[row], stop), n
    finally:
        tokenizer.padding_side = side
    return texts, counts


def run_eval_speed(model_name: Optional[str] = None, task: str = "viggo", data_dir: Optional[str] = None,
                   n_prompts: int = 16, max_new_tokens: int = 64, batch_size: int = 8, *,
                   adapter: Optional[str] = None, dtype: str = "float32", num_threads: Optional[int] = None,
                   repeats: int = 2, split: Optional[str] = None, model=None, tokenizer=None) -> dict:
    """One benchmark row: tokens/s of ``rosa_peft.eval.generate`` and of plain ``generate``, and the ratio.

    ``model_name`` / ``adapter`` / ``dtype`` load as ``rosa eval`` does (a float adapter is merged);
    or pass ``model`` and ``tokenizer``. The prompts are the first ``n_prompts`` of ``task``'s split
    (default: its eval split) with the task protocol's stop strings; ``max_new_tokens`` bounds each
    generation. ``repeats`` runs each that many times, alternating which goes first (timings summed;
    the default 2 cancels the first run's allocation cost). ``num_threads`` sets torch's intra-op
    threads for the whole measurement (None: leave them).

    Returns ``task, split, n_prompts, batch_size, max_new_tokens, dtype, num_threads, rosa_tokens,
    rosa_s, rosa_tokens_per_s, plain_tokens, plain_s, plain_tokens_per_s, ratio`` (rosa / plain
    tokens/s), ``outputs_match`` (the two give the same cut texts), ``s_per_example``, ``split_size``
    and ``projected_split_s`` (``rosa_s / n`` x the split's size: ``rosa eval`` on all of it).
    """

    check_int("repeats", repeats, minimum=1)
    _check([], batch_size, max_new_tokens)
    task_obj, split, examples = load_examples(task, split, n_prompts, data_dir)
    split_size = len(task_obj.load(split))
    if model is None:

        model, tokenizer, info = load_for_eval(model_name, adapter, dtype=dtype)
        dtype = info["dtype"]
    elif tokenizer is None:
        raise ValueError("pass tokenizer with model")
    else:
        dtype = str(getattr(model, "dtype", dtype)).replace("torch.", "")
    protocol = get_protocol(task_obj.name, max_new_tokens=max_new_tokens)
    protocol.prepare(tokenizer, examples)
    prompts = [protocol.prompt(e) for e in examples]
    stop = list(protocol.stop)
    pad_id = _pad_id(tokenizer)
    encoded = _encode(tokenizer, prompts, protocol.add_special_tokens)
    batches = _batches(encoded, batch_size)
    model.eval()
    rosa_s = plain_s = 0.0
    rosa_tokens = plain_tokens = 0
    with torch_threads(num_threads):
        first = [prompts[i] for i in batches[0]]  # warm-up: one real-size batch, a few tokens, both paths
        generate_with_counts(model, tokenizer, first, batch_size=batch_size, max_new_tokens=2,
                             add_special_tokens=protocol.add_special_tokens)
        _plain_generate(model, tokenizer, encoded, batches[:1], pad_id, 2, stop)
        for rep in range(repeats):
            for which in (("rosa", "plain") if rep % 2 == 0 else ("plain", "rosa")):  # alternate who goes first
                t0 = time.perf_counter()
                if which == "rosa":
                    ours, counts = generate_with_counts(model, tokenizer, prompts, batch_size=batch_size,
                                                        max_new_tokens=max_new_tokens, stop=stop,
                                                        add_special_tokens=protocol.add_special_tokens)
                    rosa_s += time.perf_counter() - t0
                    rosa_tokens += sum(counts)
                else:
                    plain, plain_counts = _plain_generate(model, tokenizer, encoded, batches, pad_id,
                                                          max_new_tokens, stop)
                    plain_s += time.perf_counter() - t0
                    plain_tokens += sum(plain_counts)
        threads = torch.get_num_threads()
    rosa_tps = rosa_tokens / rosa_s if rosa_s > 0 else 0.0
    plain_tps = plain_tokens / plain_s if plain_s > 0 else 0.0
    s_per_example = rosa_s / (repeats * len(prompts))
    return {
        "task": task_obj.name, "split": split, "n_prompts": len(prompts), "batch_size": batch_size,
        "max_new_tokens": max_new_tokens, "dtype": dtype, "num_threads": threads, "repeats": repeats,
        "rosa_tokens": rosa_tokens, "rosa_s": round(rosa_s, 3), "rosa_tokens_per_s": round(rosa_tps, 2),
        "plain_tokens": plain_tokens, "plain_s": round(plain_s, 3), "plain_tokens_per_s": round(plain_tps, 2),
        "ratio": round(rosa_tps / plain_tps, 3) if plain_tps > 0 else None,
        "outputs_match": ours == plain,
        "s_per_example": round(s_per_example, 3), "split_size": split_size,
        "projected_split_s": round(s_per_example * split_size, 1),
    }
