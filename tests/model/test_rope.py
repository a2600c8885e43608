"""YaRN frequencies and scales against values worked out by hand."""
import math

import pytest
import torch

from dsmoe import ModelArgs
from dsmoe.model.rope import (apply_rope, correction_range, inv_frequencies, rope_tables,
                              softmax_scale)


def yarn_args(**overrides) -> ModelArgs:
    base = dict(qk_rope_head_dim=8, qk_nope_head_dim=8, rope_theta=10000.0, original_seq_len=64,
                rope_factor=4.0, beta_fast=32.0, beta_slow=1.0, max_seq_len=256)
    return ModelArgs.from_preset("tiny").replace(**{**base, **overrides})


def test_yarn_frequencies_by_hand():
    # Base frequencies 10000^(-2i/8) = 1, 0.1, 0.01, 0.001.
    # Correction dims: 8*ln(64/(2*pi*32))/(2 ln 1e4) = -0.497 -> floor -1 -> clamp 0;
    #                  8*ln(64/(2*pi*1)) /(2 ln 1e4) =  1.008 -> ceil 2.
    # Ramp (i - 0)/2 clamped: 0, 0.5, 1, 1 -> pair 0 kept, pair 1 half-blended, 2-3 divided by 4.
    args = yarn_args()
    assert correction_range(args) == (0, 2)
    expected = torch.tensor([1.0, 0.5 * 0.1 + 0.5 * 0.1 / 4, 0.01 / 4, 0.001 / 4])
    torch.testing.assert_close(inv_frequencies(args), expected)


def test_yarn_scales_by_hand():
    args = yarn_args(mscale=1.0, mscale_all_dim=1.0)
    mscale = 0.1 * math.log(4.0) + 1.0  # 1.1386...
    assert softmax_scale(args) == pytest.approx(16 ** -0.5 * mscale ** 2)
    cos, sin = rope_tables(args)
    torch.testing.assert_close(cos[3, 0], torch.tensor(math.cos(3.0)))  # factor 1 on cos/sin
    # V2-Lite-style different mscales scale cos/sin by their ratio.
    args = yarn_args(mscale=0.5, mscale_all_dim=1.0)
    cos, _ = rope_tables(args)
    ratio = (0.1 * 0.5 * math.log(4.0) + 1.0) / mscale
    torch.testing.assert_close(cos[0, 0], torch.tensor(ratio))


def test_plain_rope_without_factor():
    args = yarn_args(rope_factor=1.0)
    torch.testing.assert_close(inv_frequencies(args), torch.tensor([1.0, 0.1, 0.01, 0.001]))
    assert softmax_scale(args) == pytest.approx(16 ** -0.5)


def test_rotation_is_interleaved_pairs():
    args = yarn_args(rope_factor=1.0)
    cos, sin = rope_tables(args)
    x = torch.zeros(1, 2, 1, 8)
    x[0, :, 0, 0] = 1.0  # pair 0 = (1, 0): rotates into (cos t, sin t) on dims 0 and 1
    out = apply_rope(x, cos[None, :2], sin[None, :2])
    torch.testing.assert_close(out[0, 1, 0, :2], torch.tensor([math.cos(1.0), math.sin(1.0)]))
    assert out[0, :, 0, 2:].abs().max() == 0


@pytest.mark.parametrize("offset", [1, 0])  # pairs on 8-byte boundaries, and not (copied)
def test_complex_rotation_equals_the_real_one_with_gradients(offset):
    """fp32 rotates as one complex multiply; bf16 (and compiled code) by the real formula:
    the same values and gradients, also for a slice of a wider tensor (a query's rope part)."""
    g = torch.Generator().manual_seed(0)
    args = ModelArgs.from_preset("tiny")
    cos, sin = rope_tables(args, 6)
    R = args.qk_rope_head_dim
    wide = torch.randn(2, 6, 3, 5 + R, generator=g)
    grads = []
    for rotate in ("complex", "real"):
        x = wide.clone().requires_grad_()
        part = x[..., 5 - offset:5 - offset + R]
        if rotate == "complex":
            out = apply_rope(part, cos[None], sin[None])
        else:  # the real formula, written out
            even, odd = part[..., 0::2], part[..., 1::2]
            c, s = cos[None, :, None], sin[None, :, None]
            out = torch.stack((even * c - odd * s, even * s + odd * c), -1).flatten(-2)
        out.backward(torch.linspace(-1, 1, out.numel()).view_as(out))
        grads.append((out.detach(), x.grad))
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=1e-6)
