"""Inference speed: the dsmoe engine against transformers' `generate`, and MTP speculation.

Part 1, side by side on the same weights (ours written with `dsmoe.save_hf`, read back by
`DeepseekV3ForCausalLM.from_pretrained`, fp32, experts `grouped_mm`, SDPA), random
weights on the `small` preset:
- decode tokens/s at batch 1 and 8: greedy, fixed prompt and output lengths (EOS ignored),
  measured as (time for N new tokens - time for 1) / (N - 1) steps, so prefill is excluded
  the same way on both sides;
- prefill tokens/s: one long prompt, time to the first token;
- the greedy continuations are compared token by token (same weights, same function).
Part 2, MTP self-speculative decoding against plain decoding in our engine, on a trained
model (random MTP weights draft nothing useful): tokens/s of plain decoding and of
speculation with 1 and 2 drafts per step and the depth chosen from measured acceptance
(`--speculative auto`), the speedups, acceptance and tokens per step, greedy over one
prompt per domain; and llama.cpp's batch-1 decode of the same weights in the same rounds.
The model comes from `--model DIR`, `$DSMOE_BENCH_MODEL`, or the newest
`out/demo/**/config.json` with an MTP layer (what `make demo` trains; `runs/mtp_speed.sh`
trains a `small` one); without one the rows say so.

Part 3, llama.cpp on the same weights, when a build is present (`python -m bench.llamacpp
build`; without one its rows say so): our seed-0 `small` model exported to HF and converted
by llama.cpp's own converter (f32), same thread count; batch-1 decode after a prompt-long
context and prefill by llama-bench, batch 8 by llama-batched-bench (`bench/llamacpp.py`).
Part 4, the memory roofline of batch-1 decode: a bandwidth probe in the same run (an fp32
matrix-vector product over 256 MB), the bytes a step reads (`activated_bytes_per_token`)
and the fraction of probe bandwidth x tokens/s that each engine reaches.

Runs of the compared sides are interleaved round by round (the CPU is shared with other
processes) and each figure is the median over rounds.

    python bench/decode.py [--quick] [--model DIR]      or     python -m bench decode
    python bench/decode.py --prefill-only                   (the prefill rows alone)
Targets: >= 4x transformers at batch 1 and at batch 8; batch 1 and batch 8 >= 0.8x
llama.cpp; speculative >= 1.5x plain decoding with >= 75% acceptance, and >= 1.2x llama.cpp.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# dsmoe before torch, as every `dsmoe` command imports them: its OMP_WAIT_POLICY=PASSIVE
# (sleeping OpenMP waits) applies to both engines in this process. With torch's default
# (spinning waits) on a shared 2-core machine, every parallel region waits for a
# descheduled partner, and two-thread figures measure the other jobs more than the engines.
from dsmoe import ModelArgs, Transformer, save_hf  # noqa: E402, I001
import torch  # noqa: E402
from dsmoe.infer.engine import Engine  # noqa: E402
from dsmoe.infer.requests import tokenize_prompt  # noqa: E402
from dsmoe.infer.sampling import SamplingParams  # noqa: E402

PRESET = "small"
ROOT = Path(__file__).resolve().parents[1]
SPEC_PROMPTS = ("The history of the city begins", "La ville de", "El río", "def main(",
                "Question: What is 48 + 35?\nSolution:\n")


def build_pair(args: ModelArgs, folder: Path):
    from transformers import DeepseekV3ForCausalLM
    torch.manual_seed(0)
    ours = Transformer(args).eval()
    save_hf(ours, folder)
    theirs = DeepseekV3ForCausalLM.from_pretrained(
        folder, dtype=torch.float32, experts_implementation="grouped_mm", attn_implementation="sdpa").eval()
    return ours, theirs


def ours_generate(engine: Engine, prompts: list[list[int]], n: int) -> list[list[int]]:
    reqs = engine.generate(prompts, SamplingParams(max_tokens=n, ignore_eos=True))
    return [r.output_ids for r in reqs]


@torch.no_grad()
def theirs_generate(model, prompts: list[list[int]], n: int) -> list[list[int]]:
    ids = torch.tensor(prompts)  # equal lengths: no padding needed
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                         do_sample=False, pad_token_id=0)
    return out[:, ids.shape[1]:].tolist()


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def median_rates(jobs: dict, rounds: int) -> dict[str, float]:
    """jobs: name -> (fn, work units); the median over interleaved rounds of units / seconds."""
    times = {name: [] for name in jobs}
    for _ in range(rounds):
        for name, (fn, _) in jobs.items():
            times[name].append(timed(fn))
    return {name: units / statistics.median(times[name]) for name, (_, units) in jobs.items()}


def sizes(quick: bool) -> tuple[int, int, int]:
    """Decode prompt length, new tokens per request, prefill prompt length."""
    return (32, 16, 128) if quick else (64, 64, 448)


def decode_rows(quick: bool, batches: tuple[int, ...] = (1, 8)) -> list[dict]:
    """Decode rows at each batch size in `batches` (none: the prefill rows alone), then prefill."""
    args = ModelArgs.from_preset(PRESET).replace(n_mtp_layers=0)
    P, N, P_long = sizes(quick)
    rounds = 2 if quick else 5
    with tempfile.TemporaryDirectory() as tmp:
        ours, theirs = build_pair(args, Path(tmp))
    engine = Engine(ours, max_batch=8)
    g = torch.Generator().manual_seed(0)
    rows = []
    for B in batches:
        prompts = torch.randint(0, args.vocab_size, (B, P), generator=g).tolist()
        ref_ours, ref_theirs = ours_generate(engine, prompts, N), theirs_generate(theirs, prompts, N)
        jobs = {}
        for n in (1, N):  # decode time = time(N) - time(1); one warm-up call each
            jobs[f"ours{n}"] = (lambda n=n: ours_generate(engine, prompts, n), 1)
            jobs[f"theirs{n}"] = (lambda n=n: theirs_generate(theirs, prompts, n), 1)
        rate = median_rates(jobs, rounds)
        steps = B * (N - 1)
        ours_tps = steps / (1 / rate[f"ours{N}"] - 1 / rate["ours1"])
        theirs_tps = steps / (1 / rate[f"theirs{N}"] - 1 / rate["theirs1"])
        same = sum(a == b for x, y in zip(ref_ours, ref_theirs) for a, b in zip(x, y)) / (B * N)
        note = f"{PRESET}, prompt {P}, {N} new tokens, greedy, fp32, {torch.get_num_threads()} threads"
        rows += [
            {"benchmark": "decode", "metric": f"dsmoe_decode_tokens_per_s_batch{B}", "value": ours_tps,
             "unit": "tok/s", "note": note},
            {"benchmark": "decode", "metric": f"transformers_decode_tokens_per_s_batch{B}", "value": theirs_tps,
             "unit": "tok/s", "note": "DeepseekV3ForCausalLM.generate, experts grouped_mm, sdpa"},
            {"benchmark": "decode", "metric": f"decode_speedup_batch{B}", "value": ours_tps / theirs_tps,
             "unit": "x", "note": "target >= 4"},
            {"benchmark": "decode", "metric": f"greedy_tokens_identical_batch{B}", "value": 100 * same,
             "unit": "%", "note": "same weights: our greedy tokens equal to transformers'"},
        ]
    prompt = torch.randint(0, args.vocab_size, (1, P_long), generator=g).tolist()
    rate = median_rates({"ours": (lambda: ours_generate(engine, prompt, 1), P_long),
                         "theirs": (lambda: theirs_generate(theirs, prompt, 1), P_long)}, rounds + 1)
    rows += [
        {"benchmark": "decode", "metric": "dsmoe_prefill_tokens_per_s", "value": rate["ours"], "unit": "tok/s",
         "note": f"one prompt of {P_long} tokens, time to first token"},
        {"benchmark": "decode", "metric": "transformers_prefill_tokens_per_s", "value": rate["theirs"],
         "unit": "tok/s", "note": "same prompt"},
        {"benchmark": "decode", "metric": "prefill_speedup", "value": rate["ours"] / rate["theirs"], "unit": "x",
         "note": ""},
    ]
    return rows


def find_trained_model(given: str | None) -> Path | None:
    if given or os.environ.get("DSMOE_BENCH_MODEL"):
        return Path(given or os.environ["DSMOE_BENCH_MODEL"])
    found = []
    for config in (ROOT / "out" / "demo").glob("**/config.json"):
        try:
            cfg = json.loads(config.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if cfg.get("num_nextn_predict_layers", 0) >= 1 and (config.parent / "tokenizer.json").is_file():
            found.append(config.parent)
    return max(found, key=lambda p: p.stat().st_mtime) if found else None


SPEC_DEPTHS = (1, 2, "auto")


def speculative_rows(quick: bool, model_dir: str | None) -> list[dict]:
    """Plain against speculative decoding (depths 1, 2 and auto) on a trained model, batch 1,
    greedy, over one prompt per domain in turn; and llama.cpp on the same weights (its
    batch-1 decode, which has no MTP), in the same rounds."""
    path = find_trained_model(model_dir)
    if path is None:
        return [{"benchmark": "decode", "metric": metric, "value": float("nan"), "unit": unit,
                 "note": "pending: no trained model with an MTP layer (run `make demo`, or pass --model DIR)"}
                for metric, unit in (("speculative_speedup", "x"), ("speculative_acceptance", "%"))]
    from dsmoe.interop.hf import load_model_dir
    model, tokenizer = load_model_dir(path)
    N = 48 if quick else 96
    rounds = 2 if quick else 5
    engines, run_all, same, prompts, N = speculative_engines(model, tokenizer, SPEC_DEPTHS, N)
    gguf, llama_note = _llamacpp_model(path)
    times = {name: [] for name in engines}
    llama_rates = []
    for _ in range(rounds):  # interleaved, medians over rounds
        for name, e in engines.items():
            times[name].append(timed(lambda e=e: run_all(e)))
        if gguf is not None:
            from bench import llamacpp
            llama_rates.append(llamacpp.bench_decode(gguf, torch.get_num_threads(), max(map(len, prompts)), N))
    rate = {name: N * len(prompts) / statistics.median(t) for name, t in times.items()}
    if llama_rates:
        rate["llama.cpp"] = statistics.median(llama_rates)
    shown = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
    rows = [{"benchmark": "decode", "metric": "plain_tokens_per_s", "value": rate["plain"], "unit": "tok/s",
             "note": f"{shown}, batch 1, {N} greedy tokens after each of {len(prompts)} prompts"}]
    for d in SPEC_DEPTHS:
        s = engines[d].stats
        rows += [
            {"benchmark": "decode", "metric": f"speculative_speedup_depth_{d}", "value": rate[d] / rate["plain"],
             "unit": "x", "note": f"{rate[d]:,.1f} tok/s; {s.decode_tokens / max(s.decode_steps, 1):.2f} tokens per "
                                 f"step; output identical to plain: {same[d]}; target >= 1.5"},
            {"benchmark": "decode", "metric": f"speculative_acceptance_depth_{d}", "value": 100 * s.acceptance,
             "unit": "%", "note": f"{s.accepted}/{s.drafted} drafts; target >= 75"},
        ]
    best = max(SPEC_DEPTHS, key=lambda d: rate[d])
    if gguf is not None:
        rows.append({"benchmark": "decode", "metric": "speculative_vs_llamacpp_batch1",
                     "value": rate[best] / rate["llama.cpp"], "unit": "x",
                     "note": f"depth {best} against llama.cpp's batch-1 decode of the same weights "
                             f"({rate['llama.cpp']:,.1f} tok/s, llama-bench, {llama_note}); target >= 1.2"})
    else:
        rows.append({"benchmark": "decode", "metric": "speculative_vs_llamacpp_batch1", "value": float("nan"),
                     "unit": "x", "note": llama_note})
    return rows


def speculative_engines(model, tokenizer, depths, N: int):
    """Engines for plain decoding ("plain") and speculation at each depth, batch 1; a function
    that runs greedy N tokens after each of SPEC_PROMPTS on one and returns the outputs;
    whether each engine's outputs equal plain decoding's (stats then reset); the prompts;
    N, cut to fit the model's context."""
    prompts = [tokenize_prompt(tokenizer, text) for text in SPEC_PROMPTS]
    N = min(N, model.args.max_seq_len - max(map(len, prompts)) - 1)
    max_len = max(map(len, prompts)) + N + 1
    engines = {"plain": Engine(model, tokenizer, max_batch=1, max_len=max_len)}
    engines.update({d: Engine(model, tokenizer, max_batch=1, max_len=max_len, speculative=d) for d in depths})
    params = SamplingParams(max_tokens=N, ignore_eos=True)

    def run_all(engine):
        return [engine.generate([p], params)[0].output_ids for p in prompts]

    reference = run_all(engines["plain"])
    same = {name: run_all(e) == reference for name, e in engines.items()}
    for e in engines.values():
        e.stats.__init__()
    return engines, run_all, same, prompts, N


