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
- Naive attention has two kernels: SDPA (training, any accelerator) and, at inference on a
  CPU, `_attend_blocked`: a block of query rows at a time through batched matmuls, using
  the MLA shapes SDPA cannot see (k_pe shared by all heads: one matmul for every head's
  rope scores; v only Dv wide: no padding to the query width; causal blocks skip the keys
  after their last row). 1.5x SDPA's CPU flash kernel at 448 positions (docs/inference.md).
- Queries are optionally compressed (q_lora_rank > 0: wq_a -> q_norm -> wq_b).
- The cache is duck-typed (see `dsmoe/infer/cache.py`): `update(latent, k_pe)` stores the
  new entries and returns everything cached for the batch. The model knows nothing else.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dsmoe.config import ModelArgs
from dsmoe.model.fastpath import Derived, fast_rows, linear_few_rows, plain_linears
from dsmoe.model.layers import RMSNorm
from dsmoe.model.rope import apply_rope, softmax_scale

ATTN_IMPLS = ("naive", "absorb")


def dense_weight(linear: nn.Module) -> torch.Tensor:
    """A linear layer's weight as a float tensor: `nn.Linear`'s own, or a weight-only int8
    layer's (`quant.py`) dequantised for this call."""
    q = getattr(linear, "weight_q", None)
    return linear.weight if q is None else q.float() * linear.weight_scale.float().unsqueeze(-1)
# Scores one block of `_attend_blocked` holds (heads x query rows x keys): about 0.7 MB in
# fp32, so a block's scores stay in a core's L2 cache between the two matmuls and the
# softmax. Measured, one thread, `small` dims (6 heads), 448 positions: 64 rows a block
# (this budget) 4.0 ms a layer, 32 rows 4.6, 96 rows 4.2; SDPA's flash kernel 6.0.
BLOCK_SCORES = 6 * 64 * 448


def blocked_attention(x: torch.Tensor) -> bool:
    """Whether naive attention over `x` runs `_attend_blocked` (fp32 inference on a CPU)
    rather than SDPA (training: its backward keeps no scores; accelerators: fused kernels;
    bf16: SDPA keeps the scores in fp32)."""
    return x.device.type == "cpu" and x.dtype == torch.float32 and not torch.is_grad_enabled()


def at_positions(x_BT_: torch.Tensor, positions_B: torch.Tensor) -> torch.Tensor:
    """x at one position per row: (B or 1, T, ...) -> (B, 1, ...)."""
    B = positions_B.shape[0]
    rows_B = torch.arange(B, device=positions_B.device)
    return x_BT_.expand(B, *x_BT_.shape[1:])[rows_B, positions_B].unsqueeze(1)


