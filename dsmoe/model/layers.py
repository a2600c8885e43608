"""Small building blocks: RMSNorm and the SwiGLU feed-forward (dense layers, shared experts).

Notable: RMSNorm computes in fp32 whatever the activation dtype, as the reference does.
Training in fp32 (no autocast) runs it as one autograd function with a hand-written
backward (`_RMSNormFn`): `F.rms_norm` is composed of a dozen kernels forward and backward
on a CPU, the function of five; 2.2x forward + backward at (8, 128, 128), one thread,
which is about 5% of a `demo` training step (a model of D=128 runs 24 norms a step).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dsmoe.model.fastpath import Derived, fast_rows, plain_linears, swiglu_few_rows


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (torch.is_grad_enabled() and x.dtype == torch.float32 and self.weight.dtype == torch.float32
                and not torch.is_autocast_enabled(x.device.type) and not torch.compiler.is_compiling()):
            return _RMSNormFn.apply(x, self.weight, self.eps)
        return F.rms_norm(x.float(), (x.shape[-1],), self.weight.float(), self.eps).type_as(x)


class _RMSNormFn(torch.autograd.Function):
    """y = x̂·w with x̂ = x·r, r = (mean(x²) + eps)^-1/2 over the last dim, as `F.rms_norm`.
    Backward: dx = r·(g·w − x̂·mean(g·w·x̂)), dw = Σ g·x̂ over every other dim."""

    @staticmethod
    def forward(ctx, x, weight, eps):  # noqa: D102
        rstd = torch.linalg.vecdot(x, x).unsqueeze(-1).div_(x.shape[-1]).add_(eps).rsqrt_()
        x_hat = x * rstd
        ctx.save_for_backward(x_hat, weight, rstd)
        return x_hat * weight

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        x_hat, weight, rstd = ctx.saved_tensors
        grad_w_hat = grad * weight
        mean_dot = torch.linalg.vecdot(grad_w_hat, x_hat).unsqueeze(-1).div_(x_hat.shape[-1])
        grad_x = torch.addcmul(grad_w_hat, x_hat, mean_dot, value=-1).mul_(rstd)
        grad_weight = (grad * x_hat).flatten(0, -2).sum(0) if ctx.needs_input_grad[1] else None
        return grad_x, grad_weight, None


class SwiGLU(nn.Module):
    """w2(silu(w1 x) * w3 x): DeepSeek's `MLP` (HF gate_proj=w1, up_proj=w3, down_proj=w2)."""

    def __init__(self, dim: int, inter_dim: int):
        super().__init__()
        self.w1 = nn.Linear(dim, inter_dim, bias=False)
        self.w2 = nn.Linear(inter_dim, dim, bias=False)
        self.w3 = nn.Linear(dim, inter_dim, bias=False)
        self._derived = Derived()  # w1|w3 fused and transposed for few rows (fastpath.py)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if fast_rows(x, x.numel() // x.shape[-1]) and plain_linears(self.w1, self.w2, self.w3):
            return swiglu_few_rows(x, self.w1.weight, self.w3.weight, self.w2.weight, self._derived)
        return self.w2(F.silu(self.w1(x)) * self.w3(x))
