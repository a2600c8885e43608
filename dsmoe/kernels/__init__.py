"""Native CPU kernels for few-row inference (`few_rows.c`), compiled on first use.

What (`ops.py`): `linear` (y = x Wᵀ for 1-8 rows, W fp32 or int8 with per-row bf16
scales), `experts` (the routed experts of a few tokens, each chosen expert run once over
the tokens that chose it), `block_decode` / `stack_decode` (a whole Transformer block, or
the whole stack, for a few new tokens over the latent cache: norms, MLA, the dense or MoE
feed-forward, residuals) and `step_decode` (embedding, stack, final norm and head: a decode
step). The model's few-row paths (`dsmoe/model/fastpath.py`, `native_block.py`,
`native_step.py`, `quant.py`) call them on a CPU when they are available and fall back to
torch otherwise.

Why: a decode step on a CPU is bound by reading the active weights once, and its matrices
are small. Measured on one thread of this project's 2-core AMD EPYC (AVX-512), weights
cycled through 128 MB so each call reads them from memory, median of 5 rounds:

| W (out x in)  | F.linear (MKL) | x @ Wᵀ copy | few_rows f32 | few_rows int8 | _weight_int8pack_mm |
|---------------|---------------:|------------:|-------------:|--------------:|--------------------:|
| 8192 x 384    | 1,477 us       | 674 us      | 609 us       | 226 us        | 287 us              |
| 352 x 384     | 70 us          | 76 us       | 33 us        | 16 us         | 21 us               |
| 384 x 768     | 129 us         | 162 us      | 80 us        | 34 us         | 58 us               |

so no transposed copy of a tall weight is needed, and int8 needs no bf16 activations.

Built on first use with the machine's C compiler and loaded with ctypes (`build.py`;
ctypes releases the GIL during a call). Without a C compiler (or with
`DSMOE_NATIVE_KERNELS=0`) `available()` is False, one line says so, and every caller
takes its torch path: the same results up to float summation order.
Not here: CUDA (the GPU paths are torch's), threads, many rows (BLAS wins there).
"""
from dsmoe.kernels.build import CACHE_ENV, SWITCH_ENV, cache_dir, disabled  # noqa: E402,F401
from dsmoe.kernels.ops import (KIND_F32, KIND_INT8, MAX_ROWS, MTP, Block, Weight, available,  # noqa: E402,F401
                               block_decode, block_table, experts, experts_by_id, linear, mtp_decode, spec_greedy,
                               stack_decode, step_decode, supports, takes_linears, weight_from, weight_of)
