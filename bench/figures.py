"""Pictures of the benchmarks: one function per bench/ script draws its PNG from its JSON, beside it.

Each script calls `draw(json_path)` at the end of a run; to redraw from JSONs already written (the GPU
runs in bench/results/ cannot be repeated on a CPU):

    python bench/figures.py bench/results/*.json      # -> bench/results/<name>.png for each

Which function draws a file is chosen by its name (`kernels.json` -> lora_kernels, `engine_gpu_nf4_*.json`
-> engine, ...). serve_trace.py draws its own (`plot()` in that script). Only matplotlib is needed.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _bars(ax, labels, series: dict, ylabel: str, title: str, log: bool = False) -> None:
    """Grouped bars: one group per label, one bar per series (name -> values, None skipped)."""
    width = 0.8 / max(len(series), 1)
    for i, (name, values) in enumerate(series.items()):
        xs = [j + (i - (len(series) - 1) / 2) * width for j in range(len(labels))]
        pairs = [(x, v) for x, v in zip(xs, values) if v is not None]
        if pairs:
            ax.bar([p[0] for p in pairs], [p[1] for p in pairs], width, label=name)
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(labels, rotation=30, ha="right", fontsize=7)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    if log:
        ax.set_yscale("log")
    if len(series) > 1:
        ax.legend(fontsize=7)


def _where(result: dict) -> str:
    return str(result.get("device") or result.get("cpu_model") or "")


# -- one function per benchmark ----------------------------------------------------------------------------
def engine(result: dict, fig) -> None:
    """bench/engine_cpu.py: tok/s of each case (base-only vs distinct adapters); prefill/decode by dtype."""
    cases = result["results"]
    axes = fig.subplots(1, 2 if "dtypes" in result else 1, squeeze=False)[0]
    _bars(axes[0], list(cases), {"tok/s": [c["tokens_per_s"] for c in cases.values()]}, "tokens / s",
          f"engine, batch {result.get('batch')}, {result.get('quantization')}, {result.get('adapter_ops')} "
          f"({_where(result)})")
    for x, c in enumerate(cases.values()):
        axes[0].text(x, c["tokens_per_s"], f"{c['relative_to_base']:.2f}x", ha="center", va="bottom", fontsize=7)
    if "dtypes" in result:
        dtypes = result["dtypes"]
        _bars(axes[1], list(dtypes), {"prefill": [d["prefill_tokens_per_s"] for d in dtypes.values()],
                                      "decode": [d["decode_tokens_per_s"] for d in dtypes.values()]},
              "tokens / s", "prefill and decode by dtype", log=True)


def grpc_vs_http(result: dict, fig) -> None:
    """bench/grpc_vs_http.py: per-request latency p50 / p90, HTTP beside gRPC."""
    cases = result["results"]
    ax = fig.subplots()
    series = {f"{t} {q}": [cases[c][t][f"{q}_ms"] for c in cases] for t in ("http", "grpc") for q in ("p50", "p90")}
    _bars(ax, list(cases), series, "ms per request", f"gRPC vs HTTP, one server ({result.get('machine')})")


def lora_kernels(result: dict, fig) -> None:
    """bench/lora_kernels.py: fraction of copy bandwidth the segmented kernels reach, per layer case and group;
    a --prefill-sweep run: the layer's time per tile variant (and the runs on other cards in `other_runs`)."""
    if "summary" not in result and "prefill_sweep" in result:
        return prefill_sweep(result, fig)
    left, right = fig.subplots(1, 2)
    rows = result["summary"]["rows"]
    labels = [f"{r['phase']} {r['adapters']}x r{r['rank']} {r['kind']}" for r in rows]
    _bars(left, labels, {"bandwidth fraction": [r["bw_fraction"] for r in rows]}, "fraction of copy bandwidth",
          f"one Llama-3.1-8B decoder layer ({_where(result)})")
    groups = result.get("per_group", [])
    _bars(right, [g["group"] for g in groups], {"bandwidth fraction": [g["bw_fraction"] for g in groups]},
          "fraction of copy bandwidth", "per projection group")
    for ax in (left, right):
        ax.axhline(0.6, color="grey", lw=0.8, ls="--")
        ax.set_ylim(0, 1)


