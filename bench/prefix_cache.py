"""Prefix cache: time to first token for a long shared prefix, miss against RAM hit against disk hit.

A 1,500-token prefix shared by every request plus a short suffix of its own (16 tokens),
on the `small` preset (`tiny` with --quick; random weights, fp32, context raised to
2,048), one request at a time on one thread, first token only (max_tokens=1): the time
from `generate` to its return covers the prefix lookup, the copy into the cache row, the
prefill of what was not cached and the first token.
- miss: the prefix cache on, nothing cached for this prompt yet (a new prefix each round),
  so it pays the prefill of all 1,516 tokens and the copy of its blocks out to the cache;
- no cache: the engine without a prefix cache (what a miss costs on top of it);
- RAM hit: the prefix's blocks in RAM;
- disk hit: a fresh prefix cache with the RAM tier off over the directory the miss wrote,
  so every block is read from its file and checked (SHA-256); the file usually comes from the
  operating system's page cache, as it would on a server that wrote it recently.
Rounds interleave the four (the CPU is shared) and each figure is a median.
Bytes per cached token: (kv_lora_rank + qk_rope_head_dim) x layers x dtype size, checked
against what the RAM tier holds.

    python bench/prefix_cache.py [--quick]      or     python -m bench prefix_cache
Target: a RAM hit at least 10x faster than a miss.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dsmoe import ModelArgs, Transformer  # noqa: E402
from dsmoe.infer.engine import Engine  # noqa: E402
from dsmoe.infer.prefix_cache import PrefixCache, model_identity  # noqa: E402
from dsmoe.infer.sampling import SamplingParams  # noqa: E402

PRESET, PREFIX, SUFFIX = "small", 1500, 16
FIRST_TOKEN = SamplingParams(max_tokens=1, ignore_eos=True)


def tokens(n: int, seed: int, vocab: int) -> list[int]:
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def time_to_first_token(engine: Engine, prompt: list[int]) -> tuple[float, int]:
    start = time.perf_counter()
    req = engine.generate([prompt], FIRST_TOKEN)[0]
    return time.perf_counter() - start, req.cached_tokens


def run(quick: bool = False) -> list[dict]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a shared CPU: one thread per process keeps the figures steady
    try:
        return measure(quick)
    finally:
        torch.set_num_threads(threads)


def measure(quick: bool) -> list[dict]:
    preset = "tiny" if quick else PRESET  # --quick: a smoke run of the same steps
    args = ModelArgs.from_preset(preset).replace(max_seq_len=2048)
    torch.manual_seed(0)
    model = Transformer(args).eval()
    identity = model_identity(model, "bench")
    rounds = 1 if quick else 3
    times: dict[str, list[float]] = {"miss": [], "no_cache": [], "ram_hit": [], "disk_hit": []}
    cached: dict[str, int] = {}
    with tempfile.TemporaryDirectory() as folder:
        ram = PrefixCache(identity, ram_bytes=2 << 30, disk_dir=folder)
        engine = Engine(model, max_batch=1, max_len=2048, prefix_cache=ram)
        plain = Engine(model, max_batch=1, max_len=2048)
        for warm in (plain, engine):
            time_to_first_token(warm, tokens(64, 0, args.vocab_size))
        for r in range(rounds):
            prefix = tokens(PREFIX, 100 + r, args.vocab_size)
            suffix = [tokens(SUFFIX, 1000 * r + k, args.vocab_size) for k in range(4)]  # each its own
            measured = {"miss": time_to_first_token(engine, prefix + suffix[0])}
            ram.flush()
            measured["no_cache"] = time_to_first_token(plain, prefix + suffix[1])
            measured["ram_hit"] = time_to_first_token(engine, prefix + suffix[2])
            disk = PrefixCache(identity, ram_bytes=0, disk_dir=folder)
            measured["disk_hit"] = time_to_first_token(Engine(model, max_batch=1, max_len=2048,
                                                              prefix_cache=disk), prefix + suffix[3])
            disk.flush()  # its own writes (the suffix's block), before the folder goes
            for name, (seconds, n) in measured.items():
                times[name].append(seconds)
                cached[name] = n
        stats = ram.stats()
    per_token = (args.kv_lora_rank + args.qk_rope_head_dim) * args.n_layers * torch.float32.itemsize
    assert ram.bytes_per_token() == per_token == stats["ram_bytes"] // (stats["ram_blocks"] * ram.block)
    med = {k: statistics.median(v) for k, v in times.items()}

    def row(metric, value, unit, note):
        return {"benchmark": "prefix_cache", "metric": metric, "value": value, "unit": unit, "note": note}

    note = f"{preset} fp32, {PREFIX}-token prefix + {SUFFIX}, median of {rounds}"
    return [
        row("ttft_miss_ms", 1e3 * med["miss"], "ms", f"{note}; prefills all, stores its blocks"),
        row("ttft_no_cache_ms", 1e3 * med["no_cache"], "ms", "same prompt length, engine without a prefix cache"),
        row("ttft_ram_hit_ms", 1e3 * med["ram_hit"], "ms", f"{cached['ram_hit']} tokens from RAM"),
        row("ttft_disk_hit_ms", 1e3 * med["disk_hit"], "ms", f"{cached['disk_hit']} tokens from disk, RAM tier off"),
        row("ram_hit_speedup", med["miss"] / med["ram_hit"], "x", "miss / RAM hit (target >= 10x)"),
        row("disk_hit_speedup", med["miss"] / med["disk_hit"], "x", "miss / disk hit"),
        row("bytes_per_cached_token", per_token, "B",
            f"(kv_lora_rank {args.kv_lora_rank} + qk_rope {args.qk_rope_head_dim}) x {args.n_layers} layers x 4 "
            f"(V3 in bf16: {(512 + 64) * 61 * 2:,})"),
    ]


def main() -> None:
    from bench import format_table

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    print(format_table(run(quick=parser.parse_args().quick)))


if __name__ == "__main__":
    main()
