"""The prefix cache: latents of prompts seen before, reused instead of prefilled again.

MLA caches a token as its normalised latent and rotated k_pe: (kv_lora_rank +
qk_rope_head_dim) x layers x dtype size bytes (V3 in bf16: 70 KB), small enough to keep
many prompts in RAM and on disk, as DeepSeek's API does for every request. A prompt is cut
into blocks of `block` tokens (32 by default); block i's key is a hash chain,

    key_i = SHA-256(key_{i-1} || tokens of block i),   key_{-1} = the namespace,

so a key names the whole prefix up to its block, and the namespace names the model (its
config and a fingerprint of its weights), the tokenizer, the cache's layout and dtype, and
the block size: a cache made by another model, tokenizer or dtype is never found.

Tiers: RAM (an LRU of blocks under `ram_bytes`; 0 turns it off) and, given a directory,
disk (`prefix_disk.DiskTier`, its own budget, survives restarts; a disk hit is promoted to
RAM). The engine calls `match` for each joining prompt (the longest cached run of blocks,
leaving at least the last prompt token to prefill: its logits give the first token),
`fill` to copy those blocks into the request's cache row, then prefills only the rest; it
calls `store` after the prefill and when the request ends (its output's full blocks too).

Notable:
- Output is the same with or without the cache: a block's latents depend only on the
  tokens up to it (causal attention), which the chain key pins down. Floating-point sums
  may differ in the last bits (the rest is prefilled in other chunks), as after any change of
  batch shape.
- LRU order follows the chain: a match touches its blocks last-to-first, so a prefix's
  first blocks are the last to go, and eviction never strands a cached tail behind a hole.
- Thread-safe: the engine thread matches and stores; /health reads `stats()` from another.
Not here: the speculative decoder's MTP cache (its cache lags by one token and needs every
prompt position's hidden state; the engine bypasses the prefix cache when it speculates),
sharing blocks between requests admitted in the same step (both prefill), paging.
"""
from __future__ import annotations

import hashlib
import json
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch

from dsmoe.errors import ConfigError
from dsmoe.infer.prefix_disk import DiskTier

FORMAT = "dsmoe-prefix-cache-1"
DEFAULT_BLOCK = 32
DEFAULT_RAM = "1GB"
DEFAULT_DISK = "20GB"
FINGERPRINT_SAMPLES = 64  # values read from each end of every weight tensor for the identity


# ------------------------------------------------------------------------- identity and keys
def model_identity(model, tokenizer_id: str) -> str:
    """A hash of the model's config, a fingerprint of its weights (names, shapes, dtypes and
    the first and last values of every tensor: a page or two each, cheap on a 671B model even
    memory-mapped, and any training or fine-tuning step changes them) and the tokenizer's
    identity (`tokenizer_identity`)."""
    h = hashlib.sha256(FORMAT.encode())
    h.update(json.dumps(model.args.to_dict(), sort_keys=True, default=str).encode())
    with torch.no_grad():
        for name, t in sorted(model.state_dict().items()):
            h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
            if t.is_meta or not t.numel():
                continue  # not resident (weights left on disk): named by shape and dtype only
            flat = t.detach().reshape(-1)
            sample = torch.cat([flat[:FINGERPRINT_SAMPLES], flat[-FINGERPRINT_SAMPLES:]])
            h.update(sample.float().cpu().numpy().tobytes())
    h.update(tokenizer_id.encode())
    return h.hexdigest()


def tokenizer_identity(model_dir: str | Path | None, tokenizer=None) -> str:
    """The SHA-256 of the tokenizer's files in `model_dir`; without them, its class and vocabulary size."""
    h = hashlib.sha256()
    files = [Path(model_dir) / n for n in ("tokenizer.json", "tokenizer_config.json")] if model_dir else []
    found = [f for f in files if f.is_file()]
    for f in found:
        h.update(f.name.encode() + f.read_bytes())
    if not found:
        h.update(f"{type(tokenizer).__qualname__}:{getattr(tokenizer, 'vocab_size', None)}".encode())
    return h.hexdigest()


def block_keys(namespace: str, tokens: list[int], block: int, n_blocks: int) -> list[str]:
    keys, prev = [], namespace
    for i in range(n_blocks):
        chunk = torch.tensor(tokens[i * block:(i + 1) * block], dtype=torch.int64).numpy().tobytes()
        prev = hashlib.sha256(prev.encode() + chunk).hexdigest()
        keys.append(prev)
    return keys


