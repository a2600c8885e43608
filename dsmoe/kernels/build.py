"""Compiling and loading the native kernels (`*.c` beside this file) with ctypes.

`cc -O3 -funroll-loops -march=native -shared` on first use, into `~/.cache/dsmoe/kernels/`
(`$DSMOE_KERNEL_CACHE` moves it) under a name keyed by the sources, the compiler and the
CPU's flags: a later process loads the library in milliseconds, a new CPU or source
version builds its own (about 2 seconds). The file appears by rename, so processes
starting together never load half a library. Without a C compiler, or with
`DSMOE_NATIVE_KERNELS=0`, `available()` is False after one warning line.
Not here: what the kernels compute (`ops.py`).
"""
from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

from dsmoe.switch import Switch

SOURCES = tuple(sorted(Path(__file__).parent.glob("*.c")))
HEADERS = tuple(sorted(Path(__file__).parent.glob("*.h")))
CACHE_ENV, SWITCH_ENV = "DSMOE_KERNEL_CACHE", "DSMOE_NATIVE_KERNELS"
# -funroll-loops: the few-row loops with 4 or more rows ran at half the bandwidth without it
# (7.5 against 15.4 GB/s, 4 rows of an 8192 x 384 weight streamed from memory; 1 row 15 -> 19).
FLAGS = ("-O3", "-funroll-loops")

_lib: ctypes.CDLL | None = None
_tried = False
_switch = Switch()


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "dsmoe" / "kernels")


def _cpu_flags() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    return platform.processor() or platform.machine()


def _compile(cc: str, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        built = Path(tmp) / out.name
        errors = ""
        for arch in (["-march=native"], []):  # some compilers (older ARM gcc) lack -march=native
            cmd = [cc, *FLAGS, *arch, "-shared", "-fPIC", *map(str, SOURCES), "-o", str(built), "-lm"]
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode == 0:
                os.replace(built, out)  # atomic: a concurrent process sees all of it or nothing
                return
            errors = done.stderr.strip()[-500:]
        raise OSError(errors)


def _load() -> ctypes.CDLL | None:
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if cc is None:
        warnings.warn("dsmoe: no C compiler found; few-row CPU inference uses torch's kernels "
                      "(install gcc or clang for faster decoding)", stacklevel=4)
        return None
    version = subprocess.run([cc, "--version"], capture_output=True, text=True).stdout
    parts = [p.read_bytes() for p in SOURCES + HEADERS] + [" ".join(FLAGS).encode(), version.encode(),
                                                           _cpu_flags().encode()]
    key = hashlib.sha256(b"\0".join(parts)).hexdigest()[:16]
    path = cache_dir() / f"dsmoe-kernels-{key}.so"
    try:
        if not path.exists():
            _compile(cc, path)
        return ctypes.CDLL(str(path))
    except OSError as e:
        warnings.warn(f"dsmoe: could not build the native kernels ({e}); few-row CPU inference "
                      f"uses torch's kernels", stacklevel=4)
        return None


def library() -> ctypes.CDLL | None:
    """The library, built or loaded on the first call; None when it cannot be, or while
    `disabled()`."""
    global _lib, _tried
    if not _tried:
        _tried = True
        _lib = None if os.environ.get(SWITCH_ENV, "1") == "0" else _load()
    return _lib if _switch.on else None


def disabled():
    """A context in which the torch fallbacks run (what the tests compare the kernels with)."""
    return _switch.off()


