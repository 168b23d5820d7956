"""The task abstraction: an :class:`Example` is one (prompt, response, meta) triple, a
:class:`Task` hands out the examples of a named split and names its evaluation protocol."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Dict, Iterable, Iterator, List, Optional, Tuple, Type

from ..utils.checks import UserError, check_int
from ..utils.io import iter_jsonl
from . import _files
from .protocol import EvalProtocol


@dataclass
class Example:
    """One training/evaluation example.

    ``prompt`` is what the model reads (no loss), ``response`` is what it must produce (loss),
    and ``meta`` carries what evaluation needs (gold answer, tables, ...).
    """

    prompt: str
    response: str
    meta: Dict[str, Any] = field(default_factory=dict)


def check_limit(limit: Optional[int]) -> Optional[int]:
    return check_int("limit", limit, 0, allow_none=True)


class Task:
    """Base class. Subclasses set ``name``, ``splits``, ``train_split``, ``eval_split`` and
    implement :meth:`_load` (which may stop early once ``limit`` examples are produced).

    ``protocol`` is the :class:`~rosa_peft.tasks.protocol.EvalProtocol` subclass that evaluates the
    task (None: the task can be trained on, not evaluated). ``needs_path`` marks a task built from a
    file the user names (``path=``, ``eval_path=``, ``prompt_field=``, ``response_field=``: the
    ``--data``, ``--prompt-field`` and ``--response-field`` flags), not from the data dir.
    ``table_columns`` are the ``(column title, summary key)`` pairs a results table shows for the task;
    ``paired_fields`` the ``(summary key, per-example record field)`` pairs whose per-example values a
    study compares between methods (paired differences with bootstrap intervals); the first is the
    protocol's primary metric.
    """

    name: str = ""
    splits: Tuple[str, ...] = ()
    train_split: str = "train"
    eval_split: str = "test"
    description: str = ""
    protocol: ClassVar[Optional[Type[EvalProtocol]]] = None
    needs_path: ClassVar[bool] = False
    table_columns: ClassVar[Tuple[Tuple[str, str], ...]] = (("Accuracy (%)", "accuracy"),)
    paired_fields: ClassVar[Tuple[Tuple[str, str], ...]] = (("accuracy", "correct"),)

    def load(self, split: Optional[str] = None, limit: Optional[int] = None) -> List[Example]:
        """The examples of ``split`` (default: the train split), in file order; ``limit`` keeps the first N."""
        split = self.check_split(split)
        limit = check_limit(limit)
        examples: List[Example] = []
        for example in self._load(split, limit):
            if limit is not None and len(examples) >= limit:
                break
            examples.append(example)
        return examples

    def check_split(self, split: Optional[str]) -> str:
        if split is None:
            return self.train_split
        if split not in self.splits:
            raise UserError(
                f"task {self.name!r} has no split {split!r}; available splits: {', '.join(self.splits)}"
            )
        return split

    def _load(self, split: str, limit: Optional[int]) -> Iterable[Example]:
        raise NotImplementedError

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(name={self.name!r}, splits={self.splits!r}, "
                f"train_split={self.train_split!r}, eval_split={self.eval_split!r})")


class FileTask(Task):
    """A task read from ``{data_dir}/{subdir}/{file}`` JSON Lines files, with an optional
    Hugging Face fallback used only when neither ``data_dir`` nor ``$ROSA_PEFT_DATA_DIR`` is set."""

    subdir: str = ""
    files: Dict[str, str] = {}
    hf_id: Optional[str] = None
    hf_config: Optional[str] = None
    hf_splits: Dict[str, str] = {}

    def __init__(self, data_dir: Optional[_files.PathLike] = None):
        self.data_dir: Optional[Path] = _files.resolve_data_dir(data_dir)

    def path(self, split: str) -> Path:
        """The local file of ``split``; FileNotFoundError says how to configure the data dir."""
        split = self.check_split(split)
        if self.data_dir is None:
            raise FileNotFoundError(
                f"task {self.name!r}: no data dir given for {self.subdir}/{self.files[split]}; {_files.HOW_TO_FIX}"
            )
        return _files.locate(self.data_dir, self.subdir, self.files[split], self.name)

    def records(self, split: str, limit: Optional[int]) -> Iterator[Tuple[str, int, dict]]:
        """``(source, line_number, record)`` from the local file, or from the hub as a fallback."""
        if self.data_dir is not None or self.hf_id is None:
            path = self.path(split)
            for lineno, record in iter_jsonl(path, limit):
                yield str(path), lineno, record
            return
        hf_split = self.hf_splits.get(split, split)
        source = f"{self.hf_id}[{hf_split}]"
        for lineno, record in _files.hf_records(self.name, self.hf_id, self.hf_config, hf_split, limit):
            yield source, lineno, record

    def _load(self, split: str, limit: Optional[int]) -> Iterator[Example]:
        for source, lineno, record in self.records(split, limit):
            yield self.convert(record, source, lineno, split)

    def convert(self, record: dict, source: str, lineno: int, split: str) -> Example:
        raise NotImplementedError
