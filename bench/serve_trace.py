"""Serving under a real trace through the HTTP API (GPU; a CPU smoke run): a `loraplex serve` with default
flags on a random-weight checkpoint, driven by streamed requests from an S-LoRA / vLLM
`benchmark_serving`-style trace, base-only beside with-adapters on the same trace, against the trace's floor.

    python bench/serve_trace.py [--shapes 8b,1b] [--rates inf,4,8] [--out bench/results/serve_trace.json]
    python bench/serve_trace.py --shapes tiny --device cpu --requests 16 --rate-requests 8 --adapters 4 \\
        --prompt-len 8,48 --output-len 2,6 --rates inf,8 --burst 4 --burst-new-tokens 4        # CPU smoke

The trace (--seed): --requests prompts of uniform length in --prompt-len (token ids), outputs of uniform
length in --output-len (ignore_eos), each request's adapter drawn by Zipf(--zipf) popularity over
--adapters rank-16 LoRA adapters on all seven projections (--adapter-kind mix: LoRA r8/r16/r32/r64 and
GraLoRA r32 k=4 in turn), --base-share of them on `base`; "base-only" is the same trace with every request
on `base`. Arrivals: `inf` sends every request at once; a number is a Poisson rate in requests/s (--gamma-cv
other than 1: gamma-distributed gaps with that coefficient of variation); rate runs send the first
--rate-requests requests of the trace.

Per request (streamed, `stream_options.include_usage`): TTFT (send -> first token event), TPOT ((end - first
token) / (completion tokens - 1)), ITL (gaps between token events), end-to-end. Per run: output and prompt
tok/s over the run's wall time, percentiles, the engine counters between two /health reads.

Per shape, in one server (started for the shape, nothing sent before):
  first burst   --burst requests of --burst-prompt tokens -> --burst-new-tokens, base, all at once, the very
                first requests after /health turns ok (TTFT p50); the same burst of fresh prompts is sent
                again at the end (`warm`): first_burst_ttft_over_warm. Then the adapters are uploaded and a
                burst over --burst distinct adapters is sent first (their first use) and again at the end.
  prefill       one prompt of --prefill-tokens tokens, 1 new token, on the idle server: the step's time from
                the engine's prefill counters; MFU = FLOPs (2 x linear params x tokens + causal attention)
                / time / the measured bf16 matmul peak
  trace runs    for each rate: base-only, then with adapters
The floor of the all-at-once trace: every prompt's prefill FLOPs at the measured matmul peak, plus decode
steps with every request decoding at once from the start (step s: base weights + the KV of every request
with at least s output tokens + the A/B of the distinct adapters among them, each read once) at the
measured copy bandwidth. SLO rate: the highest measured rate with TTFT p99 <= 1 s and TPOT p99 <= 50 ms.

Results: bench/results/serve_trace.json (`summary` from the first of 8b, 1b, tiny present) and a PNG beside
it (tok/s and latency percentiles against the rate, base-only beside adapters) when matplotlib is present.
The server is bench/serve_gpu.py's (`Server`); shapes, checkpoints and adapters are serve_gpu_models.py's.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import random
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import httpx

from serve_gpu import Server, engine_stats
from serve_gpu_device import in_fresh_process, prepare_device, prompt_ids
from serve_gpu_models import (SHAPES, AdapterSpec, ModelShape, RandomPool, adapter_payload, base_bytes_per_step,
                              kv_bytes_per_token, mix_specs)
from serve_gpu_report import met, number, ratio

SLO_TTFT_S, SLO_TPOT_S = 1.0, 0.050
TARGETS = {"trace_inf_base_over_floor": "<= 2.5", "trace_inf_adapters_over_base": ">= 0.85",
           "rate4_ttft_p99_adapters_over_base": "<= 1.5", "rate4_tpot_p99_adapters_over_base": "<= 1.5",
           "slo_rate_adapters": "reported", "first_burst_ttft_over_warm": "<= 1.5", "prefill_mfu_2048": ">= 0.4",
           "nf4_over_dense_max": "< 1.0"}
# issue #19's measurements (H200, 8B shape, main at ed7f7b7), for comparison
BEFORE_8B = {"trace_inf_base_over_floor": 5.7, "trace_inf_adapters_over_base": 0.67,
             "rate4_ttft_p99_adapters_over_base": 31, "rate4_tpot_p99_adapters_over_base": 4.5,
             "slo_rate_adapters": "< 4 (TTFT p99 3.8 s at 4 req/s)", "first_burst_ttft_over_warm": "about 13 (1B: 3.0 s / 0.22-0.29 s)",
             "nf4_over_dense_max": 1.62}
COUNTERS = ("decode_steps", "decode_seconds", "decode_rows", "prefill_steps", "prefill_seconds", "steps",
            "graph_steps", "bookkeeping_seconds", "idle_seconds", "device_wait_seconds", "tokens_generated",
            "adapter_loads", "merged_steps", "graph_gpu_seconds", "mixed_gpu_seconds", "folded_steps")


# -- the trace ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Request:
    prompt: tuple[int, ...]
    max_tokens: int
    adapter: str  # an adapter id or "base"
    at: float  # seconds after the run's start


def zipf_choices(n: int, alpha: float, count: int, rng: random.Random) -> list[int]:
    weights = [1.0 / (i + 1) ** alpha for i in range(n)]
    return rng.choices(range(n), weights=weights, k=count)


def arrivals(count: int, rate: float, cv: float, rng: random.Random) -> list[float]:
    """Send times: all at 0 for rate inf; else gaps of mean 1/rate, exponential (cv 1) or gamma."""
    if math.isinf(rate):
        return [0.0] * count
    shape = 1.0 / (cv * cv)
    t, out = 0.0, []
    for _ in range(count):
        out.append(t)
        t += rng.gammavariate(shape, 1.0 / (rate * shape))
    return out


def make_trace(args, shape: ModelShape, adapter_ids: list[str],
               prompt_salt: int | None = None) -> list[tuple[tuple[int, ...], int, str]]:
    """(prompt, max_tokens, model) per request. Prompt lengths, outputs and which requests are on base depend on
    args.seed alone (the adapter picks also on len(adapter_ids)); prompt_salt (default args.seed) picks the
    prompts' token ids: two traces with other salts share no prompt (no prefix-cache hits between them)."""
    rng = random.Random(args.seed)
    lo, hi = args.prompt_len
    olo, ohi = args.output_len
    lengths = [rng.randint(lo, hi) for _ in range(args.requests)]
    outputs = [rng.randint(olo, ohi) for _ in range(args.requests)]
    picks = zipf_choices(len(adapter_ids), args.zipf, args.requests, rng)
    models = ["base" if rng.random() < args.base_share else adapter_ids[p] for p in picks]
    salt = args.seed if prompt_salt is None else prompt_salt
    prompts = [tuple(p[:n]) for p, n in zip(prompt_ids(args.requests, hi, shape.vocab, salt=salt), lengths)]
    return list(zip(prompts, outputs, models))


