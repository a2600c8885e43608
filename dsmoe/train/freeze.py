"""Freezing part of a model: whole tensors, or some experts' rows of the stacked ones.

Routed experts are stored stacked (`w1_EFD`, `w3_EFD`, `w2_EDF`: one row per expert) and the
gate's weight and bias have one row per expert too, so "train only these experts" (ESFT)
or "keep the old experts as they were" (expansion) freezes *rows* of a tensor, which
`requires_grad` cannot express. `RowFreeze` does it in two explicit steps of the loop:
- `zero_grads()` after backward: frozen rows get a zero gradient, so they add nothing to the
  gradient norm that clipping sees;
- `restore()` after the optimizer step (and after the balancer moved the gate biases):
  frozen rows are copied back from a snapshot taken at the start. A zero gradient alone
  is not enough: AdamW's decoupled weight decay shrinks every row of a tensor it steps,
  and momentum left from earlier steps would keep moving a row that stopped receiving
  gradients. Copying back is exact whatever the optimizer does.
Tensors that train not at all are frozen with `requires_grad_(False)` before the optimizer
is built (`freeze_all_but`), so the optimizer holds no state for them.
Not here: choosing what to freeze (esft.py, expand.py).
"""
from __future__ import annotations

import torch
from torch import nn


def freeze_all_but(model: nn.Module, trainable: set[str]) -> None:
    """requires_grad only for the named parameters (names as in `named_parameters`)."""
    names = dict(model.named_parameters())
    unknown = sorted(trainable - set(names))
    if unknown:
        raise KeyError(f"no such parameters: {unknown}")
    for name, param in names.items():
        param.requires_grad_(name in trainable)


def count_trainable(model: nn.Module, freeze: "RowFreeze | None" = None) -> tuple[int, int]:
    """(trainable parameters, all parameters): frozen rows of a RowFreeze do not count."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if freeze is not None:
        trainable -= freeze.frozen_numel(param_only=True)
    return trainable, total


class RowFreeze:
    """Keep the chosen rows (dim 0) of some tensors exactly as they are now."""

    def __init__(self):
        self.entries: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def add(self, tensor: torch.Tensor, frozen_rows: torch.Tensor) -> None:
        """Freeze `tensor[frozen_rows]` (a bool mask over dim 0, or row indices)."""
        rows = torch.as_tensor(frozen_rows, device=tensor.device)
        if rows.dtype == torch.bool:
            if rows.shape != tensor.shape[:1]:
                raise ValueError(f"row mask of shape {tuple(rows.shape)} for a tensor with "
                                 f"{tensor.shape[0]} rows")
            rows = rows.nonzero().flatten()
        if rows.numel():
            self.entries.append((tensor, rows, tensor.detach()[rows].clone()))

    @torch.no_grad()
    def zero_grads(self) -> None:
        for tensor, rows, _ in self.entries:
            if tensor.grad is not None:
                tensor.grad[rows] = 0

    @torch.no_grad()
    def restore(self) -> None:
        for tensor, rows, saved in self.entries:
            tensor[rows] = saved

    def frozen_numel(self, param_only: bool = False) -> int:
        return sum(saved.numel() for tensor, _, saved in self.entries
                   if not param_only or (isinstance(tensor, nn.Parameter) and tensor.requires_grad))
