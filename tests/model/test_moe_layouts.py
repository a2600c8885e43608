"""Both layouts of the grouped experts path (padded bmm, ragged grouped_mm) and the
few-token path against the per-expert loop, whichever one this machine's thread count
would pick; and which implementation `auto` picks."""
import pytest
import torch

import dsmoe.model.moe as moe_module
from dsmoe import ModelArgs, kernels
from dsmoe.errors import DsmoeError
from dsmoe.model import fastpath
from dsmoe.model.moe import RAGGED_MAX_TOKENS, MoE, resolve_expert_impl


def run(moe: MoE, x: torch.Tensor, impl: str, bias=None):
    moe.experts.impl = impl
    moe.zero_grad(set_to_none=True)
    if bias is not None:
        moe.gate.bias.copy_(bias)
    xi = x.clone().requires_grad_(True)
    y, routing = moe(xi)
    probe = torch.linspace(-1, 1, y.numel()).view_as(y)  # a gradient that differs per element
    (y * probe).sum().backward()
    grads = {n: p.grad.clone() for n, p in moe.named_parameters()}
    return y.detach(), xi.grad, grads, routing


def random_moe(args: ModelArgs) -> MoE:
    """A MoE layer with every parameter drawn from N(0, 0.1) (seed 0): the gate's bias too."""
    torch.manual_seed(0)
    moe = MoE(args)
    for p in moe.parameters():
        torch.nn.init.normal_(p, 0, 0.1)
    return moe


