"""Held-out loss: the mean cross-entropy over response tokens, as training measures it."""
from __future__ import annotations

from typing import Sequence

import torch

from ..tasks import Collator, build_dataset
from ..utils.checks import UserError


@torch.no_grad()
def response_loss(model, tokenizer, examples: Sequence, *, max_seq_len: int = 512, batch_size: int = 8) -> float:
    """Mean loss per response token of ``model`` on ``examples`` (prompt tokens are not scored).

    Examples are encoded exactly as for training (``rosa_peft.tasks.build_dataset``); the loss is
    summed over tokens across batches, so padding and batch size do not change the value.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    dataset = build_dataset(list(examples), tokenizer, max_seq_len=max_seq_len)
    if len(dataset) == 0:
        raise UserError(f"every example is longer than max_seq_len={max_seq_len}")
    collate = Collator(tokenizer)
    device = next(p.device for p in model.parameters())
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for start in range(0, len(dataset), batch_size):
            batch = collate([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])
            batch = {k: v.to(device) for k, v in batch.items()}
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            labels = batch["labels"][:, 1:]
            losses = torch.nn.functional.cross_entropy(
                logits[:, :-1].float().reshape(-1, logits.shape[-1]), labels.reshape(-1),
                ignore_index=-100, reduction="sum")
            total += float(losses)
            count += int((labels != -100).sum())
    finally:
        model.train(was_training)
    return total / max(count, 1)
