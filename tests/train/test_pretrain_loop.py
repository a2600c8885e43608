"""The pretraining loop on the tiny preset and a tiny prepared dataset: exact resume after
SIGKILL, balancing that works, the MTP loss convention, and every bad input stopped with a
clear error before anything is lost."""
import errno
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from dsmoe import ModelArgs, Transformer
from dsmoe.errors import CheckpointError, ConfigError, DataError
from dsmoe.train import checkpoint as ckpt
from dsmoe.train import pretrain
from dsmoe.train.config import TrainConfig, load_run_config
from dsmoe.train.optim import TrainingDiverged
from dsmoe.train.pretrain import lm_losses, train
from dsmoe.train.run_dir import read_metrics

ROOT = Path(__file__).resolve().parents[2]
TINY = ModelArgs.from_preset("tiny")
SETTINGS = dict(batch_size=4, seq_len=64, lr=3e-3, warmup_steps=5, eval_interval=10,
                eval_batches=2, ckpt_interval=10, keep_last=2, threads=1)


@pytest.fixture(scope="module")
def data(two_domains):
    return two_domains


def cfg(**changes) -> TrainConfig:
    return TrainConfig(**{**SETTINGS, **changes})


# ---------------------------------------------------------------- exact resume
def _train_cli(config: Path, data: Path, out: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-m", "dsmoe", "train", "--config", str(config),
                             "--data", str(data), "--out", str(out), "--steps", "24",
                             "--no-progress", *extra],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _last_logged_step(out: Path) -> int:
    """The last step of a log being written: only complete lines count."""
    path = out / "metrics.jsonl"
    text = path.read_text() if path.exists() else ""
    lines = text[:text.rfind("\n") + 1].splitlines()
    return max((json.loads(line)["step"] for line in lines), default=0)


def _steps(out: Path) -> list[dict]:
    return [m for m in read_metrics(out) if "loss" in m]


@pytest.mark.slow
def test_sigkill_then_resume_gives_the_same_losses_bit_for_bit(data, tmp_path):
    config = tmp_path / "run.json"
    config.write_text(json.dumps({"model": "tiny", **SETTINGS}))
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    assert _train_cli(config, data, whole).wait() == 0

    victim = _train_cli(config, data, broken)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:  # past the step-10 checkpoint, before the step-20 one
        if _last_logged_step(broken) >= 13:
            break
        time.sleep(0.01)
    victim.send_signal(signal.SIGKILL)
    assert victim.wait() == -signal.SIGKILL
    saved = [s for s, _ in ckpt.list_checkpoints(broken / "checkpoints")]
    assert saved and saved[-1] < 24  # usually [10]; [10, 20] on a badly starved machine
    assert _last_logged_step(broken) >= 13  # steps logged after the checkpoint, run again

    resumed = _train_cli(config, data, broken, "--resume")
    assert resumed.wait() == 0, resumed.stderr.read().decode()
    a, b = read_metrics(whole), read_metrics(broken)
    assert [m["step"] for m in a] == [m["step"] for m in b]
    for x, y in zip(a, b):
        x.pop("tokens_per_s", None), y.pop("tokens_per_s", None)
        assert x == y  # losses, grad norms, MaxVio and validation losses: equal floats
    assert len([m for m in b if "loss" in m]) == 24
    for name in ("state.pt",):  # the final weights (gate biases included) too
        sa = torch.load(whole / "checkpoints/step-000024" / name, weights_only=True)
        sb = torch.load(broken / "checkpoints/step-000024" / name, weights_only=True)
        assert all(torch.equal(sa["model"][k], sb["model"][k]) for k in sa["model"])


# ---------------------------------------------------------------- balancing
def _mean_maxvio(records: list[dict]) -> float:
    return statistics.mean(statistics.mean(m["maxvio"]) for m in records)


