"""The MLA latent cache: per layer, only the normalised latent (kv_lora_rank) and the
rotated k_pe (qk_rope_head_dim) of every past token (DeepSeek-V2 report §2.1.3).

A `LatentCache` is a pool of rows, one per request, each with its own length, so
requests of different lengths decode together. Row b's new tokens are written at
positions lengths[b], lengths[b]+1, ...; the attention mask lets each query see its own
row's past and nothing beyond it (rows shorter than the longest see padding masked out).
The model calls it duck-typed: `positions`, `attention_mask`, `layer(i).update`,
`advance`, `max_length`; `rewind` forgets rejected speculative tokens, per row.

Continuous batching: `acquire` gives a joining request a fresh row and `release` frees
it when the request ends. Rows in use are kept contiguous, [0, n_used): a released row
is filled by moving the last row into it, so the running batch is always one strided
view (`rows(0, n)`) and no decode step gathers or copies the cache. Storage grows by
doubling when requests join and shrinks when they leave, so memory follows the requests
being served (and is zero when none is).

Memory: exactly (kv_lora_rank + qk_rope_head_dim) x dtype size bytes per token per layer;
the only other state is one int64 length per row, kept on the host so that stepping
never waits for the device.
`read_row`/`fill_row` copy a row's positions out and in (the prefix cache, `prefix_cache.py`).
Not here: paging, or sharing one copy of a prefix between requests.
"""
from __future__ import annotations

import torch

from dsmoe.config import ModelArgs
from dsmoe.errors import DsmoeError


