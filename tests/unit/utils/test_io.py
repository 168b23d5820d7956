"""Crash-safe writers (rosa_peft.utils.io): no temporary left after a failure, modes follow the umask,
stale temporaries of a killed process are swept, staged directories swap in only when complete."""
import os
import stat

import pytest
import torch

from rosa_peft.utils import io


@pytest.fixture
def umask():
    """Set the process umask for one test, restoring it afterwards."""
    saved = os.umask(0o022)
    os.umask(saved)

    def set_(mask):
        os.umask(mask)

    yield set_
    os.umask(saved)


def _mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


class _Boom(Exception):
    pass


def test_failing_bytes_write_leaves_no_temp_and_keeps_old_file(tmp_path, monkeypatch):
    target = tmp_path / "out.json"
    target.write_text("old")

    def fail(src, dst):
        raise _Boom("disk full")

    monkeypatch.setattr(io.os, "replace", fail)
    with pytest.raises(_Boom):
        io.atomic_write_text(str(target), "new")
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == ["out.json"]
    assert target.read_text() == "old"


def test_interrupted_bytes_write_leaves_no_temp(tmp_path, monkeypatch):
    real_fdopen = os.fdopen

    class Interrupting:
        def __init__(self, fh):
            self.fh = fh

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.fh.close()

        def write(self, data):
            self.fh.write(data[:3])
            raise KeyboardInterrupt

    monkeypatch.setattr(io.os, "fdopen", lambda fd, mode: Interrupting(real_fdopen(fd, mode)))
    with pytest.raises(KeyboardInterrupt):
        io.atomic_write_bytes(str(tmp_path / "x.bin"), b"0123456789")
    assert os.listdir(tmp_path) == []


def test_failing_safetensors_write_leaves_no_temp(tmp_path):
    target = tmp_path / "w.safetensors"
    with pytest.raises(Exception):
        # two names sharing one storage: safetensors refuses them, after the temp file was created
        t = torch.zeros(4)
        io.atomic_save_safetensors({"a": t, "b": t[:2]}, str(target))
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("mask", [0o022, 0o077, 0o002])
def test_written_files_follow_the_umask(tmp_path, umask, mask):
    umask(mask)
    text, tensors = tmp_path / "a.json", tmp_path / "b.safetensors"
    io.atomic_write_text(str(text), "{}")
    io.atomic_save_safetensors({"w": torch.ones(2)}, str(tensors))
    assert _mode(text) == 0o666 & ~mask
    assert _mode(tensors) == 0o666 & ~mask
    assert io.current_umask() == mask
    with io.staged_directory(str(tmp_path / "staged")) as stage:
        with open(os.path.join(stage, "f"), "w") as fh:
            fh.write("x")
    assert _mode(tmp_path / "staged") == 0o777 & ~mask


def test_stale_temp_files_are_swept_and_nothing_else(tmp_path):
    sub = tmp_path / "checkpoints" / "checkpoint-3"
    sub.mkdir(parents=True)
    stale = [tmp_path / ".tmp-ab12_xyzadapter_model.safetensors", sub / ".tmp-0123abcd.safetensors",
             tmp_path / ".tmp-zzzzzzzzrun_config.json"]
    for p in stale:
        p.write_bytes(b"")  # what a SIGKILL during a save leaves: a 0-byte temporary
    keep = [tmp_path / ".tmp-short", tmp_path / "tmp-abcdefghx", tmp_path / "adapter_model.safetensors",
            tmp_path / ".tmp-ABCDEFGHx"]
    for p in keep:
        p.write_text("mine")
    (tmp_path / ".tmp-abcdefghdir").mkdir()  # a directory with the pattern is not ours to delete
    removed = io.remove_stale_temp_files(str(tmp_path))
    assert sorted(removed) == sorted(map(str, stale))
    assert all(not p.exists() for p in stale)
    assert all(p.read_text() == "mine" for p in keep)
    assert (tmp_path / ".tmp-abcdefghdir").is_dir()


def test_staged_directory_keeps_the_previous_one_until_complete(tmp_path):
    final = tmp_path / "demo"
    final.mkdir()
    (final / "old.txt").write_text("previous")
    with pytest.raises(KeyboardInterrupt):
        with io.staged_directory(str(final)) as stage:
            with open(os.path.join(stage, "new.txt"), "w") as fh:
                fh.write("half")
            raise KeyboardInterrupt
    assert os.listdir(tmp_path) == ["demo"] and (final / "old.txt").read_text() == "previous"

    # a SIGKILL skips the cleanup: the leftover staging directory goes at the next run
    leftover = tmp_path / ".demo.tmp-k1lled_x"
    leftover.mkdir()
    (leftover / "half.bin").write_bytes(b"x")
    with io.staged_directory(str(final)) as stage:
        assert not leftover.exists()
        with open(os.path.join(stage, "new.txt"), "w") as fh:
            fh.write("fresh")
    assert os.listdir(tmp_path) == ["demo"]
    assert os.listdir(final) == ["new.txt"] and (final / "new.txt").read_text() == "fresh"


def test_killed_between_the_swap_renames_restores_the_previous_directory(tmp_path):
    final = tmp_path / "demo"
    backup = tmp_path / ".demo.old-abcd1234"
    backup.mkdir()
    (backup / "old.txt").write_text("previous")
    staged = tmp_path / ".demo.tmp-efgh5678"
    staged.mkdir()
    io.clean_staging_leftovers(str(final))
    assert sorted(os.listdir(tmp_path)) == ["demo"]
    assert (final / "old.txt").read_text() == "previous"


def test_the_one_jsonl_reader(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"a": 1}\n\n{"a": 2}\n{"a": 3}\n[1, 2]\n')
    assert io.read_jsonl(str(path), limit=3) == [{"a": 1}, {"a": 2}, {"a": 3}]  # a BOM is fine; stops before [1, 2]
    assert list(io.iter_jsonl(path, limit=2)) == [(1, {"a": 1}), (3, {"a": 2})]  # 1-based line numbers
    assert io.read_jsonl(path, limit=0) == []
    with pytest.raises(ValueError, match=r"m\.jsonl, line 5: expected a JSON object, got list"):
        io.read_jsonl(path)
    path.write_text('{"a": 1}\n{"a": \n')
    with pytest.raises(ValueError, match=r"m\.jsonl, line 2: malformed JSON"):
        io.read_jsonl(path)
    with pytest.raises(FileNotFoundError, match="data file not found"):
        io.read_jsonl(tmp_path / "missing.jsonl")