def parse_budget(value: str | int, flag: str) -> int:
    """Bytes from '0', '512MB', '2GiB' or an int; a ConfigError naming `flag` otherwise."""
    from dsmoe.interop.hf.write import parse_size

    if isinstance(value, int) and value >= 0:
        return value
    if str(value).strip() in ("0", "0B", "0b"):
        return 0
    try:
        return parse_size(value)
    except ConfigError:
        raise ConfigError(f"{flag} {value!r} is not a size: give bytes or a size such as '512MB' or "
                          f"'2GiB' (0 turns that tier off)") from None


# --------------------------------------------------------------------------------- the cache
@dataclass
class PrefixStats:
    looked_up_tokens: int = 0  # prompt tokens of every match
    ram_hit_tokens: int = 0
    disk_hit_tokens: int = 0
    stored_blocks: int = 0

    @property
    def hit_tokens(self) -> int:
        return self.ram_hit_tokens + self.disk_hit_tokens


class PrefixCache:
    """Blocks of cached latents, keyed by hash chain, in RAM (LRU) and optionally on disk."""

    def __init__(self, identity: str, *, ram_bytes: int = 1 << 30, disk_dir: str | Path | None = None,
                 disk_bytes: int = 20 * 10**9, block: int = DEFAULT_BLOCK):
        if block < 1:
            raise ConfigError(f"the prefix cache block must be at least one token, got {block}")
        self.identity, self.block = identity, block
        self.ram_budget, self.disk_dir, self.disk_budget = ram_bytes, disk_dir, disk_bytes
        self.namespace: str | None = None
        self.shape: tuple[int, int, int] | None = None  # (layers, block, latent + k_pe widths)
        self.dtype: torch.dtype | None = None
        self.ram: OrderedDict[str, torch.Tensor] = OrderedDict()
        self.ram_bytes = 0
        self.disk: DiskTier | None = None
        self.counts = PrefixStats()
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return self.ram_budget > 0 or self.disk_dir is not None

    def attach(self, cache) -> None:
        """Bind to an engine's `LatentCache`: its layout and dtype join the namespace."""
        n_layers, (C, R) = cache.n_layers, cache.widths
        self.shape, self.dtype = (n_layers, self.block, C + R), cache.dtype
        layout = f"{FORMAT}|{self.identity}|{n_layers}x{C}+{R}|{cache.dtype}|block={self.block}"
        self.namespace = hashlib.sha256(layout.encode()).hexdigest()[:32]
        if self.disk_dir is not None and self.disk is None:
            self.disk = DiskTier(self.disk_dir, self.namespace, self.disk_budget)

    def bytes_per_token(self) -> int:
        L, _, W = self.shape
        return L * W * self.dtype.itemsize

    # ------------------------------------------------------------------- lookups
    def match(self, tokens: list[int]) -> list[torch.Tensor]:
        """The cached blocks of the longest cached prefix of `tokens`, at most len - 1 tokens."""
        n_blocks = (len(tokens) - 1) // self.block
        keys = block_keys(self.namespace, tokens, self.block, n_blocks)
        found, ram_hits = [], 0
        for i, key in enumerate(keys):
            with self._lock:
                data = self.ram.get(key)
            if data is not None:
                ram_hits += 1
            elif self.disk is not None:
                data = self.disk.load(key, self._tokens(tokens, i), self.shape, self.dtype)
                if data is not None:
                    self._put_ram(key, data)
            if data is None:
                break
            found.append(data)
        self._touch(keys[:len(found)])
        with self._lock:
            c = self.counts
            c.looked_up_tokens += len(tokens)
            c.ram_hit_tokens += ram_hits * self.block
            c.disk_hit_tokens += (len(found) - ram_hits) * self.block
        return found

    def fill(self, cache, row: int, blocks: list[torch.Tensor]) -> int:
        """Copy matched blocks into an empty cache row; returns the tokens now cached there."""
        if blocks:
            cache.fill_row(row, torch.cat(blocks, dim=1))
        return len(blocks) * self.block

    def store(self, cache, row: int, tokens: list[int]) -> None:
        """Keep the full blocks of `tokens`, whose latents are positions [0, len) of the cache row."""
        n_blocks = min(len(tokens), int(cache.lengths[row])) // self.block
        keys = block_keys(self.namespace, tokens, self.block, n_blocks)
        for i, key in enumerate(keys):
            with self._lock:
                in_ram = key in self.ram
            if in_ram or (self.ram_budget == 0 and self.disk is not None and self.disk.has(key)):
                continue
            data = cache.read_row(row, i * self.block, (i + 1) * self.block)
            self._put_ram(key, data)
            if self.disk is not None:
                self.disk.save(key, self._tokens(tokens, i), data)
            with self._lock:
                self.counts.stored_blocks += 1
        self._touch(keys)

    def flush(self) -> None:
        """Wait until every block stored so far is on disk."""
        if self.disk is not None:
            self.disk.flush()

    def stats(self) -> dict:
        """Hit rate and bytes per tier (what /health shows)."""
        with self._lock:
            c = self.counts
            out = {"block_tokens": self.block, "hit_tokens": c.hit_tokens, "ram_hit_tokens": c.ram_hit_tokens,
                   "disk_hit_tokens": c.disk_hit_tokens, "looked_up_tokens": c.looked_up_tokens,
                   "hit_rate": c.hit_tokens / c.looked_up_tokens if c.looked_up_tokens else 0.0,
                   "ram_bytes": self.ram_bytes, "ram_blocks": len(self.ram), "ram_budget_bytes": self.ram_budget,
                   "bytes_per_token": self.bytes_per_token() if self.shape else None}
        d = self.disk
        out.update({"disk_dir": str(d.root), "disk_bytes": d.bytes, "disk_blocks": d.files,
                    "disk_budget_bytes": d.budget, "disk_corrupt_files": d.corrupt,
                    "disk_write_errors": d.write_errors} if d is not None else {"disk_dir": None})
        return out

    # ------------------------------------------------------------------- internals
    def _tokens(self, tokens: list[int], i: int) -> tuple[int, ...]:
        return tuple(tokens[i * self.block:(i + 1) * self.block])

    def _touch(self, keys: list[str]) -> None:
        """Mark a chain's blocks used, its first block last: the most recent, so evicted last."""
        with self._lock:
            for key in reversed(keys):
                if key in self.ram:
                    self.ram.move_to_end(key)

    def _put_ram(self, key: str, data: torch.Tensor) -> None:
        size = data.numel() * data.element_size()
        if size > self.ram_budget:
            return
        with self._lock:
            if key in self.ram:
                self.ram.move_to_end(key)
                return
            while self.ram_bytes + size > self.ram_budget:
                _, old = self.ram.popitem(last=False)
                self.ram_bytes -= old.numel() * old.element_size()
            self.ram[key] = data
            self.ram_bytes += size


