"""The feature cases of bench/serve_gpu.py: prefix-cache hits, structured-output rows, DoRA rows.

Each case is a function of the running ShapeSession and of serve_gpu's module (`sg`: its helpers,
passed in rather than imported, since serve_gpu.py runs as __main__). Definitions of what they record:
FEATURE_DEFINITIONS and serve_gpu_report.WAVE_DEFINITIONS. The bench tokenizer (serve_gpu.write_tokenizer) is
byte-level BPE, its 256 byte symbols at ids 4..259: they spell any JSON, one character a token, and
xgrammar builds its tables over it as runtime/structured.py does (tests/test_serve_gpu_bench.py checks both).
"""
from __future__ import annotations

import asyncio
import json
import re
import statistics
import time
from collections import Counter

from serve_gpu_report import fmt

# the prefix cache's numbers: /health key (runtime/engine.py stats) -> /metrics sample (runtime/metrics.py;
# counters carry Prometheus' _total suffix)
PREFIX_COUNTERS = {"prefix_cache_hit_blocks": "loraplex_prefix_cache_hit_blocks_total",
                   "prefix_cache_queried_blocks": "loraplex_prefix_cache_queried_blocks_total",
                   "prefix_cache_hit_rate": "loraplex_prefix_cache_hit_rate",
                   "prefix_cache_evictions": "loraplex_prefix_cache_evictions_total",
                   "kv_blocks_cached": "loraplex_kv_blocks_cached"}
PREFIX_MAX_TOKENS = 2  # the first token is the TTFT; the second one checks that decoding on the cached KV agrees
# every row of an array of at least 200 integers runs max_tokens (<= 2 tokens per item at 128 new tokens)
LONG_SCHEMA = {"type": "array", "items": {"type": "integer"}, "minItems": 200}
LONG_FORMAT = {"type": "json_schema", "json_schema": {"name": "integers", "schema": LONG_SCHEMA}}
STRUCTURED_ADAPTERS = 4  # adapters of the mixed structured wave
STRUCTURED_SALT = 4242  # one prompt set for every structured wave: rows differ only in their format
# a prefix of LONG_SCHEMA's JSON text as xgrammar writes it (no free whitespace; items separated by ", "):
# "[", integers without leading zeros, separators, maybe a partial item
_INT = r"-?(?:0|[1-9][0-9]*)"
INT_ARRAY_PREFIX = re.compile(rf"^(?:\[(?:(?:{_INT}, ?)*(?:-|{_INT})?)?)?$")

FEATURE_DEFINITIONS = {
    "prefix_hit_ttft_over_miss": "p50 streaming time to first token of a --prefix-tokens prompt seen before "
                                 "(prefix-cache hit) / p50 of the same prompts the first time (miss); base model",
    "prefix_hit_ttft_over_miss_adapter": "the same with one rank-16 adapter (its own cache entries)",
    "structured_step_over_free": "decode step ms, B rows all constrained by a JSON schema / the same B rows free",
    "structured_half_step_over_free": "decode step ms, B rows half constrained, half free / all free",
    "dora_step_over_lora": "decode step ms, B distinct rank-16 DoRA adapters / B distinct rank-16 LoRA adapters "
                           "(all seven projections)",
}


def summarize_features(record: dict, batch: int) -> dict:
    waves, prefix = record.get("waves", {}), record.get("prefix", {})

    def step(name):
        return waves.get(name, {}).get("decode_step_ms")

    free = step(f"structured_free_b{batch}")
    return {"prefix_hit_ttft_over_miss": prefix.get("base", {}).get("hit_ttft_over_miss"),
            "prefix_hit_ttft_over_miss_adapter": prefix.get("adapter", {}).get("hit_ttft_over_miss"),
            "structured_step_over_free": ratio(step(f"structured_json_b{batch}"), free),
            "structured_half_step_over_free": ratio(step(f"structured_half_b{batch}"), free),
            "dora_step_over_lora": record.get("dora", {}).get("dora_step_over_lora")}


def ratio(a, b):
    numbers = all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in (a, b))
    return a / b if numbers and b else None


def counter_delta(before: dict, after: dict, keys) -> dict:
    def known(x):
        return isinstance(x, (int, float)) and not isinstance(x, bool)
    return {k: after[k] - before[k] if known(after.get(k)) and known(before.get(k)) else None for k in keys}


