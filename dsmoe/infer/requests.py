"""Requests and their events: what a caller asked for, what it got so far, and the text.

A `Request` is made by `Engine.add_request`, owns everything that is per request (its
random generator, its incremental detokenizer, its stop tokens) and turns new tokens into
an `Event` with `append`: stop tokens, `max_tokens` and stop strings end it there; the
text grows by what is safe to show.

Notable:
- Incremental detokenisation: text is emitted only once it is stable (no half UTF-8
  character), decoding a short window of tokens instead of the whole output each time.
- Stop strings never leak: text that could still become a stop string is held back until
  it cannot, and the text ends right before a stop string found across token boundaries.
- A stop token ends the output but is not text.
Not here: scheduling (`engine.py`), sampling (`sampling.py`).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from dsmoe.errors import DsmoeError
from dsmoe.infer.sampling import SamplingBatch, SamplingParams


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
    cached_tokens: int = 0  # prompt tokens taken from the prefix cache instead of prefilled
    finished_at: float | None = None
    generator: torch.Generator | None = None  # this request's random draws (seeded by params.seed)
    detokenizer: "Detokenizer | None" = None  # None: token ids only, no text
    stop_ids: frozenset[int] = frozenset()  # params.stop_token_ids and, unless ignore_eos, EOS

    @classmethod
    def create(cls, request_id: str, prompt_ids: list[int], params: SamplingParams, tokenizer, device,
               on_event: Callable[["Event"], None] | None = None) -> "Request":
        eos = getattr(tokenizer, "eos_id", None)
        eos_ids = {eos} if eos is not None and not params.ignore_eos else set()
        return cls(id=request_id, prompt_ids=prompt_ids, params=params, on_event=on_event,
                   generator=params.generator(device),
                   detokenizer=Detokenizer(tokenizer) if tokenizer is not None else None,
                   stop_ids=frozenset(params.stop_token_ids) | eos_ids)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def append(self, tokens: list[int]) -> "Event":
        """Add new tokens, stopping at a stop token, max_tokens or a stop string."""
        p = self.params
        added, reason = [], None
        for t in tokens:
            added.append(t)
            if t in self.stop_ids:
                reason = "stop"
            elif len(self.output_ids) + len(added) >= p.max_tokens:
                reason = "length"
            if reason:
                break
        self.output_ids.extend(added)
        delta = ""
        if self.detokenizer is not None:
            # a stop token is not text; at the end, half a character is shown as U+FFFD
            self.detokenizer.add(added[:-1] if reason == "stop" else added, final=reason is not None)
            full = self.detokenizer.text
            if p.stop:
                cut = find_stop(full, p.stop, max(0, len(self.text) - max(map(len, p.stop))))
                if cut is not None:
                    full, reason = full[:cut], "stop"
            end = len(full) if reason else len(full) - held_back(full, p.stop)
            delta = full[len(self.text):end]
            self.text += delta
        if reason:
            self.finish_reason, self.finished_at = reason, time.perf_counter()
        return Event(self, added, delta, reason is not None)

    def finish(self, reason: str, error: str | None = None) -> "Event":
        """End the request without new tokens ("abort" or "error")."""
        self.finish_reason, self.finished_at = reason, time.perf_counter()
        if error is not None:
            self.error = error
        return Event(self, [], "", True)


@dataclass
class Event:
    """What one step produced for one request."""
    request: Request
    token_ids: list[int]
    text: str  # new text (may be empty while a possible stop string is held back)
    finished: bool


def sampling_batch(requests: list[Request], device) -> SamplingBatch:
    """The requests' sampling settings as tensors, with each request's own generator."""
    return SamplingBatch.build([r.params for r in requests], [r.generator for r in requests], device)


def check_prompt(prompt_ids: list[int], max_tokens: int, vocab_size: int, max_len: int) -> None:
    """A prompt the engine can run: non-empty, ids in the vocabulary, room for max_tokens."""
    if not prompt_ids:
        raise DsmoeError("the prompt is empty: give at least one token")
    if not all(isinstance(t, int) and 0 <= t < vocab_size for t in prompt_ids):
        raise DsmoeError(f"prompt token ids must be integers in [0, {vocab_size})")
    if len(prompt_ids) + max_tokens > max_len:
        raise DsmoeError(f"this model's context is {max_len} tokens; the prompt has "
                         f"{len(prompt_ids)} and max_tokens is {max_tokens}: shorten the prompt "
                         f"or lower max_tokens")


def tokenize_prompt(tokenizer, text: str) -> list[int]:
    """Text to prompt ids, with the BOS a model was trained with when the tokenizer has one."""
    return tokenizer.encode(text, add_bos=getattr(tokenizer, "bos_id", None) is not None)


class Detokenizer:
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


def find_stop(text: str, stops: list[str], start: int) -> int | None:
    """Where the first stop string found at or after `start` begins, if any."""
    hits = [i for i in (text.find(s, start) for s in stops) if i >= 0]
    return min(hits) if hits else None


def held_back(text: str, stops: list[str]) -> int:
    """Length of the longest end of `text` that begins some stop string (it may yet complete)."""
    best = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:n]):
                best = n
                break
    return best
