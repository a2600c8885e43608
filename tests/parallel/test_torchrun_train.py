"""`python -m dsmoe train` with torchrun's environment (2 ranks, gloo) against the same
command on one process: equal per-step losses, gradient norms and MaxVio; its sharded
checkpoint continues on one process without torchrun; rank 0 exports the final model.
The same with `--replicate` (whole-model replicas, gradients averaged), whose checkpoints
are one-process ones that either kind of run continues; bad combinations are refused."""
from __future__ import annotations

import itertools
import json
import shutil

import pytest

from dsmoe.data import mathgen
from dsmoe.errors import ConfigError
from dsmoe.train import checkpoint as ckpt
from dsmoe.train.config import load_run_config
from dsmoe.train.pretrain import train
from dsmoe.train.run_dir import read_metrics

TOL = 1e-5
RUN = {"model": "tiny", "batch_size": 4, "seq_len": 32, "steps": 4, "warmup_steps": 1,
       "lr": 0.003, "eval_interval": 0, "eval_batches": 1, "ckpt_interval": 2, "threads": 1}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    from dsmoe.data.prepare import prepare
    root = tmp_path_factory.mktemp("dist-data")
    docs = [mathgen.as_document(p) for p in itertools.islice(mathgen.problems("train", seed=1), 300)]
    (root / "math.txt").write_text("\n\n".join(docs))
    prepare(root / "data", [root / "math.txt"], vocab_size=512)
    return root / "data"


def _steps(out) -> list[dict]:
    return [m for m in read_metrics(out) if "loss" in m]


def _same(got: list[dict], want: list[dict]) -> None:
    assert [m["step"] for m in got] == [m["step"] for m in want]
    for g, w in zip(got, want):
        for key in ("loss", "mtp_loss", "balance_loss", "grad_norm"):
            assert g[key] == pytest.approx(w[key], abs=TOL), (g["step"], key)
        assert g["maxvio"] == pytest.approx(w["maxvio"], abs=1e-12)  # from the same global loads


@pytest.mark.slow
def test_torchrun_train_matches_one_process_and_resumes_on_one(spawn_cli, data_dir, tmp_path):
    config = tmp_path / "run.json"
    config.write_text(json.dumps(RUN))
    args, cfg = load_run_config(config=config)
    single = train(args, cfg, data_dir, tmp_path / "one", progress=False, export=False)
    want = _steps(single.out)

    out = tmp_path / "two"
    logs = spawn_cli(2, ["train", "--config", str(config), "--data", str(data_dir),
                         "--out", str(out), "--no-progress"])
    _same(_steps(out), want)
    assert (out / "hf" / "config.json").is_file()
    assert "trained 4 steps" in logs[0] and "trained" not in logs[1]  # rank 0 speaks

    # Drop the last checkpoint and what came after it; a plain process continues.
    shutil.rmtree(out / "checkpoints" / "step-000004")
    resumed = train(args, cfg, data_dir, out, resume=True, progress=False, export=False)
    assert resumed.step == 4
    _same(_steps(out), want)


@pytest.mark.slow
def test_replicas_match_one_process_and_share_its_checkpoints(spawn_cli, data_dir, tmp_path):
    config = tmp_path / "run.json"
    config.write_text(json.dumps(RUN))
    args, cfg = load_run_config(config=config)
    want = _steps(train(args, cfg, data_dir, tmp_path / "one", progress=False, export=False).out)

    out = tmp_path / "two"
    logs = spawn_cli(2, ["train", "--replicate", "--config", str(config), "--data", str(data_dir),
                         "--out", str(out), "--no-progress"])
    _same(_steps(out), want)
    assert "trained 4 steps" in logs[0] and "trained" not in logs[1]  # rank 0 speaks
    assert (out / "hf" / "config.json").is_file()
    last = ckpt.latest_checkpoint(out / "checkpoints")
    assert ckpt.read_meta(last)["step"] == 4 and (last / "state.pt").is_file()  # a one-process checkpoint

    # a one-process run continues the replicas' checkpoint ...
    shutil.rmtree(out / "checkpoints" / "step-000004")
    assert train(args, cfg, data_dir, out, resume=True, progress=False, export=False).step == 4
    _same(_steps(out), want)
    # ... and replicas continue a one-process checkpoint
    shutil.rmtree(out / "checkpoints" / "step-000004")
    spawn_cli(2, ["train", "--replicate", "--config", str(config), "--data", str(data_dir),
                  "--out", str(out), "--no-progress", "--resume"])
    _same(_steps(out), want)


def test_replicate_needs_torchrun_and_no_expert_parallelism(monkeypatch):
    from dsmoe.parallel.training import session_from_env
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(ConfigError, match="torchrun --nproc-per-node N -m dsmoe train --replicate"):
        session_from_env("cpu", replicate=True)
    with pytest.raises(ConfigError, match="drop --ep 2"):
        session_from_env("cpu", ep=2, replicate=True)
    assert session_from_env("cpu") is None  # a plain run: nothing initialised