def _llamacpp_model(hf_dir: Path) -> tuple[Path | None, str]:
    """The trained model converted to llama.cpp's f32 GGUF (kept beside it), or why not."""
    from bench import llamacpp
    if not llamacpp.available():
        return None, f"llama.cpp not built in {llamacpp.home()}: {llamacpp.HOW_TO_BUILD}"
    # named by the folder (a stable digest: Python's hash() differs per process), so later runs reuse it
    key = hashlib.sha256(str(hf_dir.resolve()).encode()).hexdigest()[:16]
    gguf = Path(tempfile.gettempdir()) / f"dsmoe-bench-{key}.gguf"
    weights = hf_dir / "model.safetensors"
    if not gguf.is_file() or (weights.is_file() and weights.stat().st_mtime > gguf.stat().st_mtime):
        try:
            llamacpp.convert(hf_dir, gguf)
        except Exception as err:  # noqa: BLE001 - the row says why; the other figures stand
            return None, f"llama.cpp could not convert {hf_dir}: {err}"
    return gguf, "f32 GGUF by convert_hf_to_gguf.py"


# ---------------------------------------------------------------- llama.cpp, roofline
def row_value(rows: list[dict], metric: str) -> float:
    return next((r["value"] for r in rows if r["metric"] == metric), float("nan"))


