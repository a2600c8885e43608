"""Expert parallelism + FSDP2 on gloo against the single-process run on the same global
batch: losses within 1e-5 (fp32), the same aux-free bias on every rank, and a checkpoint
written by 4 ranks resumed by 2."""
from __future__ import annotations

import json

import pytest
import torch

from dsmoe import ModelArgs
from dsmoe.parallel.checkpoint import load_model
from dsmoe.parallel.parallelize import ParallelLayout
from dsmoe.errors import ConfigError

TOL = 1e-5


@pytest.fixture(scope="module")
def expected(worker):
    """Metrics per step and final gate biases of the single-process run on the global batches."""
    metrics, model = worker.reference(ModelArgs.from_preset("tiny"))
    return metrics, worker.biases(model)


def _check_run(reports, expected_metrics, expected_bias):
    for rep in reports:
        assert "error" not in rep and "missing" not in rep, rep.get("trace") or rep["log"]
    got = reports[0]["metrics"]
    assert [m["step"] for m in got] == [m["step"] for m in expected_metrics]
    for g, w in zip(got, expected_metrics):
        for key in ("loss", "mtp_loss", "balance_loss", "grad_norm"):
            assert g[key] == pytest.approx(w[key], abs=TOL), (g["step"], key)
        assert g["maxvio"] == w["maxvio"]  # from the same global loads
    first = reports[0]["biases"]
    assert all(rep["biases"] == first for rep in reports)  # bitwise identical on every rank
    assert any(b != 0.0 for layer in first for b in layer)  # the update did run
    for got_layer, want_layer in zip(first, expected_bias, strict=True):
        assert got_layer == pytest.approx(want_layer, abs=1e-7)


@pytest.mark.parametrize("world,ep", [(2, 2), pytest.param(4, 2, marks=pytest.mark.slow)])
def test_losses_match_single_process(spawn, expected, world, ep):
    _check_run(spawn(world, "train", "--ep", str(ep)), *expected)


@pytest.mark.slow
def test_checkpoint_from_4_ranks_resumes_on_2(spawn, worker, expected, tmp_path):
    root = str(tmp_path / "checkpoints")
    saved = spawn(4, "train", "--ep", "4", "--ckpt", root, "--save-at", "2")
    _check_run(saved, *expected)
    resumed = spawn(2, "resume", "--ckpt", root)
    for rep in resumed:
        assert rep.get("first") == 2, rep.get("trace") or rep["log"]
    _check_run(resumed, expected[0][2:], expected[1])
    ckpt = tmp_path / "checkpoints" / "step-000002"
    assert json.loads((ckpt / "meta.json").read_text())["world_size"] == 4

    # The same checkpoint, consolidated without any process group into the single-device
    # model, computes what the 4 ranks computed with it.
    model = load_model(ckpt)
    assert model.state_dict().keys() == worker.build(ModelArgs.from_preset("tiny")).state_dict().keys()
    with torch.no_grad():
        logits = model(worker.probe(model.args))
    torch.testing.assert_close(logits, torch.tensor(saved[0]["probe_logits"]), atol=1e-6, rtol=0)


def test_mismatched_configs_fail_on_every_rank(spawn):
    reports = spawn(2, "mismatch")
    for rep in reports:
        assert rep.get("error") == "ConfigError", rep.get("trace") or rep["log"]
        assert "route_scale" in rep["message"] and "rank(s) [1]" in rep["message"]


def test_lost_rank_is_an_error_not_a_hang(spawn):
    # Rank 1 exits right after joining: rank 0's next collective fails (peer closed).
    reports = spawn(2, "lost", "--timeout", "10", deadline_s=120)
    assert reports[1].get("missing")
    assert reports[0].get("error") in ("RuntimeError", "DistBackendError", "DistNetworkError"), reports[0]["log"]


def test_stalled_rank_times_out(spawn):
    # Rank 1 stays alive but silent: only the process-group timeout (3 s) can end rank 0's
    # wait; the harness's own deadline (120 s) would otherwise be hit.
    reports = spawn(2, "stalled", "--timeout", "3", deadline_s=120, wait_for=[0])
    assert reports[0].get("error") in ("RuntimeError", "DistBackendError"), reports[0]["log"]
    assert "timed out" in reports[0]["message"].lower() or "timeout" in reports[0]["message"].lower()
    assert reports[0]["waited_s"] >= 3.0  # it did wait for the peer, then gave up


def test_layout_must_divide_world_and_experts():
    assert ParallelLayout().resolve(4, 8).ep == 4
    assert ParallelLayout(ep=2).resolve(4, 8).ep == 2
    with pytest.raises(ConfigError, match="cannot be split over ep=3"):
        ParallelLayout().resolve(3, 8)
    with pytest.raises(ConfigError, match="must divide the world size 4"):
        ParallelLayout(ep=3).resolve(4, 9)


def test_a_save_failing_on_one_rank_stops_every_rank_at_once(spawn, tmp_path):
    # A 600 s process-group timeout: a rank left waiting at a barrier would blow the 120 s
    # deadline; the failure must reach every rank through the save's own agreement.
    root = tmp_path / "checkpoints"
    reports = spawn(2, "save_fails", "--ckpt", str(root), "--timeout", "600", deadline_s=120)
    for rep in reports:
        assert "error" not in rep and "missing" not in rep, rep.get("trace") or rep["log"]
        attempts = rep["attempts"]
        assert attempts["good"]["error"] is None and attempts["good"]["steps"] == [1]
        for name, rank in (("shards", 1), ("meta", 0)):
            got = attempts[name]
            assert got["error"] == "CheckpointError", (name, got)
            assert f"rank(s) [{rank}]" in got["message"] and "No space left on device" in got["message"]
            assert "earlier checkpoints" in got["message"] and "--resume" in got["message"]
            assert got["seconds"] < 30, (name, got["seconds"])
            if rep["rank"] == 0:  # rank 0 removes the temporary before it raises
                assert got["folder"] == ["step-000001"], got  # the good one kept
        assert attempts["loaded_step"] == 1  # the good save still verifies and loads
