"""What the CPU-only CI cannot check: training, the engine and speculative decoding on CUDA.

On a machine with a GPU, in one run (a few minutes), each line printed as it is measured:
1. `dsmoe prepare` on generated math text, then `dsmoe train` (the default device: CUDA,
   bf16 autocast) of the `tiny` preset with an MTP module and bias balancing: the loss
   falls and the run exports a Hugging Face folder;
2. that model in the engine on CUDA, fp32: greedy tokens of plain decoding equal an argmax
   loop over full forwards (prefill, the last block at the last position, the latent
   cache), and speculative decoding at depths 1, 2 and auto gives the same tokens;
   sampled speculative decoding runs; int8 weights decode;
3. speed of `small` (random weights, bf16): plain decode tokens/s at batch 1 and 8, and
   what a speculative step costs against a plain one (random drafts are rejected, so
   each step runs the full draft chain and verify pass), against the CPU's ratio
   (`bench/decode_fast.py --only spec-cost`).

    python bench/cuda_check.py [--out FILE] [--device cpu]
Exits non-zero at the first check that fails. `--device cpu` runs the same checks on the
CPU (a dry run of the script; the speed lines then compare nothing new).
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from dsmoe import ModelArgs, Transformer, cli  # noqa: E402
from dsmoe.data import mathgen  # noqa: E402
from dsmoe.infer.engine import Engine  # noqa: E402
from dsmoe.infer.generate import load_engine  # noqa: E402
from dsmoe.infer.requests import tokenize_prompt  # noqa: E402
from dsmoe.infer.sampling import SamplingParams  # noqa: E402

LINES: list[str] = []


def say(line: str) -> None:
    print(line, flush=True)
    LINES.append(line)


def check(ok: bool, what: str) -> None:
    say(("ok   " if ok else "FAIL ") + what)
    if not ok:
        raise SystemExit(1)


def train_tiny(tmp: Path, device: str) -> Path:
    text = tmp / "math.txt"
    docs = itertools.islice(mathgen.problems("train", 0, 1), 3000)
    text.write_text("\n\n".join(mathgen.as_document(p) for p in docs), encoding="utf-8")
    assert cli.main(["prepare", "--out", str(tmp / "data"), "--data", str(text), "--vocab-size", "512"]) == 0
    config = tmp / "run.json"
    model = dataclasses.asdict(ModelArgs.from_preset("tiny").replace(n_mtp_layers=1, vocab_size=512))
    config.write_text(json.dumps({"model": model, "steps": 60, "batch_size": 8, "seq_len": 128, "lr": 3e-3,
                                  "warmup_steps": 6, "balance": "bias", "gamma": 0.01, "mtp_lambda": 0.3,
                                  "eval_interval": 0, "ckpt_interval": 0, "device": device}))
    start = time.perf_counter()
    code = cli.main(["train", "--config", str(config), "--data", str(tmp / "data"), "--out", str(tmp / "run"),
                     "--no-progress"])
    check(code == 0 and (tmp / "run" / "hf" / "config.json").is_file(),
          f"dsmoe train on {device}: 60 steps in {time.perf_counter() - start:.1f} s, exported")
    losses = [json.loads(line)["loss"] for line in (tmp / "run" / "metrics.jsonl").read_text().splitlines()
              if '"loss"' in line]
    check(losses[-1] < losses[0] - 1.0, f"training loss fell: {losses[0]:.2f} -> {losses[-1]:.2f}")
    return tmp / "run" / "hf"


@torch.no_grad()
def engine_checks(hf: Path, device: str) -> None:
    engine, tok = load_engine(hf, device=device, dtype="fp32", max_batch=4)
    model = engine.model
    prompts = [tokenize_prompt(tok, mathgen.as_prompt(p)) for p in itertools.islice(mathgen.problems("test", 0, 1), 3)]
    params = SamplingParams(max_tokens=24, ignore_eos=True)
    plain = [r.output_ids for r in engine.generate(prompts, params)]
    reference = []
    for p in prompts:  # argmax over full forwards, no cache
        seq = list(p)
        for _ in range(24):
            seq.append(int(model(torch.tensor([seq], device=device))[0, -1].argmax()))
        reference.append(seq[len(p):])
    same = sum(a == b for a, b in zip(plain, reference))
    check(same == len(prompts), f"engine greedy = full-forward argmax on {device} ({same}/{len(prompts)} prompts)")
    for depth in (1, 2, "auto"):
        spec = Engine(model, tok, max_batch=4, speculative=depth)
        out = [r.output_ids for r in spec.generate(prompts, params)]
        check(out == plain, f"speculative depth {depth} on {device}: greedy tokens = plain "
                            f"(acceptance {100 * spec.stats.acceptance:.0f}%)")
    sampled = Engine(model, tok, max_batch=4, speculative=2).generate(
        prompts, SamplingParams(max_tokens=24, temperature=0.8, top_p=0.9, seed=1, ignore_eos=True))
    check(all(len(r.output_ids) == 24 for r in sampled), f"sampled speculative decoding on {device}")
    int8, _ = load_engine(hf, device=device, dtype="fp32", quantize="int8", max_batch=4)
    out = [r.output_ids for r in int8.generate(prompts, params)]
    agree = sum(x == y for a, b in zip(out, plain) for x, y in zip(a, b)) / sum(map(len, plain))
    check(all(len(o) == 24 for o in out), f"int8 weights decode on {device} ({100 * agree:.0f}% of tokens as fp32)")


def rate(engine: Engine, prompts, n: int) -> float:
    """Decode tokens/s: (time for n new tokens - time for 1) / (n - 1) steps."""
    engine.generate(prompts, SamplingParams(max_tokens=2, ignore_eos=True))  # warm-up
    times = {}
    for m in (1, n):
        synchronize()
        t = time.perf_counter()
        engine.generate(prompts, SamplingParams(max_tokens=m, ignore_eos=True))
        synchronize()
        times[m] = time.perf_counter() - t
    return len(prompts) * (n - 1) / (times[n] - times[1])


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def speed(device: str, n: int = 64) -> None:
    torch.manual_seed(0)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = Transformer(ModelArgs.from_preset("small").replace(n_mtp_layers=1)).to(device, dtype).eval()
    g = torch.Generator().manual_seed(0)
    one = [torch.randint(0, model.args.vocab_size, (64,), generator=g).tolist()]
    eight = [torch.randint(0, model.args.vocab_size, (64,), generator=g).tolist() for _ in range(8)]
    plain = Engine(model, max_batch=8, max_len=256)
    r1, r8 = rate(plain, one, n), rate(plain, eight, n)
    say(f"small {dtype} on {device}: plain decode {r1:,.0f} tok/s at batch 1, {r8:,.0f} at batch 8")
    for depth in (1, 2):
        spec = Engine(model, max_batch=1, max_len=256, speculative=depth)
        rs = rate(spec, one, n)
        per_step = spec.stats.decode_tokens / max(spec.stats.decode_steps, 1)
        say(f"small {dtype} on {device}: speculative depth {depth}, random drafts ({per_step:.2f} tokens/step): "
            f"a step costs {r1 / rs * per_step:.2f}x a plain step")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="also write the lines to this file")
    parser.add_argument("--device", default="cuda", help="cpu: a dry run of the same checks")
    opts = parser.parse_args()
    if opts.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: this check runs on a machine with a GPU (or pass --device cpu)")
    say(f"torch {torch.__version__}, {torch.cuda.get_device_name() if opts.device == 'cuda' else 'cpu'}")
    try:
        with tempfile.TemporaryDirectory() as tmp:
            hf = train_tiny(Path(tmp), opts.device)
            engine_checks(hf, opts.device)
        speed(opts.device)
    finally:
        if opts.out:
            Path(opts.out).write_text("\n".join(LINES) + "\n")


if __name__ == "__main__":
    main()
