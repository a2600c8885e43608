"""Continuous batching against a static batch: does the batch-8 decode rate hold while
requests join and leave?

Same engine, same model (random `small` weights, seed 0, as `bench/decode.py`), fp32, one
torch thread unless `--threads` (a shared 2-core machine: thread CPU time is the steady
figure), two workloads run alternately round by round, medians:
- `static`: `bench/decode.py`'s batch-8 job: 8 prompts of 64 tokens together, 64 new
  tokens each (EOS ignored), all joining in one step and leaving in the same one;
- `continuous`: 8 slots over a stream of requests with prompts of 32-96 tokens and
  outputs of 8-120 tokens (seeded; both means as the static job's), arriving one per step
  at first (staggered) and then each as soon as a running one finishes, so a request joins
  (its prompt prefilled in that step, between decode steps) nearly every other step until
  the stream runs dry; the engine then drains.
Figures per workload: decode tokens/s over the decode steps alone (what a step costs with
requests coming and going: batch size, row moves, sampling rebuilt), from the engine's
own counters (`EngineStats`: wall time around each decode step) and in thread CPU time
per step (a step's CPU time split between its prefill and its decode as its wall time
was); the prefill's tokens/s; tokens/s of all its output over the whole run (prefill of the joiners included);
the mean batch of its decode steps, and the decode rate of the steps where every slot
decodes (the steady state, ramp-up and drain left out). Then the ratios continuous / static.

    python bench/continuous_batching.py [--quick] [--threads N] [--max-len 8192]
    python -m bench continuous_batching
Target (issue goal 2): the continuous decode rate within a few percent of the static one.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dsmoe import ModelArgs, Transformer  # noqa: E402, I001  (dsmoe first: its OpenMP settings)
import torch  # noqa: E402
from dsmoe.infer.engine import Engine  # noqa: E402
from dsmoe.infer.sampling import SamplingParams  # noqa: E402

SLOTS = 8
PROMPT, NEW = 64, 64  # the static job's (bench/decode.py, batch 8)


def workload(args: ModelArgs, n_requests: int, seed: int = 0) -> list[tuple[list[int], int]]:
    """(prompt, max_tokens) per request: prompts of 32-96 tokens, outputs of 8-120 tokens."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(PROMPT // 2, PROMPT * 3 // 2 + 1, (n_requests,), generator=g).tolist()
    outputs = torch.randint(NEW // 8, NEW * 15 // 8 + 1, (n_requests,), generator=g).tolist()
    return [(torch.randint(0, args.vocab_size, (n,), generator=g).tolist(), m) for n, m in zip(lengths, outputs)]


class Run:
    """Drives an engine step by step, timing every step, and sums what its steps did."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self.decode_cpu = 0.0  # thread CPU time of the decode steps (their decode part alone)
        self.total_cpu = 0.0
        self.tokens = 0  # every output token, first ones included
        self.full = [0, 0.0]  # decode tokens and their CPU time in steps with every slot decoding
        self.prefill_cpu = 0.0

    def step(self) -> list:
        e = self.engine
        before, tokens_before, prefill_before = e.stats.decode_seconds, e.stats.decode_tokens, e.stats.prefill_seconds
        start_cpu, start_wall = time.thread_time(), time.perf_counter()
        events = e.step()
        cpu, wall = time.thread_time() - start_cpu, time.perf_counter() - start_wall
        # The step's CPU time split as its wall time was: a joiner's prefill, the decode, the rest.
        decode_cpu = cpu * (e.stats.decode_seconds - before) / wall
        self.decode_cpu += decode_cpu
        self.prefill_cpu += cpu * (e.stats.prefill_seconds - prefill_before) / wall
        if e.stats.decode_tokens - tokens_before == SLOTS:
            self.full[0] += SLOTS
            self.full[1] += decode_cpu
        self.total_cpu += cpu
        self.tokens += sum(len(ev.token_ids) for ev in events)
        return events


def run_static(engine: Engine, prompts: list[list[int]]) -> dict:
    run = Run(engine)
    stats0 = _counters(engine)
    for p in prompts:
        engine.add_request(p, SamplingParams(max_tokens=NEW, ignore_eos=True))
    steps_before = engine.stats.decode_steps
    while engine.has_work():
        run.step()
    return _figures(engine, run, stats0, engine.stats.decode_steps - steps_before)


def run_continuous(engine: Engine, requests: list[tuple[list[int], int]]) -> dict:
    run = Run(engine)
    stats0 = _counters(engine)
    queue = list(reversed(requests))
    in_flight, ramped = 0, False
    steps_before = engine.stats.decode_steps
    while queue or engine.has_work():
        # One arrival per step until the slots are full (staggered), then every free slot refilled.
        while queue and in_flight < SLOTS:
            prompt, n = queue.pop()
            engine.add_request(prompt, SamplingParams(max_tokens=n, ignore_eos=True))
            in_flight += 1
            if not ramped:
                ramped = in_flight == SLOTS
                break
        for ev in run.step():
            if ev.finished:
                in_flight -= 1
    return _figures(engine, run, stats0, engine.stats.decode_steps - steps_before)


def _counters(engine: Engine) -> tuple[int, float, int]:
    return engine.stats.decode_tokens, engine.stats.decode_seconds, engine.stats.prefill_tokens


def _figures(engine: Engine, run: Run, stats0: tuple[int, float, int], decode_steps: int) -> dict:
    tokens = engine.stats.decode_tokens - stats0[0]
    return {"prefill_cpu": (engine.stats.prefill_tokens - stats0[2]) / run.prefill_cpu,
            "decode_wall": tokens / (engine.stats.decode_seconds - stats0[1]),
            "decode_cpu": tokens / run.decode_cpu,
            "overall_cpu": run.tokens / run.total_cpu,
            "mean_batch": tokens / decode_steps,
            "full_cpu": run.full[0] / run.full[1] if run.full[1] else float("nan")}


def run(quick: bool = False, threads: int = 1, max_len: int = 512) -> list[dict]:
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        args = ModelArgs.from_preset("small").replace(n_mtp_layers=0, max_seq_len=max_len)
        torch.manual_seed(0)
        model = Transformer(args).eval()
        engine = Engine(model, max_batch=SLOTS, max_len=max_len)
        g = torch.Generator().manual_seed(0)
        static_prompts = torch.randint(0, args.vocab_size, (SLOTS, PROMPT), generator=g).tolist()
        stream = workload(args, 12 if quick else 40)
        jobs = {"static": lambda: run_static(engine, static_prompts),
                "continuous": lambda: run_continuous(engine, stream)}
        for job in jobs.values():  # warm-up
            job()
        results = {name: [] for name in jobs}
        with torch.no_grad():
            for _ in range(1 if quick else 3):
                for name, job in jobs.items():
                    results[name].append(job())
    finally:
        torch.set_num_threads(before)

    def med(name: str, key: str) -> float:
        return statistics.median(r[key] for r in results[name])

    note = (f"small, random weights, fp32, {threads} thread(s), {SLOTS} slots, cache rows of {max_len} "
            f"positions; median of {len(results['static'])}")
    rows = []
    for name, what in (("static", f"{SLOTS} prompts of {PROMPT} tokens together, {NEW} new tokens each"),
                       ("continuous", f"{len(stream)} requests, prompts 32-96, outputs 8-120, joining as others leave")):
        rows += [row(f"{name}_decode_tokens_per_s_cpu", med(name, "decode_cpu"), "tok/s", f"{what}; {note}"),
                 row(f"{name}_decode_tokens_per_s_cpu_full_batch", med(name, "full_cpu"), "tok/s",
                     f"the decode steps with all {SLOTS} slots decoding (joiners prefilled in the same step)"),
                 row(f"{name}_decode_tokens_per_s_wall", med(name, "decode_wall"), "tok/s",
                     "decode steps alone, the engine's own counters"),
                 row(f"{name}_tokens_per_s_overall_cpu", med(name, "overall_cpu"), "tok/s",
                     "every output token over the whole run's CPU time (prefill included)"),
                 row(f"{name}_prefill_tokens_per_s_cpu", med(name, "prefill_cpu"), "tok/s",
                     "prompt tokens over the CPU time of their prefill"),
                 row(f"{name}_mean_decode_batch", med(name, "mean_batch"), "rows", "decode tokens / decode steps")]
    rows += [row("continuous_vs_static_decode_cpu_full_batch",
                 med("continuous", "full_cpu") / med("static", "full_cpu"), "x",
                 "a full batch's decode step with requests coming and going against the static batch's"),
             row("continuous_vs_static_decode_cpu", med("continuous", "decode_cpu") / med("static", "decode_cpu"),
                 "x", "decode rate kept as requests join and leave (target: ~1)"),
             row("continuous_vs_static_decode_wall", med("continuous", "decode_wall") / med("static", "decode_wall"),
                 "x", "the same in wall time"),
             row("continuous_vs_static_overall_cpu", med("continuous", "overall_cpu") / med("static", "overall_cpu"),
                 "x", "output rate with the joiners' prefill, ramp-up and drain")]
    return rows


def row(metric: str, value: float, unit: str, note: str) -> dict:
    return {"benchmark": "continuous_batching", "metric": metric, "value": value, "unit": unit, "note": note}


def main(argv: list[str] | None = None) -> int:
    from bench import format_table
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a shorter stream, one round")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--max-len", type=int, default=512,
                        help="cache positions per row (the engine's default for a real model: 8192)")
    opts = parser.parse_args(argv)
    print(format_table(run(quick=opts.quick, threads=opts.threads, max_len=opts.max_len)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
