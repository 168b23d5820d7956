"""Any local JSON Lines file as a task (one object per line with a prompt and a response field),
and its protocol: greedy generation until EOS, exact match after stripping, the mean response loss.

Fields other than the prompt/response ones are kept in ``meta``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator, Optional, Sequence

from ..utils.checks import UserError, check_int
from ..utils.io import iter_jsonl
from ._files import PathLike, get_field, resolve_data_dir
from .base import Example, Task
from .protocol import EvalProtocol


class JsonlProtocol(EvalProtocol):
    """Any prompt/response JSONL file: greedy generation (no stop string, EOS ends a row), exact match
    after stripping whitespace, and the mean loss per response token (as training measures it)."""

    JSONL_MARGIN_TOKENS = 16
    max_new_tokens_help = f"the longest gold response + {JSONL_MARGIN_TOKENS}"

    @classmethod
    def for_task(cls, task: str, max_seq_len: int = 512, **_) -> "JsonlProtocol":
        check_int("max_seq_len", max_seq_len, 2)
        return cls(task, "jsonl-exact", (), None, True, {"loss": True, "loss_max_seq_len": max_seq_len})

    def prepare(self, tokenizer, examples: Sequence) -> None:
        if self.max_new_tokens is None:  # longer than the longest gold answer cannot match exactly
            longest = max(len(tokenizer(e.response.strip(), add_special_tokens=False)["input_ids"]) for e in examples)
            self.max_new_tokens = longest + self.JSONL_MARGIN_TOKENS

    def score(self, example, generation: str) -> dict:
        prediction, gold = generation.strip(), example.response.strip()
        return {"prediction": prediction, "gold": gold, "correct": prediction == gold}

    def summarize(self, records: Sequence[dict]) -> dict:
        out = super().summarize(records)
        out["exact"] = out["accuracy"]
        out["primary_metric"] = "exact (stripped)"
        return out


class JsonlTask(Task):
    """``train`` from ``path``; ``test`` from ``eval_path`` when given.

    Relative paths that do not exist as given are looked up under ``data_dir`` (or
    ``$ROSA_PEFT_DATA_DIR``).
    """

    name = "jsonl"
    description = "a local .jsonl file with prompt/response fields (path=..., eval_path=...)"
    protocol = JsonlProtocol
    needs_path = True

    def __init__(self, path: Optional[PathLike] = None, eval_path: Optional[PathLike] = None,
                 prompt_field: str = "prompt", response_field: str = "response",
                 data_dir: Optional[PathLike] = None):
        if path is None:
            raise UserError("task 'jsonl' needs path=... (the .jsonl file with the training examples)")
        for label, value in (("prompt_field", prompt_field), ("response_field", response_field)):
            if not isinstance(value, str) or not value:
                raise UserError(f"task 'jsonl': {label} must be a non-empty string, got {value!r}")
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
        for lineno, record in iter_jsonl(path, limit):
            prompt = get_field(record, self.prompt_field, path, lineno)
            response = get_field(record, self.response_field, path, lineno)
            meta = {k: v for k, v in record.items() if k not in (self.prompt_field, self.response_field)}
            yield Example(prompt=prompt, response=response, meta=meta)
