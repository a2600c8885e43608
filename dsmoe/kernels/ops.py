"""What the native kernels compute, as functions of tensors (the C is in `*.c` here).

- `linear`: y = x Wᵀ for a few rows, W fp32 or int8 with per-row bf16 scales;
- `experts`: the routed experts of a few tokens, each chosen expert once over its tokens;
- `block_decode`: one Transformer block for a few new tokens over the latent cache (norms,
  MLA, residuals, the dense or MoE feed-forward), described once by a `Block` structure.
Callers check `supports(...)` first and keep their torch path for everything else.
Not here: building and loading (`build.py`).
"""
from __future__ import annotations

import ctypes

import torch

from dsmoe.kernels import build

MAX_ROWS = 8  # the kernels' row block (few_rows.c MAX_ROWS); more rows are taken 8 at a time
KIND_F32, KIND_INT8 = 0, 1


class Weight(ctypes.Structure):
    """kernels.h `dsmoe_weight`: one matrix, fp32 or int8 with per-row bf16 scales."""
    _fields_ = [("data", ctypes.c_void_p), ("scale", ctypes.c_void_p), ("rows", ctypes.c_int64),
                ("cols", ctypes.c_int64), ("kind", ctypes.c_int64)]


def declare(lib: ctypes.CDLL) -> None:
    p, i64, c_int = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    lib.dsmoe_linear.argtypes = [p, i64, i64, p, p, c_int, i64, i64, p, i64]
    lib.dsmoe_linear.restype = None
    lib.dsmoe_experts.argtypes = [p, i64, i64, p, p, i64, p, p, p, p, p, p, c_int, i64, i64, p]
    lib.dsmoe_experts.restype = c_int
    lib.dsmoe_experts_table.argtypes = [p, i64, i64, p, p, i64, p, p, p, p, p, p, c_int, i64, i64, p]
    lib.dsmoe_experts_table.restype = c_int
    lib.dsmoe_block_decode.argtypes = [ctypes.POINTER(Block), p, i64, i64, p, p, p, p, i64, i64, p, p, p, p, p]
    lib.dsmoe_block_decode.restype = c_int
    lib.dsmoe_stack_decode.argtypes = [p, i64, p, i64, i64, p, p, p, p, i64, i64, i64, i64, p, p, p, p, p]
    lib.dsmoe_stack_decode.restype = c_int
    lib.dsmoe_step_decode.argtypes = [p, i64, ctypes.POINTER(Weight), p, i64, i64, p, p, i64, p, p, i64, i64, i64,
                                      i64, p, p, p, p, p, p, ctypes.c_float, ctypes.POINTER(Weight), p, p]
    lib.dsmoe_step_decode.restype = c_int
    lib.dsmoe_mtp_decode.argtypes = [ctypes.POINTER(MTP), ctypes.POINTER(Weight), p, p, i64, i64, p, p, i64, p, p,
                                     i64, i64, p, p, p, p, p, ctypes.POINTER(Weight), p, i64, p, p]
    lib.dsmoe_mtp_decode.restype = c_int
    lib.dsmoe_spec_greedy.argtypes = [p, i64, ctypes.POINTER(Weight), p, p, i64, p, p, i64, i64, i64, i64, p,
                                      ctypes.c_float, ctypes.POINTER(Weight), ctypes.POINTER(MTP),
                                      ctypes.POINTER(Weight), p, p, i64, i64, i64, i64, p, p, p, p, p, p]
    lib.dsmoe_spec_greedy.restype = c_int


def available() -> bool:
    """Whether the native kernels can be used (built or loaded on the first call)."""
    return _lib() is not None


def supports(x: torch.Tensor, *weights: torch.Tensor) -> bool:
    """Whether `x` and `weights` are what the kernels take: CPU, fp32 activations, fp32 or
    int8 contiguous weights (checked per call; cheap attribute reads)."""
    return (x.device.type == "cpu" and x.dtype == torch.float32 and available()
            and all(w.device.type == "cpu" and w.dtype in (torch.float32, torch.int8) and w.is_contiguous()
                    for w in weights))


