"""GRPO's pure functions against hand-computed values, the rollout batch layout, and one
policy update moving probability towards the better completion of a group."""
import math

import pytest
import torch

from dsmoe import ModelArgs, Transformer
from dsmoe.train.config import TrainConfig
from dsmoe.train.grpo import (GRPOConfig, clipped_surrogate, completion_batch, group_advantages,
                              grpo_loss, kl_k3, policy_update, sequence_logprobs, token_logprobs)
from dsmoe.train.math_eval import paired_change
from dsmoe.train.optim import build_optimizer
from dsmoe.errors import ConfigError


def test_group_advantages_by_hand():
    adv = group_advantages(torch.tensor([[1.0, 0.0, 0.0, 1.0]]), eps=0.0)
    # mean 0.5, unbiased std sqrt(1/3): ±0.5·sqrt(3) = ±sqrt(3)/2
    h = math.sqrt(3) / 2
    torch.testing.assert_close(adv[0], torch.tensor([h, -h, -h, h]))
    same = group_advantages(torch.tensor([[2.0, 2.0, 2.0, 2.0]]))
    assert torch.equal(same, torch.zeros(1, 4))  # no spread, no signal (eps keeps it finite)
    with pytest.raises(ValueError):
        group_advantages(torch.ones(3, 1))


def test_token_logprobs_by_hand():
    logits = torch.tensor([[[0.0, math.log(3.0)], [5.0, 5.0]]])  # probs (1/4, 3/4) and (1/2, 1/2)
    lp = token_logprobs(logits, torch.tensor([[1, 0]]))
    torch.testing.assert_close(lp, torch.tensor([[math.log(0.75), math.log(0.5)]]))


def test_k3_by_hand():
    # π = 0.5, π_ref = 0.25: r = 0.5, r − log r − 1 = −0.5 + ln 2
    kl = kl_k3(torch.tensor([math.log(0.5), 0.3]), torch.tensor([math.log(0.25), 0.3]))
    torch.testing.assert_close(kl, torch.tensor([math.log(2) - 0.5, 0.0]))


def test_clipped_surrogate_by_hand():
    logp = torch.log(torch.tensor([[1.5, 1.5, 0.5, 0.5]]))
    old = torch.zeros(1, 4)
    pos, neg = clipped_surrogate(logp, old, torch.tensor([2.0]), 0.2), clipped_surrogate(logp, old, torch.tensor([-2.0]), 0.2)
    # ratio 1.5: min(3, 1.2·2) = 2.4 and min(−3, −2.4) = −3; ratio 0.5: min(1, 1.6) = 1, min(−1, −1.6) = −1.6
    torch.testing.assert_close(pos, torch.tensor([[2.4, 2.4, 1.0, 1.0]]))
    torch.testing.assert_close(neg, torch.tensor([[-3.0, -3.0, -1.6, -1.6]]))


def test_loss_averages_per_sequence_then_over_sequences():
    logp = torch.log(torch.tensor([[1.5, 0.5, 0.9], [1.0, 1.0, 1.0]])).requires_grad_()
    old = torch.zeros(2, 3)
    ref = torch.log(torch.tensor([[0.75, 0.5, 0.9], [1.0, 1.0, 1.0]]))
    adv = torch.tensor([2.0, -1.0])
    mask = torch.tensor([[True, True, False], [True, False, False]])
    beta = 0.5
    loss, stats = grpo_loss(logp, old, ref, adv, mask, clip_eps=0.2, beta=beta)
    # sequence 0: tokens ratio 1.5 (2.4) and 0.5 (1.0); KL: r=0.5 -> ln2-0.5, r=1 -> 0
    seq0 = ((2.4 - beta * (math.log(2) - 0.5)) + (1.0 - 0.0)) / 2
    seq1 = -1.0  # ratio 1, A = -1, KL 0
    assert float(loss.detach()) == pytest.approx(-(seq0 + seq1) / 2)
    assert stats["kl"] == pytest.approx((math.log(2) - 0.5) / 3)
    assert stats["clipped"] == pytest.approx(2 / 3)
    loss2, _ = grpo_loss(logp, old, ref, adv, mask, 0.2, beta, n_sequences=4)
    assert float(loss2.detach()) == pytest.approx(float(loss.detach()) / 2)  # a micro-batch's share of a batch of 4


