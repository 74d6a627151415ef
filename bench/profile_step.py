"""Where a decode step's time goes, and which fast-path piece moves the logits (GPU).

Loads a random-weight checkpoint of a bench/serve_gpu.py shape in-process (NF4), then
1. per batch case (base only, 32 distinct adapters, 32 rows over 8 adapters), profiles a few decode
   steps with torch.profiler and prints the kernels by GPU time, plus the step time from the engine;
2. fidelity: runs the same greedy batch with the eager reference (no graphs, gather attention,
   bitsandbytes matmul, PyTorch adapter ops) and with each fast piece switched on alone, and prints the
   relative logit error of the first decode steps and how many requests keep identical tokens.
Writes bench/results/profile_step.json (or --out).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import serve_gpu_models  # noqa: E402
import figures  # noqa: E402 - bench/, beside this file: a PNG beside the JSON

from loraplex.runtime import nf4_linear  # noqa: E402
from loraplex.runtime.adapters.peft_format import AdapterWeights, ModuleDelta  # noqa: E402
from loraplex.runtime.adapters.registry import AdapterRef  # noqa: E402
from loraplex.runtime.base_model import load_base_model  # noqa: E402
from loraplex.runtime.engine import Engine, EngineConfig  # noqa: E402
from loraplex.runtime.sequence import SamplingParams  # noqa: E402


def adapter(shapes, layers, seed, rank=16, k=1, projections=serve_gpu_models.PROJECTIONS):
    g = torch.Generator().manual_seed(seed)
    modules = {}
    for layer in range(layers):
        for p in projections:
            fin, fout = shapes[p]
            A = torch.randn(k, fin // k, rank, generator=g) / fin ** 0.5
            B = torch.randn(k, rank, fout // k, generator=g) * 0.02
            modules[(layer, p)] = ModuleDelta(k, A, B, 2.0)
    return AdapterWeights("LORA" if k == 1 else "GRALORA", rank, {}, modules)


def requests(base, owners, new_tokens, prompt_len=128):
    vocab = base.config.vocab_size
    g = torch.Generator().manual_seed(5)
    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    return [(torch.randint(4, vocab, (prompt_len,), generator=g).tolist(), params, o) for o in owners]


def trace_requests(base, owners):
    """serve_trace.py's lengths: prompt uniform 64-1,024 tokens, output uniform 32-256 (ignore_eos)."""
    vocab = base.config.vocab_size
    g = torch.Generator().manual_seed(7)
    reqs = []
    for owner in owners:
        prompt_len, new_tokens = (int(torch.randint(lo, hi + 1, (1,), generator=g)) for lo, hi in ((64, 1024), (32, 256)))
        params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
        reqs.append((torch.randint(4, vocab, (prompt_len,), generator=g).tolist(), params, owner))
    return reqs


def set_fused(base, on: bool, saved: dict):
    nf4_linear.DISPATCH.clear()
    nf4_linear.DISPATCH.update(saved)
    if not on:
        for m in base.model.modules():
            if isinstance(m, nf4_linear.NF4Linear):
                nf4_linear.DISPATCH[(m.out_features, m.in_features)] = frozenset()