def seeded_engine(args: ModelArgs) -> tuple[Transformer, Engine]:
    """The model of `build_pair` (seed 0) and an engine over it."""
    torch.manual_seed(0)
    model = Transformer(args).eval()
    return model, Engine(model, max_batch=8)


def decode_cpu_per_token(engine: Engine, prompts: list[list[int]], n: int) -> float:
    """CPU seconds per decoded token of one round: of the calling thread when torch runs one
    thread (all the decoding work is on it; a process-wide count would also charge idle
    library pools, e.g. the tokenizer trainer's, which were seen adding ~10%), of the whole
    process otherwise."""
    clock = time.thread_time if torch.get_num_threads() == 1 else time.process_time
    spent = []
    for k in (n, 1):
        start = clock()
        ours_generate(engine, prompts, k)
        spent.append(clock() - start)
    return (spent[0] - spent[1]) / (len(prompts) * (n - 1))


def decode_rate(engine: Engine, prompts: list[list[int]], n: int) -> float:
    """Decode tokens/s of one round: B (n - 1) / (time for n new tokens - time for 1)."""
    t1 = timed(lambda: ours_generate(engine, prompts, 1))
    tn = timed(lambda: ours_generate(engine, prompts, n))
    return len(prompts) * (n - 1) / (tn - t1)


