"""Linear + cross-entropy without the vocabulary logits: the loss of `hidden @ weight.T` against targets.

The logits of all positions ([tokens, vocab] in fp32: 2 GB for 4,096 tokens of a 128k vocabulary, more
again for their gradient) are never materialised. Only positions with a target are projected, a chunk
at a time, and each chunk's gradients (softmax − one-hot, times the weight) are computed right away in
the forward pass, so the backward pass only scales them. The arithmetic is the unfused path's: the
matmul in the weight's dtype, log-softmax in fp32.
"""
from __future__ import annotations

import torch

from .data import IGNORE

CHUNK_BYTES = 1 << 28  # fp32 logits per chunk: 256 MiB


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int):
        want_h, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        acc = torch.promote_types(weight.dtype, torch.float32)  # fp32, or fp64 for fp64 weights
        total = torch.zeros((), dtype=acc, device=hidden.device)
        grad_h = torch.empty_like(hidden) if want_h else None
        grad_w = torch.zeros_like(weight, dtype=torch.promote_types(weight.dtype, torch.float32)) if want_w else None
        for start in range(0, hidden.shape[0], chunk):
            h, t = hidden[start:start + chunk], targets[start:start + chunk]
            logits = (h @ weight.T).to(acc)
            lse = torch.logsumexp(logits, dim=-1)
            total += (lse - logits.gather(1, t[:, None]).squeeze(1)).sum()
            if want_h or want_w:
                g = logits.sub_(lse[:, None]).exp_()  # softmax, in place of the logits
                g[torch.arange(t.numel(), device=t.device), t] -= 1
                g = g.to(weight.dtype)
                if want_h:
                    grad_h[start:start + chunk] = g @ weight
                if want_w:
                    grad_w += (g.T @ h).to(grad_w.dtype)
        ctx.save_for_backward(grad_h, grad_w)
        ctx.want, ctx.weight_dtype = (want_h, want_w), weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_total):
        grad_h, grad_w = ctx.saved_tensors
        want_h, want_w = ctx.want
        return (grad_h * grad_total.to(grad_h.dtype) if want_h else None,
                (grad_w * grad_total).to(ctx.weight_dtype) if want_w else None, None, None)


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         chunk: int | None = None) -> torch.Tensor:
    """Sum over positions with a target (≠ IGNORE) of −log softmax(hidden @ weight.T)[target].

    hidden: [..., H], weight: [V, H] (lm_head), targets: [...] next-token ids or IGNORE.
    """
    keep = targets.reshape(-1) != IGNORE
    h = hidden.reshape(-1, hidden.shape[-1])[keep].to(weight.dtype)
    t = targets.reshape(-1)[keep]
    chunk = chunk or max(64, CHUNK_BYTES // (4 * weight.shape[0]))
    return _LinearCrossEntropy.apply(h, weight, t, chunk)
