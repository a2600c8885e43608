"""FP8 block-quantised weights, as DeepSeek-V3 checkpoints ship them (V3 report §3.3).

A quantised linear weight W (out, in) is stored as `float8_e4m3fn` values q plus a float32
tensor `weight_scale_inv` with one scale per 128x128 block (the block size comes from
`quantization_config.weight_block_size`): W = q * scale_inv[block]. The last block of a row
or column may be partial (V3's kv_a_proj_with_mqa is 576 x 7168: its scales are 5 x 56, the
last row of blocks 64 rows high), so scales are expanded and cut to the weight's own shape.

Notable:
- `dequantize` works one row of blocks at a time and writes straight into `out` (the
  model's parameter slot when loading), so a 18432x7168 weight never exists as a second
  full fp32 copy; it runs on CPU whatever the slot's device.
- `quantize` is the inverse used to make FP8 checkpoints (tests, experiments): the scale of a
  block is amax / 448, the largest finite e4m3 value, as DeepSeek's `weight_quant` does.
Not here: FP8 matmuls or activation quantisation. dsmoe computes in bf16/fp32; FP8 is a
storage format it reads (and `dsmoe convert` turns into bf16/fp32).
"""
from __future__ import annotations

import torch

E4M3_MAX = 448.0  # torch.finfo(torch.float8_e4m3fn).max
DEFAULT_BLOCK = (128, 128)


def scale_shape(shape: tuple[int, int], block: tuple[int, int] = DEFAULT_BLOCK) -> tuple[int, int]:
    """Shape of `weight_scale_inv` for a weight of `shape`: one scale per (partial) block."""
    return (-(-shape[0] // block[0]), -(-shape[1] // block[1]))


def dequantize(weight_OI: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int] = DEFAULT_BLOCK,
               out: torch.Tensor | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """q * scale_inv, block by block, into `out` (allocated in `dtype` when not given)."""
    O, I = weight_OI.shape
    bo, bi = block
    if tuple(scale_inv.shape) != scale_shape((O, I), block):
        raise ValueError(f"scale_inv of shape {tuple(scale_inv.shape)} does not fit a {O}x{I} "
                         f"weight in {bo}x{bi} blocks (expected {scale_shape((O, I), block)})")
    if out is None:
        out = torch.empty(O, I, dtype=dtype)
    scale_inv = scale_inv.float().cpu()
    for r in range(scale_inv.shape[0]):  # one row of blocks: at most bo x I in fp32 at a time
        rows = slice(r * bo, min((r + 1) * bo, O))
        scale_I = scale_inv[r].repeat_interleave(bi)[:I]
        out[rows].copy_(weight_OI[rows].float() * scale_I)
    return out


def quantize(weight_OI: torch.Tensor, block: tuple[int, int] = DEFAULT_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """(q in float8_e4m3fn, scale_inv in float32) with one scale per (partial) block."""
    O, I = weight_OI.shape
    bo, bi = block
    nO, nI = scale_shape((O, I), block)
    padded = torch.zeros(nO * bo, nI * bi, dtype=torch.float32)
    padded[:O, :I] = weight_OI.float()
    blocks = padded.view(nO, bo, nI, bi)
    amax = blocks.abs().amax(dim=(1, 3))  # (nO, nI)
    scale_inv = (amax / E4M3_MAX).clamp(min=torch.finfo(torch.float32).tiny)
    q = (blocks / scale_inv[:, None, :, None]).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    return q.view(nO * bo, nI * bi)[:O, :I].contiguous(), scale_inv
