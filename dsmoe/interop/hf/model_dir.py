"""The one entry point every command calls: a model directory in, (model, tokenizer) out.

A model directory is a Hugging Face checkpoint (config.json + safetensors) with, when
dsmoe wrote it, its tokenizer (tokenizer.json). Commands (`generate`, `serve`, `sft`,
`route`, ...) take any such directory: one dsmoe trained, or DeepSeek's own release.
Not here: checking and loading the weights (read.py), writing (write.py).
"""
from __future__ import annotations

from pathlib import Path

import torch

from dsmoe.errors import DataError
from dsmoe.interop.hf.read import build_model, open_checkpoint

def load_model_dir(path: str | Path, dtype: str | torch.dtype | None = None,
                   device: str | torch.device | None = None, **options):
    """(model, tokenizer or None) from a checkpoint directory: what every command calls.
    `options`: build_model's (quantize, prepare)."""
    ckpt = open_checkpoint(path)
    tokenizer = None
    if (ckpt.path / "tokenizer.json").is_file():
        from dsmoe.data.tokenizer import Tokenizer

        tokenizer = Tokenizer.from_dir(path)
        if tokenizer.vocab_size > ckpt.args.vocab_size:
            raise DataError(f"{ckpt.path / 'tokenizer.json'} has {tokenizer.vocab_size} tokens but the model's "
                            f"vocabulary is {ckpt.args.vocab_size}: the tokenizer belongs to another model")
    return build_model(ckpt, dtype, device, **options), tokenizer
