"""Start N local ranks of tests/parallel/rank_worker.py the way torchrun would (RANK,
WORLD_SIZE, MASTER_ADDR/PORT in the environment), on gloo, and collect their reports."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dsmoe.parallel.launch import free_port, torchrun_env

WORKER = Path(__file__).with_name("rank_worker.py")
ROOT = WORKER.parents[2]


@pytest.fixture(scope="session")
def worker():
    """The worker module itself, for the single-process reference run."""
    spec = importlib.util.spec_from_file_location("dsmoe_parallel_worker", WORKER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _launch(world: int, argv: list[str], deadline_s: float, wait_for) -> tuple[list, list[str]]:
    """Start `world` ranks of `python argv...` the way torchrun would; their exit codes
    and outputs."""
    port = free_port()
    procs = []
    for rank in range(world):
        env = {**os.environ, **torchrun_env(rank, world, port), "OMP_NUM_THREADS": "1",
               "PYTHONPATH": str(ROOT)}
        procs.append(subprocess.Popen([sys.executable, *argv], env=env, cwd=ROOT,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
    waited = range(world) if wait_for is None else wait_for
    logs = [""] * world
    try:
        for rank in waited:
            logs[rank] = procs[rank].communicate(timeout=deadline_s)[0].decode(errors="replace")
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    return [proc.returncode for proc in procs], logs


@pytest.fixture
def spawn(tmp_path):
    def run(world: int, scenario: str, *extra: str, deadline_s: float = 240.0,
            wait_for: list[int] | None = None) -> list[dict]:
        """Reports of every rank of rank_worker.py; only the ranks in `wait_for` (all by
        default) are waited for, the others are killed once those are done."""
        out = tmp_path / f"{scenario}-{world}-{len(list(tmp_path.iterdir()))}"
        out.mkdir()
        _, logs = _launch(world, [str(WORKER), scenario, str(out), *extra], deadline_s, wait_for)
        reports = []
        for rank in range(world):
            path = out / f"rank{rank}.json"
            reports.append(json.loads(path.read_text()) if path.exists() else {"rank": rank, "missing": True})
        for rep, log in zip(reports, logs):
            rep["log"] = log[-3000:]
        return reports
    return run


@pytest.fixture
def spawn_cli():
    def run(world: int, argv: list[str], deadline_s: float = 300.0) -> list[str]:
        """`python -m dsmoe ARGV` on `world` ranks; fails unless every rank exits with 0."""
        codes, logs = _launch(world, ["-m", "dsmoe", *argv], deadline_s, None)
        assert codes == [0] * world, "\n".join(log[-3000:] for log in logs)
        return logs
    return run
