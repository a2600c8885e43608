"""Expert-parallel dispatch and combine against expert compute, at 2 processes.

Two local ranks (gloo on CPU, one thread each) each hold half of the routed experts of
one MoE layer of the `small` preset and route their own tokens with the real gate. The
three phases of `ExpertParallelExperts.forward` are timed separately, with a barrier
before each so that one phase's wait is not billed to the next:
  dispatch  per-expert counts exchange + all-to-all of the token rows to their experts
  compute   grouped-matmul SwiGLU of the rows each rank received
  combine   all-to-all of the results back, weighting and summing per token
Each figure is the median over rounds of the slower rank. The ratio (dispatch + combine)
/ compute is what overlapping or a faster interconnect has to win back; on CPU the
exchange is a loopback TCP copy, so the ratio here says nothing about NVLink or
InfiniBand (see docs/distributed.md).

    python bench/dispatch.py [--quick]      or     python -m bench
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dsmoe import ModelArgs  # noqa: E402
from dsmoe.parallel.launch import free_port, torchrun_env  # noqa: E402

PRESET = "small"
WORLD = 2
PHASES = ("dispatch", "compute", "combine")


def _worker(out_dir: str, tokens: int, rounds: int) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from dsmoe.parallel import launch
    from dsmoe.parallel.expert_parallel import ExpertParallelExperts
    from dsmoe.model.moe import MoE

    torch.set_num_threads(1)
    ctx = launch.init("cpu")
    args = ModelArgs.from_preset(PRESET)
    torch.manual_seed(0)  # same weights everywhere; each rank keeps its half of the experts
    moe = MoE(args)
    for p in moe.parameters():
        torch.nn.init.normal_(p, 0.0, args.init_std)
    mesh = init_device_mesh("cpu", (1, ctx.world_size), mesh_dim_names=("replica", "ep"))
    experts = ExpertParallelExperts(moe.experts, mesh, ctx.world_size)
    torch.manual_seed(1 + ctx.rank)  # each rank its own tokens
    x_TD = torch.randn(tokens, args.dim)
    times: dict[str, list[float]] = {p: [] for p in PHASES}
    rows = 0
    with torch.no_grad():
        weights_TK, ids_TK, _ = moe.gate(x_TD)
        load_E = torch.bincount(ids_TK.flatten(), minlength=args.n_routed_experts)
        for i in range(rounds + 2):  # two warm-up rounds
            dist.barrier()
            t0 = time.perf_counter()
            x_MD, plan = experts.dispatch(x_TD, ids_TK, load_E)
            t1 = time.perf_counter()
            dist.barrier()
            t2 = time.perf_counter()
            y_MD = experts.compute(x_MD, plan)
            t3 = time.perf_counter()
            dist.barrier()
            t4 = time.perf_counter()
            experts.combine(y_MD, weights_TK, plan, x_TD)
            t5 = time.perf_counter()
            if i >= 2:
                for phase, dt in zip(PHASES, (t1 - t0, t3 - t2, t5 - t4)):
                    times[phase].append(dt)
            rows = x_MD.shape[0]
    result = {p: statistics.median(v) for p, v in times.items()}
    result.update(rows_received=rows, sent_to_peer=plan.send[1 - ctx.rank])
    Path(out_dir, f"rank{ctx.rank}.json").write_text(json.dumps(result))
    launch.shutdown()


def run(quick: bool = False) -> list[dict]:
    tokens, rounds = (1024, 5) if quick else (4096, 15)
    root = Path(__file__).resolve().parents[1]
    with tempfile.TemporaryDirectory() as out:
        port = free_port()
        procs = [subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "--worker", out, "--tokens", str(tokens),
             "--rounds", str(rounds)],
            env={**os.environ, **torchrun_env(r, WORLD, port), "OMP_NUM_THREADS": "1",
                 "PYTHONPATH": str(root)},
            cwd=root) for r in range(WORLD)]
        codes = [p.wait(timeout=600) for p in procs]
        if any(codes):
            raise RuntimeError(f"dispatch benchmark ranks exited with {codes}")
        ranks = [json.loads(Path(out, f"rank{r}.json").read_text()) for r in range(WORLD)]
    args = ModelArgs.from_preset(PRESET)
    ms = {p: 1e3 * max(r[p] for r in ranks) for p in PHASES}
    setting = (f"{PRESET}: {tokens} tokens/rank, top-{args.n_activated_experts} of "
               f"{args.n_routed_experts} experts, dim {args.dim}, {WORLD} ranks gloo CPU, 1 thread each")
    rows = [{"benchmark": "dispatch", "metric": f"{p}_ms", "value": ms[p], "unit": "ms",
             "note": setting if p == "dispatch" else "median over rounds, slower rank"} for p in PHASES]
    rows.append({"benchmark": "dispatch", "metric": "comm_over_compute",
                 "value": (ms["dispatch"] + ms["combine"]) / ms["compute"], "unit": "x",
                 "note": "(dispatch + combine) / expert compute"})
    rows.append({"benchmark": "dispatch", "metric": "rows_sent_to_peer",
                 "value": float(ranks[0]["sent_to_peer"]), "unit": "rows",
                 "note": f"of {tokens * args.n_activated_experts} token-expert pairs on rank 0"})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--tokens", type=int, default=4096, help=argparse.SUPPRESS)
    parser.add_argument("--rounds", type=int, default=15, help=argparse.SUPPRESS)
    a = parser.parse_args()
    if a.worker:
        _worker(a.worker, a.tokens, a.rounds)
        return
    for row in run(quick=a.quick):
        print(f"{row['metric']:<22} {row['value']:>10.3f} {row['unit']:<5} {row['note']}")


if __name__ == "__main__":
    main()
