"""Task names -> task classes, and :func:`get_task` to build one by name."""
from __future__ import annotations

import inspect
from typing import Dict, List, Optional, Type

from ._files import PathLike
from .base import Task
from .builtin import SQLSynthTask
from .gsm8k import GSM8KTask
from .jsonl import JsonlTask
from .sql import SQLTask
from .viggo import ViGGOTask

DEFAULT_TASK = "sql-synth"

TASKS: Dict[str, Type[Task]] = {
    "gsm8k": GSM8KTask,
    "viggo": ViGGOTask,
    "sql": SQLTask,
    "sql-synth": SQLSynthTask,
    "jsonl": JsonlTask,
}


def list_tasks() -> List[str]:
    """The registered task names (the default, ``sql-synth``, is used when no name is given)."""
    return list(TASKS)


def register_task(name: str, cls: Type[Task]) -> None:
    """Add a task class under ``name`` (an existing name is replaced)."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"task name must be a non-empty string, got {name!r}")
    if not (isinstance(cls, type) and issubclass(cls, Task)):
        raise ValueError(f"task {name!r}: {cls!r} is not a subclass of rosa_peft.tasks.Task")
    TASKS[name] = cls


def get_task(name: Optional[str] = None, data_dir: Optional[PathLike] = None, **kwargs) -> Task:
    """Build the task called ``name`` (default ``sql-synth``).

    ``data_dir`` is passed to tasks that read files (default ``$ROSA_PEFT_DATA_DIR``); other
    keyword arguments go to the task's constructor (e.g. ``seed=``, ``n_train=`` for sql-synth,
    ``path=``, ``prompt_field=`` for jsonl). Unknown names or options raise ValueError.
    """
    key = DEFAULT_TASK if name is None else str(name).strip().lower().replace("_", "-")
    if key not in TASKS:
        raise ValueError(f"unknown task {name!r}; available tasks: {', '.join(TASKS)}")
    cls = TASKS[key]
    init = cls.__init__
    params = {} if init is object.__init__ else inspect.signature(init).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    allowed = [p for p in params if p not in ("self", "data_dir")]
    unknown = [k for k in kwargs if k not in params and not takes_any]
    if unknown:
        raise ValueError(f"task {key!r} got unknown option(s) {', '.join(unknown)}; "
                         f"it accepts: {', '.join(allowed) or 'none'}")
    if "data_dir" in params or takes_any:
        kwargs["data_dir"] = data_dir
    return cls(**kwargs)
