"""Sampling: temperature, top-k, top-p by hand; per-row settings; seeds."""
import math

import pytest
import torch

from dsmoe.errors import DsmoeError
from dsmoe.infer.sampling import SamplingBatch, SamplingParams, filter_logits, next_tokens, probs


def batch(*params: SamplingParams) -> SamplingBatch:
    return SamplingBatch.build(list(params), [p.generator("cpu") for p in params], "cpu")


LOGITS = torch.log(torch.tensor([[0.05, 0.4, 0.1, 0.3, 0.15]]))  # probabilities by hand


def test_greedy_is_one_hot_at_argmax():
    p = probs(LOGITS, batch(SamplingParams()))
    assert p.tolist() == [[0.0, 1.0, 0.0, 0.0, 0.0]]


def test_temperature_by_hand():
    p = probs(LOGITS, batch(SamplingParams(temperature=0.5)))
    expected = torch.tensor([[0.05, 0.4, 0.1, 0.3, 0.15]]) ** 2
    torch.testing.assert_close(p, expected / expected.sum())


def test_top_k_keeps_the_k_best():
    p = probs(LOGITS, batch(SamplingParams(temperature=1.0, top_k=2)))
    torch.testing.assert_close(p, torch.tensor([[0.0, 0.4, 0.0, 0.3, 0.0]]) / 0.7)


@pytest.mark.parametrize("top_p, kept", [(0.4, [1]), (0.41, [1, 3]), (0.7, [1, 3]), (0.71, [1, 3, 4]),
                                         (1.0, [0, 1, 2, 3, 4])])
def test_top_p_keeps_the_smallest_nucleus(top_p, kept):
    p = probs(LOGITS, batch(SamplingParams(temperature=1.0, top_p=top_p)))
    assert (p[0] > 0).nonzero().flatten().tolist() == kept
    assert math.isclose(float(p.sum()), 1.0, rel_tol=1e-6)


def test_top_p_applies_to_the_top_k_distribution():
    out = filter_logits(LOGITS, torch.tensor([3]), torch.tensor([0.8]))
    # top-3 = {1, 3, 4} renormalised is 0.47, 0.35, 0.18: 1 and 3 already hold 0.82 >= 0.8
    # (over the full distribution they hold only 0.7, and 4 would be kept)
    assert torch.isfinite(out[0]).nonzero().flatten().tolist() == [1, 3]


def test_rows_keep_their_own_settings():
    logits = torch.randn(3, 50)
    rows = [SamplingParams(), SamplingParams(temperature=0.7, top_k=5), SamplingParams(temperature=1.3, top_p=0.5)]
    together = probs(logits, batch(*rows))
    for i, row in enumerate(rows):
        torch.testing.assert_close(together[i:i + 1], probs(logits[i:i + 1], batch(row)))


def test_seed_reproduces_and_rows_do_not_share_randomness():
    logits = torch.zeros(1, 1000)  # uniform: every draw is pure chance
    def draws(*params, n=20):
        s = batch(*params)
        return [next_tokens(logits.expand(len(params), -1), s).tolist() for _ in range(n)]
    alone = [d[0] for d in draws(SamplingParams(temperature=1.0, seed=7))]
    with_others = [d[1] for d in draws(SamplingParams(temperature=1.0, seed=3), SamplingParams(temperature=1.0, seed=7))]
    assert alone == with_others
    assert alone != [d[0] for d in draws(SamplingParams(temperature=1.0, seed=8))]


def test_sampled_frequencies_follow_the_distribution():
    s = SamplingBatch.build([SamplingParams(temperature=1.0)] * 20000, [], "cpu")
    p = probs(LOGITS.expand(20000, -1), s)
    draws = torch.multinomial(p, 1, generator=torch.Generator().manual_seed(0)).flatten()
    freq = torch.bincount(draws, minlength=5).float() / 20000
    torch.testing.assert_close(freq, torch.tensor([0.05, 0.4, 0.1, 0.3, 0.15]), atol=0.015, rtol=0)


@pytest.mark.parametrize("changes, message", [
    ({"max_tokens": 0}, "max_tokens=0"), ({"max_tokens": 2.5}, "max_tokens"),
    ({"temperature": -1}, "temperature"), ({"top_k": -2}, "top_k"), ({"top_p": 0}, "top_p"),
    ({"top_p": 1.5}, "top_p"), ({"seed": "x"}, "seed"), ({"stop": [""]}, "stop"),
    ({"stop_token_ids": [-1]}, "stop_token_ids"), ({"temperature": True}, "temperature")])
def test_bad_params_are_named(changes, message):
    with pytest.raises(DsmoeError, match=message):
        SamplingParams(**changes).validate()
