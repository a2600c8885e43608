"""Packed token shards on disk, and the batch streams that training reads from them.

Design note
-----------
Layout of a prepared data directory (written by prepare.py):

    manifest.json          what is here: domains, sources, licences, counts, sha256 of each
                           shard and of the tokenizer, dtype, the prepare settings
    tokenizer.json, tokenizer_config.json
    train/en-000.bin       raw little-endian token ids (uint16 when the vocabulary fits,
    val/en-000.bin         else uint32), one file per split and domain, rolled over at
    ...                    MAX_SHARD_TOKENS at a document boundary

Each document is stored as `<bos> tokens <eos>` and documents follow each other directly,
so a window that crosses a boundary sees the eos/bos pair a model must learn to use. The
files are plain arrays read with `numpy.memmap`: opening a data directory costs nothing,
whatever its size, and many processes can share the page cache.

`BatchStream` draws windows at random offsets (nanoGPT style), domain by domain in
proportion to their token share. Every batch is a pure function of (seed, rank, step):
the stream's whole state is its step counter, so a run resumed from `state_dict()`
continues with exactly the batches an uninterrupted run would have seen, and data-parallel
ranks draw different rows without coordinating.

Deliberately not here: epochs or a guarantee that every token is seen once per epoch
(windows are sampled with replacement), document masking inside a window, or tokenization
(prepare.py does it once, ahead of training). Validation batches (`val_batches`) are the
opposite: consecutive windows from the start of the held-out split, the same every time.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import torch

from dsmoe.errors import DataError

MANIFEST_FILE = "manifest.json"
MANIFEST_FORMAT = "dsmoe-token-shards"
MANIFEST_VERSION = 1
SPLITS = ("train", "val")
MAX_SHARD_TOKENS = 1 << 27  # 256 MiB of uint16 per file; a document never straddles two
_WRITE_BUFFER_TOKENS = 1 << 20
_HASH_CHUNK_BYTES = 1 << 24


def token_dtype(vocab_size: int) -> np.dtype:
    """The narrowest unsigned dtype that holds every id of a vocabulary."""
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def validation_mask(texts: list[str], val_fraction: float, seed: int) -> list[bool]:
    """Which documents are held out for validation: True means val.

    Decided per document by ranking a seeded hash of each text, so the choice does not
    depend on input order and identical texts always land on the same side (a duplicate
    in both splits would leak training text into validation). About
    round(n * val_fraction) documents are held out (more only to keep duplicates
    together), at least one whenever there are two distinct texts and val_fraction > 0,
    so every domain can be validated, and never all of them.
    """
    n = len(texts)
    if n < 2 or val_fraction <= 0:
        return [False] * n
    target = min(n - 1, max(1, round(n * val_fraction)))
    groups: dict[bytes, list[int]] = {}
    for i, text in enumerate(texts):
        groups.setdefault(hashlib.sha256(f"{seed}\0{text}".encode()).digest(), []).append(i)
    held_out: set[int] = set()
    for key in sorted(groups):
        if len(held_out) >= target or len(held_out) + len(groups[key]) >= n:
            break
        held_out.update(groups[key])
    return [i in held_out for i in range(n)]


# --- writing ------------------------------------------------------------------------------

@dataclass
class ShardRecord:
    path: str      # relative to the data directory, e.g. "train/en-000.bin"
    split: str
    domain: str
    documents: int
    tokens: int
    sha256: str


class ShardWriter:
    """Appends documents of one (split, domain) to numbered shard files."""

    def __init__(self, root: Path, split: str, domain: str, dtype: np.dtype,
                 bos_id: int, eos_id: int, max_tokens: int = MAX_SHARD_TOKENS):
        self.root, self.split, self.domain = Path(root), split, domain
        self.dtype = np.dtype(dtype).newbyteorder("<")  # the files are little-endian everywhere
        self.bos_id, self.eos_id, self.max_tokens = bos_id, eos_id, max_tokens
        self.records: list[ShardRecord] = []
        self._file = None
        self._buffer: list[int] = []

    def add_document(self, ids: list[int]) -> None:
        """Write one document as `<bos> ids <eos>`."""
        if self._file is None or self._open_tokens >= self.max_tokens:
            self._roll_over()
        self._buffer.append(self.bos_id)
        self._buffer.extend(ids)
        self._buffer.append(self.eos_id)
        self._open_tokens += len(ids) + 2
        self._open_docs += 1
        if len(self._buffer) >= _WRITE_BUFFER_TOKENS:
            self._flush()

    def close(self) -> list[ShardRecord]:
        self._finish_file()
        return self.records

    def _flush(self) -> None:
        data = np.asarray(self._buffer, dtype=self.dtype).tobytes()
        self._file.write(data)
        self._digest.update(data)
        self._buffer.clear()

    def _roll_over(self) -> None:
        self._finish_file()
        relative = f"{self.split}/{self.domain}-{len(self.records):03d}.bin"
        (self.root / self.split).mkdir(parents=True, exist_ok=True)
        self._file = open(self.root / relative, "wb")
        self._relative, self._digest = relative, hashlib.sha256()
        self._open_tokens = self._open_docs = 0

    def _finish_file(self) -> None:
        if self._file is None:
            return
        self._flush()
        self._file.close()
        self._file = None
        self.records.append(ShardRecord(self._relative, self.split, self.domain,
                                        self._open_docs, self._open_tokens,
                                        self._digest.hexdigest()))


def write_manifest(root: Path, manifest: dict) -> None:
    (Path(root) / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2, ensure_ascii=False)
                                            + "\n", encoding="utf-8")


def read_manifest(root: Path) -> dict:
    path = Path(root) / MANIFEST_FILE
    if not path.is_file():
        raise DataError(f"no {MANIFEST_FILE} in {root}: create the data directory with "
                        f"`dsmoe prepare --out {root}`")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise DataError(f"{path} is not valid JSON ({err}); re-run `dsmoe prepare`") from err
    if manifest.get("format") != MANIFEST_FORMAT or manifest.get("version") != MANIFEST_VERSION:
        raise DataError(f"{path} is not a version-{MANIFEST_VERSION} {MANIFEST_FORMAT} manifest; "
                        "re-run `dsmoe prepare` with this version of dsmoe")
    return manifest


# --- reading ------------------------------------------------------------------------------

class TokenShards:
    """A prepared data directory: the manifest and memory-mapped shards.

    Opening checks that every shard exists with the size the manifest gives (a cheap
    guard against truncation); `verify()` also checks every sha256.
    """

    def __init__(self, root: str | Path, verify: bool = False):
        self.root = Path(root)
        self.manifest = read_manifest(self.root)
        self.dtype = np.dtype(self.manifest["dtype"]).newbyteorder("<")
        self.records = [ShardRecord(**r) for r in self.manifest["shards"]]
        self._arrays: dict[str, np.memmap] = {}
        for record in self.records:
            self._check_size(record)
        if verify:
            self.verify()

    @property
    def domains(self) -> list[str]:
        return list(self.manifest["domains"])

    @property
    def vocab_size(self) -> int:
        return self.manifest["tokenizer"]["vocab_size"]

    def tokenizer(self):
        from dsmoe.data.tokenizer import Tokenizer
        return Tokenizer.from_dir(self.root)

    def _check_size(self, record: ShardRecord) -> None:
        path = self.root / record.path
        expected = record.tokens * self.dtype.itemsize
        if not path.is_file():
            raise DataError(f"shard {path} is missing; re-run `dsmoe prepare`")
        if path.stat().st_size != expected:
            raise DataError(f"shard {path} is {path.stat().st_size} bytes, the manifest says "
                            f"{expected}: it is truncated or corrupt; re-run `dsmoe prepare`")

    def verify(self) -> None:
        """Check every shard's size and sha256 against the manifest."""
        for record in self.records:
            self._check_size(record)
            if file_sha256(self.root / record.path) != record.sha256:
                raise DataError(f"shard {self.root / record.path} does not match its sha256 in "
                                f"the manifest: it is corrupt; re-run `dsmoe prepare`")

    def shards(self, split: str, domain: str | None = None) -> list[ShardRecord]:
        if split not in SPLITS:
            raise DataError(f"unknown split {split!r}; choose from {SPLITS}")
        if domain is not None and domain not in self.manifest["domains"]:
            raise DataError(f"no domain {domain!r} in {self.root}; it has {self.domains}")
        return [r for r in self.records if r.split == split and domain in (None, r.domain)]

    def array(self, record: ShardRecord) -> np.memmap:
        if record.path not in self._arrays:
            self._arrays[record.path] = np.memmap(self.root / record.path, dtype=self.dtype,
                                                  mode="r", shape=(record.tokens,))
        return self._arrays[record.path]

    def num_tokens(self, split: str, domain: str | None = None) -> int:
        return sum(r.tokens for r in self.shards(split, domain))


