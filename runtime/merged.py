"""Merged-weights serving: one adapter's delta folded into a copy of the linears it touches.

When one adapter dominates the running batch, its decode rows skip the adapter kernels and run
through W + s·ΔW directly; the other rows keep the base weights and the unmerged path (see
`AdaptedLinear.forward`). Policy (`--merge-policy`): `off` (the default); an adapter id (always merge
that one: the right choice when one adapter takes nearly all of a server's traffic); `auto`: merge the
adapter that holds at least `threshold` of the running rows for `patience` consecutive decode steps
and at least `dwell_seconds`, use it while it does, and free the copy once it has not for
`dwell_seconds` (hysteresis: a build costs a copy of the touched weights, 14 GB in bf16 on an 8B
model, and competes with serving while it runs). Rows of the merged adapter and other rows in one
step cost two passes over the weights, which at decode speed (bound by weight bytes) is slower than
the unmerged path, so auto waits for the whole batch (threshold 1.0); it merges only at batch sizes
where `merge_pays(rows)` holds (on an NF4 base the engine asks the start-up measurement: a bf16 copy
reads 4x the bytes of NF4, but a dense matmul can still beat the NF4 kernels:
nf4_linear.dense_faster), and only when the copy fits in the free accelerator memory with room to spare.

Why `off` is the default: on a real trace (bench/serve_trace.py: Zipf popularity over 64 adapters,
arrivals over time) `auto` with a step-count patience merged five times in 50 s, each build stalling
the batch; the gain of a merged copy where it does apply is small (8B, one adapter on all 32 rows:
1.04x the unmerged rate, bench/results/serve_gpu.json).

The merged copy is built on a background thread and a side stream while the engine keeps serving
unmerged; format `bf16` (dense bf16 of the touched linears) or `nf4` (re-quantised with
bitsandbytes like the base). With an NF4 base, bf16 is exact up to rounding but reads 4× the bytes
per parameter; nf4 reads what the base reads but adds a second quantisation error.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .adapters.ops import module_delta
from .adapters.registry import AdapterRef
from .model import AdaptedLinear, CausalLM

log = logging.getLogger("loraplex.merged")


class DenseLinear(nn.Module):
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.register_buffer("weight", weight)
        self.register_buffer("bias", bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


def dense_weight(base: nn.Module) -> torch.Tensor:
    """The base linear's weight as a dense [out, in] tensor (dequantised when NF4)."""
    if hasattr(base, "dequantize_weight"):
        return base.dequantize_weight()
    weight = base.weight
    state = getattr(weight, "quant_state", None)
    if state is not None and getattr(state, "packing_format_for_cpu", False):
        return _dense_by_forward(base)
    if state is not None:
        import bitsandbytes.functional as bnbf
        return bnbf.dequantize_4bit(weight.data, state)
    return weight.data


def _dense_by_forward(base: nn.Module, chunk: int = 4096) -> torch.Tensor:
    """W = base(I)^T - bias. bitsandbytes repacks a Linear4bit's weight for its AVX512-bf16 CPU kernel at
    the first forward, and its inverse rewrites the live quant_state: read the weight through forward."""
    bias = getattr(base, "bias", None)
    rows = []
    for start in range(0, base.in_features, chunk):
        eye = torch.eye(base.in_features, dtype=base.compute_dtype or torch.float32)[start:start + chunk]
        y = base(eye)
        rows.append(y if bias is None else y - bias.to(y.dtype))
    return torch.cat(rows).T


def merged_linear(linear: AdaptedLinear, ref: AdapterRef, shapes: dict[str, tuple[int, int]], fmt: str,
                  dtype: torch.dtype) -> nn.Module | None:
    """linear's weights plus the adapter's delta of each of its projections; None if it has none."""
    modules = [(p, ref.weights.modules.get((linear.layer_idx, p))) for p in linear.projections]
    if all(m is None for _, m in modules):
        return None
    weight = dense_weight(linear.base).to(torch.float32, copy=True)  # never the base tensor itself
    row = 0
    for proj, m in modules:
        fin, fout = shapes[proj]
        if m is not None:
            m = m.to(weight.device, torch.float32)
            for start in range(0, fin, 4096):  # delta^T = module_delta(I): its rows are the input features
                eye = torch.eye(fin, device=weight.device)[start:start + 4096]
                weight[row:row + fout, start:start + eye.shape[0]] += module_delta(eye, m).T
            if m.rescale is not None:  # DoRA: (1 + g) * (W + s*BA) with the bias kept (see adapters/dora.py)
                weight[row:row + fout] *= (1 + m.rescale[0]).unsqueeze(1)
        row += fout
    bias = getattr(linear.base, "bias", None)
    bias = None if bias is None else bias.data.to(dtype)
    if fmt == "bf16":
        return DenseLinear(weight.to(dtype).contiguous(), bias)
    from .base_model import nf4_linear
    return nf4_linear(weight.to(dtype), bias, dtype, weight.device)


def module_bytes(module: nn.Module) -> int:
    """Bytes of a module's parameters and buffers, with a bitsandbytes 4-bit weight's QuantState tensors."""
    tensors = list(module.parameters()) + list(module.buffers())
    for p in module.parameters():
        state = getattr(p, "quant_state", None)
        if state is not None:
            tensors += [state.absmax, state.code]
            if state.nested:
                tensors += [state.state2.absmax, state.state2.code]
    return sum(t.numel() * t.element_size() for t in tensors)


