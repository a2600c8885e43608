"""The inference hot path as small pure functions of (model, tokens, cache) (gpt-fast's
`prefill` / `decode_one_token`).

- `prefill`: prompts of different lengths together, longest first, `chunk` positions at a
  time, so a long prompt never materialises more than `chunk` positions of K/V at once;
  naive attention (expanding the latent once beats absorbing for many tokens); only each
  prompt's last position goes through the last block's attention and feed-forward and the
  output head (unless every position's hidden state is asked for).
- `decode_step`: one new token per row, attending in latent space (absorbed attention:
  no K/V is ever expanded); `Transformer.step`, one native call on a CPU when it can be.
- `over_chunks`: the chunking both prefill and the MTP catch-up after it use.

Notable: nothing here is a copy of the model's forward. Each function calls the model's
seams (`Transformer.hidden`, `Transformer.logits`): no input check (the engine made or
checked the tokens) and the head only where logits are needed. The routed experts take the
model's few-token path by themselves (`resolve_expert_impl`: no gradients, few tokens).
Not here: sampling (`sampling.py`), scheduling (`engine.py`), drafting (`speculative.py`).
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from dsmoe.infer.cache import CacheView, LatentCache

# process(start, stop, n_rows, view) -> (at_last_position, at_every_position or None)
ChunkFn = Callable[[int, int, int, CacheView], "tuple[torch.Tensor, torch.Tensor | None]"]


def decode_step(model, tokens_B1: torch.Tensor, cache) -> torch.Tensor:
    """One new token per row, attending in latent space: next-token logits (B, V)."""
    if torch.compiler.is_compiling():  # traced: the seams (the native step is one opaque call)
        h_B1D, _ = model.hidden(tokens_B1, cache, attn_impl="absorb")
        return model.logits(h_B1D[:, -1])
    return model.step(tokens_B1, cache)[1][:, -1]


def prefill(model, prompts: list[list[int]], cache: LatentCache, rows: range, chunk: int,
            keep_hidden: bool = False):
    """Prefill `prompts` (longest first) into cache rows `rows`, `chunk` positions at a time.

    Returns the logits at each prompt's last position (B, V) and, with `keep_hidden`, the
    hidden states of every position (B, P_max, D; MTP drafting needs them).
    """
    tokens_BP = pad_rows(prompts, cache.device)
    lengths = [len(p) for p in prompts]

    def prefill_chunk(start: int, stop: int, n_rows: int, view: CacheView):
        tokens = tokens_BP[:n_rows, start:stop]
        if keep_hidden:
            h, _ = model.hidden(tokens, view, attn_impl="naive")
            return h, h
        # The last block computes each row's output at one position: its last prompt position
        # when that lies in this chunk (the only one `over_chunks` reads), the chunk's last
        # otherwise (read by nobody). Expanded over the chunk, index [b, t] reads that one.
        at = [min(n, stop) - 1 - start for n in lengths[:n_rows]]
        h_B1D, _ = model.hidden(tokens, view, attn_impl="naive",
                                outputs_at_B=torch.tensor(at, device=tokens.device))
        return h_B1D.expand(-1, stop - start, -1), None

    last_BD, hidden = over_chunks(prefill_chunk, lengths, chunk, cache, rows, keep_all=keep_hidden)
    return model.logits(last_BD), hidden


def prefill_part(model, tokens_1T: torch.Tensor, cache, every_position: bool = True) -> torch.Tensor:
    """The next positions of a prompt whose start is already in `cache` (one row): hidden
    states (1, T, D), naive attention, as `forward.prefill` runs each chunk; without
    `every_position`, at the last position alone (1, 1, D), the last block computing no other."""
    last_B = None if every_position else torch.tensor([tokens_1T.shape[1] - 1], device=tokens_1T.device)
    h_1TD, _ = model.hidden(tokens_1T, cache, attn_impl="naive", outputs_at_B=last_B)
    return h_1TD


def over_chunks(process: ChunkFn, lengths: list[int], chunk: int, cache: LatentCache, rows: range,
                keep_all: bool = False):
    """Run `process` over rows of different lengths (longest first), `chunk` positions at a time.

    `process(start, stop, n_rows, view)` handles positions [start, stop) of the first
    `n_rows` rows (those still having tokens there; `view` is their cache) and returns
    (last_mTX, all_mTY): the first is kept at each row's last position, the second (if
    `keep_all`) at every position. Within a chunk, rows shorter than it write padding,
    rewound at the end. Returns (last_BX, all_BPY or None).
    """
    if lengths != sorted(lengths, reverse=True):
        raise ValueError("rows must be sorted longest first")
    B, P = len(lengths), lengths[0]
    before = cache.rows(rows.start, rows.stop).lengths.clone()  # rows may start non-empty (prefix cache)
    last: list[torch.Tensor | None] = [None] * B
    every = []
    for start in range(0, P, chunk):
        stop = min(start + chunk, P)
        n_rows = sum(1 for n in lengths if n > start)
        out_last, out_all = process(start, stop, n_rows, cache.rows(rows.start, rows.start + n_rows))
        for b in range(n_rows):
            if start < lengths[b] <= stop:
                last[b] = out_last[b, lengths[b] - 1 - start]
        if keep_all:
            every.append(F.pad(out_all, (0, 0, 0, 0, 0, B - n_rows)))
    view = cache.rows(rows.start, rows.stop)
    view.rewind(view.lengths - before - torch.tensor(lengths))
    return torch.stack(last), (torch.cat(every, dim=1) if keep_all else None)


def pad_rows(rows: list[list[int]], device, value: int = 0) -> torch.Tensor:
    """Token lists of different lengths as one (B, T_max) tensor, padded on the right."""
    out = torch.full((len(rows), max(map(len, rows))), value, dtype=torch.long)
    for b, r in enumerate(rows):
        out[b, :len(r)] = torch.tensor(r, dtype=torch.long)
    return out.to(device)
