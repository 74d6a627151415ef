"""DoRA on a frozen base: each DoRA module's per-output-channel factor, computed once per adapter version.

PEFT (peft/tuners/lora/dora.py, eval mode) adds to the base output, per output channel i,
    (f_i - 1) * (W x)_i + f_i * s (B A x)_i,   f_i = m_i / |W_i + s (B A)_i|
(the norm runs over the input features, on the dequantised base weight; the bias is not rescaled).
Since the base is frozen, f is a constant of (adapter version, base). With y = W x + bias, the base
output the adapter ops receive, and delta = s B A x, a DoRA row's output is
    (1 + g) * (y + delta) + c,   g = f - 1,   c = -g * bias.
Storing g rather than f keeps its precision when the weights are held in bf16 (f is close to 1).
"""
from __future__ import annotations

from collections.abc import Callable

import torch

from .peft_format import AdapterError, AdapterWeights, ModuleDelta

# (layer, projection) -> the base's dense [out, in] weight (dequantised when NF4) and its bias or None
BaseWeight = Callable[[int, str], tuple[torch.Tensor, torch.Tensor | None]]


def output_rescale(m: ModuleDelta, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """[2, out] float32: g = m / |W + s*BA| - 1 per output channel, and c = -g * bias."""
    A, B = m.A[0].float(), m.B[0].float()  # [in, r], [r, out]: DoRA is plain LoRA (k = 1)
    weight = weight.to(A.device, torch.float32)
    norm = torch.linalg.norm(weight + m.scale * (A @ B).T, dim=1)
    g = m.magnitude.to(A.device, torch.float32) / norm - 1
    if not torch.isfinite(g).all():
        raise AdapterError("a DoRA module has a zero weight norm |W + scale*BA| on some output channel "
                           "of the served base model: its factor m / norm is not finite")
    c = torch.zeros_like(g) if bias is None else -g * bias.to(g.device, torch.float32)
    return torch.stack([g, c])


def prepare_dora(adapter: AdapterWeights, base_weight: BaseWeight | None) -> None:
    """Set `rescale` on every DoRA module of `adapter` that lacks it (idempotent, any thread)."""
    if not adapter.is_dora:
        return
    if base_weight is None:
        raise ValueError("serving a DoRA adapter needs the base model's weights (base_weight)")
    for (layer, proj), m in adapter.modules.items():
        if m.is_dora and m.rescale is None:
            weight, bias = base_weight(layer, proj)
            m.rescale = output_rescale(m, weight, bias).to(m.A.device)
