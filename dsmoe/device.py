"""Device and dtype, chosen in one place.

CPU: fp32 everywhere (bf16 matmul on common CPUs is hundreds of times slower).
CUDA: bf16 — weights in bf16 for inference, bf16 autocast over fp32 master weights for
training. Every other module asks here instead of deciding for itself.
"""
from __future__ import annotations

import contextlib

import torch


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    return default_device() if device in (None, "auto") else torch.device(device)


def compute_dtype(device: str | torch.device | None = None) -> torch.dtype:
    return torch.bfloat16 if resolve_device(device).type == "cuda" else torch.float32


def autocast(device: str | torch.device | None = None):
    """Mixed precision for training: bf16 autocast on CUDA, nothing on CPU."""
    device = resolve_device(device)
    if compute_dtype(device) == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=compute_dtype(device))


DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def parse_dtype(name: str | torch.dtype | None, device=None) -> torch.dtype:
    if name is None or name == "auto":
        return compute_dtype(device)
    if isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; choose one of {sorted(DTYPES)} or 'auto'")
    return DTYPES[name]


def add_device_arguments(parser, *, dtype: bool = False, threads: bool = False) -> None:
    """The one definition of `--device` (and, for verbs that take them, `--dtype` and
    `--threads`) that every command-line verb shares: same names, defaults and help."""
    parser.add_argument("--device", default="auto",
                        help="cpu, cuda, cuda:1 ... (default: auto, cuda when available)")
    if dtype:
        parser.add_argument("--dtype", default="auto",
                            help="float32 | bfloat16 (default: auto, float32 on CPU, bfloat16 on CUDA)")
    if threads:
        parser.add_argument("--threads", type=int, default=0,
                            help="CPU threads for torch (default: 0, torch's own choice)")
