"""In-process checks on a one-rank process group (no exchange partner, but every piece of
the parallel model is there): the parallelised model computes what the plain one does,
for both expert implementations, with the same gradients; the global-norm clip equals
torch's; checkpoint save/load round-trips exactly."""
from __future__ import annotations

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
