"""Sharded checkpoints of a parallelised model with torch.distributed.checkpoint (DCP).

Every rank writes only its own shards, in parallel; the saved tensors carry their global
shapes, so a checkpoint written by W ranks loads on any other world size (4 -> 2 is
tested) and, without any process group, into one full state dict (`consolidate`) that
the single-process model, its checkpoints and the Hugging Face exporter take as is.

Notable:
- Every parameter is a DTensor — FSDP2's sharded over all ranks, the experts' sharded
  along the expert-parallel mesh — so DCP knows each shard's place in the global tensor,
  for the weights and the optimizer moments alike, under the single-device keys
  (`layers.N.ffn.experts.w1_EFD`). The gate bias is a buffer, identical on every rank,
  saved once. `config.json` beside the shards holds the ModelArgs so that a checkpoint can
  be consolidated without anything else.
- Hashed like single-process checkpoints: `checksums.json` records the sha256 and size of
  every file (each rank hashes its share of the shards; rank 0 writes the record, fsynced).
  Loading checks them first, each rank its share, and every rank agrees before anything is
  read: DCP's `.metadata` is a pickle, so nothing is unpickled from a folder whose hashes
  do not match. (A matching hash proves the files are the ones written, not that whoever
  wrote them is trusted: load only checkpoints of your own runs.)
- One rank failing stops all of them at once: each step a rank may fail alone (rank 0
  writing config.json, hashing, recording) ends with `on_every_rank`, one all-gather of
  every rank's outcome, so the others raise the same CheckpointError within seconds instead
  of waiting at the next collective until the process-group timeout. DCP's own write and
  read steps gather failures the same way.
Layout of a checkpoint directory: `.metadata` and `__R_0.distcp` (DCP), `config.json`,
`checksums.json`.
Not here: asynchronous saving, or what to save when (the training loop decides), the
atomic swap of a finished folder into place (`dsmoe/parallel/training.py`).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any, Callable, TypeVar

import torch
from torch import nn

from dsmoe.atomic import write_synced
from dsmoe.config import ModelArgs, read_json_object
from dsmoe.errors import CheckpointError, DsmoeError
from dsmoe.parallel.launch import DistContext

CONFIG_FILE = "config.json"
METADATA_FILE = ".metadata"
CHECKSUMS_FILE = "checksums.json"
_CHUNK = 1 << 24
T = TypeVar("T")


def is_dcp_checkpoint(path: str | Path) -> bool:
    return (Path(path) / METADATA_FILE).is_file()


def save(path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer | None,
         ctx: DistContext, extra: dict[str, Any] | None = None) -> Path:
    """Write model (and optimizer) shards of every rank to `path`, with their checksums;
    collective. `extra` is a JSON-serialisable record (step, tokens seen, ...) returned by
    `load`. A failure on any rank raises CheckpointError on every rank."""
    import torch.distributed.checkpoint as dcp

    path = Path(path)
    state = _state(model, optimizer)
    state["extra"] = json.dumps(extra or {})  # one small replicated record (step, ...)

    def write_config() -> None:
        if ctx.is_main:
            path.mkdir(parents=True, exist_ok=True)
            text = json.dumps(dataclasses.asdict(model.args), indent=1).encode()
            write_synced(path / CONFIG_FILE, lambda f: f.write(text))

    on_every_rank(ctx, f"writing {path / CONFIG_FILE}", write_config)
    metadata = _dcp_step(f"writing the shards in {path}", lambda: dcp.save(state, checkpoint_id=str(path)))
    shards = sorted({info.relative_path for info in metadata.storage_data.values()})
    mine = shards[ctx.rank::ctx.world_size]
    hashed = on_every_rank(ctx, f"hashing the shards in {path}", lambda: {n: _digest(path / n) for n in mine})

    def write_checksums() -> None:
        if ctx.is_main:
            record = {name: digest for part in hashed for name, digest in part.items()}
            record.update({name: _digest(path / name) for name in (METADATA_FILE, CONFIG_FILE)})
            text = (json.dumps(dict(sorted(record.items())), indent=1) + "\n").encode()
            write_synced(path / CHECKSUMS_FILE, lambda f: f.write(text))

    on_every_rank(ctx, f"writing {path / CHECKSUMS_FILE}", write_checksums)
    return path


def load(path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer | None,
         ctx: DistContext) -> dict[str, Any]:
    """Load shards into a parallelised model (any world size); returns the saved `extra`.
    Every file is checked against checksums.json (each rank a share) before any is read."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                         set_optimizer_state_dict)

    path = Path(path)
    on_every_rank(ctx, f"checking {path}", lambda: verify(path, ctx.rank, ctx.world_size))
    _check_config(path, model.args)
    state = _state(model, optimizer)
    state["extra"] = ""
    if optimizer is not None:
        # A parameter that never had a gradient (say, MTP trained with weight 0) has no
        # optimizer state in the checkpoint: leave it without one, as it was.
        saved = set(_reader(path).read_metadata().state_dict_metadata)
        state["optim"]["state"] = {fqn: moments for fqn, moments in state["optim"]["state"].items()
                                   if all(f"optim.state.{fqn}.{k}" in saved for k in moments)}
    _dcp_step(f"{path}: cannot load this checkpoint into the model",
              lambda: dcp.load(state, checkpoint_id=str(path)))
    set_model_state_dict(model, state["model"])
    if optimizer is not None:
        set_optimizer_state_dict(model, optimizer, state["optim"],
                                 options=StateDictOptions(strict=False))  # see above
    return json.loads(state["extra"])


