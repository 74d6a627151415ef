"""Where an eager step's wall time goes: host work (building inputs, launching kernels) against GPU time (GPU).

Loads a random-weight checkpoint of a bench/serve_gpu.py shape in-process (NF4), builds steps of the
kinds a serving trace runs eagerly (a long prefill, several prompts, decode rows beside a prefill chunk;
base and with distinct adapters), and for each one, after warm-up:
- host_ms: from calling the model runner until it returns (the GPU still running),
- gpu_ms: CUDA events around the step,
- wall_ms: until the GPU is done,
then cProfile's hottest functions for one step. A step is host-bound when host_ms ≈ wall_ms ≈ gpu_ms
(the GPU waits for launches). Steps that the runner replays as mixed CUDA graphs also report their logits' relative difference from the eager path.
Writes bench/results/step_host.json (or --out) and its PNG, and prints a table last.
"""
from __future__ import annotations

import argparse
import ast
import cProfile
import io
import itertools
import json
import pstats
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import figures  # noqa: E402 - bench/, beside this file: a PNG beside the JSON
import serve_gpu_models  # noqa: E402
from profile_step import adapter  # noqa: E402

from loraplex.kernels.lora_fold import FOLD_ALIGN, FOLD_BLOCKS  # noqa: E402
from loraplex.runtime.adapters.registry import AdapterRef  # noqa: E402
from loraplex.runtime.adapters.slots import LOADING  # noqa: E402
from loraplex.runtime.base_model import load_base_model  # noqa: E402
from loraplex.runtime.engine import Engine, EngineConfig  # noqa: E402
from loraplex.runtime.sampler import sample  # noqa: E402
from loraplex.runtime.sequence import SamplingParams, Sequence  # noqa: E402
from loraplex.runtime.warm_up import warm_up  # noqa: E402

# case -> (decode rows, prefill chunks as (prompt tokens, chunk tokens), adapters: none | distinct)
CASES = {
    "prefill_2048": (0, [(2048, 2048)], "none"),
    "prefill_2048_adapter": (0, [(2048, 2048)], "distinct"),
    "four_prefill_512_adapters": (0, [(512, 512)] * 4, "distinct"),
    "mixed_64d_512p": (64, [(1024, 512)], "none"),
    "mixed_64d_512p_adapters": (64, [(1024, 512)], "distinct"),
    "mixed_200d_256p": (200, [(1024, 256)], "none"),
    "mixed_200d_256p_adapters": (200, [(1024, 256)], "distinct"),
}


def build(engine: Engine, refs, decode_rows: int, chunks, kind: str, seed: int):
    g = torch.Generator().manual_seed(seed)
    vocab = engine.base.config.vocab_size
    params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    batch, owners = [], itertools.cycle(refs)
    specs = [(300, 1)] * decode_rows + list(chunks)
    for prompt_len, n in specs:
        ref = next(owners) if kind == "distinct" else None
        seq = Sequence(torch.randint(4, vocab, (prompt_len,), generator=g).tolist(), params, ref, lambda out: None)
        if ref is not None:
            seq.adapter_slot = engine.slots.acquire(ref)
            while seq.adapter_slot == LOADING:
                torch.cuda.synchronize()
                seq.adapter_slot = engine.slots.acquire(ref)
            assert seq.adapter_slot is not None, "more distinct adapters than slots"
        engine.blocks.allocate(seq, prompt_len)
        seq.num_computed = prompt_len - 1 if n == 1 else prompt_len - n  # K/V before it: whatever the cache holds
        batch.append((seq, n))
    return batch


def run_once(engine: Engine, batch, computed) -> tuple[float, float, float]:
    for (seq, _), c in zip(batch, computed):
        seq.num_computed = c
    ready = [seq for seq, n in batch if seq.num_computed + n == len(seq)]
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    t0 = time.perf_counter()
    start.record()
    logits = engine.runner.run(batch)
    t1 = time.perf_counter()
    end.record()
    sample(logits, ready, None)  # the engine's one device->host copy (synchronises)
    torch.cuda.synchronize()
    t2 = time.perf_counter()
    return (t1 - t0) * 1e3, start.elapsed_time(end), (t2 - t0) * 1e3