def _window(shards: TokenShards, record: ShardRecord, start: int, length: int) -> np.ndarray:
    return np.asarray(shards.array(record)[start:start + length], dtype=np.int64)


class StepStream:
    """An endless iterator over `batch(step)`, a pure function of the step: iteration yields
    step 0, 1, ... from `self.step` on (which resuming sets)."""
    step: int

    def batch(self, step: int) -> torch.Tensor:
        raise NotImplementedError

    def __iter__(self) -> "StepStream":
        return self

    def __next__(self) -> torch.Tensor:
        batch = self.batch(self.step)
        self.step += 1
        return batch


class BatchStream(StepStream):
    """Endless training batches `(batch_size, seq_len + 1 + extra)` of int64 token ids.

    Row t of a batch holds tokens x[0..seq_len+extra]: inputs are [:, :seq_len], next-token
    targets [:, 1:seq_len+1], and the `extra` further tokens give multi-token-prediction
    targets. Rows are drawn from the chosen domains (default: all) in proportion to their
    tokens; shards shorter than one window are skipped, and a domain named in `domains`
    that has none long enough is an error. See the module note for determinism and
    resumption.
    """

    def __init__(self, shards: TokenShards, split: str = "train", batch_size: int = 8,
                 seq_len: int = 256, seed: int = 0, domains: Iterable[str] | None = None,
                 extra: int = 0, rank: int = 0, world_size: int = 1):
        if batch_size < 1 or seq_len < 1 or extra < 0:
            raise DataError(f"need batch_size >= 1, seq_len >= 1, extra >= 0; got "
                            f"{batch_size}, {seq_len}, {extra}")
        if not 0 <= rank < world_size:
            raise DataError(f"rank {rank} is outside world_size {world_size}")
        self.shards, self.split, self.batch_size, self.seq_len = shards, split, batch_size, seq_len
        self.seed, self.extra, self.rank, self.world_size = seed, extra, rank, world_size
        self.window = seq_len + 1 + extra
        self.domains = list(domains) if domains is not None else shards.domains
        self._candidates = self._usable_shards(explicit=domains is not None)
        tokens = np.array([r.tokens for r in self._candidates], dtype=np.float64)
        self._weights = tokens / tokens.sum()  # a domain's share is the sum of its shards'
        self.step = 0

    def _usable_shards(self, explicit: bool) -> list[ShardRecord]:
        """Shards long enough for one window; a domain asked for by name must have one."""
        usable = []
        for domain in self.domains:
            records = [r for r in self.shards.shards(self.split, domain) if r.tokens >= self.window]
            if explicit and not records:
                raise DataError(f"domain {domain!r} has no {self.split} shard with "
                                f"{self.window} tokens (seq_len + 1 + extra); use a shorter "
                                "seq_len or more data")
            usable += records
        if not usable:
            raise DataError(f"no {self.split} shard in {self.shards.root} holds {self.window} "
                            "tokens (seq_len + 1 + extra); use a shorter seq_len or more data")
        return usable

    @property
    def domain_weights(self) -> dict[str, float]:
        """The probability that a row comes from each domain."""
        weights: dict[str, float] = {}
        for record, w in zip(self._candidates, self._weights):
            weights[record.domain] = weights.get(record.domain, 0.0) + float(w)
        return weights

    def batch(self, step: int) -> torch.Tensor:
        """The batch at `step` for this rank: a pure function of (seed, rank, step)."""
        rng = np.random.default_rng([self.seed, self.rank, self.world_size, step])
        picks = rng.choice(len(self._candidates), size=self.batch_size, p=self._weights)
        highs = np.array([self._candidates[i].tokens - self.window + 1 for i in picks])
        starts = rng.integers(0, highs)
        rows = [_window(self.shards, self._candidates[i], int(s), self.window)
                for i, s in zip(picks, starts)]
        return torch.from_numpy(np.stack(rows))

    def _identity(self) -> dict:
        return {"split": self.split, "batch_size": self.batch_size, "seq_len": self.seq_len,
                "seed": self.seed, "domains": self.domains, "extra": self.extra,
                "rank": self.rank, "world_size": self.world_size,
                "tokenizer_sha256": self.shards.manifest["tokenizer"]["sha256"]}

    def state_dict(self) -> dict:
        return {**self._identity(), "step": self.step}

    def load_state_dict(self, state: dict) -> None:
        """Continue from `state`; the stream must be configured as the one that saved it."""
        mine = self._identity()
        differ = {k: (state.get(k), v) for k, v in mine.items() if state.get(k) != v}
        if differ:
            detail = ", ".join(f"{k}: saved {a!r}, now {b!r}" for k, (a, b) in differ.items())
            raise DataError(f"cannot resume this batch stream from a different one ({detail})")
        self.step = int(state["step"])