def verify(path: str | Path, rank: int = 0, world_size: int = 1) -> None:
    """Check the files of a checkpoint against checksums.json (this rank's share of them:
    every world_size-th); CheckpointError naming the first that differs."""
    path = Path(path)
    record = read_json_object(path / CHECKSUMS_FILE, "file checksums", CheckpointError)
    missing = [name for name in (METADATA_FILE, CONFIG_FILE) if name not in record]
    if missing:
        raise CheckpointError(f"{path / CHECKSUMS_FILE} does not list {missing}; the checkpoint "
                              "is incomplete or was altered: nothing was read from it")
    for name in sorted(record)[rank::world_size]:
        file = path / name
        if Path(name).name != name or name in ("", ".", ".."):
            raise CheckpointError(f"{path / CHECKSUMS_FILE} lists {name!r}, which is not a file "
                                  "of this folder: nothing was read from it")
        if not file.is_file():
            raise CheckpointError(f"{file} is missing; delete {path} and resume from the "
                                  "checkpoint before it")
        if _digest(file) != record[name]:
            raise CheckpointError(f"{file} is corrupt or was altered: its sha256 differs from "
                                  f"the one {CHECKSUMS_FILE} records; nothing was read from "
                                  f"{path}. Delete it and resume from the checkpoint before it")


def on_every_rank(ctx: DistContext, what: str, step: Callable[[], T]) -> list[T]:
    """`step()` on this rank, then one all-gather of every rank's outcome: the results of
    all ranks, or the same CheckpointError on every rank naming the ranks that failed (so
    nobody waits at a later collective for a rank that gave up)."""
    import torch.distributed as dist

    error: BaseException | None = None
    try:
        outcome: tuple[bool, Any] = (True, step())
    except Exception as err:  # reported to every rank below, then raised
        error = err
        outcome = (False, str(err) if isinstance(err, DsmoeError) else f"{type(err).__name__}: {err}")
    gathered: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(gathered, outcome)
    failed = [rank for rank, (ok, _) in enumerate(gathered) if not ok]
    if failed:
        raise CheckpointError(f"{what} failed on rank(s) {failed}: {gathered[failed[0]][1]}") from error
    return [result for _, result in gathered]


def consolidate(path: str | Path) -> tuple[ModelArgs, dict[str, torch.Tensor]]:
    """The full single-device model state dict from a DCP checkpoint; needs no process group."""
    from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    path = Path(path)
    if not is_dcp_checkpoint(path):
        raise CheckpointError(f"{path} is not a distributed checkpoint ({METADATA_FILE} missing)")
    verify(path)  # before anything is unpickled
    args = _read_config(path)
    state: dict[str, Any] = {}
    # What torch's own dcp_to_torch_save does, restricted to the model: the planner
    # allocates every tensor at its global shape from the metadata and fills it.
    _load_state_dict(state, storage_reader=_reader(path),
                     planner=_EmptyStateDictLoadPlanner(keys={"model"}), no_dist=True)
    return args, state["model"]


def load_model(path: str | Path) -> "torch.nn.Module":
    """A single-device Transformer holding the weights of a DCP checkpoint."""
    from dsmoe.model.transformer import Transformer

    args, state = consolidate(path)
    with torch.device("meta"):
        model = Transformer(args)
    model.to_empty(device="cpu")
    model.init_weights()  # rebuilds the non-persistent RoPE tables
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{path}: checkpoint does not match its config.json "
                              f"(missing {missing[:4]}, unexpected {unexpected[:4]})")
    return model


# ---------------------------------------------------------------------------- helpers
def _state(model: nn.Module, optimizer) -> dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    state = {"model": get_model_state_dict(model)}
    if optimizer is not None:
        state["optim"] = get_optimizer_state_dict(model, optimizer)
    return state


def _digest(file: Path) -> dict[str, Any]:
    digest, size = hashlib.sha256(), 0
    with open(file, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return {"sha256": digest.hexdigest(), "bytes": size}


def _dcp_step(what: str, step: Callable[[], T]) -> T:
    """A DCP save or load: it gathers every rank's failure itself and raises the same
    CheckpointException (a BaseException) on all ranks; that becomes a CheckpointError."""
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        return step()
    except CheckpointException as err:
        ranks = sorted(err.failures)
        first = err.failures[ranks[0]][0] if ranks else err
        raise CheckpointError(f"{what} failed on rank(s) {ranks}: {type(first).__name__}: {first}") from None
    except Exception as err:
        raise CheckpointError(f"{what}: {str(err).splitlines()[0] if str(err) else type(err).__name__}") from err


def _reader(path: Path):
    from torch.distributed.checkpoint import FileSystemReader
    return FileSystemReader(str(path))


def _read_config(path: Path) -> ModelArgs:
    try:
        return ModelArgs.from_dict(json.loads((path / CONFIG_FILE).read_text()), source=str(path / CONFIG_FILE))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: {CONFIG_FILE} is missing; it is written by "
                              f"dsmoe.parallel.checkpoint.save next to the shards") from None


def _check_config(path: Path, args: ModelArgs) -> None:
    saved = _read_config(path)
    if saved != args:
        diff = [f.name for f in dataclasses.fields(ModelArgs) if getattr(saved, f.name) != getattr(args, f.name)]
        raise CheckpointError(f"{path} was saved from a different model config (fields {diff}); "
                              f"build the model with the checkpoint's {CONFIG_FILE}")