def graph_vs_eager(engine: Engine, batch, computed) -> tuple[float, float] | None:
    """Relative difference of the step's logits between the mixed CUDA graph and the eager path, and for
    scale the eager path's own with the adapter kernels' split-K forced to 1 (another summation order)."""
    runner = engine.runner
    if not runner.mixed_graphs:
        return None
    results = []
    for eager, splits in ((False, None), (True, None), (True, 1)):
        for (seq, _), c in zip(batch, computed):
            seq.num_computed = c
        if eager:
            runner._mixed_graph_fits = lambda *args: False
        engine.ops.num_splits = splits
        try:
            results.append(runner.run(batch).float().clone())
        finally:
            runner.__dict__.pop("_mixed_graph_fits", None)
            engine.ops.num_splits = None
    graph, eager, eager_one_split = results
    rel = lambda a, b: ((a - b).norm() / b.norm()).item()  # noqa: E731
    return rel(graph, eager), rel(eager_one_split, eager)


def measure(engine: Engine, batch, repeats: int) -> dict:
    computed = [seq.num_computed for seq, _ in batch]
    for _ in range(3):
        run_once(engine, batch, computed)
    rows = [run_once(engine, batch, computed) for _ in range(repeats)]
    prof = cProfile.Profile()
    for (seq, _), c in zip(batch, computed):
        seq.num_computed = c
    torch.cuda.synchronize()
    prof.enable()
    engine.runner.run(batch)
    torch.cuda.synchronize()
    prof.disable()
    text = io.StringIO()
    pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(25)
    tot = io.StringIO()
    pstats.Stats(prof, stream=tot).sort_stats("cumulative").print_stats(30)
    med = [statistics.median(r[i] for r in rows) for i in range(3)]
    return {"host_ms": med[0], "gpu_ms": med[1], "wall_ms": med[2], "tokens": sum(n for _, n in batch),
            "graph_vs_eager_rel_err": graph_vs_eager(engine, batch, computed),
            "rows": len(batch), "profile_tottime": text.getvalue(), "profile_cumulative": tot.getvalue()}


def measure_gpu(engine: Engine, batch, computed: list[int], repeats: int) -> float:
    """The step's median GPU time only (after warm-up runs), each run from `computed` tokens per sequence."""
    for _ in range(3):
        run_once(engine, batch, computed)
    return statistics.median(run_once(engine, batch, computed)[1] for _ in range(repeats))


def kernel_us(engine: Engine, batch, computed: list[int], runs: int = 3) -> dict[str, float]:
    """GPU microseconds per step by kernel name (torch.profiler over `runs` steps, CUDA-graph replays included)."""
    from torch.profiler import ProfilerActivity, profile as torch_profile
    run_once(engine, batch, computed)
    with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(runs):
            run_once(engine, batch, computed)
    times: dict[str, float] = {}
    for e in prof.key_averages():
        us = getattr(e, "self_device_time_total", 0.0) / runs
        if us > 0:
            times[e.key] = times.get(e.key, 0.0) + us
    return times


def print_kernel_diff(name: str, unfolded: dict[str, float], folded: dict[str, float], top: int = 14,
                      change: str = "folded - unfolded") -> None:
    """The kernels whose time per step changed most between two runs of a step (folded against unfolded)."""
    keys = sorted(set(unfolded) | set(folded), key=lambda k: -abs(folded.get(k, 0.0) - unfolded.get(k, 0.0)))
    print(f"-- {name}: kernels by the change of their GPU time per step, {change} (us); "
          f"totals {sum(folded.values()):.0f} vs {sum(unfolded.values()):.0f}")
    for k in keys[:top]:
        a, b = unfolded.get(k, 0.0), folded.get(k, 0.0)
        print(f"   {b - a:+9.1f} {a:9.1f} -> {b:9.1f}  {k[:110]}")


