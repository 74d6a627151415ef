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

import contextlib
from collections.abc import Callable

import torch

from .peft_format import AdapterError, AdapterWeights, ModuleDelta

# (layer, projection) -> the base's dense [out, in] weight (dequantised when NF4) and its bias or None
BaseWeight = Callable[[int, str], tuple[torch.Tensor, torch.Tensor | None]]


def output_rescale(m: ModuleDelta, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """[2, out] float32 on weight's device: g = m / |W + s*BA| - 1 per output channel, and c = -g * bias.
    Computed where the base weight lives: on a GPU an 8B adapter's factors take milliseconds, on the
    host (a copy of every dense weight, fp32) they took 19 s."""
    dev = weight.device
    A, B = m.A[0].to(dev, torch.float32), m.B[0].to(dev, torch.float32)  # [in, r], [r, out]: plain LoRA (k = 1)
    norm = torch.linalg.norm(weight.float() + m.scale * (A @ B).T, dim=1)
    g = m.magnitude.to(dev, torch.float32) / norm - 1
    if not bool(torch.isfinite(g).all()):
        raise AdapterError("a DoRA module has a zero weight norm |W + scale*BA| on some output channel "
                           "of the served base model: its factor m / norm is not finite")
    c = torch.zeros_like(g) if bias is None else -g * bias.to(dev, torch.float32)
    return torch.stack([g, c])


def prepare_dora(adapter: AdapterWeights, base_weight: BaseWeight | None) -> None:
    """Set `rescale` on every DoRA module of `adapter` that lacks it (idempotent, any thread). On a GPU the
    work runs on a side stream of its own: the engine thread replays and captures graphs meanwhile."""
    if not adapter.is_dora:
        return
    if base_weight is None:
        raise ValueError("serving a DoRA adapter needs the base model's weights (base_weight)")
    todo = [(key, m) for key, m in adapter.modules.items() if m.is_dora and m.rescale is None]
    if not todo:
        return
    side = torch.cuda.Stream() if torch.cuda.is_available() else None
    with torch.no_grad(), (torch.cuda.stream(side) if side is not None else contextlib.nullcontext()):
        for (layer, proj), m in todo:
            weight, bias = base_weight(layer, proj)
            m.rescale = output_rescale(m, weight, bias).to(m.A.device)
