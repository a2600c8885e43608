"""Routed experts kept in the checkpoint files, with an LRU of hot experts in a byte budget
(`--max-expert-memory SIZE`): a MoE model whose experts do not fit in memory still runs.

A token uses K of E experts per layer, so most expert weights sit idle at any moment: they
stay in the safetensors files, and an expert is read (plain file reads, dsmoe/interop/hf/
tensor_file.py; the kernel's page cache, not this process, keeps recently read pages) the
first time a token chooses it, then kept while it is among the most recently used that fit
in the budget. The rest of the model (attention, dense layers, shared experts, router,
embedding, head) is loaded as usual; the loader never reads an expert it does not keep.

Notable:
- Output bit-identical to a fully resident model: the expert is read exactly as the loader
  reads it (same dtype conversion, same FP8 dequantisation, same int8 quantisation with
  `--quantize int8`) and computed by `dsmoe/model/sparse_experts.py`, whose matmuls equal
  the resident few-token path's (tests/infer/test_expert_store.py).
- One expert is in use at a time beyond the cache, so the budget bounds the experts held:
  peak memory is the budget plus the non-expert weights plus one expert (the one being
  read) plus activations. A budget below one token's experts of a layer (K experts) would
  read K experts from disk at every layer of every token: refused with the minimum to give.
- Hit rate and bytes held are counted (`ExpertStore.stats`) for the benchmark
  (bench/expert_offload.py) and the server's /health.
Not here: prefetching (a decode step learns its experts only after the router runs, one
layer at a time), sharing the cache between processes.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch

from dsmoe.errors import ConfigError
from dsmoe.model.moe import RoutedExperts
from dsmoe.model.sparse_experts import SparseExperts

NAMES = ("w1_EFD", "w3_EFD", "w2_EDF")


@dataclass
class StoreStats:
    hits: int = 0
    misses: int = 0
    bytes_read: int = 0
    bytes_held: int = 0
    experts_held: int = 0

    @property
    def hit_rate(self) -> float:
        return self.hits / max(self.hits + self.misses, 1)


class ExpertStore:
    """(layer, expert) -> its three weights, read on demand from a checked checkpoint and
    kept in an LRU of at most `budget` bytes."""

    def __init__(self, ckpt, budget: int, dtype: torch.dtype, device, quantize: str | None = None):
        from dsmoe.interop.hf.read import ShardReader

        self.ckpt, self.budget, self.dtype, self.device = ckpt, budget, dtype, torch.device(device)
        self.quantize = quantize
        self.reader = ShardReader(ckpt, keep_open=True)
        self.keys: dict[tuple[str, int], str] = {}  # (our stacked name, expert) -> checkpoint key
        for key, slots in ckpt.sources.items():
            for ours, expert in slots:
                if expert is not None:
                    self.keys[(ours, expert)] = key
        self._lru: OrderedDict[tuple[str, int], tuple] = OrderedDict()
        self.stats = StoreStats()

    def expert_bytes(self, F_: int, D: int) -> int:
        if self.quantize:
            return 3 * F_ * D + 2 * (2 * F_ + D)  # int8 values, bf16 row scales
        return 3 * F_ * D * torch.empty((), dtype=self.dtype).element_size()

    def experts_in_budget(self) -> int:
        """How many experts the budget holds."""
        return self.budget // self.expert_bytes(self.ckpt.args.moe_inter_dim, self.ckpt.args.dim)

    def get(self, layer: str, e: int) -> tuple:
        found = self._lru.get((layer, e))
        if found is not None:
            self._lru.move_to_end((layer, e))
            self.stats.hits += 1
            return found
        self.stats.misses += 1
        weights = tuple(self._read(f"{layer}.{n}", e) for n in NAMES)
        size = sum(w.nbytes for w in weights)
        self.stats.bytes_read += size
        while self._lru and self.stats.bytes_held + size > self.budget:
            _, old = self._lru.popitem(last=False)
            self.stats.bytes_held -= sum(w.nbytes for w in old)
        if size <= self.budget:
            self._lru[(layer, e)] = weights
            self.stats.bytes_held += size
        self.stats.experts_held = len(self._lru)
        return weights

    def _read(self, name: str, e: int):
        key = self.keys[(name, e)]
        shape = self.ckpt.tensors[key].shape
        if self.quantize:
            from dsmoe.model.quant import Int8Weight, quantize_rows

            q = torch.empty(shape, dtype=torch.int8)
            scale = torch.empty(shape[0], dtype=torch.bfloat16)
            for start, stop, rows in self.reader.float_rows(key):
                q[start:stop], scale[start:stop] = quantize_rows(rows)
            return Int8Weight(q.to(self.device), scale.to(self.device))
        out = torch.empty(shape, dtype=self.dtype, device=self.device)
        self.reader.read_into(key, out)
        return out

    def close(self) -> None:
        self.reader.close()
        self._lru.clear()


class OffloadedExperts(SparseExperts):
    """One MoE layer's routed experts, served by the store."""

    def __init__(self, store: ExpertStore, name: str, n_experts: int):
        super().__init__(n_experts)
        self.store, self.name = store, name

    def expert(self, e: int) -> tuple:
        return self.store.get(self.name, e)

    def held_at_once(self) -> int:
        return self.store.experts_in_budget()


def offload_experts(budget: int | str, device, quantize: str | None = None):
    """A `prepare` hook for the loader (build_model): replaces every RoutedExperts of the
    meta model by OffloadedExperts over one shared store; the store is `prepare.store`."""
    from dsmoe.interop.hf.write import parse_size

    try:
        budget_bytes = parse_size(budget)
    except ConfigError:
        raise ConfigError(f"--max-expert-memory {budget!r}: give a size such as '512MB' or '2GiB'") from None

    def prepare(model, ckpt) -> None:
        layers = [(n, m) for n, m in model.named_modules() if isinstance(m, RoutedExperts)]
        if not layers:
            raise ConfigError("--max-expert-memory: this model has no routed experts to keep on disk")
        E, F_, D = layers[0][1].w1_EFD.shape
        store = ExpertStore(ckpt, budget_bytes, layers[0][1].w1_EFD.dtype, device, quantize)
        need = ckpt.args.n_activated_experts * store.expert_bytes(F_, D)
        if budget_bytes < need:
            raise ConfigError(f"--max-expert-memory {budget}: one token uses {ckpt.args.n_activated_experts} "
                              f"experts per layer, {need / 2**20:.1f} MiB; give at least that "
                              f"(or leave the flag out to load every expert)")
        for name, module in layers:
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, OffloadedExperts(store, name, E))
        prepare.store = store

    prepare.store = None
    return prepare


def store_stats(model) -> dict | None:
    """The expert store's counters for /health, None when every expert is resident."""
    store = next((m.store for m in model.modules() if isinstance(m, OffloadedExperts)), None)
    if store is None:
        return None
    s = store.stats
    return {"budget_bytes": store.budget, "bytes_held": s.bytes_held, "experts_held": s.experts_held,
            "hit_rate": round(s.hit_rate, 4), "hits": s.hits, "misses": s.misses}