def prefill_sweep(result: dict, fig) -> None:
    ax = fig.subplots()
    variant = lambda r: (f"{r['block_m']}x{r['block_k']}x{r['block_r']}x{r['block_n']} w{r['expand_warps']} "
                         f"s{r['stages']} k{r['splits']}{' sum' if r['presum'] else ''}")
    runs = [result] + result.get("other_runs", [])
    labels = list(dict.fromkeys(variant(r) for run in runs for r in run["prefill_sweep"]))
    series = {}
    for run in runs:
        for adapters in sorted({r["adapters"] for r in run["prefill_sweep"]}):
            times = {variant(r): r["layer_us"] for r in run["prefill_sweep"] if r["adapters"] == adapters}
            series[f"{_where(run)}, {adapters} adapter(s)"] = [times.get(label) for label in labels]
    _bars(ax, labels, series, "us per layer (shrink + expand, 4 groups)",
          "a 2,048-token prefill layer, Llama-3.1-8B shape, rank 16: tiles m x k x r x n, expand warps, stages, "
          "splits, presummed")


def load(result: dict, fig) -> None:
    """bench/load.py: latency and time to first token per round (200 clients), RSS across rounds."""
    left, right = fig.subplots(1, 2)
    rounds = result["rounds"]
    labels = [f"round {i + 1}" for i in range(len(rounds))]
    _bars(left, labels, {k: [r[f"{k}_s"] for r in rounds] for k in ("latency_p50", "latency_p99", "ttft_p50", "ttft_p99")},
          "seconds", f"{result['settings']['clients']} clients over {result['settings']['adapters']} adapters")
    right.plot(range(1, len(rounds) + 1), [r["rss_bytes"] / 2**30 for r in rounds], "o-")
    right.set_xlabel("round")
    right.set_ylabel("server RSS (GiB)")
    right.set_title(f"mismatches {result['summary']['mismatches']}, 5xx {result['summary']['server_errors']}", fontsize=9)


def nf4_matmul(result: dict, fig) -> None:
    """bench/nf4_matmul.py: time over the 4-bit bandwidth floor against rows, fused kernel vs bitsandbytes."""
    cases = result["cases"]
    weights = list(dict.fromkeys(c["weight"] for c in cases))
    ax = fig.subplots()
    for i, w in enumerate(weights):
        mine = [c for c in cases if c["weight"] == w]
        color = f"C{i}"
        ax.plot([c["rows"] for c in mine], [c["fused_over_floor"] for c in mine], "o-", color=color, label=f"{w} fused")
        ax.plot([c["rows"] for c in mine], [c["bnb_over_floor"] for c in mine], "s--", color=color, alpha=0.6,
                label=f"{w} bitsandbytes")
    ax.axhline(1, color="grey", lw=0.8)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("rows (tokens)")
    ax.set_ylabel("time / bandwidth floor")
    ax.set_title(f"NF4 matmul ({_where(result)})", fontsize=9)
    ax.legend(fontsize=6, ncol=2)


def nf4_decode_ab(result: dict, fig) -> None:
    """bench/nf4_matmul.py --decode-ab: the fused kernel's time over a dense bf16 matmul against rows, per weight,
    with the table-gather decode, the byte-permute one and (from 33 rows) the permute decode with scaled codes."""
    rows = result["decode_ab"]
    ax = fig.subplots()
    for i, w in enumerate(dict.fromkeys(r["weight"] for r in rows)):
        mine = [r for r in rows if r["weight"] == w]
        ax.plot([r["rows"] for r in mine], [r["permute_us"] / r["dense_us"] for r in mine], "o-", color=f"C{i}",
                label=f"{w} permute")
        ax.plot([r["rows"] for r in mine], [r["gather_us"] / r["dense_us"] for r in mine], "s--", color=f"C{i}",
                alpha=0.5, label=f"{w} gather")
        scaled = [r for r in mine if r.get("prescale_us") is not None]  # (runs before the scaled decode: none)
        if scaled:
            ax.plot([r["rows"] for r in scaled], [r["prescale_us"] / r["dense_us"] for r in scaled], "^:",
                    color=f"C{i}", label=f"{w} prescale")
    ax.axhline(1, color="grey", lw=0.8)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("rows (tokens)")
    ax.set_ylabel("fused NF4 time / dense bf16 time")
    ax.set_title(f"NF4 decode: gather vs byte permutes ({_where(result)})", fontsize=9)
    ax.legend(fontsize=6, ncol=2)