def ops_variants(specs: list[str]) -> list[tuple[str, dict]]:
    """--ops-ab values, each "name=value[,name=value...]": (label, {TritonAdapterOps attribute: value})."""
    variants = []
    for spec in specs:
        knobs = {}
        for pair in spec.split(","):
            name, _, value = pair.partition("=")
            knobs[name.strip()] = ast.literal_eval(value.strip())
        variants.append((spec, knobs))
    return variants


def time_ops_variants(engine: Engine, batch, computed: list[int], repeats: int, variants, r: dict, name: str) -> None:
    """The step again under each variant of the adapter ops' knobs (graphs recaptured: a knob is not part of a
    graph's key), beside the default's GPU time and kernels."""
    ops, runner = engine.ops, engine.runner
    default_kernels = kernel_us(engine, batch, computed)
    r["kernel_us"] = default_kernels
    r["ops_ab"] = {}
    for label, knobs in variants:
        saved = {k: getattr(ops, k) for k in knobs}
        try:
            for k, v in knobs.items():
                setattr(ops, k, v)
            runner.drop_graphs()
            gpu_ms = measure_gpu(engine, batch, computed, repeats)
            kernels = kernel_us(engine, batch, computed)
        finally:
            for k, v in saved.items():
                setattr(ops, k, v)
            runner.drop_graphs()
        r["ops_ab"][label] = {"gpu_ms": gpu_ms, "over_default": gpu_ms / r["gpu_ms"], "kernel_us": kernels}
        print(f"-- {name}, {label}: GPU {gpu_ms:.2f} ms against {r['gpu_ms']:.2f} ({gpu_ms / r['gpu_ms']:.3f})")
        print_kernel_diff(f"{name}, {label}", default_kernels, kernels, change="variant - default")
    measure_gpu(engine, batch, computed, 1)  # the default's graphs captured again, outside the next case's timing


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="1b")
    ap.add_argument("--work", type=Path, default=Path("/tmp/serve_gpu"))
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "step_host.json")
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--no-warm-up", action="store_true")
    ap.add_argument("--fold-ab", action="store_true",
                    help="time the adapter cases again with their prefill deltas folded into the NF4 matmuls "
                         "(kernels/lora_fold.py; off by default)")
    ap.add_argument("--ops-ab", action="append", default=[], metavar="KNOB=VALUE[,KNOB=VALUE]",
                    help="time the adapter cases again with TritonAdapterOps knobs set (repeatable: one variant "
                         "each), e.g. presum=False (split-K sums in the expand, no reduce launch), num_splits=1, "
                         "hybrid_passes=2; prints each variant's kernel diff against the default")
    ap.add_argument("--max-gpu-adapters", type=int, default=None,
                    help="adapter slots (default: the server's, which sizes a mixed graph's tile list)")
    args = ap.parse_args()
    shape = serve_gpu_models.SHAPES[args.shape]
    model_dir = serve_gpu_models.write_checkpoint(shape, args.work / args.shape / "model", "cuda")
    base = load_base_model(str(model_dir), quantization="nf4", device="cuda")
    engine = Engine(base, EngineConfig(kv_cache_tokens=1 << 18, prefix_caching=False,
                                        max_gpu_adapters=args.max_gpu_adapters, fold_prefill_adapters=0))
    if not args.no_warm_up:
        print(f"warm-up {warm_up(engine):.1f} s", flush=True)
    refs = [AdapterRef(f"a{i}", 1, adapter(base.projection_shapes, base.num_layers, seed=i)) for i in range(64)]
    result = {"device": torch.cuda.get_device_name(), "shape": args.shape, "cases": {}}
    for i, name in enumerate(args.cases.split(",")):
        decode_rows, chunks, kind = CASES[name]
        batch = build(engine, refs, decode_rows, chunks, kind, seed=i)
        computed = [seq.num_computed for seq, _ in batch]
        r = result["cases"][name] = measure(engine, batch, args.repeats)
        if args.ops_ab and kind == "distinct":
            time_ops_variants(engine, batch, computed, args.repeats, ops_variants(args.ops_ab), r, name)
        if args.fold_ab and kind == "distinct":
            before = engine.runner.folded_steps
            unfolded_kernels = kernel_us(engine, batch, computed)
            try:
                r["fold_blocks"] = engine.ops.set_fold_blocks(FOLD_BLOCKS)
                for align in (FOLD_ALIGN, 1):  # the extension padded to aligned K, and not
                    engine.ops.fold_align = align
                    r[f"gpu_ms_folded_align{align}"] = measure_gpu(engine, batch, computed, args.repeats)
                    folded_kernels = kernel_us(engine, batch, computed)
                    r[f"kernel_us_folded_align{align}"] = folded_kernels
                    print_kernel_diff(f"{name}, K aligned to {align}", unfolded_kernels, folded_kernels)
                r["kernel_us_unfolded"] = unfolded_kernels
            finally:
                engine.ops.set_fold_blocks(0)
                engine.ops.fold_align = FOLD_ALIGN
            r["gpu_ms_folded"] = r[f"gpu_ms_folded_align{FOLD_ALIGN}"]
            r["folded_steps"] = engine.runner.folded_steps - before  # 0: the step did not fold (too small a share)
        for seq, _ in batch:
            engine.blocks.free(seq)
            if seq.adapter is not None:
                engine.slots.release(seq.adapter)
        print(f"== {name}: host {r['host_ms']:.1f} ms, GPU {r['gpu_ms']:.1f} ms, wall {r['wall_ms']:.1f} ms\n"
              f"{r['profile_tottime']}\n{r['profile_cumulative']}", flush=True)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))
    figures.draw_after_run(args.out)
    print(f"{'case':28s} {'tokens':>7s} {'host ms':>8s} {'GPU ms':>8s} {'wall ms':>8s} {'wall/GPU':>8s} "
          f"{'graph vs eager':>14s} {'eager split=1':>14s}")
    for name, r in result["cases"].items():
        print(f"{name:28s} {r['tokens']:7d} {r['host_ms']:8.1f} {r['gpu_ms']:8.1f} {r['wall_ms']:8.1f} "
              f"{r['wall_ms'] / r['gpu_ms']:8.2f} {(r['graph_vs_eager_rel_err'] or (0, 0))[0]:14.2e} "
              f"{(r['graph_vs_eager_rel_err'] or (0, 0))[1]:14.2e}")
    folds = {name: r for name, r in result["cases"].items() if "gpu_ms_folded" in r}
    if folds:  # the adapter's cost over the base step, folded and not (base case: the name without "_adapter...")
        print(f"\n{'case':28s} {'GPU ms folded':>14s} {'K unaligned':>12s} {'unfolded':>9s} {'ratio':>6s} "
              f"{'over base: folded':>18s} {'unfolded':>9s} {'folded steps':>12s}")
        for name, r in folds.items():
            base = result["cases"].get(name.split("_adapter")[0], {}).get("gpu_ms")
            r["folded_over_unfolded"] = r["gpu_ms_folded"] / r["gpu_ms"]
            over = (f"{r['gpu_ms_folded'] / base:18.3f} {r['gpu_ms'] / base:9.3f}" if base else f"{'':28s}")
            print(f"{name:28s} {r['gpu_ms_folded']:14.2f} {r['gpu_ms_folded_align1']:12.2f} {r['gpu_ms']:9.2f} "
                  f"{r['folded_over_unfolded']:6.3f} {over} {r['folded_steps']:12d}")
        args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
