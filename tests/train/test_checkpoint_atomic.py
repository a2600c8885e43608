"""Training checkpoints: exact round trip, keep-last, corruption caught by the hash, a
full disk in the middle of a write leaving the previous checkpoint intact, and a step
saved again replacing the old one only once complete (killed midway: recovered)."""
import errno
import json
import random

import numpy as np
import pytest
import torch

from dsmoe.errors import CheckpointError
from dsmoe.train import checkpoint as ckpt


def _state(step):
    g = torch.Generator().manual_seed(step)
    return {"model": {"w": torch.randn(4, 3, generator=g)}, "step": step, "rng": ckpt.rng_state()}


def test_round_trip_and_keep_last(tmp_path):
    for step in (10, 20, 30, 40):
        path = ckpt.save_checkpoint(tmp_path, step, _state(step), {"run": {"x": step}}, keep_last=2)
        assert path == ckpt.checkpoint_dir(tmp_path, step)
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [30, 40]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-000030", "step-000040"]  # no temporaries
    state, meta = ckpt.load_checkpoint(ckpt.latest_checkpoint(tmp_path))
    assert torch.equal(state["model"]["w"], _state(40)["model"]["w"])
    assert state["step"] == 40 and meta["step"] == 40 and meta["run"] == {"x": 40}


def test_rng_states_round_trip(tmp_path):
    torch.manual_seed(1), random.seed(2), np.random.seed(3)
    ckpt.save_checkpoint(tmp_path, 1, {"rng": ckpt.rng_state()})
    expected = (torch.rand(3), random.random(), np.random.rand())
    torch.manual_seed(9), random.seed(9), np.random.seed(9)
    state, _ = ckpt.load_checkpoint(ckpt.checkpoint_dir(tmp_path, 1))
    ckpt.set_rng_state(state["rng"])
    assert torch.equal(torch.rand(3), expected[0])
    assert random.random() == expected[1] and np.random.rand() == expected[2]


def test_a_flipped_byte_is_caught(tmp_path):
    path = ckpt.save_checkpoint(tmp_path, 5, _state(5))
    data = bytearray((path / ckpt.STATE_FILE).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (path / ckpt.STATE_FILE).write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupt: the sha256"):
        ckpt.load_checkpoint(path)


def test_truncated_or_missing_files_are_caught(tmp_path):
    path = ckpt.save_checkpoint(tmp_path, 5, _state(5))
    (path / ckpt.STATE_FILE).write_bytes((path / ckpt.STATE_FILE).read_bytes()[:100])
    with pytest.raises(CheckpointError, match="corrupt"):
        ckpt.load_checkpoint(path)
    (path / ckpt.STATE_FILE).unlink()
    with pytest.raises(CheckpointError, match="has no state.pt"):
        ckpt.load_checkpoint(path)
    (path / ckpt.META_FILE).write_text("{not json")
    with pytest.raises(CheckpointError, match="corrupt"):
        ckpt.load_checkpoint(path)


@pytest.mark.parametrize("step", [20, 10], ids=["a new step", "the same step again"])
def test_full_disk_keeps_the_previous_checkpoint(tmp_path, monkeypatch, step):
    ckpt.save_checkpoint(tmp_path, 10, _state(10))
    before = {p.name: p.read_bytes() for p in ckpt.checkpoint_dir(tmp_path, 10).iterdir()}
    real_write = ckpt._HashingWriter.write

    def write_until_full(self, data):
        if self.size > 200:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(self, data)

    monkeypatch.setattr(ckpt._HashingWriter, "write", write_until_full)
    with pytest.raises(CheckpointError, match=rf"step {step} .*No space left on device.*step-000010 is intact"):
        ckpt.save_checkpoint(tmp_path, step, _state(step + 1))
    assert [p.name for p in tmp_path.iterdir()] == ["step-000010"]  # no half-written folder
    after = {p.name: p.read_bytes() for p in ckpt.checkpoint_dir(tmp_path, 10).iterdir()}
    assert after == before
    monkeypatch.undo()
    state, _ = ckpt.load_checkpoint(ckpt.latest_checkpoint(tmp_path))
    assert state["step"] == 10
    ckpt.save_checkpoint(tmp_path, step, _state(step + 1))  # complete: now it goes in
    state, _ = ckpt.load_checkpoint(ckpt.checkpoint_dir(tmp_path, step))
    assert state["step"] == step + 1 and len(list(tmp_path.iterdir())) == len({10, step})


def test_meta_records_hash_and_size(tmp_path):
    path = ckpt.save_checkpoint(tmp_path, 3, _state(3))
    meta = json.loads((path / ckpt.META_FILE).read_text())
    assert meta["bytes"] == (path / ckpt.STATE_FILE).stat().st_size
    assert meta["format"] == ckpt.FORMAT and meta["step"] == 3


def test_a_replacement_killed_between_renames_is_recovered_on_resume(tmp_path, monkeypatch):
    from pathlib import Path

    from dsmoe import atomic

    ckpt.save_checkpoint(tmp_path, 10, _state(10))
    monkeypatch.setattr(atomic, "_exchange", lambda a, b: False)  # the two-rename path
    real_rename = Path.rename

    def rename(self, target):
        if self.name.startswith(".step-000010.tmp."):  # the new one, about to go in: killed
            raise KeyboardInterrupt
        return real_rename(self, target)

    monkeypatch.setattr(Path, "rename", rename)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save_checkpoint(tmp_path, 10, _state(11))
    monkeypatch.undo()
    assert ckpt.latest_checkpoint(tmp_path) is None  # the old one is aside, under a hidden name
    ckpt.remove_stale_temporaries(tmp_path)  # what training does before it resumes
    state, _ = ckpt.load_checkpoint(ckpt.latest_checkpoint(tmp_path))
    assert state["step"] == 10 and [p.name for p in tmp_path.iterdir()] == ["step-000010"]
