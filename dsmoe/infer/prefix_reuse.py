"""How the engine uses a prefix cache while admitting requests (`prefix_cache.py` is the
cache itself: keys, tiers, budgets).

A joining prompt's longest cached prefix is found once, when the scheduler decides who joins
(the look-up counts hits, and a prompt whose uncached part is short joins the batch instead of
being staged chunk by chunk); its blocks are copied into the request's cache row and only the
rest is prefilled. Full blocks are stored after the prefill and when a request ends (its output
too, so the next turn of a conversation finds them). Never after an error: a row may then be
half written. A store that fails costs later hits, never the request.
Not here: sharing blocks between requests admitted in the same step.
"""
from __future__ import annotations

import logging

from dsmoe.infer.requests import Request

log = logging.getLogger("dsmoe.infer.engine")


class PrefixReuse:
    def __init__(self, prefix_cache, cache):
        self.cache = prefix_cache
        self.rows = cache  # the engine's LatentCache
        self.block = prefix_cache.block
        self._matched: dict[str, list] = {}  # request id -> blocks found while choosing who joins
        prefix_cache.attach(cache)

    @classmethod
    def attach(cls, prefix_cache, cache, speculative: bool) -> "PrefixReuse | None":
        """None without a cache, and when speculating (the MTP block's cache would need the
        hidden state of every cached position, which the prefix cache does not keep)."""
        if prefix_cache is None or not prefix_cache.enabled or speculative:
            return None
        return cls(prefix_cache, cache)

    def uncached_length(self, r: Request) -> int:
        """Prompt tokens that prefill would compute; the match is kept for `match`."""
        self._matched[r.id] = blocks = self.cache.match(r.prompt_ids)
        return len(r.prompt_ids) - len(blocks) * self.block

    def forget(self, requests: list[Request]) -> None:
        """Drop the matches of requests that did not join now (matched again when they do)."""
        for r in requests:
            self._matched.pop(r.id, None)

    def match(self, joining: list[Request]) -> dict[str, list]:
        """Request id -> the cached blocks of its prompt's longest cached prefix."""
        return {r.id: self._matched.pop(r.id) if r.id in self._matched else self.cache.match(r.prompt_ids)
                for r in joining}

    def fill(self, joining: list[Request], rows: range, reused: dict[str, list]) -> None:
        for r, row in zip(joining, rows):
            r.cached_tokens = self.cache.fill(self.rows, row, reused[r.id])

    def store(self, reqs: list[Request], rows: range, with_output: bool = False) -> None:
        for r, row in zip(reqs, rows):
            if r.finish_reason == "error":
                continue
            try:
                self.cache.store(self.rows, row, r.prompt_ids + r.output_ids if with_output else r.prompt_ids)
            except Exception:  # noqa: BLE001 - a cache that fails costs later hits, never this request
                log.exception("prefix cache: storing %s failed", r.id)
