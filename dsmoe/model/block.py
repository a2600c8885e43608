"""One Transformer block: pre-norm MLA then pre-norm feed-forward (dense or MoE).

The first `n_dense_layers` blocks use a dense SwiGLU (DeepSeek-V3 keeps 3 dense layers);
the rest use MoE. Blocks are shared by the main stack and the MTP modules.
"""
from __future__ import annotations

import torch
from torch import nn

from dsmoe.config import ModelArgs
from dsmoe.model.layers import RMSNorm, SwiGLU
from dsmoe.model.mla import MLA
from dsmoe.model.moe import MoE, RoutingInfo


class Block(nn.Module):
    def __init__(self, layer_id: int, args: ModelArgs):
        super().__init__()
        self.layer_id = layer_id
        self.attn_norm = RMSNorm(args.dim, args.norm_eps)
        self.attn = MLA(args)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)
        self.is_moe = layer_id >= args.n_dense_layers
        self.ffn = MoE(args) if self.is_moe else SwiGLU(args.dim, args.inter_dim)

    def forward(self, x, cos, sin, cache=None, mask=None, impl="naive") -> tuple[torch.Tensor, RoutingInfo | None]:
        x = x + self.attn(self.attn_norm(x), cos, sin, cache, mask, impl)
        h = self.ffn_norm(x)
        if self.is_moe:
            out, routing = self.ffn(h)
        else:
            out, routing = self.ffn(h), None
        return x + out, routing
