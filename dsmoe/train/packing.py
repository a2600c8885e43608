"""Packing fine-tuning examples into fixed-length rows, with attention kept per example.

An `Example` is a token sequence and a loss mask (`mask[t]`: token t is a target, i.e. the
loss counts predicting it from the tokens before it). SFT chats mask everything but the
assistant turns; plain documents mask nothing. Training pairs are (ids[:-1] -> ids[1:]),
so an example of n tokens fills n-1 positions of a row.

Packing decision: examples are packed back to back into rows of `seq_len` positions, and
attention is reset at every example boundary (a block-diagonal causal mask) together with
the RoPE positions (each example starts at position 0). A packed row therefore computes
exactly what the examples would compute one per row, without the padding; the test
`test_packed_loss_equals_unpacked` pins that. The mask and positions reach the model
through the duck-typed cache interface it already has (`positions`, `attention_mask`,
`layer(i).update`, see `dsmoe/model/mla.py`): `DocumentMask` answers those calls and stores
nothing, so the model needed no second code path. MoE routing is per token, so it is
unaffected by packing.

Rows are filled first-fit in the given order (no sorting by length, which would put all
short examples in the same batches); an example longer than a row is cut to the row, and
one left with no target in the cut is dropped (counted in `PackStats`). Positions no
example fills are padding: their own one-token "documents", never targets.

Not here: multi-token-prediction targets (the MTP modules run without a cache and would
not see the boundaries, so fine-tuning trains the main head only), or sequence parallelism.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

import torch
import torch.nn.functional as F

PAD_SEGMENT = -1


@dataclass
class Example:
    ids: list[int]
    mask: list[bool]  # mask[t]: ids[t] is a training target (mask[0] is never used)

    def __post_init__(self) -> None:
        if len(self.ids) != len(self.mask):
            raise ValueError(f"an example's ids ({len(self.ids)}) and mask ({len(self.mask)}) "
                             "must have the same length")

    @property
    def n_targets(self) -> int:
        return sum(self.mask[1:])


@dataclass
class PackedBatch:
    """B rows of T positions: inputs, targets, which targets count, and the layout."""
    inputs_BT: torch.Tensor  # int64
    targets_BT: torch.Tensor  # int64 (0 where not a target)
    loss_mask_BT: torch.Tensor  # bool
    segments_BT: torch.Tensor  # int64: example index within the row, PAD_SEGMENT for padding
    positions_BT: torch.Tensor  # int64: position within the example

    def to(self, device) -> "PackedBatch":
        return PackedBatch(*(t.to(device) for t in vars(self).values()))

    @property
    def n_targets(self) -> int:
        return int(self.loss_mask_BT.sum())

    def layout(self) -> "DocumentMask":
        return DocumentMask(self.segments_BT, self.positions_BT)


@dataclass
class PackStats:
    examples: int = 0
    truncated: int = 0  # cut to fit a row
    dropped: int = 0  # no target left (empty, or cut before its first target)
    rows: int = 0
    targets: int = 0
    positions: int = 0  # rows * seq_len
    used: int = 0  # positions holding an example's token

    @property
    def fill(self) -> float:
        """Share of positions holding a real token (not padding)."""
        return self.used / self.positions if self.positions else 0.0


class DocumentMask:
    """The cache interface the model calls, answering with per-example positions and a
    block-diagonal causal mask instead of stored keys (see the module note)."""

    def __init__(self, segments_BT: torch.Tensor, positions_BT: torch.Tensor):
        self.segments_BT, self.positions_BT = segments_BT, positions_BT

    def positions(self, T: int) -> torch.Tensor:
        return self.positions_BT[:, :T]

    def attention_mask(self, T: int) -> torch.Tensor:
        seg = self.segments_BT[:, :T]
        same_BTS = seg.unsqueeze(2) == seg.unsqueeze(1)
        causal_TS = torch.ones(T, T, dtype=torch.bool, device=seg.device).tril()
        return (same_BTS & causal_TS).unsqueeze(1)  # (B, 1, T, S)

    def layer(self, i: int) -> "DocumentMask":
        return self

    def update(self, latent_BTC: torch.Tensor, k_pe_BTR: torch.Tensor):
        return latent_BTC, k_pe_BTR  # the keys are this call's tokens; nothing is kept

    def advance(self, T: int) -> None:
        pass

    def max_length(self) -> int:
        return 0


def pack_rows(examples: list[Example], seq_len: int) -> tuple[list[list[tuple[int, int]]], PackStats]:
    """First-fit packing plan: for each row, (example index, positions used) pairs."""
    stats = PackStats(examples=len(examples))
    rows: list[list[tuple[int, int]]] = []
    free: list[int] = []
    for i, ex in enumerate(examples):
        n = min(len(ex.ids) - 1, seq_len)
        if n < len(ex.ids) - 1:
            stats.truncated += 1
        if n < 1 or not any(ex.mask[1:n + 1]):
            stats.dropped += 1
            continue
        row = next((r for r, space in enumerate(free) if space >= n), None)
        if row is None:
            rows.append([])
            free.append(seq_len)
            row = len(rows) - 1
        rows[row].append((i, n))
        free[row] -= n
        stats.targets += sum(ex.mask[1:n + 1])
        stats.used += n
    stats.rows, stats.positions = len(rows), len(rows) * seq_len
    return rows, stats


def collate(examples: list[Example], rows: list[list[tuple[int, int]]], seq_len: int,
            pad_id: int = 0) -> PackedBatch:
    """Tensors for the given rows of a packing plan."""
    B = len(rows)
    inputs = torch.full((B, seq_len), pad_id, dtype=torch.long)
    targets = torch.zeros((B, seq_len), dtype=torch.long)
    loss_mask = torch.zeros((B, seq_len), dtype=torch.bool)
    segments = torch.full((B, seq_len), PAD_SEGMENT, dtype=torch.long)
    positions = torch.zeros((B, seq_len), dtype=torch.long)
    for b, row in enumerate(rows):
        start = 0
        for s, (i, n) in enumerate(row):
            ex = examples[i]
            span = slice(start, start + n)
            inputs[b, span] = torch.tensor(ex.ids[:n])
            targets[b, span] = torch.tensor(ex.ids[1:n + 1])
            loss_mask[b, span] = torch.tensor(ex.mask[1:n + 1])
            segments[b, span] = s
            positions[b, span] = torch.arange(n)
            start += n
    return PackedBatch(inputs, targets, loss_mask, segments, positions)


def pack(examples: list[Example], seq_len: int, pad_id: int = 0) -> tuple[PackedBatch, PackStats]:
    """Every example packed into one batch of rows (evaluation sets, tests)."""
    rows, stats = pack_rows(examples, seq_len)
    return collate(examples, rows, seq_len, pad_id), stats


class PackedStream:
    """Endless training batches of `batch_size` packed rows: each epoch shuffles the
    examples with (seed, epoch), packs them and hands the rows out in order; a batch that
    straddles two epochs takes the first rows of the next."""

    def __init__(self, examples: list[Example], seq_len: int, batch_size: int, seed: int = 0,
                 pad_id: int = 0):
        self.examples, self.seq_len, self.batch_size = examples, seq_len, batch_size
        self.seed, self.pad_id = seed, pad_id
        self.epoch = -1
        self._rows: list[list[tuple[int, int]]] = []
        self._next_epoch()
        if not self._rows:
            raise ValueError("no example has a training target")

    def _next_epoch(self) -> None:
        self.epoch += 1
        order = list(range(len(self.examples)))
        random.Random(f"dsmoe.packing/{self.seed}/{self.epoch}").shuffle(order)
        rows, self.stats = pack_rows([self.examples[i] for i in order], self.seq_len)
        self._rows = [[(order[i], n) for i, n in row] for row in rows]  # original indices

    def __iter__(self) -> "PackedStream":
        return self

    def __next__(self) -> PackedBatch:
        chosen: list[list[tuple[int, int]]] = []
        while len(chosen) < self.batch_size:
            if not self._rows:
                self._next_epoch()
            take = self._rows[:self.batch_size - len(chosen)]
            self._rows = self._rows[len(take):]
            chosen += take
        return collate(self.examples, chosen, self.seq_len, self.pad_id)


def masked_lm_loss(logits_BTV: torch.Tensor, targets_BT: torch.Tensor,
                   loss_mask_BT: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the positions whose target counts (0 when none does)."""
    ce = F.cross_entropy(logits_BTV.flatten(0, 1).float(), targets_BT.flatten(), reduction="none")
    mask = loss_mask_BT.flatten().to(ce.dtype)
    return (ce * mask).sum() / mask.sum().clamp(min=1)
