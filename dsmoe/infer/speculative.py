"""Self-speculative decoding with the model's own MTP module (DeepSeek-V3 report §2.2, §5.4.3).

At inference the depth-1 MTP module drafts the token after next: at position i it takes
the main model's hidden state h_i and the embedding of t_{i+1} and predicts t_{i+2}.
Each step, for every running request with pending token t_n and a first draft d_1 for t_{n+1}:
0. chain (depth k > 1): run the module again at position n + j on its own output hidden
   state and d_j to draft d_{j+1}, up to d_k (SGLang and vLLM run V3's one MTP layer so);
1. verify: one forward pass of the main model over [t_n, d_1 .. d_k] (absorbed attention)
   gives the target distributions at the k + 1 positions;
2. accept each d_j with probability min(1, p(d_j)/q(d_j)) (q: its draft distribution)
   while the ones before it were; at the first rejection sample the next token from
   norm(max(0, p - q)); when all are accepted, a bonus token from the last position
   (Leviathan et al. 2023, Chen et al. 2023): the output has exactly the distribution of
   plain sampling, and greedy output is plain greedy's;
3. rewind the rejected positions from the main cache (per row: rows accept independently);
4. run the MTP block over the positions just confirmed (1 to k + 1) with the main model's
   hidden states, which keeps its cache consistent (overwriting the chain's entries) and
   yields the next first draft.

`MTPSpeculation(depth)` is a decoding strategy (`dsmoe/infer/decoding.py`) handed to the
engine: `Engine(model, speculative=depth)`. It owns the MTP block's cache and each running
request's pending draft; the engine knows neither. Drafts read int8 copies of the MTP
module and the head (`Drafter`); a greedy step is one native call on a CPU
(`dsmoe/model/native_spec.py`), the Python below being the same algorithm for every case.

Notable:
- The MTP block's cache has its own lengths, equal to the main cache's between steps:
  its position i needs t_{i+1}, so it covers the pending token's position only once the
  next step confirms it. Rejected positions never stay in it.
- After prefill, the MTP block catches up over the whole prompt in chunks (`prefilled`).
- Batched: rows accept different numbers of tokens and simply end at different lengths.
Not here: deeper MTP modules (V3 ships one; each would need a cache lagging one more
position), tree drafts.
"""
from __future__ import annotations

import argparse
import copy
import operator

import torch

from dsmoe import kernels
from dsmoe.errors import DsmoeError
from dsmoe.infer.cache import CacheView, LatentCache
from dsmoe.infer.decoding import Decoded, decode_thread_count
from dsmoe.infer.forward import over_chunks, pad_rows
from dsmoe.infer.requests import Request, sampling_batch
from dsmoe.infer.sampling import SamplingBatch, draw, probs, uniform
from dsmoe.model import native_block, native_spec
from dsmoe.model.fastpath import Derived
from dsmoe.model.quant import quantize_modules, quantize_rows
from dsmoe.model.sparse_experts import SparseExperts

_version = operator.attrgetter("_version")

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