class CacheView:
    """The duck-typed cache the model uses, over rows [start, stop) of a LatentCache."""

    def __init__(self, cache: "LatentCache", start: int, stop: int):
        self.cache, self.start, self.stop = cache, start, stop
        self.lengths = cache.lengths[start:stop]  # a view: in-place updates reach the pool
        self._pending: torch.Tensor | None = None  # positions of the tokens being written
        self._rows: torch.Tensor | None = None

    @property
    def batch_size(self) -> int:
        return self.stop - self.start

    @property
    def device(self) -> torch.device:
        return self.cache.device

    def max_length(self) -> int:
        return int(self.lengths.max()) if self.batch_size else 0

    def positions(self, n_new: int) -> torch.Tensor:
        used = self.max_length()
        if used + n_new > self.cache.max_len:
            raise DsmoeError(f"the cache holds {self.cache.max_len} positions per request; {used} are "
                             f"used and {n_new} more were asked: shorten the request or raise max_len")
        positions = self.lengths[:, None] + torch.arange(n_new)
        self._pending = positions.to(self.cache.device)
        return self._pending  # (B, T)

    def attention_mask(self, n_new: int) -> torch.Tensor | None:
        """(B, 1, T, S) bool with S = longest row after this step: key s visible iff s <= position.
        None (plain causal, which attention runs faster) when that is what the mask would say:
        every row empty before this step, or one new token per row and rows of equal length."""
        lo, hi = (int(self.lengths.min()), self.max_length()) if self.batch_size else (0, 0)
        if hi == 0 or (n_new == 1 and lo == hi):
            return None
        S = hi + n_new
        keys = torch.arange(S, device=self.cache.device)
        return (keys[None, None, :] <= self._pending[:, :, None]).unsqueeze(1)

    def layer(self, i: int) -> "_LayerCache":
        if self._rows is None:
            self._rows = torch.arange(self.start, self.stop, device=self.cache.device)[:, None]
        return _LayerCache(self, i)

    def storage(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """For a kernel that writes the new tokens itself (see `_LayerCache.storage`): every
        layer's rows, latent (layers, B, max_len, C) and k_pe (layers, B, max_len, R), and
        the new tokens' positions (B, T)."""
        c = self.cache
        return c.latent[:, self.start:self.stop], c.k_pe[:, self.start:self.stop], self._pending

    def advance(self, n_new: int) -> None:
        self.lengths += n_new
        self._pending = None

    def rewind(self, n_tokens: torch.Tensor | list[int] | int) -> None:
        """Forget the last n tokens of each row (rejected speculative drafts, padding)."""
        n = torch.as_tensor(n_tokens, dtype=torch.long).cpu()
        if bool((n < 0).any()) or bool((n > self.lengths).any()):
            raise DsmoeError(f"cannot rewind {n.tolist()} tokens from rows of lengths {self.lengths.tolist()}")
        self.lengths -= n


class _LayerCache:
    def __init__(self, view: CacheView, index: int):
        self.view, self.index = view, index

    def update(self, latent_BTC: torch.Tensor, k_pe_BTR: torch.Tensor):
        v, c = self.view, self.view.cache
        positions_BT = v._pending
        rows_BT = v._rows.expand_as(positions_BT)
        c.latent[self.index][rows_BT, positions_BT] = latent_BTC.to(c.dtype)
        c.k_pe[self.index][rows_BT, positions_BT] = k_pe_BTR.to(c.dtype)
        S = v.max_length() + positions_BT.shape[1]
        return c.latent[self.index, v.start:v.stop, :S], c.k_pe[self.index, v.start:v.stop, :S]

    def storage(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """For a kernel that writes the new tokens itself (`update` then is not called): this
        layer's rows, latent (B, max_len, C) and k_pe (B, max_len, R), and the new tokens'
        positions (B, T). Keys a token may see are its row's positions up to its own."""
        v, c = self.view, self.view.cache
        return c.latent[self.index, v.start:v.stop], c.k_pe[self.index, v.start:v.stop], v._pending


class LatentCache:
    """A pool of rows x max_len positions x layers of (latent, k_pe).

    `LatentCache(args, batch_size, max_len)` starts with `batch_size` rows in use, and is
    itself the duck-typed cache over all of them (a static batch). An engine starts with
    none and calls `acquire`/`release` as requests come and go.
    """

    def __init__(self, args: ModelArgs, batch_size: int = 0, max_len: int | None = None, *,
                 n_layers: int | None = None, device=None, dtype=torch.float32,
                 max_rows: int | None = None):
        self.n_layers = args.n_layers + args.n_mtp_layers if n_layers is None else n_layers
        self.max_len = args.max_seq_len if max_len is None else max_len
        self.max_rows = max_rows
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.dtype = dtype
        self.widths = (args.kv_lora_rank, args.qk_rope_head_dim)
        self.n_used = 0
        self._allocate(batch_size)
        self.acquire(batch_size)

    # -------------------------------------------------------------- accounting
    @property
    def capacity(self) -> int:
        """Rows allocated (in use or spare)."""
        return self.latent.shape[1]

    @property
    def batch_size(self) -> int:
        return self.n_used

    def bytes_per_token_per_layer(self) -> int:
        return sum(self.widths) * self.latent.element_size()

    def nbytes(self) -> int:
        """Bytes of per-token storage allocated now (the row lengths aside)."""
        return self.latent.nbytes + self.k_pe.nbytes

    # ------------------------------------------------------------ rows in use
    def acquire(self, n: int = 1) -> range:
        """n fresh rows (length 0) at the end of the rows in use; grows storage if needed."""
        if n == 0:
            return range(self.n_used, self.n_used)
        need = self.n_used + n
        if self.max_rows is not None and need > self.max_rows:
            raise DsmoeError(f"the cache pool holds at most {self.max_rows} requests; "
                             f"{self.n_used} are running and {n} more were asked")
        if need > self.capacity:
            self._allocate(_next_power_of_two(need), keep=self.n_used)
        rows = range(self.n_used, need)
        self.lengths[rows.start:rows.stop] = 0
        self.n_used = need
        self._all = None
        return rows

    def release(self, row: int) -> int | None:
        """Free `row`. The last row in use moves into it (returns its old index), so the rows
        in use stay contiguous; storage shrinks when at most a quarter of it is in use."""
        if not 0 <= row < self.n_used:
            raise DsmoeError(f"row {row} is not in use (rows in use: 0..{self.n_used - 1})")
        last = self.n_used - 1
        moved = None
        if row != last:  # its positions in use alone: a row is max_len long (3 ms at 8,192, `small`)
            n = int(self.lengths[last])
            self.latent[:, row, :n] = self.latent[:, last, :n]
            self.k_pe[:, row, :n] = self.k_pe[:, last, :n]
            self.lengths[row] = n
            moved = last
        self.n_used = last
        self._all = None
        if self.n_used <= self.capacity // 4:
            self._allocate(_next_power_of_two(self.n_used), keep=self.n_used)
        return moved

    def rows(self, start: int, stop: int) -> CacheView:
        if not 0 <= start <= stop <= self.n_used:
            raise DsmoeError(f"rows [{start}, {stop}) are not all in use (rows in use: 0..{self.n_used - 1})")
        return CacheView(self, start, stop)

    # ------------------------------------------- copies in and out (the prefix cache's)
    def read_row(self, row: int, start: int, stop: int) -> torch.Tensor:
        """Positions [start, stop) of `row`, every layer, as one CPU tensor (layers, T, C + R)."""
        if not (0 <= row < self.n_used and 0 <= start <= stop <= int(self.lengths[row])):
            raise DsmoeError(f"positions [{start}, {stop}) of row {row} are not in the cache")
        both = torch.cat([self.latent[:, row, start:stop], self.k_pe[:, row, start:stop]], dim=-1)
        return both.to("cpu", copy=True)

    def fill_row(self, row: int, data_LTW: torch.Tensor) -> None:
        """Write (layers, T, C + R) into positions [0, T) of the empty `row`; its length becomes T."""
        T, C = data_LTW.shape[1], self.widths[0]
        if not 0 <= row < self.n_used or int(self.lengths[row]) != 0 or T > self.max_len:
            raise DsmoeError(f"row {row} cannot take {T} cached positions (it must be in use and empty)")
        data = data_LTW.to(self.device, self.dtype)
        self.latent[:, row, :T] = data[..., :C]
        self.k_pe[:, row, :T] = data[..., C:]
        self.lengths[row] = T

    def _allocate(self, capacity: int, keep: int = 0) -> None:
        C, R = self.widths
        latent = torch.zeros(self.n_layers, capacity, self.max_len, C, device=self.device, dtype=self.dtype)
        k_pe = torch.zeros(self.n_layers, capacity, self.max_len, R, device=self.device, dtype=self.dtype)
        lengths = torch.zeros(capacity, dtype=torch.long)
        if keep:
            latent[:, :keep] = self.latent[:, :keep]
            k_pe[:, :keep] = self.k_pe[:, :keep]
            lengths[:keep] = self.lengths[:keep]
        self.latent, self.k_pe, self.lengths = latent, k_pe, lengths
        self._all = None

    # ---------------------------------- the duck-typed interface over all rows in use
    def _view(self) -> CacheView:
        if self._all is None:
            self._all = self.rows(0, self.n_used)
        return self._all

    def max_length(self) -> int:
        return self._view().max_length()

    def positions(self, n_new: int) -> torch.Tensor:
        return self._view().positions(n_new)

    def attention_mask(self, n_new: int) -> torch.Tensor:
        return self._view().attention_mask(n_new)

    def layer(self, i: int) -> _LayerCache:
        return self._view().layer(i)

    def storage(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self._view().storage()

    def advance(self, n_new: int) -> None:
        self._view().advance(n_new)

    def rewind(self, n_tokens: torch.Tensor | list[int] | int) -> None:
        self._view().rewind(n_tokens)


def _next_power_of_two(n: int) -> int:
    return 0 if n == 0 else 1 << (n - 1).bit_length()
