"""Native CPU kernels for few-row inference (`few_rows.c`), compiled on first use.

What: `linear` (y = x Wᵀ for 1-8 rows, W fp32 or int8 with per-row bf16 scales) and
`experts` (the routed experts of a few tokens, each chosen expert run once over the tokens
that chose it). The model's few-row paths (`dsmoe/model/fastpath.py`, `quant.py`) call them
on a CPU when they are available and fall back to torch otherwise.

Why: a decode step on a CPU is bound by reading the active weights once, and its matrices
are small. Measured on one thread of this project's 2-core AMD EPYC (AVX-512), weights
cycled through 128 MB so each call reads them from memory, median of 5 rounds:

| W (out x in)  | F.linear (MKL) | x @ Wᵀ copy | few_rows f32 | few_rows int8 | _weight_int8pack_mm |
|---------------|---------------:|------------:|-------------:|--------------:|--------------------:|
| 8192 x 384    | 1,477 us       | 674 us      | 609 us       | 226 us        | 287 us              |
| 352 x 384     | 70 us          | 76 us       | 33 us        | 16 us         | 21 us               |
| 384 x 768     | 129 us         | 162 us      | 80 us        | 34 us         | 58 us               |

so no transposed copy of a tall weight is needed, and int8 needs no bf16 activations.

How it is built: `cc -O3 -march=native -shared` on first use, into
`~/.cache/dsmoe/kernels/` (`$DSMOE_KERNEL_CACHE` to move it) under a name keyed by the
source, the compiler and the CPU's flags, so a later process loads it in milliseconds
(compiling takes about a second). Loaded with ctypes, which releases the GIL during a call.
Without a C compiler (or with `DSMOE_NATIVE_KERNELS=0`) `available()` is False, one line
says so, and every caller takes its torch path: same results up to float summation order.
Not here: CUDA (the GPU paths are torch's), threads, many rows (BLAS wins there).
"""
from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("few_rows.c")
CACHE_ENV, SWITCH_ENV = "DSMOE_KERNEL_CACHE", "DSMOE_NATIVE_KERNELS"
MAX_ROWS = 8  # the kernels' row block (few_rows.c MAX_ROWS); more rows are taken 8 at a time
KIND_F32, KIND_INT8 = 0, 1

_lib: ctypes.CDLL | None = None
_tried = False
_enabled = True


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "dsmoe" / "kernels")


def _cpu_flags() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    return platform.processor() or platform.machine()


def _compile(cc: str, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        built = Path(tmp) / out.name
        errors = ""
        for arch in (["-march=native"], []):  # some compilers (older ARM gcc) lack -march=native
            cmd = [cc, "-O3", *arch, "-shared", "-fPIC", str(SOURCE), "-o", str(built), "-lm"]
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode == 0:
                os.replace(built, out)  # atomic: a concurrent process sees all of it or nothing
                return
            errors = done.stderr.strip()[-500:]
        raise OSError(errors)


def _load() -> ctypes.CDLL | None:
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if cc is None:
        warnings.warn("dsmoe: no C compiler found; few-row CPU inference uses torch's kernels "
                      "(install gcc or clang for faster decoding)", stacklevel=3)
        return None
    version = subprocess.run([cc, "--version"], capture_output=True, text=True).stdout
    key = hashlib.sha256(b"\0".join([SOURCE.read_bytes(), version.encode(), _cpu_flags().encode()])).hexdigest()[:16]
    path = cache_dir() / f"few_rows-{key}.so"
    try:
        if not path.exists():
            _compile(cc, path)
        lib = ctypes.CDLL(str(path))
    except OSError as e:
        warnings.warn(f"dsmoe: could not build the native kernels ({e}); few-row CPU inference "
                      f"uses torch's kernels", stacklevel=3)
        return None
    p, i64, c_int = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    lib.dsmoe_linear.argtypes = [p, i64, i64, p, p, c_int, i64, i64, p, i64]
    lib.dsmoe_linear.restype = None
    lib.dsmoe_experts.argtypes = [p, i64, i64, p, p, i64, p, p, p, p, p, p, c_int, i64, i64, p]
    lib.dsmoe_experts.restype = c_int
    return lib


def available() -> bool:
    """Whether the native kernels can be used (built or loaded on the first call)."""
    global _lib, _tried
    if not _tried:
        _tried = True
        _lib = None if os.environ.get(SWITCH_ENV, "1") == "0" else _load()
    return _enabled and _lib is not None


@contextlib.contextmanager
def disabled():
    """Run the torch fallbacks only (what the tests compare the kernels with)."""
    global _enabled
    before, _enabled = _enabled, False
    try:
        yield
    finally:
        _enabled = before


def supports(x: torch.Tensor, *weights: torch.Tensor) -> bool:
    """Whether `x` and `weights` are what the kernels take: CPU, fp32 activations, fp32 or
    int8 contiguous weights (checked per call; cheap attribute reads)."""
    return (x.device.type == "cpu" and x.dtype == torch.float32 and available()
            and all(w.device.type == "cpu" and w.dtype in (torch.float32, torch.int8) and w.is_contiguous()
                    for w in weights))


def _rows(x: torch.Tensor) -> torch.Tensor:
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def linear(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
    """x Wᵀ (times `scale` per output when W is int8) over x's last dimension."""
    x2 = _rows(x)
    N, K = w.shape
    y = torch.empty(x2.shape[0], N)
    kind = KIND_INT8 if w.dtype == torch.int8 else KIND_F32
    _lib.dsmoe_linear(x2.data_ptr(), x2.stride(0), x2.shape[0], w.data_ptr(),
                      scale.data_ptr() if scale is not None else None, kind, N, K, y.data_ptr(), N)
    return y.view(*x.shape[:-1], N)


def experts(x_TD: torch.Tensor, ids_TK: torch.Tensor, weights_TK: torch.Tensor,
            w1_EFD: torch.Tensor, w3_EFD: torch.Tensor, w2_EDF: torch.Tensor,
            scales: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """The routed experts' weighted sum for a few tokens (see few_rows.c `dsmoe_experts`);
    `scales` (per-row bf16 of w1, w3, w2) when the expert weights are int8."""
    x = x_TD.contiguous()
    ids = ids_TK.to(torch.int64).contiguous()
    weights = weights_TK.to(torch.float32).contiguous()
    E, F_, D = w1_EFD.shape
    y = torch.empty(x.shape[0], D)
    s1, s3, s2 = (s.data_ptr() for s in scales) if scales is not None else (None, None, None)
    status = _lib.dsmoe_experts(x.data_ptr(), x.shape[0], D, ids.data_ptr(), weights.data_ptr(), ids.shape[1],
                                w1_EFD.data_ptr(), w3_EFD.data_ptr(), w2_EDF.data_ptr(), s1, s3, s2,
                                KIND_INT8 if scales is not None else KIND_F32, E, F_, y.data_ptr())
    if status != 0:
        raise RuntimeError(f"native experts kernel failed (expert ids outside [0, {E}) or out of memory)")
    return y
