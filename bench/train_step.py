"""Training throughput: dsmoe against transformers' DeepseekV3ForCausalLM, and MFU.

Both models hold the same weights (ours written with `dsmoe.save_hf`, read back by
`DeepseekV3ForCausalLM.from_pretrained`) and run the same fp32 training step on the same
batch: forward, next-token cross-entropy, backward, fused AdamW step. transformers runs its
fastest CPU experts implementation, `grouped_mm` (`experts_implementation="grouped_mm"`),
and SDPA attention. transformers' DeepSeek-V3 has no MTP training path, so the side-by-side
step is the main model only; our full step (MTP loss, balance loss and bias update, as
`dsmoe train` runs it) is reported beside it.

Steps of the two models are interleaved, so both see the same machine load (other
processes share the CPU), and each figure is the median over rounds. MFU is achieved
FLOP/s (`dsmoe.analysis.flops`: 2 per multiply-add, training = 3 x forward, attention over
seq_len keys) over the FLOP/s of a plain fp32 matmul (N x N x N) measured in the same
run, on the same threads.

    python bench/train_step.py [--quick] [--preset demo]      or     python -m bench
Targets on `small`: >= 1.5x transformers' tokens/s and >= 50% MFU.
"""
from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# dsmoe before torch, as `dsmoe train` has it: its OpenMP wait policy applies to both models.
from dsmoe import ModelArgs, Transformer, save_hf  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from dsmoe.analysis.flops import flops_per_token  # noqa: E402
from dsmoe.train.balance import Balancer  # noqa: E402
from dsmoe.train.config import TrainConfig  # noqa: E402
from dsmoe.train.optim import build_optimizer  # noqa: E402
from dsmoe.train.pretrain import lm_losses, train_step  # noqa: E402

PRESET = "small"


def matmul_flops_per_s(n: int = 2048, repeats: int = 5) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t)
    return 2 * n ** 3 / statistics.median(times)


def build_pair(args: ModelArgs, folder: Path):
    from transformers import DeepseekV3ForCausalLM
    torch.manual_seed(0)
    ours = Transformer(args)
    save_hf(ours, folder)
    theirs = DeepseekV3ForCausalLM.from_pretrained(
        folder, dtype=torch.float32, experts_implementation="grouped_mm", attn_implementation="sdpa")
    return ours.train(), theirs.train()


def their_step(model, optimizer, batch, T):
    """The same step with transformers: forward, next-token CE, backward, clip, AdamW."""
    logits = model(input_ids=batch[:, :T]).logits
    loss = F.cross_entropy(logits.flatten(0, 1).float(), batch[:, 1:T + 1].flatten())
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(loss.detach())


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def measure(args: ModelArgs, B: int, T: int, rounds: int, peak_n: int) -> dict:
    """Tokens/s of the three steps and the matmul FLOP/s, interleaved round by round."""
    batch = torch.randint(0, args.vocab_size, (B, T + 1), generator=torch.Generator().manual_seed(0))
    with tempfile.TemporaryDirectory() as tmp:
        ours, theirs = build_pair(args.replace(n_mtp_layers=0), Path(tmp))
    with torch.no_grad():  # same weights, same function: the losses must agree
        ours_loss = float(lm_losses(ours.run(batch[:, :T]), batch, T)[0])
        theirs_logits = theirs(input_ids=batch[:, :T]).logits
        theirs_loss = float(F.cross_entropy(theirs_logits.flatten(0, 1), batch[:, 1:].flatten()))
    # `dsmoe train`'s own step (pretrain.train_step); the main-model one without MTP or
    # balancing, for the side-by-side comparison.
    plain = TrainConfig(batch_size=B, seq_len=T, balance="none", mtp_lambda=0.0, warmup_steps=0)
    full_cfg = TrainConfig(batch_size=B, seq_len=T, warmup_steps=0)
    torch.manual_seed(0)
    full = Transformer(args).train()
    cpu = torch.device("cpu")
    runs = {}
    for name, model, cfg in (("ours", ours, plain), ("ours_full", full, full_cfg)):
        optimizer, balancer = build_optimizer(model, cfg), Balancer(model.moe_layers(), cfg.balance)
        runs[name] = (lambda m=model, o=optimizer, b=balancer, c=cfg:
                      train_step(m, o, b, itertools.repeat(batch), c, 1, cpu, Path(tempfile.gettempdir())))
    opt_theirs = torch.optim.AdamW(theirs.parameters(), lr=plain.lr, betas=(plain.beta1, plain.beta2),
                                   weight_decay=plain.weight_decay, fused=True)
    runs["transformers"] = lambda: their_step(theirs, opt_theirs, batch, T)
    for step in runs.values():  # warm-up (allocator, first-call overheads)
        step()
    times = {name: [] for name in runs}
    peak = []
    for _ in range(rounds):
        for name, step in runs.items():
            times[name].append(timed(step))
        peak.append(matmul_flops_per_s(peak_n))
    return {"tps": {name: B * T / statistics.median(t) for name, t in times.items()},
            "peak": statistics.median(peak), "losses": (ours_loss, theirs_loss)}