def nf4_tile_grid(result: dict, fig) -> None:
    """bench/nf4_matmul.py --grid: every tiling's time over a dense bf16 matmul on one weight, per row count, sorted."""
    grid = result["grid"]
    ax = fig.subplots()
    for i, m in enumerate(sorted({r["rows"] for r in grid["results"]})):
        ratios = sorted(r["over_dense"] for r in grid["results"] if r["rows"] == m)
        ax.plot(range(1, len(ratios) + 1), ratios, "o-", ms=3, color=f"C{i}", label=f"{m} rows")
    ax.axhline(1, color="grey", lw=0.8)
    ax.set_xlabel("tilings, fastest first")
    ax.set_ylabel("fused NF4 time / dense bf16 time")
    ax.set_title(f"{grid['weight']}: every tiling of the grid ({_where(result)})", fontsize=9)
    ax.legend(fontsize=7)


def nf4_sum_ab(result: dict, fig) -> None:
    """bench/nf4_matmul.py --sum-ab: per weight and row count, the best tiling's time over dense bf16 with split-K sums
    by a second launch, in the kernel, and with the codes as the dot's B operand."""
    rows = result["sum_ab"]
    labels = [f"{r['weight']} M={r['rows']}" for r in rows]
    over = lambda key: [None if r[key] == float("inf") else r[key] / r["dense_us"] for r in rows]  # noqa: E731
    ax = fig.subplots()
    _bars(ax, labels, {"second launch": over("second_launch_us"), "in kernel": over("in_kernel_us"),
                       "codes as B": over("codes_as_b_us"), "unsplit": over("unsplit_us")},
          "fused NF4 time / dense bf16 time", f"NF4 split-K sums and operand order ({_where(result)})")
    ax.axhline(1, color="grey", lw=0.8)


def nf4_early_launch(result: dict, fig) -> None:
    """bench/nf4_early_launch.py: per weight and row count, the best tiling's time over dense bf16, launched after the
    previous kernel or early, back to back and after an elementwise kernel."""
    rows = result["early_ab"]
    labels = [f"{r['weight']} M={r['rows']}" for r in rows]
    series = {"late": "late_over_dense", "early": "early_over_dense", "late, after a kernel": "after_kernel_late_over_dense",
              "early, after a kernel": "after_kernel_early_over_dense"}
    ax = fig.subplots()
    _bars(ax, labels, {name: [r[key] for r in rows] for name, key in series.items()}, "fused NF4 time / dense bf16 time",
          f"NF4 kernel launched early (PDL) or late ({_where(result)})")
    ax.axhline(1, color="grey", lw=0.8)


def nf4_kernel_times(result: dict, fig) -> None:
    """bench/nf4_kernel_times.py: per weight and row count, a fused NF4 call's kernel time, its split-K sum's tail and
    the gap to the next call, beside a dense bf16 matmul's kernel and gap (profiler records)."""
    rows = result["kernel_times"]
    labels = [f"{r['weight']} M={r['rows']}" for r in rows]
    ax = fig.subplots()
    _bars(ax, labels, {"NF4 kernel": [r["nf4_first_us"] for r in rows],
                       "NF4 sum tail": [r.get("nf4_tail_us") for r in rows],
                       "NF4 gap": [r["nf4_gap_us"] for r in rows], "dense kernel": [r["dense_first_us"] for r in rows],
                       "dense gap": [r["dense_gap_us"] for r in rows]},
          "µs a call", f"NF4 call by kernel against dense bf16 ({_where(result)})")


