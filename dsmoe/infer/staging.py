"""A long prompt prefilled a chunk per engine step, so the running streams keep flowing.

Prefilling a 2,000-token prompt in the step that admits it makes every running request wait
for all of it. The engine instead stages a prompt longer than its `prefill_chunk`: a
`StagedPrompt` owns a one-row latent cache of its own, `advance` prefills the next chunk into
it (one per step, between the running batch's decode steps), and when the last chunk is in,
`move_into` copies the row into the engine's cache, where the request joins the batch.

Notable: the chunks are those `forward.prefill` runs (naive attention, `prefill_chunk`
positions, each attending to the chunks before it through the cache), so the output is what
prefilling the whole prompt at once gives. The staging row is memory the request would hold
anyway; it is freed with the object.
Not here: which prompt is staged when (`engine.py`), prefix sharing.
"""
from __future__ import annotations

import torch

from dsmoe.infer.cache import LatentCache
from dsmoe.infer.forward import prefill_part
from dsmoe.infer.requests import Request


class StagedPrompt:
    def __init__(self, request: Request, model, max_len: int, keep_hidden: bool):
        """Allocates the staging row (may raise out of memory: the request then fails alone)."""
        param = next(model.parameters())
        self.request, self.model, self.keep_hidden = request, model, keep_hidden
        self.cache = LatentCache(model.args, 1, max_len, n_layers=model.args.n_layers, device=param.device,
                                 dtype=param.dtype, max_rows=1)
        self.done = 0  # prompt positions prefilled so far
        self.chunks: list[torch.Tensor] = []  # every position's hidden state, with keep_hidden

    @property
    def length(self) -> int:
        return len(self.request.prompt_ids)

    def advance(self, chunk: int) -> torch.Tensor | None:
        """Prefill the next `chunk` positions; at the last, the last position's hidden state (1, D)."""
        stop = min(self.done + chunk, self.length)
        tokens_1T = torch.tensor([self.request.prompt_ids[self.done:stop]], device=self.cache.device)
        h_1TD = prefill_part(self.model, tokens_1T, self.cache, self.keep_hidden)
        if self.keep_hidden:
            self.chunks.append(h_1TD)
        self.done = stop
        return h_1TD[:, -1] if stop == self.length else None

    def hidden(self) -> torch.Tensor | None:
        """Every prompt position's hidden state (1, P, D), with keep_hidden."""
        return torch.cat(self.chunks, dim=1) if self.chunks else None

    def move_into(self, cache: LatentCache, row: int) -> None:
        """Copy the prompt's positions, every layer, into `row` of `cache` (a fresh row)."""
        n = self.length
        cache.latent[:, row, :n] = self.cache.latent[:, 0, :n]
        cache.k_pe[:, row, :n] = self.cache.k_pe[:, 0, :n]
        cache.lengths[row] = n
