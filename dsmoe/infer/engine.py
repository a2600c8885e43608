"""The inference engine: a continuously batched decode loop over the MLA latent cache.

Requests of any length join and leave a running batch between steps (continuous
batching). Each `step()`:
1. admits waiting requests into free cache rows and prefills them: naive attention
   (expanding the latent to per-head K/V is cheaper than absorbing for many tokens),
   chunked so a long prompt never materialises more than `prefill_chunk` positions of
   K/V at once; the first token is sampled from the prefill logits;
2. decodes one token for every running request with absorbed attention directly over
   the latent cache (no K/V is ever expanded), or, with `speculative=True`, drafts with
   the model's MTP module and verifies (`dsmoe/infer/speculative.py`);
3. detokenises incrementally, applies stop tokens, stop strings and max_tokens, calls
   each request's `on_event` with what it produced, and frees the rows of finished
   requests.

Notable:
- The hot paths are small pure functions of (model, tokens, cache): `forward_hidden` runs
  the model's modules in the model's order without the input check and the output head
  (applied only where logits are needed), naive attention for prefill and latent-space
  attention for decode and the speculative verify pass, and the routed experts as ragged
  grouped matmuls over only the experts the tokens chose (`ragged_experts`; the model's
  CPU path pads every expert to the busiest one, a layout for training batches). A test
  pins it to `model.run`. `compile=True` wraps `decode_step` in `torch.compile`
  (gpt-fast's `decode_one_token`); on a CPU the routed experts stay eager (the fp32 grouped
  matmul cannot be traced) and compiling takes from seconds to minutes.
- Cache memory follows requests: a row is acquired when a request joins and released when
  it ends, at exactly (kv_lora_rank + qk_rope_head_dim) x dtype size bytes per token per
  layer (`dsmoe/infer/cache.py`).
- Thread-safe where it must be: `add_request` and `abort` may be called from any thread
  (the server's handlers); `step` runs on one thread.
- Stop strings never leak: text that could still become a stop string is held back.
Not here: prefix caching, preemption, beam search, logprobs.
"""
from __future__ import annotations

import itertools
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
import torch.nn.functional as F

from dsmoe.errors import DsmoeError
from dsmoe.infer.cache import LatentCache
from dsmoe.infer.sampling import SamplingBatch, SamplingParams, next_tokens
from dsmoe.model.moe import grouped_mm

DEFAULT_MAX_LEN = 8192  # cache positions per request unless asked otherwise (V3's context is 160K)


# ----------------------------------------------------------------- hot pure functions
def forward_hidden(model, tokens_BT: torch.Tensor, cache, impl: str) -> torch.Tensor:
    """The main stack over new tokens, written to `cache`: the hidden state before the final
    norm (B, T, D). `model.run(tokens, cache, attn_impl=impl)` with the model's own modules
    in the model's order, minus the input check (the engine made or checked these tokens)
    and the output head (callers apply `logits` only where they need it: a prefill chunk
    needs at most each prompt's last position), with the routed experts of `ragged_moe`.
    Tested against `model.run`."""
    T = tokens_BT.shape[1]
    cos, sin, mask = model.rope_and_mask(T, cache)
    h = model.embed(tokens_BT)
    for i, block in enumerate(model.layers):
        h = block_forward(block, h, cos, sin, cache.layer(i), mask, impl)
    cache.advance(T)
    return h


def logits(model, h: torch.Tensor) -> torch.Tensor:
    return model.head(model.norm(h))


def block_forward(block, h_BTD, cos, sin, layer_cache, mask, impl: str) -> torch.Tensor:
    """`Block.forward`, with `ragged_moe`."""
    h_BTD = h_BTD + block.attn(block.attn_norm(h_BTD), cos, sin, layer_cache, mask, impl)
    x = block.ffn_norm(h_BTD)
    return h_BTD + (ragged_moe(block.ffn, x) if block.is_moe else block.ffn(x))


def ragged_moe(moe, x_BTD: torch.Tensor) -> torch.Tensor:
    """`MoE.forward` without the routing record, with `ragged_experts`."""
    x_TD = x_BTD.reshape(-1, x_BTD.shape[-1])
    weights_TK, ids_TK, _ = moe.gate(x_TD)
    experts = ragged_experts if x_TD.is_cuda else _ragged_experts_uncompiled
    y_TD = experts(moe.experts, x_TD, ids_TK, weights_TK)
    if moe.shared_experts is not None:
        y_TD = y_TD + moe.shared_experts(x_TD)
    return y_TD.view_as(x_BTD)