def nf4_sass(result: dict, fig) -> None:
    """bench/nf4_sass.py: the NF4 kernel's sm90 loop, warp instructions a weight per tiling (no GPU)."""
    rows = result["tilings"]
    def label(t: dict) -> str:
        flags = "".join(f" +{n}" for n, k in (("ps", "prescale"), ("xb", "codes_as_b"), ("sk", "sum_in_kernel")) if t[k])
        return f"{t['block_m']}x{t['block_n']} w{t['num_warps']}{flags}"
    labels = [label(r["tiles"]) for r in rows]
    _bars(fig.subplots(), labels, {"warp instructions / weight": [r["warp_instructions_per_weight"] for r in rows]},
          "warp instructions a weight", f"NF4 kernel loop, {result['target']}")


def paged_attention(result: dict, fig) -> None:
    """bench/paged_attention.py: kernel time over its floor, and kernel vs gather-then-attend, per case."""
    left, right = fig.subplots(1, 2)
    rows = result["rows"]
    labels = [f"{r['model']} {r['case']}" for r in rows]
    _bars(left, labels, {"kernel / floor": [r.get("kernel_over_floor") for r in rows]}, "time / bandwidth floor",
          f"paged attention ({_where(result)})")
    left.axhline(1, color="grey", lw=0.8)
    _bars(right, labels, {"kernel": [r.get("kernel_us") for r in rows], "gather": [r.get("gather_us") for r in rows]},
          "µs", "kernel vs gather", log=True)


def profile_step(result: dict, fig) -> None:
    """bench/profile_step.py: per case, the decode step, and the profiled run's wall and GPU-kernel time."""
    cases = {k: v for k, v in result.items() if isinstance(v, dict) and "wall_s_profiled" in v}
    ax = fig.subplots()
    _bars(ax, list(cases), {"decode step": [v["decode_step_ms"] if v.get("decode_steps") else None for v in cases.values()],
                            "run, wall (profiled)": [1e3 * v["wall_s_profiled"] for v in cases.values()],
                            "run, GPU kernels": [1e3 * v["gpu_kernel_s_profiled"] if "gpu_kernel_s_profiled" in v else None
                                                 for v in cases.values()]},
          "ms", f"{result.get('shape')} shape: time by case ({_where(result)})", log=True)


def step_host(result: dict, fig) -> None:
    """bench/step_host.py: per eager-kind step, host time to enqueue beside GPU and wall time."""
    cases = result["cases"]
    ax = fig.subplots()
    _bars(ax, list(cases), {"host": [c["host_ms"] for c in cases.values()],
                            "GPU": [c["gpu_ms"] for c in cases.values()],
                            "wall": [c["wall_ms"] for c in cases.values()]},
          "ms per step", f"{result.get('shape')} shape ({_where(result)}): {result.get('run', '')}"[:110])


def serve_gpu(result: dict, fig) -> None:
    """bench/serve_gpu.py: tok/s against batch size and distinct adapters, beside the bandwidth floor."""
    shapes = result["shapes"]
    axes = fig.subplots(1, len(shapes), squeeze=False)[0]
    bandwidth = result["copy_bandwidth_bytes_per_s"]
    for ax, (name, shape) in zip(axes, shapes.items()):
        waves = shape["waves"]
        step_bytes = shape["base_bytes_per_step_nf4"]["total"]
        for label, pick in (("base", lambda k: k.startswith("base_b") and "resident" not in k),
                            ("distinct adapters (one per row)", lambda k: k.startswith(("distinct_b", "one_adapter_b"))),
                            ("8 adapters", lambda k: k == "over8_b32"), ("mix LoRA r8-64 + GraLoRA", lambda k: k == "mix_b32")):
            picked = sorted((w["rows"], w["tokens_per_s"]) for k, w in waves.items() if pick(k))
            if picked:
                ax.plot(*zip(*picked), "o-" if len(picked) > 1 else "o", label=label)
        rows = sorted({w["rows"] for w in waves.values()})
        ax.plot(rows, [r * bandwidth / step_bytes for r in rows], "k--", lw=0.8,
                label="floor: weights once per step at copy bandwidth")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("batch (concurrent requests)")
        ax.set_ylabel("output tokens / s")
        ax.set_title(f"{shape.get('model', name)} ({_where(result)})", fontsize=9)
        ax.legend(fontsize=7)


