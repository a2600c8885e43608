"""In-process checks on a one-rank process group (no exchange partner, but every piece of
the parallel model is there): the parallelised model computes what the plain one does,
for both expert implementations, with the same gradients; the global-norm clip equals
torch's; checkpoint save/load round-trips exactly, every file is hashed and checked before
anything is read, and a step saved again is replaced only by a complete checkpoint."""
from __future__ import annotations

import errno
import hashlib
import json

import pytest
import torch

from dsmoe import ModelArgs, Transformer
from dsmoe.parallel import checkpoint, launch
from dsmoe.parallel.expert_parallel import ExpertParallelExperts
from dsmoe.parallel.parallelize import ParallelLayout, clip_grad_norm_, parallelize
from dsmoe.errors import CheckpointError


@pytest.fixture(scope="module")
def ctx():
    context = launch.init_single("cpu")
    yield context
    launch.shutdown()


def _pair(seed: int = 0):
    args = ModelArgs.from_preset("tiny")
    torch.manual_seed(seed)
    plain = Transformer(args)
    torch.manual_seed(seed)
    return plain, Transformer(args)


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


@pytest.mark.parametrize("impl", ["grouped", "loop"])
def test_parallel_model_equals_plain_model(ctx, impl):
    plain, model = _pair()
    parallelize(model, ParallelLayout(), ctx)
    assert sum(isinstance(m, ExpertParallelExperts) for m in model.modules()) == len(plain.moe_layers())
    plain.set_expert_impl(impl)
    model.set_expert_impl(impl)
    tokens = torch.randint(0, plain.args.vocab_size, (2, 16), generator=torch.Generator().manual_seed(3))
    want, got = plain.run(tokens, mtp=True), model.run(tokens, mtp=True)
    torch.testing.assert_close(got.logits, want.logits, atol=1e-6, rtol=0)
    for g, w in zip(got.routing + got.mtp_routing, want.routing + want.mtp_routing):
        assert torch.equal(g.load_E, w.load_E)
    (want.logits.square().mean() + want.mtp_logits[0].square().mean()).backward()
    (got.logits.square().mean() + got.mtp_logits[0].square().mean()).backward()
    grads = dict(plain.named_parameters())
    for name, p in model.named_parameters():
        torch.testing.assert_close(_full(p.grad), grads[name].grad, atol=1e-7, rtol=1e-5, msg=name)

    norm = clip_grad_norm_(model, 0.01, ctx)
    torch.testing.assert_close(norm, torch.nn.utils.clip_grad_norm_(plain.parameters(), 0.01), atol=1e-7, rtol=1e-5)
    for name, p in model.named_parameters():
        torch.testing.assert_close(_full(p.grad), grads[name].grad, atol=1e-8, rtol=1e-5, msg=name)


def test_checkpoint_round_trip(ctx, tmp_path):
    _, model = _pair(seed=1)
    parallelize(model, ParallelLayout(), ctx)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.run(torch.arange(8).view(1, 8)).logits.mean().backward()
    opt.step()
    for moe in model.moe_layers():
        moe.gate.bias.uniform_(-0.01, 0.01)
    checkpoint.save(tmp_path / "ck", model, opt, ctx, {"step": 7, "note": "x"})

    _, other = _pair(seed=2)
    parallelize(other, ParallelLayout(), ctx)
    opt2 = torch.optim.AdamW(other.parameters(), lr=1e-2)
    assert checkpoint.load(tmp_path / "ck", other, opt2, ctx) == {"step": 7, "note": "x"}
    saved, loaded = model.state_dict(), other.state_dict()
    assert saved.keys() == loaded.keys()
    for key in saved:
        assert torch.equal(_full(saved[key]), _full(loaded[key])), key
    with_state = 0
    for p, q in zip(model.parameters(), other.parameters()):
        # MTP had no gradient (no mtp=True above): no state saved, none after loading.
        assert opt.state[p].keys() == opt2.state[q].keys()
        for k in opt.state[p]:
            assert torch.equal(_full(opt.state[p][k]), _full(opt2.state[q][k]))
        with_state += bool(opt.state[p])
    assert 0 < with_state < len(list(model.parameters()))

    args, state = checkpoint.consolidate(tmp_path / "ck")
    assert args == model.args
    for key, value in state.items():
        assert torch.equal(value, _full(saved[key])), key