def prefill_rate(engine: Engine, prompt: list[int]) -> float:
    return len(prompt) / timed(lambda: ours_generate(engine, [prompt], 1))


def random_prompts(args: ModelArgs, batch: int, length: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, args.vocab_size, (batch, length), generator=g).tolist()


def llamacpp_rows(quick: bool) -> list[dict]:
    """llama.cpp on the same weights (the seed-0 `small` model of `decode_rows`, exported to
    HF with a tokenizer, converted by llama.cpp's converter to f32 GGUF), same thread count:
    batch-1 decode and prefill by llama-bench, batch-8 decode by llama-batched-bench. Our
    engine runs the same measurement in the same rounds, alternating with llama.cpp, and
    the ratios are taken between those paired medians (the CPU is shared)."""
    from bench import llamacpp
    P, N, P_long = sizes(quick)
    metrics = ("llamacpp_decode_tokens_per_s_batch1", "llamacpp_decode_tokens_per_s_batch8",
               "llamacpp_prefill_tokens_per_s", "decode_vs_llamacpp_batch1", "decode_vs_llamacpp_batch8",
               "prefill_vs_llamacpp", "llamacpp_decode_cpu_ms_per_token_batch1",
               "decode_vs_llamacpp_batch1_cpu_time")
    if not llamacpp.available():
        return [{"benchmark": "decode", "metric": m, "value": float("nan"), "unit": "",
                 "note": f"llama.cpp not built in {llamacpp.home()}: {llamacpp.HOW_TO_BUILD}"} for m in metrics]
    from dsmoe.data.corpus import iter_default_corpus
    from dsmoe.data.tokenizer import train_tokenizer
    args = ModelArgs.from_preset(PRESET).replace(n_mtp_layers=0)
    threads = torch.get_num_threads()
    rounds = 2 if quick else 5
    model, engine = seeded_engine(args)
    one, eight, long = random_prompts(args, 1, P), random_prompts(args, 8, P), random_prompts(args, 1, P_long)[0]
    theirs, ours = {k: [] for k in metrics[:3] + metrics[6:7]}, {k: [] for k in metrics[:3] + metrics[6:7]}
    with tempfile.TemporaryDirectory() as tmp:
        # the converter needs a tokenizer; decode speed does not depend on which
        tokenizer = train_tokenizer((d.text for d in iter_default_corpus(200_000)), args.vocab_size)
        save_hf(model, Path(tmp) / "hf", tokenizer=tokenizer)
        start = time.perf_counter()
        gguf = llamacpp.convert(Path(tmp) / "hf", Path(tmp) / "model-f32.gguf")
        convert_s = time.perf_counter() - start
        try:
            llamacpp.check_tokenization(gguf, tokenizer)
            tokenization = "token ids equal to ours on a test text"
        except Exception as err:  # noqa: BLE001 - reported, the speed figures still stand
            tokenization = f"tokenization check failed: {err}"
        ours_generate(engine, eight, 2)  # warm-up
        for _ in range(rounds):  # one repetition per call, alternating, medians over rounds
            theirs[metrics[0]].append(llamacpp.bench_decode(gguf, threads, P, N))
            ours[metrics[0]].append(decode_rate(engine, one, N))
            theirs[metrics[1]].append(llamacpp.batched_bench(gguf, threads, 8, P, N))
            ours[metrics[1]].append(decode_rate(engine, eight, N))
            theirs[metrics[2]].append(llamacpp.bench_prefill(gguf, threads, P_long))
            ours[metrics[2]].append(prefill_rate(engine, long))
            theirs[metrics[6]].append(llamacpp.decode_cpu_per_token(gguf, threads, P, N))
            ours[metrics[6]].append(decode_cpu_per_token(engine, one, N))
    theirs = {k: statistics.median(v) for k, v in theirs.items()}
    ours = {k: statistics.median(v) for k, v in ours.items()}
    note = f"same weights (HF export -> convert_hf_to_gguf.py f32, {convert_s:.0f} s), {threads} threads"
    rows = [
        {"benchmark": "decode", "metric": metrics[0], "value": theirs[metrics[0]], "unit": "tok/s",
         "note": f"llama-bench -p 0 -n {N} -d {P}; {note}; {tokenization}"},
        {"benchmark": "decode", "metric": metrics[1], "value": theirs[metrics[1]], "unit": "tok/s",
         "note": f"llama-batched-bench -npl 8 -npp {P} -ntg {N} (S_TG)"},
        {"benchmark": "decode", "metric": metrics[2], "value": theirs[metrics[2]], "unit": "tok/s",
         "note": f"llama-bench -p {P_long} -n 0"},
    ]
    for ratio, metric, target in zip(metrics[3:], metrics[:3], ("; target >= 0.8", "; target >= 0.8", "")):
        rows.append({"benchmark": "decode", "metric": ratio, "value": ours[metric] / theirs[metric], "unit": "x",
                     "note": f"dsmoe {ours[metric]:,.1f} tok/s in the same rounds / llama.cpp{target}"})
    cpu = metrics[6]
    rows += [
        {"benchmark": "decode", "metric": cpu, "value": 1e3 * theirs[cpu], "unit": "ms",
         "note": f"user + sys of llama-bench -n {32 + N} less -n 32, per token (children rusage)"},
        {"benchmark": "decode", "metric": metrics[7], "value": theirs[cpu] / ours[cpu], "unit": "x",
         "note": f"llama.cpp CPU per token / dsmoe's ({1e3 * ours[cpu]:.2f} ms: CPU time of (N - 1) steps, "
                 f"same rounds); the steadier figure on a shared machine; target >= 0.8"},
    ]
    return rows


