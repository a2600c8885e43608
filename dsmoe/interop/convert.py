"""`dsmoe convert SRC DST`: rewrite a Hugging Face DeepSeek checkpoint in another dtype.

The common case is DeepSeek's FP8 release (e4m3 weights with 128x128 block scales) turned
into bf16 or fp32 for hardware or tools without FP8. The checkpoint is streamed tensor by
tensor, in the order of its shards, without building the model: memory stays at about one
output shard whatever the model's size. Names, the MTP layers and every other file (the
tokenizer, generation_config.json) are kept; config.json loses its quantization_config and
records the new dtype. The balancing bias stays fp32, as transformers keeps it.

SRC is checked completely (config, shards, names, shapes, dtypes, FP8 scales) before
anything is written, and DST must be new or empty. DST is assembled in a hidden sibling and
renamed into place when complete (`dsmoe/atomic.py`): a failed or killed conversion leaves
no DST at all, and a full disk is a CheckpointError naming DST.
Not here: quantising to FP8, changing names or layout (load and `save_hf` do that).
"""
from __future__ import annotations

import argparse
import json
import math
import shutil
from pathlib import Path

import torch

from dsmoe.atomic import replacing_dir
from dsmoe.device import parse_dtype
from dsmoe.errors import CheckpointError
from dsmoe.interop.hf.names import CONFIG_FILE, DEFAULT_SHARD_SIZE, INDEX_FILE
from dsmoe.interop.hf.read import ShardReader, open_checkpoint
from dsmoe.interop.hf.write import ShardEntry, parse_size, write_shards

DTYPE_CHOICES = ("bf16", "fp32", "fp16", "bfloat16", "float32", "float16")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src", help="Hugging Face checkpoint directory (config.json + safetensors)")
    parser.add_argument("dst", help="new directory for the converted checkpoint")
    parser.add_argument("--dtype", default="bf16", choices=DTYPE_CHOICES, help="dtype of the written weights")
    parser.add_argument("--shard-size", default=DEFAULT_SHARD_SIZE, help="largest shard, e.g. 5GB or 500MB")


def convert(src: str | Path, dst: str | Path, dtype: str | torch.dtype = "bf16",
            shard_size: int | str = DEFAULT_SHARD_SIZE) -> list[str]:
    """Write SRC's tensors to DST in `dtype` (FP8 dequantised); returns the shard names."""
    ckpt = open_checkpoint(src)  # raises on anything wrong, before any work
    dst = Path(dst)
    dtype = parse_dtype(dtype)
    parse_size(shard_size)
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        raise CheckpointError(f"{dst} already exists and is not an empty directory; choose a new DST")
    reader = ShardReader(ckpt)

    def fetch(key: str, out_dtype: torch.dtype):
        def read() -> torch.Tensor:
            out = torch.empty(ckpt.tensors[key].shape, dtype=out_dtype)
            reader.read_into(key, out)
            return out
        return read

    entries = []
    for key, info in sorted(ckpt.tensors.items(), key=lambda kv: (kv[1].file.name, kv[0])):
        if key.endswith("_scale_inv"):
            continue  # consumed by dequantisation
        out_dtype = torch.float32 if key.endswith("e_score_correction_bias") else dtype
        entries.append(ShardEntry(key, out_dtype.itemsize * math.prod(info.shape), fetch(key, out_dtype)))
    config = {k: v for k, v in ckpt.config.items() if k != "quantization_config"}
    for key in [k for k in ("torch_dtype", "dtype") if k in config] or ["torch_dtype"]:
        config[key] = str(dtype).removeprefix("torch.")
    try:
        with replacing_dir(dst, CheckpointError) as tmp:
            names = write_shards(entries, tmp, shard_size, desc=f"converting to {dst.name}")
            (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
            for file in ckpt.path.iterdir():  # tokenizer, generation config, README, ...
                if file.is_file() and file.name not in (CONFIG_FILE, INDEX_FILE) and file.suffix != ".safetensors":
                    shutil.copy2(file, tmp / file.name)
    finally:
        reader.close()
    return names


def run(args: argparse.Namespace) -> int:
    names = convert(args.src, args.dst, args.dtype, args.shard_size)
    print(f"wrote {args.dst}: {len(names)} shard(s) in {args.dtype}")
    return 0