def run(quick: bool = False, preset: str = PRESET) -> list[dict]:
    args = ModelArgs.from_preset(preset)
    B, T = (4, 128) if quick else (8, 256)
    default = torch.get_num_threads()
    thread_counts = [default] if quick or default == 1 else [default, 1]
    flops = flops_per_token(args, T)
    main_flops = 3 * flops.forward  # per token, main model only (no MTP)
    rows = []
    for threads in thread_counts:
        torch.set_num_threads(threads)
        try:
            m = measure(args, B, T, rounds=2 if quick else 5, peak_n=1024 if quick else 2048)
        finally:
            torch.set_num_threads(default)
        tps, peak = m["tps"], m["peak"]
        shape = f"{preset}, batch {B}x{T}, fp32, {threads} thread{'s' if threads > 1 else ''}"
        row = dict(benchmark="train_step")
        rows += [
            {**row, "metric": f"dsmoe_tokens_per_s@{threads}t", "value": tps["ours"], "unit": "tok/s",
             "note": f"{shape}; main model (no MTP), fused AdamW, clip"},
            {**row, "metric": f"transformers_tokens_per_s@{threads}t", "value": tps["transformers"],
             "unit": "tok/s", "note": f"{shape}; DeepseekV3ForCausalLM, experts grouped_mm, sdpa"},
            {**row, "metric": f"speedup_vs_transformers@{threads}t",
             "value": tps["ours"] / tps["transformers"], "unit": "x", "note": "target >= 1.5"},
            {**row, "metric": f"mfu@{threads}t", "value": 100 * tps["ours"] * main_flops / peak,
             "unit": "%", "note": f"vs a {2048 if not quick else 1024}^3 fp32 matmul at {peak / 1e9:.1f} "
                                  f"GFLOP/s; {main_flops / 1e6:.1f} MFLOP/token; target >= 50"},
            {**row, "metric": f"dsmoe_full_step_tokens_per_s@{threads}t", "value": tps["ours_full"],
             "unit": "tok/s", "note": f"{shape}; `dsmoe train` step: MTP, balance loss, bias update"},
            {**row, "metric": f"mfu_full_step@{threads}t",
             "value": 100 * tps["ours_full"] * flops.training / peak, "unit": "%",
             "note": f"{flops.training / 1e6:.1f} MFLOP/token incl. MTP"},
            {**row, "metric": f"loss_difference@{threads}t", "value": abs(m["losses"][0] - m["losses"][1]),
             "unit": "nats", "note": "same weights, same batch: %.6f vs %.6f" % m["losses"]},
        ]
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smaller batch and fewer rounds")
    parser.add_argument("--preset", default=PRESET, help=f"model preset (default: {PRESET})")
    options = parser.parse_args()
    for row in run(options.quick, options.preset):
        print(f"{row['metric']:<36} {row['value']:>10.3f} {row['unit']:<6} {row['note']}")


if __name__ == "__main__":
    main()
