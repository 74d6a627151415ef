"""Engine throughput on the CPU: base-only rows vs 8 distinct adapters in one batch, default model.

    python bench/engine_cpu.py [--batch 8] [--new-tokens 64] [--out bench/results/engine_cpu.json]

The same script measures a GPU: `--device cuda --quantization nf4 --adapter-ops triton|torch`.

Every configuration runs in this one process, side by side, after a warm-up: the ratios are
comparable, the absolute numbers depend on the machine.
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from loraplex.runtime.adapters.peft_format import AdapterWeights, ModuleDelta
from loraplex.runtime.adapters.registry import AdapterRef
from loraplex.runtime.base_model import load_base_model
from loraplex.runtime.engine import Engine, EngineConfig
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
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "engine_cpu.json")
    args = ap.parse_args()

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
    device = torch.cuda.get_device_name() if base.device.type == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    print(f"\nengine: default model ({base.name}), {base.dtype}, base weights {base.quantization}, adapter ops "
          f"{engine.ops.name}, batch {args.batch}, {args.new_tokens} new tokens per request, torch {torch.__version__}, "
          f"{device}")
    print(f"{'configuration':<32} {'tok/s':>8} {'vs base':>8} {'seconds':>8}")
    for name, r in rows.items():
        r["relative_to_base"] = r["tokens_per_s"] / base_tps
        print(f"{name:<32} {r['tokens_per_s']:>8.1f} {r['relative_to_base']:>8.2f} {r['seconds']:>8.2f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "benchmark": "engine_cpu", "model": base.name, "dtype": str(base.dtype), "batch": args.batch,
        "device": device, "quantization": base.quantization, "adapter_ops": engine.ops.name,
        "new_tokens": args.new_tokens, "rank": args.rank, "torch": torch.__version__,
        "threads": torch.get_num_threads(), "machine": platform.machine(), "processor": platform.processor(),
        "results": rows}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