@pytest.mark.parametrize("layout", ["padded", "ragged", "few_tokens"])
@pytest.mark.parametrize("case", ["balanced", "idle_experts", "top1"])
def test_layout_equals_loop(monkeypatch, layout, case):
    monkeypatch.setattr(moe_module, "pads_experts", lambda device, load_E=None: layout == "padded")
    impl = "ragged" if layout == "few_tokens" else "grouped"
    changes = {"n_activated_experts": 1, "n_limited_groups": 1} if case == "top1" else {}
    args = ModelArgs.from_preset("tiny").replace(**changes)
    moe = random_moe(args)
    # idle_experts: experts 3..7 get no token, 0..2 get all (uneven padding, empty blocks)
    bias = torch.tensor([5.0, 5.0, 5.0] + [0.0] * 5) if case == "idle_experts" else None
    x = torch.randn(45, args.dim)
    y_l, dx_l, g_l, _ = run(moe, x, "loop", bias)
    y_g, dx_g, g_g, routing = run(moe, x, impl, bias)
    if case == "idle_experts":
        assert routing.load_E[3:].sum() == 0
    torch.testing.assert_close(y_g, y_l, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(dx_g, dx_l, atol=1e-6, rtol=1e-5)
    for name in g_l:
        torch.testing.assert_close(g_g[name], g_l[name], atol=1e-5, rtol=1e-5, msg=name)


@pytest.mark.parametrize("layout", ["padded", "ragged", "few_tokens"])
def test_no_tokens(monkeypatch, layout):
    """Zero rows (an expert-parallel rank may receive none) give zero rows and gradients."""
    monkeypatch.setattr(moe_module, "pads_experts", lambda device, load_E=None: layout == "padded")
    args = ModelArgs.from_preset("tiny")
    experts = MoE(args).experts
    experts.impl = "ragged" if layout == "few_tokens" else "grouped"
    for p in experts.parameters():
        torch.nn.init.normal_(p, 0, 0.1)
    x = torch.randn(0, args.dim, requires_grad=True)
    ids = torch.zeros(0, 2, dtype=torch.long)
    weights = torch.ones(0, 2, requires_grad=True)
    y = experts(x, ids, weights, torch.zeros(args.n_routed_experts, dtype=torch.long))
    assert y.shape == (0, args.dim)
    y.sum().backward()
    assert x.grad.shape == (0, args.dim) and weights.grad.shape == (0, 2)
    assert experts.w1_EFD.grad.abs().sum() == 0


def test_padding_only_for_an_even_load(monkeypatch):
    """Multi-threaded CPU pads only when it adds at most MAX_PADDING - 1 rows; never on one
    thread or on an accelerator."""
    cpu = torch.device("cpu")
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    assert moe_module.pads_experts(cpu, torch.tensor([10, 10, 12, 8]))  # 4 x 12 <= 1.25 x 40
    assert not moe_module.pads_experts(cpu, torch.tensor([10, 10, 14, 6]))  # 4 x 14 > 50
    assert not moe_module.pads_experts(cpu, torch.tensor([40, 0, 0, 0]))
    assert not moe_module.pads_experts(torch.device("meta"), torch.tensor([10, 10, 10, 10]))
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    assert not moe_module.pads_experts(cpu, torch.tensor([10, 10, 10, 10]))


def test_auto_takes_the_few_token_path_only_at_inference():
    assert resolve_expert_impl("auto", 1, grad_enabled=False) == "ragged"
    assert resolve_expert_impl("auto", RAGGED_MAX_TOKENS, grad_enabled=False) == "ragged"
    assert resolve_expert_impl("auto", RAGGED_MAX_TOKENS + 1, grad_enabled=False) == "grouped"
    assert resolve_expert_impl("auto", 1, grad_enabled=True) == "grouped"  # training batches
    assert resolve_expert_impl("loop", 1, grad_enabled=False) == "loop"  # an explicit choice stands
    with pytest.raises(DsmoeError, match="choose 'auto' or one of"):
        resolve_expert_impl("fused", 1, grad_enabled=False)


def test_auto_at_inference_runs_the_few_token_path(monkeypatch):
    """A few-token call under no_grad goes through `few_token_experts` (and gives the loop's
    output); up to `fastpath.max_rows()` tokens on a CPU (NATIVE_EXPERTS_MAX_TOKENS with the
    native kernels) take the chosen-expert views instead (test_fastpath.py)."""
    args = ModelArgs.from_preset("tiny")
    moe = random_moe(args)
    calls = []
    real = moe_module._few_token_experts_eager
    monkeypatch.setattr(moe_module, "_few_token_experts_eager", lambda *a: calls.append(1) or real(*a))
    x = torch.randn(max(fastpath.max_rows(), moe_module.NATIVE_EXPERTS_MAX_TOKENS) + 1, args.dim)
    with torch.no_grad():
        y_auto, _ = moe(x)
        moe.experts.impl = "loop"
        y_loop, _ = moe(x)
    assert calls == [1]
    torch.testing.assert_close(y_auto, y_loop, atol=1e-6, rtol=1e-5)


@pytest.mark.skipif(not kernels.available(), reason="no native kernels (no C compiler)")
def test_auto_runs_the_native_experts_for_short_prompts(monkeypatch):
    """Between `fastpath.max_rows()` and NATIVE_EXPERTS_MAX_TOKENS tokens on a CPU, `auto`
    calls the native experts kernel once (not the ragged path) and gives the loop's output."""
    args = ModelArgs.from_preset("tiny")
    moe = random_moe(args)
    calls = []
    real = kernels.experts
    monkeypatch.setattr(kernels, "experts", lambda *a: calls.append(len(a[0])) or real(*a))
    monkeypatch.setattr(moe_module, "_few_token_experts_eager", lambda *a: pytest.fail("ragged path taken"))
    outs = []
    for n in (fastpath.max_rows() + 1, moe_module.NATIVE_EXPERTS_MAX_TOKENS):
        x = torch.randn(n, args.dim)
        with torch.no_grad():
            moe.experts.impl = "auto"
            y_auto, _ = moe(x)
            moe.experts.impl = "loop"
            outs.append((y_auto, moe(x)[0]))
    assert calls == [fastpath.max_rows() + 1, moe_module.NATIVE_EXPERTS_MAX_TOKENS]
    for y_auto, y_loop in outs:
        torch.testing.assert_close(y_auto, y_loop, atol=1e-6, rtol=1e-5)
