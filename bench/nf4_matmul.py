"""The fused NF4 kernel against bitsandbytes' matmul_4bit, on Llama-3 8B / 3.2-1B weight shapes (GPU).

For every weight (out x in: fused qkv and gate_up included), quantised exactly as runtime/base_model.py
does (bitsandbytes Linear4bit, NF4, double quantisation, blocksize 64, bf16 compute):
  check  relative error (vs float64 x @ dequantize_4bit(W).T) of the fused kernel and of bitsandbytes
  time   median GPU time per call of each path for M rows, from CUDA-graph replays that rotate over
         copies of the weight (together > 2x L2: decode reads every layer's weights from HBM);
         this is runtime/nf4_calibration.calibrate's measurement, so its DISPATCH thresholds come out too
  floor  (packed bytes + absmax bytes) / device-to-device copy bandwidth (bytes read + written)
The table shows each path's time over the floor; the JSON has the microseconds and a suggested DISPATCH.
--sweep also times alternative tile shapes for a few cases (to tune kernels/nf4_tiles.choose_tiles).
--decode-ab times every candidate tiling with each decode (shared-memory table gather, register byte permutes),
checks that both give the same product, and sets the best of each beside a dense bf16 matmul.
--sum-ab times the split-K candidates with their partial sums added by a second launch and in the kernel (the last
program of each output tile to finish adds them), on the four matmuls of an 8B layer, beside dense bf16.
--grid WEIGHT times a grid of tilings (output features per program, splits, warps, stages, prefetch; the permute
decode) beyond the calibration's candidates, on one weight at --rows, beside a dense bf16 matmul
(bench/results/nf4_tile_grid.json: the 8B o_proj at 48 and 64 rows, where no candidate beats dense);
--grid-codes-as-b makes that grid one of codes-as-B tiles (up to 256 features a program, 8 warps, input steps of 128,
prefetching).
dequant: prefill's whole-weight dequantisation (kernels/nf4_dequant.py vs bitsandbytes' dequantize_4bit, the
calibration's timing), as a fraction of the copy bandwidth (packed + absmax read, the bf16 weight written).

usage: python bench/nf4_matmul.py [--rows 1 8 16 32 64] [--sweep] [--out bench/results/nf4_matmul.json]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time

import torch
import figures  # noqa: E402 - bench/, beside this file: a PNG beside the JSON

WEIGHTS = {  # name: (out_features, in_features)
    "8b o_proj": (4096, 4096),
    "8b gate/up": (14336, 4096),
    "8b down_proj": (4096, 14336),
    "8b qkv fused": (6144, 4096),
    "8b gate_up fused": (28672, 4096),
    "1b o_proj": (2048, 2048),
    "1b qkv fused": (3072, 2048),
    "1b gate_up fused": (16384, 2048),
    "1b down_proj": (2048, 8192),
}
SWEEP_CASES = [("8b o_proj", 1), ("8b o_proj", 16), ("8b o_proj", 64), ("8b gate_up fused", 16),
               ("8b down_proj", 16), ("1b o_proj", 16)]
BLOCKSIZE = 64


def copy_bandwidth() -> float:
    """Bytes read + written per second of a 1 GiB device-to-device copy (median of CUDA-event timings)."""
    from loraplex.runtime.nf4_calibration import median_gpu_us
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)
    us, _ = median_gpu_us(lambda: dst.copy_(src), calls=5, repeats=7)
    return 2 * (1 << 30) / (us * 1e-6)


def make_layer(out_features: int, in_features: int, seed: int):
    """An NF4Linear on CUDA built the way runtime/base_model.py quantize_nf4 builds its Linear4bit."""
    import bitsandbytes as bnb
    from loraplex.runtime.nf4_linear import NF4Linear
    g = torch.Generator(device="cuda").manual_seed(seed)
    dense = (torch.randn(out_features, in_features, device="cuda", generator=g) * 0.02).to(torch.bfloat16)
    q = bnb.nn.Linear4bit(in_features, out_features, bias=False, compute_dtype=torch.bfloat16,
                          compress_statistics=True, quant_type="nf4", device="meta")
    q.weight = bnb.nn.Params4bit(dense.cpu(), requires_grad=False, blocksize=BLOCKSIZE, compress_statistics=True,
                                 quant_type="nf4")
    return NF4Linear.from_bnb(q.to("cuda")).eval()


def weight_bytes(layer) -> int:
    state = layer.weight.quant_state
    n = layer.weight.data.numel() * layer.weight.data.element_size()
    n += state.absmax.numel() * state.absmax.element_size()
    if state.nested:
        n += state.state2.absmax.numel() * 4
    return n


@torch.inference_mode()
def check(layer, rows: int) -> dict:
    """Relative errors of both paths against float64 on the dequantised weight."""
    x = torch.randn(rows, layer.in_features, device="cuda", dtype=torch.bfloat16)
    ref = x.double() @ layer.dequantize_weight().double().T
    rel = lambda y: ((y.double() - ref).norm() / ref.norm()).item()
    fused, bnb_out = layer.fused_forward(x), layer.bnb_forward(x)
    return {"rows": rows, "fused_rel_err": rel(fused), "bnb_rel_err": rel(bnb_out),
            "fused_vs_bnb": ((fused.double() - bnb_out.double()).norm() / bnb_out.double().norm()).item()}


def sweep(layers: dict, bandwidth: float) -> list[dict]:
    from loraplex.kernels.nf4_tiles import NF4Tiles, choose_tiles, sm_count
    from loraplex.runtime.nf4_calibration import measure
    out = []
    for name, rows in SWEEP_CASES:
        layer = layers[name]
        n, k = layer.out_features, layer.in_features
        rule = choose_tiles(rows, n, k, BLOCKSIZE, sm_count(torch.device("cuda")))
        floor = weight_bytes(layer) / bandwidth * 1e6
        candidates = {rule}
        for bn, bk, warps in ((128, 128, 4), (128, 64, 4), (256, 128, 8), (128, 256, 4)):
            for stages in (1, 2, 3):
                for splits in {rule.splits, max(1, rule.splits // 2), rule.splits * 2}:
                    candidates.add(NF4Tiles(rule.block_m, bn, bk, min(splits, k // bk), warps, stages))
        results = []
        for tiles in sorted(candidates, key=str):
            try:
                with torch.inference_mode():
                    us = measure(layer, rows, tiles=tiles)["fused_us"]
            except Exception as e:  # noqa: BLE001 - a tile shape that does not compile or fit is just skipped
                us = float("inf")
                print(f"  {tiles}: {type(e).__name__}: {str(e)[:120]}")
            results.append((us, tiles))
        results.sort(key=lambda r: r[0])
        rule_us = next(us for us, t in results if t == rule)
        best_us, best = results[0]
        print(f"sweep {name:>17} M={rows:<3} rule {rule_us:7.1f} us ({rule_us / floor:4.2f}x)  best {best_us:7.1f} us "
              f"({best_us / floor:4.2f}x) {best}")
        out.append({"weight": name, "rows": rows, "rule": vars(rule), "rule_us": rule_us, "floor_us": floor,
                    "top": [{"us": us, **vars(t)} for us, t in results[:8]]})
    return out


@torch.inference_mode()
def tile_grid(layer, name: str, rows: list[int], codes_as_b: bool = False) -> dict:
    """Every tiling of a grid on one weight at the largest of `rows` (then its six fastest at the others), beside a
    dense bf16 matmul: whether any tiling the calibration does not try would beat dense. codes_as_b: a grid of
    codes-as-B tiles instead (output features a program up to 256, 4 or 8 warps, deeper pipelines, input steps of
    64 and 128), beside the calibration's own codes-as-B candidates; all compiled in threads before any is timed."""
    import itertools
    from loraplex.kernels.nf4_tiles import NF4Tiles, candidate_tiles, sm_count
    from loraplex.runtime.nf4_calibration import compile_candidates, measure, measure_dense, nf4_rotation
    n, k = layer.out_features, layer.in_features
    rotation, dense = nf4_rotation(layer), measure_dense(layer, rows)
    results = []

    def run(m: int, tiles) -> None:
        try:
            us = measure(layer, m, tiles=tiles, with_bnb=False, weights=rotation)["fused_us"]
        except Exception as e:  # noqa: BLE001 - a tiling that does not compile or fit is reported and skipped
            print(f"  {tiles}: {type(e).__name__}: {str(e)[:120]}")
            return
        results.append({"rows": m, "us": us, "over_dense": us / dense[m], "tiles": str(tiles)})
        print(f"grid {name} M={m:<3} {us:6.2f} us ({us / dense[m]:.2f} of dense)  {tiles}")

    top, others = max(rows), sorted(set(rows) - {max(rows)})
    candidates = [t for t in candidate_tiles(top, n, k, BLOCKSIZE, sm_count(torch.device("cuda")))
                  if (t.codes_as_b if codes_as_b else t.permute and not t.prescale)]
    if codes_as_b:
        grid = [NF4Tiles(64, bn, bk, splits, warps, stages, permute=True, prescale=True, codes_as_b=True)
                for bn, bk, splits, warps, stages in
                itertools.product((128, 256), (64, 128), (8, 16), (4, 8), (3, 4))]
        # and with the next step's loads issued ahead (one absmax block a step): the fastest at 64 rows of o_proj
        grid += [NF4Tiles(64, bn, BLOCKSIZE, splits, warps, stages, prefetch=True, permute=True, prescale=True,
                          codes_as_b=True)
                 for bn, splits, warps, stages in itertools.product((64, 128, 256), (4, 8, 16), (4, 8), (3, 4))]
    else:
        grid = [NF4Tiles(64 if top > 32 else 32, bn, 64, splits, warps, stages, prefetch, permute=True)
                for bn, splits, warps, stages, prefetch in
                itertools.product((32, 64), (4, 8, 16), (2, 4), (3, 4), (False, True))]
    tilings = list(dict.fromkeys(candidates + grid))
    x = torch.randn(top, k, device=layer.weight.device, dtype=torch.bfloat16)
    compile_candidates((layer, x, tiles) for tiles in tilings)
    for tiles in tilings:
        run(top, tiles)
    best = sorted((r for r in results if r["rows"] == top), key=lambda r: r["us"])[:6]
    for m in others:
        for r in best:
            run(m, next(t for t in tilings if str(t) == r["tiles"]))
    summary = {m: min((r["over_dense"] for r in results if r["rows"] == m), default=None) for m in rows}
    print(f"grid {name}: best over dense by rows {summary}")
    return {"weight": name, "dense_us": dense, "best_over_dense": summary, "results": results}