def train_quality(result: dict, fig) -> None:
    """bench/train_quality.py: held-out exact match (mean ± std over seeds) and loss per run; the older
    one-seed format (`rows`): accuracy and loss per method, training loss curves when recorded."""
    if "runs" in result:
        runs = result["runs"]
        names = ["base", *runs]
        axes = fig.subplots(1, 2)
        acc = [result["base"]["accuracy"], *(r["accuracy"]["mean"] for r in runs.values())]
        err = [0.0, *(r["accuracy"]["std"] for r in runs.values())]
        axes[0].bar(range(len(names)), acc, yerr=err, capsize=2)
        axes[0].set_xticks(range(len(names)))
        axes[0].set_xticklabels(names, rotation=45, ha="right", fontsize=6)
        axes[0].set_ylabel("held-out exact match")
        axes[0].set_title(f"{result['task']}, {result['steps']} steps, seeds {result['seeds']} ({_where(result)})",
                          fontsize=8)
        _bars(axes[1], names, {"loss": [result["base"]["test_loss"], *(r["test_loss"]["mean"] for r in runs.values())]},
              "held-out loss", "loss per completion token", log=True)
        return
    rows = result["rows"]
    curves = {k: r["train_loss_history"] for k, r in rows.items() if r.get("train_loss_history")}
    axes = fig.subplots(1, 3 if curves else 2)
    names = list(rows)
    _bars(axes[0], names, {"accuracy": [r.get("accuracy") for r in rows.values()]}, "held-out accuracy",
          f"{result['task']}, rank {result['rank']}, {result['steps']} steps ({result['device']})")
    _bars(axes[1], names, {"test loss": [r.get("test_loss") for r in rows.values()]}, "held-out loss", "loss")
    if curves:
        for name, losses in curves.items():
            axes[2].plot(range(1, len(losses) + 1), losses, label=name)
        axes[2].set_xlabel("step")
        axes[2].set_ylabel("training loss")
        axes[2].set_yscale("log")
        axes[2].set_title("training loss", fontsize=9)
        axes[2].legend(fontsize=7)


def train_speed(result: dict, fig) -> None:
    """bench/train_speed.py: loraplex train over transformers Trainer + PEFT, tokens/s and peak memory."""
    shapes = result["shapes"]
    axes = fig.subplots(1, 2)
    methods = ("lora", "qlora", "gralora", "flexora")
    for ax, (key, label) in zip(axes, (("tok_s", "tokens/s, loraplex / Trainer"),
                                       ("peak_mem", "peak memory, loraplex / Trainer"))):
        _bars(ax, list(methods), {shape: [s["ratios"].get(f"{m}_{key}_over_peft_trainer") for m in methods]
                                  for shape, s in shapes.items()}, label, f"{label} ({_where(result)})")
        ax.axhline(1.0, color="grey", linestyle="--", linewidth=1)


def training_summary(result: dict, fig) -> None:
    """`loraplex train`'s training_summary.json: the loss curve of one run."""
    ax = fig.subplots()
    losses = result["train_loss_history"]
    ax.plot(range(1, len(losses) + 1), losses, "o-")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_title(f"{result['method']} rank {result['rank']} on {result['model']}: val loss "
                 f"{result['initial_val_loss']:.2f} -> {result['final_val_loss']:.3f} ({result['device']})", fontsize=9)


