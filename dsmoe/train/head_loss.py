"""The output head and next-token cross-entropy in one pass: `head_cross_entropy`.

What: mean CE of `x @ weightᵀ` against the targets, the same function as
`F.cross_entropy(F.linear(x, weight), target)`, computed a block of rows at a time: each
block's logits (rows x vocab, about 2 MB) go through one fused softmax, whose output is
turned in place into the gradient of the CE (softmax minus one-hot) and multiplied straight
into the gradients of x and of the weight, all in the forward pass; the backward only
scales them. The loss of a row is -log(softmax at its target); a block where that
probability underflows fp32 takes the log-sum-exp form instead, so the loss stays exact.
Why: the full logits of a training batch (tokens x vocab: 8 MB for the `demo` preset, main
head and MTP head each) never exist, so they never go through memory four times (write,
log-softmax, its backward, the zero-filled gradient of the gather), and the softmax pass
is the gradient. Same matmuls, same FLOPs. Measured on one CPU thread, 1024 x 128 by a
2048-token vocabulary, forward + backward, median of 9 x 5 side by side: 22.5 ms against
27.4 ms for linear + `F.cross_entropy` (the matmuls alone: about 17 ms).
Not here: ignore_index, label smoothing or reductions other than the mean (pretraining
needs none of them); mixed precision (under autocast or for other dtypes the function is
linear + `F.cross_entropy`, `fuses_head`); a second derivative.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

# Logits one block holds (rows x vocab): 2 MB in fp32 at the `demo` vocabulary, at least
# MIN_ROWS rows, below which the matmuls lose more than the smaller block saves. Measured,
# one thread, forward + backward against linear + `F.cross_entropy`: 1024 x 128 by 2048
# tokens, 256 rows 22.6-24.5 ms against 31.6; 512 x 384 by 8192 (`small`), 64 rows 156 ms,
# 128 rows 134, 256 rows 122.5, 512 rows 126, against 132.
BLOCK_LOGITS = 1 << 19
MIN_ROWS = 256


def fuses_head(x: torch.Tensor) -> bool:
    """Whether `head_cross_entropy` runs the fused blocks for x (fp32, no autocast)."""
    return x.dtype == torch.float32 and not torch.is_autocast_enabled(x.device.type)


def head_cross_entropy(x_ND: torch.Tensor, weight_VD: torch.Tensor, target_N: torch.Tensor) -> torch.Tensor:
    """Mean over rows of CE(x_ND @ weight_VDᵀ, target_N): a scalar."""
    if not fuses_head(x_ND):
        return F.cross_entropy(F.linear(x_ND, weight_VD).float(), target_N)
    grads = torch.is_grad_enabled() and (x_ND.requires_grad or weight_VD.requires_grad)
    return _HeadCrossEntropy.apply(x_ND, weight_VD, target_N, grads)


class _HeadCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_ND, weight_VD, target_N, grads: bool):  # noqa: D102
        N, V = x_ND.shape[0], weight_VD.shape[0]
        rows = max(MIN_ROWS, BLOCK_LOGITS // V)
        total = x_ND.new_zeros(())
        grad_x_ND = torch.empty_like(x_ND) if grads else None
        grad_w_VD = (torch.empty_like if N else torch.zeros_like)(weight_VD) if grads else None
        # Two block buffers for every block (fresh ones each block cost page faults).
        logits_buf = x_ND.new_empty(min(rows, N), V)
        probs_buf = torch.empty_like(logits_buf)
        for r0 in range(0, N, rows):
            r1 = min(N, r0 + rows)
            x_RD, target_R1 = x_ND[r0:r1], target_N[r0:r1, None]
            logits_RV = torch.mm(x_RD, weight_VD.t(), out=logits_buf[:r1 - r0])
            # one fused pass (its own backward is never needed)
            probs_RV = torch.ops.aten._softmax.out(logits_RV, -1, False, out=probs_buf[:r1 - r0])
            picked_R1 = probs_RV.gather(1, target_R1)
            if bool((picked_R1 > 0).all()):
                total -= picked_R1.log().sum()
            else:  # a target's probability below fp32's range: the log-sum-exp form
                total += (torch.logsumexp(logits_RV, -1, keepdim=True) - logits_RV.gather(1, target_R1)).sum()
            if grads:  # d CE_row / d logits = softmax - one-hot
                grad_RV = probs_RV.scatter_(1, target_R1, picked_R1 - 1)
                torch.mm(grad_RV, weight_VD, out=grad_x_ND[r0:r1])
                if r0 == 0:  # the first block writes the weight's gradient, later ones add to it
                    torch.mm(grad_RV.t(), x_RD, out=grad_w_VD)
                else:
                    grad_w_VD.addmm_(grad_RV.t(), x_RD)
        if grads:
            ctx.save_for_backward(grad_x_ND, grad_w_VD)
        ctx.n_rows = N
        return total / N

    @staticmethod
    def backward(ctx, grad_loss):  # noqa: D102
        grad_x_ND, grad_w_VD = ctx.saved_tensors
        scale = grad_loss / ctx.n_rows
        return grad_x_ND * scale, grad_w_VD * scale, None, None