def test_bias_balances_the_experts_better_than_nothing(data, tmp_path):
    settings = dict(steps=40, eval_interval=0, ckpt_interval=0)
    none = train(TINY, cfg(balance="none", **settings), data, tmp_path / "none", export=False)
    bias = train(TINY, cfg(balance="bias", gamma=0.01, **settings), data, tmp_path / "bias",
                 export=False)
    assert _mean_maxvio(bias.metrics[-10:]) < 0.75 * _mean_maxvio(none.metrics[-10:])
    assert _mean_maxvio(bias.metrics[-10:]) < _mean_maxvio(bias.metrics[:10])  # falls as it trains
    model_bias = torch.load(ckpt.latest_checkpoint(tmp_path / "bias/checkpoints") / "state.pt",
                            weights_only=True)["model"]
    model_none = torch.load(ckpt.latest_checkpoint(tmp_path / "none/checkpoints") / "state.pt",
                            weights_only=True)["model"]
    gates = [k for k in model_bias if k.endswith("gate.bias")]
    assert len(gates) == TINY.n_moe_layers + TINY.n_mtp_layers
    assert all(model_bias[k].abs().sum() > 0 for k in gates)
    assert all(not model_none[k].any() for k in gates)


# ---------------------------------------------------------------- objective
def test_mtp_depth_k_predicts_k_plus_one_ahead():
    torch.manual_seed(0)
    model = Transformer(TINY.replace(n_mtp_layers=2))
    tokens = torch.randint(0, TINY.vocab_size, (2, 17))
    T = 16
    out = model.run(tokens[:, :T], mtp=True)
    main, mtp = lm_losses(out, tokens, T)
    torch.testing.assert_close(main, F.cross_entropy(out.logits.reshape(-1, 512), tokens[:, 1:].reshape(-1)))
    by_hand = []
    for k in (1, 2):  # position i of depth k predicts token i + k + 1, for i < T - k
        logits = out.mtp_logits[k - 1]
        assert logits.shape == (2, T - k, TINY.vocab_size)
        by_hand.append(F.cross_entropy(logits.reshape(-1, 512), tokens[:, k + 1:].reshape(-1)))
    torch.testing.assert_close(mtp, (by_hand[0] + by_hand[1]) / 2)



def test_mtp_on_the_first_rows_is_the_full_mtp_of_those_rows():
    torch.manual_seed(0)
    model = Transformer(TINY.replace(n_mtp_layers=2))
    tokens = torch.randint(0, TINY.vocab_size, (4, 17))
    T = 16
    full, part = model.run(tokens[:, :T], mtp=True), model.run(tokens[:, :T], mtp=True, mtp_rows=1)
    torch.testing.assert_close(part.logits, full.logits)
    for k, (logits, whole) in enumerate(zip(part.mtp_logits, full.mtp_logits), start=1):
        assert logits.shape == (1, T - k, TINY.vocab_size)
        torch.testing.assert_close(logits, whole[:1])
    assert part.mtp_routing[0].ids_TK.shape[0] == T - 1  # one row's tokens were routed
    main, mtp = lm_losses(part, tokens, T)
    by_hand = [F.cross_entropy(part.mtp_logits[k - 1][0], tokens[0, k + 1:]) for k in (1, 2)]
    torch.testing.assert_close(mtp, (by_hand[0] + by_hand[1]) / 2)
    fused = model.run(tokens[:, :T], mtp=True, mtp_rows=1, head_loss=pretrain.next_token_losses(tokens, T))
    for got, want in zip(lm_losses(fused, tokens, T), (main, mtp)):  # the training step's head
        torch.testing.assert_close(got, want)
    with pytest.raises(ConfigError, match="mtp_fraction"):
        TrainConfig(mtp_fraction=0)

class _GradientRecorder:
    """Stands in for the optimizer: keeps the gradients the step would apply."""

    def __init__(self, model):
        self.model, self.param_groups, self.grads = model, [{"lr": 0.0}], {}

    def step(self):
        self.grads = {n: p.grad.clone() for n, p in self.model.named_parameters()}

    def zero_grad(self, set_to_none=True):
        self.model.zero_grad(set_to_none=set_to_none)


