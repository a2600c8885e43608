"""A model's weights moved into 2 MB pages (Linux transparent huge pages), for CPU decoding.

What: `pack_weights(model)` copies every parameter and buffer, one tensor at a time, into
one anonymous memory map advised `MADV_HUGEPAGE` and 2 MB aligned, and points the
tensors at it (`tensor.data = view`): same values, same dtypes, same modules; training,
`state_dict` and `load_state_dict` work on it as before.
Why: a decode step streams every active weight once (44 MB a token at `small` dims).
In 4 KB pages that is ~11,000 pages a token, more than the TLB holds, and the hardware
prefetchers stop at every page boundary. Measured on this project's 2-core EPYC (one
thread, `small`, a decode step in the native kernels, median of 5 x 100 steps): 3.00 ->
2.36 ms and 3.39 -> 2.19 ms in two runs (1.27x and 1.55x). The machine's THP setting was
`madvise`, so the advice is what makes the kernel use huge pages; under `never` the map
is ordinary memory and nothing changes but the copy.
Peak memory while packing: the model plus its largest tensor (each old tensor is freed as
soon as its copy is made). Not here: CUDA tensors (left where they are), tensors that
share storage with another (left alone, so ties stay ties), other operating systems (a
no-op that says so by returning False).
"""
from __future__ import annotations

import mmap
import os

import torch
from torch import nn

HUGE_PAGE = 2 << 20
ALIGN = 64  # each tensor starts on a cache line
SWITCH_ENV = "DSMOE_HUGE_PAGES"  # 0: leave the weights where they are


def _packable(model: nn.Module) -> list[torch.Tensor]:
    tensors, seen = {}, {}
    for t in list(model.parameters()) + list(model.buffers()):
        if (type(t.data) is not torch.Tensor  # a sharded (DTensor) or other subclass: its own storage rules
                or t.device.type != "cpu" or t.is_meta or not t.is_contiguous() or t.numel() == 0):
            continue
        tensors[id(t)] = t
    for t in tensors.values():
        seen[t.data_ptr()] = seen.get(t.data_ptr(), 0) + 1
    # memory under two tensors (a tie through two modules) stays where it is: moving one
    # would untie them
    return [t for t in tensors.values() if seen[t.data_ptr()] == 1]


def pack_weights(model: nn.Module) -> bool:
    """Move the model's CPU weights into huge-page-advised memory; True when done (or
    already done), False where it does not apply (not Linux, switched off, nothing to move)."""
    if not hasattr(mmap, "MADV_HUGEPAGE") or os.environ.get(SWITCH_ENV, "1") == "0":
        return False
    tensors = _packable(model)
    if not tensors:
        return False
    if is_packed(model, tensors):
        return True
    sizes = [(t.numel() * t.element_size() + ALIGN - 1) // ALIGN * ALIGN for t in tensors]
    region = mmap.mmap(-1, sum(sizes) + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    region.madvise(mmap.MADV_HUGEPAGE)
    raw = torch.frombuffer(region, dtype=torch.uint8)
    offset = (-raw.data_ptr()) % HUGE_PAGE
    base = raw.data_ptr() + offset
    with torch.no_grad():
        for t, size in zip(tensors, sizes):
            n = t.numel() * t.element_size()
            view = raw[offset:offset + n].view(t.dtype).view(t.shape)
            view.copy_(t)
            t.data = view
            offset += size
    # the views keep the map alive (torch.frombuffer holds it); the model keeps where it is
    model._huge_pages = (base, raw.data_ptr() + raw.numel())
    return True


def is_packed(model: nn.Module, tensors: list[torch.Tensor] | None = None) -> bool:
    """Whether every movable weight of `model` lies in its huge-page map (a deep copy's
    weights do not: they were copied to ordinary memory)."""
    span = getattr(model, "_huge_pages", None)
    tensors = _packable(model) if tensors is None else tensors
    return span is not None and all(span[0] <= t.data_ptr() < span[1] for t in tensors)
