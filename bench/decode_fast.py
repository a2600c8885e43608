"""Decode speed on a CPU, measured so that a loaded machine does not decide the result.

On a shared CPU wall time mostly measures waiting for a core, so the primary figures are
the **thread CPU time** (`time.thread_time`) of a single-threaded torch (all work runs on
the calling thread), medians over rounds interleaved between the compared sides; wall-time
figures are given as ratios measured side by side in the same rounds.

Rows (`small` preset, random weights, seed 0, fp32, no MTP unless --model):
- `step`: one decode step (`forward.decode_step`, prompt of 64 tokens, the step rewound
  after each call so every call does the same work) at batch 1, 2 and 8, with the few-row
  CPU paths (`dsmoe/model/fastpath.py`) on the native kernels (`fast`), on torch's kernels
  (`fast-torch`) and without them (the ordinary paths, the `reference`), and compiled when
  `--compile` (inductor; compile time reported apart);
- `engine`: tokens/s of `Engine.generate` at batch 1 and 8 ((time for N tokens - time for
  1) / (N - 1) steps, as bench/decode.py measures), thread CPU time and wall time;
- `threads`: wall time of a batch-1 step with 1 and with 2 torch threads (the decode
  thread-count default, `dsmoe/infer/decoding.py`);
- `spec-cost`: a speculative step's cost against a plain one at depths 1-3 (random
  weights), hence the tokens per step a speedup needs;
- `speculative` (with `--model DIR`, a trained model with an MTP layer): plain against MTP
  speculative decoding at depths 1-3 and auto, batch 1, greedy, one prompt per domain:
  tokens/s (thread CPU time), acceptance, tokens per step, identical output.

    python bench/decode_fast.py [--only step,engine,threads,speculative] [--model DIR] [--compile]
Also runs against another checkout of dsmoe for a before/after comparison of `step`:
`PYTHONPATH=/other/checkout python bench/decode_fast.py --only step --no-fast`.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time
from pathlib import Path

import torch

if __package__ in (None, "") and "PYTHONPATH" not in os.environ:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dsmoe import ModelArgs, Transformer  # noqa: E402
from dsmoe.infer.cache import LatentCache  # noqa: E402
from dsmoe.infer.engine import Engine  # noqa: E402
from dsmoe.infer.forward import decode_step, prefill  # noqa: E402
from dsmoe.infer.sampling import SamplingParams  # noqa: E402

try:  # absent in checkouts before the few-row paths (a before/after run)
    from dsmoe.model import fastpath
except ImportError:
    fastpath = None
try:  # absent in checkouts before the native kernels
    from dsmoe import kernels
except ImportError:
    kernels = None


def clock(kind: str):
    return time.thread_time if kind == "cpu" else time.perf_counter


def median_times(jobs: dict, rounds: int, kind: str) -> dict[str, float]:
    """jobs: name -> callable; median seconds per call over interleaved rounds."""
    tick = clock(kind)
    out = {name: [] for name in jobs}
    for _ in range(rounds):
        for name, fn in jobs.items():
            t = tick()
            fn()
            out[name].append(tick() - t)
    return {name: statistics.median(v) for name, v in out.items()}


def reference_paths():
    return fastpath.disabled() if fastpath is not None else contextlib.nullcontext()


def small_model(mtp: int = 0) -> Transformer:
    torch.manual_seed(0)
    model = Transformer(ModelArgs.from_preset("small").replace(n_mtp_layers=mtp)).eval()
    try:  # weights in 2 MB pages, as the engine holds them (absent in older checkouts)
        from dsmoe.model.hugepages import pack_weights
        pack_weights(model)
    except ImportError:
        pass
    return model


@torch.no_grad()
def step_rows(model, batches=(1, 2, 8), steps: int = 20, rounds: int = 7, compile_step: bool = False,
              with_reference: bool = True) -> list[str]:
    args, rows = model.args, []
    g = torch.Generator().manual_seed(0)
    for B in batches:
        cache = LatentCache(args, B, 256, n_layers=args.n_layers)
        prompts = torch.randint(0, args.vocab_size, (B, 64), generator=g).tolist()
        prefill(model, prompts, cache, range(B), chunk=256)
        tokens = torch.randint(0, args.vocab_size, (B, 1), generator=g)

        def run(fn, context):
            def go():
                with context():
                    for _ in range(steps):
                        fn(model, tokens, cache)
                        cache.rewind(1)
            return go

        jobs = {"fast": run(decode_step, contextlib.nullcontext)}
        if with_reference and kernels is not None and kernels.available():
            jobs["fast-torch"] = run(decode_step, kernels.disabled)  # few-row paths, torch's kernels
        if with_reference:
            jobs["reference"] = run(decode_step, reference_paths)
        if compile_step:
            compiled = torch.compile(decode_step, dynamic=True)
            t = time.perf_counter()
            run(compiled, contextlib.nullcontext)()
            rows.append(f"step B={B} compile: {time.perf_counter() - t:.1f} s wall (first call)")
            jobs["compiled"] = run(compiled, contextlib.nullcontext)
        cpu = median_times(jobs, rounds, "cpu")
        wall = median_times(jobs, rounds, "wall")
        for name in jobs:
            rows.append(f"step B={B} {name:<10} {1e3 * cpu[name] / steps:8.2f} ms cpu/step "
                        f"{B * steps / cpu[name]:8.1f} tok/s(cpu)  wall {1e3 * wall[name] / steps:8.2f} ms/step")
        if with_reference:
            rows.append(f"step B={B} fast vs reference: {cpu['reference'] / cpu['fast']:.2f}x cpu, "
                        f"{wall['reference'] / wall['fast']:.2f}x wall")
    return rows


def engine_rows(model, batches=(1, 8), P: int = 64, N: int = 64, rounds: int = 3) -> list[str]:
    engine = Engine(model, max_batch=8, max_len=256)
    g = torch.Generator().manual_seed(1)
    rows = []
    for B in batches:
        prompts = torch.randint(0, model.args.vocab_size, (B, P), generator=g).tolist()
        jobs = {n: (lambda n=n: engine.generate(prompts, SamplingParams(max_tokens=n, ignore_eos=True)))
                for n in (1, N)}
        jobs[1]()  # warm-up
        for kind in ("cpu", "wall"):
            t = median_times(jobs, rounds, kind)
            rows.append(f"engine B={B} {B * (N - 1) / (t[N] - t[1]):8.1f} tok/s ({kind}), "
                        f"prefill {B * P / t[1]:8.1f} tok/s ({kind})")
    return rows


@torch.no_grad()
def thread_rows(model, steps: int = 20, rounds: int = 5) -> list[str]:
    args = model.args
    cache = LatentCache(args, 1, 256, n_layers=args.n_layers)
    prefill(model, [list(range(64))], cache, range(1), chunk=256)
    tokens = torch.tensor([[5]])
    rows, before = [], torch.get_num_threads()
    for n in (1, 2):
        torch.set_num_threads(n)
        times = []
        for _ in range(rounds):
            t = time.perf_counter()
            for _ in range(steps):
                decode_step(model, tokens, cache)
                cache.rewind(1)
            times.append(time.perf_counter() - t)
        rows.append(f"threads={n}: {1e3 * statistics.median(times) / steps:8.2f} ms/step wall (batch 1)")
    torch.set_num_threads(before)
    return rows


def speculative_rows(model_dir: str, N: int = 96, rounds: int = 3, depths=(1, 2, 3, "auto")) -> list[str]:
    """Plain against MTP speculative decoding at each depth, batch 1, greedy, over one prompt
    per domain (bench/decode.py's): tokens/s in thread CPU time, acceptance, tokens per step."""
    from bench.decode import speculative_engines
    from dsmoe.interop.hf import load_model_dir
    model, tok = load_model_dir(model_dir)
    engines, run_all, same, prompts, N = speculative_engines(model, tok, depths, N)
    t = median_times({name: lambda e=e: run_all(e) for name, e in engines.items()}, rounds, "cpu")
    total = N * len(prompts)
    rows = [f"speculative: plain {total / t['plain']:.1f} tok/s (cpu), {len(prompts)} prompts x {N} tokens"]
    for d in depths:
        st = engines[d].stats
        rows.append(f"speculative depth {d}: {total / t[d]:.1f} tok/s (cpu), {t['plain'] / t[d]:.2f}x plain; "
                    f"acceptance {100 * st.acceptance:.1f}% ({st.accepted}/{st.drafted}), "
                    f"{st.decode_tokens / max(st.decode_steps, 1):.2f} tokens per step; same output: {same[d]}")
    return rows


def spec_cost_rows(N: int = 48, rounds: int = 3, depths=(1, 2, 3)) -> list[str]:
    """What a speculative step costs against a plain one (random `small` weights with an MTP
    layer, batch 1, thread CPU time), per depth k: with tokens per step E, speculation's
    speedup is E x plain step / speculative step. Random weights accept almost nothing, so
    every step runs the full chain and verify pass, the cost that matters."""
    model = small_model(mtp=1)
    prompt = list(range(1, 33))
    engines = {"plain": Engine(model, max_batch=1, max_len=128)}
    engines.update({k: Engine(model, max_batch=1, max_len=128, speculative=k) for k in depths})
    jobs = {n: {name: lambda e=e, n=n: e.generate([prompt], SamplingParams(max_tokens=n, ignore_eos=True))
                for name, e in engines.items()} for n in (1, N)}
    for e in engines.values():
        e.stats.__init__()
    t1, tn = median_times(jobs[1], rounds, "cpu"), median_times(jobs[N], rounds, "cpu")

    def step(name):
        st = engines[name].stats
        per_step = st.decode_tokens / max(st.decode_steps, 1) if name != "plain" else 1.0
        return (tn[name] - t1[name]) / ((N - 1) / per_step)

    plain = step("plain")
    rows = [f"spec cost: plain step {1e3 * plain:.2f} ms (cpu, random weights)"]
    for k in depths:
        cost = step(k) / plain
        rows.append(f"spec cost depth {k}: {1e3 * step(k):.2f} ms = {cost:.2f}x a plain step; "
                    f"1.5x needs {1.5 * cost:.2f} tokens per step (at most {k + 1})")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="step,engine,threads", help="comma-separated parts")
    parser.add_argument("--model", default=None, help="trained model with an MTP layer (speculative part)")
    parser.add_argument("--compile", action="store_true", help="also time a torch.compile'd step")
    parser.add_argument("--no-fast", action="store_true", help="step: one side only (a before/after run)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: see the note)")
    opts = parser.parse_args()
    torch.set_num_threads(opts.threads)
    parts = opts.only.split(",")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), load {os.getloadavg()[0]:.1f}")
    rows = []
    if "step" in parts:
        rows += step_rows(small_model(), compile_step=opts.compile, with_reference=not opts.no_fast
                          and fastpath is not None)
    if "engine" in parts:
        rows += engine_rows(small_model())
    if "threads" in parts:
        rows += thread_rows(small_model())
    if "spec-cost" in parts:
        rows += spec_cost_rows()
    if "speculative" in parts:
        rows += speculative_rows(opts.model) if opts.model else ["speculative: pass --model DIR"]
    for row in rows:
        print(row, flush=True)


if __name__ == "__main__":
    main()