def adapter_scale(result: dict, fig) -> None:
    """bench/adapter_scale.py: upload MB/s, hot-load and on-demand first token, start-up and list time at scale."""
    if result.get("mode") == "gpu":
        return adapter_scale_gpu(result, fig)
    summary = result["summary"]
    axes = fig.subplots(1, 3)
    _bars(axes[0], ["upload (HTTP)"], {"MB/s": [summary["upload_mb_s_cpu"]]}, "MB / s",
          f"upload, {result.get('adapter_mb')} MB adapter ({_where(result)})")
    axes[0].axhline(300, color="grey", linestyle="--", linewidth=1)  # issue #20's target
    labels = ["hot-load after upload", "source first token", f"/v1/models page ({result.get('stored')} stored)"]
    _bars(axes[1], labels, {"p50 ms": [summary["hotload_after_upload_ms_p50"], summary["source_first_token_ms_p50"],
                                       summary["models_list_ms_10k"]]}, "ms (p50)", "first token and listing", log=True)
    start = result["start_s"]
    _bars(axes[2], ["empty store", f"{result.get('stored')} stored"], {"s": [start["empty"], start["stored"]]},
          "seconds to /health ok", f"server start ({summary['start_s_10k_over_0']:.2f}x)")


def adapter_scale_gpu(result: dict, fig) -> None:
    """bench/adapter_scale.py --gpu: fp32 upload MB/s, first tokens, the trace over few and many adapters."""
    summary, settings = result["summary"], result["settings"]
    axes = fig.subplots(1, 3)
    _bars(axes[0], ["upload (HTTP)"], {"MB/s": [summary["upload_mb_s_gpu_host"]]}, "MB / s",
          f"upload, {result.get('upload_mb') or settings['upload_adapter_mb']:.1f} MB fp32 adapter ({_where(result)})")
    axes[0].axhline(1000, color="grey", linestyle="--", linewidth=1)  # issue #20's target
    _bars(axes[1], ["hot-load after upload", "source first token"],
          {"p50 ms": [summary["hotload_after_upload_ms_p50"], summary["source_first_token_ms_p50"]]},
          "ms (p50)", "first token (targets 60, 400 ms)", log=True)
    runs = {n: result["trace"].get(str(n), {}) for n in settings["trace_adapters"]}
    ratio = summary["trace_1000_over_64"]
    _bars(axes[2], [f"{n} adapters" for n in runs], {"output tok/s": [r.get("output_tok_s") for r in runs.values()]},
          "output tok / s", f"trace, {settings['trace']['requests']} requests at once"
          + (f" ({ratio:.2f}x)" if ratio is not None else ""))


def pack_speed(result: dict, fig) -> None:
    """bench/pack_speed.py: ms to pack one adapter into the pool layout, per way of copying, beside the memcpy floor."""
    ms = result["ms_p50"]
    ax = fig.subplots(1, 1)
    _bars(ax, list(ms), {"ms p50": list(ms.values())}, "ms (p50)",
          f"pack of a {result['shape']} rank-16 adapter, {result['device']}, {result['cpu_count']} cores")
    ax.tick_params(axis="x", labelrotation=30)


def engine_host(result: dict, fig) -> None:
    """bench/engine_host.py: the engine's host ms a step by part, base-only and adapters (and the tree before)."""
    runs = {f"{name}": run for name, run in result["runs"].items()}
    for tag, earlier in result.items():
        if tag.startswith("before_") and isinstance(earlier, dict) and "runs" in earlier:
            runs.update({f"{name}, {tag}": run for name, run in earlier["runs"].items()})
    ax = fig.subplots()
    _bars(ax, list(runs), {part: [r[f"{part}_ms_per_step"] for r in runs.values()]
                           for part in ("schedule", "runner", "rest", "host")},
          "host ms a step", f"engine host work a step, model stubbed ({result.get('cpus')} CPUs)")