@torch.inference_mode()
def decode_ab(layers: dict, rows: list[int]) -> list[dict]:
    """Per weight and row count: the fastest candidate tiling with the gather decode, with the permute decode and
    (above PRESCALE_ROWS rows) with the permute decode's codes scaled before the dot, a dense bf16 matmul of the same
    shape, and whether the two unscaled decodes give the same product (bitwise)."""
    from dataclasses import replace
    from loraplex.kernels.nf4_tiles import PRESCALE_ROWS, candidate_tiles, sm_count
    from loraplex.runtime.nf4_calibration import measure, measure_dense, nf4_rotation
    from loraplex.runtime.nf4_linear import fused_matmul
    out = []
    for name, layer in layers.items():
        n, k = layer.out_features, layer.in_features
        rotation = nf4_rotation(layer)
        dense = measure_dense(layer, rows)
        state, packed = layer.weight.quant_state, layer.weight.data
        for m in rows:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            decodes = {"gather": {}, "permute": {"permute": True}}
            if m > PRESCALE_ROWS:
                decodes["prescale"] = {"permute": True, "prescale": True}
            best = {decode: (float("inf"), None) for decode in decodes}
            same = True
            gather_tiles = [t for t in candidate_tiles(m, n, k, BLOCKSIZE, sm_count(x.device)) if not t.permute]
            for tiles in gather_tiles:
                for decode, fields in decodes.items():
                    t = replace(tiles, **fields)
                    try:
                        us = measure(layer, m, tiles=t, with_bnb=False, weights=rotation)["fused_us"]
                    except Exception as e:  # noqa: BLE001
                        print(f"  {name} M={m} {t}: {type(e).__name__}: {str(e)[:160]}")
                        continue
                    best[decode] = min(best[decode], (us, str(t)), key=lambda b: b[0])
                same &= torch.equal(fused_matmul(x, packed, state, n, tiles=tiles),
                                    fused_matmul(x, packed, state, n, tiles=replace(tiles, permute=True)))
            scaled = best.get("prescale", (None, None))
            row = {"weight": name, "rows": m, "gather_us": best["gather"][0], "permute_us": best["permute"][0],
                   "prescale_us": scaled[0], "dense_us": dense[m], "gather_tiles": best["gather"][1],
                   "permute_tiles": best["permute"][1], "prescale_tiles": scaled[1], "same": same}
            print(f"decode {name:>17} M={m:<3} gather {row['gather_us']:6.1f} permute {row['permute_us']:6.1f} "
                  f"prescale {'-' if scaled[0] is None else f'{scaled[0]:6.1f}'} dense {row['dense_us']:6.1f} us  "
                  f"best/dense {min(t for t in (row['permute_us'], scaled[0]) if t is not None) / row['dense_us']:.2f} "
                  f"{'same' if same else 'DIFFERENT'}")
            out.append(row)
    return out


