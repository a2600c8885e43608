"""Weight-only int8: linear, embedding and routed-expert weights as int8 with one scale per
output row (per channel), for inference on little memory (`--quantize int8`).

A weight W (O, I) is stored as q = round(W / s) in int8 (-127..127) with s = amax(|W_o|)/127
per row o, in bf16; q is computed against the bf16-rounded scale, so q * s is the stored
weight exactly and the only error is q's rounding (at most s/2 per element).

Notable:
- Dequantised inside the matmul, never as a copy of the model: with up to 8 rows (decode)
  on a CPU, the native kernel (`dsmoe/kernels`) reads the int8 weight directly with fp32
  activations (about 6x an fp32 BLAS matvec at batch 1, which is memory-bound; without a C
  compiler, `torch._weight_int8pack_mm` with bf16 activations, up to 16 rows); with many rows
  (prefill) or on CUDA, one layer's weight is converted to the activation dtype for its
  matmul and dropped, then the output scaled by s.
- `quantize_modules` swaps modules of a model on the meta device, before any storage
  exists; the loader (`dsmoe/interop/hf/read.py`) then quantises each checkpoint tensor a
  few rows at a time as it reads it (FP8 blocks dequantised a row of blocks at a time on
  the way), into the `<name>_q` / `<name>_scale` buffers: the fp32 model never exists.
- Kept in full precision: norms and the router (`Gate`: routing decisions are sensitive and
  the weight is small). MLA's `wkv_b` is int8 like the other projections: the native decode
  kernel folds its row scales into the absorbed attention, and the torch absorbed path
  (`mla.dense_weight`) dequantises it for the call.
Not here: activation quantisation, int4, training with quantised weights.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dsmoe import kernels
from dsmoe.errors import ConfigError
from dsmoe.model.moe import RoutedExperts
from dsmoe.model.sparse_experts import SparseExperts

QUANTIZE_MODES = ("int8",)
SCALE_DTYPE = torch.bfloat16  # what the int8 kernel takes
# Up to this many rows the int8 kernel reads the weight directly; beyond, converting the
# weight once for the whole matmul is faster (measured on 2 CPU threads, 4096 x 1024:
# kernel 0.8 ms at 1 row, 3.7 ms at 8, 13.7 ms at 32 against 10 ms converted).
KERNEL_MAX_ROWS = 16
# torch's int8 kernel reads the inner dimension 16 at a time with no tail: an inner size that
# is not a multiple of 16 (an expert of width 72) crashes the process (torch 2.13, CPU).
PACK_MM_INNER_MULTIPLE = 16


def check_mode(mode: str | None) -> str | None:
    if mode in (None, "", "none"):
        return None
    if mode not in QUANTIZE_MODES:
        raise ConfigError(f"--quantize {mode!r}: choose one of {QUANTIZE_MODES} (or leave it out)")
    return mode


def quantize_rows(w_RI: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(q int8 (R, I), scale bf16 (R,)) with w ≈ q * scale[:, None]."""
    w = w_RI.float()
    scale = (w.abs().amax(-1) / 127).clamp(min=torch.finfo(torch.float32).tiny).to(SCALE_DTYPE)
    q = (w / scale.float().unsqueeze(-1)).round_().clamp_(-127, 127).to(torch.int8)
    return q, scale


def int8_linear(x: torch.Tensor, q_OI: torch.Tensor, scale_O: torch.Tensor) -> torch.Tensor:
    """x Wᵀ for W = q * scale, without a full-precision copy of W beyond this one matmul."""
    lead, I = x.shape[:-1], x.shape[-1]
    x_RI = x.reshape(-1, I)
    if x_RI.shape[0] <= kernels.MAX_ROWS and kernels.supports(x_RI, q_OI):
        return kernels.linear(x_RI, q_OI, scale_O).view(*lead, q_OI.shape[0])
    if x.device.type == "cpu" and x_RI.shape[0] <= KERNEL_MAX_ROWS and I % PACK_MM_INNER_MULTIPLE == 0:
        y = torch._weight_int8pack_mm(x_RI.to(SCALE_DTYPE).contiguous(), q_OI, scale_O).to(x.dtype)
    else:
        y = F.linear(x_RI, q_OI.to(x.dtype)) * scale_O.to(x.dtype)
    return y.view(*lead, q_OI.shape[0])


