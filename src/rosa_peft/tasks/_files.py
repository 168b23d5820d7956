"""Where a task's data comes from: the data dir, its files, checked record fields, the hub fallback.

Every error names the file (and the 1-based line number where one applies), so a bad record in a
7,000-line file can be found at once. The JSON Lines files themselves are read by
:func:`rosa_peft.utils.io.iter_jsonl`, the package's one JSONL reader.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterator, Optional, Tuple, Union

from ..utils.checks import UserError

ENV_VAR = "ROSA_PEFT_DATA_DIR"

PathLike = Union[str, "os.PathLike[str]"]

HOW_TO_FIX = f"pass --data-dir DIR (data_dir=...) or set {ENV_VAR}"


def resolve_data_dir(data_dir: Optional[PathLike]) -> Optional[Path]:
    """The explicit ``data_dir`` if given, else ``$ROSA_PEFT_DATA_DIR``, else None."""
    if data_dir is None or str(data_dir) == "":
        data_dir = os.environ.get(ENV_VAR) or None
    if data_dir is None:
        return None
    path = Path(data_dir).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"data dir {path} does not exist or is not a folder; {HOW_TO_FIX}")
    return path


def locate(data_dir: Path, subdir: str, filename: str, task: str) -> Path:
    """``data_dir/subdir/filename``; ``data_dir/filename`` is accepted too (a task's own folder)."""
    candidates = [data_dir / subdir / filename, data_dir / filename]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"task {task!r}: data file not found: {candidates[0]} "
        f"(expected {subdir}/{filename} under the data dir; {HOW_TO_FIX})"
    )


def get_field(record: dict, field: str, source: Any, lineno: int, kind: type = str) -> Any:
    """``record[field]``, checked to be of type ``kind``; errors name field, file and line."""
    if field not in record:
        keys = ", ".join(sorted(map(str, record))) or "none"
        raise UserError(f"{source}, line {lineno}: missing field {field!r} (fields present: {keys})")
    value = record[field]
    if not isinstance(value, kind):
        raise UserError(
            f"{source}, line {lineno}: field {field!r} must be {kind.__name__}, got {type(value).__name__}"
        )
    return value


def hf_records(task: str, hf_id: str, config: Optional[str], split: str,
               limit: Optional[int]) -> Iterator[Tuple[int, dict]]:
    """Records of a Hugging Face dataset, tried only when no data dir is configured.

    ``datasets`` is imported lazily; any failure (not installed, no network, unknown id) becomes
    one FileNotFoundError that says how to point at local files instead.
    """
    try:
        import datasets  # noqa: PLC0415 - optional dependency
    except ImportError:
        raise FileNotFoundError(
            f"task {task!r}: no data dir given; {HOW_TO_FIX} "
            f"(the fallback to the Hugging Face dataset {hf_id!r} needs the optional 'datasets' package)"
        ) from None
    try:
        args = (hf_id, config) if config else (hf_id,)
        dataset = datasets.load_dataset(*args, split=split)
    except Exception as exc:  # noqa: BLE001 - any loader failure gets the same advice
        raise FileNotFoundError(
            f"task {task!r}: no data dir given and loading {hf_id!r} split {split!r} from the "
            f"Hugging Face hub failed ({type(exc).__name__}: {exc}); {HOW_TO_FIX}"
        ) from None
    n = len(dataset) if limit is None else min(limit, len(dataset))
    for index in range(n):
        yield index + 1, dict(dataset[index])
