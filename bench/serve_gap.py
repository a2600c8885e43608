"""Running streams while a long prompt arrives: the worst inter-token gap, whole-prompt
prefill against chunked prefill interleaved with decode steps.

Random weights on the `small` preset (context raised to 4096), fp32, one CPU thread (steadier
on a shared machine), the engine alone (what
the server streams is one event per request per step). Four requests are decoding; a
2,000-token prompt arrives. Measured, per mode, from the moment it arrives until it has its
first token: the worst gap between two consecutive tokens of any running stream, the plain
decode step before it arrived (the gap with nothing arriving), and the long prompt's time
to first token. Before: `chunked_prefill=False` (the whole prompt is prefilled in the step
it is admitted, and every stream waits for it); after: the default (one `prefill_chunk` of
it per step, between decode steps). The two modes run interleaved round by round and each
figure is the median over rounds, so the machine's load hits both alike.

    python bench/serve_gap.py [--quick]       or       python -m bench serve_gap
Target: the worst gap with chunked prefill is a small multiple of a decode step, and at
least 3x below the whole-prompt figure for a 2,000-token prompt.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dsmoe import ModelArgs, Transformer  # noqa: E402
from dsmoe.infer.engine import Engine  # noqa: E402
from dsmoe.infer.sampling import SamplingParams  # noqa: E402

N_STREAMS = 4


def one_round(model, long_prompt: list[int], chunked: bool, chunk: int) -> dict:
    engine = Engine(model, max_batch=N_STREAMS + 1, max_len=len(long_prompt) + 1024, prefill_chunk=chunk,
                    chunked_prefill=chunked)
    g = torch.Generator().manual_seed(1)
    vocab = model.args.vocab_size
    streams = [engine.add_request(torch.randint(0, vocab, (8,), generator=g).tolist(),
                                  SamplingParams(max_tokens=1000)) for _ in range(N_STREAMS)]
    last = {}
    for _ in range(6):  # all streams decoding, warm
        engine.step()
    steps = []
    for _ in range(4):
        start = time.perf_counter()
        engine.step()
        steps.append(time.perf_counter() - start)
    now = time.perf_counter()
    last = {r.id: now for r in streams}
    arrived = time.perf_counter()
    long = engine.add_request(long_prompt, SamplingParams(max_tokens=4))
    worst = 0.0
    while not long.output_ids:
        events = engine.step()
        now = time.perf_counter()
        for ev in events:
            if ev.request.id in last and ev.token_ids:
                worst = max(worst, now - last[ev.request.id])
                last[ev.request.id] = now
    return {"worst_gap": worst, "decode_step": statistics.median(steps),
            "ttft": long.first_token_at - arrived}


def run(quick: bool = False, prompt_len: int = 2000, chunk: int = 256) -> list[dict]:
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    args = ModelArgs.from_preset("small").replace(max_seq_len=4096)
    model = Transformer(args).eval()
    long_prompt = torch.randint(0, args.vocab_size, (prompt_len,)).tolist()
    rounds = 1 if quick else 3
    results = {True: [], False: []}
    with torch.no_grad():
        for _ in range(rounds):
            for chunked in (False, True):
                results[chunked].append(one_round(model, long_prompt, chunked, chunk))
    torch.set_num_threads(threads)

    def med(chunked: bool, key: str) -> float:
        return statistics.median(r[key] for r in results[chunked])

    whole, parts = med(False, "worst_gap"), med(True, "worst_gap")
    note = f"{N_STREAMS} streams, a {prompt_len}-token prompt arrives, small preset, {rounds} round(s)"
    return [
        row("worst_gap_whole_prompt", whole * 1e3, "ms", note + "; chunked_prefill=False"),
        row("worst_gap_chunked", parts * 1e3, "ms", note + f"; prefill_chunk={chunk}"),
        row("worst_gap_ratio", whole / parts, "x", "whole-prompt / chunked (target >= 3)"),
        row("decode_step", med(True, "decode_step") * 1e3, "ms", "one step of the running streams alone"),
        row("ttft_whole_prompt", med(False, "ttft") * 1e3, "ms", "the long prompt's time to first token"),
        row("ttft_chunked", med(True, "ttft") * 1e3, "ms", "the same, chunked (it shares steps with decoding)"),
    ]


def row(metric: str, value: float, unit: str, note: str) -> dict:
    return {"benchmark": "serve_gap", "metric": metric, "value": value, "unit": unit, "note": note}


def main(argv: list[str] | None = None) -> int:
    from bench import format_table

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one round instead of three")
    parser.add_argument("--prompt-len", type=int, default=2000)
    parser.add_argument("--chunk", type=int, default=256, help="prefill_chunk")
    args = parser.parse_args(argv)
    print(format_table(run(quick=args.quick, prompt_len=args.prompt_len, chunk=args.chunk)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
