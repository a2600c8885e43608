"""Parameter groups and learning-rate schedules, by known values."""
import math

import pytest

from dsmoe import ModelArgs, Transformer
from dsmoe.errors import ConfigError
from dsmoe.train.config import TrainConfig
from dsmoe.train.optim import build_optimizer, lr_at, param_groups


def test_no_decay_on_norms_and_embedding_only():
    model = Transformer(ModelArgs.from_preset("tiny"))
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay_names = {names[id(p)] for p in no_decay["params"]}
    decay_names = {names[id(p)] for p in decay["params"]}
    assert "embed.weight" in no_decay_names
    assert all(n == "embed.weight" or "norm" in n for n in no_decay_names)
    assert {"head.weight", "layers.1.ffn.gate.weight", "layers.1.ffn.experts.w1_EFD",
            "mtp.0.eh_proj.weight", "layers.0.attn.wkv_b.weight"} <= decay_names
    assert len(decay_names) + len(no_decay_names) == len(list(model.parameters()))
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    buffers = {n for n, _ in model.named_buffers()}
    assert "layers.1.ffn.gate.bias" in buffers  # moved by the balancer, not the optimizer
    optimizer = build_optimizer(model, TrainConfig(weight_decay=0.1))
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.1, 0.0]


def test_warmup_then_cosine():
    cfg = TrainConfig(steps=101, lr=1.0, min_lr_ratio=0.1, warmup_steps=10, schedule="cosine")
    assert [lr_at(s, cfg) for s in range(3)] == [0.1, 0.2, pytest.approx(0.3)]
    assert lr_at(9, cfg) == 1.0
    assert lr_at(10, cfg) == 1.0  # cosine starts at the peak
    assert lr_at(100, cfg) == pytest.approx(0.1)  # ... and ends at the floor on the last step
    assert lr_at(55, cfg) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 45 / 90)))


def test_warmup_stable_decay():
    cfg = TrainConfig(steps=100, lr=2.0, min_lr_ratio=0.0, warmup_steps=10, schedule="wsd",
                      decay_fraction=0.2)
    assert lr_at(4, cfg) == 1.0
    assert all(lr_at(s, cfg) == 2.0 for s in range(10, 80))
    assert lr_at(80, cfg) == pytest.approx(2.0 * (1 - 1 / 20))
    assert lr_at(99, cfg) == 0.0
    values = [lr_at(s, cfg) for s in range(80, 100)]
    assert values == sorted(values, reverse=True)


def test_constant_schedule():
    cfg = TrainConfig(steps=50, lr=0.5, warmup_steps=0, schedule="constant")
    assert {lr_at(s, cfg) for s in range(50)} == {0.5}


@pytest.mark.parametrize("change", [{"schedule": "linear"}, {"balance": "loss"}, {"lr": 0.0},
                                    {"steps": 0}, {"min_lr_ratio": 1.5}, {"beta2": 1.0},
                                    {"domains": []}, {"gamma": -1.0}])
def test_bad_settings_are_named(change):
    field = next(iter(change))
    with pytest.raises(ConfigError, match=f"TrainConfig.{field}"):
        TrainConfig(**change)