def draft(logits_BV: torch.Tensor, s: SamplingBatch) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Draft tokens (B,) and the distributions they were drawn from (B, V); None for the
    distributions when every row is greedy (one-hot at the argmax: `accept` needs none)."""
    if s.all_greedy:
        return logits_BV.argmax(-1), None
    q_BV = probs(logits_BV, s)
    return draw(q_BV, s.generators), q_BV


class Drafter:
    """What drafts are drawn with. On a CPU with the native kernels: int8 copies (per-row
    scales, `quant.py`) of the model's fp32 output head and MTP module, a quarter of the
    bytes a draft reads (the head alone is the largest matrix of a step), rebuilt whenever
    a source weight changes; otherwise the model's own. A draft only has to be likely: the
    verify pass decides, and `accept` uses the distribution q each draft was drawn from, so
    greedy output stays plain greedy's and sampled output keeps exactly the target
    distribution."""

    def __init__(self):
        self._derived = Derived()
        self._copy = None  # (int8 module, Watch over the source module, the sources' versions)

    def _cheap(self, model) -> bool:
        w = getattr(model.head, "weight", None)
        return isinstance(w, torch.Tensor) and w.dtype == torch.float32 and kernels.supports(w, w)

    def head(self, model) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(int8 weight, row scales) for `Transformer.mtp_step`, or None: the model's head."""
        return self._derived.get("head_int8", quantize_rows, model.head.weight) if self._cheap(model) else None

    def module(self, model):
        """The MTP module drafts run: an int8 copy of the model's (depth 1), or the module
        itself when its weights are not all fp32 or its experts are kept elsewhere (paged
        from disk: `sparse_experts.py`, which a copy would duplicate). The choice is kept
        while no source parameter is replaced, moved or updated in place (a flat identity,
        address and version check, ~5 us; walking the module's parameters each step cost
        ~0.1 ms)."""
        source = model.mtp[0]
        if not self._cheap(model):
            return source
        kept = self._copy
        if kept is not None and kept[1].objects[0] is source and kept[1].valid() \
                and list(map(_version, kept[1].tensors)) == kept[2]:
            return kept[0]
        watch = native_block.Watch([source], extra=[(model.mtp._modules, "0", source)])
        chosen = source
        if all(t.dtype == torch.float32 for t in watch.tensors) \
                and not any(isinstance(m, SparseExperts) for m in source.modules()):
            with torch.no_grad():
                chosen = quantize_modules(copy.deepcopy(source)).eval()
        self._copy = (chosen, watch, list(map(_version, watch.tensors)))
        return chosen

    def logits(self, model, h_BD: torch.Tensor, module=None) -> torch.Tensor:
        """Draft logits from the MTP module's hidden states (B, D): its norm, then the head."""
        return model.mtp_head(1, h_BD, self.head(model), module if module is not None else self.module(model))


