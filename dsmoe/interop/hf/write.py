"""Writing Hugging Face DeepSeek checkpoints that transformers, vLLM and SGLang load.

Notable:
- Nothing half-written: `save_hf` assembles the whole folder (config.json, shards, index,
  tokenizer) in a hidden sibling and swaps it in (`dsmoe/atomic.py`), so a crash or a full
  disk at any moment leaves the previous export intact, never a mix of two saves' shards
  under one index; an I/O failure is a CheckpointError naming the folder. It replaces
  only a model folder (one with a config.json) or an empty one. Callers that add files of
  their own (fine-tuning's report) save into their own `replacing_dir` folder.
- Shards as transformers writes them: one `model.safetensors`, or numbered shards of at
  most `shard_size` bytes plus `model.safetensors.index.json`; each tensor is produced
  (moved to the CPU, cast) only when its shard is written, so memory stays at one shard.
- Weights in the model's dtype (or `dtype`); the balancing bias always in fp32. A
  DeepSeek-V2 (softmax) model with a non-zero bias is refused: the format cannot hold it.
Not here: writing FP8, tensor-parallel shards, other formats (GGUF, .bin).
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import torch

from dsmoe.atomic import replacing_dir
from dsmoe.device import parse_dtype
from dsmoe.errors import CheckpointError, ConfigError
from dsmoe.interop.hf.config import hf_config_from_args
from dsmoe.interop.hf.names import (CONFIG_FILE, DEFAULT_SHARD_SIZE, INDEX_FILE, SINGLE_FILE,
                                    stores_bias, to_hf)
from dsmoe.interop.hf.read import progress
from dsmoe.model import Transformer


@dataclass
class ShardEntry:
    name: str
    nbytes: int
    fetch: Callable[[], torch.Tensor]  # produces the CPU tensor to write, when its shard is written


def parse_size(size: int | str) -> int:
    """Bytes from 5_000_000_000, '5GB', '500MB' or '2GiB'."""
    if isinstance(size, int):
        value = size
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B)?\s*", str(size), re.IGNORECASE)
        if not m:
            raise ConfigError(f"shard size {size!r}: give bytes or a size such as '5GB' or '500MB'")
        unit = (m[2] or "B").upper()
        base = 1024 if "I" in unit else 1000
        value = int(float(m[1]) * base ** "BKMGT".index(unit[0]))
    if value <= 0:
        raise ConfigError(f"shard size {size!r} must be positive")
    return value




def write_shards(entries: Iterable[ShardEntry], path: Path, shard_size: int | str,
                 desc: str = "writing") -> list[str]:
    """Write tensors into the fresh folder `path` as HF does: one model.safetensors, or
    numbered shards of at most shard_size bytes (a larger tensor gets a shard alone) plus
    the index. Returns the shard names."""
    from safetensors.torch import save_file

    limit = parse_size(shard_size)
    shards: list[list[ShardEntry]] = [[]]
    size = 0
    for entry in entries:
        if shards[-1] and size + entry.nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += entry.nbytes
    n = len(shards)
    names = [SINGLE_FILE] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    path.mkdir(parents=True, exist_ok=True)
    weight_map = {}
    bar = progress(total=sum(len(s) for s in shards), desc=desc, unit="tensor")
    for name, shard in zip(names, shards):
        tensors = {}
        for entry in shard:
            tensors[entry.name] = entry.fetch()
            bar.update()
            weight_map[entry.name] = name
        save_file(tensors, str(path / name), metadata={"format": "pt"})
        del tensors
    bar.close()
    if n > 1:
        index = {"metadata": {"total_size": sum(e.nbytes for s in shards for e in s)}, "weight_map": weight_map}
        (path / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    return names


def check_export_dir(path: str | Path) -> Path:
    """Refuse to replace a folder that is not a model directory (nor empty)."""
    path = Path(path)
    if path.exists() and (not path.is_dir() or (any(path.iterdir()) and not (path / CONFIG_FILE).is_file())):
        raise CheckpointError(f"{path} exists and is not a model directory (it has no {CONFIG_FILE}); "
                              "a save replaces the whole folder: choose a new or empty one")
    return path


def save_hf(model: Transformer, path: str | Path, shard_size: int | str = DEFAULT_SHARD_SIZE,
            tokenizer=None, dtype: str | torch.dtype | None = None) -> Path:
    """Write `model` as a Hugging Face checkpoint that transformers loads (config.json,
    safetensors shards + index, MTP layers as model.layers.{n_layers+i}); with a tokenizer,
    its files too. dtype: the weights' dtype on disk (default: the model's own); the gate
    bias is always written in fp32. The folder is replaced as a whole, atomically."""
    path = check_export_dir(path)
    args = model.args
    state = model.state_dict()
    dtype = parse_dtype(dtype) if dtype is not None else state["embed.weight"].dtype
    config = hf_config_from_args(args, dtype, getattr(tokenizer, "bos_id", None), getattr(tokenizer, "eos_id", None))
    parse_size(shard_size)
    if not stores_bias(args):
        biased = [k for k, v in state.items() if k.endswith("gate.bias") and bool(v.any())]
        if biased:
            raise ConfigError(f"{biased[0]} is not zero, but DeepSeek-V2 checkpoints (softmax scores) "
                              "store no balancing bias: it would be lost")
    entries = []
    for ours, tensor in state.items():
        out_dtype = torch.float32 if ours.endswith("gate.bias") else dtype
        for key, expert in to_hf(ours, args):
            src = tensor if expert is None else tensor[expert]
            entries.append(ShardEntry(key, src.numel() * out_dtype.itemsize,
                                      lambda src=src, d=out_dtype: src.detach().to("cpu", d, copy=True).contiguous()))
    with replacing_dir(path, CheckpointError) as tmp:  # every check above ran before any write
        write_shards(entries, tmp, shard_size, desc=f"saving {path.name}")
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
        if tokenizer is not None:
            tokenizer.save(tmp)
    return path
