"""Small building blocks: RMSNorm and the SwiGLU feed-forward (dense layers, shared experts).

Notable: RMSNorm computes in fp32 whatever the activation dtype, as the reference does.
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
        return F.rms_norm(x.float(), (x.shape[-1],), self.weight.float(), self.eps).type_as(x)


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