# -- prefix: time to first token, cache miss vs hit --------------------------------------------------------
async def stream_first_token(session, sg, model: str, prompt: list[int]) -> dict:
    """A streamed greedy completion of PREFIX_MAX_TOKENS tokens: ms to its first data chunk, its tokens,
    and the prefix-cache counters it moved (/health read before and after, outside the timing)."""
    body = {"model": model, "prompt": prompt, "max_tokens": PREFIX_MAX_TOKENS, "temperature": 0, "ignore_eos": True,
            "stream": True, "logprobs": 0}
    before = sg.engine_stats(await session.health())
    t, first, tokens, logprobs = time.perf_counter(), None, [], []
    async with session.client.stream("POST", "/v1/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"streamed completion with {model}: HTTP {r.status_code}: {(await r.aread())[:500]!r}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            first = first or time.perf_counter()
            chunk = json.loads(line[len("data: "):])
            if "error" in chunk:
                raise RuntimeError(f"streamed completion with {model}: {chunk['error']}")
            lp = chunk["choices"][0].get("logprobs") or {}
            tokens += lp.get("tokens", [])
            logprobs += lp.get("token_logprobs", [])
    after = sg.engine_stats(await session.health())
    moved = counter_delta(before, after, ("prefix_cache_hit_blocks", "prefix_cache_queried_blocks", "merged_steps"))
    return {"ttft_ms": (first - t) * 1000, "tokens": tokens, "token_logprobs": logprobs,
            "hit_blocks": moved["prefix_cache_hit_blocks"], "queried_blocks": moved["prefix_cache_queried_blocks"],
            "merged_steps": moved["merged_steps"]}


async def prefix_series(session, sg, model: str, prompts: list[list[int]], warmup: list[int]) -> dict:
    """Each prompt twice in a row (miss, then hit), after one warm-up pair (compiles, loads the adapter)."""
    await stream_first_token(session, sg, model, warmup)
    await stream_first_token(session, sg, model, warmup)
    before = sg.engine_stats(await session.health())
    runs = []
    for i, prompt in enumerate(prompts):
        miss = await stream_first_token(session, sg, model, prompt)
        hit = await stream_first_token(session, sg, model, prompt)
        diffs = [abs(a - b) for a, b in zip(miss["token_logprobs"], hit["token_logprobs"])]
        runs.append({"prompt": i, "miss_ms": miss["ttft_ms"], "hit_ms": hit["ttft_ms"],
                     "miss_blocks_hit_queried": [miss["hit_blocks"], miss["queried_blocks"]],
                     "hit_blocks_hit_queried": [hit["hit_blocks"], hit["queried_blocks"]],
                     "same_tokens": miss["tokens"] == hit["tokens"], "tokens": miss["tokens"],
                     "max_token_logprob_diff": max(diffs) if diffs else None,
                     "merged_steps": [miss["merged_steps"], hit["merged_steps"]]})
    after = sg.engine_stats(await session.health())
    moved = counter_delta(before, after, ("prefix_cache_hit_blocks", "prefix_cache_queried_blocks"))
    p50_miss = statistics.median(r["miss_ms"] for r in runs)
    p50_hit = statistics.median(r["hit_ms"] for r in runs)
    return {"model": model, "runs": runs, "p50_miss_ms": p50_miss, "p50_hit_ms": p50_hit,
            "hit_ttft_over_miss": ratio(p50_hit, p50_miss), "same_output": all(r["same_tokens"] for r in runs),
            "blocks_hit": moved["prefix_cache_hit_blocks"], "blocks_queried": moved["prefix_cache_queried_blocks"],
            "blocks_hit_on_misses": sum(r["miss_blocks_hit_queried"][0] or 0 for r in runs),
            "blocks_hit_on_hits": sum(r["hit_blocks_hit_queried"][0] or 0 for r in runs)}


async def metrics_values(session, names) -> dict:
    """The named Prometheus samples of /metrics (None where absent)."""
    r = await session.client.get("/metrics")
    values = {}
    for line in r.text.splitlines() if r.status_code == 200 else []:
        parts = line.split()
        if len(parts) == 2 and parts[0] in names:
            values[parts[0]] = float(parts[1])
    return {n: values.get(n) for n in names}


async def case_prefix(session, sg) -> None:
    args, shape = session.args, session.shape
    tokens = args.prefix_tokens or (256 if session.key == "tiny" else 1024)
    prompts = sg.prompt_ids(args.prefix_prompts + 1, tokens, shape.vocab, salt=60_000 + tokens)
    warmup, prompts = prompts[0], prompts[1:]
    adapter = sg.distinct_specs(1)[0]
    await session.ensure([adapter])
    stats = sg.engine_stats(await session.health())
    base = await prefix_series(session, sg, "base", prompts, warmup)
    # the same prompts with an adapter: its cache key differs, so its first request of each is a miss too
    with_adapter = await prefix_series(session, sg, adapter.id, prompts, warmup)
    session.record["prefix"] = {
        "prompt_tokens": tokens, "prompts": len(prompts), "max_tokens": PREFIX_MAX_TOKENS,
        "prefix_caching": stats.get("prefix_caching"), "kv_block_size": stats.get("kv_block_size"),
        "counter_names": PREFIX_COUNTERS, "metrics_after": await metrics_values(session, PREFIX_COUNTERS.values()),
        "base": base, "adapter": with_adapter, "adapter_id": adapter.id,
        "ttft": "request start -> first streamed data chunk (greedy, ignore_eos, max_tokens 2, logprobs 0)"}
    session.save()
    for name, s in (("base", base), (adapter.id, with_adapter)):
        print(f"  [{session.key}] prefix {name:<6} TTFT p50 miss {s['p50_miss_ms']:.1f} ms, hit "
              f"{s['p50_hit_ms']:.1f} ms (x{s['hit_ttft_over_miss']:.3f}); blocks hit {s['blocks_hit']}/{s['blocks_queried']} queried; "
              f"same output {s['same_output']}", flush=True)


# -- structured: decode step of constrained rows vs free rows ----------------------------------------------
async def format_wave(session, sg, models: list[str], formats: list[dict | None], max_tokens: int) -> dict:
    """One wave, every row at once, the fixed structured prompts; a row that ends early or fails is recorded."""
    prompts = sg.prompt_ids(len(models), session.args.prompt_tokens, session.shape.vocab, salt=STRUCTURED_SALT)

    async def one(model, prompt, fmt):
        body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
        if fmt is not None:
            body["response_format"] = fmt
        r = await session.client.post("/v1/completions", json=body)
        if r.status_code != 200:
            return {"tokens": 0, "finish_reason": f"HTTP {r.status_code}", "text": None, "error": r.text[:300]}
        out = r.json()
        return {"tokens": out["usage"]["completion_tokens"], "finish_reason": out["choices"][0]["finish_reason"],
                "text": out["choices"][0]["text"]}

    t = time.perf_counter()
    rows = await asyncio.gather(*(one(m, p, f) for m, p, f in zip(models, prompts, formats)))
    return {"rows": rows, "seconds": time.perf_counter() - t}


def json_check(rows: list[dict]) -> dict:
    """The constrained rows' texts against LONG_SCHEMA: complete and valid, or a valid prefix cut at max_tokens."""
    texts = [r["text"] for r in rows]
    complete = 0
    for text in texts:
        try:
            value = json.loads(text) if text is not None else None
        except ValueError:
            continue
        complete += isinstance(value, list) and len(value) >= LONG_SCHEMA["minItems"] and all(
            isinstance(v, int) and not isinstance(v, bool) for v in value)
    prefixes = sum(1 for text in texts if text is not None and INT_ARRAY_PREFIX.match(text))
    return {"rows": len(texts), "complete_valid": complete, "valid_prefix": prefixes,
            "invalid": len(texts) - complete - prefixes, "example": (texts[0] or "")[:80] if texts else None}


async def measure_formats(session, sg, name: str, models: list[str], formats: list[dict | None]) -> dict:
    """serve_gpu's measure() for rows with a response_format: warm-up wave, then the measured wave between two
    /health reads; stored under waves[name] with the constrained rows' token counts and JSON check."""
    new = session.args.new_tokens
    await format_wave(session, sg, models, formats, min(new, max(8, new // 4)))
    before = sg.engine_stats(await session.health())
    wave = await format_wave(session, sg, models, formats, new)
    after = sg.engine_stats(await session.health())
    counters = counter_delta(before, after, sg.COUNTERS)
    step_s = ratio(counters["decode_seconds"], counters["decode_steps"])
    tokens = sum(r["tokens"] for r in wave["rows"])
    constrained = [r for r, f in zip(wave["rows"], formats) if f is not None]
    adapters = sorted({m for m in models if m != "base"})
    record = {"rows": len(models), "distinct_adapters": len(adapters), "adapters": adapters,
              "constrained_rows": len(constrained), "seconds": wave["seconds"], "completion_tokens": tokens,
              "tokens_per_s": tokens / wave["seconds"], "decode_step_ms": step_s * 1000 if step_s is not None else None,
              "mean_rows_per_decode_step": ratio(counters["decode_rows"], counters["decode_steps"]),
              "wall_breakdown_s": sg.wall_breakdown(wave["seconds"], counters), "counters": counters, "gauges_after": {k: after.get(k) for k in sg.GAUGES},
              "finish_reasons": dict(Counter(r["finish_reason"] for r in wave["rows"])),
              "completion_tokens_constrained": sorted(Counter(r["tokens"] for r in constrained).items()),
              "completion_tokens_free": sorted(Counter(r["tokens"] for r, f in zip(wave["rows"], formats)
                                                       if f is None).items()),
              "errors": sorted({r["error"] for r in wave["rows"] if r.get("error")})[:3],
              "json": json_check(constrained) if constrained else None,
              "registered_adapters": len(session.registered), "at": time.strftime("%Y-%m-%d %H:%M:%S")}
    session.record.setdefault("waves", {})[name] = record
    session.save()
    step = f"{record['decode_step_ms']:.2f} ms/step" if record["decode_step_ms"] is not None else "no step counters"
    check = record["json"]
    print(f"  [{session.key}] {name:<28} {record['tokens_per_s']:>9.1f} tok/s  {step}  {len(constrained)} constrained"
          + (f" ({check['valid_prefix']} valid prefixes, {check['complete_valid']} complete)" if check else ""),
          flush=True)
    return record


async def case_structured(session, sg) -> None:
    b = session.args.batch
    adapters = sg.distinct_specs(STRUCTURED_ADAPTERS)
    await session.ensure(adapters)
    t = time.perf_counter()  # the first constrained request builds the tokenizer tables and compiles the grammar
    first = await format_wave(session, sg, ["base"], [LONG_FORMAT], 1)
    session.record["structured"] = {"schema": LONG_SCHEMA, "first_request_ms": (time.perf_counter() - t) * 1000,
                                    "first_request": first["rows"][0]["finish_reason"]}
    await measure_formats(session, sg, f"structured_free_b{b}", ["base"] * b, [None] * b)
    await measure_formats(session, sg, f"structured_json_b{b}", ["base"] * b, [LONG_FORMAT] * b)
    await measure_formats(session, sg, f"structured_half_b{b}", ["base"] * b,
                          [LONG_FORMAT if i % 2 == 0 else None for i in range(b)])
    n = STRUCTURED_ADAPTERS  # rows i and i + n share an adapter; one of each such pair is constrained
    await measure_formats(session, sg, f"structured_half_adapters{n}_b{b}", [adapters[i % n].id for i in range(b)],
                          [LONG_FORMAT if (i // n) % 2 == 0 else None for i in range(b)])
    waves = session.record["waves"]
    session.record["structured"].update(
        {"structured_step_over_free": ratio(waves[f"structured_json_b{b}"]["decode_step_ms"],
                                            waves[f"structured_free_b{b}"]["decode_step_ms"]),
         "half_step_over_free": ratio(waves[f"structured_half_b{b}"]["decode_step_ms"],
                                      waves[f"structured_free_b{b}"]["decode_step_ms"])})
    session.save()


# -- dora: B distinct DoRA adapters vs B distinct LoRA adapters --------------------------------------------
def dora_specs(sg, n: int) -> list:
    return [sg.AdapterSpec(f"dora{i}", 16, dora=True, seed=20_000 + i) for i in range(n)]


async def case_dora(session, sg) -> None:
    b, waves = session.args.batch, session.record.setdefault("waves", {})
    lora_name, dora_name = f"distinct_b{b}", f"dora_b{b}"
    lora_upload_s, reused = None, lora_name in waves
    if not reused:  # the distinct case did not run (in this run or an earlier one merged into --out)
        specs = sg.distinct_specs(b)
        lora_upload_s = await session.ensure(specs)
        await session.measure(lora_name, [s.id for s in specs])
    specs = dora_specs(sg, b)
    upload_s = await session.ensure(specs)
    before = sg.engine_stats(await session.health())
    t = time.perf_counter()  # one token per adapter: loads them into slots (DoRA factors computed there)
    await session.completions([s.id for s in specs], 1)
    first_wave_s = time.perf_counter() - t
    loads = counter_delta(before, sg.engine_stats(await session.health()), ("adapter_loads",))["adapter_loads"]
    dora = await session.measure(dora_name, [s.id for s in specs])
    lora = waves[lora_name]
    session.record["dora"] = {
        "adapters": b, "rank": 16, "targets": "all seven projections", "upload_seconds": upload_s,
        "upload_seconds_per_adapter": upload_s / b, "first_token_wave_seconds": first_wave_s,
        "adapter_loads_in_first_wave": loads, "adapter_bytes_bf16": specs[0].bytes_bf16(session.shape),
        "lora_wave": lora_name, "lora_wave_reused": reused, "lora_upload_seconds": lora_upload_s,
        "lora_upload_seconds_distinct": session.record.get("upload_seconds_distinct"),
        "dora_step_ms": dora["decode_step_ms"], "lora_step_ms": lora.get("decode_step_ms"),
        "dora_step_over_lora": ratio(dora["decode_step_ms"], lora.get("decode_step_ms")),
        "dora_tokens_per_s_over_lora": ratio(dora["tokens_per_s"], lora.get("tokens_per_s"))}
    session.save()
    print(f"  [{session.key}] dora/lora decode step {fmt(session.record['dora']['dora_step_over_lora'], 3)}; upload "
          f"{upload_s:.2f} s for {b}, first one-token wave {first_wave_s:.2f} s", flush=True)