def profile(base, reqs, saved, kv_cache_tokens: int = 32768, fold_blocks: int = 0) -> dict:
    """Kernels by GPU time over one generate() of `reqs` (after a warm-up run of the same requests),
    with the engine's decode step time and the wall time of the prefill steps. fold_blocks: adapters folded into
    the prefill matmuls (kernels/lora_fold.py)."""
    set_fused(base, True, saved)
    engine = Engine(base, EngineConfig(kv_cache_tokens=kv_cache_tokens, prefix_caching=False,
                                       fold_prefill_adapters=fold_blocks))
    t = time.perf_counter()
    engine.generate(reqs)  # captures graphs, loads adapters, compiles kernels
    first_s = time.perf_counter() - t
    t = time.perf_counter()
    engine.generate(reqs)
    second_s = time.perf_counter() - t
    before = dict(engine.stats())
    from torch.profiler import ProfilerActivity, profile as torch_profile
    torch.cuda.synchronize()
    t = time.perf_counter()
    with torch_profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        engine.generate(reqs)
    torch.cuda.synchronize()
    wall = time.perf_counter() - t
    after = engine.stats()
    delta = {k: after[k] - before[k] for k in ("decode_steps", "decode_seconds", "prefill_steps", "steps",
                                                "prefill_seconds")
             if isinstance(after.get(k), (int, float)) and isinstance(before.get(k), (int, float))}
    steps = delta.get("decode_steps", 0)
    step_ms = 1e3 * delta.get("decode_seconds", 0.0) / max(steps, 1)
    averages = prof.key_averages()
    table = averages.table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=70)
    gpu_s = sum(getattr(e, "self_device_time_total", 0.0) for e in averages) / 1e6
    return {"decode_step_ms": step_ms, "decode_steps": steps, "graph_steps": after["graph_steps"],
            "prefill_steps": delta.get("prefill_steps"), "wall_s_profiled": wall, "first_run_s": first_s, "second_run_s": second_s, "gpu_kernel_s_profiled": gpu_s,
            "prefill_s_counted": after["prefill_seconds"] - before["prefill_seconds"],
            "non_decode_s_profiled": wall - delta.get("decode_seconds", 0.0), "kernels": table}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="1b")
    ap.add_argument("--work", type=Path, default=Path("/tmp/serve_gpu"))
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "profile_step.json")
    ap.add_argument("--skip-profile", action="store_true")
    ap.add_argument("--skip-fidelity", action="store_true")
    ap.add_argument("--cases", default="base_b32,distinct_b32,over8_b32,one_adapter_b32,mix_b32,mix_prefill_b32",
                    help="profiled cases (comma separated): %(default)s, or base_prefill_b32, distinct_prefill_b32, "
                         "base_prefill_2048, adapter_prefill_2048, four_prefill_512, trace_128, trace_128_adapters")
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--fold-blocks", type=int, default=0,
                    help="adapters a prefill step folds into its NF4 matmuls (kernels/lora_fold.py; default 0: off)")
    args = ap.parse_args()
    shape = serve_gpu_models.SHAPES[args.shape]
    model_dir = serve_gpu_models.write_checkpoint(shape, args.work / args.shape / "model", "cuda")
    t0 = time.time()
    base = load_base_model(str(model_dir), quantization="nf4", device="cuda")
    saved = dict(nf4_linear.DISPATCH)
    print(f"loaded {args.shape} in {time.time() - t0:.1f} s; dispatch {saved}", flush=True)
    shapes, layers = base.projection_shapes, base.num_layers
    refs = [AdapterRef(f"a{i}", 1, adapter(shapes, layers, seed=i)) for i in range(32)]
    result = {"device": torch.cuda.get_device_name(), "shape": args.shape,
              "dispatch": {str(k): sorted(v) for k, v in saved.items()}}
    # bench/serve_gpu.py's mix: LoRA r8, r16, r32, r64 and GraLoRA r32 k=4 in turn
    mix_kinds = [dict(rank=8), dict(rank=16), dict(rank=32), dict(rank=64), dict(rank=32, k=4)]
    mix = [AdapterRef(f"m{i}", 1, adapter(shapes, layers, seed=100 + i, **mix_kinds[i % 5])) for i in range(32)]
    cases = {"base_b32": [None] * 32, "distinct_b32": refs, "over8_b32": [refs[i % 8] for i in range(32)],
             "one_adapter_b32": [refs[0]] * 32, "mix_b32": mix, "base_prefill_b32": [None] * 32,
             "distinct_prefill_b32": refs, "mix_prefill_b32": mix,
             "base_prefill_2048": [None], "adapter_prefill_2048": [refs[0]], "four_prefill_512": refs[:4],
             # a serve_trace.py-like batch all at once (mixed steps of prompt chunks beside up to 128 decode rows,
             # then decode): where the trace's GPU time goes, base-only and over the 32 adapters
             "trace_128": [None] * 128, "trace_128_adapters": [refs[i % 32] for i in range(128)]}
    prompt_lens = {"base_prefill_2048": 2048, "adapter_prefill_2048": 2048, "four_prefill_512": 512}
    if not args.skip_profile:
        for name in args.cases.split(","):
            owners = cases[name]
            new_tokens = 1 if "prefill" in name else args.new_tokens
            if name.startswith("trace"):  # room for every sequence at once: no preemption
                r = profile(base, trace_requests(base, owners), saved, kv_cache_tokens=len(owners) * 1280,
                            fold_blocks=args.fold_blocks)
            else:
                r = profile(base, requests(base, owners, new_tokens, prompt_lens.get(name, 128)), saved,
                            fold_blocks=args.fold_blocks)
            result[name] = r
            print(f"== {name}: decode step {r['decode_step_ms']:.2f} ms over {r['decode_steps']} steps "
                  f"(graph steps so far {r['graph_steps']}); {r['prefill_steps']} prefill steps; "
                  f"{r['non_decode_s_profiled']:.3f} s outside decode (prefill counted {r['prefill_s_counted']:.3f} s); "
                  f"GPU kernels {r['gpu_kernel_s_profiled']:.3f} s of {r['wall_s_profiled']:.3f} s wall; "
                  f"first run {r['first_run_s']:.3f} s, second {r['second_run_s']:.3f} s\n{r['kernels']}",
                  flush=True)
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(result, indent=1))
    if not args.skip_fidelity:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
        from gpu_fidelity import compare, forced_logits
        owners = [refs[0], refs[0], refs[1], None, refs[2], refs[3], refs[0], None]
        reqs = requests(base, owners, 12, prompt_len=40)
        reqs = [(ids[:40 - i] + [7] * i, p, o) for i, (ids, p, o) in enumerate(reqs)]  # distinct prompts
        ref_logits, ref_tokens, _ = forced_logits(base, reqs, None, fast=False)
        rerun, _, _ = forced_logits(base, reqs, ref_tokens, fast=False)
        rows = {"reference_rerun": compare(rerun, ref_logits)}
        variants = {"paged": dict(paged=True), "fused_nf4": dict(fused=True), "triton": dict(triton=True),
                    "layer_ops": dict(layer_ops=True),
                    "all": dict(fast=True),
                    "all+merged_bf16": dict(fast=True, merge_policy="a0", merge_format="bf16"),
                    "all+merged_nf4": dict(fast=True, merge_policy="a0", merge_format="nf4")}
        for name, on in variants.items():
            kw = {"fast": False, **on}
            got, _, _ = forced_logits(base, reqs, ref_tokens, **kw)
            rows[name] = compare(got, ref_logits)
        for name, row in rows.items():
            print(f"fidelity {name:16s} {row}", flush=True)
        result["fidelity"] = rows
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    figures.draw_after_run(args.out)


if __name__ == "__main__":
    main()
