"""RMSNorm's training function (hand-written backward) against `F.rms_norm` with autograd."""
import pytest
import torch
import torch.nn.functional as F

from dsmoe.model.layers import RMSNorm


@pytest.mark.parametrize("shape", [(5, 16), (2, 7, 48)])
def test_forward_and_gradients_match_rms_norm(shape):
    g = torch.Generator().manual_seed(0)
    norm = RMSNorm(shape[-1], eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(shape[-1], generator=g) + 0.5)
    x0 = torch.randn(*shape, generator=g) * 3
    upstream = torch.randn(*shape, generator=g)
    results = []
    for fn in (norm, lambda x: F.rms_norm(x, (shape[-1],), norm.weight, norm.eps)):
        x = x0.clone().requires_grad_()
        y = fn(x)
        y.backward(upstream)
        results.append((y.detach(), x.grad, norm.weight.grad.clone()))
        norm.weight.grad = None
    assert "RMSNormFn" in type(norm(x0.requires_grad_()).grad_fn).__name__  # the hand-written one ran
    for ours, theirs in zip(*results):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


def test_inference_and_training_forward_agree():
    norm = RMSNorm(32)
    x = torch.randn(4, 32)
    with torch.no_grad():
        plain = norm(x)
    torch.testing.assert_close(norm(x.requires_grad_()).detach(), plain, rtol=0, atol=0)
