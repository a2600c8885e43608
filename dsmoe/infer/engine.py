"""The inference engine: a continuously batched scheduler over the MLA latent cache.

Requests of any length join and leave a running batch between steps (continuous
batching). Each `step()`:
1. admits waiting requests into free cache rows and prefills them (`forward.prefill`:
   chunked, naive attention); the first token is sampled from the prefill logits. Short
   prompts join together, up to `prefill_chunk` prompt tokens a step; a prompt longer than
   `prefill_chunk` is staged instead (`staging.py`): one chunk of it per step, between the
   running batch's decode steps, so running streams keep flowing; it joins the batch after
   its last chunk (`chunked_prefill=False`: whole prompts at admission, in one step);
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
- One request cannot fail the others. When a decode step raises, the engine puts back the
  state before it, retries once (a passing fault), then finds the first row whose inclusion
  fails (`isolation.py`), fails that request alone and decodes the rest: their output is what
  it would have been. A joining group whose prefill fails is prefilled again one by one; a
  request whose admission fails (the cache cannot grow, out of memory) finishes with an
  error. The cause goes to the log (`dsmoe.infer.engine`); the request's `error` is a
  generic message with its id.
- Prefix cache (optional): a joining prompt's longest cached prefix is copied into its row
  and only the rest is prefilled (`prefix_reuse.py`; the cache itself is `prefix_cache.py`).
Not here: preemption, beam search, logprobs.
"""
from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import deque
from typing import Callable, Iterator

import torch

from dsmoe.errors import DsmoeError
from dsmoe.infer.cache import LatentCache
from dsmoe.infer.decoding import PlainDecoding
from dsmoe.infer.forward import prefill
from dsmoe.infer.isolation import StepState, first_failing_prefix
from dsmoe.infer.prefix_reuse import PrefixReuse
from dsmoe.infer.requests import Event, Request, check_prompt, sampling_batch
from dsmoe.infer.sampling import SamplingBatch, SamplingParams, next_tokens
from dsmoe.infer.speculative import MTPSpeculation
from dsmoe.infer.stats import EngineStats
from dsmoe.infer.staging import StagedPrompt
from dsmoe.model.hugepages import pack_weights

log = logging.getLogger("dsmoe.infer.engine")

DEFAULT_MAX_LEN = 8192  # cache positions per request unless asked otherwise (V3's context is 160K)


