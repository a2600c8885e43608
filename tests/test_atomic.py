"""dsmoe.atomic: a file or a folder is replaced completely or not at all, on both swap
paths (Linux's exchange and the two-rename fallback); a kill between the two renames is
recovered; I/O failures become the caller's error naming the target, bugs stay bugs."""
from __future__ import annotations

import errno
from pathlib import Path

import pytest

from dsmoe import atomic
from dsmoe.errors import CheckpointError, DataError


def _tree(path: Path) -> dict[str, str]:
    return {str(p.relative_to(path)): p.read_text() for p in sorted(path.rglob("*")) if p.is_file()}


def _fill(folder: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text)


@pytest.fixture(params=["exchange", "two renames"])
def swap_path(request, monkeypatch):
    if request.param == "two renames":
        monkeypatch.setattr(atomic, "_exchange", lambda a, b: False)
    return request.param


def test_a_folder_is_replaced_as_a_whole(tmp_path, swap_path):
    out = tmp_path / "out"
    with atomic.replacing_dir(out) as tmp:
        _fill(tmp, {"a": "1", "sub/b": "2"})
    assert _tree(out) == {"a": "1", "sub/b": "2"}
    with atomic.replacing_dir(out) as tmp:
        _fill(tmp, {"c": "3"})
    assert _tree(out) == {"c": "3"}  # nothing of the old folder survives in the new one
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_a_failure_midway_keeps_the_old_folder(tmp_path, swap_path):
    out = tmp_path / "out"
    with atomic.replacing_dir(out) as tmp:
        _fill(tmp, {"a": "old"})
    with pytest.raises(DataError, match=rf"could not write {out} \(No space left on device\); the previous .* intact"):
        with atomic.replacing_dir(out, DataError) as tmp:
            _fill(tmp, {"a": "new"})
            raise OSError(errno.ENOSPC, "No space left on device")
    assert _tree(out) == {"a": "old"} and [p.name for p in tmp_path.iterdir()] == ["out"]


def test_a_bug_is_not_disguised_as_a_disk_error(tmp_path):
    with pytest.raises(KeyError):
        with atomic.replacing_dir(tmp_path / "out") as tmp:
            _fill(tmp, {"a": "1"})
            raise KeyError("bug")
    assert list(tmp_path.iterdir()) == []


def test_torch_and_safetensors_hide_the_os_error(tmp_path):
    wrapped = RuntimeError("unexpected pos 704 vs 598")
    wrapped.__context__ = OSError(errno.ENOSPC, "No space left on device")
    assert atomic.io_error(wrapped).errno == errno.ENOSPC
    rust = Exception("Error while serializing: I/O error: Disk quota exceeded (os error 122)")
    assert (atomic.io_error(rust).errno, atomic.io_error(rust).strerror) == (122, "Disk quota exceeded")
    assert atomic.io_error(ValueError("not I/O")) is None


def test_a_kill_between_the_two_renames_is_recovered(tmp_path, monkeypatch):
    out = tmp_path / "out"
    with atomic.replacing_dir(out) as tmp:
        _fill(tmp, {"a": "old"})
    monkeypatch.setattr(atomic, "_exchange", lambda a, b: False)
    real_rename, renames = Path.rename, []

    def rename(self, target):
        renames.append(target)
        if len(renames) == 2:  # out is aside, the new folder not yet in place
            raise KeyboardInterrupt
        return real_rename(self, target)

    monkeypatch.setattr(Path, "rename", rename)
    with pytest.raises(KeyboardInterrupt):
        with atomic.replacing_dir(out) as tmp:
            _fill(tmp, {"a": "new"})
    monkeypatch.undo()
    assert not out.exists() and len(list(tmp_path.iterdir())) == 1  # only the old one, aside
    atomic.remove_leftovers(out)  # what the next save (or resume) does first
    assert _tree(out) == {"a": "old"} and [p.name for p in tmp_path.iterdir()] == ["out"]


def test_leftover_temporaries_are_removed(tmp_path):
    out = tmp_path / "out"
    with atomic.replacing_dir(out) as tmp:
        _fill(tmp, {"a": "1"})
    stale = atomic.make_temp_dir(out)
    _fill(stale, {"half": "written"})
    with atomic.replacing_dir(out) as tmp:
        _fill(tmp, {"a": "2"})
    assert [p.name for p in tmp_path.iterdir()] == ["out"] and _tree(out) == {"a": "2"}


def test_write_file_replaces_a_file_or_keeps_it(tmp_path, monkeypatch):
    path = tmp_path / "meta.json"
    atomic.write_file(path, "one")
    atomic.write_file(path, b"two")
    assert path.read_text() == "two"

    monkeypatch.setattr(atomic, "write_synced", lambda p, write: _write_then_fail(p))
    with pytest.raises(CheckpointError, match=rf"{path} \(No space left on device\); {path} is unchanged"):
        atomic.write_file(path, "three")
    assert path.read_text() == "two" and [p.name for p in tmp_path.iterdir()] == ["meta.json"]


def _write_then_fail(path):
    with open(path, "wb") as f:
        f.write(b"thr")
    raise OSError(errno.ENOSPC, "No space left on device")
