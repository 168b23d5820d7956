"""Fine-tuning tasks and how each is evaluated: RoSA's GSM8K, ViGGO and SQL, a local-jsonl task and the
built-in offline ``sql-synth`` task, plus tokenisation (prompt masked from the loss) and a collator.

>>> from rosa_peft.tasks import get_task, build_dataset, Collator
>>> task = get_task("sql-synth", seed=0)
>>> train = build_dataset(task, tokenizer, max_seq_len=512)          # doctest: +SKIP

A task is one module (its :class:`Task` subclass, its :class:`EvalProtocol` subclass named by the
task's ``protocol`` attribute, and its scoring) registered once by name (:mod:`.registry`).
``rosa_peft.eval`` imports this package; nothing here imports ``rosa_peft.eval``.
"""
from .base import Example, Task
from .protocol import EvalProtocol
from .registry import DEFAULT_TASK, TASKS, get_task, list_tasks, protocol_class, register_task, task_names
from .tokenize import Collator, EncodedDataset, build_dataset, encode_example

__all__ = [
    "Example",
    "Task",
    "EvalProtocol",
    "TASKS",
    "DEFAULT_TASK",
    "get_task",
    "list_tasks",
    "task_names",
    "protocol_class",
    "register_task",
    "encode_example",
    "build_dataset",
    "EncodedDataset",
    "Collator",
]
