"""Expansion: where old and new experts go, the group rules, function preservation when the
new experts are never chosen, freezing the old experts, and the HF round trip."""
import pytest
import torch

from dsmoe import ModelArgs, Transformer
from dsmoe.errors import ConfigError
from dsmoe.train.config import TrainConfig
from dsmoe.train.expand import ExpansionPlan, expand_model, freeze_old
from dsmoe.train.optim import build_optimizer


@pytest.fixture()
def model():
    torch.manual_seed(0)
    m = Transformer(ModelArgs.from_preset("tiny")).eval()
    with torch.no_grad():  # a trained-looking bias, so that copying it is visible
        for moe in m.moe_layers():
            moe.gate.bias.copy_(torch.linspace(-0.05, 0.05, 8))
    return m


def test_plan_inserts_new_experts_at_the_end_of_each_group():
    plan = ExpansionPlan(ModelArgs.from_preset("tiny"), 4)  # 8 experts in 4 groups of 2 -> 4 of 3
    assert plan.old_to_new.tolist() == [0, 1, 3, 4, 6, 7, 9, 10]
    assert plan.new_slots.tolist() == [2, 5, 8, 11]
    assert plan.new_args.n_routed_experts == 12
    assert plan.donors(None) == [0, 2, 4, 6]
    assert plan.donors(torch.tensor([0.1, 0.9, 0.5, 0.2, 0.0, 0.0, 0.3, 0.4])) == [1, 2, 4, 7]
    eight = ExpansionPlan(ModelArgs.from_preset("tiny"), 8)
    assert eight.donors(torch.tensor([0.1, 0.9, 0.5, 0.2, 0.0, 0.0, 0.3, 0.4]))[:2] == [1, 0]


@pytest.mark.parametrize("n, message", [(3, "breaks the group rules"), (6, "multiple of 4"),
                                        (0, "at least one")])
def test_expansions_that_break_the_rules_are_refused(n, message):
    with pytest.raises(ConfigError, match=message):
        ExpansionPlan(ModelArgs.from_preset("tiny"), n)


def test_copies_carry_their_donors_weights_gate_rows_and_bias(model):
    new, plan = expand_model(model, 4, "copy", noise=0.0)
    donors = plan.donors(None)
    for old_moe, new_moe in zip(model.moe_layers(), new.moe_layers()):
        for w in ("w1_EFD", "w3_EFD", "w2_EDF"):
            old_w, new_w = getattr(old_moe.experts, w), getattr(new_moe.experts, w)
            assert torch.equal(new_w[plan.old_to_new], old_w)
            assert torch.equal(new_w[plan.new_slots], old_w[donors])
        assert torch.equal(new_moe.gate.weight[plan.new_slots], old_moe.gate.weight[donors])
        assert torch.equal(new_moe.gate.bias[plan.new_slots], old_moe.gate.bias[donors])
    noisy, _ = expand_model(model, 4, "copy", noise=0.01, seed=1)
    diff = (noisy.moe_layers()[0].experts.w1_EFD[2] - model.moe_layers()[0].experts.w1_EFD[0]).detach()
    assert 0 < float(diff.abs().max()) < 0.01


def test_fresh_experts_start_from_the_group_mean_router(model):
    new, plan = expand_model(model, 4, "fresh", noise=0.0)
    old_moe, new_moe = model.moe_layers()[0], new.moe_layers()[0]
    torch.testing.assert_close(new_moe.gate.weight[2], old_moe.gate.weight[0:2].mean(0))
    torch.testing.assert_close(new_moe.gate.bias[2], old_moe.gate.bias[0:2].mean())
    assert 0.01 < float(new_moe.experts.w1_EFD[2].detach().std()) < 0.03  # init_std 0.02


def test_never_chosen_new_experts_leave_the_model_unchanged(model):
    """Old experts keep their groups: with the new experts never selected, routing (group
    scores included) and outputs are those of the original model."""
    new, plan = expand_model(model, 4, "copy", noise=0.05)
    with torch.no_grad():
        for moe in new.moe_layers():
            moe.gate.bias[plan.new_slots] = -1e4
    tokens = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = model.run(tokens, mtp=True), new.run(tokens, mtp=True)
    torch.testing.assert_close(b.logits, a.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(b.mtp_logits[0], a.mtp_logits[0], rtol=1e-5, atol=1e-5)
    for ra, rb in zip(a.routing, b.routing):
        assert torch.equal(plan.old_to_new[ra.ids_TK], rb.ids_TK)


def test_frozen_old_experts_stay_exact_while_new_ones_train(model):
    new, plan = expand_model(model, 4, "copy", noise=0.01)
    before = {k: v.clone() for k, v in new.state_dict().items()}
    freeze = freeze_old(new, plan)
    cfg = TrainConfig(lr=1e-2, weight_decay=0.5, steps=3, warmup_steps=0)
    optimizer = build_optimizer(new, cfg)
    new.train()
    for step in range(3):
        tokens = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(step))
        new(tokens).logsumexp(-1).mean().backward()
        freeze.zero_grads()
        optimizer.step()
        optimizer.zero_grad()
        with torch.no_grad():  # what the balancer does after a step: move every bias
            for moe in new.moe_layers():
                moe.gate.bias += 0.01
        freeze.restore()
    after = new.state_dict()
    main = ("layers.1.ffn", "layers.2.ffn")
    for name, value in after.items():
        grows = name.startswith(main) and (".experts." in name or name.endswith("gate.weight"))
        if grows:
            assert torch.equal(value[plan.old_to_new], before[name][plan.old_to_new]), name
            assert not torch.equal(value[plan.new_slots], before[name][plan.new_slots]), name
        elif name.startswith(main) and name.endswith("gate.bias"):
            assert torch.equal(value[plan.old_to_new], before[name][plan.old_to_new])
            torch.testing.assert_close(value[plan.new_slots], before[name][plan.new_slots] + 0.03)
        elif not name.endswith("gate.bias"):
            assert torch.equal(value, before[name]), name


def test_expanded_model_saves_and_loads_with_its_new_expert_count(model, tmp_path):
    from dsmoe.interop.hf import load_model_dir, save_hf

    new, _ = expand_model(model, 4, "copy", noise=0.01)
    save_hf(new, tmp_path / "expanded")
    loaded, _ = load_model_dir(tmp_path / "expanded", dtype=torch.float32, device="cpu")
    assert loaded.args.n_routed_experts == 12
    assert loaded.layers[1].ffn.experts.w1_EFD.shape[0] == 12
    tokens = torch.randint(0, 512, (1, 20), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(loaded(tokens), new(tokens))
