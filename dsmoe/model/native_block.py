"""A Transformer block's decode step in one native call (`dsmoe/kernels/block_decode.c`).

What: for a few new tokens per row over the latent cache (a decode step, a speculative
verify), `forward(block, x, cos, sin, cache)` runs the whole block (attn_norm, absorbed
MLA writing the cache, residual, ffn_norm, dense SwiGLU or MoE with its routing,
residual) as one C call, and returns what `Block.forward` returns; None when the block or
the call is not one the kernel takes, and the caller then runs the modules.

Why: op by op a block is ~60 tensor operations, each costing more than its arithmetic on
a CPU, so a batch-1 step spent half its time between kernels. In one call it is bound by
reading the weights (docs/inference.md, "Decode speed", has the profile).

The kernel reads the weights in place through a `kernels.Block` structure of pointers,
built once per block (`Plan`) and rebuilt when a submodule, parameter or buffer is
replaced or its storage moves (checked each call: identity and address of each, one flat pass over the whole stack, ~25 us;
walking the modules and checking dtypes each call cost ~190 us). In-place updates
(optimizer steps, `copy_`) keep the addresses, so the kernel reads the new values without a
rebuild; nothing is copied. Takes fp32 weights, or the int8 layers of `quant.py`; the
norms and the router stay fp32 (as quant keeps them).
Not here: training (no gradients), CUDA, hooks on submodules (the modules' own forward
does not run: a forward hook on `block.attn` would not fire, so blocks with hooks are
left to the modules).
"""
from __future__ import annotations

import operator

import torch
from torch import nn

from dsmoe import kernels
from dsmoe.model.moe import RoutingInfo


class Watch:
    """Modules and tensors a kernel description points into, and a cheap check that none was
    replaced or moved since (see the module note). The checks run as builtins over flat
    lists (`map`, `all`): ~3 us for a block's ~40 slots, against ~7 us as Python loops."""
    __slots__ = ("containers", "keys", "objects", "tensors", "ptrs", "hook_dicts")

    def __init__(self, modules, extra: tuple = ()):
        modules = [m for top in modules for m in top.modules()]
        slots = list(extra)  # (container dict, key, object): submodules, parameters, buffers
        for module in modules:
            slots += [(module._modules, k, v) for k, v in module._modules.items()]
            slots += [(module._parameters, k, v) for k, v in module._parameters.items()]
            slots += [(module._buffers, k, v) for k, v in module._buffers.items()]
        self.containers, self.keys, self.objects = (list(x) for x in zip(*slots)) if slots else ([], [], [])
        self.tensors = [v for v in self.objects if isinstance(v, torch.Tensor)]
        self.ptrs = [t.data_ptr() for t in self.tensors]
        # the hook dicts themselves: registering a hook adds to them, never replaces them
        self.hook_dicts = [d for m in modules for d in (m._forward_hooks, m._forward_pre_hooks)]

    def valid(self) -> bool:
        return (all(map(operator.is_, map(dict.get, self.containers, self.keys), self.objects))
                and list(map(torch.Tensor.data_ptr, self.tensors)) == self.ptrs)

    def hooked(self) -> bool:
        """Whether a forward hook waits on a module the kernel would skip."""
        return any(self.hook_dicts)


class Plan(Watch):
    """A block's kernel description and what it was built from."""
    __slots__ = ("desc", "top_k", "n_experts")

    def __init__(self, block, desc: kernels.Block):
        super().__init__([block])
        self.desc = desc
        gate = block.ffn.gate if block.is_moe else None
        self.top_k, self.n_experts = (gate.top_k, gate.n_experts) if gate is not None else (0, 0)


class PlanSlot:
    """Where a Block keeps its Plan; a copied model builds its own."""

    def __init__(self):
        self.plan: Plan | None = None

    def __deepcopy__(self, memo):
        return PlanSlot()


def _linears(block) -> list[nn.Module]:
    at, ffn = block.attn, block.ffn
    mods = [getattr(at, n) for n in ("wq_a", "wq_b", "wq", "wkv_a", "wkv_b", "wo") if hasattr(at, n)]
    dense = ffn.shared_experts if block.is_moe else ffn
    return mods + ([dense.w1, dense.w3, dense.w2] if dense is not None else [])


