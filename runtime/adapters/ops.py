"""The one adapter-math interface the model calls, and its pure-PyTorch implementation.

A model layer hands `apply` its input, its (fused) base output and the step's `Segments`; the ops
add each token's adapter delta to the output slice of each projection. Weights live in numbered
slots (`load` / `evict`), filled from the packed `AdapterWeights` representation; `load` may finish
asynchronously (it returns an event to poll). The Triton implementation (loraplex.kernels)
implements the same interface.

Rows of a DoRA adapter also get their projection outputs (base + delta) rescaled per output channel
(dora.py); the ops need the base weights for that once per adapter version: `base_weight`.
"""
from __future__ import annotations

import torch

from .dora import BaseWeight, prepare_dora
from .peft_format import AdapterWeights, ModuleDelta
from .segments import Segments, build_segments


class AdapterOps:
    """Interface: slot weights + per-step metadata → deltas added in place."""

    name = "abstract"

    def __init__(self, num_slots: int, projection_shapes: dict[str, tuple[int, int]], num_layers: int,
                 device: torch.device, dtype: torch.dtype, base_weight: BaseWeight | None = None):
        self.num_slots = num_slots
        self.base_weight = base_weight
        self.projection_shapes = projection_shapes
        self.num_layers = num_layers
        self.device = torch.device(device)
        self.dtype = dtype

    def prepare(self, adapter: AdapterWeights) -> None:
        """Host-side preparation for a later `load` (any thread); `load` calls it when not done yet."""
        prepare_dora(adapter, self.base_weight)

    def prepared(self, adapter: AdapterWeights) -> bool:
        """Whether prepare() has nothing left to do for this adapter."""
        return not any(m.is_dora and m.rescale is None for m in adapter.modules.values())

    def host_bytes(self, adapter: AdapterWeights) -> int:
        """Host bytes prepare() adds beside the parsed weights (a load-ready copy); none here."""
        return 0

    def nbytes(self, adapter: AdapterWeights) -> int:
        """Accelerator bytes the adapter takes once loaded."""
        return sum(t.numel() for m in adapter.modules.values() for t in m.tensors()) * torch.finfo(self.dtype).bits // 8

    def load(self, slot: int, adapter: AdapterWeights):
        """Start loading into `slot`: False if it does not fit, True when done, or an event to poll."""
        raise NotImplementedError

    def evict(self, slot: int) -> None:
        raise NotImplementedError

    def metadata(self, token_slots: list[int], pad_to: int | None = None) -> Segments:
        return build_segments(token_slots, self.device)

    def apply(self, layer: int, projections: tuple[str, ...], x: torch.Tensor, y: torch.Tensor,
              meta: Segments, folded: bool = False) -> None:
        """Add each token's delta to y. folded: `folded` computed y, with some segments' deltas in it already."""
        raise NotImplementedError

    def fold_width(self, projections: tuple[str, ...], meta: Segments | None) -> int:
        """Input columns beyond in_features that `folded` would use for these projections this step (0: none)."""
        return 0

    def folded(self, layer: int, projections: tuple[str, ...], x: torch.Tensor, base, meta: Segments,
               wide: torch.Tensor | None = None):
        """base(x) with some of the step's deltas computed inside the base matmul (kernels/lora_fold.py), or None
        when these ops or this base do not fold. wide: the buffer whose first columns hold x (input_buffer's)."""
        return None


def module_delta(x: torch.Tensor, w: ModuleDelta) -> torch.Tensor:
    """delta for tokens x [T, in] through one ModuleDelta (reference math, any k)."""
    T, k = x.shape[0], w.k
    if k == 1:
        out = (x @ w.A[0]) @ w.B[0]
    else:
        r = w.A.shape[-1]
        h = torch.bmm(x.view(T, k, -1).transpose(0, 1), w.A)  # [n, T, r]: input chunk n through A[n]
        h = h.view(k, T, k, r // k).permute(2, 1, 0, 3).reshape(k, T, r)  # [j, T, (n, piece)]
        out = torch.bmm(h, w.B).transpose(0, 1).reshape(T, -1)  # output chunk j from B[j]
    if w.general_A is not None:
        out = out + (x @ w.general_A) @ w.general_B
    return out * w.scale


def dora_output(y: torch.Tensor, delta: torch.Tensor, w: ModuleDelta) -> torch.Tensor:
    """A DoRA row's projection output from its base output y (bias included) and delta (see dora.py)."""
    g, c = w.rescale[0], w.rescale[1]
    z = y + delta
    return z + g * z + c


class TorchAdapterOps(AdapterOps):
    """Reference implementation: a loop over segments, exact for every mix of LoRA/GraLoRA/ranks."""

    name = "torch"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.slots: list[dict[tuple[int, str], ModuleDelta] | None] = [None] * self.num_slots
        # CPUs without native bf16 run these small matmuls far faster (and more exactly) in fp32
        self.compute_dtype = torch.float32 if self.device.type == "cpu" else self.dtype

    def load(self, slot: int, adapter: AdapterWeights) -> bool:
        self.prepare(adapter)
        self.slots[slot] = {key: m.to(self.device, self.compute_dtype) for key, m in adapter.modules.items()}
        return True

    def evict(self, slot: int) -> None:
        self.slots[slot] = None

    def apply(self, layer, projections, x, y, meta: Segments, folded: bool = False) -> None:
        for start, length, slot in meta.host:
            weights = self.slots[slot]
            idx = meta.token_order[start:start + length]
            xs = None
            offset = 0
            for proj in projections:
                out = self.projection_shapes[proj][1]
                w = weights.get((layer, proj))
                if w is not None:
                    xs = x.index_select(0, idx).to(self.compute_dtype) if xs is None else xs
                    ys = y.narrow(1, offset, out)
                    if w.rescale is None:
                        ys.index_add_(0, idx, module_delta(xs, w).to(y.dtype))
                    else:
                        rows = ys.index_select(0, idx).to(self.compute_dtype)
                        ys.index_copy_(0, idx, dora_output(rows, module_delta(xs, w), w).to(y.dtype))
                offset += out
