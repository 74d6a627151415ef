"""The engine's host work per step on issue #19's trace, the model stubbed out (CPU): base-only against adapters.

    python bench/engine_host.py [--requests 400] [--adapters 64] [--out bench/results/engine_host.json]

On a GPU every step's host work runs between two device waits (the sampled tokens' copy ends one step, the next
step's CUDA-graph replay starts the GPU again), so it adds to every step's time. This drives a real Engine (scheduler,
block manager with prefix caching, adapter slots over the Triton adapter ops' pool, detokenizer, stop checks,
outputs) through serve_trace.py's all-at-once trace with the model replaced by a stub that does the CUDA-graph
runner's host work and nothing else: the staging of the step's inputs (runtime/step_inputs.py) and the adapter
kernels' launch metadata (TritonAdapterOps.metadata, padded to the graph's bucket, under the Triton interpreter on the
CPU: no kernel runs), then logits of zeros; sampling returns a fixed token (ignore_eos). The prefill budget is
fixed (--prefill-budget: the 8B H100 trace measured 579 tokens) and steps fill MIXED_QUANTUM buckets as on a GPU.

Per run: steps, host ms a step (schedule, runner stub, the rest: sampling stub, token bookkeeping, outputs), the
adapters run ÷ base-only, and cProfile's hottest functions of the adapters run. Writes bench/results/engine_host.json
(or --out). The machine's speed sets the absolute numbers (the CI CPU is 2-3x slower than the GPU hosts); the ratio
of the two runs is what says whether adapters cost host time.
"""
from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # the Triton adapter ops on the CPU (set before triton is imported)

import argparse  # noqa: E402
import cProfile  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import pstats  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import figures  # noqa: E402 - bench/, beside this file: a PNG beside the JSON
import serve_gpu_models  # noqa: E402
from profile_step import adapter  # noqa: E402
from serve_trace import add_trace_arguments, make_trace  # noqa: E402

import loraplex.runtime.engine as engine_module  # noqa: E402
from loraplex.runtime.adapters.registry import AdapterRef  # noqa: E402
from loraplex.runtime.adapters.segments import NO_ADAPTER  # noqa: E402
from loraplex.runtime.base_model import load_base_model  # noqa: E402
from loraplex.runtime.engine import Engine, EngineConfig  # noqa: E402
from loraplex.runtime.model_runner import MIXED_QUANTUM, graph_buckets, mixed_buckets  # noqa: E402
from loraplex.runtime.sequence import SamplingParams  # noqa: E402
from loraplex.runtime.step_inputs import stage_decode, stage_mixed  # noqa: E402
from loraplex.runtime.step_inputs import token_slots as step_token_slots  # noqa: E402

FIXED_TOKEN = 5


class Timer:
    """Wraps a callable, adding its wall time to `seconds`."""

    def __init__(self, fn):
        self.fn, self.seconds = fn, 0.0

    def __call__(self, *args, **kwargs):
        started = time.perf_counter()
        try:
            return self.fn(*args, **kwargs)
        finally:
            self.seconds += time.perf_counter() - started


class GraphRunnerStub:
    """ModelRunner.run's host work on the CUDA-graph path (ModelRunner._replay / _replay_mixed) without a device: the
    step's token slots, its inputs staged into arrays of the runner's sizes, the adapter launch metadata; no model."""

    def __init__(self, engine: Engine, width: int):
        self.engine, self.ops = engine, engine.ops
        self.buckets = graph_buckets(engine.max_num_seqs)
        self.mixed_buckets = mixed_buckets(engine.config.max_batched_tokens)
        n, t = self.buckets[-1], self.mixed_buckets[-1]
        self.rows, self.tables = np.zeros((5, n), np.int64), np.zeros((n, width), np.int32)
        self.tokens, self.seqs = np.zeros((3, t), np.int64), np.zeros((3, n + 1), np.int32)
        self.mixed_tables = np.zeros((n, width), np.int32)
        self.ops.graph_rows, self.ops.graph_tokens = n, t  # as ModelRunner.attach_ops sets them with graphs on
        self.vocab = engine.base.config.vocab_size
        self.decode_steps = self.mixed_steps = 0

    def run(self, batch, all_logits=False, merged=None):
        size, spare = self.engine.blocks.block_size, 0
        token_slots = step_token_slots(batch, merged)
        adapters = any(s != NO_ADAPTER for s in token_slots)
        if all(n == 1 for _, n in batch):
            bucket = next(b for b in self.buckets if b >= len(batch))
            stage_decode(batch, merged or set(), self.rows, self.tables, size, spare, bucket)
            if adapters:
                self.ops.metadata(token_slots + [NO_ADAPTER] * (bucket - len(batch)), pad_to=bucket)
            self.decode_steps += 1
            logits_rows = len(batch)
        else:
            T = len(token_slots)
            bucket = next(b for b in self.mixed_buckets if b >= T)
            _, logits_rows = stage_mixed(batch, self.tokens, self.seqs, self.mixed_tables, size, spare, bucket)
            if adapters:
                self.ops.metadata(token_slots + [NO_ADAPTER] * (bucket - T), pad_to=bucket, mixed=True)
            self.mixed_steps += 1
        for seq, n in batch:
            seq.num_computed += n
        return torch.zeros(logits_rows, self.vocab)