class Int8Weight:
    """One weight matrix as (q, scale) views; `linear(x)` is x Wᵀ."""

    def __init__(self, q: torch.Tensor, scale: torch.Tensor):
        self.q, self.scale = q, scale

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        return int8_linear(x, self.q, self.scale)

    @property
    def nbytes(self) -> int:
        return self.q.nbytes + self.scale.nbytes


class Int8Linear(nn.Module):
    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight_q", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("weight_scale", torch.zeros(out_features, dtype=SCALE_DTYPE))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return int8_linear(x, self.weight_q, self.weight_scale)


class Int8Embedding(nn.Module):
    def __init__(self, num_embeddings: int, dim: int, dtype: torch.dtype):
        super().__init__()
        self.out_dtype = dtype
        self.register_buffer("weight_q", torch.zeros(num_embeddings, dim, dtype=torch.int8))
        self.register_buffer("weight_scale", torch.zeros(num_embeddings, dtype=SCALE_DTYPE))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.weight_q[ids].to(self.out_dtype) * self.weight_scale[ids].unsqueeze(-1).to(self.out_dtype)


class Int8Experts(SparseExperts):
    """Routed experts as int8 stacks (E, F, D) / (E, D, F) with per-row scales."""

    def __init__(self, n_experts: int, dim: int, inter_dim: int):
        super().__init__(n_experts)
        E, F_, D = n_experts, inter_dim, dim
        for name, rows, cols in (("w1_EFD", F_, D), ("w3_EFD", F_, D), ("w2_EDF", D, F_)):
            self.register_buffer(name + "_q", torch.zeros(E, rows, cols, dtype=torch.int8))
            self.register_buffer(name + "_scale", torch.zeros(E, rows, dtype=SCALE_DTYPE))

    def expert(self, e: int) -> tuple[Int8Weight, Int8Weight, Int8Weight]:
        return tuple(Int8Weight(getattr(self, n + "_q")[e], getattr(self, n + "_scale")[e])
                     for n in ("w1_EFD", "w3_EFD", "w2_EDF"))

    def native_weights(self):
        """((q1, q3, q2), (s1, s3, s2)) for the native kernels (`dsmoe/kernels`)."""
        names = ("w1_EFD", "w3_EFD", "w2_EDF")
        return tuple(getattr(self, n + "_q") for n in names), tuple(getattr(self, n + "_scale") for n in names)


def quantize_modules(model: nn.Module, mode: str = "int8") -> nn.Module:
    """Swap the model's linear, embedding and routed-expert modules for int8 ones, in place.
    On the meta device (what the loader does) only the modules change; on a real model each
    weight is quantised into its new module (the full-precision one is then dropped)."""
    check_mode(mode)
    for name, module in list(model.named_modules()):
        parent_name, _, child = name.rpartition(".")
        if not name or not hasattr(module, "weight") and not isinstance(module, RoutedExperts):
            continue
        with torch.device(_device(module)):
            if isinstance(module, nn.Linear):
                new = Int8Linear(module.in_features, module.out_features)
                sources = {"weight": module.weight}
            elif isinstance(module, nn.Embedding):
                new = Int8Embedding(module.num_embeddings, module.embedding_dim, module.weight.dtype)
                sources = {"weight": module.weight}
            elif isinstance(module, RoutedExperts):
                E, F_, D = module.w1_EFD.shape
                new = Int8Experts(E, D, F_)
                sources = {n: getattr(module, n) for n in ("w1_EFD", "w3_EFD", "w2_EDF")}
            else:
                continue
        for key, w in sources.items():
            if not w.is_meta:
                q, scale = quantize_rows(w.detach())
                getattr(new, key + "_q").copy_(q)
                getattr(new, key + "_scale").copy_(scale)
        setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
    return model


def _device(module: nn.Module) -> torch.device:
    t = next(module.parameters(recurse=False), None)
    return t.device if t is not None else torch.device("cpu")


def weight_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and buffer (the model's resident weights)."""
    tensors = {id(t): t for t in list(model.parameters()) + list(model.buffers())}
    return sum(t.numel() * t.element_size() for t in tensors.values())
