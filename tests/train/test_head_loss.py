"""The fused output head + cross-entropy against linear + F.cross_entropy: loss and gradients."""
import pytest
import torch
import torch.nn.functional as F

from dsmoe.train import head_loss
from dsmoe.train.head_loss import head_cross_entropy


def reference(x, w, target):
    return F.cross_entropy(F.linear(x, w), target)


@pytest.mark.parametrize("rows", [1, 70, 200])  # one block, blocks with a remainder
def test_loss_and_gradients_match_reference(monkeypatch, rows):
    monkeypatch.setattr(head_loss, "BLOCK_LOGITS", 64 * 50)  # 64-row blocks over a 50-token vocabulary
    monkeypatch.setattr(head_loss, "MIN_ROWS", 1)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(rows, 16, generator=g, requires_grad=True)
    w = torch.randn(50, 16, generator=g, requires_grad=True)
    target = torch.randint(0, 50, (rows,), generator=g)
    grads = []
    for fn in (head_cross_entropy, reference):
        loss = fn(x, w, target)
        (loss * 0.7).backward()  # a scale from upstream reaches both gradients
        grads.append((loss.detach(), x.grad.clone(), w.grad.clone()))
        x.grad = w.grad = None
    for ours, theirs in zip(*grads):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


def test_underflowing_target_probability_keeps_a_finite_exact_loss():
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0]], requires_grad=True)
    w = torch.tensor([[200.0, 0.0], [-200.0, 0.0], [0.0, 1.0]], requires_grad=True)
    target = torch.tensor([1, 2])  # row 0: its target is 400 nats below the best logit
    ours, theirs = head_cross_entropy(x, w, target), reference(x, w, target)
    assert torch.isfinite(ours)
    torch.testing.assert_close(ours, theirs)
    ours.backward()
    gx, gw = x.grad.clone(), w.grad.clone()
    x.grad = w.grad = None
    theirs.backward()
    torch.testing.assert_close(gx, x.grad)
    torch.testing.assert_close(gw, w.grad)


def test_without_gradients_only_the_loss_is_computed():
    x, w = torch.randn(10, 8, requires_grad=True), torch.randn(12, 8, requires_grad=True)
    target = torch.randint(0, 12, (10,))
    with torch.no_grad():
        loss = head_cross_entropy(x, w, target)
    assert loss.grad_fn is None
    torch.testing.assert_close(loss, reference(x, w, target).detach())
