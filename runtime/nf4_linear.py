"""NF4 linear layers that keep bitsandbytes' storage and run a fused Triton kernel for few rows.

`NF4Linear` is a `bnb.nn.Linear4bit` (same Params4bit and QuantState, same state dict, bitsandbytes
still quantises and owns the format). On CUDA its forward runs `loraplex.kernels.nf4_matmul` (reads
the packed weights once) for the row counts in `DISPATCH[(out, in)]` (a row count is looked up as the
smallest calibrated count >= it, as CUDA-graph batches are padded), and `bnb.matmul_4bit` (its gemv
for one row; from 2 rows on it dequantises the whole weight first) otherwise. On the CPU,
and whenever a gradient is needed, it is exactly bitsandbytes' Linear4bit.

`calibrate(linears)` measures both paths per distinct weight shape at start-up (CUDA events over
CUDA-graph replays, the way decode steps run), the fused kernel in each of its candidate tilings
(kernels/nf4_tiles.candidate_tiles; the fastest goes to TILES), and sets DISPATCH to the row counts
at which the fused kernel wins; without it the committed defaults below apply. It also times a dense matmul of the same
shape in the compute dtype (DENSE_US): `dense_faster(rows)` says whether a bf16 merged copy of the
layers would beat the NF4 path at that batch size (runtime/merged.py's `auto` asks it).
"""
from __future__ import annotations

import copy
import logging
import os
import statistics
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor

import bitsandbytes as bnb
import bitsandbytes.functional as bnbf
import torch
import triton
from bitsandbytes.nn.modules import fix_4bit_weight_quant_state_from_module

from loraplex.kernels.nf4_dequant import nf4_dequantize
from loraplex.kernels.nf4_matmul import nf4_matmul
from loraplex.kernels.nf4_tiles import NF4Tiles, candidate_tiles, sm_count

log = logging.getLogger(__name__)

# Up to 64: decode batches. Above: large decode batches and short prefill chunks, where the fused kernel
# (128 rows per program) competes with dequantising the whole weight to bf16 and a dense matmul.
CALIBRATION_ROWS = (1, 2, 4, 8, 16, 32, 48, 64, 96, 128, 192, 256)
# Shapes missing from DISPATCH: H100 (bench/nf4_matmul.py, 2026-11-25): bitsandbytes' gemv wins at one
# row, the fused kernel from 8 rows to 64 on every Llama-3 8B / 3.2-1B shape (about 2x).
DEQUANT_ROWS = 64  # not fused above this many rows: dequantise the weight once, then a dense matmul
DEFAULT_FUSED_ROWS = frozenset({2, 4, 8, 16, 32, 48, 64})  # (above 64 rows: only where calibrated faster)
# (out_features, in_features) -> calibrated row counts at which the fused kernel is faster.
DISPATCH: dict[tuple[int, int], frozenset[int]] = {}
# (out_features, in_features, calibrated rows) -> the fused kernel's fastest tiles there (None: its rule)
TILES: dict[tuple[int, int, int], NF4Tiles] = {}
# (out_features, in_features) -> {rows: microseconds}: the faster NF4 path, and a dense matmul.
NF4_US: dict[tuple[int, int], dict[int, float]] = {}
DENSE_US: dict[tuple[int, int], dict[int, float]] = {}
# (out_features, in_features) -> whether kernels/nf4_dequant.py dequantised that weight faster than bitsandbytes'
# dequantize_4bit at start-up (prefill's dequantise-then-matmul path); not calibrated: bitsandbytes'
TRITON_DEQUANT: dict[tuple[int, int], bool] = {}
DEQUANT_US: dict[tuple[int, int], dict[str, float]] = {}  # (out_features, in_features) -> measure_dequant's times
# (shape, dtype, device) -> one dequantised weight, rewritten by each layer's prefill matmul in turn (one
# stream, in order: a captured graph that uses it replays in the same order)
_DEQUANT_SCRATCH: dict[tuple, torch.Tensor] = {}


