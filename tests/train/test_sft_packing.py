"""Packing: a packed batch computes exactly what the examples compute one per row (loss and
logits, both attention implementations), the layout it hands the model, and the plan."""
import random

import pytest
import torch
import torch.nn.functional as F

from dsmoe import ModelArgs, Transformer
from dsmoe.train.packing import (PAD_SEGMENT, Example, PackedStream, masked_lm_loss, pack,
                                 pack_rows)


def random_examples(seed: int, lengths, vocab: int = 512) -> list[Example]:
    rng = random.Random(seed)
    return [Example([rng.randrange(vocab) for _ in range(n)], [rng.random() < 0.6 for _ in range(n)])
            for n in lengths]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return Transformer(ModelArgs.from_preset("tiny")).eval()


@pytest.mark.parametrize("impl", ["naive", "absorb"])
def test_packed_loss_equals_unpacked(model, impl):
    examples = random_examples(0, (10, 23, 7, 31, 5, 12))
    batch, stats = pack(examples, 40)
    assert stats.rows < len(examples)  # several examples really share rows
    with torch.no_grad():
        logits = model.run(batch.inputs_BT, batch.layout(), attn_impl=impl).logits
        packed = masked_lm_loss(logits, batch.targets_BT, batch.loss_mask_BT)
        total, count = 0.0, 0
        for b in range(batch.inputs_BT.shape[0]):  # every example alone, causal, from position 0
            for s in batch.segments_BT[b].unique():
                if s == PAD_SEGMENT:
                    continue
                cols = (batch.segments_BT[b] == s).nonzero().flatten()
                alone = model(batch.inputs_BT[b, cols][None])[0]
                torch.testing.assert_close(logits[b, cols], alone, rtol=1e-4, atol=1e-4)
        for ex in examples:
            alone = model(torch.tensor([ex.ids[:-1]]))[0]
            ce = F.cross_entropy(alone, torch.tensor(ex.ids[1:]), reduction="none")
            total += float((ce * torch.tensor(ex.mask[1:])).sum())
            count += sum(ex.mask[1:])
    assert batch.n_targets == count
    assert float(packed) == pytest.approx(total / count, rel=1e-5)


def test_layout_resets_positions_and_blocks_attention():
    examples = [Example([1, 2, 3, 4], [False, True, True, True]), Example([5, 6, 7], [False, True, True])]
    batch, _ = pack(examples, 8)
    assert batch.inputs_BT.tolist() == [[1, 2, 3, 5, 6, 0, 0, 0]]
    assert batch.targets_BT.tolist() == [[2, 3, 4, 6, 7, 0, 0, 0]]
    assert batch.segments_BT.tolist() == [[0, 0, 0, 1, 1, -1, -1, -1]]
    assert batch.positions_BT.tolist() == [[0, 1, 2, 0, 1, 0, 0, 0]]
    mask = batch.layout().attention_mask(8)[0, 0]
    expected = torch.zeros(8, 8, dtype=torch.bool)
    expected[:3, :3] = torch.ones(3, 3).tril().bool()
    expected[3:5, 3:5] = torch.ones(2, 2).tril().bool()
    expected[5:, 5:] = torch.ones(3, 3).tril().bool()  # padding sees only padding
    assert torch.equal(mask, expected)


def test_plan_truncates_drops_and_fills_first_fit():
    examples = [Example(list(range(6)), [True] * 6),            # 5 positions
                Example(list(range(20)), [False] * 12 + [True] * 8),  # cut to 8: no target left
                Example(list(range(12)), [True] * 12),          # 11 positions, cut to 8
                Example(list(range(4)), [True] * 4)]            # 3 positions: fits row 0
    rows, stats = pack_rows(examples, 8)
    assert rows == [[(0, 5), (3, 3)], [(2, 8)]]
    assert (stats.truncated, stats.dropped, stats.rows, stats.used) == (2, 1, 2, 16)
    assert stats.targets == 5 + 3 + 8 and stats.fill == 1.0


def test_stream_is_deterministic_and_visits_every_example_each_epoch():
    examples = random_examples(1, [random.Random(i).randint(3, 30) for i in range(40)])
    a = PackedStream(examples, 32, batch_size=1, seed=7)
    b = PackedStream(examples, 32, batch_size=1, seed=7)
    pieces = []
    for _ in range(a.stats.rows):  # exactly one epoch
        x, y = next(a), next(b)
        assert torch.equal(x.inputs_BT, y.inputs_BT) and torch.equal(x.loss_mask_BT, y.loss_mask_BT)
        for s in x.segments_BT[0].unique().tolist():
            if s != PAD_SEGMENT:
                cols = (x.segments_BT[0] == s).nonzero().flatten()
                pieces.append(x.inputs_BT[0, cols].tolist())
    assert sorted(pieces) == sorted(ex.ids[:-1] for ex in examples)
    assert a.epoch == 0
    next(a)
    assert a.epoch == 1
