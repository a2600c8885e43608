"""Self-speculative decoding with the model's own MTP module (DeepSeek-V3 report §2.2, §5.4.3).

At inference the depth-1 MTP module drafts the token after next: at position i it takes
the main model's hidden state h_i and the embedding of t_{i+1} and predicts t_{i+2}.
Each step, for every running request with pending token t_n and a draft d for t_{n+1}:
1. verify: one forward pass of the main model over [t_n, d] (absorbed attention) gives
   the target distributions p(.|..t_n) and p(.|..t_n, d);
2. accept d with probability min(1, p(d)/q(d)) (q: the draft's distribution), else
   sample the next token from norm(max(0, p - q)); when d is accepted, a bonus token is
   sampled from the second position (Leviathan et al. 2023, Chen et al. 2023): the output
   has exactly the distribution of plain sampling, and greedy output is plain greedy's;
3. rewind the rejected position from the main cache (per row: rows accept independently);
4. run the MTP block over the positions just confirmed (1 or 2), which both keeps its own
   cache consistent and yields the next draft.

Notable:
- The MTP block's cache has its own lengths: it lags the main cache by one position
  (position i needs t_{i+1}). Rejected positions never reach it, so it never rewinds
  anything but padding.
- After prefill, the MTP block catches up over the whole prompt in chunks
  (`draft_after_prefill`); from then on each step is one main pass over 2 tokens and one
  MTP pass over at most 2.
- Batched: rows accept different numbers of tokens and simply end at different lengths.
Not here: drafting with more than one MTP depth (V3 ships depth 1; a deeper chain would need
each depth's cache to lag one more position), tree drafts.
"""
from __future__ import annotations

import torch

from dsmoe.infer.engine import block_forward, forward_hidden, logits, pad_rows, run_chunked
from dsmoe.infer.sampling import SamplingBatch, probs, sample, uniform
from dsmoe.model.transformer import resolve_attn_impl


# ----------------------------------------------------------------- pure functions
def mtp_hidden(model, h_prev_BTD: torch.Tensor, next_tokens_BT: torch.Tensor, cache) -> torch.Tensor:
    """The depth-1 MTP module over T positions (written to `cache`): its hidden state (B, T, D).
    `MTPModule.forward` (embedding first), its block run as the engine runs the main ones."""
    module = model.mtp[0]
    T = next_tokens_BT.shape[1]
    cos, sin, mask = model.rope_and_mask(T, cache)
    x = module.eh_proj(torch.cat([module.enorm(model.embed(next_tokens_BT)), module.hnorm(h_prev_BTD)], dim=-1))
    h = block_forward(module.block, x, cos, sin, cache.layer(0), mask, resolve_attn_impl("auto", T, True))
    cache.advance(T)
    return h


def draft_logits(model, h_BD: torch.Tensor) -> torch.Tensor:
    """MTP hidden state -> logits for the token after next, through the shared head."""
    return model.head(model.mtp[0].norm(h_BD))


