"""Int8 weights (`--quantize int8`) against fp32, on the same checkpoint: resident weight
bytes, validation loss on prepared data, and decode speed at batch 1.

The model is `--model DIR` (a trained one, e.g. `dsmoe train --preset small` or `make demo`'s
out/demo/hf) with `--data DIR` (its prepared data: validation loss per domain, the mean over
domains compared); without them a random `small` model gives bytes and speed only.
Decode: greedy, 64 new tokens after a 32-token prompt, (time for N - time for 1)/(N - 1),
the two sides interleaved round by round, median over rounds. When a llama.cpp build is
present (`python -m bench.llamacpp build`), the same checkpoint converted by llama.cpp's
converter to Q8_0 (its int8 format: blocks of 32 weights with one fp16 scale) is timed by
llama-bench (batch 1 after a prompt-long context, same thread count) alternating with our
int8 engine, and the ratio is taken between those paired medians.

    python bench/quant.py [--quick] [--model DIR --data DIR]     or     python -m bench quant
Targets (issue 15): bytes <= 0.3x fp32; loss within 1% of fp32; decode >= 0.8x llama.cpp Q8_0.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.decode import decode_rate, median_rates, ours_generate  # noqa: E402
from dsmoe import ModelArgs, Transformer, save_hf  # noqa: E402
from dsmoe.infer.engine import Engine  # noqa: E402
from dsmoe.interop.hf import load_hf  # noqa: E402
from dsmoe.model.quant import weight_bytes  # noqa: E402


def val_loss(model, data_dir: str, batches: int) -> float:
    from dsmoe.data.shards import TokenShards
    from dsmoe.train.pretrain import evaluate

    shards = TokenShards(data_dir)
    losses = evaluate(model, shards, shards.domains, 8, 128, batches, torch.device("cpu"))
    return sum(losses.values()) / len(losses)


def llamacpp_q8_rows(model_dir: str, engine: Engine, prompt: list[list[int]], N: int, rounds: int) -> list[dict]:
    """llama.cpp Q8_0 of the same checkpoint against our int8 engine, alternating rounds."""
    import statistics

    from bench import llamacpp
    if not llamacpp.available():
        return [{"benchmark": "quant", "metric": m, "value": float("nan"), "unit": "",
                 "note": f"llama.cpp not built in {llamacpp.home()}: {llamacpp.HOW_TO_BUILD}"}
                for m in ("llamacpp_q8_0_decode_tokens_per_s_batch1", "int8_decode_vs_llamacpp_q8_0")]
    threads, P = torch.get_num_threads(), len(prompt[0])
    with tempfile.TemporaryDirectory() as tmp:
        gguf = llamacpp.convert(model_dir, Path(tmp) / "model-q8_0.gguf", outtype="q8_0")
        theirs, ours = [], []
        for _ in range(rounds):
            theirs.append(llamacpp.bench_decode(gguf, threads, P, N))
            ours.append(decode_rate(engine, prompt, N))
    theirs, ours = statistics.median(theirs), statistics.median(ours)
    return [{"benchmark": "quant", "metric": "llamacpp_q8_0_decode_tokens_per_s_batch1", "value": theirs,
             "unit": "tok/s", "note": f"llama-bench -p 0 -n {N} -d {P} -t {threads}, convert_hf_to_gguf.py --outtype q8_0"},
            {"benchmark": "quant", "metric": "int8_decode_vs_llamacpp_q8_0", "value": ours / theirs, "unit": "x",
             "note": f"dsmoe int8 {ours:,.1f} tok/s in the same rounds / llama.cpp Q8_0; target >= 0.8"}]


def run(quick: bool = False, model_dir: str | None = None, data_dir: str | None = None) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        return _run(quick, model_dir, data_dir, tmp)


def _run(quick: bool, model_dir: str | None, data_dir: str | None, tmp: str) -> list[dict]:
    if model_dir is None:  # a random `small` model, with a tokenizer for llama.cpp's converter
        from dsmoe.data.corpus import iter_default_corpus
        from dsmoe.data.tokenizer import train_tokenizer
        args = ModelArgs.from_preset("small").replace(n_mtp_layers=0)
        torch.manual_seed(0)
        tokenizer = train_tokenizer((d.text for d in iter_default_corpus(200_000)), args.vocab_size)
        save_hf(Transformer(args), tmp, tokenizer=tokenizer)
        model_dir = tmp
    models = {"fp32": load_hf(model_dir, dtype="fp32"), "int8": load_hf(model_dir, dtype="fp32", quantize="int8")}
    note = f"{'small (random)' if model_dir == tmp else Path(model_dir).name}, {torch.get_num_threads()} threads"
    rows = [{"benchmark": "quant", "metric": "int8_weight_bytes_ratio",
             "value": weight_bytes(models["int8"]) / weight_bytes(models["fp32"]), "unit": "x fp32",
             "note": f"{weight_bytes(models['int8']) / 2**20:.1f} MiB vs {weight_bytes(models['fp32']) / 2**20:.1f} MiB; target <= 0.3"}]
    if data_dir:
        loss = {k: val_loss(m, data_dir, 2 if quick else 8) for k, m in models.items()}
        rows += [{"benchmark": "quant", "metric": f"{k}_val_loss", "value": v, "unit": "nats/token", "note": note}
                 for k, v in loss.items()]
        rows.append({"benchmark": "quant", "metric": "int8_val_loss_change", "value": 100 * (loss["int8"] / loss["fp32"] - 1),
                     "unit": "%", "note": "target within 1%"})
    engines = {k: Engine(m, max_batch=1) for k, m in models.items()}
    P, N, rounds = (32, 16, 2) if quick else (32, 64, 5)
    prompt = torch.randint(0, models["fp32"].args.vocab_size, (1, P), generator=torch.Generator().manual_seed(0)).tolist()
    jobs = {f"{k}{n}": (lambda e=e, n=n: ours_generate(e, prompt, n), 1) for k, e in engines.items() for n in (1, N)}
    rate = median_rates(jobs, rounds)
    tps = {k: (N - 1) / (1 / rate[f"{k}{N}"] - 1 / rate[f"{k}1"]) for k in engines}
    rows += [{"benchmark": "quant", "metric": f"{k}_decode_tokens_per_s_batch1", "value": v, "unit": "tok/s",
              "note": note} for k, v in tps.items()]
    rows.append({"benchmark": "quant", "metric": "int8_decode_speed_ratio", "value": tps["int8"] / tps["fp32"],
                 "unit": "x fp32", "note": note})
    return rows + llamacpp_q8_rows(model_dir, engines["int8"], prompt, N, rounds)


def main() -> None:
    from bench import format_table

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--model", default=None, help="trained model directory")
    parser.add_argument("--data", default=None, help="its prepared data directory (validation loss)")
    opts = parser.parse_args()
    print(format_table(run(opts.quick, opts.model, opts.data)))


if __name__ == "__main__":
    main()