# file name (stem, or its start) -> (function, figure size)
def loader_contention(result: dict, fig) -> None:
    """bench/loader_contention.py: a model engine step's time while adapters are parsed and packed beside it."""
    modes = list(result["runs"])
    ax1, ax2 = fig.subplots(1, 2)
    median = lambda mode, key: sorted(r[key] for r in result["runs"][mode])[len(result["runs"][mode]) // 2]  # noqa: E731
    _bars(ax1, modes, {key: [median(m, f"step_ms_{key}") for m in modes] for key in ("mean", "p50", "p90")},
          "ms a step", f"step (150 torch calls + 4 ms GPU wait) beside {result['loads']} loads")
    loaded = [m for m in modes if result["runs"][m][0]["loads_s"] is not None]
    _bars(ax2, loaded, {"loads": [median(m, "loads_s") for m in loaded]}, "seconds", "the loads' wall time")


DRAWERS = {
    "engine_cpu": (engine, (11, 4)), "engine_gpu": (engine, (7, 4)), "grpc_vs_http": (grpc_vs_http, (7, 4)),
    "kernels": (lora_kernels, (12, 4.5)), "load": (load, (11, 4)), "nf4_matmul": (nf4_matmul, (8, 5)),
    "nf4_decode_ab": (nf4_decode_ab, (8, 5)), "nf4_tile_grid": (nf4_tile_grid, (8, 4.5)),
    "nf4_sum_ab": (nf4_sum_ab, (11, 4.5)), "nf4_sass": (nf4_sass, (10, 4.5)),
    "nf4_early_launch": (nf4_early_launch, (12, 4.5)), "nf4_kernel_times": (nf4_kernel_times, (12, 4.5)),
    "paged_attention": (paged_attention, (13, 5)), "profile_step": (profile_step, (9, 4.5)),
    "serve_gpu": (serve_gpu, (12, 4.5)), "step_host": (step_host, (9, 4.5)), "train_quality": (train_quality, (14, 4)),
    "train_speed": (train_speed, (11, 4)),
    "training_summary": (training_summary, (7, 4)), "adapter_scale": (adapter_scale, (13, 4)),
    "pack_speed": (pack_speed, (9, 4)), "loader_contention": (loader_contention, (11, 4)),
    "engine_host": (engine_host, (11, 4)),
}


def drawer(json_path: Path):
    stem = Path(json_path).stem
    for key, value in DRAWERS.items():
        if stem == key or stem.startswith(key + "_"):
            return value
    return None


def draw(json_path: str | Path, png_path: str | Path | None = None) -> Path | None:
    """Draw the PNG of a benchmark's JSON (default: beside it, same name); None when no drawer knows the file."""
    json_path = Path(json_path)
    found = drawer(json_path)
    if found is None:
        return None
    function, size = found
    plt = _pyplot()
    fig = plt.figure(figsize=size)
    try:
        function(json.loads(json_path.read_text()), fig)
        fig.tight_layout()
        png = Path(png_path) if png_path else json_path.with_suffix(".png")
        fig.savefig(png, dpi=80)
    finally:
        plt.close(fig)
    return png


def draw_after_run(json_path: str | Path) -> None:
    """A benchmark's last step: its PNG beside its JSON. The JSON is written already; a figure that cannot be
    drawn (matplotlib missing, a partial run's JSON) is reported in one line, the run still succeeds."""
    try:
        png = draw(json_path)
    except Exception as e:  # noqa: BLE001 - the numbers are safe in the JSON; say why there is no picture
        print(f"{json_path}: figure not drawn ({type(e).__name__}: {e})", file=sys.stderr)
        return
    if png is not None:
        print(f"drew {png}")


def main() -> None:
    parser = argparse.ArgumentParser(description="draw bench/results PNGs from their JSONs")
    parser.add_argument("json", nargs="+", type=Path)
    args = parser.parse_args()
    for path in args.json:
        png = draw(path)
        print(f"{path} -> {png}" if png else f"{path}: no figure for this file (serve_trace.py draws its own)",
              file=sys.stdout if png else sys.stderr)


if __name__ == "__main__":
    main()
