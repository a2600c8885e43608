"""DeepSeekMoE: the gate's selection rules and grouped == loop experts."""
import pytest
import torch

from dsmoe import ModelArgs
from dsmoe.model.moe import MoE, Gate


def make_gate(**overrides) -> Gate:
    args = ModelArgs.from_preset("tiny").replace(**overrides)
    gate = Gate(args)
    torch.nn.init.normal_(gate.weight, 0.0, 0.3)  # Gate allocates with torch.empty: no garbage (NaN) weights
    return gate


def test_group_limited_topk_on_hand_built_scores():
    # 8 experts in 4 groups of 2; keep 2 groups; top-3.
    gate = make_gate(dim=8, n_routed_experts=8, n_expert_groups=4, n_limited_groups=2,
                     n_activated_experts=3, route_scale=1.0)
    scores = torch.tensor([0.90, 0.10,   # group 0: top-2 sum 1.00
                           0.50, 0.45,   # group 1: 0.95
                           0.80, 0.05,   # group 2: 0.85
                           0.60, 0.60])  # group 3: 1.20
    gate.weight.data = torch.diag(torch.logit(scores))
    weights, ids, _ = gate(torch.ones(1, 8))  # x = ones: logits = the diagonal
    # Groups 3 and 0 are kept; expert 4 (0.80) is dropped with its group although it beats
    # experts 6 and 7: top-3 among the kept {0: .9, 1: .1, 6: .6, 7: .6} is {0, 6, 7}.
    assert sorted(ids[0].tolist()) == [0, 6, 7]
    torch.testing.assert_close(weights[0].sum(), torch.tensor(1.0))


def test_dropped_groups_are_minus_infinity_not_zero():
    # With a negative bias every kept score is negative; a zero fill would pick dropped experts.
    gate = make_gate(dim=8, n_routed_experts=8, n_expert_groups=4, n_limited_groups=1,
                     n_activated_experts=2)
    gate.weight.data = torch.diag(torch.logit(torch.full((8,), 0.5)))
    gate.bias.copy_(torch.tensor([-0.1, -0.2, -5, -5, -5, -5, -5, -5]))
    _, ids, _ = gate(torch.ones(1, 8))
    assert sorted(ids[0].tolist()) == [0, 1]


def test_bias_changes_choice_but_not_weights():
    torch.manual_seed(0)
    gate = make_gate(dim=16, n_routed_experts=8, n_expert_groups=1, n_limited_groups=1,
                     n_activated_experts=2, topk_method="noaux_tc", route_scale=2.5)
    x = torch.randn(64, 16)
    w0, ids0, s0 = gate(x)
    gate.bias[3] = 10.0  # force expert 3 into every selection
    w1, ids1, s1 = gate(x)
    assert (ids1 == 3).any(-1).all() and not (ids0 == 3).any(-1).all()
    torch.testing.assert_close(s1, s0)  # affinities themselves are unbiased
    # The weight given to each chosen expert is its unbiased affinity, normalised, x route_scale.
    expected = s1.gather(1, ids1)
    expected = expected / expected.sum(-1, keepdim=True) * 2.5
    torch.testing.assert_close(w1, expected)


def test_group_score_max_for_v2_style_routing():
    gate = make_gate(dim=8, n_routed_experts=8, n_expert_groups=4, n_limited_groups=1,
                     n_activated_experts=2, topk_method="group_limited_greedy", score_func="softmax",
                     norm_topk_prob=False, route_scale=1.0)
    # group 0 has the single best expert; group 3 the best top-2 sum.
    logits = torch.tensor([3.0, -9.0, 0.0, 0.0, 0.0, 0.0, 2.5, 2.5])
    gate.weight.data = torch.diag(logits)
    w, ids, scores = gate(torch.ones(1, 8))
    assert sorted(ids[0].tolist()) == [0, 1]  # max-scored group 0 wins under V2 rules
    torch.testing.assert_close(w[0], scores[0, ids[0]])  # unnormalised
    torch.testing.assert_close(scores.sum(), torch.tensor(1.0))


@pytest.mark.parametrize("n_shared", [0, 1])
def test_grouped_equals_loop_forward_and_backward(n_shared):
    torch.manual_seed(0)
    args = ModelArgs.from_preset("tiny").replace(n_shared_experts=n_shared)
    moe = MoE(args)
    for p in moe.parameters():
        torch.nn.init.normal_(p, 0, 0.3)
    x = torch.randn(2, 37, args.dim)

    def run(impl):
        moe.experts.impl = impl
        moe.zero_grad()
        xi = x.clone().requires_grad_(True)
        y, routing = moe(xi)
        (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
        grads = {n: p.grad.clone() for n, p in moe.named_parameters()}
        return y.detach(), xi.grad, grads, routing

    y_g, dx_g, g_g, r_g = run("grouped")
    y_l, dx_l, g_l, r_l = run("loop")
    torch.testing.assert_close(y_g, y_l, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dx_g, dx_l, atol=1e-5, rtol=1e-5)
    for name in g_l:
        torch.testing.assert_close(g_g[name], g_l[name], atol=1e-5, rtol=1e-5, msg=name)
    assert int(r_g.load_E.sum()) == 2 * 37 * args.n_activated_experts
    assert torch.equal(r_g.load_E, torch.bincount(r_g.ids_TK.flatten(), minlength=args.n_routed_experts))


def test_experts_with_no_tokens_still_work():
    torch.manual_seed(0)
    args = ModelArgs.from_preset("tiny")
    moe = MoE(args)
    for p in moe.parameters():
        torch.nn.init.normal_(p, 0, 0.3)
    moe.gate.bias.copy_(torch.tensor([9.0, 9.0, 9.0] + [0.0] * 5))  # only experts 0-2 used
    x = torch.randn(5, args.dim)
    moe.experts.impl = "grouped"
    y_g, r = moe(x)
    assert r.load_E[3:].sum() == 0
    moe.experts.impl = "loop"
    y_l, _ = moe(x)
    torch.testing.assert_close(y_g, y_l, atol=1e-5, rtol=1e-5)