def bandwidth_probe(n_bytes: int = 256 << 20):
    """A memory bandwidth probe: a plain fp32 matrix-vector product over a matrix far larger
    than the caches, x (1, K) @ W (K, N), W read once per call. Returns a function giving
    bytes/s for one call. (W stored input-major is the faster layout at batch 1 here; the
    output-major F.linear layout reaches about 0.85 of it.)"""
    K = 4096
    W = torch.randn(K, n_bytes // 4 // K)
    x = torch.randn(1, K)
    (x @ W).sum()  # warm-up: page the weights in
    return lambda: W.nbytes / timed(lambda: x @ W)


def activated_bytes_per_token(args: ModelArgs, context: float, dtype_bytes: int = 4) -> float:
    """Bytes a batch-1 decode step must read: the activated parameters
    (`dsmoe.analysis.flops`: all but the routed experts, plus the chosen share of those,
    head included) less the embedding table, of which one row is read; plus the latent
    cache of every layer at the given context length ((kv_lora_rank + qk_rope_head_dim)
    values per position). Activations and the cache write are negligible beside these."""
    from dsmoe.analysis.flops import count_params, kv_cache_bytes
    counts = count_params(args)
    weights = (counts.activated - counts.groups["embed"] + args.dim) * dtype_bytes
    return weights + kv_cache_bytes(args, dtype_bytes).mla_bytes_per_token * context


def roofline_rows(quick: bool, rows: list[dict]) -> list[dict]:
    """The memory roofline of batch-1 decode: a bandwidth probe alternating round by round
    with our batch-1 decode (same threads), the bytes a token reads, and the fraction of
    the roofline reached: dsmoe's from those paired rounds, llama.cpp's from its row."""
    args = ModelArgs.from_preset(PRESET).replace(n_mtp_layers=0)
    P, N, _ = sizes(quick)
    _, engine = seeded_engine(args)
    prompts = random_prompts(args, 1, P)
    probe = bandwidth_probe()
    ours_generate(engine, prompts, 2)  # warm-up
    bandwidth, rate = [], []
    for _ in range(2 if quick else 5):
        bandwidth.append(statistics.median(probe() for _ in range(3)))
        rate.append(decode_rate(engine, prompts, N))
    bandwidth, rate = statistics.median(bandwidth), statistics.median(rate)
    per_token = activated_bytes_per_token(args, P + N / 2)
    bound = bandwidth / per_token
    theirs = row_value(rows, "llamacpp_decode_tokens_per_s_batch1")
    return [
        {"benchmark": "decode", "metric": "memory_bandwidth_probe", "value": bandwidth / 1e9, "unit": "GB/s",
         "note": f"x @ W, fp32 W of 256 MB, {torch.get_num_threads()} threads, median"},
        {"benchmark": "decode", "metric": "activated_bytes_per_token", "value": per_token / 1e6, "unit": "MB",
         "note": f"fp32 activated params (flops.py rule) without the embedding table, + latent cache at "
                 f"context {P + N // 2}"},
        {"benchmark": "decode", "metric": "roofline_decode_tokens_per_s_batch1", "value": bound, "unit": "tok/s",
         "note": "bandwidth probe / bytes per token"},
        {"benchmark": "decode", "metric": "dsmoe_roofline_fraction_batch1", "value": rate / bound, "unit": "x",
         "note": f"dsmoe {rate:,.1f} tok/s, in rounds alternating with the probe, x bytes per token / bandwidth"},
        {"benchmark": "decode", "metric": "llamacpp_roofline_fraction_batch1", "value": theirs / bound, "unit": "x",
         "note": "llama.cpp batch-1 tok/s (its own rounds) x bytes per token / bandwidth"
                 + ("" if theirs == theirs else " (no llama.cpp figure in this run)")},
    ]


def run(quick: bool = False, model_dir: str | None = None) -> list[dict]:
    rows = decode_rows(quick)
    rows += llamacpp_rows(quick)
    rows += roofline_rows(quick, rows)
    return rows + speculative_rows(quick, model_dir)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="shorter prompts and outputs, fewer rounds")
    parser.add_argument("--model", default=None, help="trained model directory for the speculative part")
    parser.add_argument("--skip-transformers", action="store_true", help="only the speculative part")
    parser.add_argument("--prefill-only", action="store_true", help="only the prefill rows against transformers")
    opts = parser.parse_args()
    if opts.prefill_only:
        rows = decode_rows(opts.quick, batches=())
    else:
        rows = (speculative_rows(opts.quick, opts.model) if opts.skip_transformers
                else run(opts.quick, opts.model))
    for row in rows:
        print(f"{row['metric']:<42} {row['value']:>10.3f} {row['unit']:<6} {row['note']}")


if __name__ == "__main__":
    main()
