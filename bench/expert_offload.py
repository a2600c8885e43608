"""Experts from disk (`--max-expert-memory`): decode tokens/s and expert hit rate with the
budget at 100%, 50% and 25% of the routed experts' bytes, against the fully resident model,
and the same at 50% with `--quantize int8`.

The model is `--model DIR` (a trained one routes unevenly, which an LRU likes) or a random
`small` model (32 routed experts, 4 chosen, 5 MoE layers: about 95 MiB of fp32 experts;
random routers spread tokens evenly, the LRU's worst case). Decode: greedy, batch 1, 64 new
tokens after a 32-token prompt, (time for N - time for 1)/(N - 1), interleaved rounds,
median. The hit rate is over everything the run read (prompt and decode). The checkpoint's
pages may sit in the kernel's page cache: a miss here costs a read from memory, not a disk.

    python bench/expert_offload.py [--quick] [--model DIR]    or    python -m bench expert_offload
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.decode import median_rates, ours_generate  # noqa: E402
from dsmoe import ModelArgs, Transformer, save_hf  # noqa: E402
from dsmoe.infer.engine import Engine  # noqa: E402
from dsmoe.infer.memory_options import load_options  # noqa: E402
from dsmoe.interop.hf import load_hf, open_checkpoint  # noqa: E402


def expert_bytes(model_dir) -> int:
    ckpt = open_checkpoint(model_dir)
    return sum(ckpt.tensors[k].shape[0] * ckpt.tensors[k].shape[1] * 4
               for k, slots in ckpt.sources.items() if any(e is not None for _, e in slots))


def rows_for(model_dir: str, quick: bool) -> list[dict]:
    total = expert_bytes(model_dir)
    setups = {"resident": {}}
    for share in (1.0, 0.5, 0.25):
        setups[f"{share:.0%}"] = load_options(None, int(share * total))
    setups["50% int8"] = load_options("int8", int(0.5 * total / 4))  # int8 experts: a quarter of the bytes
    engines, stores = {}, {}
    for name, options in setups.items():
        engines[name] = Engine(load_hf(model_dir, dtype="fp32", **options), max_batch=1)
        stores[name] = options["prepare"].store if "prepare" in options else None
    vocab = engines["resident"].args.vocab_size
    P, N, rounds = (32, 16, 2) if quick else (32, 64, 3)
    prompt = torch.randint(0, vocab, (1, P), generator=torch.Generator().manual_seed(0)).tolist()
    same = {name: ours_generate(e, prompt, N) == ours_generate(engines["resident"], prompt, N)
            for name, e in engines.items() if "int8" not in name}
    jobs = {f"{k}|{n}": (lambda e=e, n=n: ours_generate(e, prompt, n), 1) for k, e in engines.items() for n in (1, N)}
    rate = median_rates(jobs, rounds)
    tps = {k: (N - 1) / (1 / rate[f"{k}|{N}"] - 1 / rate[f"{k}|1"]) for k in engines}
    note = f"{Path(model_dir).name}, experts {total / 2**20:.0f} MiB fp32, {torch.get_num_threads()} threads"
    rows = []
    for name in engines:
        s = stores[name]
        detail = "" if s is None else f"hit rate {s.stats.hit_rate:.0%}, held {s.stats.bytes_held / 2**20:.1f} MiB"
        if name in same:
            detail += f"{'; ' if detail else ''}greedy tokens {'identical' if same[name] else 'DIFFER'}"
        rows.append({"benchmark": "expert_offload", "metric": f"decode_tokens_per_s_{name}", "value": tps[name],
                     "unit": "tok/s", "note": f"{detail}; {note}"})
        if s is not None:
            rows.append({"benchmark": "expert_offload", "metric": f"hit_rate_{name}", "value": 100 * s.stats.hit_rate,
                         "unit": "%", "note": f"speed {tps[name] / tps['resident']:.2f}x resident"})
    return rows


def run(quick: bool = False, model_dir: str | None = None) -> list[dict]:
    if model_dir is not None:
        return rows_for(model_dir, quick)
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        save_hf(Transformer(ModelArgs.from_preset("small").replace(n_mtp_layers=0)), tmp)
        return rows_for(tmp, quick)


def main() -> None:
    from bench import format_table

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--model", default=None, help="model directory (default: a random `small` model)")
    opts = parser.parse_args()
    print(format_table(run(opts.quick, opts.model)))


if __name__ == "__main__":
    main()
