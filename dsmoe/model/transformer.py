"""The DeepSeek-V3 Transformer: embedding, blocks, final norm, output head, MTP modules.

`Transformer(args)(tokens)` returns logits (B, T, vocab). `run()` returns everything a
caller may need in one `ModelOutput`: the logits, the final hidden state, the MTP logits
when asked (training), and the routing of every MoE layer (balancing, analysis).
`run` is composed of seams the inference engine calls directly, so there is one forward
pass: `hidden` (the main stack, no input check, no head), `logits` (final norm and head),
`mtp_hidden` and `mtp_logits` (one MTP depth, optionally over its own cache).

Notable:
- Attention implementation is chosen in one place (`resolve_attn_impl`): `auto` attends
  naively for training and prefill and in latent space (absorbed) for short decode steps.
  The routed experts' likewise (`resolve_expert_impl` in `moe.py`): `auto` runs the
  few-token `ragged` path at inference, the grouped one for training batches.
- Inputs are checked before any computation: integer ids inside the vocabulary, and no
  position past `max_seq_len`.
- Single-device code: nothing here reads a rank or a world size; `dsmoe/parallel/` shards a
  built model from outside.
Not here: a loss. Training objectives live in `dsmoe/train/`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from dsmoe import kernels
from dsmoe.config import ModelArgs
from dsmoe.errors import DsmoeError
from dsmoe.model import native_block, native_mtp, native_step
from dsmoe.model.block import Block
from dsmoe.model.fastpath import Derived, fast_rows, linear_few_rows, plain_linears
from dsmoe.model.layers import RMSNorm
from dsmoe.model.mla import ATTN_IMPLS
from dsmoe.model.moe import MoE, RoutedExperts, RoutingInfo, resolve_expert_impl
from dsmoe.model.mtp import MTPModule
from dsmoe.model.quant import int8_linear
from dsmoe.model.rope import rope_tables

#: (depth, normalised states (B, T, D), the output head) -> what `run` keeps in head_losses.
HeadLoss = Callable[[int, torch.Tensor, nn.Linear], torch.Tensor]

# Absorbed attention pays C-wide dot products per key for every query; for more than a
# handful of new tokens, expanding K/V once (naive) is cheaper.
ABSORB_MAX_NEW_TOKENS = 8


@dataclass
class ModelOutput:
    logits: torch.Tensor | None  # (B, T, V); None when a `head_loss` replaced the head
    hidden: torch.Tensor  # (B, T, D): last block's output, before the final norm
    mtp_logits: list[torch.Tensor] = field(default_factory=list)  # depth k: (B, T-k, V)
    routing: list[RoutingInfo] = field(default_factory=list)  # one per MoE layer of the main stack
    mtp_routing: list[RoutingInfo] = field(default_factory=list)  # one per MTP module
    head_losses: list[torch.Tensor] = field(default_factory=list)  # `head_loss`'s: main, then depth k


def resolve_attn_impl(impl: str, n_new: int, has_cache: bool) -> str:
    if impl == "auto":
        return "absorb" if has_cache and n_new <= ABSORB_MAX_NEW_TOKENS else "naive"
    if impl not in ATTN_IMPLS:
        raise DsmoeError(f"attn_impl={impl!r}: choose 'auto' or one of {ATTN_IMPLS}")
    return impl


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.embed = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(Block(i, args) for i in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.head = nn.Linear(args.dim, args.vocab_size, bias=False)
        self.mtp = nn.ModuleList(MTPModule(args, args.n_layers + i) for i in range(args.n_mtp_layers))
        cos, sin = rope_tables(args)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self._derived = Derived()  # the head's transposed copy for few-row decoding (fastpath.py)
        self._native_stack = native_block.PlanSlot()  # the blocks' kernel descriptions, as one table
        self._native_step = native_block.PlanSlot()  # the embedding's and head's (native_step.py)
        self.init_weights()

    # ------------------------------------------------------------------ set-up
    @torch.no_grad()
    def init_weights(self) -> None:
        std = self.args.init_std
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, 0.0, std)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)
            elif isinstance(module, RoutedExperts):
                for w in (module.w1_EFD, module.w3_EFD, module.w2_EDF):
                    nn.init.normal_(w, 0.0, std)
            elif isinstance(module, MoE):
                nn.init.normal_(module.gate.weight, 0.0, std)
                module.gate.bias.zero_()
        if self.rope_cos.device.type != "meta":  # buffers are not parameters: rebuild them
            cos, sin = rope_tables(self.args)
            self.rope_cos.copy_(cos)
            self.rope_sin.copy_(sin)

    def set_expert_impl(self, impl: str) -> None:
        """'auto' (default: see `resolve_expert_impl`), 'grouped' (training batches),
        'ragged' (few tokens at inference) or 'loop' (the per-expert reference)."""
        resolve_expert_impl(impl, 0, False)  # rejects an unknown name
        for module in self.modules():
            if isinstance(module, RoutedExperts):
                module.impl = impl

    def moe_layers(self) -> list[MoE]:
        """Every MoE layer, main stack first, then the MTP modules' (the order of routing)."""
        blocks = list(self.layers) + [m.block for m in self.mtp]
        return [b.ffn for b in blocks if b.is_moe]

    # ----------------------------------------------------------------- forward
    def forward(self, tokens: torch.Tensor, cache=None, attn_impl: str = "auto") -> torch.Tensor:
        return self.run(tokens, cache, attn_impl=attn_impl).logits

    def run(self, tokens: torch.Tensor, cache=None, *, attn_impl: str = "auto",
            mtp: bool = False, mtp_rows: int | None = None,
            head_loss: HeadLoss | None = None) -> ModelOutput:
        """tokens (B, T) int. With `mtp`, depth k predicts t_{i+k+1} at positions i < T-k,
        on the first `mtp_rows` rows (None: all of them).
        `head_loss(depth, x_BTD, head)`, when given, replaces the output head: it gets the
        normalised states the head would read (depth 0: the main model's) and the head
        module, and what it returns goes to `head_losses`; no logits are made (training
        fuses the head with its loss, `dsmoe/train/head_loss.py`, while the head's weight is
        at hand: a sharded model gathers it only around this call)."""
        self.check_input(tokens, cache)
        h, routing = self.hidden(tokens, cache, attn_impl=attn_impl)
        out = ModelOutput(logits=None, hidden=h, routing=routing)
        if head_loss is None:
            out.logits = self.logits(h)
        else:
            out.head_losses.append(head_loss(0, self.norm(h), self.head))
        if mtp:
            self._run_mtp(tokens[:mtp_rows], out, attn_impl, head_loss)
        return out

    def hidden(self, tokens_BT: torch.Tensor, cache=None, *, attn_impl: str = "auto",
               outputs_at_B: torch.Tensor | None = None) -> tuple[torch.Tensor, list[RoutingInfo]]:
        """The main stack over new tokens (written to `cache`, then advanced): the last block's
        output before the final norm (B, T, D), and the routing of every MoE layer.
        No input check and no output head: `run` adds both; the inference engine, which made
        its tokens itself, applies `logits` only where it needs them.
        `outputs_at_B` (one new position per row, long (B,)): only those positions' outputs
        are wanted (a prefill's first token needs the last prompt position's alone), so the
        last block attends and runs its feed-forward for them alone (as llama.cpp's last
        layer does) and (B, 1, D) is returned; every position still goes into the cache, and
        the last MoE layer's routing covers those positions only."""
        T = tokens_BT.shape[1]
        impl = resolve_attn_impl(attn_impl, T, cache is not None)
        cos, sin, mask = self.rope_and_mask(T, cache)
        h = self.embed(tokens_BT)
        if impl == "absorb" and cache is not None and fast_rows(h, h.shape[0] * T) and outputs_at_B is None:
            done = native_block.stack_forward(self.layers, h, cos, sin, cache, self._native_stack)
            if done is not None:  # the whole stack in one native call (dsmoe/model/native_block.py)
                cache.advance(T)
                return done
        routing = []
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            h, info = layer(h, cos, sin, cache.layer(i) if cache is not None else None, mask, impl,
                            outputs_at_B if i == last else None)
            if info is not None:
                routing.append(info)
        if cache is not None:
            cache.advance(T)
        return h, routing

    def step(self, tokens_BT: torch.Tensor, cache) -> tuple[torch.Tensor, torch.Tensor]:
        """`hidden` then `logits` at every new position, (h (B, T, D), logits (B, T, V)), in
        one native call for a few new tokens on a CPU (`native_step.py`) when it can be."""
        if cache is not None and fast_rows(tokens_BT, tokens_BT.numel()):
            done = native_step.step(self, tokens_BT, cache)
            if done is not None:
                return done
        h_BTD, _ = self.hidden(tokens_BT, cache, attn_impl="absorb")
        return h_BTD, self.logits(h_BTD)

    def logits(self, h_BTD: torch.Tensor) -> torch.Tensor:
        """Final norm and output head over hidden states from `hidden`."""
        return self._head(self.norm(h_BTD))

    def mtp_hidden(self, depth: int, h_prev_BTD: torch.Tensor, next_tokens_BT: torch.Tensor, cache=None, *,
                   attn_impl: str = "auto", module: MTPModule | None = None) -> tuple[torch.Tensor, RoutingInfo | None]:
        """MTP module `depth` (1-based) over T positions: position i combines h_prev at i with
        the embedding of t_{i+depth} (`next_tokens_BT`). Returns its hidden state (B, T, D),
        before its `norm`, and its routing. `cache`, when given, holds this module's block
        alone (its layer 0) and is advanced: at inference it lags the main cache by `depth`
        positions, so it keeps lengths of its own. `module`: a stand-in for the module (a
        cheaper copy that drafts run, `speculative.Drafter`)."""
        T = next_tokens_BT.shape[1]
        impl = resolve_attn_impl(attn_impl, T, cache is not None)
        cos, sin, mask = self.rope_and_mask(T, cache)
        module = module if module is not None else self.mtp[depth - 1]
        h, info = module(h_prev_BTD, self.embed(next_tokens_BT), cos, sin,
                         cache.layer(0) if cache is not None else None, mask, impl)
        if cache is not None:
            cache.advance(T)
        return h, info

    def mtp_step(self, depth: int, h_prev_BTD: torch.Tensor, next_tokens_BT: torch.Tensor, cache,
                 head: tuple[torch.Tensor, torch.Tensor] | None = None, head_rows: torch.Tensor | None = None,
                 module: MTPModule | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """`mtp_hidden` over a few new positions at inference, then the module's norm and an
        output head at the flattened rows `head_rows` (all when None): (h (B, T, D), logits
        (rows, V)). `head`: an int8 copy of the output head, (weight, row scales), and
        `module`: a stand-in for the module, that drafts read instead of the model's
        (`speculative.Drafter`). One native call on a CPU (`native_mtp.py`) when it can be."""
        module = module if module is not None else self.mtp[depth - 1]
        if fast_rows(next_tokens_BT, next_tokens_BT.numel()):
            weight = kernels.weight_from(*head) if head is not None else (
                kernels.weight_of(self.head) if kernels.takes_linears(self.head) else None)
            done = native_mtp.step(self, module, h_prev_BTD, next_tokens_BT, cache, weight, head_rows) \
                if weight is not None else None
            if done is not None:
                return done
        h_BTD, _ = self.mtp_hidden(depth, h_prev_BTD, next_tokens_BT, cache, attn_impl="absorb", module=module)
        h_MD = h_BTD.reshape(-1, h_BTD.shape[-1])
        return h_BTD, self.mtp_head(depth, h_MD if head_rows is None else h_MD[head_rows], head, module)

    def mtp_head(self, depth: int, h: torch.Tensor, head: tuple[torch.Tensor, torch.Tensor] | None = None,
                 module: MTPModule | None = None) -> torch.Tensor:
        """MTP module `depth`'s norm (or `module`'s), then the shared output head, or `head`
        (an int8 copy of it: (weight, row scales))."""
        x = (module if module is not None else self.mtp[depth - 1]).norm(h)
        return int8_linear(x, *head) if head is not None else self._head(x)

    def mtp_logits(self, depth: int, h_BTD: torch.Tensor) -> torch.Tensor:
        """MTP module `depth`'s norm, then the shared output head."""
        return self.mtp_head(depth, h_BTD)

    def _head(self, x: torch.Tensor) -> torch.Tensor:
        """The output head; for one or two rows on a CPU through its transposed copy
        (3-5x faster there, `fastpath.py`)."""
        if fast_rows(x, x.numel() // x.shape[-1]) and plain_linears(self.head):
            return linear_few_rows(x, (self.head.weight,), self._derived, "head")
        return self.head(x)

    def _run_mtp(self, tokens, out: ModelOutput, attn_impl: str, head_loss: HeadLoss | None) -> None:
        """Training-time MTP over full sequences (no cache), the rows of `tokens` (the first
        rows of the batch): depth k sees positions < T-k."""
        h_prev = out.hidden[:tokens.shape[0]]
        T = tokens.shape[1]
        for k in range(1, len(self.mtp) + 1):
            n = T - k
            if n <= 0:
                break
            h_prev, info = self.mtp_hidden(k, h_prev[:, :n], tokens[:, k:], attn_impl=attn_impl)
            if head_loss is None:
                out.mtp_logits.append(self.mtp_logits(k, h_prev))
            else:
                out.head_losses.append(head_loss(k, self.mtp[k - 1].norm(h_prev), self.head))
            if info is not None:
                out.mtp_routing.append(info)

    def rope_and_mask(self, T: int, cache):
        """cos/sin (1 or B, T, R/2) for the new tokens, and the attention mask."""
        if cache is None:
            return self.rope_cos[None, :T], self.rope_sin[None, :T], None
        positions_BT = cache.positions(T)
        return self.rope_cos[positions_BT], self.rope_sin[positions_BT], cache.attention_mask(T)

    def check_input(self, tokens: torch.Tensor, cache=None) -> None:
        if tokens.dim() != 2 or tokens.dtype not in (torch.int64, torch.int32):
            raise DsmoeError(f"tokens must be an integer tensor of shape (batch, seq), "
                             f"got {tuple(tokens.shape)} {tokens.dtype}")
        if tokens.numel() == 0:
            raise DsmoeError("tokens is empty: give at least one token per sequence")
        lo, hi = int(tokens.min()), int(tokens.max())
        if lo < 0 or hi >= self.args.vocab_size:
            bad = lo if lo < 0 else hi
            raise DsmoeError(f"token id {bad} is outside the vocabulary [0, {self.args.vocab_size}); "
                             f"the tokenizer does not match this model")
        end = tokens.shape[1] + (cache.max_length() if cache is not None else 0)
        if end > self.args.max_seq_len:
            raise DsmoeError(f"sequence of {end} positions exceeds max_seq_len={self.args.max_seq_len}; "
                             f"shorten the input or extend the context (YaRN rope_factor)")