def dense_faster(rows: int) -> bool | None:
    """Whether dense (compute-dtype) weights of every calibrated shape, summed, take less time than their
    NF4 path at this row count; None before a calibration that timed both (the CPU, or a failed timing)."""
    m = calibrated_rows(rows)
    shapes = [s for s in NF4_US if m in NF4_US[s] and m in DENSE_US.get(s, {})]
    if not shapes:
        return None
    return sum(DENSE_US[s][m] for s in shapes) < sum(NF4_US[s][m] for s in shapes)


def calibrated_rows(rows: int) -> int:
    """The calibrated row count that stands for `rows` (the next one up; beyond the last: the last)."""
    return next((m for m in CALIBRATION_ROWS if m >= rows), CALIBRATION_ROWS[-1] + 1)


class NF4Linear(bnb.nn.Linear4bit):
    """A Linear4bit whose CUDA forward uses the fused NF4 kernel for few rows (see the module docstring)."""

    @classmethod
    def from_bnb(cls, linear: bnb.nn.Linear4bit) -> NF4Linear:
        """The same layer, sharing `linear`'s weight (Params4bit + QuantState) and bias."""
        weight = linear.weight
        new = cls(linear.in_features, linear.out_features, bias=linear.bias is not None,
                  compute_dtype=linear.compute_dtype, compress_statistics=getattr(weight, "compress_statistics", True),
                  quant_type=getattr(weight, "quant_type", "fp4"), quant_storage=linear.quant_storage, device="meta")
        new.weight = weight
        new.bias = linear.bias
        if isinstance(weight, bnb.nn.Params4bit):
            weight.module = new  # bitsandbytes records the quant state on the owning module when it quantises
        new.quant_state = linear.quant_state
        new.compute_type_is_set = linear.compute_type_is_set
        new.support_avx512bf16_for_cpu = linear.support_avx512bf16_for_cpu
        new.train(linear.training)
        return new

    def use_fused(self, rows: int) -> bool:
        return calibrated_rows(rows) in DISPATCH.get((self.out_features, self.in_features), DEFAULT_FUSED_ROWS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // max(x.shape[-1], 1)
        if self.use_fused(rows) and self._fusable(x):
            return self.fused_forward(x)
        if rows > DEQUANT_ROWS and self._fusable(x):
            return self.dequant_forward(x)
        return super().forward(x)

    def dequant_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Prefill-sized inputs: dequantise the weight into a scratch buffer shared by every layer of this
        shape, then one dense matmul. What bitsandbytes does past its kernels' row range, without its
        per-call dispatch (about 0.2 ms of host time a call, measured on an H200 host: a 1B prefill step
        of 64 such calls was bound by it) and without a fresh weight-sized allocation."""
        fix_4bit_weight_quant_state_from_module(self)
        if not self.compute_type_is_set:
            self.set_compute_type(x)
            self.compute_type_is_set = True
        state = self.weight.quant_state
        key = (tuple(state.shape), state.dtype, x.device)
        weight = _DEQUANT_SCRATCH.get(key)
        if weight is None:
            weight = _DEQUANT_SCRATCH[key] = torch.empty(state.shape, dtype=state.dtype, device=x.device)
        dequantize_into(weight, self.weight.data, state, TRITON_DEQUANT.get((self.out_features, self.in_features), False))
        in_dtype = x.dtype
        dtype = self.compute_dtype or in_dtype
        bias = None if self.bias is None else self.bias.to(dtype)
        return torch.nn.functional.linear(x.to(dtype), weight.to(dtype), bias).to(in_dtype)

    def _fusable(self, x: torch.Tensor) -> bool:
        state = getattr(self.weight, "quant_state", None)
        if state is None:
            state = self.quant_state
        needs_grad = torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad
                                                  or (self.bias is not None and self.bias.requires_grad))
        return (x.is_cuda and not needs_grad and state is not None and len(state.shape) == 2
                and not getattr(state, "packing_format_for_cpu", False)
                and self.in_features % state.blocksize == 0)

    def fused_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The fused kernel, whatever the row count (CUDA; Linear4bit's dtype handling)."""
        fix_4bit_weight_quant_state_from_module(self)
        if not self.compute_type_is_set:
            self.set_compute_type(x)
            self.compute_type_is_set = True
        in_dtype = x.dtype
        if self.compute_dtype is not None:
            x = x.to(self.compute_dtype)
        rows = x.numel() // max(x.shape[-1], 1)
        tiles = TILES.get((self.out_features, self.in_features, calibrated_rows(rows)))
        return fused_matmul(x, self.weight.data, self.weight.quant_state, self.out_features, self.bias,
                            tiles).to(in_dtype)

    def bnb_forward(self, x: torch.Tensor) -> torch.Tensor:
        """bitsandbytes' Linear4bit forward, whatever the row count."""
        return super().forward(x)

    def dequantize_weight(self) -> torch.Tensor:
        """The dense [out, in] weight in the quantised weight's dtype (bitsandbytes' dequantize_4bit)."""
        state, data = self.weight.quant_state, self.weight.data
        if getattr(state, "packing_format_for_cpu", False):  # repacked by a CPU forward: undo on copies
            data, state = bnbf._convert_weight_packed_for_cpu_inverse(data, copy.deepcopy(state))
        return bnbf.dequantize_4bit(data, state)


def _nested(state) -> dict:
    """The kernels' double-quantisation arguments from a QuantState (none without it)."""
    if not state.nested:
        return {}
    return dict(nested_absmax=state.state2.absmax, nested_code=state.state2.code,
                nested_blocksize=state.state2.blocksize, offset=state.offset)


def fused_matmul(x: torch.Tensor, packed: torch.Tensor, state, out_features: int, bias: torch.Tensor | None = None,
                 tiles=None, compile_only: bool = False) -> torch.Tensor:
    """x @ W.T (+ bias) by the fused kernel, W given as bitsandbytes' packed data and QuantState."""
    return nf4_matmul(x, packed, state.absmax, state.code, state.blocksize, out_features, bias=bias, tiles=tiles,
                      compile_only=compile_only, **_nested(state))


def dequantize_into(out: torch.Tensor, packed: torch.Tensor, state, triton_kernel: bool) -> torch.Tensor:
    """The dense weight into `out` (state.shape, contiguous): kernels/nf4_dequant.py or bitsandbytes'."""
    if triton_kernel:
        return nf4_dequantize(packed, state.absmax, state.code, state.blocksize, out, **_nested(state))
    return bnbf.dequantize_4bit(packed, state, out=out)


def median_gpu_us(run: Callable[[], object], calls: int = 8, repeats: int = 5) -> tuple[float, bool]:
    """Median GPU time of one `run()`, from CUDA-graph replays of `calls` runs (eager if capture fails);
    and whether it was graphed."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        run()  # compile / warm up outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            for _ in range(calls):
                run()
        replay, graphed = graph.replay, True
    except RuntimeError:
        torch.cuda.synchronize()

        def replay():
            for _ in range(calls):
                run()
        graphed = False
    replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(repeats):
        start.record()
        replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / calls)
    return statistics.median(times), graphed


def _copies(device: torch.device, weight_bytes: int, most: int) -> int:
    """How many copies of a weight together exceed twice the L2 cache: decode reads each layer's weights
    from HBM once per step, so timed calls rotate over copies (a single weight would be timed from L2)."""
    l2_bytes = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 << 20)
    return max(1, min(most, -(-2 * l2_bytes // weight_bytes)))


def nf4_rotation(layer: NF4Linear) -> list[tuple[torch.Tensor, object]]:
    """(packed, QuantState) of `layer`'s weight and of enough copies of it to time it from HBM."""
    state, packed = layer.weight.quant_state, layer.weight.data
    weight_bytes = packed.numel() * packed.element_size() + state.absmax.numel() * state.absmax.element_size()
    copies = _copies(packed.device, weight_bytes, 32)
    return [(packed, state)] + [(packed.clone(), copy.deepcopy(state)) for _ in range(copies - 1)]


def measure(layer: NF4Linear, rows: int, tiles=None, with_bnb: bool = True, weights=None) -> dict:
    """GPU time per call of both paths on `layer`'s weight for a [rows, in] input (compute dtype),
    rotating over `weights` (default: nf4_rotation(layer))."""
    weights = weights or nf4_rotation(layer)
    x = torch.randn(rows, layer.in_features, device=layer.weight.device, dtype=layer.compute_dtype or torch.bfloat16)
    bias = layer.bias.to(x.dtype) if layer.bias is not None else None
    out_features = layer.out_features

    def fused():
        for w, s in weights:
            fused_matmul(x, w, s, out_features, bias, tiles)

    def bitsandbytes():
        for w, s in weights:
            bnb.matmul_4bit(x, w, bias=bias, quant_state=s)

    fused_us, fused_graphed = median_gpu_us(fused)
    bnb_us, bnb_graphed = median_gpu_us(bitsandbytes) if with_bnb else (float("nan"), True)
    return {"fused_us": fused_us / len(weights), "bnb_us": bnb_us / len(weights), "copies": len(weights),
            "graphed": fused_graphed and bnb_graphed}


def measure_dense(layer: NF4Linear, rows: Iterable[int]) -> dict[int, float]:
    """GPU time per call of a dense matmul with a weight of `layer`'s shape in its compute dtype (what a
    bf16 merged copy costs), per row count, rotating over copies as `measure` does."""
    dtype = layer.compute_dtype or torch.bfloat16
    device = layer.weight.device
    copies = _copies(device, layer.out_features * layer.in_features * torch.finfo(dtype).bits // 8, 8)
    weights = [torch.randn(layer.out_features, layer.in_features, device=device, dtype=dtype) for _ in range(copies)]
    times = {}
    for m in rows:
        x = torch.randn(m, layer.in_features, device=device, dtype=dtype)

        def dense():
            for w in weights:
                torch.nn.functional.linear(x, w)

        times[m] = median_gpu_us(dense)[0] / copies
    return times


def measure_dequant(layer: NF4Linear, weights) -> dict[str, float]:
    """GPU time per whole-weight dequantisation of `layer`'s shape (prefill's path), rotating over `weights`
    (nf4_rotation's): {"triton": kernels/nf4_dequant.py, "bitsandbytes": dequantize_4bit}; inf where one fails."""
    state = layer.weight.quant_state
    out = torch.empty(state.shape, dtype=state.dtype, device=layer.weight.device)
    times = {}
    for name in ("triton", "bitsandbytes"):
        def dequantize(triton_kernel=name == "triton"):
            for w, s in weights:
                dequantize_into(out, w, s, triton_kernel)
        try:
            times[name] = median_gpu_us(dequantize)[0] / len(weights)
        except Exception as e:  # noqa: BLE001 - a kernel failing here leaves bitsandbytes' path in place
            log.warning("nf4 whole-weight dequantisation (%s) failed on %s: %s", name, tuple(state.shape), e)
            times[name] = float("inf")
    return times


@torch.inference_mode()
def calibrate(linears: Iterable[torch.nn.Module], device: str | torch.device | None = None,
              rows: Iterable[int] = CALIBRATION_ROWS) -> dict[tuple[int, int], dict]:
    """Time the fused kernel and bitsandbytes per distinct (out, in) shape among the NF4Linear layers of
    `linears` at each row count, and set DISPATCH[shape] to the counts at which the fused kernel is
    faster. Each candidate tiling's product is first held against bitsandbytes' (relative error <= 1e-2): one
    that parts from it (a kernel variant wrong on this GPU) is not used. Returns {shape: {"fused_rows",
    "fused_us", "bnb_us"}} (times per row count). Does nothing without CUDA."""
    device = torch.device(device) if device is not None else torch.device("cuda")
    if device.type != "cuda" or not torch.cuda.is_available():
        return {}
    layers: dict[tuple[int, int], NF4Linear] = {}
    for layer in linears:  # 16-bit compute only: an fp32 model on a GPU (a test's reference) keeps the defaults,
        # where timing every candidate would compile each again for fp32 (minutes on a fresh machine)
        if (isinstance(layer, NF4Linear) and layer.weight.device.type == "cuda"
                and layer.compute_dtype in (torch.bfloat16, torch.float16, None)):
            layers.setdefault((layer.out_features, layer.in_features), layer)
    plans = {}  # (shape, rows) -> (x, candidate tilings)
    for shape, layer in layers.items():
        for m in sorted(rows):
            x = torch.randn(m, layer.in_features, device=device, dtype=layer.compute_dtype or torch.bfloat16)
            plans[shape, m] = x, candidate_tiles(m, *shape, layer.weight.quant_state.blocksize, sm_count(device))
    _compile_candidates((layers[shape], x, tiles) for (shape, _), (x, candidates) in plans.items() for tiles in candidates)
    results = {}
    for shape, layer in layers.items():
        fused_us, bnb_us = {}, {}
        rotation = nf4_rotation(layer)
        for m in sorted(rows):
            fused_us[m], bnb_us[m] = float("inf"), 0.0
            x, candidates = plans[shape, m]
            reference = layer.bnb_forward(x).float()
            fastest = None
            for i, tiles in enumerate(candidates):  # the rule's tiles first: they also time bitsandbytes
                t = _checked_time(layer, x, reference, tiles, rotation, with_bnb=i == 0)
                if t is None:
                    continue
                if i == 0:
                    bnb_us[m] = t["bnb_us"]
                if t["fused_us"] < fused_us[m]:
                    fused_us[m], fastest = t["fused_us"], tiles
            if fastest is not None:
                TILES[(*shape, m)] = fastest
        dequant_us = DEQUANT_US[shape] = measure_dequant(layer, rotation)
        TRITON_DEQUANT[shape] = dequant_us["triton"] < dequant_us["bitsandbytes"]
        fused_rows = frozenset(m for m in fused_us if fused_us[m] < bnb_us[m])
        DISPATCH[shape] = fused_rows
        NF4_US[shape] = {m: min(fused_us[m], bnb_us[m]) for m in fused_us}
        try:  # only informs the merge policy: a failure leaves `auto` unmerged on this base
            DENSE_US[shape] = measure_dense(layer, sorted(rows))
        except Exception as e:  # noqa: BLE001
            log.warning("dense matmul timing failed on %s: %s", shape, e)
        results[shape] = {"fused_rows": sorted(fused_rows), "fused_us": fused_us, "bnb_us": bnb_us,
                          "dense_us": DENSE_US.get(shape, {}), "dequant_us": dequant_us,
                          "tiles": {m: str(TILES.get((*shape, m))) for m in fused_us}}
        log.info("nf4 %s: fused kernel at rows %s (fused %s us, bitsandbytes %s us, dense %s us); whole-weight "
                 "dequantisation %s us; fastest tiles %s", shape, sorted(fused_rows),
                 {m: round(t, 1) for m, t in fused_us.items()}, {m: round(t, 1) for m, t in bnb_us.items()},
                 {m: round(t, 1) for m, t in DENSE_US.get(shape, {}).items()},
                 {k: round(t, 1) for k, t in dequant_us.items()},
                 {m: tile_label(TILES[(*shape, m)]) for m in fused_us if (*shape, m) in TILES})
    return results


def _compile_candidates(jobs: Iterable[tuple[NF4Linear, torch.Tensor, NF4Tiles]]) -> None:
    """Compile the fused kernel of every (layer, x, tiles) before any is timed, on a thread a core: Triton's compiler
    releases the GIL for most of a compile (56 sm90 kernels of the 8B candidates in 17 s on 2 threads against 37 s on
    one, the same cubins: bench/nf4_sass.py's set-up), where one by one a fresh machine spent minutes at start-up.
    Through Triton's AsyncCompileMode (the compiled kernels land in its per-function cache, as a launch's would);
    without it (an older Triton), or if anything here fails, each kernel compiles when first timed."""
    AsyncCompileMode = getattr(triton, "AsyncCompileMode", None)  # (Triton 3.4 on)
    if AsyncCompileMode is None:
        return
    started, jobs = time.perf_counter(), list(jobs)
    workers = max(1, min(16, len(os.sched_getaffinity(0))))
    try:
        with ThreadPoolExecutor(workers, thread_name_prefix="nf4-compile") as pool, AsyncCompileMode(pool):
            for layer, x, tiles in jobs:  # (with the bias that _checked_time() and measure() pass)
                bias = layer.bias.to(x.dtype) if layer.bias is not None else None
                try:
                    fused_matmul(x, layer.weight.data, layer.weight.quant_state, layer.out_features, bias, tiles,
                                 compile_only=True)
                except ValueError:  # tiles this call refuses: refused again, and skipped, when timed
                    continue
    except Exception as e:  # noqa: BLE001 - a kernel that failed to compile fails again (and is skipped) when timed
        log.warning("nf4 kernels: compiling the calibration's candidates in threads failed (%s); the rest compile "
                    "when first timed", e)
        return
    log.info("nf4 kernels: %d calibration candidates compiled on %d threads in %.1f s", len(jobs), workers,
             time.perf_counter() - started)


def _checked_time(layer: NF4Linear, x: torch.Tensor, reference: torch.Tensor, tiles: NF4Tiles, weights,
                  with_bnb: bool) -> dict | None:
    """measure()'s times for `tiles` on x, or None where its product parts from `reference` (bitsandbytes', beyond
    rounding: a kernel variant wrong on this GPU) or it fails (then bitsandbytes is kept and the server runs)."""
    state, rows = layer.weight.quant_state, x.shape[0]
    bias = layer.bias.to(x.dtype) if layer.bias is not None else None  # (bitsandbytes' product adds it too)
    try:
        product = fused_matmul(x, layer.weight.data, state, layer.out_features, bias, tiles).float()
        if not (product - reference).norm() <= 1e-2 * reference.norm():
            log.warning("nf4 fused kernel %s on %s with %d rows parts from bitsandbytes' product: not used",
                        tiles, (layer.out_features, layer.in_features), rows)
            return None
        return measure(layer, rows, tiles=tiles, with_bnb=with_bnb, weights=weights)
    except Exception as e:  # noqa: BLE001
        log.warning("nf4 fused kernel failed with %d rows (%s): %s", rows, tiles, e)
        return None


def tile_label(t) -> str:
    """A candidate tiling in a few characters for the log: rows x features x input step, splits, warps, stages, and
    + pf (prefetch), + perm (permute decode), + ps (codes scaled before the dot), + xb (x @ codes^T), + sk (split-K
    partial sums added in the kernel)."""
    flags = "".join(f" +{name}" for name, on in (("pf", t.prefetch), ("perm", t.permute), ("ps", t.prescale),
                                                 ("xb", t.codes_as_b), ("sk", t.splits > 1 and t.sum_in_kernel)) if on)
    return f"{t.block_m}x{t.block_n}x{t.block_k} s{t.splits} w{t.num_warps} st{t.num_stages}{flags}"
