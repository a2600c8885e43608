"""`dsmoe demo` (`make demo`): prepare real data, pretrain a DeepSeek-style MoE on it on a
laptop CPU for a few minutes, and show that it learned.

1. `dsmoe prepare` on the embedded corpus (English, French, Spanish, Python code, worked
   arithmetic) into ./out/data, reused when it is already there;
2. train the `small` preset (MLA, 32 fine-grained routed experts + 1 shared, aux-loss-free
   balancing, MTP) into ./out/demo. The step count is fitted to the time budget: a few
   timed steps of a throwaway model measure this machine first, so the learning-rate
   schedule always runs to its end (a safety stop at 1.5x the budget remains);
3. print the validation loss of each domain beside the entropy of that domain's unigram
   token distribution (the best loss a model that ignores context can reach), a short
   generated sample per domain, and the expert load of each MoE layer on validation text.
The demo never asks for anything and starts its run afresh each time (./out/demo is its
own output); it fails only on a broken installation.
Not here: anything tunable. For real runs use `dsmoe prepare` and `dsmoe train`.
"""
from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

import torch

from dsmoe.config import ModelArgs
from dsmoe.train.config import TrainConfig

DATA_DIR, RUN_DIR = Path("out/data"), Path("out/demo")
PRESET = "small"
BUDGET_S = 270.0  # training time on 2 cores, evaluations included
# gamma: the bias must move faster than DeepSeek's 0.001 to matter within a few hundred steps
# WSD: a short run learns more at the peak rate, then gains in the final decay.
SETTINGS = dict(batch_size=8, seq_len=128, lr=3e-3, min_lr_ratio=0.05, warmup_steps=20,
                schedule="wsd", decay_fraction=0.3, gamma=0.01, eval_batches=4, keep_last=1,
                log_interval=10, seed=0)
PROMPTS = {"en": "The history of", "fr": "La ville de", "es": "El río", "code": "def ",
           "math": "Question: What is 12 + 30?\nSolution:\n"}


def demo_config(steps: int, threads: int = 0, budget_s: float = BUDGET_S) -> TrainConfig:
    return TrainConfig(steps=steps, eval_interval=max(10, (steps + 1) // 2), ckpt_interval=steps,
                       max_seconds=1.5 * budget_s, threads=threads, **SETTINGS)


def fit_steps(args: ModelArgs, shards, budget_s: float, probe_steps: int = 2) -> tuple[int, int, float]:
    """(steps, threads, seconds per step) that fit `budget_s` on this machine.

    A throwaway model times a few steps with torch's default threads and with one: on a
    CPU that other work shares, one thread is often faster (no waiting for a descheduled
    partner at every parallel region). Evaluations add about a tenth on top.
    """
    from dsmoe.data.shards import BatchStream
    from dsmoe.device import resolve_device
    from dsmoe.model import Transformer
    from dsmoe.train.balance import Balancer
    from dsmoe.train.optim import build_optimizer
    from dsmoe.train.pretrain import train_step
    default = torch.get_num_threads()
    timings = {}
    for threads in dict.fromkeys((default, 1)):
        torch.set_num_threads(threads)
        cfg = demo_config(1000, threads)
        device = resolve_device(cfg.device)
        model = Transformer(args).to(device).train()
        optimizer = build_optimizer(model, cfg)
        balancer = Balancer(model.moe_layers(), cfg.balance)
        stream = BatchStream(shards, "train", cfg.batch_size, cfg.seq_len, seed=12345)
        train_step(model, optimizer, balancer, stream, cfg, 0, device, RUN_DIR)  # warm-up
        start = time.perf_counter()
        for step in range(1, probe_steps + 1):
            train_step(model, optimizer, balancer, stream, cfg, step, device, RUN_DIR)
        timings[threads] = (time.perf_counter() - start) / probe_steps
    torch.set_num_threads(default)
    threads = min(timings, key=timings.get)
    steps = max(40, min(2000, int(0.9 * budget_s / timings[threads])))
    return steps, threads, timings[threads]


def expert_load_table(model, shards, seq_len: int, n_tokens: int = 4096) -> list[str]:
    """Per MoE layer: MaxVio and the least and most loaded expert (relative to the mean)
    over `n_tokens` validation tokens of every domain."""
    from dsmoe.analysis.report import collect_routing, validation_inputs
    batches = {d: list(validation_inputs(shards, d, 8, seq_len, n_tokens)) for d in shards.domains}
    stats = collect_routing(model, batches)
    lines = [f"{'layer':>5}  {'MaxVio':>7}  {'min load':>8}  {'max load':>8}   (load / mean load, "
             f"{sum(b.numel() for bs in batches.values() for b in bs)} validation tokens)"]
    for layer, load in zip(stats.layers, stats.load_LE):
        rel = load.double() / load.double().mean()
        lines.append(f"{layer:>5}  {float(rel.max()) - 1:>7.3f}  {float(rel.min()):>8.2f}  "
                     f"{float(rel.max()):>8.2f}")
    return lines


def samples(hf_dir: Path, max_tokens: int = 40) -> list[str]:
    """A sampled continuation of one prompt per domain, from the exported model (seeded:
    the same model gives the same text; greedy decoding of so young a model mostly
    repeats its most frequent token)."""
    from dsmoe.infer.generate import load_engine
    from dsmoe.infer.requests import tokenize_prompt
    from dsmoe.infer.sampling import SamplingParams
    engine, tokenizer = load_engine(hf_dir)
    prompts = list(PROMPTS.values())
    requests = engine.generate([tokenize_prompt(tokenizer, p) for p in prompts],
                               SamplingParams(max_tokens=max_tokens, temperature=0.7, top_k=50,
                                              seed=0))
    return [f"[{domain}] {prompt!r} -> {request.text!r}"
            for (domain, prompt), request in zip(PROMPTS.items(), requests)]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--budget", type=float, default=BUDGET_S,
                        help=f"seconds of training (default {BUDGET_S:.0f})")


