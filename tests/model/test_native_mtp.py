"""An MTP module's decode step in one native call (`dsmoe/model/native_mtp.py`) against the
modules it replaces (`Transformer.mtp_hidden`, the module's norm, the head): the same hidden
states, logits at the rows asked for, and cache; an int8 draft head; the cases it leaves to
the modules."""
import pytest
import torch

from dsmoe import kernels
from dsmoe.infer.cache import LatentCache
from dsmoe.model.quant import quantize_modules, quantize_rows

pytestmark = pytest.mark.usefixtures("native_kernels")


@pytest.fixture
def calls(kernel_calls):
    return kernel_calls("mtp_decode")


def run(model, steps, native: bool, head=None):
    """Feed (h_prev, tokens, head_rows) steps through the module with a cache of its own."""
    args = model.args
    cache = LatentCache(args, steps[0][1].shape[0], 40, n_layers=1).rows(0, steps[0][1].shape[0])
    out = []
    with torch.no_grad():
        for h_prev, tokens, rows in steps:
            if native:
                out.append(model.mtp_step(1, h_prev, tokens, cache, head, rows))
            else:
                h, _ = model.mtp_hidden(1, h_prev, tokens, cache, attn_impl="absorb")
                x = model.mtp[0].norm(h.reshape(-1, h.shape[-1]))
                x = x if rows is None else x[rows]
                if head is not None:  # the int8 head, dequantised: the same values in fp32
                    q, scale = head
                    out.append((h, torch.nn.functional.linear(x, q.float() * scale.float()[:, None])))
                else:
                    out.append((h, model.head(x)))
    return out, cache


def steps_for(args, batch, widths, seed=0):
    g = torch.Generator().manual_seed(seed)
    steps = []
    for i, T in enumerate(widths):
        rows = None if i % 2 == 0 else torch.arange(batch) * T + (T - 1)  # each row's last position
        steps.append((torch.randn(batch, T, args.dim, generator=g),
                      torch.randint(0, args.vocab_size, (batch, T), generator=g), rows))
    return steps


@pytest.mark.parametrize("batch,widths", [(1, (5, 1, 1, 3)), (2, (3, 2, 1)), (3, (1, 2))])
@pytest.mark.parametrize("kind", ["fp32", "int8-head", "int8-model"])
def test_mtp_step_equals_the_modules(tiny_args, build, batch, widths, kind, calls):
    model = build(tiny_args)
    head = None
    if kind == "int8-head":  # the draft head speculation uses
        head = quantize_rows(model.head.weight)
    if kind == "int8-model":
        quantize_modules(model)
    steps = steps_for(tiny_args, batch, widths)
    native, native_cache = run(model, steps, True, head)
    assert len(calls) == len(steps)
    with kernels.disabled():
        ref, ref_cache = run(model, steps, False, head)
    # int8's reference runs torch's int8 kernel (bf16 activations): close, not equal
    tol = dict(atol=2e-2, rtol=1e-3) if kind == "int8-model" else dict(atol=2e-5, rtol=1e-5)
    for (h, logits), (h_ref, logits_ref) in zip(native, ref):
        torch.testing.assert_close(h, h_ref, **tol)
        torch.testing.assert_close(logits, logits_ref, **tol)
    assert torch.equal(native_cache.lengths, ref_cache.lengths)
    torch.testing.assert_close(native_cache.cache.latent, ref_cache.cache.latent, **tol)


def test_hooks_and_other_devices_run_the_modules(tiny_args, build, calls):
    model = build(tiny_args)
    steps = steps_for(tiny_args, 1, (2,))
    seen = []
    handle = model.mtp[0].register_forward_hook(lambda *a: seen.append(1))
    run(model, steps, True)
    handle.remove()
    assert seen == [1] and calls == []  # the hook fired: the module ran
    run(model, steps, True)
    assert len(calls) == 1


def test_a_replaced_weight_is_read(tiny_args, build):
    """The plan is rebuilt when a parameter is replaced, and in-place updates are read."""
    model = build(tiny_args)
    steps = steps_for(tiny_args, 1, (1,))
    before, _ = run(model, steps, True)
    with torch.no_grad():
        model.mtp[0].eh_proj.weight = torch.nn.Parameter(model.mtp[0].eh_proj.weight * 0.5)
    replaced, _ = run(model, steps, True)
    with kernels.disabled():
        expected, _ = run(model, steps, False)
    torch.testing.assert_close(replaced[0][0], expected[0][0], atol=2e-5, rtol=1e-5)
    assert not torch.allclose(replaced[0][0], before[0][0])
    with torch.no_grad():
        model.mtp[0].norm.weight.mul_(3)
    updated, _ = run(model, steps, True)
    with kernels.disabled():
        expected, _ = run(model, steps, False)
    torch.testing.assert_close(updated[0][1], expected[0][1], atol=2e-5, rtol=1e-5)


def test_a_head_row_outside_the_positions_is_refused(tiny_args, build):
    model = build(tiny_args)
    (h_prev, tokens, _), = steps_for(tiny_args, 1, (2,))
    with pytest.raises(ValueError, match="head row"):
        run(model, [(h_prev, tokens, torch.tensor([2]))], True)