def test_accumulated_micro_batches_equal_one_big_batch(tmp_path):
    """grad_accum=2 over two halves == one step on the whole batch: same losses, gradients
    and bias move (the loads of both micro-batches are summed before the sign rule)."""
    from dsmoe.train.balance import Balancer
    from dsmoe.train.pretrain import train_step
    tokens = torch.randint(0, TINY.vocab_size, (4, 33), generator=torch.Generator().manual_seed(0))
    results = []
    for batch_size, accum, stream in ((4, 1, [tokens]), (2, 2, [tokens[:2], tokens[2:]])):
        torch.manual_seed(0)
        model = Transformer(TINY)
        c = cfg(batch_size=batch_size, grad_accum=accum, seq_len=32, gamma=0.01, alpha=0.01)
        recorder = _GradientRecorder(model)
        balancer = Balancer(model.moe_layers(), "bias", c.gamma, c.alpha)
        metrics = train_step(model, recorder, balancer, iter(stream), c, 0, torch.device("cpu"),
                             tmp_path)
        biases = {n: b.clone() for n, b in model.named_buffers() if n.endswith("gate.bias")}
        results.append((metrics, recorder.grads, biases))
    (one, grads_one, bias_one), (two, grads_two, bias_two) = results
    for key in ("loss", "mtp_loss", "balance_loss", "grad_norm"):
        assert two[key] == pytest.approx(one[key], rel=1e-5)
    assert two["maxvio"] == one["maxvio"]
    for name in grads_one:
        torch.testing.assert_close(grads_two[name], grads_one[name], rtol=1e-4, atol=1e-7)
    assert all(torch.equal(bias_two[n], bias_one[n]) for n in bias_one)
    assert any(b.any() for b in bias_one.values())


def test_training_learns_and_writes_an_hf_model(data, tmp_path):
    result = train(TINY, cfg(steps=20), data, tmp_path / "run")
    steps = _steps(tmp_path / "run")
    assert [m["step"] for m in steps] == list(range(1, 21))
    assert statistics.mean(m["loss"] for m in steps[-5:]) < steps[0]["loss"] - 1.0
    assert set(result.val) == {"math", "prose"}
    assert all(len(m["maxvio"]) == TINY.n_moe_layers + TINY.n_mtp_layers for m in steps)
    assert (result.hf_dir / "tokenizer.json").is_file() and (result.hf_dir / "config.json").is_file()
    from dsmoe.interop.hf import load_hf
    reloaded = load_hf(result.hf_dir)
    tokens = torch.randint(0, 512, (1, 12))
    final = torch.load(result.checkpoint / "state.pt", weights_only=True)["model"]
    model = Transformer(TINY)
    model.load_state_dict(final)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(tokens), model.eval()(tokens))