def run(args: argparse.Namespace) -> int:
    from dsmoe.data.prepare import prepare
    from dsmoe.data.shards import TokenShards, unigram_entropy
    from dsmoe.interop.hf import load_hf
    from dsmoe.train.pretrain import RUN_FILE, train

    began = time.perf_counter()
    print(f"== 1. data: the embedded corpus, tokenised into {DATA_DIR}")
    prepare(DATA_DIR)
    shards = TokenShards(DATA_DIR)
    model_args = ModelArgs.from_preset(PRESET)

    print(f"\n== 2. pretraining the `{PRESET}` preset")
    steps, threads, per_step = fit_steps(model_args, shards, args.budget)
    cfg = demo_config(steps, threads, args.budget)
    print(f"{per_step:.2f} s per step here on {threads} thread(s): {steps} steps of "
          f"{cfg.tokens_per_step} tokens fit a {args.budget:.0f} s budget")
    if (RUN_DIR / RUN_FILE).exists():  # the previous demo's run: the demo starts afresh
        shutil.rmtree(RUN_DIR)
    result = train(model_args, cfg, DATA_DIR, RUN_DIR)

    print(f"\n== 3. what it learned ({result.step} steps, "
          f"{result.step * cfg.tokens_per_step:,} training tokens)")
    print(f"{'domain':<8} {'val loss':>9} {'unigram entropy':>16}   (nats/token)")
    for domain, loss in result.val.items():
        entropy = unigram_entropy(shards, "val", [domain])
        print(f"{domain:<8} {loss:>9.3f} {entropy:>16.3f}   {loss - entropy:+.2f}")
    share = {d: shards.num_tokens("val", d) / shards.num_tokens("val") for d in result.val}
    overall = sum(share[d] * loss for d, loss in result.val.items())
    entropy = unigram_entropy(shards, "val")
    print(f"{'all':<8} {overall:>9.3f} {entropy:>16.3f}   {overall - entropy:+.2f}   (domains "
          f"weighted by their share of the validation text)")

    print("\nSamples (temperature 0.7, top-k 50, seeded):")
    for line in samples(result.hf_dir):
        print("  " + line)

    print("\nExpert load per MoE layer on validation text (aux-loss-free balancing):")
    model = load_hf(result.hf_dir)
    for line in expert_load_table(model, shards, cfg.seq_len):
        print("  " + line)
    print(f"\nDone in {time.perf_counter() - began:.0f} s. Model: {result.hf_dir} "
          f"(try `dsmoe generate --model {result.hf_dir} --prompt 'The'`); "
          f"metrics: {RUN_DIR / 'metrics.jsonl'}")
    return 0
