"""Where a fused NF4 call's time goes, per kernel (GPU): the NF4 kernel, its split-K sum and a dense bf16 matmul of the
same shape, from the CUDA profiler's kernel records, on the four matmuls of an 8B layer.

For each weight and row count, the start-up calibration's fastest tiling (bench/nf4_early_launch.py's search) is launched
eagerly over weight copies that exceed L2; from the kernel records, per call: the NF4 kernel's duration, the sum's
tail (its end less the NF4 kernel's: with programmatic dependent launch the sum starts early and waits), the span
from the NF4 kernel's start to the sum's end, and the gap from one call's end to the next call's first kernel; the
dense matmul's duration and gap the same way. Beside them, the calibration's per-call time (CUDA-graph replays).
JSON: bench/results/nf4_kernel_times.json (+ PNG). usage: python bench/nf4_kernel_times.py [--rows 16 48 64]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics

import torch

import figures
from nf4_early_launch import fastest, served_cases

CALLS = 48


def kernel_records(run) -> tuple[list[tuple[str, float, float]], bool]:
    """(name, start us, end us) of every GPU kernel `run()` launched, in start order, from a replay of `run` captured
    in a CUDA graph (launch gaps as the calibration and the decode graphs have them), or from eager launches where the
    profiler sees no kernels in the replay; and whether they came from the graph."""
    from torch.profiler import ProfilerActivity, profile
    run()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run()
    for replay, graphed in ((graph.replay, True), (run, False)):
        replay()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            replay()
            torch.cuda.synchronize()
        kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA
                   and not e.name.startswith("Memcpy") and not e.name.startswith("Memset")]
        if kernels:
            return sorted(((e.name, e.time_range.start, e.time_range.end) for e in kernels), key=lambda r: r[1]), graphed
    raise RuntimeError("the profiler recorded no kernels")


def per_call(records, first: str, last: str | None) -> dict:
    """Median per-call durations from the records of calls that each launch `first` (then `last`, if not None)."""
    starts = [r for r in records if first in r[0]]
    ends = [r for r in records if last in r[0]] if last else starts
    if len(starts) != len(ends) or not starts:
        raise RuntimeError(f"{len(starts)} {first} kernels against {len(ends)} {last} kernels")
    median = lambda values: statistics.median(values) if values else None  # noqa: E731
    out = {"first_us": median([e - s for _, s, e in starts]),
           "span_us": median([end[2] - start[1] for start, end in zip(starts, ends)]),
           "gap_us": median([nxt[1] - end[2] for end, nxt in zip(ends, starts[1:])])}
    if last:
        out["tail_us"] = median([end[2] - start[2] for start, end in zip(starts, ends)])
    return out


@torch.inference_mode()
def kernel_times(rows: list[int]) -> list[dict]:
    from loraplex.runtime.nf4_linear import fused_matmul
    out = []
    for case in served_cases(rows):
        name, m, x, rotation, dense_weights = case.name, case.rows, case.x, case.rotation, case.dense_weights
        n = case.layer.out_features
        graph_us, tiles = fastest(case.layer, m, rotation)

        def nf4_calls():
            for c in range(CALLS):
                w, s = rotation[c % len(rotation)]
                fused_matmul(x, w, s, n, tiles=tiles)

        def dense_calls():
            for c in range(CALLS):
                torch.nn.functional.linear(x, dense_weights[c % len(dense_weights)])

        records, nf4_graphed = kernel_records(nf4_calls)
        nf4 = per_call(records, "_nf4_matmul_kernel", "_sum_splits_kernel" if tiles.splits > 1 else None)
        records, dense_graphed = kernel_records(dense_calls)
        gemm = per_call(records, records[0][0], None)
        names = sorted({r[0] for r in records})
        row = {"weight": name, "rows": m, "tiles": str(tiles), "calibration_us": graph_us, "dense_graph_us": case.dense_us,
               "from_graph_replays": nf4_graphed and dense_graphed, **{f"nf4_{key}": v for key, v in nf4.items()},
               "dense_kernels": {kernel[:80]: sum(r[0] == kernel for r in records) // CALLS for kernel in names},
               **{f"dense_{key}": v for key, v in gemm.items()}}
        print(f"{name:>17} M={m:<3} NF4 kernel {nf4['first_us']:6.2f} span {nf4['span_us']:6.2f} "
              f"(sum tail {nf4.get('tail_us') or 0:5.2f}) gap {nf4['gap_us'] or 0:5.2f} | dense kernel "
              f"{gemm['first_us']:6.2f} gap {gemm['gap_us'] or 0:5.2f} | graphed: NF4 {graph_us:6.2f} dense "
              f"{case.dense_us:6.2f} us")
        out.append(row)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[16, 48, 64])
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "nf4_kernel_times.json"))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench/nf4_kernel_times.py needs a CUDA GPU")
    import triton
    rows = kernel_times(args.rows)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
                   "calls": CALLS, "kernel_times": rows}, f, indent=1)
    print(f"wrote {args.out}")
    figures.draw_after_run(args.out)


if __name__ == "__main__":
    main()
