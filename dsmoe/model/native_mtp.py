"""A multi-token-prediction module's decode step in one native call
(`dsmoe/kernels/mtp_decode.c`): what `Transformer.mtp_hidden` then the module's norm and an
output head compute, for a few new positions over the module's latent cache.

What: `step(model, module, h_prev, tokens, cache, head, head_rows)` returns (h, logits at
`head_rows`), or None when a part is not one the kernel takes (the caller then runs the
modules). `module` is the model's MTP module or a stand-in for it, and `head` any weight
the kernels read: the model's head, or the cheaper copies speculative decoding drafts with
(int8, `quant.py`).
Why: op by op the module (two norms, a concatenation, eh_proj, the block, the norm, the
head) cost ~1.6 ms of a `small` draft on a CPU, against ~0.5 ms in one call; chained
drafts run it once per draft.
The module's weights, the embedding and the rope tables are watched like the blocks
(`native_block.Watch`: identity and address, each call); the block keeps its own plan.
Not here: training, CUDA, hooks (the modules then run).
"""
from __future__ import annotations

import ctypes

import torch

from dsmoe import kernels
from dsmoe.model import native_block


def _supported(model, module) -> bool:
    table = getattr(model.embed, "weight_q", None)
    table = model.embed.weight if table is None else table
    norms = (module.enorm.weight, module.hnorm.weight, module.norm.weight)
    return (kernels.takes_linears(module.eh_proj) and table.dtype in (torch.float32, torch.int8)
            and table.is_contiguous() and all(w.dtype == torch.float32 for w in norms)
            and model.rope_cos.dtype == torch.float32 and model.rope_cos.is_contiguous()
            and model.rope_sin.is_contiguous())


class MTPPlan(native_block.Watch):
    """The module's descriptions (embedding, eh_proj, norms) and what they point into."""
    __slots__ = ("embed", "desc", "block")

    def __init__(self, model, module):
        super().__init__([module.enorm, module.hnorm, module.eh_proj, module.norm, model.embed],
                         extra=[(model._buffers, n, model._buffers[n]) for n in ("rope_cos", "rope_sin")]
                         + [(model._modules, "embed", model.embed)]
                         + [(module._modules, n, module._modules[n]) for n in ("enorm", "hnorm", "eh_proj", "norm")])
        self.embed = kernels.weight_of(model.embed)
        norms = (module.enorm, module.hnorm, module.norm)
        self.desc = kernels.MTP(None, *(m.weight.data_ptr() for m in norms), *(m.eps for m in norms),
                                kernels.weight_of(module.eh_proj))
        self.block = None  # the block plan `desc.block` points into

    def with_block(self, block: native_block.Plan) -> kernels.MTP:
        """The description, pointing at the block's current one (rebuilt on its own)."""
        if self.block is not block:
            self.block, self.desc.block = block, ctypes.pointer(block.desc)
        return self.desc


def plans(model, module):
    """(the module's plan, its block's plan), or None when the kernel does not take them or
    a forward hook waits on the module."""
    if native_block._global_hooks() or module._forward_hooks or module._forward_pre_hooks:
        return None
    slot = module._native
    plan = slot.plan
    if plan is None or not plan.valid():
        plan = slot.plan = MTPPlan(model, module) if _supported(model, module) else None
    block = native_block.block_plan(module.block)
    if plan is None or block is None or plan.hooked() or block.hooked():
        return None
    return plan, block


def step(model, module, h_prev_BTD: torch.Tensor, tokens_BT: torch.Tensor, cache,
         head: kernels.Weight | None, head_rows: torch.Tensor | None = None):
    """(h (B, T, D) before the module's norm, logits (len(head_rows), V) of `head` at the
    flattened rows `head_rows` (every row when None; no logits when `head` is None)), the
    module's cache (its layer 0) written and advanced; or None (nothing done)."""
    if not (kernels.supports(h_prev_BTD) and tokens_BT.device.type == "cpu"):
        return None
    storage = getattr(cache, "storage", None)
    found = plans(model, module) if storage is not None else None
    if found is None:
        return None
    plan, block = found
    B, T = tokens_BT.shape
    positions = cache.positions(T)  # checks the room left and marks the new positions
    latent, k_pe, _ = storage()
    if latent.dtype != torch.float32 or latent.device.type != "cpu":
        cache.advance(0)  # forget the marked positions
        return None
    h, logits, _ = kernels.mtp_decode(plan.with_block(block), plan.embed, tokens_BT, h_prev_BTD.reshape(B * T, -1),
                                      model.rope_cos, model.rope_sin, latent[0], k_pe[0], positions, block.top_k,
                                      block.n_experts, head, head_rows)
    cache.advance(T)
    return h.view(B, T, -1), logits
