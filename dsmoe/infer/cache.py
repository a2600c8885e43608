"""The MLA latent cache: per layer, only the normalised latent (kv_lora_rank) and the
rotated k_pe (qk_rope_head_dim) of every past token (DeepSeek-V2 report §2.1.3).

A `LatentCache` holds a batch of sequences, each with its own length, so requests of
different lengths decode together. Row b's new tokens are written at positions
lengths[b], lengths[b]+1, ...; the attention mask lets each query see its own row's
past and nothing beyond it (rows shorter than the longest see padding masked out).
This is the object `dsmoe.model` calls duck-typed: `positions`, `attention_mask`,
`layer(i).update`, `advance`, `max_length`.
Memory: exactly (kv_lora_rank + qk_rope_head_dim) x dtype size bytes per token per layer.
Not here: paging or sharing prefixes between requests.
"""
from __future__ import annotations

import torch

from dsmoe.config import ModelArgs


class LatentCache:
    def __init__(self, args: ModelArgs, batch_size: int, max_len: int, *,
                 n_layers: int | None = None, device=None, dtype=torch.float32):
        n_layers = args.n_layers + args.n_mtp_layers if n_layers is None else n_layers
        self.max_len = max_len
        self.latent = torch.zeros(n_layers, batch_size, max_len, args.kv_lora_rank, device=device, dtype=dtype)
        self.k_pe = torch.zeros(n_layers, batch_size, max_len, args.qk_rope_head_dim, device=device, dtype=dtype)
        self.lengths = torch.zeros(batch_size, dtype=torch.long, device=device)
        self._longest = 0  # host copy of lengths.max(): no device sync per step
        self._pending: torch.Tensor | None = None

    @property
    def batch_size(self) -> int:
        return self.lengths.shape[0]

    def bytes_per_token_per_layer(self) -> int:
        return (self.latent.shape[-1] + self.k_pe.shape[-1]) * self.latent.element_size()

    def max_length(self) -> int:
        return self._longest

    def positions(self, n_new: int) -> torch.Tensor:
        if self._longest + n_new > self.max_len:
            raise ValueError(f"cache holds {self.max_len} positions; {self._longest} used, {n_new} more asked")
        self._pending = self.lengths[:, None] + torch.arange(n_new, device=self.lengths.device)
        return self._pending  # (B, T)

    def attention_mask(self, n_new: int) -> torch.Tensor:
        """(B, 1, T, S) bool with S = longest row after this step: key s visible iff s <= position."""
        S = self._longest + n_new
        keys = torch.arange(S, device=self.lengths.device)
        return (keys[None, None, :] <= self._pending[:, :, None]).unsqueeze(1)

    def layer(self, i: int) -> "_LayerCache":
        return _LayerCache(self, i)

    def advance(self, n_new: int) -> None:
        self.lengths += n_new
        self._longest += n_new
        self._pending = None

    def rewind(self, n_tokens: torch.Tensor | int) -> None:
        """Forget the last n tokens of each row (rejected speculative drafts)."""
        self.lengths -= n_tokens
        self._longest = int(self.lengths.max())


class _LayerCache:
    def __init__(self, cache: LatentCache, index: int):
        self.cache, self.index = cache, index

    def update(self, latent_BTC: torch.Tensor, k_pe_BTR: torch.Tensor):
        c = self.cache
        positions_BT = c._pending
        rows = torch.arange(c.batch_size, device=positions_BT.device)[:, None].expand_as(positions_BT)
        c.latent[self.index][rows, positions_BT] = latent_BTC.to(c.latent.dtype)
        c.k_pe[self.index][rows, positions_BT] = k_pe_BTR.to(c.k_pe.dtype)
        S = c._longest + positions_BT.shape[1]
        return c.latent[self.index, :, :S], c.k_pe[self.index, :, :S]
