"""Safetensors tensors read with plain file reads, straight into the memory that keeps them.

Why not memory-map: the pages of a mapped file count in the process's resident memory for
as long as the mapping lives, so loading a model from a mapped shard peaks at the model
plus the whole shard (2.1x a one-file checkpoint). Here a tensor is read with `readinto`
into its destination (the model's parameter slot, when the dtypes agree), or in row chunks
of at most `CHUNK_BYTES` through a small buffer when it must be converted; the kernel's
page cache holds the file's pages (not ours: it may drop them), and `drop_cache` tells it
they will not be read again.

Format (safetensors): 8-byte little-endian header length, a JSON header mapping each name
to {dtype, shape, data_offsets} (offsets relative to the end of the header), then the data.
Not here: checking names and shapes against the model (read.py does that from the headers).
"""
from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import torch

from dsmoe.errors import CheckpointError

DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "F8_E4M3": torch.float8_e4m3fn, "I8": torch.int8, "U8": torch.uint8, "I32": torch.int32,
          "I64": torch.int64, "BOOL": torch.bool}
CHUNK_BYTES = 4 << 20  # the conversion buffer: never more than this beside the model


class TensorFile:
    """One open safetensors file: its header, and reads of whole tensors or of row ranges."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._fd = -1
        self._fd = os.open(self.path, os.O_RDONLY)
        try:
            (n,) = struct.unpack("<Q", os.pread(self._fd, 8, 0))
            header = json.loads(os.pread(self._fd, n, 8))
        except (struct.error, ValueError) as err:
            self.close()
            raise CheckpointError(f"{self.path} is not a readable safetensors file ({err})") from None
        header.pop("__metadata__", None)
        self._data_start = 8 + n
        self.entries = header

    def _entry(self, name: str) -> tuple[torch.dtype, tuple[int, ...], int]:
        e = self.entries[name]
        return DTYPES[e["dtype"]], tuple(e["shape"]), self._data_start + e["data_offsets"][0]

    def read_bytes_into(self, buf: memoryview, offset: int) -> None:
        done = 0
        while done < len(buf):
            n = os.preadv(self._fd, [buf[done:]], offset + done)
            if n <= 0:
                raise CheckpointError(f"{self.path} ends early: it is truncated; download it again")
            done += n

    def read_rows(self, name: str, start: int, stop: int, out: torch.Tensor | None = None) -> torch.Tensor:
        """Rows start:stop of tensor `name` (along its first dim), in the stored dtype."""
        dtype, shape, offset = self._entry(name)
        row_elems = 1
        for s in shape[1:]:
            row_elems *= s
        itemsize = torch.empty((), dtype=dtype).element_size()
        if out is None:
            out = torch.empty((stop - start, *shape[1:]), dtype=dtype)
        if out.numel():
            raw = out.view(-1).view(torch.uint8)  # same bytes, any dtype
            self.read_bytes_into(memoryview(raw.numpy()), offset + start * row_elems * itemsize)
        return out

    def read(self, name: str) -> torch.Tensor:
        shape = self._entry(name)[1]
        if not shape:
            return self.read_rows(name, 0, 1, torch.empty(1, dtype=self._entry(name)[0])).view(())
        return self.read_rows(name, 0, shape[0])

    def read_into(self, name: str, out: torch.Tensor) -> None:
        """Copy tensor `name` into `out` (any dtype/device): straight into `out`'s memory when
        it is a contiguous CPU tensor of the stored dtype, else through row chunks."""
        dtype, shape, _ = self._entry(name)
        if tuple(out.shape) != shape:
            raise CheckpointError(f"{self.path.name}: {name} has shape {list(shape)}, expected {list(out.shape)}")
        if not shape:
            out.copy_(self.read(name))
            return
        if out.dtype == dtype and out.device.type == "cpu" and out.is_contiguous():
            self.read_rows(name, 0, shape[0], out)
            return
        for start, stop in row_chunks(shape, torch.empty((), dtype=dtype).element_size()):
            out[start:stop].copy_(self.read_rows(name, start, stop))

    def drop_cache(self) -> None:
        """Tell the kernel this file's pages will not be read again (frees page cache)."""
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(self._fd, 0, 0, os.POSIX_FADV_DONTNEED)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __del__(self):  # a reader dropped without close() must not leak its descriptor
        self.close()


def row_chunks(shape: tuple[int, ...], itemsize: int, limit: int = CHUNK_BYTES, multiple: int = 1):
    """(start, stop) row ranges of at most `limit` bytes each (at least `multiple` rows, and
    a multiple of it, so FP8 blocks of rows stay whole)."""
    row_bytes = itemsize
    for s in shape[1:]:
        row_bytes *= s
    step = max(multiple, (limit // max(row_bytes, 1)) // multiple * multiple)
    return [(i, min(i + step, shape[0])) for i in range(0, shape[0], step)]