def ragged_experts(experts, x_TD: torch.Tensor, ids_TK: torch.Tensor, weights_TK: torch.Tensor) -> torch.Tensor:
    """Routed experts at inference: the token-expert pairs sorted by expert and each
    projection one ragged grouped matmul, so an expert costs what its tokens cost (nothing
    if none chose it): no padding to the busiest expert, no copy of the weights, no host
    sync. (The model's CPU training path pads; at inference, with few tokens per step,
    that reads every expert's weights.)"""
    K = ids_TK.shape[1]
    ids_N = ids_TK.flatten()
    order_N = ids_N.argsort(stable=True)
    offsets_E = torch.bincount(ids_N, minlength=experts.n_experts).cumsum(0).to(torch.int32)
    token_N = order_N // K
    x_ND = x_TD.index_select(0, token_N)
    h_NF = F.silu(grouped_mm(x_ND, experts.w1_EFD, offsets_E)) * grouped_mm(x_ND, experts.w3_EFD, offsets_E)
    out_ND = grouped_mm(h_NF, experts.w2_EDF, offsets_E) * weights_TK.flatten()[order_N, None].to(x_TD.dtype)
    return torch.zeros_like(x_TD).index_add_(0, token_N, out_ND.to(x_TD.dtype))


# torch.compile cannot trace the CPU grouped matmul in fp32 (its meta function wants bf16):
# on a CPU the experts stay eager inside a compiled step.
_ragged_experts_uncompiled = torch.compiler.disable(ragged_experts)


def decode_step(model, tokens_B1: torch.Tensor, cache) -> torch.Tensor:
    """One new token per row, attending in latent space: next-token logits (B, V)."""
    return logits(model, forward_hidden(model, tokens_B1, cache, "absorb")[:, -1])


# ------------------------------------------------------------------- requests, events
@dataclass
class Request:
    id: str
    prompt_ids: list[int]
    params: SamplingParams
    on_event: Callable[["Event"], None] | None = None
    output_ids: list[int] = field(default_factory=list)
    text: str = ""  # text delivered so far (stop strings cut off)
    finish_reason: str | None = None  # "stop", "length", "abort" or "error"
    error: str | None = None
    arrived: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None
    finished_at: float | None = None
    # engine-private state
    _generator: torch.Generator | None = None
    _detok: "_Detokenizer | None" = None
    _draft: object = None  # speculative: (draft token, draft probabilities) for the next step

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class Event:
    """What one step produced for one request."""
    request: Request
    token_ids: list[int]
    text: str  # new text (may be empty while a possible stop string is held back)
    finished: bool


@dataclass
class EngineStats:
    prefill_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_tokens: int = 0
    decode_seconds: float = 0.0
    decode_steps: int = 0
    drafted: int = 0
    accepted: int = 0

    @property
    def acceptance(self) -> float:
        return self.accepted / self.drafted if self.drafted else float("nan")

    @property
    def decode_tokens_per_second(self) -> float:
        return self.decode_tokens / self.decode_seconds if self.decode_seconds else float("nan")

    @property
    def prefill_tokens_per_second(self) -> float:
        return self.prefill_tokens / self.prefill_seconds if self.prefill_seconds else float("nan")


