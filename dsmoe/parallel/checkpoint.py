"""Sharded checkpoints of a parallelised model with torch.distributed.checkpoint (DCP).

Every rank writes only its own shards, in parallel; the saved tensors carry their global
shapes, so a checkpoint written by W ranks loads on any other world size (4 -> 2 is
tested) and, without any process group, into one full state dict (`consolidate`) that
the single-process model, its checkpoints and the Hugging Face exporter take as is.

Notable: every parameter is a DTensor — FSDP2's sharded over all ranks, the experts'
sharded along the expert-parallel mesh — so DCP knows each shard's place in the global
tensor, for the weights and the optimizer moments alike, under the single-device keys
(`layers.N.ffn.experts.w1_EFD`). The gate bias is a buffer, identical on every rank,
saved once. `config.json` beside the shards holds the
ModelArgs so that a checkpoint can be consolidated without anything else.
Layout of a checkpoint directory: `.metadata` and `__R_0.distcp` (DCP), `config.json`.
Not here: asynchronous saving, or what to save when (the training loop decides).
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dsmoe.config import ModelArgs
from dsmoe.parallel.launch import DistContext
from dsmoe.errors import CheckpointError

CONFIG_FILE = "config.json"
METADATA_FILE = ".metadata"


def is_dcp_checkpoint(path: str | Path) -> bool:
    return (Path(path) / METADATA_FILE).is_file()


def save(path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer | None,
         ctx: DistContext, extra: dict[str, Any] | None = None) -> Path:
    """Write model (and optimizer) shards of every rank to `path`; collective. `extra` is a
    JSON-serialisable record (step, tokens seen, ...) returned by `load`."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    path = Path(path)
    state = _state(model, optimizer)
    state["extra"] = json.dumps(extra or {})  # one small replicated record (step, ...)
    if ctx.is_main:
        path.mkdir(parents=True, exist_ok=True)
        (path / CONFIG_FILE).write_text(json.dumps(dataclasses.asdict(model.args), indent=1))
    dist.barrier()
    dcp.save(state, checkpoint_id=str(path))
    return path


def load(path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer | None,
         ctx: DistContext) -> dict[str, Any]:
    """Load shards into a parallelised model (any world size); returns the saved `extra`."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                         set_optimizer_state_dict)

    path = Path(path)
    _check_config(path, model.args)
    state = _state(model, optimizer)
    state["extra"] = ""
    if optimizer is not None:
        # A parameter that never had a gradient (say, MTP trained with weight 0) has no
        # optimizer state in the checkpoint: leave it without one, as it was.
        saved = set(_reader(path).read_metadata().state_dict_metadata)
        state["optim"]["state"] = {fqn: moments for fqn, moments in state["optim"]["state"].items()
                                   if all(f"optim.state.{fqn}.{k}" in saved for k in moments)}
    try:
        dcp.load(state, checkpoint_id=str(path))
    except Exception as err:  # DCP raises CheckpointException with per-rank tracebacks
        raise CheckpointError(f"{path}: cannot load this checkpoint into the model: "
                              f"{str(err).splitlines()[0] if str(err) else type(err).__name__}") from err
    set_model_state_dict(model, state["model"])
    if optimizer is not None:
        set_optimizer_state_dict(model, optimizer, state["optim"],
                                 options=StateDictOptions(strict=False))  # see above
    return json.loads(state["extra"])


def consolidate(path: str | Path) -> tuple[ModelArgs, dict[str, torch.Tensor]]:
    """The full single-device model state dict from a DCP checkpoint; needs no process group."""
    from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    path = Path(path)
    if not is_dcp_checkpoint(path):
        raise CheckpointError(f"{path} is not a distributed checkpoint ({METADATA_FILE} missing)")
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
