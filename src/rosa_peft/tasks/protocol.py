"""How a task is evaluated: the :class:`EvalProtocol` base class that each task file subclasses.

A task class names its protocol in its ``protocol`` attribute (see :class:`rosa_peft.tasks.Task`), so
registering the task (:func:`rosa_peft.tasks.register_task`) registers its evaluation too;
:func:`rosa_peft.eval.get_protocol` looks it up there. The protocol says how to prompt (:meth:`prompt`),
when to stop generating (``stop``, ``max_new_tokens``, EOS always), whether the prompt gets the
tokenizer's special tokens, how to score one generation (:meth:`score`) and how to sum up
(:meth:`summarize`).

Dependency direction: ``rosa_peft.eval`` imports ``rosa_peft.tasks``, never the other way round, so a
task's scoring lives in its own module (or in :mod:`rosa_peft.tasks.sqlexec` for SQL execution).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Dict, Optional, Sequence, Tuple


@dataclass
class EvalProtocol:
    """How one task is evaluated. Subclasses implement :meth:`for_task` and :meth:`score`
    (and :meth:`prompt`, :meth:`prepare`, :meth:`summarize` where the defaults do not fit)."""

    task: str
    name: str
    stop: Tuple[str, ...]
    max_new_tokens: Optional[int]  # None: settled by prepare() from the data
    add_special_tokens: bool
    options: Dict[str, object] = field(default_factory=dict)

    #: the ``rosa eval --max-new-tokens`` help for a protocol whose bound comes from the data (None above)
    max_new_tokens_help: ClassVar[str] = "from the data"

    @classmethod
    def for_task(cls, task: str, **options) -> "EvalProtocol":
        """The protocol for the task registered as ``task``, given every option of
        :func:`rosa_peft.eval.get_protocol` as a keyword (each protocol reads the ones it uses and
        validates them; the others are ignored)."""
        raise NotImplementedError

    def prompt(self, example) -> str:
        return example.prompt

    def prepare(self, tokenizer, examples: Sequence) -> None:
        """Settle what depends on the tokenizer or the data (called before generating)."""

    def score(self, example, generation: str) -> dict:
        raise NotImplementedError

    def summarize(self, records: Sequence[dict]) -> dict:
        n = len(records)
        correct = sum(bool(r["correct"]) for r in records)
        return {"n": n, "correct": correct, "accuracy": correct / n if n else 0.0, "primary_metric": "exact"}

    def describe(self) -> dict:
        return {"name": self.name, "stop": list(self.stop), "max_new_tokens": self.max_new_tokens,
                "add_special_tokens": self.add_special_tokens, **self.options}


def mean(records: Sequence[dict], key: str) -> float:
    """The mean of ``record[key]`` over ``records`` (0.0 when there are none)."""
    return sum(r[key] for r in records) / len(records) if records else 0.0
