"""Multi-token prediction modules (DeepSeek-V3 report §2.2).

Depth k combines the previous depth's hidden state h^{k-1}_i (the main model's for k=1)
with the embedding of token t_{i+k}: each is RMS-normalised, the two are concatenated
(embedding first, as DeepSeek's checkpoints are laid out: `eh_proj` acts on
[enorm(emb); hnorm(h)]), projected back to D by `eh_proj`, and passed through one full
Transformer block; `norm` then the main model's shared output head predicts t_{i+k+1}.
The embedding and head are not owned here: the Transformer passes them in, so they stay
shared. At inference the modules can be dropped or used to draft tokens
(`dsmoe/infer/speculative.py`).
"""
from __future__ import annotations

import torch
from torch import nn

from dsmoe.config import ModelArgs
from dsmoe.model import native_block
from dsmoe.model.block import Block
from dsmoe.model.layers import RMSNorm


class MTPModule(nn.Module):
    def __init__(self, args: ModelArgs, layer_id: int):
        super().__init__()
        self.enorm = RMSNorm(args.dim, args.norm_eps)
        self.hnorm = RMSNorm(args.dim, args.norm_eps)
        self.eh_proj = nn.Linear(2 * args.dim, args.dim, bias=False)
        self.block = Block(layer_id, args)
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self._native = native_block.PlanSlot()  # the native kernel's description (native_mtp.py)

    def forward(self, h_prev_BTD, emb_next_BTD, cos, sin, cache=None, mask=None, impl="naive"):
        """Returns (h^k, routing): the new hidden state (before `norm`) and its MoE routing."""
        x = self.eh_proj(torch.cat([self.enorm(emb_next_BTD), self.hnorm(h_prev_BTD)], dim=-1))
        return self.block(x, cos, sin, cache, mask, impl)