class Engine:
    def __init__(self, model, tokenizer=None, *, max_batch: int = 16, max_len: int | None = None,
                 prefill_chunk: int = 512, decoder=None, speculative: bool | int | str = False, compile: bool = False,
                 chunked_prefill: bool = True, prefix_cache=None):
        """`decoder`: a decoding strategy (`PlainDecoding(compile)` unless given);
        `speculative=True` is `decoder=MTPSpeculation()`, and a depth (drafts per step, or
        "auto") `decoder=MTPSpeculation(depth)`. `chunked_prefill`: prompts longer than
        `prefill_chunk` (less their cached prefix) are prefilled a chunk per step between decode
        steps (False: at once). `prefix_cache`: a `prefix_cache.PrefixCache` to reuse prompt
        prefixes from (not used when speculating)."""
        args = model.args
        if max_batch < 1 or prefill_chunk < 1:
            raise DsmoeError("max_batch and prefill_chunk must be positive")
        if decoder is None:
            decoder = (MTPSpeculation(1 if speculative is True else speculative) if speculative
                       else PlainDecoding(compile=compile))
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.args = args
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        if self.device.type == "cpu":  # the weights a decode step streams, in 2 MB pages
            pack_weights(model)
        self.max_len = min(max_len or min(args.max_seq_len, DEFAULT_MAX_LEN), args.max_seq_len)
        self.max_batch = max_batch
        self.prefill_chunk = prefill_chunk
        self.decoder = decoder
        decoder.attach(model, self.max_len, max_batch)
        self.cache = LatentCache(args, 0, self.max_len, n_layers=args.n_layers, device=self.device,
                                 dtype=self.dtype, max_rows=max_batch)
        self.prefixes = PrefixReuse.attach(prefix_cache, self.cache, self.decoder.speculative)
        self.prefix_cache = self.prefixes.cache if self.prefixes is not None else None
        self.running: list[Request] = []  # running[i] owns cache row i
        self.waiting: deque[Request] = deque()
        self.stats = EngineStats()
        self._lock = threading.Lock()
        self._aborted: set[str] = set()
        self._ids = itertools.count()
        self._sampling: SamplingBatch | None = None  # rebuilt when the batch changes
        self.chunked_prefill = chunked_prefill
        self.staged: StagedPrompt | None = None  # the long prompt being prefilled a chunk per step

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
            return bool(self.running or self.waiting or self._aborted or self.staged)

    def load(self) -> int:
        """Requests waiting, prefilling or running."""
        with self._lock:
            return len(self.running) + len(self.waiting) + (self.staged is not None)

    @torch.no_grad()
    def step(self) -> list[Event]:
        """Admit, prefill, decode one step for every request; returns (and dispatches) the events."""
        events: list[Event] = []
        self._apply_aborts(events)
        self._admit(events)
        self._prefill_staged(events)
        self._release_finished()  # aborted, or done at their first token
        if self.running:
            start = time.perf_counter()
            decoded = self._decode_isolated(events)
            for r, tokens in zip(list(self.running), decoded.tokens if decoded else []):
                self._append(r, tokens, events)
                self.stats.decode_tokens += len(events[-1].token_ids)
            if decoded:
                self.stats.drafted += decoded.drafted
                self.stats.accepted += decoded.accepted
            self.stats.decode_seconds += time.perf_counter() - start
            self.stats.decode_steps += 1
            self._release_finished()
        for ev in events:
            if ev.request.on_event is not None:
                try:
                    ev.request.on_event(ev)
                except Exception:  # the caller's callback: its request alone pays
                    log.exception("the event callback of request %s failed", ev.request.id)
                    if not ev.request.finished:
                        self.abort(ev.request.id)
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
        if self.staged is not None:
            pending.append(self.staged.request)
            self.staged = None
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
        if self.staged is not None and self.staged.request.id in aborted:
            events.append(self.staged.request.finish("abort"))
            self.staged = None

    def _admit(self, events: list[Event]) -> None:
        joining, long = self._take_waiting()
        if long is not None:
            self._start_staging(long, events)
        if not joining:
            return
        # Longest first: the requests still prefilling in any chunk are then a prefix of the rows.
        joining.sort(key=lambda r: -len(r.prompt_ids))
        states = [r.generator.get_state() for r in joining]
        try:
            self._join(joining, events)
        except Exception as err:  # prefill them one by one: only those that fail alone fail
            if len(joining) == 1:
                self._fail(joining[0], err, events)
                return
            log.warning("prefilling %d requests together failed (%s); trying each alone", len(joining), err)
            for r, state in zip(joining, states):
                r.generator.set_state(state)
                try:
                    self._join([r], events)
                except Exception as err:
                    self._fail(r, err, events)

    def _take_waiting(self) -> tuple[list[Request], Request | None]:
        """The waiting requests that join now (in order, within the step's prefill budget) and
        the long prompt to stage, if the staging row is free."""
        joining, long, kept, budget = [], None, [], 0
        with self._lock:
            free = self.max_batch - len(self.running) - (self.staged is not None)
            while self.waiting and free > 0:
                r = self.waiting.popleft()
                n = self.prefixes.uncached_length(r) if self.prefixes else len(r.prompt_ids)
                if self.chunked_prefill and n > self.prefill_chunk:
                    if long is None and self.staged is None:
                        long, free = r, free - 1
                    else:
                        kept.append(r)
                elif not self.chunked_prefill or not joining or budget + n <= self.prefill_chunk:
                    joining.append(r)
                    budget, free = budget + n, free - 1
                else:
                    kept.append(r)
                    break  # short prompts keep their order
            self.waiting.extendleft(reversed(kept))
        if self.prefixes:
            self.prefixes.forget(kept + ([long] if long is not None else []))
        return joining, long

    def _join(self, joining: list[Request], events: list[Event]) -> None:
        """Acquire rows for `joining`, prefill them, sample their first tokens; on any error,
        leave the engine as it was and raise."""
        start = time.perf_counter()
        reused = self.prefixes.match(joining) if self.prefixes else {r.id: [] for r in joining}
        block = self.prefixes.block if self.prefixes else 0
        # Longest first: the requests still prefilling in any chunk are then a prefix of the rows.
        joining.sort(key=lambda r: -(len(r.prompt_ids) - len(reused[r.id]) * block))
        rows = self.cache.acquire(len(joining))
        try:
            self.decoder.acquire(len(joining))
        except Exception:
            for row in reversed(rows):
                self.cache.release(row)
            raise
        self.running.extend(joining)  # from here on, rows and requests match (fail_all frees both)
        self._sampling = None
        try:
            if self.prefixes:
                self.prefixes.fill(joining, rows, reused)
            logits_BV, hidden = prefill(self.model, [r.prompt_ids[r.cached_tokens:] for r in joining],
                                        self.cache, rows, self.prefill_chunk,
                                        keep_hidden=self.decoder.keeps_hidden)
            first = next_tokens(logits_BV, sampling_batch(joining, self.device))
            first_list = first.tolist()
            self.decoder.prefilled(self.model, joining, rows, hidden, first, self.prefill_chunk)
        except Exception:
            self._drop_last(len(joining))
            raise
        if self.prefixes:
            self.prefixes.store(joining, rows)
        self.stats.prefill_tokens += sum(len(r.prompt_ids) - r.cached_tokens for r in joining)
        self.stats.prefill_seconds += time.perf_counter() - start
        now = time.perf_counter()
        for r, tok in zip(joining, first_list):
            r.first_token_at = now
            self._append(r, [tok], events)

    def _drop_last(self, n: int) -> None:
        """Undo the joining of the last n running requests (their rows were the last ones)."""
        for i in reversed(range(len(self.running) - n, len(self.running))):
            self.decoder.release(i, self.running[i])
            self.cache.release(i)
            self.running.pop()
        self._sampling = None

    def _release_finished(self) -> None:
        finished = [i for i, r in enumerate(self.running) if r.finished]
        for i in reversed(finished):
            if self.prefixes:
                self.prefixes.store([self.running[i]], range(i, i + 1), with_output=True)
            self.decoder.release(i, self.running[i])
            moved = self.cache.release(i)
            if moved is not None:
                self.running[i] = self.running[moved]
            self.running.pop()
        if finished:
            self._sampling = None

    # ------------------------------------------------------- chunked prefill of a long prompt
    def _start_staging(self, r: Request, events: list[Event]) -> None:
        try:
            self.staged = StagedPrompt(r, self.model, self.max_len, self.decoder.keeps_hidden)
        except Exception as err:  # the cache cannot grow: this request alone fails
            self._fail(r, err, events)

    def _prefill_staged(self, events: list[Event]) -> None:
        """One chunk of the staged prompt; after the last, the request joins the batch."""
        st = self.staged
        if st is None:
            return
        try:
            begin, before = time.perf_counter(), st.done
            last_1D = st.advance(self.prefill_chunk)
            self.stats.prefill_tokens += st.done - before
            self.stats.prefill_seconds += time.perf_counter() - begin
            if last_1D is not None:
                self._join_staged(st, last_1D, events)
        except Exception as err:
            self.staged = None
            self._fail(st.request, err, events)

    def _join_staged(self, st: StagedPrompt, last_1D: torch.Tensor, events: list[Event]) -> None:
        r = st.request
        first = next_tokens(self.model.logits(last_1D), sampling_batch([r], self.device))
        rows = self.cache.acquire(1)
        try:
            self.decoder.acquire(1)
        except Exception:
            self.cache.release(rows.start)
            raise
        st.move_into(self.cache, rows.start)
        self.running.append(r)
        self._sampling = None
        try:
            self.decoder.prefilled(self.model, [r], rows, st.hidden(), first, self.prefill_chunk)
        except Exception:
            self._drop_last(1)
            raise
        self.staged = None
        if self.prefixes:
            self.prefixes.store([r], rows)
        r.first_token_at = time.perf_counter()
        self._append(r, first.tolist(), events)

    # ------------------------------------------------------------------ isolation
    def _append(self, r: Request, tokens: list[int], events: list[Event]) -> None:
        """r.append, one event; a failure there (detokenising, say) fails r alone."""
        try:
            events.append(r.append(tokens))
        except Exception as err:
            self._fail(r, err, events)

    def _fail(self, r: Request, err: BaseException, events: list[Event]) -> None:
        """Finish r with a generic error; the cause goes to the log, not to the client."""
        log.error("request %s failed: %s: %s", r.id, type(err).__name__, err, exc_info=err)
        if isinstance(err, torch.OutOfMemoryError):
            message = f"request {r.id} did not fit in the server's memory: retry later, or shorten it"
        else:
            message = f"the server failed while running request {r.id}; the cause is in the server log"
        events.append(r.finish("error", message))

    def _decode_rows(self, n: int):
        """Decode the first n running requests (a prefix of the rows)."""
        running = self.running[:n]
        sampling = self.sampling_batch() if n == len(self.running) else sampling_batch(running, self.device)
        return self.decoder.decode(self.model, running, self.cache.rows(0, n), sampling)

    def _decode_isolated(self, events: list[Event]):
        """A decode step over every running request; when it raises, fail only the requests
        at fault (see the module note) and return the others' step (None if none is left)."""
        state = StepState(self.cache, self.decoder, self.running)
        try:
            return self._decode_rows(len(self.running))
        except Exception as err:
            log.warning("a decode step over %d requests failed (%s: %s); isolating", len(self.running),
                        type(err).__name__, err)
        while self.running:
            state.restore()
            try:
                return self._decode_rows(len(self.running))  # a passing fault, or the culprit is gone
            except Exception as err:
                state.restore()
                row, cause = first_failing_prefix(len(self.running), self._decode_rows, state.restore, err)
            self._fail(self.running[row], cause, events)
            self._release_finished()
            state = StepState(self.cache, self.decoder, self.running)
        return None