def accept(p_BKV: torch.Tensor, q_BDV: torch.Tensor, drafts_BD: torch.Tensor,
           generators=None, greedy: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The standard speculative acceptance rule for D drafts per row.

    p_BKV: target distributions at the D+1 verified positions; q_BDV: the draft
    distributions each draft was sampled from. Draft i is accepted with probability
    min(1, p_i(d_i) / q_i(d_i)) while all before it were; at the first rejection the next
    token is drawn from norm(max(0, p_i - q_i)); if all are accepted, from p_D (bonus).
    Returns (number accepted (B,), next token (B,)). `greedy` (one-hot p and q) skips the
    random draws; the result is the same.
    """
    B, D = drafts_BD.shape
    p_d = p_BKV[:, :D].gather(-1, drafts_BD[..., None]).squeeze(-1)  # (B, D)
    q_d = q_BDV.gather(-1, drafts_BD[..., None]).squeeze(-1)
    if greedy:
        ok = p_d > 0
    else:
        ok = uniform((B, D), generators, device=p_BKV.device) * q_d < p_d
    n_accepted = ok.long().cumprod(-1).sum(-1)  # leading run of accepted drafts
    rows = torch.arange(B, device=p_BKV.device)
    p_at = p_BKV[rows, n_accepted]
    q_at = torch.cat([q_BDV, torch.zeros_like(q_BDV[:, :1])], dim=1)[rows, n_accepted]
    residual = (p_at - q_at).clamp_min(0)
    mass = residual.sum(-1, keepdim=True)
    residual = torch.where(mass > 0, residual / mass.clamp_min(1e-30), p_at)  # p == q: keep p
    next_B = residual.argmax(-1) if greedy else sample(residual, generators)
    return n_accepted, next_B


def make_drafts(logits_BV: torch.Tensor, s: SamplingBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """Draft tokens (B,) and the distributions they were drawn from (B, V)."""
    q_BV = probs(logits_BV, s)
    d_B = q_BV.argmax(-1) if s.all_greedy else sample(q_BV, s.generators)
    return d_B, q_BV


# ---------------------------------------------------------- the engine's two hooks
def draft_after_prefill(engine, joining, rows: range, hidden_BPD: torch.Tensor, first_B: torch.Tensor) -> None:
    """Catch the MTP block up over freshly prefilled prompts (their `rows` of the draft cache);
    store each request's first draft."""
    model = engine.model
    # MTP input at position i is t_{i+1}: the prompt shifted by one, then the first sampled token.
    shifted = pad_rows([r.prompt_ids[1:] + [t] for r, t in zip(joining, first_B.tolist())], engine.device)

    def run(c0, c1, m, view):
        return mtp_hidden(model, hidden_BPD[:m, c0:c1], shifted[:m, c0:c1], view), None

    h_BD, _ = run_chunked(run, [len(r.prompt_ids) for r in joining], engine.prefill_chunk,
                          engine.draft_cache, rows)
    s = SamplingBatch.build([r.params for r in joining], [r._generator for r in joining], engine.device)
    d_B, q_BV = make_drafts(draft_logits(model, h_BD), s)
    for b, r in enumerate(joining):
        r._draft = (d_B[b], q_BV[b])


def speculative_step(engine, events: list) -> None:
    """One verify-accept-draft step for every running request (see the module note)."""
    model, running = engine.model, engine.running
    n = len(running)
    s = engine.sampling_batch()
    drafts_B = torch.stack([r._draft[0] for r in running])
    q_B1V = torch.stack([r._draft[1] for r in running])[:, None]
    pending_B = torch.tensor([r.output_ids[-1] for r in running], device=engine.device)
    tokens_B2 = torch.stack([pending_B, drafts_B], dim=1)

    main = engine.cache.rows(0, n)
    hidden_B2D = forward_hidden(model, tokens_B2, main, "absorb")
    logits_B2V = logits(model, hidden_B2D)
    p_B2V = torch.stack([probs(logits_B2V[:, 0], s), probs(logits_B2V[:, 1], s)], dim=1)
    n_acc_B, next_B = accept(p_B2V, q_B1V, drafts_B[:, None], s.generators, greedy=s.all_greedy)
    main.rewind((1 - n_acc_B).cpu())

    # The MTP block sees the confirmed positions n (input t_{n+1}) and, if d was accepted, n+1.
    acc = n_acc_B.bool()
    mtp_tokens_B2 = torch.stack([torch.where(acc, drafts_B, next_B), next_B], dim=1)
    draft_view = engine.draft_cache.rows(0, n)
    h_B2D = mtp_hidden(model, hidden_B2D, mtp_tokens_B2, draft_view)
    draft_view.rewind((1 - n_acc_B).cpu())
    h_BD = h_B2D[torch.arange(n, device=engine.device), n_acc_B]
    d_B, q_BV = make_drafts(draft_logits(model, h_BD), s)

    engine.stats.drafted += n
    engine.stats.accepted += int(n_acc_B.sum())
    for b, (r, a, d, t) in enumerate(zip(running, n_acc_B.tolist(), drafts_B.tolist(), next_B.tolist())):
        r._draft = (d_B[b], q_BV[b])
        events.append(engine._append(r, [d, t] if a else [t]))
