"""Atomic writes: a file or a folder appears complete, or not at all.

Every output that outlives a command (training checkpoints, Hugging Face exports, the
outputs of sft/esft/expand, `dsmoe convert`, prepared data) goes through this module:

- A file (`write_file`): written to a hidden sibling, flushed and fsynced, renamed over the
  target, then the folder is fsynced, so a crash leaves the old file or the new one.
- A folder (`replacing_dir`): assembled in a hidden sibling `.NAME.tmp.XXXX`; when complete,
  every file in it is fsynced and it is swapped with the target. On Linux the swap is one
  `renameat2(RENAME_EXCHANGE)`: at every instant the target is the complete old folder or
  the complete new one, and the old one is deleted only afterwards. Where that call is
  missing, the old folder is renamed aside (`.NAME.old.XXXX`) before the new one is renamed
  in; a crash between the two renames leaves both, and `remove_leftovers` (called before
  every replacement) puts the old one back.
- Errors: a failed write (full disk, quota, permissions, a read-only file system) removes
  the temporary and raises the caller's DsmoeError (CheckpointError, DataError) naming the
  target and the reason, with the previous output intact. torch.save hides the OSError
  inside a RuntimeError and safetensors inside its own error; both are unwrapped here.

Not here: deciding what is replaceable (callers refuse to replace a folder they did not
write), keeping several versions (train/checkpoint.py keeps the last few), Windows (whose
rename does not replace an existing target).
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import glob
import os
import re
import secrets
import shutil
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable, Iterator

from dsmoe.errors import CheckpointError, DsmoeError

_TMP, _OLD = ".tmp.", ".old."
_RENAME_EXCHANGE, _AT_FDCWD = 2, -100
# safetensors reports I/O failures as "I/O error: <strerror> (os error <errno>)"
_RUST_IO_ERROR = re.compile(r"(?:I/O error|IoError)\W*(.*?)\s*\(os error (\d+)\)")


# --------------------------------------------------------------------------- files
def fsync_dir(path: str | Path) -> None:
    """Make a rename or a new entry in `path` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_synced(path: str | Path, write: Callable[[BinaryIO], object]) -> None:
    """Create `path` with `write(f)`, then flush and fsync it (for files inside a temporary
    folder that is swapped in as a whole, or under `write_file`)."""
    with open(path, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())


def write_file(path: str | Path, data: bytes | str, error: type[DsmoeError] = CheckpointError) -> Path:
    """Replace the file `path` by `data` atomically (str is written as UTF-8)."""
    path = Path(path)
    raw = data.encode("utf-8") if isinstance(data, str) else data
    tmp = path.with_name(f".{path.name}{_TMP}{os.getpid()}-{secrets.token_hex(4)}")
    try:
        write_synced(tmp, lambda f: f.write(raw))
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException as err:
        tmp.unlink(missing_ok=True)
        _raise_translated(err, path, error, f"{path} is unchanged")
        raise
    return path


# --------------------------------------------------------------------------- folders
@contextlib.contextmanager
def replacing_dir(out: str | Path, error: type[DsmoeError] = CheckpointError,
                  describe: Callable[[OSError], str] | None = None) -> Iterator[Path]:
    """`with replacing_dir(out) as tmp:` write the new folder into `tmp`; when the block
    ends without an exception, `tmp` replaces `out` atomically. Any exception removes `tmp`
    and leaves `out` as it was; an I/O failure becomes `error` with the message
    `describe(os_error)` (default: the target, the reason and what was kept)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_leftovers(out)
    existed = out.exists()
    tmp = make_temp_dir(out)
    try:
        yield tmp
        swap_into_place(tmp, out)
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        kept = f"the previous {out} is intact" if existed else f"nothing was written to {out}"
        _raise_translated(err, out, error, kept, describe)
        raise


def make_temp_dir(out: str | Path) -> Path:
    """An empty hidden sibling of `out`, with the permissions a plain mkdir would give."""
    out = Path(out)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}{_TMP}", dir=out.parent))
    umask = os.umask(0)  # mkdtemp makes 0700 folders; outputs are not secrets
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)
    return tmp


def swap_into_place(tmp: str | Path, out: str | Path) -> None:
    """Make the complete folder `tmp` durable and put it at `out`, replacing what is there;
    the old folder is deleted only once the new one is in place."""
    tmp, out = Path(tmp), Path(out)
    sync_tree(tmp)
    if not out.exists():
        tmp.rename(out)
        old = None
    elif _exchange(tmp, out):
        old = tmp  # the exchange left the old folder at the temporary name
    else:
        old = out.with_name(f".{out.name}{_OLD}{os.getpid()}-{secrets.token_hex(4)}")
        out.rename(old)
        tmp.rename(out)
    fsync_dir(out.parent)
    if old is not None:
        shutil.rmtree(old)


def sync_tree(root: str | Path) -> None:
    """fsync every file and folder under `root` (the writers we call do not all sync)."""
    for folder, _, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(folder, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(folder)


def remove_leftovers(out: str | Path) -> None:
    """Clean up after a killed replacement of `out`: temporaries are dropped; an old folder
    renamed aside comes back if `out` is missing (the crash fell between the two renames)."""
    out = Path(out)
    if not out.parent.is_dir():
        return
    for path in sorted(out.parent.glob(f".{glob.escape(out.name)}{_OLD}*")):
        if out.exists():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.rename(out)
    for path in out.parent.glob(f".{glob.escape(out.name)}{_TMP}*"):
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


def discard_temp_dir(tmp: str | Path, out: str | Path, err: BaseException,
                     error: type[DsmoeError] = CheckpointError) -> None:
    """For callers that manage `make_temp_dir`/`swap_into_place` themselves: remove `tmp`
    after `err`, raising `error` instead when `err` is an I/O failure (else return, and the
    caller re-raises `err`)."""
    shutil.rmtree(tmp, ignore_errors=True)
    _raise_translated(err, Path(out), error, f"{out} was not replaced")


# --------------------------------------------------------------------------- errors
def io_error(err: BaseException | None) -> OSError | None:
    """The I/O failure behind `err`, or None when `err` is something else (a bug)."""
    seen = err
    while seen is not None and not isinstance(seen, OSError):
        seen = seen.__cause__ or seen.__context__
    if seen is not None:
        return seen
    if err is not None and (m := _RUST_IO_ERROR.search(str(err))):
        return OSError(int(m[2]), m[1])  # safetensors' own error type
    return None


def _raise_translated(err: BaseException, out: Path, error: type[DsmoeError], kept: str,
                      describe: Callable[[OSError], str] | None = None) -> None:
    """Raise `error` for an I/O failure behind `err`; return for anything else. A failure
    already translated by a nested write (a save into our temporary folder) is translated
    again, so that the message names the caller's target, not a temporary."""
    if isinstance(err, DsmoeError) and not getattr(err, "failed_write", False):
        return  # bad input: its message already says what is wrong
    os_error = io_error(err)
    if os_error is None:
        return
    if describe is not None:
        message = describe(os_error)
    else:
        message = (f"could not write {out} ({os_error.strerror or os_error}); {kept}. "
                   f"Free disk space (or fix the folder's permissions) and run the command again")
    translated = error(message)
    translated.failed_write = True
    raise translated from err


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux renameat2); False where the call is unavailable."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):  # the file system cannot exchange
        return False
    raise OSError(code, os.strerror(code), str(b))
