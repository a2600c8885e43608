"""The few-row CPU inference paths (`dsmoe/model/fastpath.py`) against the ordinary ones:
same logits for decode steps and 2-token verify passes, derived layouts rebuilt when the
weights change, and nothing derived in a state_dict."""
import contextlib
import copy

import pytest
import torch
import torch.nn.functional as F

from dsmoe import kernels
from dsmoe.infer.cache import LatentCache
from dsmoe.model import fastpath
from dsmoe.model.moe import NATIVE_EXPERTS_MAX_TOKENS, resolve_expert_impl


def decode_logits(model, prompt, steps):
    """Prefill `prompt`, then decode `steps` (B, T) blocks: their logits, concatenated."""
    args = model.args
    cache = LatentCache(args, prompt.shape[0], 64, n_layers=args.n_layers)
    out = [model(prompt, cache, attn_impl="naive")[:, -1:]]
    for block in steps:
        out.append(model(block, cache, attn_impl="absorb"))
    return torch.cat(out, 1)


@pytest.mark.parametrize("native", [True, False], ids=["native", "torch"])
@pytest.mark.parametrize("batch,width", [(1, 1), (1, 2), (2, 1), (3, 1), (8, 1), (4, 2)])
@pytest.mark.parametrize("q_lora_rank", [0, 32])
def test_fast_paths_equal_the_ordinary_ones(tiny_args, build, batch, width, q_lora_rank, native, request):
    """With the native kernels (up to 8 rows) and with torch's few-row layouts (up to 2)."""
    if native:
        request.getfixturevalue("native_kernels")
    model = build(tiny_args.replace(q_lora_rank=q_lora_rank))
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, tiny_args.vocab_size, (batch, 9), generator=g)
    steps = [torch.randint(0, tiny_args.vocab_size, (batch, width), generator=g) for _ in range(4)]
    with torch.no_grad(), (contextlib.nullcontext() if native else kernels.disabled()):
        fast = decode_logits(model, prompt, steps)
        with fastpath.disabled():
            ordinary = decode_logits(model, prompt, steps)
    torch.testing.assert_close(fast, ordinary, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("native", [True, False], ids=["native", "torch"])
def test_auto_picks_the_views_only_for_few_cpu_tokens_at_inference(native):
    with contextlib.nullcontext() if native else kernels.disabled():
        most = fastpath.max_rows()
        assert most == (kernels.MAX_ROWS if native else fastpath.FAST_MAX_ROWS)
        assert resolve_expert_impl("auto", most, grad_enabled=False, on_cpu=True) == "views"
        assert resolve_expert_impl("auto", most + 1, grad_enabled=False, on_cpu=True) == "ragged"
        # weights the native experts kernel takes: it runs short prompts too
        longest = NATIVE_EXPERTS_MAX_TOKENS if native else most
        assert resolve_expert_impl("auto", longest, False, on_cpu=True, native_weights=True) == "views"
        assert resolve_expert_impl("auto", longest + 1, False, on_cpu=True, native_weights=True) == "ragged"
    assert resolve_expert_impl("auto", 1, grad_enabled=False, on_cpu=True) == "views"
    assert resolve_expert_impl("auto", 1, grad_enabled=False, on_cpu=False) == "ragged"  # CUDA: no host sync
    assert resolve_expert_impl("auto", 1, grad_enabled=True, on_cpu=True) == "grouped"
    with fastpath.disabled():
        assert resolve_expert_impl("auto", 1, grad_enabled=False, on_cpu=True) == "ragged"


def test_derived_layouts_follow_the_weights(tiny_args, build):
    """The head's transposed copy is rebuilt after an in-place change and after load_state_dict."""
    model = build(tiny_args)
    x = torch.randn(1, tiny_args.dim)
    with torch.no_grad(), kernels.disabled():  # the native kernels read the head as it is
        model._head(x)  # builds the copy
        model.head.weight.mul_(2)  # an optimizer-style in-place write
        torch.testing.assert_close(model._head(x), F.linear(x, model.head.weight))
        other = build(tiny_args, seed=1)
        model.load_state_dict(other.state_dict())
        torch.testing.assert_close(model._head(x), F.linear(x, other.head.weight))


def test_nothing_derived_is_saved_or_shared(tiny_args, build):
    model = build(tiny_args)
    keys = set(model.state_dict())
    with torch.no_grad():
        decode_logits(model, torch.randint(0, tiny_args.vocab_size, (1, 5)), [torch.tensor([[3]])])
    assert set(model.state_dict()) == keys
    twin = copy.deepcopy(model)
    with torch.no_grad():
        twin.head.weight.zero_()
        x = torch.randn(1, tiny_args.dim)
        assert twin._head(x).abs().max() == 0
        assert model._head(x).abs().max() > 0


@pytest.mark.parametrize("native", [True, False], ids=["native", "torch"])
@pytest.mark.parametrize("idle", [False, True])
def test_chosen_expert_views_equal_the_loop(tiny_args, idle, native):
    """Any number of tokens, experts nobody chose included (inference only: no gradient)."""
    from dsmoe.model.moe import MoE
    torch.manual_seed(0)
    moe = MoE(tiny_args)
    for p in moe.parameters():
        torch.nn.init.normal_(p, 0, 0.1)
    if idle:
        moe.gate.bias.copy_(torch.tensor([5.0, 5.0, 5.0] + [0.0] * 5))
    x = torch.randn(13, tiny_args.dim)
    with torch.no_grad(), (contextlib.nullcontext() if native else kernels.disabled()):
        moe.experts.impl = "views"
        y_views, routing = moe(x)
        moe.experts.impl = "loop"
        y_loop, _ = moe(x)
    if idle:
        assert routing.load_E[3:].sum() == 0
    torch.testing.assert_close(y_views, y_loop, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("native", [True, False], ids=["native", "torch"])
def test_derived_layouts_follow_replaced_parameters(tiny_args, build, native):
    """load_state_dict(assign=True) puts new tensors in place: the layouts follow them
    (the native path's fused w1|w3 and wq_a|wkv_a too)."""
    model = build(tiny_args)
    x = torch.randn(2, tiny_args.dim)
    with torch.no_grad(), (contextlib.nullcontext() if native else kernels.disabled()):
        prompt = torch.tensor([[1, 2, 3]])
        before = decode_logits(model, prompt, [torch.tensor([[4]])])
        other = build(tiny_args, seed=1)
        model.load_state_dict(other.state_dict(), assign=True)
        torch.testing.assert_close(decode_logits(model, prompt, [torch.tensor([[4]])]),
                                   decode_logits(other, prompt, [torch.tensor([[4]])]))
        assert not torch.allclose(before, decode_logits(model, prompt, [torch.tensor([[4]])]))
        third = build(tiny_args, seed=2)
        model.load_state_dict(third.state_dict(), assign=True)
        torch.testing.assert_close(model._head(x), F.linear(x, third.head.weight))
