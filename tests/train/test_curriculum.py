"""A data curriculum: before its first phase the run's plain mix, in each phase rows from
the domains in the shares asked for (drawn from those domains' own streams), a resumed run
sees the same batches, and a malformed curriculum is refused with the rule."""

import pytest
import torch

from dsmoe import ModelArgs
from dsmoe.data.shards import BatchStream, TokenShards
from dsmoe.errors import ConfigError, DataError
from dsmoe.train.config import TrainConfig
from dsmoe.train.curriculum import CurriculumStream
from dsmoe.train.pretrain import train

PHASES = [{"from": 3, "shares": {"math": 1.0}}, {"from": 5, "shares": {"math": 0.75}},
          {"from": 7, "shares": {}}]


@pytest.fixture(scope="module")
def data(two_domains):
    return two_domains


def _rows(batch: torch.Tensor) -> list[tuple]:
    return [tuple(row.tolist()) for row in batch]


def test_phases_draw_rows_in_their_shares_from_each_domains_own_stream(data):
    shards = TokenShards(data)
    stream = CurriculumStream(shards, PHASES, 8, 32, seed=7)
    plain = BatchStream(shards, "train", 8, 32, 7)
    own = {d: BatchStream(shards, "train", 8, 32, 7, [d]) for d in ("math", "prose")}
    batches = [next(stream) for _ in range(9)]
    for step in (0, 1, 2, 7, 8):  # before the first phase, and a phase with no shares
        assert torch.equal(batches[step], plain.batch(step))
    assert torch.equal(batches[3], own["math"].batch(3))  # math only, in its own order
    math_rows = 0
    for step in range(5, 7):  # 3/4 math: every row is one of its domain's rows
        mine = {d: set(_rows(s.batch(step))) for d, s in own.items()}
        for row in _rows(batches[step]):
            assert row in mine["math"] or row in mine["prose"]
            math_rows += row in mine["math"]
    assert 0 < math_rows < 16
    shares = CurriculumStream(shards, [{"from": 0, "shares": {"math": 0.75}}], 8, 32, seed=3)
    counted = sum(row in set(_rows(BatchStream(shards, "train", 8, 32, 3, ["math"]).batch(s)))
                  for s in range(200) for row in _rows(shares.batch(s)))
    assert abs(counted / 1600 - 0.75) < 0.04


def test_resume_continues_with_the_same_batches_and_refuses_another_curriculum(data):
    shards = TokenShards(data)
    first = CurriculumStream(shards, PHASES, 4, 32, seed=1)
    for _ in range(4):
        next(first)
    again = CurriculumStream(shards, PHASES, 4, 32, seed=1)
    again.load_state_dict(first.state_dict())
    assert all(torch.equal(next(first), next(again)) for _ in range(5))
    other = CurriculumStream(shards, PHASES[:1], 4, 32, seed=1)
    with pytest.raises(DataError, match="another curriculum"):
        other.load_state_dict(first.state_dict())


def test_bad_curricula_are_refused_with_the_rule(data):
    base = dict(steps=10, batch_size=2, seq_len=32)
    for bad in ([], [{"from": 10, "shares": {}}], [{"from": 4, "shares": {"math": 1.5}}],
                [{"from": 4, "shares": {"math": 0.6, "prose": 0.6}}],
                [{"from": 4, "shares": {}}, {"from": 4, "shares": {}}],
                [{"from": 4, "domains": ["math"]}], [{"from": True, "shares": {}}]):
        with pytest.raises(ConfigError, match="increasing"):
            TrainConfig(**base, curriculum=bad)
    with pytest.raises(DataError, match=r"names \['poetry'\]"):
        CurriculumStream(TokenShards(data), [{"from": 2, "shares": {"poetry": 0.5}}], 2, 32, seed=0)


class _Stop(Exception):
    pass


def test_a_run_with_a_curriculum_resumes_bit_for_bit(data, tmp_path):
    """Stopped after step 4 (its last checkpoint at 3, inside a phase), then resumed."""
    args = ModelArgs.from_preset("tiny")
    cfg = TrainConfig(steps=8, batch_size=2, seq_len=32, warmup_steps=1, eval_interval=0,
                      ckpt_interval=3, threads=1, curriculum=PHASES)
    whole = train(args, cfg, data, tmp_path / "whole", progress=False, export=False)

    def stop_after_4(metrics):
        if metrics["step"] == 4:
            raise _Stop
    with pytest.raises(_Stop):
        train(args, cfg, data, tmp_path / "part", progress=False, export=False, on_step=stop_after_4)
    resumed = train(args, cfg, data, tmp_path / "part", resume=True, progress=False, export=False)
    assert [m["step"] for m in resumed.metrics] == [4, 5, 6, 7, 8]
    assert [m["loss"] for m in resumed.metrics] == [m["loss"] for m in whole.metrics[3:]]
