"""Few-row inference on a CPU: weight layouts derived from the parameters, and the routed
experts used in place (the batch-1 decode step and the 2-position speculative verify).

Measured on one CPU thread at `small` dims (docs/inference.md, "Decode speed"): at one or
two rows, per-call overhead and the matrix-vector kernels' layout matter more than bytes:
- `F.linear(x, W)` with a tall W (out >= 2 x in) takes a slow kernel at M <= 2: the output
  head (8192 x 384) 1,070 us against 315 us for `x @ Wt` with `Wt = W.T.contiguous()`
  (3,040 against 575 us at M = 2; even at M = 4), the dense layer's w1|w3 115 against 57 us.
  Wide matrices are faster as they are. So tall weights get a transposed copy (`Derived`);
- the routed experts: the ragged grouped matmul loops over every expert, also the empty
  ones (510 us per layer at batch 1); `F.linear` on each chosen expert's weights as views,
  with the routing on the host once per layer (`ids.tolist()`), takes 184 us. Fusing w1|w3
  per expert saves 4% more and would copy two thirds of every expert's weights: not done.

`Derived` holds tensors computed from parameters (a transposed head, a fused w1|w3) and
rebuilds one whenever a source parameter changed: its key is each source's identity, storage address,
version counter (bumped by every in-place write: optimizer steps, `load_state_dict`,
`copy_`), dtype and device. Nothing derived is a parameter or a buffer, so state_dicts,
checkpoints and HF round trips are exactly what they were. The copies cost memory (the
head once more): they exist only once a model has decoded on a CPU.

`fast_rows(x, n)` is the one test for "few rows at inference on a CPU, not being traced";
the model's seams call it and fall back to their ordinary path otherwise (training, CUDA,
prefill, `torch.compile`, which traces the ordinary path).
Not here: anything for CUDA (there the grouped kernels need no host sync and no layout help).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dsmoe import kernels
from dsmoe.switch import Switch

# Rows up to which the torch layouts here pay (measured: the head's transposed layout wins at
# M <= 2 and ties at M = 4; the chosen-expert views lose to the ragged path at batch 8). The
# native kernels (`dsmoe/kernels`) read each weight once per 8 rows and beat BLAS up to 8.
FAST_MAX_ROWS = 2


def max_rows() -> int:
    """Rows up to which the few-row paths run: 8 with the native kernels, 2 without."""
    return kernels.MAX_ROWS if kernels.available() else FAST_MAX_ROWS


_switch = Switch()


def disabled():
    """A context in which only the ordinary paths run (the reference tests and benchmarks
    compare with)."""
    return _switch.off()


def enabled() -> bool:
    return _switch.on


def fast_rows(x: torch.Tensor, n_rows: int) -> bool:
    """Whether a call over `n_rows` rows of `x` takes the few-row CPU inference path."""
    # Tracing first: a traced call must not guard on its (dynamic) row count.
    return (_switch.on and not torch.compiler.is_compiling() and x.device.type == "cpu"
            and not torch.is_grad_enabled() and n_rows <= max_rows())


def plain_linears(*modules) -> bool:
    """Whether every module is a plain float `nn.Linear` (the few-row paths read `.weight`;
    a weight-only int8 layer from `quant.py` runs its own kernel instead)."""
    return all(type(m) is nn.Linear for m in modules)


class Derived:
    """Inference-only tensors computed from parameters, rebuilt when a source changes."""

    def __init__(self):
        self._store: dict[str, tuple[tuple, tuple, object]] = {}

    def get(self, name: str, build, *sources: torch.Tensor):
        key = tuple((s.data_ptr(), s._version, s.dtype, s.device) for s in sources)
        hit = self._store.get(name)
        # The sources are held with the entry, so a replaced parameter (load_state_dict with
        # assign=True) cannot be mistaken for a new one at the same address.
        if hit is not None and hit[0] == key and all(a is b for a, b in zip(hit[1], sources)):
            return hit[2]
        with torch.no_grad():
            value = build(*sources)
        self._store[name] = (key, sources, value)
        return value

    def clear(self) -> None:
        self._store.clear()

    def __deepcopy__(self, memo):  # a copied model rebuilds its own
        return Derived()


def is_tall(weight: torch.Tensor) -> bool:
    return weight.shape[0] >= 2 * weight.shape[1]


def _stacked(*weights: torch.Tensor) -> torch.Tensor:
    """The rows of `weights` as one matrix (for weights that read the same input)."""
    return torch.cat(weights, 0)


def _layout(*weights: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """The rows of `weights` stacked, transposed when tall (the torch few-row layout)."""
    w = weights[0] if len(weights) == 1 else _stacked(*weights)
    return (w.t().contiguous(), True) if is_tall(w) else (w, False)


def linear_few_rows(x: torch.Tensor, weights: tuple[torch.Tensor, ...], derived: Derived, name: str) -> torch.Tensor:
    """F.linear(x, cat(weights)) for few rows: one call over weights that read the same x,
    tall ones through their transposed copy (built once per weight version, from the
    parameters themselves, so no derived tensor is ever keyed on another derived one)."""
    if kernels.supports(x, *weights):  # the weight as it is (concatenated if several): no transpose
        w = weights[0] if len(weights) == 1 else derived.get(name + "|native", _stacked, *weights)
        return kernels.linear(x, w)
    w, transposed = derived.get(name, _layout, *weights)
    return x @ w.to(x.dtype) if transposed else F.linear(x, w.to(x.dtype))


def swiglu_few_rows(x: torch.Tensor, w1: torch.Tensor, w3: torch.Tensor, w2: torch.Tensor,
                    derived: Derived) -> torch.Tensor:
    """w2(silu(w1 x) * w3 x) with w1|w3 as one matrix (transposed when tall): one call."""
    gate, up = linear_few_rows(x, (w1, w3), derived, "w13").chunk(2, dim=-1)
    return linear_few_rows(F.silu(gate) * up, (w2,), derived, "w2")


def chosen_expert_views(x_TD: torch.Tensor, ids_TK: torch.Tensor, weights_TK: torch.Tensor,
                        w1_EFD: torch.Tensor, w3_EFD: torch.Tensor, w2_EDF: torch.Tensor,
                        derived: Derived | None = None) -> torch.Tensor:
    """The routed experts for a few tokens: each chosen expert's weights used in place (views,
    no gather, no copy), the routing read on the host once; the weighted sum accumulates in
    place (`addmv_` with the routing weight as alpha: scale and add in one call). With
    `derived`, the per-expert views are made once (`unbind`) rather than selected per call.
    Inference only: the routing weights are read as numbers, so the gate gets no gradient."""
    if kernels.supports(x_TD, w1_EFD, w3_EFD, w2_EDF):
        return kernels.experts(x_TD, ids_TK, weights_TK, w1_EFD, w3_EFD, w2_EDF)
    dtype = x_TD.dtype
    if derived is not None and all(w.dtype == dtype for w in (w1_EFD, w3_EFD, w2_EDF)):
        w1s, w3s, w2s = derived.get("expert_views", lambda a, b, c: (a.unbind(0), b.unbind(0), c.unbind(0)),
                                    w1_EFD, w3_EFD, w2_EDF)
    else:
        w1s, w3s, w2s = (w.to(dtype) for w in (w1_EFD, w3_EFD, w2_EDF))
    y_TD = torch.zeros_like(x_TD)
    for t, (ids, weights) in enumerate(zip(ids_TK.tolist(), weights_TK.tolist())):
        x_D, y_D = x_TD[t], y_TD[t]
        for e, w in zip(ids, weights):
            y_D.addmv_(w2s[e], F.silu(torch.mv(w1s[e], x_D)) * torch.mv(w3s[e], x_D), alpha=w)
    return y_TD