def schedule(trace, rate: float, count: int, base_only: bool, args) -> list[Request]:
    times = arrivals(count, rate, args.gamma_cv, random.Random(args.seed + 1))
    return [Request(p, n, "base" if base_only else m, t) for (p, n, m), t in zip(trace[:count], times)]


# -- the floor ---------------------------------------------------------------------------------------------
def linear_params(shape: ModelShape) -> int:
    return shape.layers * sum(i * o for i, o in shape.projections().values())


def prefill_flops(shape: ModelShape, tokens: int) -> float:
    """One prompt's prefill: 2 x linear params x tokens, causal attention (QK^T and PV over half the square),
    and the lm_head for its last token."""
    attention = 2 * 2 * shape.layers * shape.heads * shape.head_dim * tokens * (tokens + 1) / 2
    return 2 * linear_params(shape) * tokens + attention + 2 * shape.vocab * shape.hidden


def trace_floor(requests: list[Request], shape: ModelShape, specs: dict[str, AdapterSpec], peak: float,
                bandwidth: float) -> dict:
    compute = sum(prefill_flops(shape, len(r.prompt)) for r in requests) / peak
    base = base_bytes_per_step(shape, "nf4")["total"]
    kv = kv_bytes_per_token(shape)
    decode_bytes = 0.0
    for s in range(1, max(r.max_tokens for r in requests)):  # the first token comes from the prefill
        active = [r for r in requests if r.max_tokens > s]
        adapters = {r.adapter for r in active if r.adapter != "base"}
        decode_bytes += (base + kv * sum(len(r.prompt) + s for r in active)
                         + sum(specs[a].bytes_bf16(shape) for a in adapters))
    return {"prefill_s": compute, "decode_s": decode_bytes / bandwidth, "floor_s": compute + decode_bytes / bandwidth}


