"""Locating data files and reading JSON Lines with precise error messages.

Every error names the file (and the 1-based line number where one applies), so a bad
record in a 7,000-line file can be found at once; that includes bytes that are not UTF-8.
With a limit, only the lines up to the last record kept are read.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Iterator, Optional, Tuple, Union

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


_UNDECODABLE = re.compile("[\udc80-\udcff]")  # bytes that were not UTF-8 (kept by surrogateescape)


def read_jsonl(path: Path, limit: Optional[int] = None) -> Iterator[Tuple[int, dict]]:
    """Yield ``(line_number, record)`` for the first ``limit`` records; blank lines are skipped.

    The file must be UTF-8 (a leading BOM is allowed); a line that is not names the file, the line
    and the column of the first bad byte. With ``limit``, reading stops right after the ``limit``-th
    record: the lines after it are never decoded, parsed or checked, so a bad line there does not
    abort the load.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {path}")
    if limit is not None and limit <= 0:
        return
    count = 0
    # surrogateescape: a bad byte must not fail a whole read-ahead chunk (with no line number, and
    # possibly beyond the limit); it is found per line below instead.
    with path.open("r", encoding="utf-8-sig", errors="surrogateescape") as handle:
        for lineno, line in enumerate(handle, start=1):
            bad = _UNDECODABLE.search(line)
            if bad is not None:
                raise ValueError(f"{path}, line {lineno}: not valid UTF-8 (byte 0x{ord(bad.group()) - 0xDC00:02x} "
                                 f"at column {bad.start() + 1})")
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}, line {lineno}: malformed JSON ({exc.msg} at column {exc.colno})") from None
            if not isinstance(record, dict):
                raise ValueError(f"{path}, line {lineno}: expected a JSON object, got {type(record).__name__}")
            count += 1
            yield lineno, record
            if limit is not None and count >= limit:
                return


def get_field(record: dict, field: str, source: Any, lineno: int, kind: type = str) -> Any:
    """``record[field]``, checked to be of type ``kind``; errors name field, file and line."""
    if field not in record:
        keys = ", ".join(sorted(map(str, record))) or "none"
        raise ValueError(f"{source}, line {lineno}: missing field {field!r} (fields present: {keys})")
    value = record[field]
    if not isinstance(value, kind):
        raise ValueError(
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
