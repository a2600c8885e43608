"""A greedy speculative decoding step in one native call (`dsmoe/kernels/spec_decode.c`):
the chain of MTP drafts, the main model's verify pass, acceptance, and the MTP module's
catch-up over the confirmed positions, for every running row at once.

What: `greedy_step(model, module, draft_head, pending, first, g, K, main, mtp)` does what
`speculative.chain_drafts` then `speculative.verify_and_draft` do for greedy rows, and
returns (accepted, tokens, next first drafts, their MTP hidden states) with both caches
advanced; or None when a part is not one the kernels take (the caller then runs the
Python form, which also serves sampled rows).
Why: on a CPU the Python between the kernels of a speculative step (about 30 small tensor
operations, two cache rewinds, the plans' checks) cost as much as the whole step of a
small model.
The plans are the ones the separate calls use (`native_step`, `native_block`,
`native_mtp`), so their checks (identity, address, hooks) hold here too.
"""
from __future__ import annotations

import torch

from dsmoe import kernels
from dsmoe.model import native_block, native_mtp, native_step


def greedy_step(model, module, draft_head: tuple[torch.Tensor, torch.Tensor] | None, pending_B: torch.Tensor,
                first_B: torch.Tensor, g_BD: torch.Tensor, K: int, main, mtp):
    """One greedy speculative step with K drafts per row (see the module note). `module`
    is the MTP module drafts run (the model's or a stand-in), `draft_head` the int8 head
    they read (None: the model's). Returns (accepted (B,), tokens (B, K + 1): the accepted
    drafts then the next token, next first drafts (B,), their hidden states (B, D)), main
    and mtp advanced by accepted + 1 per row; or None (nothing done)."""
    if not (kernels.available() and pending_B.device.type == "cpu" and kernels.supports(g_BD)):
        return None
    step_plan = native_step.plan_of(model)
    mtp_plans = native_mtp.plans(model, module)
    if step_plan is None or mtp_plans is None or getattr(mtp, "storage", None) is None:
        return None
    if not torch.equal(main.lengths, mtp.lengths):
        return None  # not the state this step starts from (speculative.py keeps them equal)
    main.positions(K + 1)  # the verify pass writes K + 1 positions: checks the room left
    found = native_block.stack_table(model.layers, main, model._native_stack)
    mtp_latent, mtp_k_pe, _ = mtp.storage()
    if found is None or mtp_latent.dtype != torch.float32 or mtp_latent.device.type != "cpu":
        main.advance(0)  # forget the marked positions
        return None
    mtp.positions(K + 1)  # the catch-up writes up to K + 1 positions
    (latent, k_pe, _), table, _ = found
    plan, block = mtp_plans
    head = kernels.weight_from(*draft_head) if draft_head is not None else step_plan.head
    n_acc_B, tokens_BM, first_next_B, g_next_BD = kernels.spec_greedy(
        table, step_plan.embed, model.rope_cos, model.rope_sin, latent, k_pe, model.norm.weight, model.norm.eps,
        step_plan.head, plan.with_block(block), head, mtp_latent[0], mtp_k_pe[0], K, main.lengths, pending_B,
        first_B, g_BD)
    main.advance(n_acc_B + 1)
    mtp.advance(n_acc_B + 1)
    return n_acc_B, tokens_BM, first_next_B, g_next_BD