def chain_drafts(model, first_B: torch.Tensor, q_BV: torch.Tensor | None, g_BD: torch.Tensor, k: int,
                 mtp: CacheView, s: SamplingBatch, head, module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """k drafts per row (B, k) and their distributions (B, k, V) (None when all greedy): the
    first is given; each next one runs the MTP module at the next position on its own
    output hidden state g (in place of the main model's, which the verify pass has not
    computed yet) and the draft before it. The chain's positions are rewound from the
    module's cache at the end: the catch-up after the verify pass rewrites them with the
    main model's hidden states."""
    drafts, qs = [first_B], [q_BV]
    for _ in range(k - 1):
        g_B1D, logits_BV = model.mtp_step(1, g_BD[:, None], drafts[-1][:, None], mtp, head, module=module)
        g_BD = g_B1D[:, 0]
        d_B, q_next = draft(logits_BV, s)
        drafts.append(d_B)
        qs.append(q_next)
    if k > 1:
        mtp.rewind(k - 1)
    return torch.stack(drafts, 1), (None if s.all_greedy else torch.stack(qs, 1))


def verify_and_draft(model, pending_B: torch.Tensor, drafts_BK: torch.Tensor, q_BKV: torch.Tensor | None,
                     main: CacheView, mtp: CacheView, s: SamplingBatch, head=None, module=None):
    """One speculative step over rows with pending token t_n and k drafts (see the module note).
    Returns (accepted (B,), next token (B,), next first draft (B,), its distribution (B, V) or
    None when all greedy, the MTP module's hidden state it was drawn from (B, D))."""
    B, K = drafts_BK.shape
    hidden_BMD, logits_BMV = model.step(torch.cat([pending_B[:, None], drafts_BK], dim=1), main)
    if s.all_greedy:  # `accept` with one-hot p and q, without building them
        target_BM = logits_BMV.argmax(-1)
        n_acc_B = (target_BM[:, :K] == drafts_BK).long().cumprod(-1).sum(-1)
        next_B = target_BM.gather(1, n_acc_B[:, None]).squeeze(1)
    else:
        p_BMV = torch.stack([probs(logits_BMV[:, i], s) for i in range(K + 1)], dim=1)
        n_acc_B, next_B = accept(p_BMV, q_BKV, drafts_BK, s.generators)
    main.rewind((K - n_acc_B).cpu())
    # The MTP block catches up over the confirmed positions n .. n + accepted: position n + i
    # reads t_{n+i+1}, an accepted draft or, last, the next token; rows that accepted fewer
    # drafts than the longest run padding positions, rewound after.
    T = int(n_acc_B.max()) + 1
    i_T = torch.arange(T, device=pending_B.device)
    tokens_BT = torch.where(i_T < n_acc_B[:, None], torch.cat([drafts_BK, next_B[:, None]], dim=1)[:, :T],
                            next_B[:, None])
    rows_B = torch.arange(B, device=pending_B.device) * T + n_acc_B  # each row's last confirmed position
    g_BTD, logits_BV = model.mtp_step(1, hidden_BMD[:, :T], tokens_BT, mtp, head, rows_B, module)
    mtp.rewind((T - 1 - n_acc_B).cpu())
    d_B, q_next_BV = draft(logits_BV, s)
    return n_acc_B, next_B, d_B, q_next_BV, g_BTD.reshape(B * T, -1)[rows_B]


class DepthChooser:
    """`depth="auto"`: drafts per step chosen from measured acceptance. Draft i of a chain is
    worth running while the chance that it is reached and accepted, the product of the
    measured conditional acceptance of drafts 1..i, is at least `worth` (the share of a
    plain step that one more draft and verified position cost: ~0.3-0.5 on a CPU,
    measured in bench/decode_fast.py; 0.5 keeps to the safe side). A draft position not
    yet measured is given the one before it's rate, so the chain grows to find out.
    Deterministic given the tokens (no timing), so a seeded request decodes the same way
    whenever it runs alone."""

    def __init__(self, max_depth: int = 4, worth: float = 0.5, prior: int = 4):
        self.max_depth, self.worth, self.prior = max_depth, worth, prior
        self.reached = [0] * (max_depth + 1)  # [i]: times draft i was judged (drafts < i accepted)
        self.accepted = [0] * (max_depth + 1)

    def rate(self, i: int, before: float) -> float:
        """Measured conditional acceptance of draft i, shrunk toward `before` (the rate of
        draft i - 1) by `prior` pseudo-counts."""
        n = self.reached[i] + self.prior
        return (self.accepted[i] + self.prior * before) / n if n else before

    def depth(self) -> int:
        depth, reach, rate = 1, 1.0, 1.0
        for i in range(1, self.max_depth + 1):
            rate = self.rate(i, rate)
            reach *= rate
            if i > 1 and reach < self.worth:
                break
            depth = i
        return depth

    def record(self, k: int, accepted: list[int]) -> None:
        """One step's outcome: k drafts per row, `accepted` leading drafts of each row."""
        for a in accepted:
            for i in range(1, min(k, a + 1) + 1):
                self.reached[i] += 1
                self.accepted[i] += i <= a


# ------------------------------------------------------------------- the strategy
class MTPSpeculation:
    """Draft `depth` tokens with the MTP module, verify them with one main pass (a decoding
    strategy). `depth` 1 drafts the token after next as DeepSeek-V3 trained the module to;
    deeper chains run the module again on its own output (`chain_drafts`); "auto" chooses
    the depth from measured acceptance (`DepthChooser`)."""
    speculative = True
    keeps_hidden = True  # the MTP block reads the main model's hidden state at every prompt position

    def __init__(self, depth: int | str = 1):
        self.chooser = DepthChooser() if depth == "auto" else None
        if self.chooser is None and (isinstance(depth, bool) or not isinstance(depth, int) or depth < 1):
            raise DsmoeError(f"the speculative depth is the number of drafts per step: give a positive "
                             f"integer or 'auto', not {depth!r}")
        self.depth = depth
        self.cache: LatentCache | None = None  # the MTP block's, one row per running request
        # request id -> (first draft, its distribution or None when drawn greedily, the MTP
        # module's hidden state it came from)
        self.drafts: dict[str, tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]] = {}
        self.drafter = Drafter()

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

    def draft_of(self, request: Request) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """The pending first draft of a running request, the distribution it was drawn from
        (None: greedily) and the MTP module's hidden state it came from."""
        return self.drafts[request.id]

    def prefilled(self, model, joining: list[Request], rows: range, hidden_BPD: torch.Tensor,
                  first_B: torch.Tensor, chunk: int) -> None:
        """Catch the MTP block up over freshly prefilled prompts (their `rows` of its cache);
        store each request's first draft."""
        # MTP input at position i is t_{i+1}: the prompt shifted by one, then the first sampled token.
        shifted = pad_rows([r.prompt_ids[1:] + [t] for r, t in zip(joining, first_B.tolist())],
                           self.cache.device)

        module = self.drafter.module(model)

        def mtp_chunk(start: int, stop: int, n_rows: int, view: CacheView):
            h, _ = model.mtp_hidden(1, hidden_BPD[:n_rows, start:stop], shifted[:n_rows, start:stop], view,
                                    module=module)
            return h, None

        h_BD, _ = over_chunks(mtp_chunk, [len(r.prompt_ids) for r in joining], chunk, self.cache, rows)
        d_B, q_BV = draft(self.drafter.logits(model, h_BD, module), sampling_batch(joining, self.cache.device))
        for b, r in enumerate(joining):
            self.drafts[r.id] = (d_B[b], q_BV[b] if q_BV is not None else None, h_BD[b])

    def depth_for(self, running: list[Request], cache: CacheView) -> int:
        """This step's drafts per row: `depth` (or the chooser's), fewer when a row has fewer
        tokens left to make or the cache less room (a verify pass writes drafts + 1 positions)."""
        left = min(r.params.max_tokens - len(r.output_ids) for r in running)
        room = cache.cache.max_len - cache.max_length() - 1
        depth = self.chooser.depth() if self.chooser is not None else self.depth
        return max(1, min(depth, left, room))

    def _decoded(self, tokens: list[list[int]], k: int, n_acc_B: torch.Tensor) -> Decoded:
        accepted = n_acc_B.tolist()
        if self.chooser is not None:
            self.chooser.record(k, accepted)
        return Decoded(tokens, drafted=len(tokens) * k, accepted=sum(accepted))

    def decode(self, model, running: list[Request], cache: CacheView, sampling: SamplingBatch) -> Decoded:
        n = len(running)
        k = self.depth_for(running, cache)
        stored = [self.drafts[r.id] for r in running]
        first_B = torch.stack([d for d, _, _ in stored])
        g_BD = torch.stack([g for _, _, g in stored])
        q_BV = None
        if not sampling.all_greedy:  # a row drafted greedily (q None) has a one-hot q
            V = next((q.shape[-1] for _, q, _ in stored if q is not None), model.args.vocab_size)
            q_BV = torch.stack([q if q is not None else torch.nn.functional.one_hot(d, V).float()
                                for d, q, _ in stored])
        pending_B = torch.tensor([r.output_ids[-1] for r in running], device=cache.device)
        head, module = self.drafter.head(model), self.drafter.module(model)
        mtp = self.cache.rows(0, n)
        if sampling.all_greedy:  # the whole step in one native call, when the kernels take it
            done = native_spec.greedy_step(model, module, head, pending_B, first_B, g_BD, k, cache, mtp)
            if done is not None:
                n_acc_B, tokens_BM, d_B, g_next_BD = done
                tokens = []
                for b, (r, a, row) in enumerate(zip(running, n_acc_B.tolist(), tokens_BM.tolist())):
                    self.drafts[r.id] = (d_B[b], None, g_next_BD[b])
                    tokens.append(row[:a + 1])
                return self._decoded(tokens, k, n_acc_B)
        with decode_thread_count(cache.device):
            drafts_BK, q_BKV = chain_drafts(model, first_B, q_BV, g_BD, k, mtp, sampling, head, module)
            n_acc_B, next_B, d_B, q_next_BV, g_next_BD = verify_and_draft(model, pending_B, drafts_BK, q_BKV, cache,
                                                                          mtp, sampling, head, module)
        tokens = []
        for b, (r, a, ds, t) in enumerate(zip(running, n_acc_B.tolist(), drafts_BK.tolist(), next_B.tolist())):
            self.drafts[r.id] = (d_B[b], q_next_BV[b] if q_next_BV is not None else None, g_next_BD[b])
            tokens.append(ds[:a] + [t])
        return self._decoded(tokens, k, n_acc_B)


def parse_depth(text: str) -> int | str:
    """`--speculative DEPTH`: a positive number of drafts per step, or 'auto'."""
    if text == "auto":
        return text
    if text.isdigit() and int(text) > 0:
        return int(text)
    raise argparse.ArgumentTypeError(f"{text!r}: give a positive number of drafts per step, or 'auto'")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--speculative", nargs="?", const=1, default=False, type=parse_depth, metavar="DEPTH",
                        help="MTP self-speculative decoding; DEPTH: drafts per step (default 1, what the MTP "
                             "module is trained for) or 'auto' (chosen from measured acceptance)")