def run(base, refs: list[AdapterRef], trace, args, with_adapters: bool, profile: bool) -> dict:
    engine = Engine(base, EngineConfig(adapter_ops="triton", max_gpu_adapters=max(len(refs), 1),
                                       kv_cache_tokens=args.kv_tokens, max_num_seqs=args.max_num_seqs,
                                       max_batched_tokens=args.max_batched_tokens))
    budget = args.prefill_budget
    engine.prefill_budget.measure = lambda tokens, seconds: budget
    engine.scheduler.prefill_budget, engine.scheduler.token_quantum = budget, MIXED_QUANTUM
    stub = GraphRunnerStub(engine, width=-(-(args.prompt_len[1] + args.output_len[1]) // engine.blocks.block_size) + 1)
    runner_timer = Timer(stub.run)
    engine.runner.run = runner_timer
    schedule_timer = engine.scheduler.schedule = Timer(engine.scheduler.schedule)
    by_id = {ref.id: ref for ref in refs}
    for prompt, max_tokens, model in trace:
        ref = by_id[model] if with_adapters and model != "base" else None
        engine.submit(list(prompt), SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True), ref,
                      lambda out: None)
    engine._drain_inbox()
    profiler = cProfile.Profile() if profile else None
    started = time.perf_counter()
    if profiler:
        profiler.enable()
    while engine.scheduler.has_work():
        engine.step()
    if profiler:
        profiler.disable()
    seconds = time.perf_counter() - started
    steps = engine.steps
    result = {
        "steps": steps, "decode_steps": stub.decode_steps, "mixed_steps": stub.mixed_steps,
        "tokens_generated": engine.tokens_generated, "seconds": seconds,
        "host_ms_per_step": 1e3 * seconds / steps,
        "schedule_ms_per_step": 1e3 * schedule_timer.seconds / steps,
        "runner_ms_per_step": 1e3 * runner_timer.seconds / steps,
        "rest_ms_per_step": 1e3 * (seconds - schedule_timer.seconds - runner_timer.seconds) / steps,
        "adapter_loads": engine.slots.loads,
    }
    if profiler:
        text = io.StringIO()
        pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(args.top)
        result["profile_tottime"] = text.getvalue()
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_trace_arguments(ap)
    ap.add_argument("--adapters", type=int, default=64)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--prefill-budget", type=int, default=579, help="prefill tokens a step beside decode rows")
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--max-batched-tokens", type=int, default=2048)
    ap.add_argument("--kv-tokens", type=int, default=1 << 19)
    ap.add_argument("--repeats", type=int, default=5, help="timed runs of each variant, alternating (the fastest is kept)")
    ap.add_argument("--top", type=int, default=25, help="functions in the adapters run's profile")
    ap.add_argument("--work", type=Path, default=Path("/tmp/engine_host"))
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "engine_host.json")
    args = ap.parse_args()
    shape = serve_gpu_models.SHAPES["tiny"]
    model_dir = serve_gpu_models.write_checkpoint(shape, args.work / "tiny" / "model", "cpu")
    base = load_base_model(str(model_dir), dtype="float32", device="cpu")
    refs = [AdapterRef(f"a{i}", 1, adapter(base.projection_shapes, base.num_layers, seed=i, rank=args.rank))
            for i in range(args.adapters)]
    trace = make_trace(args, shape, [ref.id for ref in refs])
    # no sampling work: a fixed token for every ready row (the GPU samples on the device)
    engine_module.sample_on_device = lambda logits, ready, bitmask: torch.full((len(ready),), FIXED_TOKEN)
    variants = (("base_only", False), ("adapters", True))
    for _, with_adapters in variants:
        run(base, refs, trace[:16], args, with_adapters, profile=False)  # warm-up (interpreter, allocations)
    timed: dict[str, list[dict]] = {name: [] for name, _ in variants}
    for _ in range(args.repeats):  # alternating, so that the machine's drift meets both alike
        for name, with_adapters in variants:
            timed[name].append(run(base, refs, trace, args, with_adapters, profile=False))
    runs = {}
    for name, results in timed.items():  # the fastest run: host work is what interference only adds to
        runs[name] = min(results, key=lambda r: r["host_ms_per_step"])
        runs[name]["host_ms_per_step_all"] = [r["host_ms_per_step"] for r in results]
    runs["adapters"]["profile_tottime"] = run(base, refs, trace, args, True, profile=True)["profile_tottime"]
    base_run, adapter_run = runs["base_only"], runs["adapters"]
    summary = {
        "host_ms_per_step_base": base_run["host_ms_per_step"],
        "host_ms_per_step_adapters": adapter_run["host_ms_per_step"],
        "adapters_over_base": adapter_run["host_ms_per_step"] / base_run["host_ms_per_step"],
        "adapters_minus_base_ms": adapter_run["host_ms_per_step"] - base_run["host_ms_per_step"],
    }
    result = {"benchmark": "engine_host", "machine": platform.machine(), "cpus": os.cpu_count(),
              "python": platform.python_version(), "torch": torch.__version__,
              "settings": {k: v for k, v in vars(args).items() if k not in ("work", "out")},
              "trace_output_tokens": sum(n for _, n, _ in trace), "runs": runs,
              "summary": summary}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1, default=str))
    figures.draw_after_run(args.out)
    print(adapter_run["profile_tottime"])
    print(f"{'run':10s} {'steps':>6s} {'host ms/step':>13s} {'schedule':>9s} {'runner':>7s} {'rest':>7s}")
    for name, r in (("base-only", base_run), ("adapters", adapter_run)):
        print(f"{name:10s} {r['steps']:6d} {r['host_ms_per_step']:13.3f} {r['schedule_ms_per_step']:9.3f} "
              f"{r['runner_ms_per_step']:7.3f} {r['rest_ms_per_step']:7.3f}")
    print(f"adapters ÷ base-only host time a step: {summary['adapters_over_base']:.3f} "
          f"(+{summary['adapters_minus_base_ms']:.3f} ms)")


if __name__ == "__main__":
    main()
