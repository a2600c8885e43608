"""Training on two CPU cores: one process with two threads against two one-thread replicas.

The same `dsmoe train` run (the `demo` preset and the demo's settings, on a small
prepared corpus) is started alternately as one process with `threads` = the core count
(OpenMP threads spinning between regions, as `make demo` used to run) and as
`torchrun --nproc-per-node 2 ... dsmoe train --replicate` with one thread per process.
Each run's step time is the median of its logged steps after the first `WARM` (rank 0's
step includes waiting for the gradient all-reduce); runs alternate so that both sides see
the same machine load, and each side's figure is the median over rounds.

    python bench/replicas.py [--quick] [--vocab N]        or     python -m bench replicas
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dsmoe.config import ModelArgs  # noqa: E402

PRESET, WARM = "demo", 5


def _prepare(folder: Path, vocab_size: int) -> Path:
    from dsmoe.data.prepare import prepare
    prepare(folder, None, vocab_size=vocab_size, max_chars_per_domain=300_000, show_progress=False)
    return folder


def _step_seconds(run_dir: Path) -> float:
    """Median seconds of a logged step after the first WARM (a step's tokens over its rate)."""
    from dsmoe.train.run_dir import read_metrics
    steps = [r for r in read_metrics(run_dir) if "tokens_per_s" in r]
    tokens_per_step = steps[0]["tokens"]  # the first step's running total is one step's tokens
    return statistics.median(tokens_per_step / r["tokens_per_s"] for r in steps[WARM:])


def _train(config: dict, data: Path, out: Path, replicas: int) -> float:
    cfg_file = out.with_suffix(".json")
    cfg_file.write_text(json.dumps(config))
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root)}
    command = ["-m", "dsmoe", "train", "--config", str(cfg_file), "--data", str(data), "--out", str(out),
               "--no-progress"]
    if replicas > 1:
        command = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={replicas}",
                   *command, "--replicate"]
        env["OMP_NUM_THREADS"] = "1"
    else:  # spinning waits: the faster policy for two threads on a machine of its own
        env["OMP_WAIT_POLICY"] = "ACTIVE"
    subprocess.run([sys.executable, *command], env=env, check=True, cwd=root,
                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    return _step_seconds(out)


def run(quick: bool = False, vocab_size: int | None = None) -> list[dict]:
    from dsmoe.demo import SETTINGS
    args = ModelArgs.from_preset(PRESET)
    if vocab_size:
        args = dataclasses.replace(args, vocab_size=vocab_size)
    cores = os.cpu_count() or 1
    steps, rounds = (15, 1) if quick else (40, 3)
    config = {"model": dataclasses.asdict(args), **SETTINGS, "steps": steps, "eval_interval": 0,
              "ckpt_interval": 0, "log_interval": 1000}
    times = {"threads": [], "replicas": []}
    with tempfile.TemporaryDirectory() as tmp:
        data = _prepare(Path(tmp) / "data", args.vocab_size)
        for r in range(rounds):
            times["threads"].append(_train({**config, "threads": cores}, data, Path(tmp) / f"t{r}", 1))
            times["replicas"].append(_train({**config, "threads": 1}, data, Path(tmp) / f"r{r}", 2))
    one, two = statistics.median(times["threads"]), statistics.median(times["replicas"])
    shape = (f"{PRESET} preset, vocab {args.vocab_size}, batch {SETTINGS['batch_size']}x{SETTINGS['seq_len']}, "
             f"MTP on {SETTINGS['mtp_fraction']:.0%} of rows, fp32; median of {rounds} runs of {steps} steps")
    return [
        {"benchmark": "replicas", "metric": f"step_s_1_process_{cores}_threads", "value": one, "unit": "s",
         "note": shape},
        {"benchmark": "replicas", "metric": "step_s_2_replicas_1_thread", "value": two, "unit": "s",
         "note": "torchrun --nproc-per-node 2 ... dsmoe train --replicate, OMP_NUM_THREADS=1"},
        {"benchmark": "replicas", "metric": "speedup", "value": one / two, "unit": "x",
         "note": "same global batch and update; side by side"},
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--vocab", type=int, default=None, help="vocabulary size (default: the preset's)")
    a = parser.parse_args()
    for row in run(quick=a.quick, vocab_size=a.vocab):
        print(f"{row['metric']:<32} {row['value']:>8.3f} {row['unit']:<3} {row['note']}")


if __name__ == "__main__":
    main()