# -- the client --------------------------------------------------------------------------------------------
def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    v = sorted(values)
    return v[min(len(v) - 1, max(0, math.ceil(q / 100 * len(v)) - 1))]


async def stream_one(client: httpx.AsyncClient, req: Request, start: float) -> dict:
    await asyncio.sleep(max(0.0, start + req.at - time.perf_counter()))
    body = {"model": req.adapter, "prompt": list(req.prompt), "max_tokens": req.max_tokens, "temperature": 0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    sent = time.perf_counter()
    events, usage, error = [], None, None
    try:
        async with client.stream("POST", "/v1/completions", json=body) as r:
            if r.status_code != 200:
                return {"error": f"HTTP {r.status_code}: {(await r.aread())[:300]!r}", "adapter": req.adapter}
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                data = json.loads(line[6:])
                if "error" in data:
                    error = str(data["error"])[:300]
                if data.get("choices"):
                    events.append(time.perf_counter())
                if data.get("usage"):
                    usage = data["usage"]
    except httpx.HTTPError as e:
        error = f"{type(e).__name__}: {e}"
    end = time.perf_counter()
    tokens = (usage or {}).get("completion_tokens", len(events))
    if error or not events:
        return {"error": error or "no token events", "adapter": req.adapter}
    ttft = events[0] - sent
    return {"adapter": req.adapter, "prompt_tokens": len(req.prompt), "completion_tokens": tokens, "ttft": ttft,
            "tpot": (end - events[0]) / (tokens - 1) if tokens > 1 else None, "e2e": end - sent,
            "itl": [b - a for a, b in zip(events, events[1:])], "expected_tokens": req.max_tokens}


class Session:
    def __init__(self, url: str):
        # a connection per request: a pooled one that the server closes as idle while it is reused fails the
        # request (ReadError) on the client's side, not the server's
        self.client = httpx.AsyncClient(base_url=url, trust_env=False, timeout=httpx.Timeout(3600.0, connect=60.0),
                                        limits=httpx.Limits(max_connections=2048, max_keepalive_connections=0))

    async def stats(self) -> dict:
        r = await self.client.get("/health")
        r.raise_for_status()
        return engine_stats(r.json())

    async def run(self, requests: list[Request]) -> dict:
        """Send the requests at their times, streamed; per-request and per-run numbers."""
        before = await self.stats()
        start = time.perf_counter()
        results = await asyncio.gather(*(stream_one(self.client, r, start) for r in requests))
        wall = time.perf_counter() - start
        after = await self.stats()
        ok = [r for r in results if "error" not in r]
        errors = [r["error"] for r in results if "error" in r]
        short = sum(1 for r in ok if r["completion_tokens"] != r["expected_tokens"])
        itl = [g for r in ok for g in r["itl"]]
        out = {"requests": len(requests), "errors": len(errors), "error_examples": errors[:3],
               "short_outputs": short, "wall_s": wall,
               "output_tokens": sum(r["completion_tokens"] for r in ok),
               "prompt_tokens": sum(r["prompt_tokens"] for r in ok)}
        out["output_tok_s"] = out["output_tokens"] / wall
        out["prompt_tok_s"] = out["prompt_tokens"] / wall
        for name, values in (("ttft", [r["ttft"] for r in ok]), ("tpot", [r["tpot"] for r in ok if r["tpot"]]),
                             ("itl", itl), ("e2e", [r["e2e"] for r in ok])):
            for q in (50, 90, 99):
                out[f"{name}_p{q}_ms"] = None if not values else 1e3 * percentile(values, q)
        out["counters"] = {k: after[k] - before[k] for k in COUNTERS if number(after.get(k)) and number(before.get(k))}
        c = out["counters"]
        out["prefill_step_ms"] = 1e3 * ratio(c.get("prefill_seconds"), c.get("prefill_steps")) if c.get("prefill_steps") else None
        out["decode_step_ms"] = 1e3 * ratio(c.get("decode_seconds"), c.get("decode_steps")) if c.get("decode_steps") else None
        out["mean_decode_rows"] = ratio(c.get("decode_rows"), c.get("decode_steps"))
        out["engine_after"] = {k: after.get(k) for k in ("max_num_seqs", "prefill_budget", "merge_policy",
                                                         "warm_up_seconds", "cuda_graphs", "resident_adapters")}
        return out

    async def upload(self, spec: AdapterSpec, shape: ModelShape, pool: RandomPool, fp32: bool) -> None:
        config, weights = adapter_payload(spec, shape, pool)
        if fp32:  # as PEFT saves adapters by default
            from safetensors.torch import load as load_safetensors, save as save_safetensors
            weights = save_safetensors({k: v.float() for k, v in load_safetensors(weights).items()})
        files = {"config": ("adapter_config.json", config, "application/json"),
                 "weights": ("adapter_model.safetensors", weights, "application/octet-stream")}
        r = await self.client.post("/v1/adapters", data={"id": spec.id}, files=files)
        if r.status_code != 201:
            raise RuntimeError(f"upload of {spec.id}: HTTP {r.status_code}: {r.text[:300]}")


def burst(args, shape: ModelShape, models: list[str], salt: int) -> list[Request]:
    prompts = prompt_ids(len(models), args.burst_prompt, shape.vocab, salt=salt)
    return [Request(tuple(p), args.burst_new_tokens, m, 0.0) for p, m in zip(prompts, models)]


def brief(run: dict) -> str:
    def f(key, scale=1.0):
        v = run.get(key)
        return "-" if v is None else f"{v * scale:,.0f}"
    return (f"{run['output_tok_s']:>8,.0f} tok/s  TTFT p50/p99 {f('ttft_p50_ms')}/{f('ttft_p99_ms')} ms  "
            f"TPOT p50/p99 {f('tpot_p50_ms')}/{f('tpot_p99_ms')} ms  errors {run['errors']}")


async def shape_session(args, key: str, shape: ModelShape, url: str, record: dict, save, peak: float,
                        bandwidth: float) -> None:
    s = Session(url)
    try:
        n = args.burst
        record["first_burst"] = await s.run(burst(args, shape, ["base"] * n, salt=7001))
        print(f"  [{key}] first burst (base)      {brief(record['first_burst'])}", flush=True)
        specs = ([AdapterSpec(f"t{i}", 16, seed=i) for i in range(args.adapters)] if args.adapter_kind == "lora16"
                 else [AdapterSpec(f"t{i}", sp.rank, sp.peft_type, sp.k, seed=i) for i, sp in
                       enumerate(mix_specs(args.adapters))])
        by_id = {sp.id: sp for sp in specs}
        pool, gate = RandomPool(), asyncio.Semaphore(args.upload_concurrency)
        t = time.perf_counter()

        async def up(spec):
            async with gate:
                await s.upload(spec, shape, pool, args.fp32_adapters)
        await asyncio.gather(*(up(sp) for sp in specs))
        record["upload_s"] = time.perf_counter() - t
        burst_models = [specs[i % len(specs)].id for i in range(n)]
        record["first_burst_adapters"] = await s.run(burst(args, shape, burst_models, salt=7002))
        print(f"  [{key}] first burst (adapters)  {brief(record['first_burst_adapters'])}", flush=True)
        save()

        long_prompt = prompt_ids(1, args.prefill_tokens, shape.vocab, salt=7003)[0]
        pre = await s.run([Request(tuple(long_prompt), 1, "base", 0.0)])
        step_s = ratio(pre["counters"].get("prefill_seconds"), pre["counters"].get("prefill_steps"))
        flops = prefill_flops(shape, args.prefill_tokens)
        record["prefill"] = {"tokens": args.prefill_tokens, "steps": pre["counters"].get("prefill_steps"),
                             "step_s": step_s, "flops": flops, "ttft_ms": pre["ttft_p50_ms"],
                             "mfu": ratio(ratio(flops, step_s), peak)}
        print(f"  [{key}] prefill {args.prefill_tokens} tokens: {pre['counters'].get('prefill_steps')} step(s), "
              f"{1e3 * (step_s or 0):.1f} ms a step, MFU {record['prefill']['mfu'] or 0:.2f}", flush=True)
        save()

        trace = make_trace(args, shape, [sp.id for sp in specs])
        record["trace"] = {"requests": args.requests, "prompt_tokens": sum(len(p) for p, _, _ in trace),
                           "output_tokens": sum(o for _, o, _ in trace),
                           "base_requests": sum(1 for _, _, m in trace if m == "base"),
                           "distinct_adapters": len({m for _, _, m in trace if m != "base"})}
        for rate in args.rates:
            count = args.requests if math.isinf(rate) else min(args.rate_requests, args.requests)
            label = "inf" if math.isinf(rate) else f"{rate:g}"
            for variant in ("base_only", "adapters"):
                reqs = schedule(trace, rate, count, variant == "base_only", args)
                run = await s.run(reqs)
                if math.isinf(rate):
                    run["floor"] = trace_floor(reqs, shape, by_id, peak, bandwidth)
                    run["wall_over_floor"] = ratio(run["wall_s"], run["floor"]["floor_s"])
                record.setdefault("runs", {}).setdefault(label, {})[variant] = run
                print(f"  [{key}] rate {label:>4} {variant:<9} {brief(run)}", flush=True)
                save()

        record["warm_burst"] = await s.run(burst(args, shape, ["base"] * n, salt=7004))
        record["warm_burst_adapters"] = await s.run(burst(args, shape, burst_models, salt=7005))
        print(f"  [{key}] warm burst (base)       {brief(record['warm_burst'])}", flush=True)
        print(f"  [{key}] warm burst (adapters)   {brief(record['warm_burst_adapters'])}", flush=True)
        health = (await s.client.get("/health")).json()
        record["nf4_calibration_us"] = health.get("nf4_calibration_us")
        record["nf4_dequant_us"] = health.get("nf4_dequant_us")
        record["engine"] = {k: engine_stats(health).get(k) for k in ("max_num_seqs", "prefill_budget", "max_step_seconds",
                                                                     "warm_up_seconds", "merge_policy", "cuda_graphs",
                                                                     "prefill_seconds_per_token", "kv_blocks_total")}
        save()
    finally:
        await s.client.aclose()


# -- summary -----------------------------------------------------------------------------------------------
def slo_rate(record: dict, variant: str) -> float | None:
    ok = [float(label) for label, runs in record.get("runs", {}).items() if label != "inf" and variant in runs
          and runs[variant]["errors"] == 0 and number(runs[variant]["ttft_p99_ms"])
          and runs[variant]["ttft_p99_ms"] <= 1e3 * SLO_TTFT_S and number(runs[variant]["tpot_p99_ms"])
          and runs[variant]["tpot_p99_ms"] <= 1e3 * SLO_TPOT_S]
    return max(ok) if ok else None


def nf4_over_dense_max(calibration: dict | None) -> float | None:
    """Worst NF4-path / dense-bf16 time over the calibrated shapes at decode batches (1-64 rows)."""
    ratios = [nf4 / dense for rows in (calibration or {}).values() for m, (nf4, dense) in rows.items()
              if dense and int(m) <= 64]
    return max(ratios) if ratios else None


def summarize(record: dict) -> dict:
    runs = record.get("runs", {})

    def get(label, variant, key):
        return runs.get(label, {}).get(variant, {}).get(key)

    return {"trace_inf_base_over_floor": get("inf", "base_only", "wall_over_floor"),
            "trace_inf_adapters_over_base": ratio(get("inf", "adapters", "output_tok_s"),
                                                  get("inf", "base_only", "output_tok_s")),
            "rate4_ttft_p99_adapters_over_base": ratio(get("4", "adapters", "ttft_p99_ms"),
                                                       get("4", "base_only", "ttft_p99_ms")),
            "rate4_tpot_p99_adapters_over_base": ratio(get("4", "adapters", "tpot_p99_ms"),
                                                       get("4", "base_only", "tpot_p99_ms")),
            "slo_rate_adapters": slo_rate(record, "adapters"), "slo_rate_base_only": slo_rate(record, "base_only"),
            "first_burst_ttft_over_warm": ratio(record.get("first_burst", {}).get("ttft_p50_ms"),
                                                record.get("warm_burst", {}).get("ttft_p50_ms")),
            "first_burst_adapters_ttft_over_warm": ratio(record.get("first_burst_adapters", {}).get("ttft_p50_ms"),
                                                         record.get("warm_burst_adapters", {}).get("ttft_p50_ms")),
            "prefill_mfu_2048": record.get("prefill", {}).get("mfu"),
            "nf4_over_dense_max": nf4_over_dense_max(record.get("nf4_calibration_us"))}


def plot(result: dict, path: Path) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    shapes = list(result["shapes"])
    fig, axes = plt.subplots(len(shapes), 3, figsize=(15, 4 * len(shapes)), squeeze=False)
    for row, key in zip(axes, shapes):
        runs = result["shapes"][key].get("runs", {})
        labels = [r for r in runs if r != "inf"]
        rates = [float(r) for r in labels]
        for variant, style in (("base_only", "o-"), ("adapters", "s--")):
            tok = [runs[r].get(variant, {}).get("output_tok_s") for r in labels]
            row[0].plot(rates, tok, style, label=variant)
            for q, alpha in ((50, 0.5), (99, 1.0)):
                row[1].plot(rates, [runs[r].get(variant, {}).get(f"ttft_p{q}_ms") for r in labels], style,
                            alpha=alpha, label=f"{variant} p{q}")
                row[2].plot(rates, [runs[r].get(variant, {}).get(f"tpot_p{q}_ms") for r in labels], style,
                            alpha=alpha, label=f"{variant} p{q}")
        row[1].axhline(1e3 * SLO_TTFT_S, color="grey", lw=0.8)
        row[2].axhline(1e3 * SLO_TPOT_S, color="grey", lw=0.8)
        for ax, title in zip(row, ("output tok/s", "TTFT (ms)", "TPOT (ms)")):
            ax.set_title(f"{key}: {title}")
            ax.set_xlabel("request rate (req/s)")
            ax.legend(fontsize=7)
        row[1].set_yscale("log")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    return True


def print_table(result: dict) -> None:
    print(f"\nserve_trace: {result['device']}; matmul peak {result['matmul_peak_flops'] / 1e12:,.0f} TFLOP/s, "
          f"copy {result['copy_bandwidth_bytes_per_s'] / 1e9:,.0f} GB/s")
    print(f"{'shape':<5} {'rate':>5} {'variant':<9} {'tok/s':>8} {'TTFT p50':>9} {'p99':>8} {'TPOT p50':>9} {'p99':>7} "
          f"{'ITL p99':>8} {'wall/floor':>10} {'errors':>6}")
    for key, rec in result["shapes"].items():
        for label, runs in rec.get("runs", {}).items():
            for variant, r in runs.items():
                cells = [r.get(k) for k in ("ttft_p50_ms", "ttft_p99_ms", "tpot_p50_ms", "tpot_p99_ms", "itl_p99_ms")]
                cells = ["-" if c is None else f"{c:,.1f}" for c in cells]
                floor = "-" if r.get("wall_over_floor") is None else f"{r['wall_over_floor']:.2f}"
                print(f"{key:<5} {label:>5} {variant:<9} {r['output_tok_s']:>8,.0f} {cells[0]:>9} {cells[1]:>8} "
                      f"{cells[2]:>9} {cells[3]:>7} {cells[4]:>8} {floor:>10} {r['errors']:>6}")
        print(f"{key}: " + ", ".join(f"{k} {v:.3g}" if number(v) else f"{k} {v}" for k, v in rec["summary"].items()))


def pair(text: str) -> tuple[int, int]:
    lo, hi = (int(x) for x in text.split(","))
    return lo, hi


def add_trace_arguments(ap) -> None:
    """The flags that define the trace (make_trace, schedule); bench/adapter_scale.py --gpu takes them too."""
    ap.add_argument("--requests", type=int, default=400)
    ap.add_argument("--gamma-cv", type=float, default=1.0, help="1: Poisson arrivals; else gamma gaps of this CV")
    ap.add_argument("--prompt-len", type=pair, default=(64, 1024))
    ap.add_argument("--output-len", type=pair, default=(32, 256))
    ap.add_argument("--zipf", type=float, default=1.0)
    ap.add_argument("--base-share", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="8b,1b")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--work", type=Path, default=Path("/tmp/serve_gpu"), help="checkpoints cache (serve_gpu's)")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "serve_trace.json")
    add_trace_arguments(ap)
    ap.add_argument("--rate-requests", type=int, default=200, help="requests of a rate run (the trace's first)")
    ap.add_argument("--rates", default="inf,4,8", help="comma list: inf and request rates (req/s)")
    ap.add_argument("--adapters", type=int, default=64)
    ap.add_argument("--adapter-kind", choices=["lora16", "mix"], default="lora16")
    ap.add_argument("--fp32-adapters", action="store_true", help="upload fp32 files (PEFT's default) instead of bf16")
    ap.add_argument("--upload-concurrency", type=int, default=8)
    ap.add_argument("--burst", type=int, default=32)
    ap.add_argument("--burst-prompt", type=int, default=128)
    ap.add_argument("--burst-new-tokens", type=int, default=128)
    ap.add_argument("--prefill-tokens", type=int, default=2048)
    ap.add_argument("--server-timeout", type=float, default=1200)
    ap.add_argument("--server-args", default="", help="extra `loraplex serve` flags (the product is the defaults)")
    args = ap.parse_args()
    args.rates = [float(r) for r in args.rates.split(",")]
    keys = [k.strip() for k in args.shapes.split(",") if k.strip()]
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    model_dirs = {k: work / k / "model" for k in keys}
    prepared = in_fresh_process(prepare_device, [SHAPES[k] for k in keys], [str(model_dirs[k]) for k in keys],
                                args.device, True)
    peak, bandwidth = prepared["matmul_peak_flops"], prepared["copy_bandwidth_bytes_per_s"]
    result = {"benchmark": "serve_trace", "device": prepared["device"], "torch": prepared["torch"],
              "python": platform.python_version(), "matmul_peak_flops": peak, "copy_bandwidth_bytes_per_s": bandwidth,
              "settings": {k: v for k, v in vars(args).items() if k not in ("work", "out")},
              "targets": TARGETS, "before_8b": BEFORE_8B, "shapes": {},
              "slo": {"ttft_p99_s": SLO_TTFT_S, "tpot_p99_s": SLO_TPOT_S},
              "server_flags": "defaults (only --model, --port, --grpc-port 0, --adapter-dir, --device cpu on a CPU)"
                              + (f" + {args.server_args}" if args.server_args else "")}
    result["settings"]["rates"] = ["inf" if math.isinf(r) else r for r in args.rates]

    def save():
        for rec in result["shapes"].values():
            rec["summary"] = summarize(rec)
            rec["summary_met"] = {k: met(rec["summary"].get(k), t) for k, t in TARGETS.items()}
        present = [k for k in ("8b", "1b", "tiny") if k in result["shapes"]]
        if present:
            result["summary_shape"] = present[0]
            result["summary"] = result["shapes"][present[0]]["summary"]
            result["summary_met"] = result["shapes"][present[0]]["summary_met"]
        args.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.out.with_name(args.out.name + ".tmp")
        tmp.write_text(json.dumps(result, indent=2))
        os.replace(tmp, args.out)

    failed = []
    for key in keys:
        shape = SHAPES[key]
        record = result["shapes"].setdefault(key, {"model": shape.name})
        server = Server(model_dirs[key], work, args.device, None, tuple(args.server_args.split()))
        try:
            record["server_start_s"] = server.start(args.server_timeout)
            print(f"\n{shape.name} ({key}): server healthy after {record['server_start_s']:.1f} s", flush=True)
            asyncio.run(shape_session(args, key, shape, server.url, record, save, peak, bandwidth))
        except Exception as e:
            traceback.print_exc()
            record["error"] = f"{type(e).__name__}: {e}"
            failed.append(key)
            print(f"--- server log tail ---\n{server.log_tail()}\n---", file=sys.stderr, flush=True)
        finally:
            server.stop()
            save()
    print_table(result)
    png = args.out.with_suffix(".png")
    if plot(result, png):
        print(f"plot: {png}")
    if failed:
        sys.exit(f"serve_trace: failed shapes {', '.join(failed)}")


if __name__ == "__main__":
    main()