def query_mask(mask_BTS: torch.Tensor | None, queries_at_B: torch.Tensor, S: int, T: int) -> torch.Tensor:
    """The keys each row's one query (new position queries_at_B of T, among S keys) sees:
    bool (B, 1, 1, S). Without a mask (causal) every row has the same S - T keys before
    its T new ones."""
    if mask_BTS is None:
        keys_S = torch.arange(S, device=queries_at_B.device)
        return (keys_S[None] <= (S - T + queries_at_B)[:, None])[:, None, None]
    return at_positions(mask_BTS.squeeze(1), queries_at_B).unsqueeze(1)


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
        self._derived = Derived()  # inference layouts of the weights above (fastpath.py)

    @property
    def _plain(self) -> bool:
        return plain_linears(*(m for m in (getattr(self, n, None) for n in ("wq", "wq_a", "wq_b", "wkv_a"))
                               if m is not None))

    def forward(self, x_BTD, cos, sin, cache=None, mask_BTS=None, impl: str = "naive",
                queries_at_B: torch.Tensor | None = None) -> torch.Tensor:
        """mask_BTS: bool (B, 1, T, S), True where a query may see a key; None means causal.
        queries_at_B: one position per row whose output alone is wanted (a prefill's last
        block): every position is still projected into the cache, but only those query,
        attending in latent space (one query a row: no K/V expanded); returns (B, 1, D)."""
        B, T, _ = x_BTD.shape
        x_q_BQD, cos_q, sin_q = x_BTD, cos, sin
        if queries_at_B is not None:
            x_q_BQD, cos_q, sin_q = (at_positions(t, queries_at_B) for t in (x_BTD, cos, sin))
        if fast_rows(x_BTD, B * T) and self._plain:  # (the same kernels, so the same cache, either way)
            q, kv_a = self._project_few_rows(x_BTD)
            q = q if queries_at_B is None else at_positions(q, queries_at_B)
        else:
            q = self.wq(x_q_BQD) if self.q_lora_rank == 0 else self.wq_b(self.q_norm(self.wq_a(x_q_BQD)))
            kv_a = self.wkv_a(x_BTD)
        q_nope, q_pe = q.view(B, x_q_BQD.shape[1], self.n_heads, self.qk_head_dim).split(
            [self.qk_nope_head_dim, self.qk_rope_head_dim], dim=-1)
        q_pe = apply_rope(q_pe, cos_q, sin_q)
        latent_BTC, k_pe_BTR = kv_a.split([self.kv_lora_rank, self.qk_rope_head_dim], dim=-1)
        latent_BTC = self.kv_norm(latent_BTC)
        k_pe_BTR = apply_rope(k_pe_BTR.unsqueeze(2), cos, sin).squeeze(2)
        if cache is not None:
            latent_BTC, k_pe_BTR = cache.update(latent_BTC, k_pe_BTR)  # now (B, S, ...)
        if queries_at_B is not None:
            mask_BTS = query_mask(mask_BTS, queries_at_B, latent_BTC.shape[1], T)
            impl = "absorb"
        if impl == "absorb":
            out_BTHV = self._attend_absorbed(q_nope, q_pe, latent_BTC, k_pe_BTR, mask_BTS)
        else:
            out_BTHV = self._attend_naive(q_nope, q_pe, latent_BTC, k_pe_BTR, mask_BTS)
        return self.wo(out_BTHV.flatten(2))

    def _attend_naive(self, q_nope, q_pe, latent_BSC, k_pe_BSR, mask):
        B, S, _ = latent_BSC.shape
        kv = self.wkv_b(latent_BSC).view(B, S, self.n_heads, self.qk_nope_head_dim + self.v_head_dim)
        k_nope, v = kv.split([self.qk_nope_head_dim, self.v_head_dim], dim=-1)
        if blocked_attention(q_nope):
            return self._attend_blocked(q_nope, q_pe, k_nope, k_pe_BSR, v, mask)
        return self._attend_sdpa(q_nope, q_pe, k_nope, k_pe_BSR, v, mask)

    def _attend_sdpa(self, q_nope, q_pe, k_nope, k_pe_BSR, v, mask):
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

    def _attend_blocked(self, q_nope, q_pe, k_nope, k_pe_BSR, v, mask):
        """SDPA's result, a block of query rows at a time, batched over N = B*H (batch, head).
        The T new tokens come last among the S keys of the longest row (S = cached + T), so
        no row's query t sees a key past S - T + t: a block reads the keys up to its last
        row only; the mask, when given (rows of different lengths), hides the rest per row."""
        B, T, H, Dn = q_nope.shape
        S, N = k_nope.shape[1], B * H
        q_nope_NTD = q_nope.transpose(1, 2).reshape(N, T, Dn)
        q_pe_BHTR = q_pe.transpose(1, 2)
        k_nope_NDS = k_nope.permute(0, 2, 3, 1).reshape(N, Dn, S)
        k_pe_BRS = k_pe_BSR.transpose(1, 2)
        v_NSV = v.transpose(1, 2).reshape(N, S, -1)
        out_BTHV = v.new_empty(B, T, H, v.shape[-1])  # the layout wo reads: no copy after
        rows = max(1, min(T, BLOCK_SCORES // (N * S)))
        offset = S - T  # causal: query t sees keys up to offset + t
        for t0 in range(0, T, rows):
            t1 = min(t0 + rows, T)
            end = offset + t1  # keys any row of the block may see
            scores_pe_NbS = torch.bmm(q_pe_BHTR[:, :, t0:t1].reshape(B, H * (t1 - t0), -1),
                                      k_pe_BRS[..., :end]).view(N, t1 - t0, end)
            scores_NbS = torch.baddbmm(scores_pe_NbS, q_nope_NTD[:, t0:t1], k_nope_NDS[..., :end],
                                       beta=self.softmax_scale, alpha=self.softmax_scale)
            if mask is not None:  # (B or 1, 1, T, S)
                hidden = ~mask[:, :, t0:t1, :end]
                scores_NbS.view(B, H, t1 - t0, end).masked_fill_(hidden, float("-inf"))
            else:  # the block's own keys: each row sees those up to itself
                future = torch.ones(t1 - t0, t1 - t0, dtype=torch.bool, device=q_nope.device).triu_(1)
                scores_NbS[..., offset + t0:end].masked_fill_(future, float("-inf"))
            probs_NbS = scores_NbS.softmax(-1)
            out_BTHV[:, t0:t1] = torch.bmm(probs_NbS, v_NSV[:, :end]).view(B, H, t1 - t0, -1).transpose(1, 2)
        return out_BTHV

    def _project_few_rows(self, x_BTD):
        """The query and latent projections for one or two rows (`fastpath.py`): wq_a|wkv_a
        read the same x, so one call over their concatenation; tall weights transposed."""
        d = self._derived
        if self.q_lora_rank == 0:
            return (linear_few_rows(x_BTD, (self.wq.weight,), d, "wq"),
                    linear_few_rows(x_BTD, (self.wkv_a.weight,), d, "wkv_a"))
        c_q, kv_a = linear_few_rows(x_BTD, (self.wq_a.weight, self.wkv_a.weight), d, "wq_a|wkv_a").split(
            [self.q_lora_rank, self.wkv_a.weight.shape[0]], -1)
        return linear_few_rows(self.q_norm(c_q), (self.wq_b.weight,), d, "wq_b"), kv_a

    def _attend_absorbed(self, q_nope, q_pe, latent_BSC, k_pe_BSR, mask):
        """Attention in latent space with batched matmuls over rows (token, head): five
        matmuls in all (the einsum form expands into about 3x the calls, which dominate a
        decode step on a CPU). wkv_b's key half folds into the query, its value half into
        the output, both used as views."""
        B, T, H, Dn = q_nope.shape
        S, C = latent_BSC.shape[1], self.kv_lora_rank
        wkv_b = dense_weight(self.wkv_b).view(H, -1, C).to(q_nope.dtype)  # (H, Dn+Dv, C)
        w_k_HDC, w_v_HCV = wkv_b[:, :Dn], wkv_b[:, Dn:].transpose(1, 2)
        q_latent_HNC = torch.bmm(q_nope.reshape(B * T, H, Dn).transpose(0, 1), w_k_HDC)  # N = B*T
        q_latent_BMC = q_latent_HNC.view(H, B, T, C).permute(1, 2, 0, 3).reshape(B, T * H, C)  # M = T*H
        scores_pe_BMS = torch.bmm(q_pe.reshape(B, T * H, -1), k_pe_BSR.transpose(1, 2))
        scores_BMS = torch.baddbmm(scores_pe_BMS, q_latent_BMC, latent_BSC.transpose(1, 2),
                                   beta=self.softmax_scale, alpha=self.softmax_scale)
        if mask is None and T > 1:  # causal, with the T new tokens last among the S keys
            mask = torch.ones(T, S, dtype=torch.bool, device=scores_BMS.device).tril(S - T)[None, None]
        if mask is not None:  # (B or 1, 1, T, S): the same for every head
            scores_BMS = scores_BMS.view(B, T, H, S).masked_fill(~mask.transpose(1, 2), float("-inf")).view(B, T * H, S)
        probs_BMS = scores_BMS.softmax(-1) if scores_BMS.dtype == torch.float32 else \
            scores_BMS.float().softmax(-1).type_as(scores_BMS)
        out_latent_HNC = torch.bmm(probs_BMS, latent_BSC).view(B * T, H, C).transpose(0, 1)
        return torch.bmm(out_latent_HNC, w_v_HCV).transpose(0, 1).view(B, T, H, -1)  # (B, T, H, Dv)
