"""Balancing rules on hand-built inputs: the sign rule, the balance losses against a by-hand
loop over the report's formula, loads summed over micro-batches, MaxVio, and the gradient
path (losses reach the gate weight, the bias never gets a gradient)."""
import pytest
import torch

from dsmoe import ModelArgs, Transformer
from dsmoe.model.moe import RoutingInfo
from dsmoe.train.balance import Balancer, balance_loss, max_violation, update_bias


def test_sign_rule_on_a_hand_built_load():
    bias = torch.tensor([0.5, 0.0, -0.25, 0.0, 1.0])
    load = torch.tensor([10, 0, 5, 5, 5])  # mean 5: expert 0 over, expert 1 under, rest at mean
    update_bias(bias, load, gamma=0.125)
    assert bias.tolist() == [0.375, 0.125, -0.25, 0.0, 1.0]


def test_max_violation():
    assert max_violation(torch.tensor([10, 0, 5, 5])) == pytest.approx(1.0)
    assert max_violation(torch.tensor([3, 3, 3])) == 0.0
    assert max_violation(torch.zeros(4, dtype=torch.long)) == 0.0


def _routing(T, E, K, seed):
    g = torch.Generator().manual_seed(seed)
    scores = torch.rand(T, E, generator=g, dtype=torch.float64).requires_grad_()
    ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])
    return RoutingInfo(ids, torch.ones(T, K), scores, torch.bincount(ids.flatten(), minlength=E))


def _by_hand(info, n_seqs):
    """Report §2.1.2, one sequence at a time, one expert at a time."""
    T, E = info.scores_TE.shape
    K, S = info.ids_TK.shape[1], T // n_seqs
    total = 0.0
    for b in range(n_seqs):
        ids, s = info.ids_TK[b * S:(b + 1) * S], info.scores_TE[b * S:(b + 1) * S]
        for i in range(E):
            f = E / (K * S) * sum(int((ids[t] == i).any()) for t in range(S))
            p = sum(s[t, i] / s[t].sum() for t in range(S)) / S
            total = total + f * p
    return total / n_seqs


@pytest.mark.parametrize("n_seqs", [1, 3])
def test_balance_loss_matches_the_formula(n_seqs):
    info = _routing(T=12, E=6, K=2, seed=n_seqs)
    torch.testing.assert_close(balance_loss(info, n_seqs).double(), _by_hand(info, n_seqs))


def test_balance_loss_is_one_when_perfectly_even():
    # 4 tokens, 4 experts, top-1, each expert chosen once, uniform scores: Σ f_i P_i = 1
    info = RoutingInfo(torch.arange(4)[:, None], torch.ones(4, 1), torch.full((4, 4), 0.3),
                       torch.ones(4, dtype=torch.long))
    assert float(balance_loss(info, 1)) == pytest.approx(1.0)


def test_loads_are_summed_over_micro_batches_and_applied_once():
    args = ModelArgs.from_preset("tiny")
    torch.manual_seed(0)
    model = Transformer(args)
    layers = model.moe_layers()
    balancer = Balancer(layers, "bias", gamma=0.01, alpha=0.0)
    micro = [[_routing(8, args.n_routed_experts, args.n_activated_experts, seed=10 * m + i)
              for i in range(len(layers))] for m in range(3)]
    for routing in micro:
        assert balancer.loss(routing, rows=2) is None  # alpha 0: no loss, loads recorded
        for layer in layers:  # nothing moves before the optimizer step
            assert not layer.gate.bias.any()
    maxvio = balancer.step()
    for i, layer in enumerate(layers):
        load = sum(routing[i].load_E for routing in micro)
        expected = torch.zeros(args.n_routed_experts)
        update_bias(expected, load, 0.01)
        assert torch.equal(layer.gate.bias, expected)
        assert maxvio[i] == max_violation(load)
    assert balancer.step() == []  # a new step starts empty


@pytest.mark.parametrize("mode", ["none", "aux"])
def test_other_modes_leave_the_bias_alone(mode):
    torch.manual_seed(0)
    model = Transformer(ModelArgs.from_preset("tiny"))
    out = model.run(torch.randint(0, 512, (2, 16)), mtp=True)
    balancer = Balancer(model.moe_layers(), mode, gamma=0.5, alpha=0.1, aux_alpha=0.1)
    loss = balancer.loss(out.routing + out.mtp_routing, 2)
    assert (loss is None) == (mode == "none")
    assert len(balancer.step()) == len(model.moe_layers())
    assert all(not layer.gate.bias.any() for layer in model.moe_layers())


@pytest.mark.parametrize("mode, expected_spans", [("bias", 2), ("aux", 1)])
def test_loss_reaches_the_gate_weight_and_not_the_bias(mode, expected_spans):
    torch.manual_seed(0)
    model = Transformer(ModelArgs.from_preset("tiny"))
    out = model.run(torch.randint(0, 512, (2, 16)), mtp=True)
    routing = out.routing + out.mtp_routing
    balancer = Balancer(model.moe_layers(), mode, alpha=0.1, aux_alpha=0.1)
    loss = balancer.loss(routing, 2)
    torch.testing.assert_close(loss, 0.1 * sum(balance_loss(r, expected_spans) for r in routing))
    loss.backward()
    for layer in model.moe_layers():
        assert layer.gate.weight.grad is not None and layer.gate.weight.grad.abs().sum() > 0
        assert not layer.gate.bias.requires_grad


def test_sequence_wise_loss_splits_each_layer_by_its_own_rows():
    torch.manual_seed(0)
    model = Transformer(ModelArgs.from_preset("tiny"))
    out = model.run(torch.randint(0, 512, (4, 16)), mtp=True, mtp_rows=2)
    balancer = Balancer(model.moe_layers(), "bias", alpha=0.1)
    rows = [4] * len(out.routing) + [2] * len(out.mtp_routing)
    loss = balancer.loss(out.routing + out.mtp_routing, rows)
    expected = sum(balance_loss(r, 4) for r in out.routing) + sum(balance_loss(r, 2) for r in out.mtp_routing)
    torch.testing.assert_close(loss, 0.1 * expected)