def _supported(block) -> bool:
    """Whether every tensor the kernel would read is one it takes."""
    if not kernels.takes_linears(*_linears(block)):
        return False
    at = block.attn
    tensors = [block.attn_norm.weight, block.ffn_norm.weight, at.kv_norm.weight]
    if at.q_lora_rank:
        tensors.append(at.q_norm.weight)
    for m in _linears(block):
        q = getattr(m, "weight_q", None)
        tensors += [q, m.weight_scale] if q is not None else [m.weight]
    if block.is_moe:
        native = getattr(block.ffn.experts, "native_weights", None)
        got = native() if native is not None and block.ffn.experts.impl == "auto" else None
        if got is None:
            return False
        weights, scales = got
        tensors += [block.ffn.gate.weight, block.ffn.gate.bias, *weights, *(scales or ())]
    return not (any(t.dtype not in (torch.float32, torch.int8, torch.bfloat16) or not t.is_contiguous()
                    for t in tensors) or any(t.dtype != torch.float32 for t in tensors[:4]))


def describe(block) -> kernels.Block:
    """The kernel's description of `block` (pointers into its weights, never copies)."""
    at = block.attn
    b = kernels.Block()
    b.attn_norm, b.ffn_norm = block.attn_norm.weight.data_ptr(), block.ffn_norm.weight.data_ptr()
    b.kv_norm, b.wkv_b = at.kv_norm.weight.data_ptr(), kernels.weight_of(at.wkv_b)
    b.eps, b.kv_eps, b.softmax_scale = block.attn_norm.eps, at.kv_norm.eps, at.softmax_scale
    if at.q_lora_rank:
        b.q_norm, b.q_eps = at.q_norm.weight.data_ptr(), at.q_norm.eps
        b.wq_a, b.wq_b = kernels.weight_of(at.wq_a), kernels.weight_of(at.wq_b)
    else:
        b.wq_b = kernels.weight_of(at.wq)  # wq_a stays empty (rows 0): no query compression
    b.wkv_a, b.wo = kernels.weight_of(at.wkv_a), kernels.weight_of(at.wo)
    b.heads, b.nope_dim, b.rope_dim = at.n_heads, at.qk_nope_head_dim, at.qk_rope_head_dim
    b.v_dim, b.kv_rank = at.v_head_dim, at.kv_lora_rank
    ffn = block.ffn
    dense = ffn.shared_experts if block.is_moe else ffn
    if dense is not None:
        b.ffn1, b.ffn3, b.ffn2 = (kernels.weight_of(m) for m in (dense.w1, dense.w3, dense.w2))
    b.is_moe = int(block.is_moe)
    if block.is_moe:
        g = ffn.gate
        (w1, w3, w2), scales = ffn.experts.native_weights()
        b.gate, b.bias = g.weight.data_ptr(), g.bias.data_ptr()
        b.n_experts, b.top_k, b.n_groups, b.n_limited_groups = g.n_experts, g.top_k, g.n_groups, g.n_limited_groups
        b.sigmoid_scores, b.group_top2 = int(g.score_func == "sigmoid"), int(g.topk_method == "noaux_tc")
        b.norm_topk, b.route_scale = int(g.norm_topk_prob), g.route_scale
        b.w1, b.w3, b.w2 = w1.data_ptr(), w3.data_ptr(), w2.data_ptr()
        if scales is not None:
            b.s1, b.s3, b.s2 = (s.data_ptr() for s in scales)
        b.expert_kind = kernels.KIND_INT8 if scales is not None else kernels.KIND_F32
        b.expert_dim = w1.shape[1]
    return b


def _global_hooks() -> bool:
    from torch.nn.modules import module
    return bool(module._global_forward_hooks or module._global_forward_pre_hooks)


def block_plan(block) -> Plan | None:
    """The block's valid plan, rebuilt if needed; None when the kernel does not take it."""
    plan = block._native.plan
    if plan is None or not plan.valid() or (block.is_moe and block.ffn.experts.impl != "auto"):
        plan = block._native.plan = Plan(block, describe(block)) if _supported(block) else None
    return plan


