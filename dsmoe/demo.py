"""`dsmoe demo` (`make demo`): prepare real data, pretrain a DeepSeek-style MoE on it on a
laptop CPU for a few minutes, and show that it learned.

1. the embedded corpus (English, French, Spanish, Python code as `dsmoe prepare` reads them;
   worked arithmetic at difficulty 1) as JSONL in ./out/demo-corpus, prepared with the `demo`
   preset's vocabulary into ./out/demo-data (reused when unchanged);
2. train the `demo` preset (MLA, 8 routed experts + 1 shared, aux-loss-free balancing,
   MTP on an eighth of the rows) into ./out/demo for a fixed number of steps on two
   threads (the same run on every machine; two quiet cores take about five minutes for the
   whole demo with spinning OpenMP waits, as `make demo` runs it, a busy machine longer;
   the start says how long to expect), with a curriculum: all domains mixed first, then
   mostly math through the final learning-rate decay;
3. show what it learned: the validation loss of each domain beside the entropy of that
   domain's unigram token distribution (the best loss a model that ignores context can
   reach), a sampled continuation per domain and the share of the samples' words that are
   words of their language (found in its corpus; beside it, what real text of that corpus
   scores), greedy exact-answer accuracy on distinct held-out arithmetic problems
   (mathgen's test split, never trained on), how many of the MTP module's drafts
   speculative decoding accepts, the expert load of every MoE layer, a PNG of loss and
   MaxVio over training, and the `dsmoe explore` command for the model.

Why these sizes: two cores buy about two and a half million training tokens in five
minutes, so the model is small (1.8M parameters, dim 96) and fast per token. Its vocabulary
is 4096 tokens, so that common words are one token and the samples are real words (about 90%
known, as real text scores 92-93%; at 2048 more words take two tokens or three and the model
joins real pieces into invented words, 71-82% known); the tokenizer learns its merges from a
tenth of the code (TOKENIZER_SHARES), which keeps code's tokens as short as at 2048 and its
loss well below its unigram entropy. The output head is most of a small model's step: dim 96 at 4096
costs what dim 128 at 2048 did, and learned the arithmetic as fast per step in math-only
runs (docs/training.md). Why a fixed step count and thread count, not a time budget: the same
command gives the same model and figures on a busy machine as on a quiet one; only the wall
time differs.
The demo never asks for anything and starts its run afresh each time (./out/demo is its
own output); it fails only on a broken installation.
Not here: anything tunable. For real runs use `dsmoe prepare` and `dsmoe train`.
"""
from __future__ import annotations

import argparse
import itertools
import json
import shutil
import time
from pathlib import Path

import torch

from dsmoe.config import ModelArgs
from dsmoe.data.corpus import DEFAULT_MAX_CHARS_PER_DOMAIN
from dsmoe.train.config import TrainConfig

OUT = Path("out")
CORPUS_NAME, DATA_NAME, RUN_NAME, PLOT_NAME = "demo-corpus", "demo-data", "demo", "training.png"
PRESET = "demo"
# 2600 steps of 1024 tokens: about 300 s on two quiet cores.
STEPS = 2600
# Two threads on every machine, never what the machine offers: floats round differently over
# another number of threads, and the runs then part after a few dozen steps into another
# model. Its arithmetic is another draw near a threshold (an earlier recipe on one thread
# gave 4% held-out additions where two gave 39%, docs/training.md). A busy machine gives the
# same model, later.
THREADS = 2
# A whole run's steps take about this many times the few timed at the start (quiet box: 0.116
# s a step over the run against 0.09 s timed; evaluations and the export are on top).
STEP_TIME_FACTOR = 1.3
# gamma: the bias must move faster than DeepSeek's 0.001 to matter within a few hundred steps.
# WSD: a short run learns more at the peak rate, then gains in the final decay.
# mtp_fraction: the MTP module (and its pass through the output head) on every row was a
# third of a step; on an eighth of the rows its drafts are still accepted ~85-90% of the
# time, and the steps saved go to the arithmetic.
SETTINGS = dict(batch_size=8, seq_len=128, lr=5e-3, min_lr_ratio=0.05, warmup_steps=30,
                schedule="wsd", decay_fraction=0.3, gamma=0.01, eval_batches=4, keep_last=1,
                log_interval=50, seed=0, mtp_fraction=0.125)
