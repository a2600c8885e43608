"""LocalTraining, the one-process twin of DistTraining: the same methods with the same
parameters, an exact save/load round trip (weights, optimizer moments, RNG states, the
rest handed back), and the choice of session for a run started without torchrun."""
import inspect

import torch

from dsmoe import ModelArgs, Transformer
from dsmoe.parallel.training import DistTraining
from dsmoe.train.config import TrainConfig
from dsmoe.train.optim import build_optimizer
from dsmoe.train.session import LocalTraining, one_process_session

CPU = torch.device("cpu")


def test_same_methods_and_parameters_as_the_distributed_session():
    made_by_torchrun = {"from_env", "single"}  # how a DistTraining is made, not what the loop asks
    for name, member in vars(DistTraining).items():
        if name.startswith("_") and name not in ("__enter__", "__exit__") or name in made_by_torchrun:
            continue
        if isinstance(member, property):
            assert hasattr(LocalTraining(CPU), name), name
            continue
        if not callable(member):
            continue
        twin = getattr(LocalTraining, name, None)
        assert twin is not None, f"LocalTraining lacks {name}"
        assert list(inspect.signature(twin).parameters) == list(inspect.signature(member).parameters), name


def _trained(seed: int):
    torch.manual_seed(seed)
    model = Transformer(ModelArgs.from_preset("tiny"))
    optimizer = build_optimizer(model, TrainConfig(lr=1e-2, warmup_steps=0))
    model(torch.randint(0, 512, (2, 8))).sum().backward()
    optimizer.step()
    return model, optimizer


def test_save_then_load_restores_everything_and_hands_back_the_rest(tmp_path):
    session = LocalTraining(CPU)
    model, optimizer = _trained(0)
    torch.manual_seed(7)
    path = session.save(tmp_path, 3, model, optimizer, {"data": {"position": 42}}, {"run": {}}, keep_last=2)
    expected_draw = torch.rand(4)  # what the generator gives after the save

    other, other_optimizer = _trained(1)  # different weights and moments, and RNG moved on
    rest = session.load(path, other, other_optimizer)
    assert rest == {"data": {"position": 42}, "step": 3}
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), other.state_dict().values()))
    moments = [s["exp_avg"] for s in optimizer.state.values()]
    assert all(torch.equal(a, b) for a, b in zip(moments, [s["exp_avg"] for s in other_optimizer.state.values()]))
    assert torch.equal(torch.rand(4), expected_draw)


def test_one_process_sessions(tmp_path):
    session = one_process_session(None, CPU)
    assert isinstance(session, LocalTraining) and session.is_main
    model, optimizer = _trained(0)
    path = session.save(tmp_path, 1, model, optimizer, {"data": {}})
    assert isinstance(one_process_session(path, CPU), LocalTraining)  # not a sharded checkpoint
    batch = torch.arange(12).view(3, 4)
    assert session.local(batch) is batch and session.average({"loss": 1.5}) == {"loss": 1.5}
    assert session.prepare(model) is model and session.full_model(path) is model
