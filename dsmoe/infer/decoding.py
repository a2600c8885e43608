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

Notable: `compile=True` wraps `decode_step` in `torch.compile` (gpt-fast's
`decode_one_token`); on a CPU the routed experts stay eager (the model's few-token path
is excluded from tracing: the fp32 grouped matmul cannot be traced there), and compiling
takes from seconds to minutes.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from dsmoe.infer.forward import decode_step
from dsmoe.infer.requests import Request
from dsmoe.infer.sampling import SamplingBatch, next_tokens


@dataclass
class Decoded:
    """One step's outcome: new tokens per running request (row order), drafts judged."""
    tokens: list[list[int]]
    drafted: int = 0
    accepted: int = 0


class PlainDecoding:
    """One token per running request per step, with absorbed attention over the latent cache."""
    speculative = False
    keeps_hidden = False

    def __init__(self, compile: bool = False):
        self.step_fn = torch.compile(decode_step, dynamic=True) if compile else decode_step

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
        new = next_tokens(self.step_fn(model, tokens_B1, cache), sampling).tolist()
        return Decoded([[t] for t in new])
