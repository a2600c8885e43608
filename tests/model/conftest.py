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
