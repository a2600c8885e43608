"""A whole decode step in one native call (`dsmoe/kernels/step_decode.c`): the new tokens'
embeddings, every block, the final norm and the output head.

What: `step(model, tokens, cache)` returns what `Transformer.hidden` then
`Transformer.logits` return at every new position, (h, logits), or None when a part is not
one the kernel takes (the caller then runs the seams; the blocks may still take
`native_block`'s stack call). Used by `Transformer.step`: a decode step, a verify pass.
Why: with the blocks in one call, the Python around them (embedding lookup, rope rows,
final norm, head, their checks) was still ~0.5 ms of a ~4 ms `small` token on a CPU.
Takes an fp32 or int8 embedding and head (`quant.py`), an fp32 final norm; the blocks as
`native_block` takes them. The top-level modules and rope tables are watched like the
blocks (`native_block.Watch`: identity and address, each call).
Not here: the MoE routing (a decode step does not return it; `Transformer.hidden` does).
"""
from __future__ import annotations

import torch

from dsmoe import kernels
from dsmoe.model import native_block


def _supported(model) -> bool:
    embed, head, norm = model.embed, model.head, model.norm.weight
    table = getattr(embed, "weight_q", None)
    table = embed.weight if table is None else table
    return (kernels.takes_linears(head) and table.dtype in (torch.float32, torch.int8) and table.is_contiguous()
            and norm.dtype == torch.float32 and model.rope_cos.dtype == torch.float32
            and model.rope_cos.is_contiguous() and model.rope_sin.is_contiguous())


class StepPlan(native_block.Watch):
    """The top-level modules' descriptions and what they point into."""
    __slots__ = ("embed", "head")

    def __init__(self, model):
        super().__init__([model.embed, model.norm, model.head],
                         extra=[(model._buffers, n, model._buffers[n]) for n in ("rope_cos", "rope_sin")]
                         + [(model._modules, n, model._modules[n]) for n in ("embed", "norm", "head")])
        self.embed, self.head = kernels.weight_of(model.embed), kernels.weight_of(model.head)


def plan_of(model) -> StepPlan | None:
    """The model's valid top-level plan, rebuilt if needed; None when the kernel does not
    take the model or a forward hook waits on one of its top-level modules."""
    plan = model._native_step.plan
    if plan is None or not plan.valid():
        plan = model._native_step.plan = StepPlan(model) if _supported(model) else None
    return None if plan is None or plan.hooked() else plan


def step(model, tokens_BT: torch.Tensor, cache):
    """(h (B, T, D), logits (B, T, V)) of the new tokens, cache written and advanced; or None
    (nothing done) when the kernel does not take this model or call."""
    if not kernels.available() or tokens_BT.device.type != "cpu":
        return None
    plan = plan_of(model)
    if plan is None:
        return None
    B, T = tokens_BT.shape
    cache.positions(T)  # checks the room left and marks the new positions
    found = native_block.stack_table(model.layers, cache, model._native_stack)
    if found is None:
        cache.advance(0)  # forget the marked positions
        return None
    (latent, k_pe, positions), table, (top_k, n_experts) = found
    h, logits = kernels.step_decode(table, plan.embed, tokens_BT, model.rope_cos, model.rope_sin, latent, k_pe,
                                    positions, top_k, n_experts, model.norm.weight, model.norm.eps, plan.head)
    cache.advance(T)
    return h.view(B, T, -1), logits.view(B, T, -1)
