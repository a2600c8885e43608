"""The inference engine: a continuously batched scheduler over the MLA latent cache.

Requests of any length join and leave a running batch between steps (continuous
batching). Each `step()`:
1. admits waiting requests into free cache rows and prefills them (`forward.prefill`:
   chunked, naive attention); the first token is sampled from the prefill logits;
2. hands the running requests to its decoding strategy (`decoding.PlainDecoding`: one
   token each with absorbed attention over the latent cache; `speculative.MTPSpeculation`:
   MTP drafts verified in one pass), which returns their new tokens;
3. appends them to each request (`Request.append`: detokenisation, stop tokens, stop
   strings, max_tokens), calls each request's `on_event` with what it produced, and frees
   the rows of finished requests.

Notable:
- Scheduling only: the forward pass is the model's own (`forward.py` calls its seams), the
  per-request text handling is `requests.py`'s, and what a decode step does is the
  strategy's. `Engine(model, decoder=MTPSpeculation())` (or `speculative=True`, the same)
  drafts; the default decodes plainly, `compile=True` compiles its step.
- Cache memory follows requests: a row is acquired when a request joins and released when
  it ends, at exactly (kv_lora_rank + qk_rope_head_dim) x dtype size bytes per token per
  layer (`dsmoe/infer/cache.py`).
- Thread-safe where it must be: `add_request` and `abort` may be called from any thread
  (the server's handlers); `step` runs on one thread.
- Prefix cache (`prefix_cache.py`, optional): a joining prompt's longest cached prefix is
  copied into its row and only the rest is prefilled; full blocks are stored after the
  prefill and when the request ends. The hooks are the `_*_prefix*` methods at the end.
Not here: preemption, beam search, logprobs.
"""
from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable, Iterator

import torch

from dsmoe.errors import DsmoeError
from dsmoe.infer.cache import LatentCache
from dsmoe.infer.decoding import PlainDecoding
from dsmoe.infer.forward import prefill
from dsmoe.infer.requests import Event, Request, check_prompt, sampling_batch
from dsmoe.infer.sampling import SamplingBatch, SamplingParams, next_tokens
from dsmoe.infer.speculative import MTPSpeculation

log = logging.getLogger("dsmoe.engine")
DEFAULT_MAX_LEN = 8192  # cache positions per request unless asked otherwise (V3's context is 160K)


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


