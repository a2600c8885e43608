"""An on/off flag with a context manager that turns it off for a block of code: how a fast
path is switched off to run its reference (`fastpath.disabled()`, `kernels.disabled()`).
Not thread-local: it is meant for tests and benchmarks, not for concurrent requests."""
from __future__ import annotations

import contextlib


class Switch:
    def __init__(self):
        self.on = True

    @contextlib.contextmanager
    def off(self):
        before, self.on = self.on, False
        try:
            yield
        finally:
            self.on = before
