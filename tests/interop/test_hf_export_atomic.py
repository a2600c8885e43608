"""Nothing half-written: every Hugging Face export (`save_hf`, the end-of-training `hf/`,
`dsmoe convert`, the fine-tuning outputs) is assembled aside and swapped in. A write that
fails midway (the second of three shards) leaves the previous export byte for byte, no
temporary folder, and a CheckpointError naming the folder; a new export never mixes with
an old one's shards."""
from __future__ import annotations

import errno
import json

import pytest
import torch

from dsmoe import ModelArgs, Transformer
from dsmoe.errors import CheckpointError
from dsmoe.interop.hf import INDEX_FILE, load_hf, save_hf

SHARD = 150_000  # bytes: the tiny model in several shards


def _model(seed: int) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(ModelArgs.from_preset("tiny"))


def _files(path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


class FullDisk:
    """safetensors' writer that, from the `fail_at`-th shard written after `arm()`, writes
    part of the file and then finds the disk full."""

    def __init__(self, real):
        self.real, self.fail_at, self.count = real, None, 0

    def arm(self, fail_at: int) -> None:
        self.fail_at, self.count = fail_at, 0

    def __call__(self, tensors, filename, metadata=None):
        self.count += 1
        if self.fail_at is not None and self.count >= self.fail_at:
            with open(filename, "wb") as f:
                f.write(b"\0" * 1000)
            raise OSError(errno.ENOSPC, "No space left on device")
        return self.real(tensors, filename, metadata=metadata)


@pytest.fixture
def disk(monkeypatch):
    import safetensors.torch

    full = FullDisk(safetensors.torch.save_file)
    monkeypatch.setattr(safetensors.torch, "save_file", full)
    return full


def test_a_failed_export_leaves_the_previous_one(tmp_path, disk):
    out = tmp_path / "hf"
    save_hf(_model(0), out, shard_size=SHARD)
    before = _files(out)
    assert INDEX_FILE in before and len(before) > 3
    disk.arm(fail_at=2)  # midway: the second shard
    with pytest.raises(CheckpointError, match=rf"{out}.*No space left on device.*previous .* intact"):
        save_hf(_model(1), out, shard_size=SHARD)
    assert disk.count == 2
    assert [p.name for p in tmp_path.iterdir()] == ["hf"]  # no temporary left beside it
    assert _files(out) == before
    torch.testing.assert_close(load_hf(out).state_dict(), _model(0).state_dict(), rtol=0, atol=0)


def test_the_end_of_training_export_is_atomic(tmp_path, disk):
    from dsmoe.train import pretrain

    out = tmp_path / "hf"
    pretrain.export_hf(_model(0), out, None)  # an earlier run's export
    before = _files(out)
    disk.arm(fail_at=1)
    with pytest.raises(CheckpointError, match=rf"{out}.*No space left on device"):
        pretrain.export_hf(_model(1), out, None)
    assert _files(out) == before and [p.name for p in tmp_path.iterdir()] == ["hf"]


def test_a_new_export_never_mixes_with_the_old_shards(tmp_path):
    out = tmp_path / "hf"
    save_hf(_model(0), out, shard_size=SHARD)
    assert (out / INDEX_FILE).is_file()
    save_hf(_model(1), out)  # one file now: the old shards and index must be gone
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    save_hf(_model(2), out, shard_size=SHARD)
    index = json.loads((out / INDEX_FILE).read_text())
    shards = {p.name for p in out.glob("*.safetensors")}
    assert shards == set(index["weight_map"].values())
    torch.testing.assert_close(load_hf(out).state_dict(), _model(2).state_dict(), rtol=0, atol=0)


def test_safetensors_own_disk_full_error_is_translated(tmp_path, monkeypatch):
    import safetensors.torch

    class SafetensorError(Exception):  # what safetensors raises for an I/O failure
        pass

    def save_file(tensors, filename, metadata=None):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(safetensors.torch, "save_file", save_file)
    with pytest.raises(CheckpointError, match=r"could not write .*hf \(No space left on device\); nothing was written"):
        save_hf(_model(0), tmp_path / "hf")
    assert list(tmp_path.iterdir()) == []


def test_only_a_model_folder_is_replaced(tmp_path):
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "todo.txt").write_text("keep me")
    with pytest.raises(CheckpointError, match="is not a model directory"):
        save_hf(_model(0), notes)
    assert _files(notes) == {"todo.txt": b"keep me"}


def test_convert_leaves_no_destination_when_it_fails(tmp_path, disk):
    from dsmoe.interop.convert import convert

    src, dst = tmp_path / "src", tmp_path / "dst"
    save_hf(_model(0), src, shard_size=SHARD)
    disk.arm(fail_at=2)
    with pytest.raises(CheckpointError, match=rf"{dst}.*No space left on device.*nothing was written"):
        convert(src, dst, "bf16", shard_size=SHARD)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]
    disk.arm(fail_at=None)
    convert(src, dst, "bf16", shard_size=SHARD)
    want = {k: v if k.endswith("gate.bias") else v.to(torch.bfloat16).float()  # the bias stays fp32
            for k, v in _model(0).state_dict().items()}
    torch.testing.assert_close(load_hf(dst, dtype="fp32").state_dict(), want, rtol=0, atol=0)


def test_a_fine_tuning_output_survives_a_failed_save(tmp_path, disk):
    from dsmoe.train.finetune import REPORT_FILE, save_model_dir

    out = tmp_path / "sft"
    save_model_dir(_model(0), None, out, {"run": 1})
    before = _files(out)
    disk.arm(fail_at=1)
    with pytest.raises(CheckpointError, match=rf"{out}.*No space left on device"):
        save_model_dir(_model(1), None, out, {"run": 2})
    assert _files(out) == before and [p.name for p in tmp_path.iterdir()] == ["sft"]
    assert json.loads((out / REPORT_FILE).read_text()) == {"run": 1}