def _rows(x: torch.Tensor) -> torch.Tensor:
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def linear(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
    """x Wᵀ (times `scale` per output when W is int8) over x's last dimension."""
    x2 = _rows(x)
    N, K = w.shape
    y = torch.empty(x2.shape[0], N)
    kind = KIND_INT8 if w.dtype == torch.int8 else KIND_F32
    _lib().dsmoe_linear(x2.data_ptr(), x2.stride(0), x2.shape[0], w.data_ptr(),
                      scale.data_ptr() if scale is not None else None, kind, N, K, y.data_ptr(), N)
    return y.view(*x.shape[:-1], N)


def experts(x_TD: torch.Tensor, ids_TK: torch.Tensor, weights_TK: torch.Tensor,
            w1_EFD: torch.Tensor, w3_EFD: torch.Tensor, w2_EDF: torch.Tensor,
            scales: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """The routed experts' weighted sum for a few tokens (see few_rows.c `dsmoe_experts`);
    `scales` (per-row bf16 of w1, w3, w2) when the expert weights are int8."""
    x = x_TD.contiguous()
    ids = ids_TK.to(torch.int64).contiguous()
    weights = weights_TK.to(torch.float32).contiguous()
    E, F_, D = w1_EFD.shape
    y = torch.empty(x.shape[0], D)
    s1, s3, s2 = (s.data_ptr() for s in scales) if scales is not None else (None, None, None)
    status = _lib().dsmoe_experts(x.data_ptr(), x.shape[0], D, ids.data_ptr(), weights.data_ptr(), ids.shape[1],
                                w1_EFD.data_ptr(), w3_EFD.data_ptr(), w2_EDF.data_ptr(), s1, s3, s2,
                                KIND_INT8 if scales is not None else KIND_F32, E, F_, y.data_ptr())
    if status != 0:
        raise RuntimeError(f"native experts kernel failed (expert ids outside [0, {E}) or out of memory)")
    return y


def experts_by_id(x_TD: torch.Tensor, ids_TK: torch.Tensor, weights_TK: torch.Tensor, n_experts: int,
                  expert) -> torch.Tensor:
    """`experts` with each chosen expert's weights fetched by `expert(e)` (three fp32 tensors,
    or three int8 weights with `q` and `scale`): experts kept anywhere (paged from disk).
    The same C loop as `experts`, so the same bits for the same weights. None when a
    fetched weight is not one the kernel reads (another dtype, not contiguous)."""
    x = x_TD.contiguous()
    ids = ids_TK.to(torch.int64).contiguous()
    weights = weights_TK.to(torch.float32).contiguous()
    tables = [(ctypes.c_void_p * n_experts)() for _ in range(6)]
    held, kind, F_ = [], KIND_F32, 0
    for e in dict.fromkeys(ids.flatten().tolist()):
        ws = expert(e)
        held.append(ws)
        for j, w in enumerate(ws):
            q = getattr(w, "q", w)
            if q.dtype not in (torch.float32, torch.int8) or not q.is_contiguous() or q.device.type != "cpu":
                return None
            if q.dtype == torch.int8:
                kind = KIND_INT8
                tables[3 + j][e] = w.scale.data_ptr()
            tables[j][e] = q.data_ptr()
        F_ = getattr(ws[0], "q", ws[0]).shape[0]
    y = torch.empty(x.shape[0], x.shape[1])
    status = _lib().dsmoe_experts_table(x.data_ptr(), x.shape[0], x.shape[1], ids.data_ptr(), weights.data_ptr(),
                                        ids.shape[1], *tables, kind, n_experts, F_, y.data_ptr())
    if status != 0:
        raise RuntimeError(f"native experts kernel failed (expert ids outside [0, {n_experts}) or out of memory)")
    return y


_declared: set[int] = set()


def weight_of(module) -> Weight:
    """The descriptor of a linear layer's weight: `nn.Linear` (fp32) or a weight-only int8
    layer (`weight_q` int8, `weight_scale` bf16 per row: `dsmoe/model/quant.py`)."""
    q = getattr(module, "weight_q", None)
    if q is not None:
        return Weight(q.data_ptr(), module.weight_scale.data_ptr(), q.shape[0], q.shape[1], KIND_INT8)
    w = module.weight
    return Weight(w.data_ptr(), None, w.shape[0], w.shape[1], KIND_F32)


def weight_from(w: torch.Tensor, scale: torch.Tensor | None = None) -> Weight:
    """The descriptor of a bare weight tensor: fp32, or int8 with its bf16 row `scale`."""
    if w.dtype == torch.int8:
        return Weight(w.data_ptr(), scale.data_ptr(), w.shape[0], w.shape[1], KIND_INT8)
    return Weight(w.data_ptr(), None, w.shape[0], w.shape[1], KIND_F32)


def takes_linears(*modules) -> bool:
    """Whether every module's weight is one the kernels read: fp32 or int8, contiguous, on the CPU."""
    for m in modules:
        w = getattr(m, "weight_q", None)
        w = getattr(m, "weight", None) if w is None else w
        if not isinstance(w, torch.Tensor) or w.device.type != "cpu" or w.dtype not in (torch.float32, torch.int8) \
                or not w.is_contiguous() or getattr(m, "bias", None) is not None:
            return False
    return True


class Block(ctypes.Structure):
    """block_decode.c `dsmoe_block`: one Transformer block's weights and settings."""
    _fields_ = [(n, ctypes.c_void_p) for n in ("attn_norm", "ffn_norm", "q_norm", "kv_norm")] + \
        [(n, ctypes.c_float) for n in ("eps", "q_eps", "kv_eps", "softmax_scale")] + \
        [(n, Weight) for n in ("wq_a", "wq_b", "wkv_a", "wo", "wkv_b")] + \
        [(n, ctypes.c_int64) for n in ("heads", "nope_dim", "rope_dim", "v_dim", "kv_rank")] + \
        [(n, Weight) for n in ("ffn1", "ffn3", "ffn2")] + [("is_moe", ctypes.c_int64)] + \
        [(n, ctypes.c_void_p) for n in ("gate", "bias")] + \
        [(n, ctypes.c_int64) for n in ("n_experts", "top_k", "n_groups", "n_limited_groups", "sigmoid_scores",
                                       "group_top2", "norm_topk")] + [("route_scale", ctypes.c_float)] + \
        [(n, ctypes.c_void_p) for n in ("w1", "w3", "w2", "s1", "s3", "s2")] + \
        [(n, ctypes.c_int64) for n in ("expert_kind", "expert_dim")]


class MTP(ctypes.Structure):
    """kernels.h `dsmoe_mtp`: a multi-token-prediction module (its block, norms, eh_proj)."""
    _fields_ = [("block", ctypes.POINTER(Block))] + [(n, ctypes.c_void_p) for n in ("enorm", "hnorm", "norm")] + \
        [(n, ctypes.c_float) for n in ("enorm_eps", "hnorm_eps", "norm_eps")] + [("eh_proj", Weight)]


def _routing_buffers(n_moe: int, M: int, top_k: int, n_experts: int):
    """Where the kernels write the MoE blocks' routing: ids, weights, scores, load."""
    return (torch.empty(n_moe, M, top_k, dtype=torch.int64), torch.empty(n_moe, M, top_k),
            torch.empty(n_moe, M, n_experts), torch.empty(n_moe, n_experts, dtype=torch.int64))


def _check(status: int, what: str) -> None:
    if status != 0:
        raise RuntimeError(f"native {what} kernel failed: out of memory, or a routing setting it does not take "
                           f"(at most 64 expert groups, dividing the experts)")


def block_decode(block: Block, h_MD: torch.Tensor, T: int, cos_MP: torch.Tensor, sin_MP: torch.Tensor,
                 latent_BSC: torch.Tensor, k_pe_BSR: torch.Tensor, positions_BT: torch.Tensor,
                 top_k: int, n_experts: int):
    """One block over M = B x T new tokens (block_decode.c), h (M, D) updated in place; the
    new tokens' latent and k_pe written into the cache rows at `positions_BT`. Returns the
    MoE routing (ids (M, K), weights (M, K), scores (M, E), load (E,)), or None (dense)."""
    M = h_MD.shape[0]
    routing = tuple(r[0] for r in _routing_buffers(1, M, top_k, n_experts)) if block.is_moe else None
    ptrs = [r.data_ptr() for r in routing] if routing is not None else [None] * 4
    _check(_lib().dsmoe_block_decode(
        ctypes.byref(block), h_MD.data_ptr(), M, T, cos_MP.data_ptr(), sin_MP.data_ptr(), latent_BSC.data_ptr(),
        k_pe_BSR.data_ptr(), latent_BSC.stride(0), k_pe_BSR.stride(0), positions_BT.data_ptr(), *ptrs), "block")
    return routing


def block_table(blocks: list[Block]):
    """The blocks as the C array of pointers `stack_decode` takes (build once, reuse)."""
    table = (ctypes.POINTER(Block) * len(blocks))(*(ctypes.pointer(b) for b in blocks))
    table._blocks = blocks  # keep the structures alive with the array
    table._n_moe = sum(b.is_moe for b in blocks)
    return table


def stack_decode(table, h_MD: torch.Tensor, T: int, cos_MP: torch.Tensor, sin_MP: torch.Tensor,
                 latent_LBSC: torch.Tensor, k_pe_LBSR: torch.Tensor, positions_BT: torch.Tensor,
                 top_k: int, n_experts: int) -> list:
    """`block_decode` over the blocks of `table` (`block_table`) in one call (block_decode.c
    `dsmoe_stack_decode`), block i over the cache rows latent_LBSC[i] / k_pe_LBSR[i]. Every
    MoE block routes to `top_k` of `n_experts` (one model). Returns each block's routing
    (None for dense ones)."""
    blocks, M = table._blocks, h_MD.shape[0]
    ids, weights, scores, load = _routing_buffers(table._n_moe, M, top_k, n_experts)
    _check(_lib().dsmoe_stack_decode(
        table, len(blocks), h_MD.data_ptr(), M, T, cos_MP.data_ptr(), sin_MP.data_ptr(), latent_LBSC.data_ptr(),
        k_pe_LBSR.data_ptr(), latent_LBSC.stride(0), k_pe_LBSR.stride(0), latent_LBSC.stride(1),
        k_pe_LBSR.stride(1), positions_BT.data_ptr(), ids.data_ptr(), weights.data_ptr(), scores.data_ptr(),
        load.data_ptr()), "block")
    moe = iter(zip(ids.unbind(0), weights.unbind(0), scores.unbind(0), load.unbind(0)))
    return [next(moe) if b.is_moe else None for b in blocks]


def step_decode(table, embed: Weight, tokens_BT: torch.Tensor, cos_table: torch.Tensor, sin_table: torch.Tensor,
                latent_LBSC: torch.Tensor, k_pe_LBSR: torch.Tensor, positions_BT: torch.Tensor, top_k: int,
                n_experts: int, norm: torch.Tensor, eps: float, head: Weight):
    """A whole decode step (step_decode.c): the tokens' embeddings, the blocks of `table`,
    the final norm and the head. Returns (h (M, D): the last block's output, logits (M, V))."""
    M, T = tokens_BT.numel(), tokens_BT.shape[-1]
    tokens, positions = tokens_BT.reshape(-1).contiguous(), positions_BT.reshape(-1).contiguous()
    ids, weights, scores, load = _routing_buffers(table._n_moe, M, top_k, n_experts)
    h, logits = torch.empty(M, embed.cols), torch.empty(M, head.rows)
    status = _lib().dsmoe_step_decode(
        table, len(table), ctypes.byref(embed), tokens.data_ptr(), M, T, cos_table.data_ptr(), sin_table.data_ptr(),
        cos_table.shape[-1], latent_LBSC.data_ptr(), k_pe_LBSR.data_ptr(), latent_LBSC.stride(0),
        k_pe_LBSR.stride(0), latent_LBSC.stride(1), k_pe_LBSR.stride(1), positions.data_ptr(), ids.data_ptr(),
        weights.data_ptr(), scores.data_ptr(), load.data_ptr(), norm.data_ptr(), eps, ctypes.byref(head),
        h.data_ptr(), logits.data_ptr())
    if status == -2:
        raise ValueError(f"a token id is outside the vocabulary [0, {embed.rows})")
    _check(status, "step")
    return h, logits


def mtp_decode(mtp: "MTP", embed: Weight, tokens_BT: torch.Tensor, h_prev_MD: torch.Tensor,
               cos_table: torch.Tensor, sin_table: torch.Tensor, latent_BSC: torch.Tensor, k_pe_BSR: torch.Tensor,
               positions_BT: torch.Tensor, top_k: int, n_experts: int, head: Weight | None = None,
               head_rows: torch.Tensor | None = None):
    """An MTP module (`MTP`) over M = B x T new positions (mtp_decode.c): [enorm(embed(tokens));
    hnorm(h_prev)], eh_proj, its block over the module's cache rows, then its norm and
    `head` at the rows `head_rows` (int64, at most M; every row when None; no head: no
    logits). Returns (h (M, D) before the norm, logits (len(head_rows), V) or None, routing or None)."""
    M, T = tokens_BT.numel(), tokens_BT.shape[-1]
    tokens, positions = tokens_BT.reshape(-1).contiguous(), positions_BT.reshape(-1).contiguous()
    h_prev = h_prev_MD.contiguous()
    routing = tuple(r[0] for r in _routing_buffers(1, M, top_k, n_experts)) if mtp.block.contents.is_moe else None
    ptrs = [r.data_ptr() for r in routing] if routing is not None else [None] * 4
    h, logits = torch.empty(M, embed.cols), None
    if head is not None:
        head_rows = torch.arange(M) if head_rows is None else head_rows.to(torch.int64).contiguous()
        if head_rows.numel() > M:
            raise ValueError(f"the MTP kernel's head takes at most the {M} new positions, got {head_rows.numel()} rows")
        logits = torch.empty(head_rows.numel(), head.rows)
    status = _lib().dsmoe_mtp_decode(
        ctypes.byref(mtp), ctypes.byref(embed), tokens.data_ptr(), h_prev.data_ptr(), M, T, cos_table.data_ptr(),
        sin_table.data_ptr(), cos_table.shape[-1], latent_BSC.data_ptr(), k_pe_BSR.data_ptr(), latent_BSC.stride(0),
        k_pe_BSR.stride(0), positions.data_ptr(), *ptrs, ctypes.byref(head) if head is not None else None,
        head_rows.data_ptr() if head is not None else None, head_rows.numel() if head is not None else 0,
        h.data_ptr(), logits.data_ptr() if logits is not None else None)
    if status == -2:
        raise ValueError(f"a token id is outside the vocabulary [0, {embed.rows})")
    if status == -3:
        raise ValueError(f"a head row is outside the {M} new positions")
    _check(status, "MTP")
    return h, logits, routing


def spec_greedy(table, embed: Weight, cos_table: torch.Tensor, sin_table: torch.Tensor, latent_LBSC: torch.Tensor,
                k_pe_LBSR: torch.Tensor, norm: torch.Tensor, eps: float, head: Weight, mtp: "MTP",
                draft_head: Weight, mtp_latent_BSC: torch.Tensor, mtp_k_pe_BSR: torch.Tensor, K: int,
                lengths_B: torch.Tensor, pending_B: torch.Tensor, first_B: torch.Tensor, g_BD: torch.Tensor):
    """A greedy speculative step over B rows with K drafts each (spec_decode.c): the chain of
    drafts, the verify pass of the main model (the blocks of `table`), acceptance, and the
    MTP module's catch-up. The caches are written, not advanced. Returns (accepted (B,),
    tokens (B, K + 1): the accepted drafts then the next token, next first drafts (B,),
    their MTP hidden states (B, D))."""
    B = pending_B.shape[0]
    lengths, pending = lengths_B.to(torch.int64).contiguous(), pending_B.to(torch.int64).contiguous()
    first, g = first_B.to(torch.int64).clone(), g_BD.float().contiguous().clone()
    n_acc, tokens = torch.empty(B, dtype=torch.int64), torch.empty(B, K + 1, dtype=torch.int64)
    status = _lib().dsmoe_spec_greedy(
        table, len(table), ctypes.byref(embed), cos_table.data_ptr(), sin_table.data_ptr(), cos_table.shape[-1],
        latent_LBSC.data_ptr(), k_pe_LBSR.data_ptr(), latent_LBSC.stride(0), k_pe_LBSR.stride(0),
        latent_LBSC.stride(1), k_pe_LBSR.stride(1), norm.data_ptr(), eps, ctypes.byref(head), ctypes.byref(mtp),
        ctypes.byref(draft_head), mtp_latent_BSC.data_ptr(), mtp_k_pe_BSR.data_ptr(), mtp_latent_BSC.stride(0),
        mtp_k_pe_BSR.stride(0), B, K, lengths.data_ptr(), pending.data_ptr(), first.data_ptr(), g.data_ptr(),
        n_acc.data_ptr(), tokens.data_ptr())
    if status == -2:
        raise ValueError(f"a token id is outside the vocabulary [0, {embed.rows})")
    _check(status, "speculative step")
    return n_acc, tokens, first, g


def _lib() -> ctypes.CDLL | None:
    lib = build.library()
    if lib is not None and id(lib) not in _declared:
        declare(lib)
        _declared.add(id(lib))
    return lib
