import pytest
import torch

from dsmoe import ModelArgs, Transformer


@pytest.fixture
def tiny_args() -> ModelArgs:
    return ModelArgs.from_preset("tiny")


@pytest.fixture
def build():
    """A freshly initialised model in eval mode, reproducible by seed."""
    def make(args: ModelArgs, seed: int = 0) -> Transformer:
        torch.manual_seed(seed)
        return Transformer(args).eval()
    return make


@pytest.fixture
def kernel_calls(monkeypatch):
    """`kernel_calls("step_decode")`: a list that grows by one at each call of that native
    kernel (`dsmoe.kernels`), which still runs."""
    from dsmoe import kernels

    def count(name: str) -> list:
        calls, real = [], getattr(kernels, name)
        monkeypatch.setattr(kernels, name, lambda *a: calls.append(1) or real(*a))
        return calls
    return count
