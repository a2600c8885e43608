"""Finding the request at fault when an engine step raises, so that it alone fails.

A decode step changes a little state besides the tokens it returns: the cache lengths (the
rows' contents past them are rewritten by the next step anyway), the decoding strategy's
own caches and tables (speculation: its MTP cache and each request's pending draft) and
every request's random generator. `StepState` captures that before a step and puts it back
after a failed or trial one, so that a step run again gives exactly the tokens it would have
given. `first_failing_prefix` bisects on batch prefixes (the rows of a prefix are one view of
the caches, so any prefix decodes on its own) for the first row whose inclusion fails.

Notable: a strategy's state is found by type (its `LatentCache`s and its dicts), so any
strategy built like `PlainDecoding` or `MTPSpeculation` is covered without a hook.
Not here: recovery from a broken device (after a CUDA device-side assert nothing recovers:
the server's engine thread then fails every request, and /health says so).
"""
from __future__ import annotations

from typing import Callable

from dsmoe.infer.cache import LatentCache


class StepState:
    """What a decode step may change, captured (`StepState(cache, decoder, requests)`) to be
    put back with `restore()`."""

    def __init__(self, cache: LatentCache, decoder, requests):
        self.cache, self.decoder = cache, decoder
        self.lengths = cache.lengths.clone()
        self.decoder_state = {name: value.lengths.clone() if isinstance(value, LatentCache) else dict(value)
                              for name, value in vars(decoder).items() if isinstance(value, (LatentCache, dict))}
        self.generators = [(r.generator, r.generator.get_state()) for r in requests]

    def restore(self) -> None:
        self.cache.lengths.copy_(self.lengths)
        for name, saved in self.decoder_state.items():
            value = getattr(self.decoder, name)
            if isinstance(value, LatentCache):
                value.lengths.copy_(saved)
            else:
                value.clear()
                value.update(saved)
        for generator, state in self.generators:
            generator.set_state(state)


def first_failing_prefix(n: int, attempt: Callable[[int], object], restore: Callable[[], None],
                         cause: BaseException) -> tuple[int, BaseException]:
    """Given that `attempt(n)` (a step over the first n rows) raised `cause`: the row whose
    inclusion makes it fail (prefix `row` passes, prefix `row + 1` does not), and the error it
    raised. The state is restored after every trial."""
    good, bad = 0, n  # prefix `good` passes, prefix `bad` fails
    while bad - good > 1:
        mid = (good + bad) // 2
        try:
            attempt(mid)
            good = mid
        except Exception as err:
            bad, cause = mid, err
        restore()
    return bad - 1, cause
