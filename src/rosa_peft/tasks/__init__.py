"""Fine-tuning tasks: RoSA's GSM8K, ViGGO and SQL, a local-jsonl task and the built-in
offline ``sql-synth`` task, plus tokenisation (prompt masked from the loss) and a collator.

>>> from rosa_peft.tasks import get_task, build_dataset, Collator
>>> task = get_task("sql-synth", seed=0)
>>> train = build_dataset(task, tokenizer, max_seq_len=512)          # doctest: +SKIP
"""
from .base import Example, Task
from .registry import DEFAULT_TASK, TASKS, get_task, list_tasks, register_task
from .tokenize import Collator, EncodedDataset, build_dataset, encode_example

__all__ = [
    "Example",
    "Task",
    "TASKS",
    "DEFAULT_TASK",
    "get_task",
    "list_tasks",
    "register_task",
    "encode_example",
    "build_dataset",
    "EncodedDataset",
    "Collator",
]
