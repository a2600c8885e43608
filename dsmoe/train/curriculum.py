"""A data curriculum: how the training rows are shared between domains, step by step.

    {"curriculum": [{"from": 600, "shares": {"math": 0.85}}], ...}   (a TrainConfig field)

Before the first phase's `from` step the rows come from the run's `domains` (default: all)
in proportion to their tokens, as without a curriculum. From each phase's `from` on, a row
comes from each named domain with the probability given, and the rest is shared by the
run's other domains in proportion to their tokens (`{}` is that plain mix again; shares
summing to 1 leave the others out). Why: a small model given a few minutes learns worked
arithmetic from a few hundred thousand math tokens only when most rows of its last,
decaying steps are math, while a few hundred mixed steps first are enough for prose and
code (`docs/training.md`, section `make demo`).

A row's domain is drawn from (seed, step) alone, and its window from that domain's own
`BatchStream`, so each batch stays a pure function of (seed, step) and a resumed run sees
exactly the batches an uninterrupted one would.
Not here: mixing by anything other than rows (e.g. loss weights per domain).
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from dsmoe.data.shards import BatchStream, StepStream
from dsmoe.errors import ConfigError, DataError

_ROW_DOMAIN_STREAM = 0xC0  # keeps the domain draws apart from the windows' own draws


def check_curriculum(curriculum: Any, steps: int) -> None:
    """A ConfigError unless `curriculum` is null or a list of {"from": step, "shares":
    {domain: share}} phases, `from` increasing inside the run, shares in [0, 1] summing to <= 1."""
    if curriculum is None:
        return
    rule = ('must be null or a list of {"from": step, "shares": {"domain": share, ...}} with '
            f'increasing "from" below steps ({steps}) and shares in [0, 1] summing to at most 1')
    if not isinstance(curriculum, list) or not curriculum:
        raise ConfigError(f"TrainConfig.curriculum={curriculum!r}: {rule}")
    last = -1
    for phase in curriculum:
        shares = phase.get("shares") if isinstance(phase, dict) else None
        start = phase.get("from") if isinstance(phase, dict) else None
        ok = (isinstance(phase, dict) and set(phase) == {"from", "shares"} and isinstance(start, int)
              and not isinstance(start, bool) and last < start < steps
              and isinstance(shares, dict)
              and all(isinstance(d, str) and isinstance(s, (int, float)) and not isinstance(s, bool)
                      and 0 <= s <= 1 for d, s in shares.items())
              and sum(shares.values()) <= 1 + 1e-9)
        if not ok:
            raise ConfigError(f"TrainConfig.curriculum phase {phase!r}: {rule}")
        last = start


class CurriculumStream(StepStream):
    """The batch stream of a run with a curriculum (same interface as `BatchStream`)."""

    def __init__(self, shards, curriculum: list[dict], batch_size: int, seq_len: int, seed: int,
                 domains: list[str] | None = None):
        self.domains = list(domains) if domains is not None else list(shards.domains)
        named = {d for p in curriculum for d in p["shares"]}
        unknown = sorted(named - set(self.domains))
        if unknown:
            raise DataError(f"TrainConfig.curriculum names {unknown}, which this run does not "
                            f"train on (its domains: {self.domains}, from {shards.root})")
        self.plain = BatchStream(shards, "train", batch_size, seq_len, seed, domains)
        self.by_domain = {d: BatchStream(shards, "train", batch_size, seq_len, seed, [d])
                          for d in self.domains}
        tokens = {d: float(shards.num_tokens("train", d)) for d in self.domains}
        self.starts = [p["from"] for p in curriculum]
        self.mixes = [_mix(p["shares"], tokens) for p in curriculum]
        self.curriculum, self.seed, self.batch_size = curriculum, seed, batch_size
        self.step = 0

    def batch(self, step: int) -> torch.Tensor:
        phase = sum(start <= step for start in self.starts) - 1
        if phase < 0 or not self.curriculum[phase]["shares"]:
            return self.plain.batch(step)
        names, p = self.mixes[phase]
        rng = np.random.default_rng([self.seed, step, _ROW_DOMAIN_STREAM])
        picks = rng.choice(len(names), size=self.batch_size, p=p)
        rows, taken, batches = [], {}, {}
        for name in (names[i] for i in picks):  # a domain's k-th row: row k of its own batch
            if name not in batches:
                batches[name], taken[name] = self.by_domain[name].batch(step), 0
            rows.append(batches[name][taken[name]])
            taken[name] += 1
        return torch.stack(rows)

    def state_dict(self) -> dict:
        return {**self.plain.state_dict(), "curriculum": self.curriculum, "step": self.step}

    def load_state_dict(self, state: dict) -> None:
        """Continue from `state`; the curriculum must be the one that saved it."""
        if state.get("curriculum") != self.curriculum:
            raise DataError("cannot resume this batch stream: it was saved with another "
                            f"curriculum ({state.get('curriculum')!r}, now {self.curriculum!r})")
        self.plain.load_state_dict({k: v for k, v in state.items() if k != "curriculum"})
        self.step = int(state["step"])


def _mix(shares: dict[str, float], tokens: dict[str, float]) -> tuple[list[str], np.ndarray]:
    """(domains, row probabilities): the named shares, the rest by the others' tokens."""
    others = {d: t for d, t in tokens.items() if d not in shares}
    rest = max(0.0, 1.0 - sum(shares.values()))
    weights = dict(shares)
    if others and rest > 0:
        total = sum(others.values())
        weights.update({d: rest * t / total for d, t in others.items()})
    names = [d for d in tokens if weights.get(d, 0) > 0]
    if not names:
        raise DataError(f"TrainConfig.curriculum shares {shares} leave no domain to draw rows from")
    p = np.array([weights[d] for d in names])
    return names, p / p.sum()
