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
def native_kernels():
    """The native kernels, built: a C compiler is part of the test set-up, so a failed build
    fails the tests that need it rather than skipping them."""
    from dsmoe import kernels
    if not kernels.available():
        pytest.fail("the native kernels did not build: a C compiler is part of the test set-up")
