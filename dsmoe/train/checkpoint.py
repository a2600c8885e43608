"""Training checkpoints: atomic, hashed, the last few kept, verified on load.

Layout: `<out>/checkpoints/step-000100/` holds `state.pt` (model, optimizer, step, data
position, RNG states: everything an exact resume needs) and `meta.json` (step, the sha256
and size of `state.pt`, the run config). A checkpoint appears in one atomic step
(`dsmoe/atomic.py`): both files are written into a hidden temporary folder beside it,
flushed and fsynced, then the folder is swapped into place and the parent folder fsynced.
A crash or a full disk at any moment therefore leaves either the complete new checkpoint
or none, and the previous checkpoints are untouched: saving a step that already has a
checkpoint exchanges the two folders and deletes the old one only then, and the oldest
are pruned only after the new one is in place. Loading recomputes the sha256 and refuses
a checkpoint that does not match.

`state.pt` is read with `torch.load(weights_only=True)`: no pickled code runs when a
checkpoint is opened, so RNG states are stored as tensors and plain Python values.
Not here: the Hugging Face export of the final model (`dsmoe/interop/hf/write.py`),
sharded distributed checkpoints (`dsmoe/parallel/checkpoint.py`).
"""
from __future__ import annotations

import hashlib
import json
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dsmoe.atomic import remove_leftovers, replacing_dir, write_synced
from dsmoe.errors import CheckpointError

FORMAT = "dsmoe-train-checkpoint"
VERSION = 1
STATE_FILE, META_FILE = "state.pt", "meta.json"
_PREFIX = "step-"
_LEFTOVER = re.compile(r"\.(step-\d+)\.(?:tmp|old)\..*")  # what dsmoe.atomic leaves when killed
_LEGACY_TMP = ".tmp-step-"  # temporaries of earlier versions
_CHUNK = 1 << 24


class _HashingWriter:
    """A file wrapper that hashes what passes through it: one pass, no second read."""

    def __init__(self, f):
        self.f, self.sha256, self.size = f, hashlib.sha256(), 0

    def write(self, data) -> int:
        self.sha256.update(data)
        self.size += len(data)
        return self.f.write(data)

    def flush(self) -> None:
        self.f.flush()


def checkpoint_dir(root: str | Path, step: int) -> Path:
    return Path(root) / f"{_PREFIX}{step:06d}"


def list_checkpoints(root: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints (those with a meta.json) as (step, folder), oldest first."""
    root = Path(root)
    found = []
    if root.is_dir():
        for path in root.iterdir():
            if path.name.startswith(_PREFIX) and (path / META_FILE).is_file():
                try:
                    found.append((int(path.name[len(_PREFIX):]), path))
                except ValueError:
                    continue
    return sorted(found)


def latest_checkpoint(root: str | Path) -> Path | None:
    found = list_checkpoints(root)
    return found[-1][1] if found else None


def remove_stale_temporaries(root: str | Path) -> None:
    """Half-written checkpoints of a killed run: never complete, safe to drop (a complete
    checkpoint renamed aside by a replacement cut short is put back)."""
    root = Path(root)
    if not root.is_dir():
        return
    for name in sorted({m[1] for p in root.iterdir() if (m := _LEFTOVER.fullmatch(p.name))}):
        remove_leftovers(root / name)
    for path in root.iterdir():
        if path.name.startswith(_LEGACY_TMP):
            shutil.rmtree(path, ignore_errors=True)


def save_checkpoint(root: str | Path, step: int, state: dict[str, Any],
                    meta: dict[str, Any] | None = None, keep_last: int = 3) -> Path:
    """Write `state` as the checkpoint of `step`, atomically; keep the last `keep_last`."""
    root = Path(root)
    final = checkpoint_dir(root, step)

    def failed(os_error: OSError) -> str:
        previous = latest_checkpoint(root)
        kept = (f"the previous checkpoint {previous} is intact" if previous
                else "no earlier checkpoint exists")
        return (f"could not write the checkpoint of step {step} in {root} "
                f"({os_error.strerror or os_error}); {kept}. Free disk space (or lower "
                f"keep_last) and resume with --resume")

    with replacing_dir(final, CheckpointError, describe=failed) as tmp:
        writer: list[_HashingWriter] = []

        def write_state(f):
            writer.append(_HashingWriter(f))
            torch.save(state, writer[0])

        write_synced(tmp / STATE_FILE, write_state)
        record = {"format": FORMAT, "version": VERSION, "step": step,
                  "sha256": writer[0].sha256.hexdigest(), "bytes": writer[0].size, **(meta or {})}
        text = (json.dumps(record, indent=2) + "\n").encode()
        write_synced(tmp / META_FILE, lambda f: f.write(text))
    for _, old in list_checkpoints(root)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def read_meta(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        meta = json.loads((path / META_FILE).read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path} is not a checkpoint: it has no {META_FILE}") from None
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path / META_FILE} is corrupt ({err}); delete {path} to "
                              f"resume from the checkpoint before it") from None
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise CheckpointError(f"{path} is not a version-{VERSION} {FORMAT} checkpoint")
    return meta


def load_checkpoint(path: str | Path, map_location=None) -> tuple[dict[str, Any], dict[str, Any]]:
    """(state, meta) of a checkpoint folder, after checking `state.pt` against its sha256."""
    path = Path(path)
    meta = read_meta(path)
    state_path = path / STATE_FILE
    digest = hashlib.sha256()
    try:
        with open(state_path, "rb") as f:
            while chunk := f.read(_CHUNK):
                digest.update(chunk)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path} has no {STATE_FILE}; delete {path} to resume "
                              f"from the checkpoint before it") from None
    if digest.hexdigest() != meta["sha256"]:
        raise CheckpointError(f"checkpoint {path} is corrupt: the sha256 of {STATE_FILE} is "
                              f"{digest.hexdigest()[:16]}..., meta.json records "
                              f"{meta['sha256'][:16]}...; delete {path} to resume from the "
                              f"checkpoint before it")
    return torch.load(state_path, map_location=map_location, weights_only=True), meta


# ---------------------------------------------------------------------- RNG states
def rng_state() -> dict[str, Any]:
    """Every random generator a run may draw from, in a weights_only-loadable form."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)),
                       "pos": int(pos), "has_gauss": int(has_gauss), "cached": float(cached)}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"],
                         n["has_gauss"], n["cached"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
