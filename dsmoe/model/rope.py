"""Rotary position embedding with YaRN context extension (DeepSeek-V3 report §4.3).

Notable:
- The interleaved pair layout of DeepSeek's checkpoints: dimensions (2i, 2i+1) form one
  rotating pair (the official code views them as a complex number; Hugging Face calls
  this `rope_interleave=True`). We rotate with real cos/sin so it also runs under bf16
  autocast and `torch.compile`.
- YaRN (Peng et al. 2023): frequencies whose wavelength is shorter than the original
  context keep their value, longer ones are divided by `rope_factor`, with a linear blend
  between the correction dims found from beta_fast/beta_slow (floored and ceiled, as the
  reference does). `mscale`/`mscale_all_dim` follow Hugging Face: cos/sin are scaled by
  get_mscale(mscale)/get_mscale(mscale_all_dim) (1 for DeepSeek-V3), and the softmax scale
  by get_mscale(mscale_all_dim)**2 (see `softmax_scale`).
Not here: NTK-aware or dynamic scaling; YaRN is applied whenever rope_factor > 1.
"""
from __future__ import annotations

import math

import torch

from dsmoe.config import ModelArgs


def yarn_get_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1.0 else 0.1 * mscale * math.log(scale) + 1.0


def correction_dim(n_rotations: float, dim: int, base: float, original_seq_len: int) -> float:
    """The rotary dimension whose pair turns `n_rotations` times over the original context."""
    return dim * math.log(original_seq_len / (n_rotations * 2 * math.pi)) / (2 * math.log(base))


def correction_range(args: ModelArgs) -> tuple[int, int]:
    dim, base = args.qk_rope_head_dim, args.rope_theta
    low = math.floor(correction_dim(args.beta_fast, dim, base, args.original_seq_len))
    high = math.ceil(correction_dim(args.beta_slow, dim, base, args.original_seq_len))
    return max(low, 0), min(high, dim - 1)


def inv_frequencies(args: ModelArgs) -> torch.Tensor:
    """Per-pair angular frequencies (qk_rope_head_dim // 2,), YaRN-blended when extended."""
    dim = args.qk_rope_head_dim
    freqs = 1.0 / (args.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    if not args.uses_yarn:
        return freqs.float()
    low, high = correction_range(args)
    span = max(high - low, 0.001)  # avoid 0/0 when beta_fast == beta_slow
    ramp = ((torch.arange(dim // 2, dtype=torch.float64) - low) / span).clamp(0, 1)
    keep = 1 - ramp  # 1: high-frequency pair, kept; 0: low-frequency pair, interpolated
    freqs = freqs / args.rope_factor * (1 - keep) + freqs * keep
    return freqs.float()


def rope_tables(args: ModelArgs, seq_len: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables (seq_len, qk_rope_head_dim // 2) in fp32."""
    seq_len = seq_len or args.max_seq_len
    t = torch.arange(seq_len, dtype=torch.float64)
    angles = torch.outer(t, inv_frequencies(args).double())
    attention_factor = 1.0
    if args.uses_yarn:
        attention_factor = (yarn_get_mscale(args.rope_factor, args.mscale)
                            / yarn_get_mscale(args.rope_factor, args.mscale_all_dim))
    return ((angles.cos() * attention_factor).float(), (angles.sin() * attention_factor).float())


def softmax_scale(args: ModelArgs) -> float:
    scale = args.qk_head_dim ** -0.5
    if args.uses_yarn:
        scale *= yarn_get_mscale(args.rope_factor, args.mscale_all_dim) ** 2
    return scale


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs of x (B, T, H, R) by cos/sin (B or 1, T, R // 2)."""
    if x.dtype == torch.float32 and cos.dtype == torch.float32 and not torch.compiler.is_compiling():
        return _apply_rope_complex(x, cos, sin)
    x_pairs = x.float().unflatten(-1, (-1, 2))  # (B, T, H, R/2, 2)
    even, odd = x_pairs[..., 0], x_pairs[..., 1]
    cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)  # broadcast over heads
    rotated = torch.stack((even * cos - odd * sin, even * sin + odd * cos), dim=-1)
    return rotated.flatten(-2).type_as(x)


def _apply_rope_complex(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The same rotation in fp32 as one complex multiply over a view of the pairs: forward
    and backward one kernel each instead of a dozen (0.74 -> 0.22 ms forward + backward for a
    training batch's query part at `demo` dims, one CPU thread); the same products and sums,
    so the same values."""
    pairs = x.unflatten(-1, (-1, 2))
    if pairs.storage_offset() % 2 or any(stride % 2 for stride in pairs.stride()[:-1]):
        pairs = pairs.contiguous()  # a complex view needs pairs on 8-byte boundaries
    rotation = torch.complex(cos, sin).unsqueeze(2)  # (B or 1, T, 1, R/2)
    return torch.view_as_real(torch.view_as_complex(pairs) * rotation).flatten(-2)