# The curriculum (dsmoe/train/curriculum.py), as fractions of the steps: the first 20% mix
# all domains by their tokens (math is about a quarter), enough for prose and code to pass
# their unigram entropy; then 90% of the rows are math, into the final learning-rate decay
# (the model learns to copy digits out of the question only from many math rows: about
# 1,300-1,600 steps' worth, late in the run; mixed all along, or math first and mixed during
# the decay, addition stayed at 0-4%); the last 15% mix all domains again, so that prose and
# code samples are prose and code.
MATH_FROM, MATH_SHARE, MIXED_AGAIN_FROM = 0.2, 0.9, 0.85
# Low: a young model's probability mass beyond its top few tokens is mostly noise (at 0.7 its
# samples were half made-up words, at 0.3 mostly real ones); 0 repeats the commonest phrase.
SAMPLE_TEMPERATURE = 0.3
SAMPLING = dict(max_tokens=40, temperature=SAMPLE_TEMPERATURE, top_k=50)
# Whether the samples are real words is measured over more than the one shown: SAMPLE_SEEDS
# samples of each of these openings per language (the shown prompt first), about 25 words a
# sample, so a share near 90% is measured to about +-3 points. Several openings, since one
# can lead mostly to names ("The history of" a place), the hardest words for a small model.
WORD_PROMPTS = {"en": ("The history of", "It is a", "In the", "The city"),
                "fr": ("La ville de", "Il est", "Dans la", "Le premier"),
                "es": ("El río", "Es un", "En el", "La ciudad de")}
SAMPLE_SEEDS = 4
# Each prompt ends where a token ends: "def " would end in a lone space token, which code
# never has after `def` (the tokenizer makes " name" one token) and math has before every
# number, so its samples were digits; "    def" (a method, as most stdlib defs are) is code.
PROMPTS = {"en": "The history of", "fr": "La ville de", "es": "El río", "code": "    def",
           "math": "Question: What is 12 + 30?\nSolution:\n"}
LANGUAGE_DOMAINS = ("en", "fr", "es", "code")
MATH_CHARS = 3_000_000
# The tokenizer learns its merges from a tenth of the code documents (`dsmoe prepare
# --tokenizer-share`): code keeps about the token lengths a 2048 vocabulary gives it and the
# languages get the whole words.
TOKENIZER_SHARES = {"code": 0.1}
MATH_KINDS = ("addition", "subtraction", "multiplication", "division")  # simplest first
# The order the demo's math documents cycle through: the simplest kind gets twice the practice.
MATH_CYCLE = ("addition", "subtraction", "addition", "multiplication", "division")
# Held-out problems per kind, difficulty 1: more for the headline kind (each answer is right
# or wrong, so n problems measure a rate p to about +-2*sqrt(p(1-p)/n)).
MATH_PROBLEMS = {"addition": 100, "subtraction": 40, "multiplication": 40, "division": 40}
MATH_MAX_TOKENS = 160  # the longest difficulty-1 worked solution is ~70 tokens; room to ramble


def write_corpus(folder: Path, max_chars_per_domain: int = DEFAULT_MAX_CHARS_PER_DOMAIN,
                 math_chars: int = MATH_CHARS) -> Path:
    """The embedded corpus as one JSONL file per domain, the math domain at difficulty 1.

    The default corpus mixes difficulties 1 to 4 of eight problem kinds; a few minutes show
    a small model a few thousand problems, so the demo's math text is the level and the
    kinds its accuracy is measured on: difficulty 1 of the four arithmetic kinds, in the
    proportions of MATH_CYCLE (mathgen's train split, seed 0, one stream per kind; the
    held-out problems come from its test split).
    """
    from dsmoe.data import mathgen
    from dsmoe.data.corpus import iter_default_corpus
    folder.mkdir(parents=True, exist_ok=True)
    for domain in LANGUAGE_DOMAINS:
        with open(folder / f"{domain}.jsonl", "w", encoding="utf-8") as f:
            for doc in iter_default_corpus(max_chars_per_domain, (domain,)):
                f.write(json.dumps({"text": doc.text, "domain": domain}) + "\n")
    streams = {kind: mathgen.problems("train", seed=0, difficulty=1, kinds=(kind,))
               for kind in MATH_KINDS}
    with open(folder / "math.jsonl", "w", encoding="utf-8") as f:
        written = 0
        for kind in itertools.cycle(MATH_CYCLE):
            if written >= math_chars:
                break
            problem = next(streams[kind])
            text = mathgen.as_document(problem)
            written += len(text)
            f.write(json.dumps({"text": text, "domain": "math"}) + "\n")
    return folder