class Merger:
    """Decides which adapter is served merged and builds its weights in the background."""

    def __init__(self, model: CausalLM, shapes: dict[str, tuple[int, int]], policy: str = "auto",
                 fmt: str = "bf16", dtype: torch.dtype = torch.bfloat16, threshold: float = 1.0,
                 patience: int = 8, min_rows: int = 2, dwell_seconds: float = 30.0):
        self.model, self.shapes = model, shapes
        self.policy, self.fmt, self.dtype = policy, fmt, dtype
        self.threshold, self.patience, self.min_rows = threshold, patience, min_rows
        self.dwell_seconds = dwell_seconds
        self._dominant_since: float | None = None  # auto: when the current candidate's streak began
        self._active_last_dominant = 0.0  # auto: when the merged adapter last held the batch
        self.active: AdapterRef | None = None  # merged weights installed in the model
        self._building: tuple[AdapterRef, threading.Thread] | None = None
        self._ready: tuple[AdapterRef, dict] | None = None  # built, waiting to be installed
        self._candidate, self._streak = None, 0
        self.auto_merges = True  # False: `auto` never merges (see Engine)
        self.merge_pays: Callable[[int], bool] = lambda rows: True  # auto: whether merging helps at this batch
        self.builds = 0
        self.merged_steps = 0

    @functools.cached_property
    def linears(self) -> list[AdaptedLinear]:  # (the model's modules never change; merging swaps their weights)
        return [m for m in self.model.modules() if isinstance(m, AdaptedLinear)]

    @property
    def merged_bytes(self) -> int:
        """Bytes of the installed merged copy: its weights, and an NF4 copy's quantisation statistics."""
        return sum(module_bytes(lin.merged) for lin in self.linears if lin.merged is not None)

    def _dominant(self, refs: list[AdapterRef | None]) -> AdapterRef | None:
        if self.policy == "off" or len(refs) < self.min_rows:
            return None
        by_key = Counter(r.key for r in refs if r is not None)
        if not by_key:
            return None
        if self.policy != "auto":
            return next((r for r in refs if r is not None and r.id == self.policy), None)
        if not self.auto_merges or not self.merge_pays(len(refs)):
            return None
        key, count = by_key.most_common(1)[0]
        if count < self.threshold * len(refs):
            return None
        return next(r for r in refs if r is not None and r.key == key)

    def choose(self, refs: list[AdapterRef | None]) -> tuple[AdapterRef | None, bool]:
        """Called by the engine before each decode step with the rows' adapters: the adapter whose
        rows run merged this step (or None), and whether the model's merged weights changed."""
        changed = self._install_ready()
        target = self._dominant(refs)
        key = None if target is None else target.key
        now = time.monotonic()
        if key is None or key != self._candidate:
            self._streak, self._dominant_since = int(key is not None), now
        else:
            self._streak += 1
        self._candidate = key
        if self.active is not None and self.active.key == key:
            self._active_last_dominant = now
            self.merged_steps += 1
            return self.active, changed
        if self.policy == "auto" and self.active is not None and now - self._active_last_dominant > self.dwell_seconds:
            changed = self._uninstall() or changed
        if target is None:
            return None, changed
        patient = self.policy != "auto" or (self._streak >= self.patience
                                            and now - self._dominant_since >= self.dwell_seconds)
        if patient and self._building is None and self._fits(target):
            self._start_build(target)
        return None, changed

    def copy_bytes(self, ref: AdapterRef) -> int:
        """Bytes of the merged copy of ref's touched linears (bf16: 2 a weight; nf4: about 0.56)."""
        touched = [lin for lin in self.linears if any((lin.layer_idx, p) in ref.weights.modules for p in lin.projections)]
        weights = sum(lin.base.in_features * lin.base.out_features for lin in touched)
        return weights * 2 if self.fmt == "bf16" else weights * 9 // 16

    def _fits(self, ref: AdapterRef) -> bool:
        """auto on CUDA: the copy (with the one it replaces still live while building) fits in free memory."""
        if self.policy != "auto" or not torch.cuda.is_available() or self.dtype == torch.float32:
            return True
        free, _ = torch.cuda.mem_get_info()
        need = self.copy_bytes(ref)
        if need * 1.25 > free:
            log.info("not merging %s: its copy needs %.1f GB, %.1f GB free", ref.id, need / 1e9, free / 1e9)
            return False
        return True

    def _uninstall(self) -> bool:
        log.info("freeing the merged copy of %s (not dominant for %.0f s)", self.active.id, self.dwell_seconds)
        for lin in self.linears:
            lin.merged = None
        self.active = None
        return True

    def _start_build(self, ref: AdapterRef) -> None:
        def build():
            stream = torch.cuda.Stream() if torch.cuda.is_available() and self.dtype != torch.float32 else None
            try:
                with torch.no_grad(), (torch.cuda.stream(stream) if stream else contextlib.nullcontext()):
                    built = {id(lin): merged_linear(lin, ref, self.shapes, self.fmt, self.dtype)
                             for lin in self.linears}
                if stream is not None:
                    stream.synchronize()
                self._ready = (ref, built)
            except Exception:
                log.exception("building merged weights for %s failed", ref.id)
            finally:
                self._building = None

        thread = threading.Thread(target=build, name="loraplex-merge", daemon=True)
        self._building = (ref, thread)
        self.builds += 1
        thread.start()

    def _install_ready(self) -> bool:
        ready, self._ready = self._ready, None
        if ready is None:
            return False
        ref, built = ready
        for lin in self.linears:
            lin.merged = built.get(id(lin))
        self.active = ref
        log.info("serving adapter %s v%d from merged weights (%s)", ref.id, ref.version, self.fmt)
        return True

    def wait(self) -> None:
        """Block until a build under way finishes (tests, benchmarks)."""
        building = self._building
        if building is not None:
            building[1].join()