def _rows(x_BTD, cos, sin):
    B, T, D = x_BTD.shape
    h = x_BTD.reshape(B * T, D).clone()
    cos_MP = cos.expand(B, T, -1).reshape(B * T, -1).float().contiguous()
    sin_MP = sin.expand(B, T, -1).reshape(B * T, -1).float().contiguous()
    return h, cos_MP, sin_MP


def stack_table(blocks, cache, slot: PlanSlot):
    """What a native call over the whole stack needs: ((latent, k_pe, positions) of every
    layer's rows, the blocks' table, (top_k, n_experts)), or None when the cache or a block
    is not one the kernel takes (or a forward hook waits)."""
    storage = getattr(cache, "storage", None)
    if storage is None or _global_hooks():
        return None
    latent, k_pe, positions = storage()
    if latent.dtype != torch.float32 or latent.device.type != "cpu" or latent.shape[0] < len(blocks):
        return None
    stack = slot.plan
    if stack is None or not stack.valid(blocks):  # one flat check for every block (~12 us, not 6 x 6)
        plans = [block_plan(b) for b in blocks]
        if any(p is None for p in plans):
            return None
        stack = slot.plan = StackPlan(blocks, plans)
    if stack.hooked():
        return None
    return (latent, k_pe, positions), stack.table, stack.routing


class StackPlan(Watch):
    """The blocks' table for `kernels.stack_decode`, valid while no block, submodule, tensor or
    expert implementation changed (one flat `Watch` over the whole stack)."""
    __slots__ = ("blocks", "table", "routing")

    def __init__(self, blocks, plans: list[Plan]):
        # the experts' `impl` is an attribute, not a submodule: watched as a slot too
        impls = [(b.ffn.experts.__dict__, "impl", b.ffn.experts.__dict__.get("impl")) for b in blocks if b.is_moe]
        super().__init__(list(blocks), extra=impls)
        self.blocks = list(blocks)
        self.table = kernels.block_table([p.desc for p in plans])
        moe = next((p for p in plans if p.n_experts), None)
        self.routing = (moe.top_k, moe.n_experts) if moe else (0, 0)

    def valid(self, blocks=None) -> bool:
        return (blocks is None or len(blocks) == len(self.blocks) and all(map(operator.is_, blocks, self.blocks))) \
            and super().valid()


def stack_forward(blocks, x_BTD: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache, slot: PlanSlot):
    """Every block of a stack (`Transformer.layers`, in order) over a few new tokens in one
    native call: (h, routing of the MoE blocks), or None when one block is not taken (the
    caller then runs the blocks one by one). `cache.storage()` gives every layer's rows;
    `slot` keeps the table of the blocks' descriptions."""
    if not kernels.supports(x_BTD):
        return None
    found = stack_table(blocks, cache, slot)
    if found is None:
        return None
    (latent, k_pe, positions), table, (top_k, n_experts) = found
    B, T, D = x_BTD.shape
    h, cos_MP, sin_MP = _rows(x_BTD, cos, sin)
    routing = kernels.stack_decode(table, h, T, cos_MP, sin_MP, latent, k_pe, positions.contiguous(),
                                   top_k, n_experts)
    return h.view(B, T, D), [RoutingInfo(*r) for r in routing if r is not None]


def forward(block, x_BTD: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache):
    """`Block.forward` for a few new tokens over a latent cache, in one call: (h, routing),
    or None when the kernel does not take this block or this call."""
    storage = getattr(cache, "storage", None)
    if storage is None or not kernels.supports(x_BTD) or _global_hooks():
        return None
    latent, k_pe, positions = storage()
    if latent.dtype != torch.float32 or latent.device.type != "cpu":
        return None
    plan = block_plan(block)
    if plan is None or plan.hooked():
        return None
    B, T, D = x_BTD.shape
    h, cos_MP, sin_MP = _rows(x_BTD, cos, sin)
    routing = kernels.block_decode(plan.desc, h, T, cos_MP, sin_MP, latent, k_pe, positions.contiguous(),
                                   plan.top_k, plan.n_experts)
    return h.view(B, T, D), (RoutingInfo(*routing) if routing is not None else None)