def demo_config(steps: int = STEPS, evals: int = 4) -> TrainConfig:
    math_from, mixed_from = int(steps * MATH_FROM), int(steps * MIXED_AGAIN_FROM)
    curriculum = [{"from": math_from, "shares": {"math": MATH_SHARE}}]
    if mixed_from > math_from:  # a run of a step or two has room for one phase only
        curriculum.append({"from": mixed_from, "shares": {}})
    return TrainConfig(steps=steps, eval_interval=max(1, steps // evals), ckpt_interval=steps,
                       threads=THREADS, curriculum=curriculum, **SETTINGS)


def step_seconds(args: ModelArgs, shards, probe_steps: int = 3) -> float:
    """Seconds of one training step here, timed on THREADS threads: for the time estimate
    only; nothing depends on it."""
    from dsmoe.data.shards import BatchStream
    from dsmoe.model import Transformer
    from dsmoe.train.balance import Balancer
    from dsmoe.train.optim import build_optimizer
    from dsmoe.train.pretrain import train_step
    before, device = torch.get_num_threads(), torch.device("cpu")
    torch.set_num_threads(THREADS)
    try:
        cfg = demo_config()
        model = Transformer(args).train()
        optimizer = build_optimizer(model, cfg)
        balancer = Balancer(model.moe_layers(), cfg.balance)
        stream = BatchStream(shards, "train", cfg.batch_size, cfg.seq_len, seed=12345)
        train_step(model, optimizer, balancer, stream, cfg, 0, device, Path("."))  # warm-up
        start = time.perf_counter()
        for step in range(1, probe_steps + 1):
            train_step(model, optimizer, balancer, stream, cfg, step, device, Path("."))
        return (time.perf_counter() - start) / probe_steps
    finally:
        torch.set_num_threads(before)


def loss_table(val: dict[str, float], shards) -> list[str]:
    """Validation loss per domain beside its unigram entropy, and the weighted total."""
    from dsmoe.data.shards import unigram_entropy
    lines = [f"{'domain':<8} {'val loss':>9} {'unigram entropy':>16}   (nats/token)"]
    for domain, loss in val.items():
        entropy = unigram_entropy(shards, "val", [domain])
        lines.append(f"{domain:<8} {loss:>9.3f} {entropy:>16.3f}   {loss - entropy:+.2f}")
    share = {d: shards.num_tokens("val", d) / shards.num_tokens("val") for d in val}
    overall = sum(share[d] * loss for d, loss in val.items())
    entropy = unigram_entropy(shards, "val")
    lines.append(f"{'all':<8} {overall:>9.3f} {entropy:>16.3f}   {overall - entropy:+.2f}   "
                 "(domains weighted by their share of the validation text)")
    return lines


def arithmetic_accuracy(engine, tokenizer, problems: dict[str, int]) -> dict[str, tuple[int, int]]:
    """(right, asked) per problem kind: greedy exact answers to held-out difficulty-1
    problems, `problems[kind]` of each kind.

    The prompt is the pretraining format (`Question: ...\\nSolution:\\n`, a base model has no
    chat turns); the answer is read and checked as GRPO's verifier does (`math_reward`).
    """
    from dsmoe.data import mathgen
    from dsmoe.infer.requests import tokenize_prompt
    from dsmoe.infer.sampling import SamplingParams
    from dsmoe.train.math_eval import held_out_problems
    from dsmoe.train.rewards import math_reward
    accuracy = {}
    for kind, n in problems.items():
        asked = held_out_problems(n, difficulty=1, kinds=(kind,))
        requests = engine.generate([tokenize_prompt(tokenizer, mathgen.as_prompt(p)) for p in asked],
                                   SamplingParams(max_tokens=MATH_MAX_TOKENS))
        accuracy[kind] = (sum(math_reward(r.text, p.answer) > 0 for r, p in zip(requests, asked)),
                          len(asked))
    return accuracy


def prompt_outputs(engine, tokenizer, **sampling) -> list[str]:
    """One continuation per domain prompt, in PROMPTS order."""
    from dsmoe.infer.requests import tokenize_prompt
    from dsmoe.infer.sampling import SamplingParams
    requests = engine.generate([tokenize_prompt(tokenizer, p) for p in PROMPTS.values()],
                               SamplingParams(**sampling))
    return [r.text for r in requests]


def known_word_shares(engine, tokenizer, corpus: Path, seeds: int = SAMPLE_SEEDS
                      ) -> dict[str, tuple[tuple[int, int], tuple[int, int]]]:
    """Per language, (known, total) words of the samples and of real text: `seeds` samples
    of each of the language's WORD_PROMPTS (the demo's sampling, seeds 0..seeds-1) against
    the words of that language's corpus file, and every tenth document of that file against
    the other nine tenths (the share real text scores, `held_out_share`)."""
    from dsmoe.analysis.known_words import held_out_share, known_share, known_words
    from dsmoe.infer.requests import tokenize_prompt
    from dsmoe.infer.sampling import SamplingParams
    shares = {}
    for domain, prompts in WORD_PROMPTS.items():
        ids = [tokenize_prompt(tokenizer, prompt) for prompt in prompts for _ in range(seeds)]
        requests = engine.generate(ids, [SamplingParams(seed=seed, **SAMPLING)
                                         for _ in prompts for seed in range(seeds)])
        with open(corpus / f"{domain}.jsonl", encoding="utf-8") as f:
            texts = [json.loads(line)["text"] for line in f]
        shares[domain] = (known_share((r.text for r in requests), known_words(texts)),
                          held_out_share(texts))
    return shares


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


def moe_layer_names(args: ModelArgs) -> list[str]:
    """Labels of the MoE layers in routing order (`Transformer.moe_layers`)."""
    return ([f"layer {i}" for i in range(args.n_dense_layers, args.n_layers)]
            + [f"MTP {k + 1}" for k in range(args.n_mtp_layers)])


def explore_command(model_dir: Path, data_dir: Path, run_dir: Path) -> str:
    return f"dsmoe explore --model {model_dir} --data {data_dir} --run {run_dir}"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--steps", type=int, default=STEPS,
                        help=f"training steps (default {STEPS}: about five minutes of training on "
                             "two quiet cores with OMP_WAIT_POLICY=ACTIVE, as `make demo` runs it)")


