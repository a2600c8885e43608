"""A whole decode step in one native call (`dsmoe/model/native_step.py`) against the seams
it replaces (`Transformer.hidden` then `logits`): the same hidden states, logits and cache,
fp32 and int8, batches and verify widths; the cases it leaves to the seams."""
import pytest
import torch

from dsmoe.infer.cache import LatentCache
from dsmoe.model import fastpath
from dsmoe.model.quant import quantize_modules


pytestmark = pytest.mark.usefixtures("native_kernels")


@pytest.fixture
def steps_taken(kernel_calls):
    return kernel_calls("step_decode")


def run(model, prompt, blocks, native: bool):
    cache = LatentCache(model.args, prompt.shape[0], 40, n_layers=model.args.n_layers)
    out = []
    with torch.no_grad():
        model.hidden(prompt, cache, attn_impl="naive")
        for block in blocks:
            if native:
                out.append(model.step(block, cache))
            else:
                with fastpath.disabled():
                    h, _ = model.hidden(block, cache, attn_impl="absorb")
                    out.append((h, model.logits(h)))
    return out, cache


@pytest.mark.parametrize("batch,width", [(1, 1), (3, 1), (2, 2), (8, 1)])
@pytest.mark.parametrize("int8", [False, True], ids=["fp32", "int8"])
def test_step_equals_hidden_then_logits(tiny_args, build, batch, width, int8, steps_taken):
    model = build(tiny_args)
    if int8:
        quantize_modules(model)
    g = torch.Generator().manual_seed(batch + width)
    prompt = torch.randint(0, tiny_args.vocab_size, (batch, 1), generator=g)  # <= 8 rows: native prefill too
    blocks = [torch.randint(0, tiny_args.vocab_size, (batch, width), generator=g) for _ in range(3)]
    native, native_cache = run(model, prompt, blocks, native=True)
    ref, ref_cache = run(model, prompt, blocks, native=False)
    # int8's reference runs torch's int8 kernel (bf16 activations): close, not equal
    atol = 2e-2 if int8 else 2e-5
    for (h, logits), (h_ref, logits_ref) in zip(native, ref):
        torch.testing.assert_close(h, h_ref, atol=atol, rtol=1e-3 if int8 else 1e-5)
        torch.testing.assert_close(logits, logits_ref, atol=atol, rtol=1e-3 if int8 else 1e-5)
    torch.testing.assert_close(native_cache.latent, ref_cache.latent, atol=atol, rtol=1e-3)
    assert len(steps_taken) == len(blocks)


def test_the_seams_run_what_the_kernel_does_not_take(tiny_args, build, steps_taken):
    model = build(tiny_args)
    seen = []
    model.norm.register_forward_hook(lambda *a: seen.append(1))  # the final norm must run as a module
    out, _ = run(model, torch.tensor([[1, 2]]), [torch.tensor([[3]])], native=True)
    ref, _ = run(model, torch.tensor([[1, 2]]), [torch.tensor([[3]])], native=False)
    assert seen and not steps_taken
    torch.testing.assert_close(out[0][1], ref[0][1], atol=2e-5, rtol=1e-5)


def test_a_replaced_head_is_seen(tiny_args, build):
    model = build(tiny_args)
    out, _ = run(model, torch.tensor([[1, 2]]), [torch.tensor([[3]])], native=True)
    with torch.no_grad():
        model.head.weight = torch.nn.Parameter(model.head.weight * 2)  # a new tensor
    again, _ = run(model, torch.tensor([[1, 2]]), [torch.tensor([[3]])], native=True)
    torch.testing.assert_close(again[0][1], 2 * out[0][1], atol=2e-5, rtol=1e-5)
