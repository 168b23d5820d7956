"""Look up a task's evaluation protocol by name (a registry lookup) and score generations with it.

Each task module defines its own protocol (:class:`rosa_peft.tasks.EvalProtocol` subclass, named by
the task class's ``protocol`` attribute); the per-task prompts, stop strings, token bounds and verdicts
are listed in docs/evaluation.md. :func:`get_protocol` builds one from the task registry
(:mod:`rosa_peft.tasks.registry`), then applies the generic ``stop`` / ``max_new_tokens`` overrides.
"""
from __future__ import annotations

from typing import List, Optional, Sequence

from ..tasks.gsm8k import GSM8K_HARNESS_STOP, GSM8K_PAPER_STOP
from ..tasks.protocol import EvalProtocol
from ..tasks.registry import protocol_class, task_key, task_names
from ..utils.checks import check_int

__all__ = ["EvalProtocol", "get_protocol", "score_all", "GSM8K_PAPER_STOP", "GSM8K_HARNESS_STOP"]


def __getattr__(name: str):
    """``PROTOCOL_TASKS`` (evaluable by name alone) and ``FILE_PROTOCOL_TASKS`` (evaluable given a
    file, ``rosa eval --data PATH``), read from the registry at each access; prefer
    :func:`rosa_peft.tasks.task_names`."""
    if name == "PROTOCOL_TASKS":
        return tuple(task_names(evaluable=True, needs_path=False))
    if name == "FILE_PROTOCOL_TASKS":
        return tuple(task_names(evaluable=True, needs_path=True))
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def get_protocol(task: str, gsm8k_protocol: str = "paper", sql_paper_prompt: bool = False,
                 sql_case_insensitive: bool = True, sql_timeout_s: float = 2.0,
                 stop: Optional[Sequence[str]] = None, max_new_tokens: Optional[int] = None,
                 max_seq_len: int = 512) -> EvalProtocol:
    """The protocol for ``task`` (a task name); ``stop`` / ``max_new_tokens`` override its defaults.

    The other options go to the task's protocol, which uses the ones that concern it: ``gsm8k_protocol``
    (gsm8k), ``sql_*`` (sql, sql-synth), ``max_seq_len`` (jsonl: prompt + response tokens scored for the loss).
    """
    key = task_key(task)
    proto = protocol_class(task).for_task(key, gsm8k_protocol=gsm8k_protocol, sql_paper_prompt=sql_paper_prompt,
                                          sql_case_insensitive=sql_case_insensitive, sql_timeout_s=sql_timeout_s,
                                          max_seq_len=max_seq_len)
    if stop is not None:
        proto.stop = tuple(stop)
    if max_new_tokens is not None:
        proto.max_new_tokens = check_int("max_new_tokens", max_new_tokens, 1)
    return proto


def score_all(protocol: EvalProtocol, examples: Sequence, generations: Sequence[str],
              prompts: Sequence[str]) -> List[dict]:
    """One record per example: index, prompt, generation, prediction, gold, correct, extras."""
    records = []
    for i, (example, prompt, generation) in enumerate(zip(examples, prompts, generations)):
        records.append({"index": i, "prompt": prompt, "generation": generation,
                        **protocol.score(example, generation)})
    return records