def val_batches(shards: TokenShards, domain: str, batch_size: int, seq_len: int,
                max_batches: int | None = None, extra: int = 0) -> Iterator[torch.Tensor]:
    """Deterministic validation batches of one domain: consecutive, non-overlapping windows
    of seq_len + 1 + extra tokens from the start of its val shards (the last batch may have
    fewer rows)."""
    window = seq_len + 1 + extra
    starts = [(record, start) for record in shards.shards("val", domain)
              for start in range(0, record.tokens - window + 1, window)]
    if not starts:
        require_validation(shards, window, [domain])
    limit = len(starts) if max_batches is None else max_batches * batch_size
    for first in range(0, min(limit, len(starts)), batch_size):
        chunk = starts[first:min(first + batch_size, limit)]
        yield torch.from_numpy(np.stack([_window(shards, r, s, window) for r, s in chunk]))


def require_validation(shards: TokenShards, window: int, domains: Iterable[str] | None = None,
                       shorter: str = "a shorter seq_len") -> None:
    """A DataError naming every domain whose validation split cannot fill one window of
    `window` tokens, and the fixes (training calls it before its first step, so a run
    never trains for hours and then fails at its first evaluation)."""
    short = {d: shards.num_tokens("val", d) for d in (domains or shards.domains)
             if not any(r.tokens >= window for r in shards.shards("val", d))}
    if short:
        counts = ", ".join(f"{d!r} has {n}" for d, n in short.items())
        used = shards.manifest.get("settings", {}).get("val_fraction")
        raise DataError(f"evaluation needs one window of {window} validation tokens per domain, "
                        f"and in {shards.root} {counts}; re-run `dsmoe prepare --out "
                        f"{shards.root}` with more text or a larger --val-fraction (it used "
                        f"{used}), or use {shorter}")


def unigram_entropy(shards: TokenShards, split: str = "train",
                    domains: Iterable[str] | None = None) -> float:
    """Entropy of the unigram token distribution, in nats per token.

    Nats, like PyTorch's cross-entropy loss: a language model whose loss is below this
    has learned more than token frequencies.
    """
    counts = np.zeros(shards.vocab_size, dtype=np.int64)
    for domain in (domains if domains is not None else shards.domains):
        for record in shards.shards(split, domain):
            array = shards.array(record)
            for start in range(0, record.tokens, _WRITE_BUFFER_TOKENS):
                counts += np.bincount(array[start:start + _WRITE_BUFFER_TOKENS],
                                      minlength=shards.vocab_size)
    total = counts.sum()
    if total == 0:
        raise DataError(f"no {split} tokens to measure in {shards.root}")
    p = counts[counts > 0] / total
    return float(-(p * np.log(p)).sum())
