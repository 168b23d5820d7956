"""File I/O: crash-safe writes (a temporary file beside the target, then rename) and the JSON / JSON Lines readers.

Temporary files are named ``.tmp-XXXXXXXX<target name>`` (``XXXXXXXX``: :func:`tempfile.mkstemp`'s
eight random characters); a writer removes its own on any failure, and :func:`remove_stale_temp_files`
sweeps those a killed process left behind. Written files get the mode a plain ``open()`` would give
them (``0o666`` less the umask), not ``mkstemp``'s ``0o600``.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
import threading
from typing import Iterator

from .checks import UserError

TEMP_PREFIX = ".tmp-"
# mkstemp: prefix + 8 characters of [a-z0-9_] + suffix (the target's name): only these are ever swept
_TEMP_NAME = re.compile(r"\.tmp-[a-z0-9_]{8}.+", re.DOTALL)
_UMASK_LOCK = threading.Lock()


def current_umask() -> int:
    """The process umask, read without changing it where the OS allows (Linux ``/proc``)."""
    with contextlib.suppress(OSError, ValueError):
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    with _UMASK_LOCK:  # elsewhere: set and restore it (process-wide, hence the lock)
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def default_file_mode() -> int:
    """The mode ``open(path, "w")`` would create a file with: ``0o666`` less the umask."""
    return 0o666 & ~current_umask()


def default_dir_mode() -> int:
    """The mode ``os.mkdir`` would create a directory with: ``0o777`` less the umask."""
    return 0o777 & ~current_umask()


def _temp_beside(path: str) -> tuple[int, str]:
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    return tempfile.mkstemp(dir=directory, prefix=TEMP_PREFIX, suffix=os.path.basename(path))


def _finish(tmp: str, path: str) -> None:
    with contextlib.suppress(OSError):  # best effort: a filesystem without modes keeps its own
        os.chmod(tmp, default_file_mode())
    os.replace(tmp, path)


def atomic_write_text(path: str, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


@contextlib.contextmanager
def _staged_file(path: str) -> Iterator[tuple[int, str]]:
    """(fd, temporary path) beside ``path``: renamed over ``path`` when the block succeeds, removed if not."""
    fd, tmp = _temp_beside(path)
    done = False
    try:
        yield fd, tmp
        _finish(tmp, path)
        done = True
    finally:
        if not done:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)


def atomic_write_bytes(path: str, data: bytes) -> None:
    """Write ``data`` to a temporary file beside ``path``, then rename it over ``path``."""
    with _staged_file(os.fspath(path)) as (fd, _):
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)


def atomic_save_safetensors(tensors: dict, path: str, metadata: dict | None = None) -> None:
    """:func:`safetensors.torch.save_file` into a temporary file beside ``path``, then rename it over ``path``."""
    from safetensors.torch import save_file

    with _staged_file(os.fspath(path)) as (fd, tmp):
        os.close(fd)
        save_file({k: v.detach().contiguous() for k, v in tensors.items()}, tmp, metadata=metadata)


def is_temp_name(name: str) -> bool:
    """True for the name of a temporary file written by this module's atomic writers."""
    return _TEMP_NAME.fullmatch(name) is not None


def remove_stale_temp_files(directory: str, recursive: bool = True) -> list[str]:
    """Remove the temporary files this module's writers left in ``directory`` (and below) when their
    process was killed; returns their paths. Only regular files with our temp-name pattern are touched."""
    removed = []
    if not os.path.isdir(directory):
        return removed
    walker = os.walk(directory) if recursive else [(directory, [], os.listdir(directory))]
    for root, _dirs, files in walker:
        for name in files:
            path = os.path.join(root, name)
            if is_temp_name(name) and os.path.isfile(path) and not os.path.islink(path):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
                    removed.append(path)
    return removed


def _staging_names(final_dir: str, kind: str) -> list[str]:
    """Paths of ``.NAME.<kind>-XXXXXXXX`` directories beside ``final_dir`` (kind: ``tmp`` or ``old``)."""
    parent, name = os.path.split(final_dir)
    pattern = re.compile(re.escape(f".{name}.{kind}-") + r"[a-z0-9_]{8}", re.DOTALL)
    try:
        entries = os.listdir(parent)
    except FileNotFoundError:
        return []
    return [os.path.join(parent, e) for e in entries
            if pattern.fullmatch(e) and os.path.isdir(os.path.join(parent, e))
            and not os.path.islink(os.path.join(parent, e))]


