"""Hand an in-memory model (a RosaModel, merged or not, or any HF causal LM) to lm-evaluation-harness.

lm-eval's ``--model_args peft=...`` loads adapters through ``peft.PeftModel``, which does not know
RoSA adapters. Its ``HFLM`` class also accepts an already built model object, which is what this
helper does::

    from lm_eval import simple_evaluate
    from rosa_peft.eval.lm_eval_helper import to_hflm

    lm = to_hflm(rosa_model, tokenizer, batch_size=8)
    results = simple_evaluate(model=lm, tasks=["gsm8k"], num_fewshot=0)

lm-eval is an optional dependency (``pip install lm-eval``); it is imported only when this is called.
"""
from __future__ import annotations

from typing import Any


def _import_hflm():
    try:
        from lm_eval.models.huggingface import HFLM
    except ImportError as exc:
        raise ImportError(
            "to_hflm needs lm-evaluation-harness, which is not installed: pip install lm-eval "
            f"(import failed: {exc})"
        ) from exc
    return HFLM


def to_hflm(model, tokenizer, **kwargs: Any):
    """An ``lm_eval`` ``HFLM`` wrapping ``model`` in memory (no reload, adapters stay as they are).

    ``kwargs`` go to ``HFLM`` (e.g. ``batch_size=8``, ``max_length=2048``). ``HFLM`` needs the model
    to expose ``.config`` and ``.device``; a RosaModel forwards both to its base model. The model is
    put in eval mode. Accelerate/parallelize options do not apply to an in-memory model.
    """
    HFLM = _import_hflm()
    for attr in ("config", "device", "generate"):
        if getattr(model, attr, None) is None:
            raise ValueError(f"to_hflm: the model has no .{attr}; pass a transformers causal LM or a RosaModel")
    if tokenizer is None:
        raise ValueError("to_hflm: a tokenizer is required")
    model.eval()
    return HFLM(pretrained=model, tokenizer=tokenizer, **kwargs)
