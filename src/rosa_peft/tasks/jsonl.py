"""Any local JSON Lines file as a task: one object per line with a prompt and a response field.

Fields other than the prompt/response ones are kept in ``meta``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator, Optional

from .base import Example, Task
from ._files import PathLike, get_field, read_jsonl, resolve_data_dir


class JsonlTask(Task):
    """``train`` from ``path``; ``test`` from ``eval_path`` when given.

    Relative paths that do not exist as given are looked up under ``data_dir`` (or
    ``$ROSA_PEFT_DATA_DIR``).
    """

    name = "jsonl"
    description = "a local .jsonl file with prompt/response fields (path=..., eval_path=...)"

    def __init__(self, path: Optional[PathLike] = None, eval_path: Optional[PathLike] = None,
                 prompt_field: str = "prompt", response_field: str = "response",
                 data_dir: Optional[PathLike] = None):
        if path is None:
            raise ValueError("task 'jsonl' needs path=... (the .jsonl file with the training examples)")
        for label, value in (("prompt_field", prompt_field), ("response_field", response_field)):
            if not isinstance(value, str) or not value:
                raise ValueError(f"task 'jsonl': {label} must be a non-empty string, got {value!r}")
        self._data_dir = data_dir
        self.prompt_field = prompt_field
        self.response_field = response_field
        self.files = {"train": self._resolve(path)}
        if eval_path is not None:
            self.files["test"] = self._resolve(eval_path)
        self.splits = tuple(self.files)
        self.train_split = "train"
        self.eval_split = "test" if "test" in self.files else "train"

    def _resolve(self, path: PathLike) -> Path:
        candidate = Path(path).expanduser()
        if candidate.is_file():
            return candidate
        if not candidate.is_absolute():
            base = resolve_data_dir(self._data_dir)
            if base is not None and (base / candidate).is_file():
                return base / candidate
        raise FileNotFoundError(f"task 'jsonl': file not found: {candidate}")

    def _load(self, split: str, limit: Optional[int]) -> Iterator[Example]:
        path = self.files[split]
        for lineno, record in read_jsonl(path, limit):
            prompt = get_field(record, self.prompt_field, path, lineno)
            response = get_field(record, self.response_field, path, lineno)
            meta = {k: v for k, v in record.items() if k not in (self.prompt_field, self.response_field)}
            yield Example(prompt=prompt, response=response, meta=meta)
