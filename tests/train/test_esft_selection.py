"""ESFT: expert affinity against a per-token reference, selection by share, and freezing
(frozen rows stay bit-exact through AdamW steps with weight decay and momentum)."""
import random

import pytest
import torch

from dsmoe import ModelArgs, Transformer
from dsmoe.analysis.routing import main_moe_blocks
from dsmoe.errors import ConfigError, DsmoeError
from dsmoe.train.config import TrainConfig
from dsmoe.train.esft import esft_freeze, expert_affinity, select_experts
from dsmoe.train.freeze import RowFreeze, count_trainable
from dsmoe.train.optim import build_optimizer
from dsmoe.train.packing import Example, pack


def examples(seed=0, lengths=(17, 9, 30, 12)):
    rng = random.Random(seed)
    return [Example([rng.randrange(512) for _ in range(n)], [True] * n) for n in lengths]


@pytest.fixture()
def model():
    torch.manual_seed(0)
    return Transformer(ModelArgs.from_preset("tiny")).eval()


def test_affinity_matches_a_per_token_reference_and_ignores_padding(model):
    exs = examples()
    batch, _ = pack(exs, 40)  # rows with padding at the end
    aff = expert_affinity(model, [batch])
    L, E, K = 2, 8, 3
    gate, load, n = torch.zeros(L, E, dtype=torch.float64), torch.zeros(L, E), 0
    with torch.no_grad():
        for ex in exs:  # each example alone: no packing, no padding
            routing = model.run(torch.tensor([ex.ids[:-1]])).routing
            n += len(ex.ids) - 1
            for layer, info in enumerate(routing):
                for t in range(info.ids_TK.shape[0]):
                    for k in range(K):
                        gate[layer, info.ids_TK[t, k]] += float(info.weights_TK[t, k])
                        load[layer, info.ids_TK[t, k]] += 1
    assert int(aff["tokens"]) == n
    torch.testing.assert_close(aff["token"], (load / load.sum(-1, keepdim=True)).double())
    torch.testing.assert_close(aff["gate"], gate / gate.sum(-1, keepdim=True), rtol=1e-5, atol=1e-6)
    assert torch.allclose(aff["token"].sum(-1), torch.ones(L, dtype=torch.float64))
    assert ((aff["score"] > 0) & (aff["score"] < 1)).all()  # mean sigmoid affinities


@pytest.mark.parametrize("share, first, second", [
    (0.5, [0], [3]), (0.6, [0, 2], [2, 3]), (0.8, [0, 2], [2, 3]),
    (0.85, [0, 1, 2], [1, 2, 3]),  # a tie (0.1, 0.1) goes to the lower index
    (1.0, [0, 1, 2, 3], [0, 1, 2, 3])])
def test_selection_takes_the_fewest_experts_that_cover_the_share(share, first, second):
    shares = torch.tensor([[0.5, 0.1, 0.3, 0.1], [0.05, 0.15, 0.3, 0.5]], dtype=torch.float64)
    assert select_experts(shares, share) == [first, second]


@pytest.mark.parametrize("share", [0.0, -0.1, 1.5])
def test_selection_that_selects_nothing_is_refused(share):
    with pytest.raises(ConfigError, match="selects no expert"):
        select_experts(torch.full((2, 4), 0.25), share)


def test_empty_selection_cannot_be_trained(model):
    with pytest.raises(DsmoeError, match="no expert would be trained"):
        esft_freeze(model, [[], []])


def train_steps(model, freeze: RowFreeze | None, steps: int, seed: int = 0):
    cfg = TrainConfig(lr=1e-2, weight_decay=0.5, steps=steps, warmup_steps=0)
    optimizer = build_optimizer(model, cfg)
    model.train()
    for step in range(steps):
        tokens = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(seed + step))
        model(tokens).logsumexp(-1).mean().backward()
        if freeze is not None:
            freeze.zero_grads()
        optimizer.step()
        optimizer.zero_grad()
        if freeze is not None:
            freeze.restore()
    return optimizer


def test_only_selected_expert_rows_change(model):
    before = {k: v.clone() for k, v in model.state_dict().items()}
    selection = [[1, 6], [3]]
    freeze = esft_freeze(model, selection)
    trained, total = count_trainable(model, freeze)
    per_expert = 3 * 32 * 64
    assert trained == 3 * per_expert and total == sum(p.numel() for p in model.parameters())
    train_steps(model, freeze, 3)
    after = model.state_dict()
    blocks = [i for i, _ in main_moe_blocks(model)]
    for name, value in after.items():
        chosen = next((sel for i, sel in zip(blocks, selection) if name.startswith(f"layers.{i}.ffn.experts.")), None)
        if chosen is None:
            assert torch.equal(value, before[name]), name
            continue
        for e in range(8):
            changed = not torch.equal(value[e], before[name][e])
            assert changed == (e in chosen), (name, e)


def test_rows_frozen_mid_run_stay_exact_despite_momentum_and_weight_decay(model):
    """A row that trained before being frozen has AdamW momentum left, and weight decay
    shrinks every row of a stepped tensor: zero gradients alone would let it move."""
    optimizer = train_steps(model, None, 2)
    w = model.layers[1].ffn.experts.w1_EFD
    freeze = RowFreeze()
    freeze.add(w, torch.tensor([True, False] * 4))
    frozen_before = w.detach()[0::2].clone()
    free_before = w.detach()[1::2].clone()
    for step in range(2):  # same optimizer: momentum carried over
        tokens = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(10 + step))
        model(tokens).logsumexp(-1).mean().backward()
        freeze.zero_grads()
        assert torch.equal(w.grad[0::2], torch.zeros_like(w.grad[0::2]))
        optimizer.step()
        optimizer.zero_grad()
        moved = not torch.equal(w.detach()[0::2], frozen_before)
        freeze.restore()
    assert moved  # without the restore the frozen rows would have drifted
    assert torch.equal(w.detach()[0::2], frozen_before)
    assert not torch.equal(w.detach()[1::2], free_before)