class _Detokenizer:
    """Incremental decoding: emit text only once it is stable (no half UTF-8 character),
    decoding a short window of tokens instead of the whole output each time."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0
        self.text = ""

    def add(self, ids: list[int], final: bool = False) -> None:
        """Decode new ids; `final` flushes whatever is left, half characters included."""
        self.ids.extend(ids)
        before = self.tokenizer.decode(self.ids[self.prefix_offset:self.read_offset])
        now = self.tokenizer.decode(self.ids[self.prefix_offset:])
        if len(now) > len(before) and (final or not now.endswith("\ufffd")):
            self.text += now[len(before):]
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)


# ------------------------------------------------------------------------- the engine
class Engine:
    def __init__(self, model, tokenizer=None, *, max_batch: int = 16, max_len: int | None = None,
                 prefill_chunk: int = 256, speculative: bool = False, compile: bool = False):
        args = model.args
        if max_batch < 1 or prefill_chunk < 1:
            raise DsmoeError("max_batch and prefill_chunk must be positive")
        if speculative and args.n_mtp_layers < 1:
            raise DsmoeError("speculative decoding drafts with the model's MTP module, and this model has "
                             "none (n_mtp_layers=0): run without speculative decoding")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.args = args
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.max_len = min(max_len or min(args.max_seq_len, DEFAULT_MAX_LEN), args.max_seq_len)
        self.max_batch = max_batch
        self.prefill_chunk = prefill_chunk
        self.speculative = speculative
        self.cache = LatentCache(args, 0, self.max_len, n_layers=args.n_layers, device=self.device,
                                 dtype=self.dtype, max_rows=max_batch)
        # The MTP block's cache lags the main one by a token (it needs t_{i+1} at position i),
        # so it has rows and lengths of its own.
        self.draft_cache = (LatentCache(args, 0, self.max_len, n_layers=1, device=self.device,
                                        dtype=self.dtype, max_rows=max_batch) if speculative else None)
        self.decode_fn = torch.compile(decode_step, dynamic=True) if compile else decode_step
        self.running: list[Request] = []  # running[i] owns cache row i
        self.waiting: deque[Request] = deque()
        self.stats = EngineStats()
        self._lock = threading.Lock()
        self._aborted: set[str] = set()
        self._ids = itertools.count()
        self._sampling: SamplingBatch | None = None  # rebuilt when the batch changes
        eos = getattr(tokenizer, "eos_id", None)
        self.eos_ids = {eos} if eos is not None else set()

    # ------------------------------------------------------------------ public API
    def add_request(self, prompt_ids: list[int], params: SamplingParams | None = None, *,
                    on_event: Callable[[Event], None] | None = None, request_id: str | None = None) -> Request:
        """Queue a request (checked before anything runs); it joins the batch at the next step."""
        params = (params or SamplingParams()).validate()
        prompt_ids = list(prompt_ids)
        self.check_prompt(prompt_ids, params.max_tokens)
        if params.stop and self.tokenizer is None:
            raise DsmoeError("stop strings need a tokenizer: give the engine one, or use stop_token_ids")
        req = Request(id=request_id or f"req-{next(self._ids)}", prompt_ids=prompt_ids,
                      params=params, on_event=on_event)
        req._generator = params.generator(self.device)
        req._detok = _Detokenizer(self.tokenizer) if self.tokenizer is not None else None
        with self._lock:
            self.waiting.append(req)
        return req

    def check_prompt(self, prompt_ids: list[int], max_tokens: int) -> None:
        if not prompt_ids:
            raise DsmoeError("the prompt is empty: give at least one token")
        if not all(isinstance(t, int) and 0 <= t < self.args.vocab_size for t in prompt_ids):
            raise DsmoeError(f"prompt token ids must be integers in [0, {self.args.vocab_size})")
        if len(prompt_ids) + max_tokens > self.max_len:
            raise DsmoeError(f"this model's context is {self.max_len} tokens; the prompt has "
                             f"{len(prompt_ids)} and max_tokens is {max_tokens}: shorten the prompt "
                             f"or lower max_tokens")

    def abort(self, request_id: str) -> None:
        """Stop a request (waiting or running) at the next step and free its row."""
        with self._lock:
            self._aborted.add(request_id)

    def has_work(self) -> bool:
        with self._lock:
            return bool(self.running or self.waiting or self._aborted)

    @torch.no_grad()
    def step(self) -> list[Event]:
        """Admit, prefill, decode one token per request; returns (and dispatches) the events."""
        events: list[Event] = []
        self._apply_aborts(events)
        self._admit(events)
        self._release_finished()  # aborted, or done at their first token
        if self.running:
            start, n_events = time.perf_counter(), len(events)
            if self.speculative:
                from dsmoe.infer.speculative import speculative_step
                speculative_step(self, events)
            else:
                self._decode(events)
            self.stats.decode_seconds += time.perf_counter() - start
            self.stats.decode_steps += 1
            self.stats.decode_tokens += sum(len(ev.token_ids) for ev in events[n_events:])
            self._release_finished()
        for ev in events:
            if ev.request.on_event is not None:
                ev.request.on_event(ev)
        return events

    def generate(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams] | None = None
                 ) -> list[Request]:
        """Run requests to completion together; returns them in the order given."""
        params_list = params if isinstance(params, list) else [params] * len(prompts)
        reqs = [self.add_request(p, sp) for p, sp in zip(prompts, params_list)]
        while not all(r.finished for r in reqs):
            self.step()
        return reqs

    def stream(self, prompt_ids: list[int], params: SamplingParams | None = None) -> Iterator[Event]:
        """Yield this request's events as its tokens are produced (other requests progress too)."""
        req = self.add_request(prompt_ids, params)
        while not req.finished:
            for ev in self.step():
                if ev.request is req:
                    yield ev

    def fail_all(self, message: str) -> list[Event]:
        """After an unexpected error: finish every request with reason 'error', free all rows."""
        events = []
        with self._lock:
            pending = list(self.running) + list(self.waiting)
            self.waiting.clear()
        for r in pending:
            if not r.finished:
                r.error = message
                events.append(self._finish(r, "error"))
        self._release_finished()
        for ev in events:
            if ev.request.on_event is not None:
                ev.request.on_event(ev)
        return events

    # ------------------------------------------------------------------ scheduling
    def _apply_aborts(self, events: list[Event]) -> None:
        with self._lock:
            aborted, self._aborted = self._aborted, set()
            if aborted:
                keep = deque(r for r in self.waiting if r.id not in aborted)
                dropped = [r for r in self.waiting if r.id in aborted]
                self.waiting = keep
            else:
                dropped = []
        for r in dropped + [r for r in self.running if r.id in aborted and not r.finished]:
            events.append(self._finish(r, "abort"))

    def _admit(self, events: list[Event]) -> None:
        with self._lock:
            free = self.max_batch - len(self.running)
            joining = [self.waiting.popleft() for _ in range(min(free, len(self.waiting)))]
        if not joining:
            return
        # Longest first: the requests still prefilling in any chunk are then a prefix of the rows.
        joining.sort(key=lambda r: -len(r.prompt_ids))
        start = time.perf_counter()
        rows = self.cache.acquire(len(joining))
        if self.draft_cache is not None:
            self.draft_cache.acquire(len(joining))
        self.running.extend(joining)  # from here on, rows and requests match (fail_all frees both)
        self._sampling = None
        logits_BV, hidden = prefill(self.model, [r.prompt_ids for r in joining], self.cache, rows,
                                    self.prefill_chunk, keep_hidden=self.speculative)
        first = next_tokens(logits_BV, SamplingBatch.build([r.params for r in joining],
                                                           [r._generator for r in joining], self.device))
        first_list = first.tolist()
        if self.speculative:
            from dsmoe.infer.speculative import draft_after_prefill
            draft_after_prefill(self, joining, rows, hidden, first)
        self.stats.prefill_tokens += sum(len(r.prompt_ids) for r in joining)
        self.stats.prefill_seconds += time.perf_counter() - start
        now = time.perf_counter()
        for r, tok in zip(joining, first_list):
            r.first_token_at = now
            events.append(self._append(r, [tok]))

    def _decode(self, events: list[Event]) -> None:
        tokens = torch.tensor([[r.output_ids[-1]] for r in self.running], device=self.device)
        logits_BV = self.decode_fn(self.model, tokens, self.cache.rows(0, len(self.running)))
        new = next_tokens(logits_BV, self.sampling_batch()).tolist()
        for r, tok in zip(self.running, new):
            events.append(self._append(r, [tok]))

    def sampling_batch(self) -> SamplingBatch:
        """The running requests' sampling settings as tensors (cached until the batch changes)."""
        if self._sampling is None:
            self._sampling = SamplingBatch.build([r.params for r in self.running],
                                                 [r._generator for r in self.running], self.device)
        return self._sampling

    def _release_finished(self) -> None:
        finished = [i for i, r in enumerate(self.running) if r.finished]
        for i in reversed(finished):
            moved = self.cache.release(i)
            if self.draft_cache is not None:
                self.draft_cache.release(i)
            if moved is not None:
                self.running[i] = self.running[moved]
            self.running.pop()
        if finished:
            self._sampling = None

    # ------------------------------------------------------------- tokens -> text
    def _append(self, r: Request, tokens: list[int]) -> Event:
        """Add new tokens to a request, stopping at a stop token, max_tokens or a stop string."""
        p = r.params
        stop_ids = set(p.stop_token_ids) | (set() if p.ignore_eos else self.eos_ids)
        added, reason = [], None
        for t in tokens:
            added.append(t)
            if t in stop_ids:
                reason = "stop"
            elif len(r.output_ids) + len(added) >= p.max_tokens:
                reason = "length"
            if reason:
                break
        r.output_ids.extend(added)
        delta = ""
        if r._detok is not None:
            # a stop token is not text; at the end, half a character is shown as U+FFFD
            r._detok.add(added[:-1] if reason == "stop" else added, final=reason is not None)
            full = r._detok.text
            if p.stop:
                cut = _find_stop(full, p.stop, max(0, len(r.text) - max(map(len, p.stop))))
                if cut is not None:
                    full, reason = full[:cut], "stop"
            end = len(full) if reason else len(full) - _held_back(full, p.stop)
            delta = full[len(r.text):end]
            r.text += delta
        if reason:
            r.finish_reason, r.finished_at = reason, time.perf_counter()
        return Event(r, added, delta, reason is not None)

    def _finish(self, r: Request, reason: str) -> Event:
        r.finish_reason, r.finished_at = reason, time.perf_counter()
        return Event(r, [], "", True)