def clean_staging_leftovers(final_dir: str) -> list[str]:
    """Tidy what a killed :func:`staged_directory` left beside ``final_dir``; returns the paths removed.

    Unfinished staging directories are removed. A backup of the previous ``final_dir`` (left when the
    process died between the two renames of the swap) is put back if ``final_dir`` is missing, and
    removed otherwise.
    """
    final_dir = os.path.abspath(final_dir)
    removed = []
    for path in _staging_names(final_dir, "tmp"):
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    backups = sorted(_staging_names(final_dir, "old"), key=lambda p: os.stat(p).st_mtime_ns)
    if backups and not os.path.lexists(final_dir):
        os.replace(backups.pop(), final_dir)
    for path in backups:
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


@contextlib.contextmanager
def staged_directory(final_dir: str, overwrite: bool = True) -> Iterator[str]:
    """Yield a temporary directory beside ``final_dir``; on success it replaces ``final_dir``.

    On any exception the temporary directory is removed and ``final_dir`` is left untouched, so a
    failed run never leaves a half-written output directory behind, and a previous ``final_dir`` stays
    until the new one is complete. What a killed earlier run left beside ``final_dir`` is cleaned up
    first (:func:`clean_staging_leftovers`). Two runs must not stage the same ``final_dir`` at once.
    """
    final_dir = os.path.abspath(final_dir)
    parent = os.path.dirname(final_dir)
    os.makedirs(parent, exist_ok=True)
    clean_staging_leftovers(final_dir)
    if os.path.exists(final_dir) and not overwrite:
        raise FileExistsError(f"{final_dir} already exists")
    tmp = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(final_dir)}.tmp-")
    with contextlib.suppress(OSError):  # mkdtemp makes it 0700: the result gets a plain mkdir's mode
        os.chmod(tmp, default_dir_mode())
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    backup = None
    try:
        if os.path.exists(final_dir):
            if not overwrite:
                raise FileExistsError(f"{final_dir} already exists")
            backup = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(final_dir)}.old-")
            os.rmdir(backup)
            os.replace(final_dir, backup)
        os.replace(tmp, final_dir)
    except BaseException:
        if backup is not None and os.path.isdir(backup) and not os.path.lexists(final_dir):
            os.replace(backup, final_dir)  # the swap failed half-way: the previous directory goes back
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if backup is not None:
        shutil.rmtree(backup, ignore_errors=True)


def read_json_object(path: str) -> dict:
    """The JSON object in ``path``; ValueError naming the file (and line) when it is not one."""
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}: not valid JSON (line {exc.lineno}: {exc.msg})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: must hold a JSON object")
    return data


_UNDECODABLE = re.compile("[\udc80-\udcff]")  # bytes that were not UTF-8 (kept by surrogateescape)


def iter_jsonl(path: str | os.PathLike, limit: int | None = None) -> Iterator[tuple[int, dict]]:
    """Yield ``(line_number, record)`` for the first ``limit`` records of a JSON Lines file (the one
    JSONL reader of the package); blank lines are skipped, every record must be a JSON object.

    The file must be UTF-8 (a leading BOM is allowed). Every error is a ValueError naming the file and
    the 1-based line (and, for a byte that is not UTF-8, its column), FileNotFoundError for a missing
    file. With ``limit``, reading stops right after the ``limit``-th record: the lines after it are never
    decoded, parsed or checked, so a bad line there does not abort the read.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"data file not found: {path}")
    if limit is not None and limit <= 0:
        return
    count = 0
    # surrogateescape: a bad byte must not fail a whole read-ahead chunk (with no line number, and
    # possibly beyond the limit); it is found per line below instead.
    with open(path, encoding="utf-8-sig", errors="surrogateescape") as handle:
        for lineno, line in enumerate(handle, start=1):
            bad = _UNDECODABLE.search(line)
            if bad is not None:
                raise UserError(f"{path}, line {lineno}: not valid UTF-8 (byte 0x{ord(bad.group()) - 0xDC00:02x} "
                                 f"at column {bad.start() + 1})")
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise UserError(f"{path}, line {lineno}: malformed JSON ({exc.msg} at column {exc.colno})") from None
            if not isinstance(record, dict):
                raise UserError(f"{path}, line {lineno}: expected a JSON object, got {type(record).__name__}")
            count += 1
            yield lineno, record
            if limit is not None and count >= limit:
                return


def read_jsonl(path: str | os.PathLike, limit: int | None = None) -> list[dict]:
    """The records of a JSON Lines file, as :func:`iter_jsonl` reads them (without line numbers)."""
    return [record for _, record in iter_jsonl(path, limit)]
