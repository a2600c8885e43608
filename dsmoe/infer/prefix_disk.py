"""The prefix cache's disk tier: one file per cached block, under a byte budget, surviving restarts.

Layout: `DIR/<namespace>/<key>.blk`, where the namespace names the model, tokenizer and
cache layout (`prefix_cache.namespace`) and the key is the block's chain hash. A file is

    MAGIC (8 bytes) | header length (4 bytes, little endian) | header (JSON) | payload | SHA-256

where the header names the namespace, the key, the block's tokens, the payload's shape and
dtype, and the trailing SHA-256 covers everything before it. A read checks all of it: a
truncated, corrupt or foreign file is a miss (counted in `corrupt`) and is deleted, never
used.

Notable:
- Writes are atomic (`dsmoe.atomic.write_file`: a uniquely named temporary, fsynced, renamed
  into place) and happen on one background thread, so a step never waits for the disk; a
  write that fails (disk full, read-only, quota) is counted and skipped: serving goes on
  with the RAM tier. `flush()` waits for pending writes (tests, shutdown).
- Eviction is least-recently-used by file mtime (a hit touches its file); when this
  process's tally passes the budget it rescans the whole directory (every namespace, and
  what other servers sharing it wrote), then deletes the oldest files down to 90% of the
  budget. Two servers may share a directory: names are content keys, writes are atomic,
  a file deleted under a reader is a miss.
Not here: the hash chain and the RAM tier (`prefix_cache.py`).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import queue
import struct
import threading
import time
from pathlib import Path

import torch

from dsmoe.atomic import write_file
from dsmoe.errors import DsmoeError

log = logging.getLogger("dsmoe.prefix_cache")

MAGIC = b"DSMOEPC\x01"
SUFFIX = ".blk"
STALE_TEMP_SECONDS = 600  # a temporary this old was left by a crashed writer
MAX_PENDING_BYTES = 1 << 30  # writes queued beyond this are dropped (the disk is too slow)


def encode_block(namespace: str, key: str, tokens: tuple[int, ...], data: torch.Tensor) -> bytes:
    header = json.dumps({"namespace": namespace, "key": key, "tokens": list(tokens),
                         "shape": list(data.shape), "dtype": str(data.dtype).removeprefix("torch.")}).encode()
    payload = data.contiguous().view(torch.uint8).numpy().tobytes()
    body = MAGIC + struct.pack("<I", len(header)) + header + payload
    return body + hashlib.sha256(body).digest()


def decode_block(raw: bytes, namespace: str, key: str, tokens: tuple[int, ...],
                 shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor | None:
    """The block's tensor, or None unless every check passes."""
    if len(raw) < len(MAGIC) + 4 + 32 or not raw.startswith(MAGIC):
        return None
    body, digest = raw[:-32], raw[-32:]
    if hashlib.sha256(body).digest() != digest:
        return None
    (n,) = struct.unpack_from("<I", body, len(MAGIC))
    start = len(MAGIC) + 4
    try:
        header = json.loads(body[start:start + n])
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    expected = {"namespace": namespace, "key": key, "tokens": list(tokens), "shape": list(shape),
                "dtype": str(dtype).removeprefix("torch.")}
    payload = body[start + n:]
    if header != expected or len(payload) != torch.Size(shape).numel() * dtype.itemsize:
        return None
    return torch.frombuffer(bytearray(payload), dtype=torch.uint8).view(dtype).reshape(shape)