# ----------------------------------------------------------------------------- the flags
def add_arguments(parser) -> None:
    """`--prefix-cache-*` for `dsmoe serve` and `dsmoe generate`."""
    parser.add_argument("--prefix-cache-ram", default=DEFAULT_RAM, metavar="SIZE",
                        help=f"RAM for cached prompt prefixes (default {DEFAULT_RAM}; 0 turns the RAM tier off)")
    parser.add_argument("--prefix-cache-dir", default=None, metavar="DIR",
                        help="also keep cached prefixes on disk in DIR, across restarts")
    parser.add_argument("--prefix-cache-disk", default=DEFAULT_DISK, metavar="SIZE",
                        help=f"disk budget of --prefix-cache-dir (default {DEFAULT_DISK})")


@dataclass
class PrefixCacheSettings:
    ram_bytes: int
    disk_dir: str | None
    disk_bytes: int

    @classmethod
    def from_args(cls, args) -> PrefixCacheSettings:
        """Checked before anything loads: a bad size is a ConfigError naming its flag."""
        settings = cls(parse_budget(args.prefix_cache_ram, "--prefix-cache-ram"), args.prefix_cache_dir,
                       parse_budget(args.prefix_cache_disk, "--prefix-cache-disk"))
        if settings.disk_dir is not None and settings.disk_bytes == 0:
            raise ConfigError("--prefix-cache-disk 0 leaves no room on disk: give a size, or drop "
                              "--prefix-cache-dir")
        return settings

    def build(self, model, model_dir, tokenizer) -> PrefixCache | None:
        if self.ram_bytes == 0 and self.disk_dir is None:
            return None
        return PrefixCache(model_identity(model, tokenizer_identity(model_dir, tokenizer)),
                           ram_bytes=self.ram_bytes, disk_dir=self.disk_dir, disk_bytes=self.disk_bytes)
