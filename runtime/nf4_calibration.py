"""The NF4 layers' start-up calibration (runtime/nf4_linear.py's tables).

`calibrate(linears)` measures both paths per distinct weight shape (CUDA events over CUDA-graph replays,
the way decode steps run): bitsandbytes, and the fused kernel in each of its candidate tilings
(kernels/nf4_tiles.candidate_tiles, compiled first on a thread a core; the fastest goes to TILES), and
sets DISPATCH to the row counts at which the fused kernel wins. It also times a dense matmul of the same
shape in the compute dtype (DENSE_US) and the whole-weight dequantisations (DEQUANT_US, TRITON_DEQUANT).
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
import torch
import triton

from loraplex.kernels.nf4_tiles import NF4Tiles, candidate_tiles, sm_count

from .nf4_linear import (CALIBRATION_ROWS, DENSE_US, DEQUANT_US, DISPATCH, NF4_US, TILES, TRITON_DEQUANT, NF4Linear,
                         dequantize_into, fused_matmul)

log = logging.getLogger(__name__)


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


def _bias(layer: NF4Linear, dtype: torch.dtype) -> torch.Tensor | None:
    """The layer's bias in the input's dtype, as the fused kernel adds it (None without one)."""
    return layer.bias.to(dtype) if layer.bias is not None else None


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
    bias = _bias(layer, x.dtype)
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
    compile_candidates((layers[shape], x, tiles) for (shape, _), (x, candidates) in plans.items() for tiles in candidates)
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


def compile_candidates(jobs: Iterable[tuple[NF4Linear, torch.Tensor, NF4Tiles]]) -> None:
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
                bias = _bias(layer, x.dtype)
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
    bias = _bias(layer, x.dtype)  # (bitsandbytes' product adds it too)
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