class DiskTier:
    def __init__(self, root: str | Path, namespace: str, budget: int):
        self.root, self.namespace, self.budget = Path(root), namespace, budget
        self.folder = self.root / namespace
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            probe = write_file(self.folder / f".probe-{os.getpid()}", b"ok", error=DsmoeError)
            probe.unlink()
        except (OSError, DsmoeError) as err:
            raise DsmoeError(f"the prefix cache directory {self.root} cannot be written ({err}): give a "
                             f"writable directory with --prefix-cache-dir, or leave the flag out "
                             f"(RAM tier only)") from None
        self.corrupt = 0
        self.write_errors = 0
        self.dropped = 0
        self._lock = threading.Lock()
        self.bytes, self.files = self._scan()[:2]
        self._queue: queue.Queue = queue.Queue()
        self._pending_bytes = 0
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ reading
    def path(self, key: str) -> Path:
        return self.folder / f"{key}{SUFFIX}"

    def has(self, key: str) -> bool:
        return self.path(key).is_file()

    def load(self, key: str, tokens: tuple[int, ...], shape: tuple[int, ...], dtype: torch.dtype):
        """The block stored under `key`, or None (absent, or failing a check: then deleted)."""
        path = self.path(key)
        try:
            raw = path.read_bytes()
        except OSError:
            return None
        data = decode_block(raw, self.namespace, key, tokens, shape, dtype)
        if data is None:
            with self._lock:
                self.corrupt += 1
            log.warning("prefix cache: %s failed its checks (truncated or corrupt); ignored and removed", path)
            path.unlink(missing_ok=True)
            return None
        try:
            os.utime(path)  # least recently used goes first
        except OSError:
            pass
        return data

    # ------------------------------------------------------------------ writing
    def save(self, key: str, tokens: tuple[int, ...], data: torch.Tensor) -> None:
        """Queue a block for writing (unless its file exists); returns at once."""
        if self.has(key):
            return
        size = data.numel() * data.element_size()
        with self._lock:
            if self._pending_bytes + size > MAX_PENDING_BYTES:
                self.dropped += 1
                return
            self._pending_bytes += size
            if self._thread is None:
                self._thread = threading.Thread(target=self._writer, name="dsmoe-prefix-cache", daemon=True)
                self._thread.start()
        self._queue.put((key, tokens, data, size))

    def flush(self) -> None:
        """Wait until every queued write is on disk (or has failed)."""
        self._queue.join()

    def _writer(self) -> None:
        while True:
            key, tokens, data, size = self._queue.get()
            try:
                self._write(key, tokens, data)
            finally:
                with self._lock:
                    self._pending_bytes -= size
                self._queue.task_done()

    def _write(self, key: str, tokens: tuple[int, ...], data: torch.Tensor) -> None:
        raw = encode_block(self.namespace, key, tokens, data)
        if self.bytes + len(raw) > self.budget:
            self._evict(self.budget - len(raw))
        if len(raw) > self.budget:
            return
        try:
            write_file(self.path(key), raw, error=DsmoeError)
        except (OSError, DsmoeError) as err:
            with self._lock:
                self.write_errors += 1
            log.warning("prefix cache: could not write %s (%s); the block stays in RAM only", key, err)
            return
        with self._lock:
            self.bytes += len(raw)
            self.files += 1

    # ----------------------------------------------------------------- eviction
    def _scan(self) -> tuple[int, int, list[tuple[float, int, Path]]]:
        """(bytes, files, [(mtime, size, path)]) of every block in the directory, every namespace;
        removes temporaries a crashed writer left behind."""
        entries, now = [], time.time()
        for path in self.root.glob("*/*"):
            try:
                st = path.stat()
            except OSError:
                continue  # deleted meanwhile by another server
            if path.name.endswith(SUFFIX) and not path.name.startswith("."):
                entries.append((st.st_mtime, st.st_size, path))
            elif ".tmp." in path.name and now - st.st_mtime > STALE_TEMP_SECONDS:
                path.unlink(missing_ok=True)
        return sum(e[1] for e in entries), len(entries), entries

    def _evict(self, target: int) -> None:
        """Delete the least recently used files until at most min(target, 90% of budget) remain."""
        total, count, entries = self._scan()
        goal = min(target, int(self.budget * 0.9))
        for _mtime, size, path in sorted(entries):
            if total <= goal:
                break
            try:
                path.unlink()
            except OSError:
                continue
            total, count = total - size, count - 1
        with self._lock:
            self.bytes, self.files = total, count
