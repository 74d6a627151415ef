"""Engine throughput on the CPU: base-only rows vs 8 distinct adapters in one batch, default model.

    python bench/engine_cpu.py [--batch 8] [--new-tokens 64] [--out bench/results/engine_cpu.json]

The same script measures a GPU: `--device cuda --quantization nf4 --adapter-ops triton|torch`.

Also: prefill and decode tok/s of the default dtype (`--dtype auto`) beside the other one (bf16 vs
fp32, batch 8), and the worst gap between two tokens of a running stream while a 3,000-token prompt
is admitted, on an engine with default settings.

Every configuration runs in this one process, side by side, after a warm-up: the ratios are
comparable, the absolute numbers depend on the machine.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from loraplex.runtime.adapters.peft_format import AdapterWeights, ModuleDelta
from loraplex.runtime.adapters.registry import AdapterRef
from loraplex.runtime.base_model import cpu_has_native_bf16, load_base_model, resolve_dtype
from loraplex.runtime.engine import Engine, EngineConfig
import figures  # noqa: E402 - bench/, beside this file: a PNG beside the JSON
from loraplex.runtime.model import PROJECTIONS
from loraplex.runtime.sequence import SamplingParams

PROMPTS = ["Write a short story about a robot who learns to paint.", "Explain how a rainbow forms.",
           "List five uses of a paperclip.", "What is the tallest mountain on Earth?",
           "Describe the water cycle in simple words.", "Give me a recipe for pancakes.",
           "Why is the sky blue?", "Summarise the plot of Romeo and Juliet."]


def random_adapter(shapes, num_layers, rank: int, k: int, seed: int) -> AdapterWeights:
    g = torch.Generator().manual_seed(seed)
    modules = {(layer, p): ModuleDelta(k, torch.randn(k, shapes[p][0] // k, rank, generator=g) * 0.01,
                                       torch.randn(k, rank, shapes[p][1] // k, generator=g) * 0.01, 2.0)
               for layer in range(num_layers) for p in PROJECTIONS}
    return AdapterWeights("GRALORA" if k > 1 else "LORA", rank, {}, modules)


def run(engine: Engine, tokenizer, batch: int, new_tokens: int, adapters: list) -> dict:
    requests = []
    for i in range(batch):
        ids = tokenizer.apply_chat_template([{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
                                            add_generation_prompt=True, tokenize=True)
        ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
        params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
        requests.append((ids, params, adapters[i % len(adapters)] if adapters else None))
    start = time.perf_counter()
    results = engine.generate(requests)
    elapsed = time.perf_counter() - start
    generated = sum(outs[-1].completion_tokens for outs in results)
    prompt = sum(outs[-1].prompt_tokens for outs in results)
    return {"seconds": elapsed, "completion_tokens": generated, "prompt_tokens": prompt,
            "tokens_per_s": generated / elapsed}


def cpu_model() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor()
    return next((line.partition(":")[2].strip() for line in lines if line.startswith("model name")), "")


def greedy(n: int) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)


def text_ids(tokenizer, num_tokens: int, offset: int = 0) -> list[int]:
    """num_tokens of real text (the prompts above, repeated), starting at a different prompt per offset."""
    text = " ".join(PROMPTS[offset % len(PROMPTS):] + PROMPTS[:offset % len(PROMPTS)])
    ids: list[int] = []
    while len(ids) < num_tokens:
        ids += tokenizer(text + " ")["input_ids"]
    return ids[:num_tokens]


def prefill_then_decode(engine: Engine, prompts: list[list[int]], new_tokens: int) -> dict:
    """One step prefills every prompt (no decode rows: the whole step's tokens); the rest decode."""
    for ids in prompts:
        engine.submit(ids, greedy(new_tokens), None, lambda out: None)
    engine._drain_inbox()
    start = time.perf_counter()
    engine.step()
    prefill_s = time.perf_counter() - start
    assert all(len(s) - s.num_computed == 1 for s in engine.scheduler.running), "prompts did not fit one step"
    start = time.perf_counter()
    while engine.scheduler.has_work():
        engine.step()
    decode_s = time.perf_counter() - start
    prompt_tokens, decode_tokens = sum(map(len, prompts)), len(prompts) * (new_tokens - 1)
    return {"prompt_tokens": prompt_tokens, "prefill_seconds": prefill_s, "prefill_tokens_per_s": prompt_tokens / prefill_s,
            "decode_tokens": decode_tokens, "decode_seconds": decode_s, "decode_tokens_per_s": decode_tokens / decode_s}


def long_prompt_stall(engine: Engine, tokenizer, prompt_tokens: int) -> dict:
    """Gaps between a running stream's tokens from the step before a long prompt arrives until the
    long prompt's first token."""
    stream_times: list[float] = []
    stream = engine.submit(text_ids(tokenizer, 40), greedy(4000), None, lambda out: stream_times.append(time.perf_counter()))
    for _ in range(4):
        engine._drain_inbox()
        engine.step()
    long_done: list = []
    engine.submit(text_ids(tokenizer, prompt_tokens, offset=3), greedy(1), None, long_done.append)
    engine._drain_inbox()
    submitted, before, steps = time.perf_counter(), len(stream_times), 0
    while not long_done:
        engine.step()
        steps += 1
    first_token_s = time.perf_counter() - submitted
    gaps = [b - a for a, b in zip(stream_times[before - 1:], stream_times[before:])]
    engine.abort(stream)
    engine._drain_inbox()
    return {"prompt_tokens": prompt_tokens, "worst_gap_seconds": max(gaps), "median_gap_seconds": statistics.median(gaps),
            "steps": steps, "stream_tokens_meanwhile": len(gaps),
            "long_prompt_first_token_seconds": first_token_s, "prefill_budget_tokens": engine.scheduler.prefill_budget,
            "max_step_seconds": engine.max_step_seconds, "prefill_chunk_tokens": engine.config.prefill_chunk_tokens}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float32"])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--quantization", default="none", choices=["none", "nf4"])
    ap.add_argument("--adapter-ops", default="torch", choices=["torch", "triton"])
    ap.add_argument("--prefill-tokens", type=int, default=128, help="prompt tokens per row in the dtype comparison")
    ap.add_argument("--dtype-new-tokens", type=int, default=32, help="new tokens per row in the dtype comparison")
    ap.add_argument("--long-prompt", type=int, default=3000, help="prompt admitted while a stream runs")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "engine_cpu.json")
    args = ap.parse_args()

    default_dtype = resolve_dtype("auto", args.device)
    base = load_base_model(None, quantization=args.quantization, dtype=args.dtype, device=args.device)
    engine = Engine(base, EngineConfig(max_gpu_adapters=args.batch, max_num_seqs=max(64, args.batch),
                                       adapter_ops=args.adapter_ops, kv_cache_tokens=args.batch * 512))
    shapes, layers = base.projection_shapes, base.num_layers
    configs = {
        "base only": [],
        f"{args.batch} distinct LoRA r{args.rank}": [
            AdapterRef(f"lora{i}", 1, random_adapter(shapes, layers, args.rank, 1, i)) for i in range(args.batch)],
        f"{args.batch} distinct GraLoRA k2 r{args.rank}": [
            AdapterRef(f"gra{i}", 1, random_adapter(shapes, layers, args.rank, 2, 100 + i)) for i in range(args.batch)],
    }
    run(engine, base.tokenizer, args.batch, 4, configs["base only"])  # warm-up
    rows = {}
    for _ in range(args.repeats):  # interleaved repeats: drift hits every configuration alike
        for name, adapters in configs.items():
            r = run(engine, base.tokenizer, args.batch, args.new_tokens, adapters)
            if name not in rows or r["tokens_per_s"] > rows[name]["tokens_per_s"]:
                rows[name] = r
    base_tps = rows["base only"]["tokens_per_s"]
    ops_name = engine.ops.name
    device = torch.cuda.get_device_name() if base.device.type == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    print(f"\nengine: default model ({base.name}), {base.dtype}, base weights {base.quantization}, adapter ops "
          f"{engine.ops.name}, batch {args.batch}, {args.new_tokens} new tokens per request, torch {torch.__version__}, "
          f"{device}")
    print(f"{'configuration':<32} {'tok/s':>8} {'vs base':>8} {'seconds':>8}")
    for name, r in rows.items():
        r["relative_to_base"] = r["tokens_per_s"] / base_tps
        print(f"{name:<32} {r['tokens_per_s']:>8.1f} {r['relative_to_base']:>8.2f} {r['seconds']:>8.2f}")
    del engine

    # the default dtype beside the other one: same prompts, interleaved repeats, best of each
    other_dtype = torch.float32 if default_dtype == torch.bfloat16 else torch.bfloat16
    bases = {default_dtype: base if base.dtype == default_dtype else None, other_dtype: base if base.dtype == other_dtype else None}
    for dtype in bases:
        bases[dtype] = bases[dtype] or load_base_model(None, quantization=args.quantization,
                                                       dtype=str(dtype).removeprefix("torch."), device=args.device)
    prompts = [text_ids(base.tokenizer, args.prefill_tokens, offset=i) for i in range(args.batch)]
    step_tokens = max(2048, args.batch * args.prefill_tokens)
    engines = {dtype: Engine(b, EngineConfig(max_num_seqs=max(64, args.batch), adapter_ops=args.adapter_ops,
                                             max_batched_tokens=step_tokens,
                                             kv_cache_tokens=args.batch * (args.prefill_tokens + args.dtype_new_tokens + 16)))
               for dtype, b in bases.items()}
    for e in engines.values():
        prefill_then_decode(e, prompts, 4)  # warm-up
    runs: dict[torch.dtype, list[dict]] = {dtype: [] for dtype in engines}
    for _ in range(args.repeats):
        for dtype, e in engines.items():
            runs[dtype].append(prefill_then_decode(e, prompts, args.dtype_new_tokens))
    dtype_rows = {str(dtype).removeprefix("torch.") + (" (default)" if dtype == default_dtype else ""): {
        "prefill_tokens_per_s": max(r["prefill_tokens_per_s"] for r in rs),
        "decode_tokens_per_s": max(r["decode_tokens_per_s"] for r in rs), "runs": rs} for dtype, rs in runs.items()}
    print(f"\ndtype: batch {args.batch}, {args.prefill_tokens}-token prompts prefilled in one step, "
          f"{args.dtype_new_tokens} new tokens per request")
    print(f"{'dtype':<20} {'prefill tok/s':>14} {'decode tok/s':>13}")
    for name, r in dtype_rows.items():
        print(f"{name:<20} {r['prefill_tokens_per_s']:>14.1f} {r['decode_tokens_per_s']:>13.1f}")
    del engines

    # a long prompt arriving while a stream runs, on a fresh engine with the default settings each time
    stalls = [long_prompt_stall(Engine(bases[default_dtype]), base.tokenizer, args.long_prompt) for _ in range(args.repeats)]
    stall = {**min(stalls, key=lambda r: r["worst_gap_seconds"]), "runs": stalls}
    print(f"\n{args.long_prompt}-token prompt admitted while a stream decodes ({str(default_dtype).removeprefix('torch.')}, "
          f"default engine settings, best of {len(stalls)}): worst gap between the stream's tokens "
          f"{stall['worst_gap_seconds']:.2f} s, median {stall['median_gap_seconds']:.2f} s, {stall['steps']} steps, "
          f"the long prompt's first token after {stall['long_prompt_first_token_seconds']:.1f} s")

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "benchmark": "engine_cpu", "model": base.name, "dtype": str(base.dtype), "batch": args.batch,
        "device": device, "quantization": base.quantization, "adapter_ops": ops_name,
        "new_tokens": args.new_tokens, "rank": args.rank, "torch": torch.__version__,
        "threads": torch.get_num_threads(), "machine": platform.machine(), "processor": platform.processor(),
        "cpu_model": cpu_model(), "cpu_native_bf16": cpu_has_native_bf16(), "default_dtype": str(default_dtype),
        "results": rows, "dtypes": dtype_rows, "long_prompt_stall": stall}, indent=2))
    print(f"wrote {args.out}")
    figures.draw_after_run(args.out)


if __name__ == "__main__":
    main()