def test_gradient_at_ratio_one_is_advantage_over_length():
    """With π_old = π (one update per batch) the clip never binds: dJ/dlogp_t = (A − β(1 − r_t)) / |o|."""
    logp = torch.log(torch.tensor([[0.5, 0.4, 0.3]])).requires_grad_()
    ref = torch.log(torch.tensor([[0.25, 0.4, 0.6]]))
    mask = torch.tensor([[True, True, True]])
    loss, _ = grpo_loss(logp, logp.detach(), ref, torch.tensor([1.5]), mask, 0.2, beta=0.1)
    loss.backward()
    r = torch.tensor([0.5, 1.0, 2.0])
    torch.testing.assert_close(logp.grad[0], -(1.5 - 0.1 * (1 - r)) / 3)


def test_completion_batch_masks_only_completion_targets():
    tokens, mask = completion_batch([[1, 2, 3], [4, 5]], [[6, 7], [8, 9, 10]], pad_id=0)
    assert tokens.tolist() == [[1, 2, 3, 6, 7], [4, 5, 8, 9, 10]]
    # position t predicts tokens[t+1]: targets 6, 7 for row 0 and 8, 9, 10 for row 1
    assert mask.tolist() == [[False, False, True, True], [False, True, True, True]]
    tokens, mask = completion_batch([[1]], [[2]], pad_id=0)
    assert mask.tolist() == [[True]]


def test_paired_change_by_hand():
    c = paired_change({"correct": [1, 0, 0, 1, 0]}, {"correct": [1, 1, 1, 0, 0]})
    # differences 0, 1, 1, -1, 0: mean 0.2, sample variance 2.8 / 4 = 0.7, stderr sqrt(0.7 / 5)
    assert c["change"] == pytest.approx(0.2) and c["stderr"] == pytest.approx(math.sqrt(0.14))
    assert (c["improved"], c["worsened"], c["draws"]) == (2, 1, 5)
    assert c["p_value"] == pytest.approx(1.0)  # 2 * P(Bin(3, 1/2) <= 1) = 2 * 4/8, capped at 1
    ten_up = paired_change({"correct": [0] * 12}, {"correct": [1] * 10 + [0] * 2})
    assert ten_up["p_value"] == pytest.approx(2 / 1024)  # all 10 discordant draws improved
    with pytest.raises(ValueError):
        paired_change({"correct": [1]}, {"correct": [1, 0]})


def test_one_update_moves_probability_towards_the_better_completion():
    torch.manual_seed(0)
    model = Transformer(ModelArgs.from_preset("tiny"))
    ref = Transformer(ModelArgs.from_preset("tiny"))
    ref.load_state_dict(model.state_dict())
    prompt = [1, 20, 30, 40]
    good, bad = [50, 60, 70, 80], [90, 100, 110, 120]
    tokens, mask = completion_batch([prompt, prompt], [good, bad], pad_id=0)
    cfg = GRPOConfig(lr=3e-3, micro_batch=1, beta=0.04)
    optimizer = build_optimizer(model, TrainConfig(lr=cfg.lr, weight_decay=0.0, steps=1, warmup_steps=0))

    def seq_logp():
        with torch.no_grad():
            return (sequence_logprobs(model, tokens) * mask).sum(-1)

    before = seq_logp()
    adv = group_advantages(torch.tensor([[1.0, 0.0]])).flatten()
    stats = policy_update(model, ref, optimizer, tokens, mask, adv, cfg, None)
    after = seq_logp()
    assert after[0] > before[0] and after[1] < before[1]
    assert stats["kl"] == pytest.approx(0.0, abs=1e-6)  # measured before the step: π = π_ref


@pytest.mark.parametrize("field, value", [("group_size", 1), ("temperature", 0.0), ("clip_eps", 1.5),
                                          ("iterations", 0), ("difficulty", 9), ("beta", -1.0)])
def test_bad_settings_are_refused(field, value):
    with pytest.raises(ConfigError, match=field):
        GRPOConfig(**{field: value}).validate()
