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

`MTPSpeculation` is a decoding strategy (`dsmoe/infer/decoding.py`) handed to the engine:
`Engine(model, decoder=MTPSpeculation())`. It owns the MTP block's cache and each running
request's pending draft; the engine knows neither.

Notable:
- The MTP block's cache has its own lengths: it lags the main cache by one position
  (position i needs t_{i+1}). Rejected positions never reach it, so it never rewinds
  anything but padding.
- After prefill, the MTP block catches up over the whole prompt in chunks (`prefilled`);
  from then on each step is one main pass over 2 tokens and one MTP pass over at most 2.
- Batched: rows accept different numbers of tokens and simply end at different lengths.
Not here: drafting with more than one MTP depth (V3 ships depth 1; a deeper chain would need
each depth's cache to lag one more position), tree drafts.
"""
from __future__ import annotations

import torch

from dsmoe import kernels
from dsmoe.errors import DsmoeError
from dsmoe.infer.cache import CacheView, LatentCache
from dsmoe.infer.decoding import Decoded, decode_thread_count
from dsmoe.infer.forward import over_chunks, pad_rows
from dsmoe.infer.requests import Request, sampling_batch
from dsmoe.infer.sampling import SamplingBatch, draw, probs, uniform
from dsmoe.model.fastpath import Derived
from dsmoe.model.quant import quantize_rows

# Shape legend: B rows, V vocabulary, D model dim, N drafts per row, M = N + 1 verified positions.


# ----------------------------------------------------------------- pure functions
def accept(p_BMV: torch.Tensor, q_BNV: torch.Tensor, drafts_BN: torch.Tensor,
           generators=None, greedy: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The standard speculative acceptance rule for N drafts per row.

    p_BMV: target distributions at the M = N+1 verified positions; q_BNV: the draft
    distributions each draft was drawn from. Draft i is accepted with probability
    min(1, p_i(d_i) / q_i(d_i)) while all before it were; at the first rejection the next
    token is drawn from norm(max(0, p_i - q_i)); if all are accepted, from p_N (bonus).
    Returns (number accepted (B,), next token (B,)). `greedy` (one-hot p and q) skips the
    random draws; the result is the same.
    """
    B, N = drafts_BN.shape
    p_d = p_BMV[:, :N].gather(-1, drafts_BN[..., None]).squeeze(-1)  # (B, N)
    q_d = q_BNV.gather(-1, drafts_BN[..., None]).squeeze(-1)
    if greedy:
        ok = p_d > 0
    else:
        ok = uniform((B, N), generators, device=p_BMV.device) * q_d < p_d
    n_accepted = ok.long().cumprod(-1).sum(-1)  # leading run of accepted drafts
    rows = torch.arange(B, device=p_BMV.device)
    p_at = p_BMV[rows, n_accepted]
    q_at = torch.cat([q_BNV, torch.zeros_like(q_BNV[:, :1])], dim=1)[rows, n_accepted]
    residual = (p_at - q_at).clamp_min(0)
    mass = residual.sum(-1, keepdim=True)
    residual = torch.where(mass > 0, residual / mass.clamp_min(1e-30), p_at)  # p == q: keep p
    next_B = residual.argmax(-1) if greedy else draw(residual, generators)
    return n_accepted, next_B


def make_drafts(logits_BV: torch.Tensor, s: SamplingBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """Draft tokens (B,) and the distributions they were drawn from (B, V)."""
    q_BV = probs(logits_BV, s)
    d_B = q_BV.argmax(-1) if s.all_greedy else draw(q_BV, s.generators)
    return d_B, q_BV


class DraftHead:
    """The output head drafts are drawn with: on a CPU with the native kernels, an int8 copy
    of the model's fp32 head (per-row scales, `quant.quantize_rows`; a quarter of the bytes,
    the largest matrix a draft reads), rebuilt whenever the head changes; otherwise the
    model's own MTP head. A draft only has to be likely: the verify pass decides, and
    `accept` uses the distribution q the draft was drawn from, so greedy output stays plain
    greedy's and sampled output keeps exactly the target distribution."""

    def __init__(self):
        self._derived = Derived()

    def logits(self, model, h_BD: torch.Tensor) -> torch.Tensor:
        w = getattr(model.head, "weight", None)
        if (isinstance(w, torch.Tensor) and w.dtype == torch.float32 and h_BD.shape[0] <= kernels.MAX_ROWS
                and kernels.supports(h_BD, w)):
            q, scale = self._derived.get("head_int8", quantize_rows, w)
            return kernels.linear(model.mtp[0].norm(h_BD), q, scale)
        return model.mtp_logits(1, h_BD)


def verify_and_draft(model, pending_B: torch.Tensor, drafts_B: torch.Tensor, q_BV: torch.Tensor,
                     main: CacheView, mtp: CacheView, s: SamplingBatch, draft_head: DraftHead | None = None):
    """One speculative step over rows with pending token t_n and draft d (see the module note).
    Returns (accepted (B,), next token (B,), next draft (B,), its distribution (B, V))."""
    B = pending_B.shape[0]
    hidden_B2D, logits_B2V = model.step(torch.stack([pending_B, drafts_B], dim=1), main)
    if s.all_greedy:  # `accept` with one-hot p and q, without building them
        target_B2 = logits_B2V.argmax(-1)
        n_acc_B = (target_B2[:, 0] == drafts_B).long()
        next_B = target_B2.gather(1, n_acc_B[:, None]).squeeze(1)
    else:
        p_B2V = torch.stack([probs(logits_B2V[:, 0], s), probs(logits_B2V[:, 1], s)], dim=1)
        n_acc_B, next_B = accept(p_B2V, q_BV[:, None], drafts_B[:, None], s.generators)
    main.rewind((1 - n_acc_B).cpu())
    # The MTP block sees the confirmed positions n (input t_{n+1}) and, if d was accepted, n+1.
    mtp_tokens_B2 = torch.stack([torch.where(n_acc_B.bool(), drafts_B, next_B), next_B], dim=1)
    h_B2D, _ = model.mtp_hidden(1, hidden_B2D, mtp_tokens_B2, mtp)
    mtp.rewind((1 - n_acc_B).cpu())
    h_BD = h_B2D[torch.arange(B, device=h_B2D.device), n_acc_B]
    d_B, q_next_BV = make_drafts(draft_head.logits(model, h_BD) if draft_head else model.mtp_logits(1, h_BD), s)
    return n_acc_B, next_B, d_B, q_next_BV


# ------------------------------------------------------------------- the strategy
class MTPSpeculation:
    """Draft one token with the MTP module, verify it with one main pass (a decoding strategy)."""
    speculative = True
    keeps_hidden = True  # the MTP block reads the main model's hidden state at every prompt position

    def __init__(self):
        self.cache: LatentCache | None = None  # the MTP block's, one row per running request
        self.drafts: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # request id -> (draft, q)
        self.draft_head = DraftHead()

    def attach(self, model, max_len: int, max_rows: int) -> None:
        args = model.args
        if args.n_mtp_layers < 1:
            raise DsmoeError("speculative decoding drafts with the model's MTP module, and this model has "
                             "none (n_mtp_layers=0): run without speculative decoding")
        param = next(model.parameters())
        self.cache = LatentCache(args, 0, max_len, n_layers=1, device=param.device, dtype=param.dtype,
                                 max_rows=max_rows)

    def acquire(self, n: int) -> None:
        self.cache.acquire(n)

    def release(self, row: int, request: Request) -> None:
        self.cache.release(row)
        self.drafts.pop(request.id, None)

    def draft_of(self, request: Request) -> tuple[torch.Tensor, torch.Tensor]:
        """The pending draft of a running request and the distribution it was drawn from."""
        return self.drafts[request.id]

    def prefilled(self, model, joining: list[Request], rows: range, hidden_BPD: torch.Tensor,
                  first_B: torch.Tensor, chunk: int) -> None:
        """Catch the MTP block up over freshly prefilled prompts (their `rows` of its cache);
        store each request's first draft."""
        # MTP input at position i is t_{i+1}: the prompt shifted by one, then the first sampled token.
        shifted = pad_rows([r.prompt_ids[1:] + [t] for r, t in zip(joining, first_B.tolist())],
                           self.cache.device)

        def mtp_chunk(start: int, stop: int, n_rows: int, view: CacheView):
            h, _ = model.mtp_hidden(1, hidden_BPD[:n_rows, start:stop], shifted[:n_rows, start:stop], view)
            return h, None

        h_BD, _ = over_chunks(mtp_chunk, [len(r.prompt_ids) for r in joining], chunk, self.cache, rows)
        d_B, q_BV = make_drafts(self.draft_head.logits(model, h_BD), sampling_batch(joining, self.cache.device))
        for b, r in enumerate(joining):
            self.drafts[r.id] = (d_B[b], q_BV[b])

    def decode(self, model, running: list[Request], cache: CacheView, sampling: SamplingBatch) -> Decoded:
        n = len(running)
        drafts_B = torch.stack([self.drafts[r.id][0] for r in running])
        q_BV = torch.stack([self.drafts[r.id][1] for r in running])
        pending_B = torch.tensor([r.output_ids[-1] for r in running], device=cache.device)
        with decode_thread_count(cache.device):
            n_acc_B, next_B, d_B, q_next_BV = verify_and_draft(model, pending_B, drafts_B, q_BV, cache,
                                                               self.cache.rows(0, n), sampling, self.draft_head)
        tokens = []
        for b, (r, a, d, t) in enumerate(zip(running, n_acc_B.tolist(), drafts_B.tolist(), next_B.tolist())):
            self.drafts[r.id] = (d_B[b], q_next_BV[b])
            tokens.append([d, t] if a else [t])
        return Decoded(tokens, drafted=n, accepted=int(n_acc_B.sum()))
