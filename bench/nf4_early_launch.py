"""The fused NF4 kernel launched early against launched after the previous kernel, on the four matmuls of an 8B layer,
beside dense bf16 (GPU, Hopper).

Early (kernels/nf4_matmul.py EARLY_LAUNCH, programmatic dependent launch): the kernel's programs start, build their
code tables and load their first weights while the previous kernel drains, and wait for it before reading x.
Per weight and row count:
  back to back   the start-up calibration's measurement (CUDA-graph replays of calls over weight copies that exceed
                 L2, the previous kernel being the last call's): the fastest candidate tiling each way
  after a kernel the same two tilings and dense bf16 with a small elementwise kernel writing x before every call, as
                 in a model step (another kernel produces each matmul's input); that kernel's own time taken out
  same           early and late give the same product, bit for bit
JSON: bench/results/nf4_early_launch.json (+ PNG). usage: python bench/nf4_early_launch.py [--rows 1 16 32 48 64]
"""
from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import dataclass

import torch

import figures
from nf4_matmul import BLOCKSIZE, SERVED_8B, WEIGHTS, make_layer


@dataclass
class Case:
    """One matmul of an 8B layer at one row count, with what both NF4 benchmarks time it against."""
    name: str
    layer: object  # NF4Linear
    rotation: list  # nf4_rotation(layer): weight copies that exceed L2
    dense_weights: list[torch.Tensor]  # bf16 copies of the same shape, as many as measure_dense rotates over
    dense_us: float  # measure_dense at these rows
    rows: int
    x: torch.Tensor  # [rows, in] bf16


def served_cases(rows: list[int]):
    """A Case per matmul of an 8B layer (SERVED_8B) and row count, weight by weight."""
    from loraplex.runtime.nf4_calibration import _copies, measure_dense, nf4_rotation
    for i, name in enumerate(SERVED_8B):
        layer = make_layer(*WEIGHTS[name], seed=i)
        n, k = layer.out_features, layer.in_features
        copies = _copies(torch.device("cuda"), 2 * n * k, 8)
        dense_weights = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) for _ in range(copies)]
        rotation, dense = nf4_rotation(layer), measure_dense(layer, rows)
        for m in rows:
            yield Case(name, layer, rotation, dense_weights, dense[m], m,
                       torch.randn(m, k, device="cuda", dtype=torch.bfloat16))


def fastest(layer, m: int, rotation) -> tuple[float, object]:
    """The calibration's fastest permute-decode candidate for m rows (its time a call, its tiles), timed back to back."""
    from loraplex.kernels.nf4_tiles import candidate_tiles, sm_count
    from loraplex.runtime.nf4_calibration import compile_candidates, measure
    x = torch.randn(m, layer.in_features, device="cuda", dtype=torch.bfloat16)
    tilings = [t for t in candidate_tiles(m, layer.out_features, layer.in_features, BLOCKSIZE, sm_count(x.device))
               if t.permute]
    compile_candidates((layer, x, t) for t in tilings)
    best = (float("inf"), None)
    for tiles in tilings:
        try:
            us = measure(layer, m, tiles=tiles, with_bnb=False, weights=rotation)["fused_us"]
        except Exception as e:  # noqa: BLE001 - reported and skipped, as the calibration skips it
            print(f"  M={m} {tiles}: {type(e).__name__}: {str(e)[:160]}")
            continue
        best = min(best, (us, tiles), key=lambda b: b[0])
    return best


def after_a_kernel_us(m: int, k: int, matmuls: list) -> float:
    """GPU time a call of each of `matmuls` (callables of x) with an elementwise kernel writing x before it, less that
    kernel's own time."""
    from loraplex.runtime.nf4_calibration import median_gpu_us
    src = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    x = torch.empty_like(src)
    one = torch.ones((), device="cuda", dtype=torch.bfloat16)

    def write_x():
        torch.mul(src, one, out=x)

    def pairs():
        for matmul in matmuls:
            write_x()
            matmul(x)

    def writes():
        for _ in matmuls:
            write_x()

    return (median_gpu_us(pairs)[0] - median_gpu_us(writes)[0]) / len(matmuls)


@torch.inference_mode()
def early_ab(rows: list[int]) -> list[dict]:
    from loraplex.kernels import nf4_matmul
    from loraplex.runtime.nf4_linear import fused_matmul
    out = []
    for case in served_cases(rows):
        name, m, x, rotation = case.name, case.rows, case.x, case.rotation
        n, k = case.layer.out_features, case.layer.in_features
        row, products = {"weight": name, "rows": m, "dense_us": case.dense_us}, {}
        for key, early in (("late", False), ("early", True)):
            nf4_matmul.EARLY_LAUNCH = early
            us, tiles = fastest(case.layer, m, rotation)
            products[key] = (tiles, fused_matmul(x, *rotation[0], n, tiles=tiles))
            row[f"{key}_us"], row[f"{key}_tiles"] = us, str(tiles)
            row[f"after_kernel_{key}_us"] = after_a_kernel_us(
                m, k, [lambda x, w=w, s=s, t=tiles: fused_matmul(x, w, s, n, tiles=t) for w, s in rotation])
        nf4_matmul.EARLY_LAUNCH = False  # each tiling launched the other way: the same bits
        row["same"] = all(torch.equal(fused_matmul(x, *rotation[0], n, tiles=tiles), product)
                          for tiles, product in products.values())
        nf4_matmul.EARLY_LAUNCH = True
        row["after_kernel_dense_us"] = after_a_kernel_us(
            m, k, [lambda x, w=w: torch.nn.functional.linear(x, w) for w in case.dense_weights])
        for key in ("late", "early"):
            row[f"{key}_over_dense"] = row[f"{key}_us"] / row["dense_us"]
            row[f"after_kernel_{key}_over_dense"] = row[f"after_kernel_{key}_us"] / row["after_kernel_dense_us"]
        print(f"{name:>17} M={m:<3} back to back: late {row['late_us']:6.2f} early {row['early_us']:6.2f} "
              f"dense {row['dense_us']:6.2f} us ({row['late_over_dense']:.3f} -> {row['early_over_dense']:.3f} "
              f"of dense) | after a kernel: late {row['after_kernel_late_us']:6.2f} early "
              f"{row['after_kernel_early_us']:6.2f} dense {row['after_kernel_dense_us']:6.2f} "
              f"({row['after_kernel_late_over_dense']:.3f} -> {row['after_kernel_early_over_dense']:.3f}) "
              f"{'same' if row['same'] else 'DIFFERENT'}")
        out.append(row)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 16, 32, 48, 64])
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "nf4_early_launch.json"))
    args = parser.parse_args()
    if not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 9:
        raise SystemExit("bench/nf4_early_launch.py needs a Hopper (sm90) or newer GPU")
    import triton
    started = time.time()
    rows = early_ab(args.rows)
    summary = {key: max(r[key] for r in rows) for key in ("late_over_dense", "early_over_dense",
                                                          "after_kernel_late_over_dense", "after_kernel_early_over_dense")}
    summary["all_same"] = all(r["same"] for r in rows)
    print("worst over the cases: " + ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}"
                                               for k, v in summary.items()))
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
                   "summary": summary, "early_ab": rows, "seconds": round(time.time() - started, 1)}, f, indent=1)
    print(f"wrote {args.out}")
    figures.draw_after_run(args.out)


if __name__ == "__main__":
    main()
