"""One MoE layer against the dense SwiGLU of the same activated width, forward + backward.

The MoE layer is `dsmoe.model.moe.MoE` of the `small` preset (32 routed experts, top-4,
1 shared, expert width 128, dim 384): gate, routed experts (the grouped path) and shared
expert. The dense layer is a SwiGLU whose width is what one token activates,
(n_shared + top_k) x moe_inter_dim = 640, so both do nearly the same matmul work per
token; the MoE layer also pays for the gate, for moving tokens to their experts and back,
and (on CPU) for padding every expert to the busiest one's load.

Both run on the same 4096 tokens, fp32, on CPU, with a plain fp32 matmul of the dense
layer's up-projection shape (4096 x 384 x 640), interleaved round by round after a
warm-up, so that other processes on the machine weigh on all of them alike; each figure
is the median over rounds. GFLOP/s count useful FLOPs only (2 per multiply-add of the
activated weights, backward = 2 x forward; no padding rows), as a fraction of that
matmul's. The full run also times the per-expert loop (the reference implementation)
against the grouped path, and repeats the MoE/dense comparison on one thread.

    python bench/moe_layer.py [--quick]     or     python -m bench moe_layer [--quick]
Target: MoE / dense time <= 1.3.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dsmoe.analysis.flops import activated, count_params  # noqa: E402
from dsmoe.config import ModelArgs  # noqa: E402
from dsmoe.model.layers import SwiGLU  # noqa: E402
from dsmoe.model.moe import MoE  # noqa: E402

PRESET = "small"
TARGET = 1.3


def moe_flops_per_token(args: ModelArgs) -> int:
    """Forward FLOPs of one MoE layer per token: gate, shared and top-k routed experts."""
    params = count_params(args)
    layer = {g: params.groups[g] // args.n_moe_layers for g in ("gate", "shared_experts", "routed_experts")}
    return 2 * activated(layer, params.routed_share)


def build(args: ModelArgs, seed: int = 0) -> tuple[MoE, SwiGLU]:
    torch.manual_seed(seed)
    moe = MoE(args)
    dense = SwiGLU(args.dim, (args.n_shared_experts + args.n_activated_experts) * args.moe_inter_dim)
    for p in list(moe.parameters()) + list(dense.parameters()):
        nn.init.normal_(p, 0.0, args.init_std)  # as Transformer.init_weights
    return moe, dense


def forward_backward(layer: nn.Module, x_TD: torch.Tensor) -> None:
    x = x_TD.detach().requires_grad_(True)
    y = layer(x)
    y = y[0] if isinstance(y, tuple) else y
    y.sum().backward()
    for p in layer.parameters():  # as optimizer.zero_grad(set_to_none=True)
        p.grad = None


def measure(steps: dict, rounds: int) -> dict[str, float]:
    """Median seconds of each step, the steps interleaved round by round after a warm-up."""
    for step in steps.values():  # allocator, first-call paths
        step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def run(quick: bool = False) -> list[dict]:
    args = ModelArgs.from_preset(PRESET)
    T, rounds = (1024, 3) if quick else (4096, 9)
    moe, dense = build(args)
    x_TD = torch.randn(T, args.dim, generator=torch.Generator().manual_seed(1))
    width = dense.w1.out_features
    a_TD, b_DW = torch.randn(T, args.dim), torch.randn(args.dim, width)
    steps = {
        "moe": lambda: forward_backward(moe, x_TD),
        "dense": lambda: forward_backward(dense, x_TD),
        "matmul": lambda: a_TD @ b_DW,
    }
    sec = measure(steps, rounds)
    flops = {"moe": 3 * T * moe_flops_per_token(args),
             "dense": 3 * T * 2 * 3 * args.dim * width,
             "matmul": 2 * T * args.dim * width}
    gflops = {name: flops[name] / sec[name] / 1e9 for name in flops}
    with torch.no_grad():
        load_E = moe(x_TD)[1].load_E.float()
    ratio = sec["moe"] / sec["dense"]
    threads = torch.get_num_threads()
    setting = (f"{PRESET}: {args.n_routed_experts} experts top-{args.n_activated_experts} + "
               f"{args.n_shared_experts} shared, F={args.moe_inter_dim}, D={args.dim}; {T} tokens, "
               f"fp32 CPU, {threads} threads, median of {rounds}")

    def row(metric: str, value: float, unit: str, note: str) -> dict:
        return {"benchmark": "moe_layer", "metric": metric, "value": value, "unit": unit, "note": note}

    rows = [
        row("moe_fwd_bwd_ms", 1e3 * sec["moe"], "ms", setting),
        row("dense_fwd_bwd_ms", 1e3 * sec["dense"], "ms", f"SwiGLU width {width} = (shared + top-k) x F"),
        row("moe_over_dense", ratio, "x", f"target <= {TARGET}: {'met' if ratio <= TARGET else 'NOT met'}"),
        row("matmul_gflops", gflops["matmul"], "GFLOP/s", f"plain fp32 matmul {T}x{args.dim}x{width}"),
        row("moe_gflops", gflops["moe"], "GFLOP/s",
            f"{gflops['moe'] / gflops['matmul']:.0%} of matmul; useful FLOPs only"),
        row("dense_gflops", gflops["dense"], "GFLOP/s", f"{gflops['dense'] / gflops['matmul']:.0%} of matmul"),
        row("expert_padding", float(load_E.max() / load_E.mean()), "x",
            "busiest expert's load / mean load: rows the CPU grouped path computes per useful row"),
    ]
    if quick:  # the loop reference and the one-thread run take most of the time
        return rows

    def moe_loop():
        moe.experts.impl = "loop"
        try:
            forward_backward(moe, x_TD)
        finally:
            moe.experts.impl = "grouped"

    loop = measure({"moe": steps["moe"], "moe_loop": moe_loop}, max(3, rounds // 3))
    rows += [row("moe_loop_fwd_bwd_ms", 1e3 * loop["moe_loop"], "ms", "same layer, per-expert loop reference"),
             row("grouped_speedup_vs_loop", loop["moe_loop"] / loop["moe"], "x", "loop time / grouped time")]
    # One thread: the same comparison without parallel regions, whose start-up and
    # barriers cost every op (and cost the most on a machine shared with other work).
    torch.set_num_threads(1)
    try:
        one = measure({"moe": steps["moe"], "dense": steps["dense"]}, rounds)
    finally:
        torch.set_num_threads(threads)
    rows.append(row("moe_over_dense_1_thread", one["moe"] / one["dense"], "x",
                    f"{1e3 * one['moe']:.0f} ms / {1e3 * one['dense']:.0f} ms on one thread"))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1024 tokens, 3 rounds, no loop, no one-thread run")
    from bench import format_table
    print(format_table(run(parser.parse_args().quick)))


if __name__ == "__main__":
    main()
