"""One Transformer block: pre-norm MLA then pre-norm feed-forward (dense or MoE).

The first `n_dense_layers` blocks use a dense SwiGLU (DeepSeek-V3 keeps 3 dense layers);
the rest use MoE. Blocks are shared by the main stack and the MTP modules.
A decode step (a few new tokens over the latent cache) on a CPU runs the whole block as one
native call when it can (`native_block.py`); the modules below are the reference.
"""
from __future__ import annotations

import torch
from torch import nn

from dsmoe.config import ModelArgs
from dsmoe.model import native_block
from dsmoe.model.fastpath import fast_rows
from dsmoe.model.layers import RMSNorm, SwiGLU
from dsmoe.model.mla import MLA, at_positions
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
        self._native = native_block.PlanSlot()  # the native kernel's description of this block

    def forward(self, x, cos, sin, cache=None, mask=None, impl="naive",
                outputs_at_B: torch.Tensor | None = None) -> tuple[torch.Tensor, RoutingInfo | None]:
        """outputs_at_B: one position per row whose output alone is wanted (the last block of
        a prefill: the first token needs the last prompt position only); every position still
        goes into the cache. Returns (B, 1, D) then."""
        if impl == "absorb" and cache is not None and fast_rows(x, x.shape[0] * x.shape[1]) \
                and outputs_at_B is None:
            done = native_block.forward(self, x, cos, sin, cache)  # one call; None: not taken
            if done is not None:
                return done
        residual = x if outputs_at_B is None else at_positions(x, outputs_at_B)
        x = residual + self.attn(self.attn_norm(x), cos, sin, cache, mask, impl, outputs_at_B)
        h = self.ffn_norm(x)
        if self.is_moe:
            out, routing = self.ffn(h)
        else:
            out, routing = self.ffn(h), None
        return x + out, routing