def _find_stop(text: str, stops: list[str], start: int) -> int | None:
    hits = [i for i in (text.find(s, start) for s in stops) if i >= 0]
    return min(hits) if hits else None


def _held_back(text: str, stops: list[str]) -> int:
    """Length of the longest end of `text` that begins some stop string (it may yet complete)."""
    best = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:n]):
                best = n
                break
    return best


# --------------------------------------------------------------------------- prefill
def run_chunked(fn, lengths: list[int], chunk: int, cache: LatentCache, rows: range, keep_all: bool = False):
    """Run `fn` over rows of different lengths (longest first), `chunk` positions at a time.

    `fn(c0, c1, m, view)` processes positions [c0, c1) of the first m rows (those still
    having tokens there; `view` is their cache) and returns (last_mTX, all_mTY): the first
    is kept at each row's last position, the second (if `keep_all`) at every position.
    Within a chunk, rows shorter than it write padding, rewound at the end.
    Returns (last_BX, all_BPY or None).
    """
    if lengths != sorted(lengths, reverse=True):
        raise ValueError("rows must be sorted longest first")
    B, P = len(lengths), lengths[0]
    last: list[torch.Tensor | None] = [None] * B
    every = []
    for c0 in range(0, P, chunk):
        c1 = min(c0 + chunk, P)
        m = sum(1 for n in lengths if n > c0)
        out_last, out_all = fn(c0, c1, m, cache.rows(rows.start, rows.start + m))
        for b in range(m):
            if c0 < lengths[b] <= c1:
                last[b] = out_last[b, lengths[b] - 1 - c0]
        if keep_all:
            every.append(torch.nn.functional.pad(out_all, (0, 0, 0, 0, 0, B - m)))
    view = cache.rows(rows.start, rows.stop)
    view.rewind(view.lengths - torch.tensor(lengths))
    return torch.stack(last), (torch.cat(every, dim=1) if keep_all else None)