def test_checkpoint_of_another_model_is_refused(ctx, tmp_path):
    _, model = _pair()
    parallelize(model, ParallelLayout(), ctx)
    checkpoint.save(tmp_path / "ck", model, None, ctx)
    other = Transformer(ModelArgs.from_dict({**ModelArgs.from_preset("tiny").__dict__, "n_layers": 4}))
    parallelize(other, ParallelLayout(), ctx)
    with pytest.raises(CheckpointError, match="different model config.*n_layers"):
        checkpoint.load(tmp_path / "ck", other, None, ctx)


def _saved(ctx, path):
    _, model = _pair(seed=1)
    parallelize(model, ParallelLayout(), ctx)
    checkpoint.save(path, model, None, ctx, {"step": 3})
    return model


def test_checksums_cover_every_file(ctx, tmp_path):
    _saved(ctx, tmp_path / "ck")
    record = json.loads((tmp_path / "ck" / checkpoint.CHECKSUMS_FILE).read_text())
    files = sorted(p.name for p in (tmp_path / "ck").iterdir() if p.name != checkpoint.CHECKSUMS_FILE)
    assert sorted(record) == files and checkpoint.METADATA_FILE in files
    for name, entry in record.items():
        data = (tmp_path / "ck" / name).read_bytes()
        assert entry == {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}


@pytest.mark.parametrize("victim", [checkpoint.METADATA_FILE, "__0_0.distcp", checkpoint.CONFIG_FILE])
def test_an_altered_file_is_refused_before_anything_is_unpickled(ctx, tmp_path, monkeypatch, victim):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader

    model = _saved(ctx, tmp_path / "ck")
    file = tmp_path / "ck" / victim
    data = bytearray(file.read_bytes())
    data[len(data) // 2] ^= 0x01
    file.write_bytes(bytes(data))

    def unpickled(*args, **kwargs):
        raise AssertionError("read from a checkpoint whose hashes do not match")

    monkeypatch.setattr(FileSystemReader, "read_metadata", unpickled)
    monkeypatch.setattr(dcp, "load", unpickled)
    with pytest.raises(CheckpointError, match=f"{victim} is corrupt or was altered"):
        checkpoint.load(tmp_path / "ck", model, None, ctx)
    with pytest.raises(CheckpointError, match="corrupt or was altered"):
        checkpoint.consolidate(tmp_path / "ck")


def test_a_checkpoint_without_checksums_is_refused(ctx, tmp_path):
    model = _saved(ctx, tmp_path / "ck")
    (tmp_path / "ck" / checkpoint.CHECKSUMS_FILE).unlink()
    with pytest.raises(CheckpointError, match="checksums.json does not exist"):
        checkpoint.load(tmp_path / "ck", model, None, ctx)


def test_saving_a_step_again_replaces_it_only_when_complete(ctx, tmp_path, monkeypatch):
    import dsmoe.parallel.training as training
    from dsmoe.train.checkpoint import checkpoint_dir, list_checkpoints

    par = training.DistTraining(ctx, ParallelLayout())
    _, model = _pair(seed=1)
    parallelize(model, ParallelLayout(), ctx)
    root = tmp_path / "checkpoints"
    par.save(root, 5, model, None, {"data": 1})
    before = {p.name: p.read_bytes() for p in checkpoint_dir(root, 5).iterdir()}

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    monkeypatch.setattr(training, "swap_into_place", disk_full)  # the last step of a save
    with pytest.raises(CheckpointError, match="step 5.*No space left on device.*intact"):
        par.save(root, 5, model, None, {"data": 2})
    assert [p.name for p in root.iterdir()] == ["step-000005"]
    assert {p.name: p.read_bytes() for p in checkpoint_dir(root, 5).iterdir()} == before
    monkeypatch.undo()

    par.save(root, 5, model, None, {"data": 2})  # now it goes through: the new one replaces it
    assert [s for s, _ in list_checkpoints(root)] == [5] and [p.name for p in root.iterdir()] == ["step-000005"]
    _, other = _pair(seed=2)
    parallelize(other, ParallelLayout(), ctx)
    assert par.load(checkpoint_dir(root, 5), other, None)["data"] == 2
    assert torch.equal(_full(next(other.parameters())), _full(next(model.parameters())))
