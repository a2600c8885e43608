"""Multi-head Latent Attention (DeepSeek-V2 report §2.1, V3 report §2.1.1).

Shape legend: B batch, T new tokens, S keys (cached + new), H heads, C kv_lora_rank,
R qk_rope_head_dim, Dn qk_nope_head_dim, Dv v_head_dim.

Notable:
- Keys and values come from a compressed latent c = kv_norm(W_kv_a x) of width C plus one
  rotated key part k_pe of width R shared by all heads. Only those two are ever cached:
  C + R values per token per layer (576 for V3), whatever the number of heads.
- Two implementations behind one switch (`impl`), giving the same result:
  `naive` expands the latent into per-head K/V with wkv_b and runs SDPA (training, prefill);
  `absorb` folds wkv_b's key half into the query and its value half into the output, and
  attends directly over the latent cache (decode: no K/V is ever materialised).
- Queries are optionally compressed (q_lora_rank > 0: wq_a -> q_norm -> wq_b).
- The cache is duck-typed (see `dsmoe/infer/cache.py`): `update(latent, k_pe)` stores the
  new entries and returns everything cached for the batch. The model knows nothing else.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dsmoe.config import ModelArgs
from dsmoe.model.layers import RMSNorm
from dsmoe.model.rope import apply_rope, softmax_scale

ATTN_IMPLS = ("naive", "absorb")


class MLA(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads = args.n_heads
        self.q_lora_rank = args.q_lora_rank
        self.kv_lora_rank = args.kv_lora_rank
        self.qk_nope_head_dim = args.qk_nope_head_dim
        self.qk_rope_head_dim = args.qk_rope_head_dim
        self.qk_head_dim = args.qk_head_dim
        self.v_head_dim = args.v_head_dim
        self.softmax_scale = softmax_scale(args)
        H = args.n_heads
        if self.q_lora_rank == 0:
            self.wq = nn.Linear(args.dim, H * self.qk_head_dim, bias=False)
        else:
            self.wq_a = nn.Linear(args.dim, self.q_lora_rank, bias=False)
            self.q_norm = RMSNorm(self.q_lora_rank, args.norm_eps)
            self.wq_b = nn.Linear(self.q_lora_rank, H * self.qk_head_dim, bias=False)
        self.wkv_a = nn.Linear(args.dim, self.kv_lora_rank + self.qk_rope_head_dim, bias=False)
        self.kv_norm = RMSNorm(self.kv_lora_rank, args.norm_eps)
        self.wkv_b = nn.Linear(self.kv_lora_rank, H * (self.qk_nope_head_dim + self.v_head_dim), bias=False)
        self.wo = nn.Linear(H * self.v_head_dim, args.dim, bias=False)

    def forward(self, x_BTD, cos, sin, cache=None, mask_BTS=None, impl: str = "naive") -> torch.Tensor:
        """mask_BTS: bool (B, 1, T, S), True where a query may see a key; None means causal."""
        B, T, _ = x_BTD.shape
        q = self.wq(x_BTD) if self.q_lora_rank == 0 else self.wq_b(self.q_norm(self.wq_a(x_BTD)))
        q_nope, q_pe = q.view(B, T, self.n_heads, self.qk_head_dim).split(
            [self.qk_nope_head_dim, self.qk_rope_head_dim], dim=-1)
        q_pe = apply_rope(q_pe, cos, sin)
        latent_BTC, k_pe_BTR = self.wkv_a(x_BTD).split([self.kv_lora_rank, self.qk_rope_head_dim], dim=-1)
        latent_BTC = self.kv_norm(latent_BTC)
        k_pe_BTR = apply_rope(k_pe_BTR.unsqueeze(2), cos, sin).squeeze(2)
        if cache is not None:
            latent_BTC, k_pe_BTR = cache.update(latent_BTC, k_pe_BTR)  # now (B, S, ...)
        if impl == "absorb":
            out_BTHV = self._attend_absorbed(q_nope, q_pe, latent_BTC, k_pe_BTR, mask_BTS)
        else:
            out_BTHV = self._attend_naive(q_nope, q_pe, latent_BTC, k_pe_BTR, mask_BTS)
        return self.wo(out_BTHV.flatten(2))

    def _attend_naive(self, q_nope, q_pe, latent_BSC, k_pe_BSR, mask):
        B, S, _ = latent_BSC.shape
        kv = self.wkv_b(latent_BSC).view(B, S, self.n_heads, self.qk_nope_head_dim + self.v_head_dim)
        k_nope, v = kv.split([self.qk_nope_head_dim, self.v_head_dim], dim=-1)
        k = torch.cat([k_nope, k_pe_BSR.unsqueeze(2).expand(-1, -1, self.n_heads, -1)], dim=-1)
        q = torch.cat([q_nope, q_pe], dim=-1)
        # SDPA's fused (flash) kernels need v as wide as q and k; otherwise it falls back to
        # the unfused math path (about 2x slower on CPU). Zero columns of v give zero
        # columns of the output, sliced off below.
        pad = self.qk_head_dim - self.v_head_dim
        if pad > 0:
            v = F.pad(v, (0, pad))
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
            attn_mask=mask, is_causal=mask is None and q.shape[1] > 1, scale=self.softmax_scale)
        return out.transpose(1, 2)[..., :self.v_head_dim]  # (B, T, H, Dv)

    def _attend_absorbed(self, q_nope, q_pe, latent_BSC, k_pe_BSR, mask):
        T, S = q_nope.shape[1], latent_BSC.shape[1]
        wkv_b = self.wkv_b.weight.view(self.n_heads, -1, self.kv_lora_rank)  # (H, Dn+Dv, C)
        w_k, w_v = wkv_b[:, :self.qk_nope_head_dim], wkv_b[:, self.qk_nope_head_dim:]
        q_latent = torch.einsum("bthd,hdc->bthc", q_nope, w_k.to(q_nope.dtype))
        scores = (torch.einsum("bthc,bsc->bhts", q_latent, latent_BSC)
                  + torch.einsum("bthr,bsr->bhts", q_pe, k_pe_BSR)) * self.softmax_scale
        if mask is None and T > 1:  # causal, with the T new tokens last among the S keys
            mask = torch.ones(T, S, dtype=torch.bool, device=scores.device).tril(S - T)
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        probs = scores.float().softmax(-1).type_as(scores)
        out_latent = torch.einsum("bhts,bsc->bthc", probs, latent_BSC)
        return torch.einsum("bthc,hdc->bthd", out_latent, w_v.to(out_latent.dtype))  # (B, T, H, Dv)
