"""A block's decode step in one native call (`dsmoe/model/native_block.py`) against the
modules it replaces: the same hidden states, cache contents and routing for decode steps
and verify passes, with and without query compression, V2-style softmax routing, int8
weights (against the fp32 model holding the dequantised weights), the MTP block; and the
cases it must leave to the modules (hooks, explicit expert implementations)."""
import pytest
import torch

from dsmoe import kernels
from dsmoe.infer.cache import LatentCache
from dsmoe.model import fastpath
from dsmoe.model.quant import quantize_modules


pytestmark = pytest.mark.usefixtures("native_kernels")


@pytest.fixture
def count_calls(monkeypatch):
    """Blocks run by the kernel: one per `block_decode` call, one per block of a `stack_decode`."""
    calls = []
    block, stack = kernels.block_decode, kernels.stack_decode
    monkeypatch.setattr(kernels, "block_decode", lambda *a: calls.append(1) or block(*a))
    monkeypatch.setattr(kernels, "stack_decode", lambda table, *a: calls.extend([1] * len(table)) or stack(table, *a))
    return calls


def run_steps(model, prompt, steps, fast: bool):
    """Prefill, then decode `steps`: every step's hidden states and routing, and the cache."""
    args = model.args
    cache = LatentCache(args, prompt.shape[0], 48, n_layers=args.n_layers)
    outs = []
    with torch.no_grad():
        model.hidden(prompt, cache, attn_impl="naive")
        for block in steps:
            if fast:
                outs.append(model.hidden(block, cache, attn_impl="absorb"))
            else:
                with fastpath.disabled():
                    outs.append(model.hidden(block, cache, attn_impl="absorb"))
    return outs, cache


def assert_same_steps(model, batch, width, atol=2e-5):
    g = torch.Generator().manual_seed(batch * 10 + width)
    V = model.args.vocab_size
    prompt = torch.randint(0, V, (batch, 7), generator=g)
    steps = [torch.randint(0, V, (batch, width), generator=g) for _ in range(3)]
    fast, fast_cache = run_steps(model, prompt, steps, fast=True)
    ref, ref_cache = run_steps(model, prompt, steps, fast=False)
    for (h, routing), (h_ref, routing_ref) in zip(fast, ref):
        torch.testing.assert_close(h, h_ref, atol=atol, rtol=1e-5)
        for r, r_ref in zip(routing, routing_ref):
            assert torch.equal(r.ids_TK.sort(-1).values, r_ref.ids_TK.sort(-1).values)
            assert torch.equal(r.load_E, r_ref.load_E)
            torch.testing.assert_close(r.scores_TE, r_ref.scores_TE, atol=1e-6, rtol=1e-5)
            order, order_ref = r.ids_TK.argsort(-1), r_ref.ids_TK.argsort(-1)
            torch.testing.assert_close(r.weights_TK.gather(1, order), r_ref.weights_TK.gather(1, order_ref),
                                       atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(fast_cache.latent, ref_cache.latent, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fast_cache.k_pe, ref_cache.k_pe, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("batch,width", [(1, 1), (1, 2), (3, 1), (8, 1), (2, 3)])
def test_native_steps_equal_the_modules(tiny_args, build, batch, width, count_calls):
    model = build(tiny_args)
    assert_same_steps(model, batch, width)
    assert len(count_calls) == 3 * tiny_args.n_layers  # every block of every step took one call


@pytest.mark.parametrize("change", ["no_q_lora", "softmax_routing", "one_group", "no_shared"])
def test_native_steps_follow_the_config(tiny_args, build, change, count_calls):
    args = {"no_q_lora": tiny_args.replace(q_lora_rank=0),
            "softmax_routing": tiny_args.replace(score_func="softmax", topk_method="greedy", n_expert_groups=1,
                                                 n_limited_groups=1, norm_topk_prob=False, route_scale=1.0),
            "one_group": tiny_args.replace(n_expert_groups=1, n_limited_groups=1),
            "no_shared": tiny_args.replace(n_shared_experts=0)}[change]
    model = build(args)
    with torch.no_grad():
        for layer in model.layers:  # a non-zero selection bias: the kernel must add it
            if layer.is_moe:
                layer.ffn.gate.bias.normal_(0, 0.05)
    assert_same_steps(model, 2, 1)
    assert count_calls


def test_int8_native_steps_equal_the_dequantised_model(tiny_args, build):
    """The kernel reads int8 weights with fp32 activations: exactly the fp32 model whose
    weights are the dequantised int8 ones (the torch int8 path rounds activations to bf16)."""
    model = build(tiny_args)
    quantize_modules(model)
    dequantised = build(tiny_args)
    with torch.no_grad():
        state = {}
        for name, t in model.state_dict().items():
            if name.endswith("_q"):
                base = name[:-2]
                scale = model.state_dict()[base + "_scale"].float()
                state[base] = t.float() * scale.unsqueeze(-1)
            elif not name.endswith("_scale"):
                state[name] = t
        dequantised.load_state_dict(state)
    g = torch.Generator().manual_seed(0)
    # 8 prompt rows: the prefill's int8 matmuls take the native kernel too (more rows would
    # take torch's int8 kernel, whose bf16 activations differ from fp32 by ~1e-3)
    prompt = torch.randint(0, tiny_args.vocab_size, (2, 4), generator=g)
    steps = [torch.randint(0, tiny_args.vocab_size, (2, 1), generator=g) for _ in range(3)]
    fast, _ = run_steps(model, prompt, steps, fast=True)
    ref, _ = run_steps(dequantised, prompt, steps, fast=False)
    for (h, _), (h_ref, _) in zip(fast, ref):
        torch.testing.assert_close(h, h_ref, atol=5e-5, rtol=1e-4)


def test_mtp_block_takes_the_kernel_too(tiny_args, build, count_calls):
    model = build(tiny_args)
    args = model.args
    cache = LatentCache(args, 1, 32, n_layers=1)
    h_prev, tokens = torch.randn(1, 1, args.dim), torch.tensor([[5]])
    with torch.no_grad():
        fast, _ = model.mtp_hidden(1, h_prev, tokens, cache, attn_impl="absorb")
        cache.rewind(1)
        with fastpath.disabled():
            ref, _ = model.mtp_hidden(1, h_prev, tokens, cache, attn_impl="absorb")
    torch.testing.assert_close(fast, ref, atol=2e-5, rtol=1e-5)
    assert len(count_calls) == 1


def test_hooks_and_explicit_expert_impls_run_the_modules(tiny_args, build, count_calls):
    model = build(tiny_args)
    seen = []
    model.layers[1].attn.register_forward_hook(lambda *a: seen.append(1))
    model.set_expert_impl("loop")
    assert_same_steps(model, 1, 1)
    assert seen  # the hooked block ran its modules
    # the stack falls back to block by block; layer 0 is dense (no expert impl to honour):
    # only it took the kernel, once per step
    assert len(count_calls) == 3


def test_weights_changed_in_place_are_seen(tiny_args, build):
    model = build(tiny_args)
    assert_same_steps(model, 1, 1)  # builds the kernel's description
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.5)  # an optimizer-style in-place write: same storage, new version
    assert_same_steps(model, 1, 1, atol=1e-4)


def test_a_global_forward_hook_runs_the_modules(tiny_args, build, count_calls):
    from torch.nn.modules.module import register_module_forward_hook
    model = build(tiny_args)
    seen = []
    handle = register_module_forward_hook(lambda m, i, o: seen.append(type(m).__name__))
    try:
        assert_same_steps(model, 1, 1)
    finally:
        handle.remove()
    assert "MLA" in seen and not count_calls