def run(args: argparse.Namespace) -> int:
    return demo(steps=args.steps)


def demo(steps: int = STEPS, out: Path = OUT, preset: str = PRESET,
         max_chars_per_domain: int = DEFAULT_MAX_CHARS_PER_DOMAIN, math_chars: int = MATH_CHARS,
         math_problems: dict[str, int] | int = MATH_PROBLEMS) -> int:
    """The whole demo; the keyword arguments exist so a test can run it small (an int
    `math_problems` asks that many of every kind)."""
    from dsmoe.analysis.plots import plot_training
    from dsmoe.data.prepare import prepare
    from dsmoe.data.shards import TokenShards, unigram_entropy
    from dsmoe.infer.engine import Engine
    from dsmoe.interop.hf import load_model_dir
    from dsmoe.train.pretrain import train
    from dsmoe.train.run_dir import RUN_FILE, read_metrics

    began = time.perf_counter()
    if isinstance(math_problems, int):
        math_problems = dict.fromkeys(MATH_KINDS, math_problems)
    data_dir, run_dir = Path(out) / DATA_NAME, Path(out) / RUN_NAME
    model_args = ModelArgs.from_preset(preset)
    print(f"== 1. data: the embedded corpus (math at difficulty 1), tokenised into {data_dir}")
    corpus = write_corpus(Path(out) / CORPUS_NAME, max_chars_per_domain, math_chars)
    prepare(data_dir, [corpus], vocab_size=model_args.vocab_size, tokenizer_shares=TOKENIZER_SHARES)
    shards = TokenShards(data_dir)

    print(f"\n== 2. pretraining the `{preset}` preset")
    per_step = step_seconds(model_args, shards)
    cfg = demo_config(steps)
    mix = "; ".join(f"from step {p['from']}: " + (", ".join(f"{v:.0%} {d}" for d, v in p["shares"].items())
                                                   or "by tokens") for p in cfg.curriculum)
    print(f"{steps} steps of {cfg.tokens_per_step} tokens (rows from every domain by its tokens; "
          f"{mix}); {per_step:.2f} s per step here on {THREADS} threads, so about "
          f"{steps * per_step * STEP_TIME_FACTOR / 60:.0f} min of training")
    if (run_dir / RUN_FILE).exists():  # the previous demo's run: the demo starts afresh
        shutil.rmtree(run_dir)
    trained = time.perf_counter()
    result = train(model_args, cfg, data_dir, run_dir)
    trained = time.perf_counter() - trained

    print(f"\n== 3. what it learned ({result.step} steps, "
          f"{result.step * cfg.tokens_per_step:,} training tokens, {trained:.0f} s)")
    for line in loss_table(result.val, shards):
        print(line)

    model, tokenizer = load_model_dir(result.hf_dir)
    with torch.inference_mode():
        plain = Engine(model, tokenizer, max_batch=max(math_problems.values()))
        texts = prompt_outputs(plain, tokenizer, seed=0, **SAMPLING)
        print(f"\nSamples (temperature {SAMPLE_TEMPERATURE}, top-k {SAMPLING['top_k']}, seeded):")
        for (domain, prompt), text in zip(PROMPTS.items(), texts):
            print(f"  [{domain}] {prompt!r} -> {text!r}")
        shares = known_word_shares(plain, tokenizer, corpus)
        samples = ", ".join(f"{d} {known / max(1, total):.0%} ({known}/{total})"
                            for d, ((known, total), _) in shares.items())
        real = ", ".join(f"{d} {known / max(1, total):.0%}" for d, (_, (known, total)) in shares.items())
        openings = len(WORD_PROMPTS["en"])
        print(f"Words of {SAMPLE_SEEDS * openings} such samples per language ({openings} openings) "
              f"found in its corpus (seen at least twice there): {samples}; real text scores "
              f"{real} (a tenth of the corpus against the rest)")

        # Greedy speculative decoding gives exactly plain greedy's text (tests/infer), so one
        # pass measures both the answers and how often the MTP module's drafts are accepted.
        spec = Engine(model, tokenizer, max_batch=max(math_problems.values()), speculative=True)
        accuracy = arithmetic_accuracy(spec, tokenizer, math_problems)
        math_drafts = (spec.stats.accepted, spec.stats.drafted)
        prompt_outputs(spec, tokenizer, max_tokens=48, ignore_eos=True)
    print("\nHeld-out arithmetic (mathgen's test split, difficulty 1), greedy exact answer:")
    print("  " + ", ".join(f"{kind} {right / asked:.0%} ({right}/{asked})"
                           for kind, (right, asked) in accuracy.items()))
    text_drafts = (spec.stats.accepted - math_drafts[0], spec.stats.drafted - math_drafts[1])
    print("\nSpeculative decoding with the MTP module (greedy): drafts accepted "
          f"{spec.stats.acceptance:.0%} ({spec.stats.accepted}/{spec.stats.drafted}); "
          f"math answers {math_drafts[0] / max(1, math_drafts[1]):.0%}, "
          f"domain prompts {text_drafts[0] / max(1, text_drafts[1]):.0%}")

    print("\nExpert load per MoE layer on validation text (aux-loss-free balancing):")
    for line in expert_load_table(model, shards, cfg.seq_len):
        print("  " + line)
    plot = run_dir / PLOT_NAME
    plot_training(read_metrics(run_dir), plot,
                  entropy={d: unigram_entropy(shards, "val", [d]) for d in shards.domains},
                  layer_names=moe_layer_names(model_args))
    print(f"\nLoss and MaxVio over training: {plot}")
    print(f"Done in {time.perf_counter() - began:.0f} s. Model: {result.hf_dir}; metrics: "
          f"{run_dir / 'metrics.jsonl'}. See inside it:\n  {explore_command(result.hf_dir, data_dir, run_dir)}")
    return 0
