"""Sampling: from next-token logits to a distribution, and from a distribution to a token.

Pure functions over a batch in which every row (request) has its own settings:
`SamplingParams` is what a request asks for, `SamplingBatch` the same settings stacked as
tensors for one decode step. `probs` applies temperature, top-k and top-p and returns the
distribution actually sampled from; speculative decoding uses that same distribution for
its acceptance rule, so drafts are judged against exactly what plain decoding would draw.

Notable:
- Greedy (temperature 0) is the one-hot distribution at the argmax, so the acceptance rule
  reduces to "the draft equals the argmax" with no special case.
- Each request owns a `torch.Generator` seeded from its `seed`: its samples do not depend
  on which other requests share the batch, and a seed reproduces a completion exactly.
- top-k and top-p share one sort of the logits; rows that ask for neither skip it.
Not here: repetition/presence penalties, logit bias, beam search.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from dsmoe.errors import DsmoeError


# Below these, fp32 sampling breaks down (logits / temperature overflows; a top_p that rounds
# to 0 removes every token): the engine refuses them, and the HTTP API reads them as greedy.
MIN_TEMPERATURE = 1e-3
MIN_TOP_P = 1e-6
SEED_RANGE = (-(2 ** 63), 2 ** 64 - 1)  # what torch.Generator.manual_seed accepts


@dataclass
class SamplingParams:
    """What one request asks for. temperature 0 means greedy."""
    max_tokens: int = 64
    temperature: float = 0.0
    top_k: int = 0  # 0: no limit
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)  # stop strings (not included in the text)
    stop_token_ids: list[int] = field(default_factory=list)  # besides the tokenizer's EOS
    ignore_eos: bool = False

    def validate(self) -> "SamplingParams":
        def fail(name: str, rule: str) -> None:
            raise DsmoeError(f"{name}={getattr(self, name)!r}: {rule}")

        if not is_int(self.max_tokens) or self.max_tokens < 1:
            fail("max_tokens", "must be a positive integer")
        if not is_number(self.temperature) or not (self.temperature == 0 or
                                                   MIN_TEMPERATURE <= self.temperature <= 100):
            fail("temperature", f"must be 0 (greedy) or a number in [{MIN_TEMPERATURE}, 100]")
        if not is_int(self.top_k) or not 0 <= self.top_k < 2 ** 63:
            fail("top_k", "must be a non-negative integer (0 disables top-k)")
        if not is_number(self.top_p) or not MIN_TOP_P <= self.top_p <= 1:
            fail("top_p", f"must be a number in [{MIN_TOP_P}, 1] (use temperature 0 for greedy)")
        if self.seed is not None and not (is_int(self.seed) and SEED_RANGE[0] <= self.seed <= SEED_RANGE[1]):
            fail("seed", f"must be None or an integer in [{SEED_RANGE[0]}, {SEED_RANGE[1]}]")
        if not all(isinstance(s, str) and s for s in self.stop):
            fail("stop", "must be a list of non-empty strings")
        if not all(is_int(t) and t >= 0 for t in self.stop_token_ids):
            fail("stop_token_ids", "must be a list of token ids")
        return self

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def generator(self, device) -> torch.Generator:
        g = torch.Generator(device=device)
        if self.seed is None:
            g.seed()
        else:
            g.manual_seed(self.seed)
        return g


def is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def is_number(x) -> bool:
    """A finite real number (bools are not; NaN and infinities are not; nor an int too big for a float)."""
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return False
    try:
        return math.isfinite(x)
    except OverflowError:  # an int with hundreds of digits
        return False


@dataclass
class SamplingBatch:
    """Per-row settings of one decode step as tensors (B,), plus each row's generator."""
    temperature: torch.Tensor
    top_k: torch.Tensor
    top_p: torch.Tensor
    generators: list[torch.Generator]
    all_greedy: bool
    filtered: bool  # some row uses top-k or top-p

    @classmethod
    def build(cls, params: list[SamplingParams], generators: list[torch.Generator], device) -> "SamplingBatch":
        return cls(
            temperature=torch.tensor([p.temperature for p in params], dtype=torch.float32, device=device),
            top_k=torch.tensor([p.top_k for p in params], dtype=torch.long, device=device),
            top_p=torch.tensor([p.top_p for p in params], dtype=torch.float32, device=device),
            generators=list(generators),
            all_greedy=all(p.greedy for p in params),
            filtered=any(p.top_k > 0 or p.top_p < 1 for p in params if not p.greedy))


def filter_logits(logits_BV: torch.Tensor, top_k_B: torch.Tensor, top_p_B: torch.Tensor) -> torch.Tensor:
    """Set to -inf every logit outside the row's top-k and top-p nucleus (k=0, p=1: keep all)."""
    V = logits_BV.shape[-1]
    sorted_BV, order_BV = logits_BV.sort(dim=-1, descending=True)
    rank = torch.arange(V, device=logits_BV.device)
    k = torch.where(top_k_B > 0, top_k_B, V)
    remove = rank[None, :] >= k[:, None]
    sorted_BV = sorted_BV.masked_fill(remove, float("-inf"))
    p_sorted = sorted_BV.softmax(-1)
    before = p_sorted.cumsum(-1) - p_sorted  # mass of the better tokens
    # keep a token while the better ones hold less than top_p (the first is always kept)
    remove |= (before >= top_p_B[:, None]) & (top_p_B[:, None] < 1)
    remove_BV = torch.zeros_like(remove).scatter_(1, order_BV, remove)
    return logits_BV.masked_fill(remove_BV, float("-inf"))


def probs(logits_BV: torch.Tensor, s: SamplingBatch) -> torch.Tensor:
    """The distribution each row samples from, in fp32 (one-hot at the argmax for greedy rows)."""
    logits_BV = logits_BV.float()
    greedy_B = s.temperature == 0
    one_hot = torch.zeros_like(logits_BV).scatter_(1, logits_BV.argmax(-1, keepdim=True), 1.0)
    if s.all_greedy:
        return one_hot
    scaled = logits_BV / torch.where(greedy_B, 1.0, s.temperature)[:, None]
    if s.filtered:
        scaled = filter_logits(scaled, s.top_k, s.top_p)
    return torch.where(greedy_B[:, None], one_hot, scaled.softmax(-1))


def draw(probs_BV: torch.Tensor, generators: list[torch.Generator] | torch.Generator | None) -> torch.Tensor:
    """One token per row (B,). A list gives each row its own generator; a single generator
    (or None, the global one) draws for the whole batch at once."""
    if isinstance(generators, list):
        return torch.cat([torch.multinomial(p, 1, generator=g) for p, g in zip(probs_BV, generators)])
    return torch.multinomial(probs_BV, 1, generator=generators).squeeze(1)


def uniform(shape: tuple[int, ...], generators: list[torch.Generator] | torch.Generator | None,
            device=None) -> torch.Tensor:
    """U(0, 1) of `shape`; with a list of generators, row b comes from generators[b]."""
    if isinstance(generators, list):
        return torch.stack([torch.rand(shape[1:], generator=g, device=g.device) for g in generators]).to(device)
    return torch.rand(shape, generator=generators, device=device)


def next_tokens(logits_BV: torch.Tensor, s: SamplingBatch) -> torch.Tensor:
    """Sample the next token of every row (B,); greedy batches skip the random draw."""
    if s.all_greedy:
        return logits_BV.argmax(-1)
    return draw(probs(logits_BV, s), s.generators)