class Engine:
    def __init__(self, model, tokenizer=None, *, max_batch: int = 16, max_len: int | None = None,
                 prefill_chunk: int = 256, decoder=None, speculative: bool = False, compile: bool = False,
                 prefix_cache=None):
        """`decoder`: a decoding strategy (`PlainDecoding(compile)` unless given);
        `speculative=True` is `decoder=MTPSpeculation()`. `prefix_cache`: a
        `prefix_cache.PrefixCache` to reuse prompt prefixes from (not used when speculating)."""
        args = model.args
        if max_batch < 1 or prefill_chunk < 1:
            raise DsmoeError("max_batch and prefill_chunk must be positive")
        if decoder is None:
            decoder = MTPSpeculation() if speculative else PlainDecoding(compile=compile)
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.args = args
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.max_len = min(max_len or min(args.max_seq_len, DEFAULT_MAX_LEN), args.max_seq_len)
        self.max_batch = max_batch
        self.prefill_chunk = prefill_chunk
        self.decoder = decoder
        decoder.attach(model, self.max_len, max_batch)
        self.cache = LatentCache(args, 0, self.max_len, n_layers=args.n_layers, device=self.device,
                                 dtype=self.dtype, max_rows=max_batch)
        self.prefix_cache = self._attach_prefix_cache(prefix_cache)
        self.running: list[Request] = []  # running[i] owns cache row i
        self.waiting: deque[Request] = deque()
        self.stats = EngineStats()
        self._lock = threading.Lock()
        self._aborted: set[str] = set()
        self._ids = itertools.count()
        self._sampling: SamplingBatch | None = None  # rebuilt when the batch changes

    @property
    def speculative(self) -> bool:
        return self.decoder.speculative

    # ------------------------------------------------------------------ public API
    def add_request(self, prompt_ids: list[int], params: SamplingParams | None = None, *,
                    on_event: Callable[[Event], None] | None = None, request_id: str | None = None) -> Request:
        """Queue a request (checked before anything runs); it joins the batch at the next step."""
        params = (params or SamplingParams()).validate()
        prompt_ids = list(prompt_ids)
        check_prompt(prompt_ids, params.max_tokens, self.args.vocab_size, self.max_len)
        if params.stop and self.tokenizer is None:
            raise DsmoeError("stop strings need a tokenizer: give the engine one, or use stop_token_ids")
        req = Request.create(request_id or f"req-{next(self._ids)}", prompt_ids, params, self.tokenizer,
                             self.device, on_event)
        with self._lock:
            self.waiting.append(req)
        return req

    def abort(self, request_id: str) -> None:
        """Stop a request (waiting or running) at the next step and free its row."""
        with self._lock:
            self._aborted.add(request_id)

    def has_work(self) -> bool:
        with self._lock:
            return bool(self.running or self.waiting or self._aborted)

    @torch.no_grad()
    def step(self) -> list[Event]:
        """Admit, prefill, decode one step for every request; returns (and dispatches) the events."""
        events: list[Event] = []
        self._apply_aborts(events)
        self._admit(events)
        self._release_finished()  # aborted, or done at their first token
        if self.running:
            start = time.perf_counter()
            n = len(self.running)
            decoded = self.decoder.decode(self.model, self.running, self.cache.rows(0, n), self.sampling_batch())
            for r, tokens in zip(self.running, decoded.tokens):
                ev = r.append(tokens)
                events.append(ev)
                self.stats.decode_tokens += len(ev.token_ids)
            self.stats.drafted += decoded.drafted
            self.stats.accepted += decoded.accepted
            self.stats.decode_seconds += time.perf_counter() - start
            self.stats.decode_steps += 1
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
                events.append(r.finish("error", message))
        self._release_finished()
        for ev in events:
            if ev.request.on_event is not None:
                ev.request.on_event(ev)
        return events

    def sampling_batch(self) -> SamplingBatch:
        """The running requests' sampling settings as tensors (cached until the batch changes)."""
        if self._sampling is None:
            self._sampling = sampling_batch(self.running, self.device)
        return self._sampling

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
            events.append(r.finish("abort"))

    def _admit(self, events: list[Event]) -> None:
        with self._lock:
            free = self.max_batch - len(self.running)
            joining = [self.waiting.popleft() for _ in range(min(free, len(self.waiting)))]
        if not joining:
            return
        start = time.perf_counter()
        reused = self._match_prefixes(joining)
        # Longest first: the requests still prefilling in any chunk are then a prefix of the rows.
        joining.sort(key=lambda r: -(len(r.prompt_ids) - len(reused[r.id]) * self._block()))
        rows = self.cache.acquire(len(joining))
        self.decoder.acquire(len(joining))
        self.running.extend(joining)  # from here on, rows and requests match (fail_all frees both)
        self._sampling = None
        self._fill_prefixes(joining, rows, reused)
        logits_BV, hidden = prefill(self.model, [r.prompt_ids[r.cached_tokens:] for r in joining], self.cache,
                                    rows, self.prefill_chunk, keep_hidden=self.decoder.keeps_hidden)
        self._store_prefixes(joining, rows)
        first = next_tokens(logits_BV, sampling_batch(joining, self.device))
        first_list = first.tolist()
        self.decoder.prefilled(self.model, joining, rows, hidden, first, self.prefill_chunk)
        self.stats.prefill_tokens += sum(len(r.prompt_ids) - r.cached_tokens for r in joining)
        self.stats.prefill_seconds += time.perf_counter() - start
        now = time.perf_counter()
        for r, tok in zip(joining, first_list):
            r.first_token_at = now
            events.append(r.append([tok]))

    def _release_finished(self) -> None:
        finished = [i for i, r in enumerate(self.running) if r.finished]
        for i in reversed(finished):
            self._store_prefixes([self.running[i]], range(i, i + 1), with_output=True)
            self.decoder.release(i, self.running[i])
            moved = self.cache.release(i)
            if moved is not None:
                self.running[i] = self.running[moved]
            self.running.pop()
        if finished:
            self._sampling = None

    # ------------------------------------------------------------------ prefix cache hooks
    def _attach_prefix_cache(self, prefix_cache):
        """The prefix cache to use: none when speculating (the MTP block's cache would need the
        hidden state of every cached position, which the prefix cache does not keep)."""
        if prefix_cache is None or not prefix_cache.enabled or self.decoder.speculative:
            return None
        prefix_cache.attach(self.cache)
        return prefix_cache

    def _block(self) -> int:
        return self.prefix_cache.block if self.prefix_cache is not None else 0

    def _match_prefixes(self, joining: list[Request]) -> dict[str, list]:
        """Request id -> the cached blocks of its prompt's longest cached prefix."""
        pc = self.prefix_cache
        return {r.id: pc.match(r.prompt_ids) if pc is not None else [] for r in joining}

    def _fill_prefixes(self, joining: list[Request], rows: range, reused: dict[str, list]) -> None:
        if self.prefix_cache is not None:
            for r, row in zip(joining, rows):
                r.cached_tokens = self.prefix_cache.fill(self.cache, row, reused[r.id])

    def _store_prefixes(self, reqs: list[Request], rows: range, with_output: bool = False) -> None:
        """Keep the full blocks of the requests' prompts (and outputs) now in their rows;
        never after an error (a row may then be half written)."""
        if self.prefix_cache is None:
            return
        for r, row in zip(reqs, rows):
            if r.finish_reason == "error":
                continue
            try:
                self.prefix_cache.store(self.cache, row, r.prompt_ids + r.output_ids if with_output
                                        else r.prompt_ids)
            except Exception:  # noqa: BLE001 - a cache that fails costs later hits, never this request
                log.exception("prefix cache: storing %s failed", r.id)