def prefill(model, prompts: list[list[int]], cache: LatentCache, rows: range, chunk: int,
            keep_hidden: bool = False):
    """Prefill `prompts` (longest first) into cache rows `rows`, `chunk` positions at a time.

    Returns the logits at each prompt's last position (B, V) and, with `keep_hidden`, the
    hidden states of every position (B, P_max, D; MTP drafting needs them).
    """
    tokens_BP = pad_rows(prompts, cache.device)

    def run(c0, c1, m, view):
        hidden = forward_hidden(model, tokens_BP[:m, c0:c1], view, "naive")
        return hidden, hidden

    last_BD, hidden = run_chunked(run, [len(p) for p in prompts], chunk, cache, rows, keep_all=keep_hidden)
    return logits(model, last_BD), hidden


def pad_rows(rows: list[list[int]], device, value: int = 0) -> torch.Tensor:
    """Token lists of different lengths as one (B, T_max) tensor, padded on the right."""
    out = torch.full((len(rows), max(map(len, rows))), value, dtype=torch.long)
    for b, r in enumerate(rows):
        out[b, :len(r)] = torch.tensor(r, dtype=torch.long)
    return out.to(device)


def encode_prompt(tokenizer, text: str) -> list[int]:
    """Text to prompt ids, with the BOS a model was trained with when the tokenizer has one."""
    return tokenizer.encode(text, add_bos=getattr(tokenizer, "bos_id", None) is not None)