SERVED_8B = ("8b qkv fused", "8b o_proj", "8b gate_up fused", "8b down_proj")  # the four matmuls of an 8B layer


@torch.inference_mode()
def sum_ab(layers: dict, rows: list[int]) -> list[dict]:
    """Per weight and row count: the fastest split-K candidate tiling (permute decode, scaled or not) with its partial
    sums added by a second launch and by the tile's last program in the kernel itself, beside the fastest unsplit one,
    the fastest with x's rows as the wgmma's M (codes_as_b, from 64 rows) and a dense bf16 matmul; and whether both
    sums give the same product (bitwise: the same additions in order)."""
    from dataclasses import replace
    from loraplex.kernels.nf4_tiles import MAX_SPLITS, candidate_tiles, sm_count
    from loraplex.runtime.nf4_calibration import measure, measure_dense, nf4_rotation
    from loraplex.runtime.nf4_linear import fused_matmul
    out = []
    for name, layer in layers.items():
        n, k = layer.out_features, layer.in_features
        rotation, dense = nf4_rotation(layer), measure_dense(layer, rows)
        state, packed = layer.weight.quant_state, layer.weight.data
        for m in rows:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            tiles = [t for t in candidate_tiles(m, n, k, BLOCKSIZE, sm_count(x.device)) if t.permute]
            # with no second launch, more splits may pay: twice those of each split candidate
            tiles += [replace(t, splits=min(2 * t.splits, MAX_SPLITS, k // t.block_k)) for t in tiles if t.splits > 1]
            # x rows as the wgmma's M and the codes as its B operand (64 rows and more), also 128 features a program
            wide = [t for t in tiles if t.block_m >= 64]
            tiles += [replace(t, codes_as_b=True) for t in wide]
            tiles += [replace(t, codes_as_b=True, block_n=128, num_warps=w)
                      for t in wide if t.block_n == 64 for w in (4, 8)]
            best = {"unsplit": (float("inf"), None), "second_launch": (float("inf"), None),
                    "in_kernel": (float("inf"), None), "codes_as_b": (float("inf"), None)}
            same = True
            for t in dict.fromkeys(tiles):
                if t.codes_as_b:
                    modes = {"codes_as_b": t}
                elif t.splits == 1:
                    modes = {"unsplit": t}
                else:
                    modes = {"second_launch": replace(t, sum_in_kernel=False),
                             "in_kernel": replace(t, sum_in_kernel=True)}
                for mode, tm in modes.items():
                    try:
                        us = measure(layer, m, tiles=tm, with_bnb=False, weights=rotation)["fused_us"]
                    except Exception as e:  # noqa: BLE001 - reported and skipped
                        print(f"  {name} M={m} {tm}: {type(e).__name__}: {str(e)[:160]}")
                        continue
                    best[mode] = min(best[mode], (us, str(tm)), key=lambda b: b[0])
                if t.codes_as_b:
                    same_as_a = fused_matmul(x, packed, state, n, tiles=replace(t, codes_as_b=False))
                    error = ((fused_matmul(x, packed, state, n, tiles=t).float() - same_as_a.float()).norm()
                             / same_as_a.float().norm()).item()
                    if error > 1e-2:
                        print(f"  {name} M={m} {t}: relative difference {error:.2e} from the codes-as-A product")
                        same = False
                elif t.splits > 1:
                    same &= torch.equal(fused_matmul(x, packed, state, n, tiles=modes["second_launch"]),
                                        fused_matmul(x, packed, state, n, tiles=modes["in_kernel"]))
            row = {"weight": name, "rows": m, "dense_us": dense[m], "same": same,
                   **{f"{mode}_us": b[0] for mode, b in best.items()},
                   **{f"{mode}_tiles": b[1] for mode, b in best.items()}}
            before = min(row["unsplit_us"], row["second_launch_us"])
            after = min(row["unsplit_us"], row["in_kernel_us"], row["codes_as_b_us"])
            row.update(best_before_over_dense=before / dense[m], best_after_over_dense=after / dense[m])
            print(f"sum {name:>17} M={m:<3} unsplit {row['unsplit_us']:6.1f} second launch "
                  f"{row['second_launch_us']:6.1f} in kernel {row['in_kernel_us']:6.1f} codes as B "
                  f"{row['codes_as_b_us']:6.1f} dense {dense[m]:6.1f} us  best/dense {before / dense[m]:.3f} -> "
                  f"{after / dense[m]:.3f} {'same' if same else 'DIFFERENT'}")
            out.append(row)
    worst = {key: max(r[key] for r in out) for key in ("best_before_over_dense", "best_after_over_dense")}
    print(f"sum: worst best/dense over the cases {worst['best_before_over_dense']:.3f} (second launch) -> "
          f"{worst['best_after_over_dense']:.3f} (in kernel)")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 8, 16, 32, 64])
    parser.add_argument("--sweep", action="store_true", help="also time alternative tile shapes")
    parser.add_argument("--decode-ab", action="store_true", help="only the gather-vs-permute decode comparison")
    parser.add_argument("--sum-ab", action="store_true",
                        help="only split-K sums by a second launch vs in the kernel (the 8B layer's four matmuls)")
    parser.add_argument("--grid", choices=list(WEIGHTS), default=None, help="only a grid of tilings on this weight")
    parser.add_argument("--grid-codes-as-b", action="store_true", help="with --grid: a grid of codes-as-B tilings")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "nf4_matmul.json"))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench/nf4_matmul.py needs a CUDA GPU")
    import bitsandbytes
    import triton
    from loraplex.runtime.nf4_calibration import calibrate

    started = time.time()
    bandwidth = copy_bandwidth()
    print(f"{torch.cuda.get_device_name()}: copy bandwidth {bandwidth / 1e12:.2f} TB/s; "
          f"cells: fused / bitsandbytes time over the 4-bit floor")
    if args.grid:
        result = tile_grid(make_layer(*WEIGHTS[args.grid], seed=0), args.grid, args.rows, args.grid_codes_as_b)
        with open(args.out, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                       "triton": triton.__version__, "grid": result}, f, indent=1)
        figures.draw_after_run(args.out)
        return
    layers = {name: make_layer(n, k, seed=i) for i, (name, (n, k)) in enumerate(WEIGHTS.items())}
    if args.sum_ab:
        rows = sum_ab({name: layers[name] for name in SERVED_8B}, args.rows)
        with open(args.out, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
                       "sum_ab": rows}, f, indent=1)
        figures.draw_after_run(args.out)
        return
    if args.decode_ab:
        rows = decode_ab({name: layer for name, layer in layers.items() if name.startswith("8b")}, args.rows)
        with open(args.out, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "decode_ab": rows}, f, indent=1)
        figures.draw_after_run(args.out)
        return
    checks = {name: [check(layer, rows) for rows in (1, 16, max(args.rows))] for name, layer in layers.items()}
    timings = calibrate(layers.values(), rows=args.rows)

    print(f"{'weight':>17} {'out x in':>12} {'floor us':>8} " + " ".join(f"{'M=' + str(m):>12}" for m in args.rows)
          + "  max err")
    cases, dispatch = [], {}
    for name, layer in layers.items():
        shape = (layer.out_features, layer.in_features)
        t = timings[shape]
        floor = weight_bytes(layer) / bandwidth * 1e6
        cells = " ".join(f"{t['fused_us'][m] / floor:5.2f}/{t['bnb_us'][m] / floor:<6.2f}" for m in args.rows)
        err = max(c["fused_rel_err"] for c in checks[name])
        print(f"{name:>17} {shape[0]:>5}x{shape[1]:<6} {floor:8.1f} {cells}  {err:.1e}")
        dispatch[f"{shape}"] = t["fused_rows"]
        for m in args.rows:
            cases.append({"weight": name, "out_features": shape[0], "in_features": shape[1], "rows": m,
                          "floor_us": floor, "fused_us": t["fused_us"][m], "bnb_us": t["bnb_us"][m],
                          "fused_over_floor": t["fused_us"][m] / floor, "bnb_over_floor": t["bnb_us"][m] / floor,
                          "speedup": t["bnb_us"][m] / t["fused_us"][m], "fused_tiles": t["tiles"][m]})
    dequant = []
    for name, layer in layers.items():
        shape = (layer.out_features, layer.in_features)
        moved = weight_bytes(layer) + shape[0] * shape[1] * 2
        times = timings[shape]["dequant_us"]
        dequant.append({"weight": name, **{f"{k}_us": v for k, v in times.items()},
                        **{f"{k}_bw_fraction": moved / (v * 1e-6) / bandwidth for k, v in times.items()}})
        print(f"dequant {name:>17}: triton {times['triton']:7.1f} us ({dequant[-1]['triton_bw_fraction']:.2f} of "
              f"bandwidth), bitsandbytes {times['bitsandbytes']:7.1f} us ({dequant[-1]['bitsandbytes_bw_fraction']:.2f})")
    worst_err = max(c["fused_rel_err"] for cs in checks.values() for c in cs)
    ok = worst_err < 1e-2
    print(f"correctness: worst fused relative error {worst_err:.2e} ({'ok' if ok else 'FAILED'}, bound 1e-2)")
    print("DISPATCH (row counts at which the fused kernel wins): "
          + "{" + ", ".join(f"{k}: {v}" for k, v in dispatch.items()) + "}")
    winners = [c["fused_tiles"] for c in cases]
    print(f"fastest tiling: prefetch in {sum('prefetch=True' in w for w in winners)} of {len(winners)} cases")
    sweep_results = sweep(layers, bandwidth) if args.sweep else []

    result = {
        "device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
        "bitsandbytes": bitsandbytes.__version__, "python": platform.python_version(),
        "copy_bandwidth_TBps": bandwidth / 1e12, "rows": args.rows, "correct": ok, "checks": checks,
        "cases": cases, "suggested_dispatch": dispatch, "sweep": sweep_results, "dequant": dequant,
        "seconds": round(time.time() - started, 1),
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {args.out} ({result['seconds']} s)")
    figures.draw_after_run(args.out)


if __name__ == "__main__":
    main()
