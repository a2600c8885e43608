"""How a decode step turns the running requests into new tokens: the strategy an `Engine`
is handed, and the plain one (one token per request per step).

The engine owns the requests, the main cache's rows and the events; a decoding strategy
owns whatever else a step needs (speculation: its draft cache and each request's pending
draft, `dsmoe/infer/speculative.py`). The engine calls it at four points:
- `acquire(n)` when n requests join (their main cache rows were just acquired) and
  `release(row, request)` when the request in `row` leaves (the engine's last row then
  moves into `row`, as `LatentCache.release` does);
- `prefilled(...)` after the joining requests' prompts are in the cache and their first
  tokens sampled;
- `decode(...)` once per step: the new tokens of every running request, in row order.
`keeps_hidden` asks the prefill for every position's hidden state.

Notable:
- Decode threads: on a CPU every step runs under `decode_threads()` torch threads, 1 unless
  `DSMOE_DECODE_THREADS` says otherwise. Measured (docs/inference.md, "Decode speed"): a
  batch-1 step is a few hundred small calls, each an OpenMP parallel region when threads
  > 1; on the shared 2-core machine a step took 150-170 ms of wall time with 1 thread
  against 3,050 ms with 2 (every region waits until both threads are scheduled), and even
  unloaded the regions are too small to split. The previous count is restored after the
  step (prefill, training keep theirs).
- `compile=True` wraps `decode_step` in `torch.compile` (gpt-fast's `decode_one_token`).
  Inductor's compiled graphs are cached on disk (`TORCHINDUCTOR_CACHE_DIR`, by default
  `~/.cache/dsmoe/inductor`): the first run compiles (minutes on a small CPU), later
  processes load. Without a C++ compiler (inductor's CPU backend needs one) it warns once
  and decodes eagerly. On a CPU it does not pay at batch 1: tracing takes the ordinary
  paths, not the few-row ones (`dsmoe/model/fastpath.py`), which eager already runs at the
  compiled static step's speed (measured in docs/inference.md); it is for accelerators.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from dsmoe.errors import DsmoeError
from dsmoe.infer.forward import decode_step
from dsmoe.infer.requests import Request
from dsmoe.infer.sampling import SamplingBatch, next_tokens


@dataclass
class Decoded:
    """One step's outcome: new tokens per running request (row order), drafts judged."""
    tokens: list[list[int]]
    drafted: int = 0
    accepted: int = 0


DECODE_THREADS_ENV = "DSMOE_DECODE_THREADS"
DEFAULT_DECODE_THREADS = 1  # measured: see the module note
COMPILE_CACHE = Path.home() / ".cache" / "dsmoe" / "inductor"


def decode_threads() -> int:
    value = os.environ.get(DECODE_THREADS_ENV, str(DEFAULT_DECODE_THREADS))
    if not value.isdigit() or int(value) < 1:
        raise DsmoeError(f"{DECODE_THREADS_ENV}={value!r}: give a positive number of threads")
    return int(value)


@contextlib.contextmanager
def decode_thread_count(device: torch.device):
    """Run a decode step under `decode_threads()` torch threads (CPU only), then restore."""
    if device.type != "cpu":
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(decode_threads())
    try:
        yield
    finally:
        torch.set_num_threads(before)


def compiled(fn):
    """`torch.compile(fn)` with inductor's cache on disk; `fn` itself, with a one-line
    warning, when inductor has no C++ compiler to build CPU kernels with."""
    compiler = os.environ.get("CXX", "g++")
    if shutil.which(compiler) is None and shutil.which("c++") is None:
        warnings.warn(f"compile=True: no C++ compiler ({compiler}) for torch.compile's CPU backend; "
                      f"decoding eagerly", stacklevel=3)
        return fn
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(COMPILE_CACHE))
    return torch.compile(fn, dynamic=True)


class PlainDecoding:
    """One token per running request per step, with absorbed attention over the latent cache."""
    speculative = False
    keeps_hidden = False

    def __init__(self, compile: bool = False):
        self.step_fn = compiled(decode_step) if compile else decode_step

    def attach(self, model, max_len: int, max_rows: int) -> None:
        """Called once by the engine that uses this strategy."""

    def acquire(self, n: int) -> None:
        pass

    def release(self, row: int, request: Request) -> None:
        pass

    def prefilled(self, model, joining: list[Request], rows: range, hidden_BPD, first_B: torch.Tensor,
                  chunk: int) -> None:
        pass

    def decode(self, model, running: list[Request], cache, sampling: SamplingBatch) -> Decoded:
        tokens_B1 = torch.tensor([[r.output_ids[-1]] for r in running], device=cache.device)
        with decode_thread_count(cache.device):
            new = next_tokens(self.step_fn(model, tokens_B1, cache), sampling).tolist()
        return Decoded([[t] for t in new])
