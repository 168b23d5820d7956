"""The one task registry: task name -> Task class (which names its eval protocol), and lookups on it.

A task is registered once, by name, with the class that loads its data; the class's ``protocol``
attribute is how it is evaluated, so the registry is also the protocol registry
(:func:`rosa_peft.eval.get_protocol` looks up :func:`protocol_class`). Adding a task = one module
(``tasks/<name>.py``: the Task subclass and its EvalProtocol subclass) + one entry in
:data:`_BUILTIN` (or :func:`register_task` from outside the package). Name lists for help texts and
``choices=`` come from :func:`task_names`, never typed by hand.
"""
from __future__ import annotations

import inspect
from typing import Dict, List, Optional, Type

from ..utils.checks import UserError
from ._files import PathLike
from .base import Task
from .builtin import SQLSynthTask
from .gsm8k import GSM8KTask
from .jsonl import JsonlTask
from .protocol import EvalProtocol
from .sql import SQLTask
from .viggo import ViGGOTask

DEFAULT_TASK = "sql-synth"

_BUILTIN = (GSM8KTask, ViGGOTask, SQLTask, SQLSynthTask, JsonlTask)

TASKS: Dict[str, Type[Task]] = {cls.name: cls for cls in _BUILTIN}


def task_key(name: str) -> str:
    """The registry key of a task name as users type it (case, surrounding spaces and ``_`` for ``-`` ignored)."""
    return str(name).strip().lower().replace("_", "-")


def task_names(evaluable: Optional[bool] = None, needs_path: Optional[bool] = None) -> List[str]:
    """The registered task names, in registration order.

    ``evaluable=True`` keeps the tasks that have an eval protocol (False: those without);
    ``needs_path=True`` keeps the tasks built from a file the user names (``jsonl``), False the others.
    ``task_names(evaluable=True, needs_path=False)`` is what can be evaluated by name alone.
    """
    return [name for name, cls in TASKS.items()
            if (evaluable is None or (cls.protocol is not None) == evaluable)
            and (needs_path is None or bool(cls.needs_path) == needs_path)]


def list_tasks() -> List[str]:
    """The registered task names (the default, ``sql-synth``, is used when no name is given)."""
    return task_names()


def register_task(name: str, cls: Type[Task]) -> None:
    """Add a task class under ``name`` (an existing name is replaced). Its ``protocol`` attribute (an
    :class:`~rosa_peft.tasks.protocol.EvalProtocol` subclass, or None) makes it evaluable."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"task name must be a non-empty string, got {name!r}")
    if not (isinstance(cls, type) and issubclass(cls, Task)):
        raise ValueError(f"task {name!r}: {cls!r} is not a subclass of rosa_peft.tasks.Task")
    protocol = cls.protocol
    if protocol is not None and not (isinstance(protocol, type) and issubclass(protocol, EvalProtocol)):
        raise ValueError(f"task {name!r}: protocol {protocol!r} is not a subclass of rosa_peft.tasks.EvalProtocol")
    TASKS[name] = cls


def protocol_class(name: str) -> Type[EvalProtocol]:
    """The eval protocol class of the task called ``name``; ValueError for an unknown task or one
    without a protocol (the message lists the evaluable tasks)."""
    cls = TASKS.get(task_key(name))
    if cls is None or cls.protocol is None:
        raise UserError(f"task {name!r} has no evaluation protocol; evaluable tasks: "
                         f"{', '.join(task_names(evaluable=True))}")
    return cls.protocol


def get_task(name: Optional[str] = None, data_dir: Optional[PathLike] = None, **kwargs) -> Task:
    """Build the task called ``name`` (default ``sql-synth``).

    ``data_dir`` is passed to tasks that read files (default ``$ROSA_PEFT_DATA_DIR``); other
    keyword arguments go to the task's constructor (e.g. ``seed=``, ``n_train=`` for sql-synth,
    ``path=``, ``prompt_field=`` for jsonl). Unknown names or options raise ValueError.
    """
    key = DEFAULT_TASK if name is None else task_key(name)
    if key not in TASKS:
        raise UserError(f"unknown task {name!r}; available tasks: {', '.join(TASKS)}")
    cls = TASKS[key]
    init = cls.__init__
    params = {} if init is object.__init__ else inspect.signature(init).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    allowed = [p for p in params if p not in ("self", "data_dir")]
    unknown = [k for k in kwargs if k not in params and not takes_any]
    if unknown:
        raise UserError(f"task {key!r} got unknown option(s) {', '.join(unknown)}; "
                         f"it accepts: {', '.join(allowed) or 'none'}")
    if "data_dir" in params or takes_any:
        kwargs["data_dir"] = data_dir
    return cls(**kwargs)