# ---------------------------------------------------------------- bad input
def test_missing_or_empty_data(tmp_path):
    with pytest.raises(DataError, match="does not exist.*dsmoe prepare"):
        train(TINY, cfg(steps=2), tmp_path / "nowhere", tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no manifest.json"):
        train(TINY, cfg(steps=2), tmp_path / "empty", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_tokenizer_larger_than_the_model_vocabulary(data, tmp_path):
    with pytest.raises(DataError, match="512 tokens but the model's vocab_size is 300"):
        train(TINY.replace(vocab_size=300), cfg(steps=2), data, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_unknown_domain_and_too_long_sequences(data, tmp_path):
    with pytest.raises(DataError, match=r"\['poetry'\]"):
        train(TINY, cfg(steps=2, domains=["poetry"]), data, tmp_path / "out")
    with pytest.raises(ConfigError, match="max_seq_len=128"):
        train(TINY, cfg(steps=2, seq_len=256), data, tmp_path / "out")


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(data, tmp_path, monkeypatch):
    calls = []
    real = pretrain.lm_losses

    def poisoned(out, tokens, T):
        calls.append(1)
        main, mtp = real(out, tokens, T)
        return (main * float("nan"), mtp) if len(calls) == 13 else (main, mtp)

    monkeypatch.setattr(pretrain, "lm_losses", poisoned)
    with pytest.raises(TrainingDiverged, match=r"loss is nan at step 13.*step-000010 \(step 10\)"):
        train(TINY, cfg(steps=30), data, tmp_path / "run")
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path / "run/checkpoints")] == [10]
    assert max(m["step"] for m in _steps(tmp_path / "run")) == 12
    ckpt.load_checkpoint(ckpt.checkpoint_dir(tmp_path / "run/checkpoints", 10))  # intact


def test_full_disk_while_checkpointing(data, tmp_path, monkeypatch):
    real_write = ckpt._HashingWriter.write
    disk = {"full": False}

    def write(self, chunk):
        if disk["full"]:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(self, chunk)

    def fill_the_disk(metrics):
        disk["full"] = metrics["step"] >= 15

    monkeypatch.setattr(ckpt._HashingWriter, "write", write)
    with pytest.raises(CheckpointError, match=r"step 20 .*No space left on device.*step-000010 is intact"):
        train(TINY, cfg(steps=30), data, tmp_path / "run", on_step=fill_the_disk)
    monkeypatch.undo()
    assert [p.name for p in (tmp_path / "run/checkpoints").iterdir()] == ["step-000010"]
    state, _ = ckpt.load_checkpoint(ckpt.latest_checkpoint(tmp_path / "run/checkpoints"))
    assert state["step"] == 10


def test_resume_refuses_a_changed_config_and_shows_the_difference(data, tmp_path):
    train(TINY, cfg(steps=10), data, tmp_path / "run", export=False)
    with pytest.raises(ConfigError, match=r"train\.lr: 0\.003 -> 0\.001\n\s+train\.steps: 10 -> 12"):
        train(TINY, cfg(steps=12, lr=1e-3), data, tmp_path / "run", resume=True)
    with pytest.raises(ConfigError, match=r"model\.dim: 64 -> 32"):
        train(TINY.replace(dim=32), cfg(steps=10), data, tmp_path / "run", resume=True)
    with pytest.raises(ConfigError, match="already holds a run; continue it with --resume"):
        train(TINY, cfg(steps=10), data, tmp_path / "run")
    # settings that change nothing computed may differ
    train(TINY, cfg(steps=10, max_seconds=100.0, log_interval=3), data, tmp_path / "run",
          resume=True, export=False)


def test_resume_refuses_a_corrupt_checkpoint(data, tmp_path):
    train(TINY, cfg(steps=10), data, tmp_path / "run", export=False)
    state = ckpt.checkpoint_dir(tmp_path / "run/checkpoints", 10) / "state.pt"
    data_bytes = bytearray(state.read_bytes())
    data_bytes[-100] ^= 1
    state.write_bytes(bytes(data_bytes))
    with pytest.raises(CheckpointError, match="step-000010 is corrupt: the sha256"):
        train(TINY, cfg(steps=10), data, tmp_path / "run", resume=True)
    with pytest.raises(CheckpointError, match="nothing to resume"):
        train(TINY, cfg(steps=10), data, tmp_path / "fresh", resume=True)


def test_cli_reports_bad_input_without_a_traceback(data, tmp_path, capsys):
    from dsmoe import cli
    code = cli.main(["train", "--preset", "tiny", "--data", str(tmp_path / "nowhere"),
                     "--out", str(tmp_path / "out"), "--steps", "3"])
    assert code == 1
    assert "dsmoe train: error: data directory" in capsys.readouterr().err


# ---------------------------------------------------------------- run config files
def test_run_config_files(tmp_path):
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"model": "tiny", "lr": 0.01, "balance": "aux"}))
    args, c = load_run_config(config=path, steps=7)
    assert args == TINY and (c.lr, c.balance, c.steps) == (0.01, "aux", 7)
    path.write_text(json.dumps({"model": {**TINY.to_dict(), "dim": 32}, "seq_len": 64}))
    assert load_run_config(config=path)[0].dim == 32
    path.write_text(json.dumps({"lr": 0.02}))
    assert load_run_config(preset="tiny", config=path)[1].lr == 0.02
    with pytest.raises(ConfigError, match="name the model"):
        load_run_config(config=path)
    path.write_text(json.dumps({"model": "tiny", "learning_rate": 1}))
    with pytest.raises(ConfigError, match=r"unknown training setting\(s\) \['learning_rate'\]"):
        load_run_config(config=path)
    path.write_text(json.dumps({"model": "tiny"}))
    with pytest.raises(ConfigError, match="names a model and --preset small"):
        load_run_config(preset="small", config=path)
