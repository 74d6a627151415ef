"""GPU serving speed through the HTTP API: a real `loraplex serve` process on random-weight Llama-3.2-1B
and Llama-3.1-8B checkpoints (NF4 base, the server's GPU default), with the decode step time from the
engine's counters beside its bandwidth floor, and the HF transformers + PEFT baseline in the same run.

    python bench/serve_gpu.py [--shapes 1b,8b] [--cases base,over8,...] [--out bench/results/serve_gpu.json]
    python bench/serve_gpu.py --shapes tiny --device cpu --new-tokens 4 --skip-peft   # smoke run on a CPU

Per shape: one server process, started with no tuning flags (the defaults are the product), serves the
cases in this order (`--cases` picks a subset, in its own order; results merge into an existing --out file whose settings
match, so a run can be split across commands):
  base       base model only, batch 1, B, 2B (B = --batch, 32), no adapters registered
  over8      B rows over 8 rank-16 adapters, 8 registered
  distinct   B and 2B distinct rank-16 adapters (all seven projections); batch 1 with one adapter
             (the issue calls B distinct adapters in one batch "mixed"; `mixed` is an alias)
  mix        B rows over distinct LoRA r8/r16/r32/r64 and GraLoRA r32 k=4 adapters
  merged     B rows of one adapter (merge policy at its default: /health merged_steps says whether it
             merged), and B rows over two adapters (B/2 each: the unmerged comparison when `unmerged` is
             not run)
  residency  register up to --adapters-residency (1,000) with rank-16 q/v adapters, make --resident (128)
             of them resident with one-token requests, then re-run over8 and base batch B
  hotload    --hotload-runs times: upload a fresh rank-16 adapter, stream a 1-token completion with it;
             milliseconds from the upload's start to the first streamed token
  prefix     (bench/serve_gpu_features.py, as are the next two) --prefix-prompts (5) prompts of
             --prefix-tokens (1024; 256 on tiny), each streamed twice in a row, greedy, 2 tokens: time to the
             first chunk on a prefix-cache miss, then on the hit; base model, then one rank-16 adapter (its
             own cache entries); /health's prefix_cache_* counters per request; whether hit and miss agree
  structured B rows, the same prompts, free vs all constrained by a JSON schema (an array of >= 200
             integers: every row runs max_tokens) vs half constrained, and half over 4 adapters; decode
             step time, and how many constrained outputs are valid JSON (prefixes: cut at max_tokens)
  dora       B distinct rank-16 DoRA adapters (all seven projections) vs the distinct_bB LoRA wave (run
             here if the record lacks it); upload seconds, the first one-token wave (slot loads + DoRA factors)
  unmerged   a second, short server with `--merge-policy off`: B rows of one adapter (run by default on
             every shape but 8b, whose server start costs 1-2 minutes; name it in --cases to run it there)
  peft       after the servers stop: HF transformers (bitsandbytes NF4 on CUDA, same settings as the server)
             + PEFT generate, batch B, B distinct adapters in one batch (`adapter_names`), and the base alone
  fidelity   in a fresh process, tests/test_gpu_fastpath.py's check on this checkpoint: every piece of the
             fast path (graphs, paged attention, fused NF4, layer kernels, Triton adapter ops, merged rows)
             alone and together against the eager reference, teacher-forced, within eager bf16's own error
             against fp32, plus a negative control that must fail; passed / failed per check (not on 8b
             unless named, like unmerged; on a CPU only the merged rows)

Every throughput wave: B concurrent /v1/completions with token-id prompts (--prompt-tokens 128), greedy,
ignore_eos, max_tokens = --new-tokens (128), after a warm-up wave of the same rows; tok/s = generated
tokens / the wave's wall time. /health is read before and after each wave; decode step time =
delta decode_seconds / delta decode_steps. The floor of a decode step = (NF4 base bytes: 0.5 B/param +
1 B absmax per 64 params + fp32 nested absmax per 256 blocks, for every layer's seven projections; bf16
lm_head; norms) + (bf16 A and B of the distinct adapters in the batch) + (KV bytes read: mean context
per row x rows x layers x 2 x kv_heads x head_dim x 2 B), divided by the measured device copy bandwidth.

Checkpoints (bf16 safetensors, weights ~N(0, 0.02), written shard by shard) and adapters are cached
under --work. Beside this file: serve_gpu_models.py (shapes, bytes per step, adapters, checkpoints),
serve_gpu_device.py (fresh-process device work: copy bandwidth, HF PEFT), serve_gpu_features.py
(the prefix, structured and dora cases). The JSON is rewritten after every wave, so a run cut short still leaves its numbers.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import time
import traceback
from dataclasses import asdict
from pathlib import Path

import httpx
import torch

import serve_gpu_features as features  # the prefix, structured and dora cases (beside this file)
import figures  # noqa: E402 - bench/, beside this file: a PNG beside the JSON
from serve_gpu_device import fast_path_fidelity, hf_peft_baseline, in_fresh_process, prepare_device, prompt_ids
from serve_gpu_models import (PROJECTIONS, QV, SHAPES, AdapterSpec, ModelShape, RandomPool, adapter_payload,
                              base_bytes_per_step, distinct_specs, kv_bytes_per_token, mix_specs, qv_spec,
                              write_adapter)
from serve_gpu_report import SUMMARY_DEFINITIONS, TARGETS, WAVE_DEFINITIONS, met, number, print_table, ratio, summarize

CASES = ("base", "over8", "distinct", "mix", "merged", "residency", "hotload", "prefix", "structured", "dora",
         "unmerged", "forcemerged", "peft", "fidelity")
CASE_ALIASES = {"mixed": "distinct"}
SERVER_CASES = CASES[:10]
OVER = 8  # adapters in the over8 case
COUNTERS = ("decode_steps", "decode_seconds", "decode_rows", "decode_context_tokens", "adapter_loads",
            "adapter_evictions", "merged_steps", "steps", "prefill_steps", "graph_steps", "tokens_generated",
            "graph_gpu_seconds", "prefill_seconds", "bookkeeping_seconds", "idle_seconds", "gc_seconds",
            "gc_full_collections")
GAUGES = ("resident_adapters", "adapter_memory_bytes_total", "adapter_memory_bytes_used", "adapter_slots",
          "adapter_ops", "kv_blocks_total", "cuda_graphs", "merge_policy", "merged_adapter", "merged_bytes")
# -- the server process ------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def remove_stale_stores(work: Path) -> None:
    """Adapter stores left by benchmark runs that were killed (store-<pid>-<ns>, that pid gone): they are large."""
    for d in work.glob("store-*-*"):
        try:
            os.kill(int(d.name.split("-")[1]), 0)
        except ProcessLookupError:
            shutil.rmtree(d, ignore_errors=True)
        except (ValueError, PermissionError):
            pass


def die_with_parent() -> None:
    """In the child before exec (Linux): SIGTERM when this benchmark dies, even by SIGKILL (a time limit)."""
    if sys.platform.startswith("linux"):
        import ctypes
        import signal
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class Server:
    """`loraplex serve` in a child process with a fresh adapter store; removed again by stop()."""

    def __init__(self, model_dir: Path, work: Path, device: str, port: int | None, extra: tuple[str, ...] = ()):
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        stamp = f"{os.getpid()}-{time.time_ns()}"
        self.store = work / f"store-{stamp}"
        self.log_path = model_dir.parent / f"server-{stamp}.log"
        cmd = [sys.executable, "-m", "loraplex.runtime.cli", "serve", "--model", str(model_dir), "--port",
               str(self.port), "--grpc-port", "0", "--adapter-dir", str(self.store)]
        if device == "cpu":
            cmd += ["--device", "cpu"]
        self.cmd = cmd + list(extra)
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float) -> float:
        remove_stale_stores(self.store.parent)
        t = time.perf_counter()
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen(self.cmd, stdout=self.log, stderr=subprocess.STDOUT, preexec_fn=die_with_parent,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1"})
        while time.perf_counter() - t < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with code {self.proc.returncode}")
            try:
                if httpx.get(f"{self.url}/health", timeout=5, trust_env=False).json().get("status") == "ok":
                    return time.perf_counter() - t
            except (httpx.TransportError, ValueError):
                pass
            time.sleep(0.5)
        raise RuntimeError(f"the server was not healthy after {timeout:.0f} s")

    def log_tail(self, lines: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(30)
        if self.proc is not None:
            self.log.close()
        shutil.rmtree(self.store, ignore_errors=True)


# -- one shape's session with its server -------------------------------------------------------------------
def engine_stats(health: dict) -> dict:
    """/health's engine stats, top level or nested one level down."""
    flat = {}
    for key, value in health.items():
        if isinstance(value, dict):
            for k, v in value.items():
                flat.setdefault(k, v)
    flat.update({k: v for k, v in health.items() if not isinstance(v, dict)})
    return flat


def wall_breakdown(seconds: float, counters: dict) -> dict | None:
    """A wave's wall time by where the engine loop spent it (its counters between the two /health reads):
    decode and prefill steps, the per-token work after sampling, waiting for requests; `outside` is the
    rest (HTTP, the engine loop's own overhead). gc = the collector's time, inside any of them."""
    parts = {k: counters.get(f"{k}_seconds") for k in ("decode", "prefill", "bookkeeping", "idle", "gc")}
    if not all(number(v) for v in parts.values()):
        return None
    parts["outside"] = seconds - sum(v for k, v in parts.items() if k != "gc")
    return {k: round(v, 4) for k, v in parts.items()}


class ShapeSession:
    def __init__(self, args, key: str, shape: ModelShape, model_dir: Path, record: dict, save, bandwidth: float):
        self.args, self.key, self.shape, self.model_dir = args, key, shape, model_dir
        self.record, self.save, self.bandwidth = record, save, bandwidth
        self.adapter_root = Path(args.work) / key / "adapters"
        self.pool = RandomPool()
        self.registered: set[str] = set()
        self.specs: dict[str, AdapterSpec] = {}
        self.waves = 0
        self.client: httpx.AsyncClient | None = None
        self.quantization, self.dtype_bytes = "nf4", 2

    async def health(self) -> dict:
        r = await self.client.get("/health")
        r.raise_for_status()
        return r.json()

    async def connect(self, url: str) -> None:
        self.client = httpx.AsyncClient(base_url=url, trust_env=False, timeout=httpx.Timeout(1800.0, connect=60.0),
                                        limits=httpx.Limits(max_connections=512, max_keepalive_connections=512))
        model = (await self.health()).get("model", {})
        listed = (await self.client.get("/v1/adapters")).json()["data"]  # a fresh store: none, unless reused
        self.registered = {a["id"] for a in listed}
        self.quantization = model.get("quantization", "nf4")
        self.dtype_bytes = {"float32": 4}.get(model.get("dtype"), 2)
        self.record["server_model"] = model

    async def upload(self, adapter_id: str, config: bytes, weights: bytes) -> dict:
        files = {"config": ("adapter_config.json", config, "application/json"),
                 "weights": ("adapter_model.safetensors", weights, "application/octet-stream")}
        r = await self.client.post("/v1/adapters", data={"id": adapter_id}, files=files)
        if r.status_code != 201:
            raise RuntimeError(f"upload of {adapter_id}: HTTP {r.status_code}: {r.text[:500]}")
        self.registered.add(adapter_id)
        return r.json()

    async def ensure(self, specs: list[AdapterSpec], concurrency: int = 4, on_disk: bool = True) -> float:
        """Upload every spec not yet registered, a few at a time; returns the seconds it took."""
        todo = [s for s in dict.fromkeys(specs) if s.id not in self.registered]
        for s in specs:
            self.specs[s.id] = s
        gate = asyncio.Semaphore(concurrency)
        t = time.perf_counter()

        async def one(spec: AdapterSpec):
            async with gate:
                if on_disk:
                    d = write_adapter(spec, self.shape, self.pool, self.adapter_root)
                    payload = ((d / "adapter_config.json").read_bytes(), (d / "adapter_model.safetensors").read_bytes())
                else:
                    payload = adapter_payload(spec, self.shape, self.pool)
                await self.upload(spec.id, *payload)

        await asyncio.gather(*(one(s) for s in todo))
        return time.perf_counter() - t

    async def completions(self, models: list[str], max_tokens: int) -> dict:
        """One wave: every row at once; tok/s = generated tokens / the wave's wall time."""
        self.waves += 1
        prompts = prompt_ids(len(models), self.args.prompt_tokens, self.shape.vocab, salt=self.waves)

        async def one(model: str, prompt: list[int]) -> int:
            body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
            r = await self.client.post("/v1/completions", json=body)
            if r.status_code != 200:
                raise RuntimeError(f"completion with {model}: HTTP {r.status_code}: {r.text[:500]}")
            return r.json()["usage"]["completion_tokens"]

        t = time.perf_counter()
        tokens = await asyncio.gather(*(one(m, p) for m, p in zip(models, prompts)))
        seconds = time.perf_counter() - t
        if any(n != max_tokens for n in tokens):
            raise RuntimeError(f"expected {max_tokens} tokens per request, got {sorted(set(tokens))}")
        return {"seconds": seconds, "completion_tokens": sum(tokens), "tokens_per_s": sum(tokens) / seconds}

    def floor(self, adapters: list[AdapterSpec], counters: dict, rows: int) -> dict:
        base = base_bytes_per_step(self.shape, self.quantization, self.dtype_bytes)
        adapter_bytes = sum(s.bytes_bf16(self.shape) for s in dict.fromkeys(adapters))
        steps, ctx, nrows = (counters.get(k) for k in ("decode_steps", "decode_context_tokens", "decode_rows"))
        if number(steps) and steps and number(ctx) and number(nrows) and nrows:
            context_per_step, basis = ctx / steps, "engine counters"
        else:  # nominal: every row decodes with a context of prompt + half the new tokens on average
            context_per_step = rows * (self.args.prompt_tokens + (self.args.new_tokens + 1) / 2)
            basis = "nominal (no decode_context_tokens counter)"
        kv = context_per_step * kv_bytes_per_token(self.shape)
        total = base["total"] + adapter_bytes + kv
        return {"base_bytes": base["total"], "adapter_bytes": adapter_bytes, "kv_bytes": kv, "total_bytes": total,
                "floor_ms": total / self.bandwidth * 1000, "kv_basis": basis}

    async def measure(self, name: str, models: list[str], floor: bool = True) -> dict:
        """Warm-up wave, then the measured wave between two /health reads; stored under waves[name]."""
        warm = min(self.args.new_tokens, max(8, self.args.new_tokens // 4))
        await self.completions(models, warm)
        before = engine_stats(await self.health())
        wave = await self.completions(models, self.args.new_tokens)
        after = engine_stats(await self.health())
        counters = {k: (after[k] - before[k] if number(after.get(k)) and number(before.get(k)) else None)
                    for k in COUNTERS}
        adapters = [self.specs[m] for m in models if m != "base"]
        step_s = ratio(counters["decode_seconds"], counters["decode_steps"])
        record = {"rows": len(models), "distinct_adapters": len(set(a.id for a in adapters)),
                  "adapters": sorted({f"{a.peft_type} r{a.rank}" + (f" k{a.k}" if a.k > 1 else "") for a in adapters}),
                  **wave, "decode_step_ms": step_s * 1000 if step_s is not None else None,
                  "graph_gpu_step_ms": (1000 * counters["graph_gpu_seconds"] / counters["graph_steps"]
                                        if number(counters.get("graph_gpu_seconds")) and counters.get("graph_steps")
                                        else None),
                  "mean_rows_per_decode_step": ratio(counters["decode_rows"], counters["decode_steps"]),
                  "wall_breakdown_s": wall_breakdown(wave["seconds"], counters),
                  "counters": counters, "gauges_after": {k: after.get(k) for k in GAUGES},
                  "registered_adapters": len(self.registered), "at": time.strftime("%Y-%m-%d %H:%M:%S")}
        if floor:
            record["floor"] = self.floor(adapters, counters, len(models))
            record["step_over_floor"] = ratio(record["decode_step_ms"], record["floor"]["floor_ms"])
        self.record.setdefault("waves", {})[name] = record
        self.save()
        step = f"{record['decode_step_ms']:.2f} ms/step" if record["decode_step_ms"] is not None else "no step counters"
        parts = record["wall_breakdown_s"]
        where = "  wall " + " ".join(f"{k} {v:.2f}" for k, v in parts.items()) if parts else ""
        print(f"  [{self.key}] {name:<28} {wave['tokens_per_s']:>9.1f} tok/s  {step}{where}", flush=True)
        return record

    # -- the cases, in order ---------------------------------------------------------------------------
    async def case_base(self):
        b, big = self.args.batch, self.args.big_batch
        for rows in (1, b, big):
            await self.measure(f"base_b{rows}", ["base"] * rows)

    async def case_over8(self):
        specs = distinct_specs(OVER)
        await self.ensure(specs)
        await self.measure(f"over8_b{self.args.batch}", [specs[i % OVER].id for i in range(self.args.batch)])

    async def case_distinct(self):
        b, big = self.args.batch, self.args.big_batch
        specs = distinct_specs(big)
        self.record["upload_seconds_distinct"] = await self.ensure(specs)
        await self.measure(f"distinct_b{b}", [s.id for s in specs[:b]])
        await self.measure(f"distinct_b{big}", [s.id for s in specs])
        await self.measure("one_adapter_b1", [specs[0].id])

    async def case_mix(self):
        specs = mix_specs(self.args.batch)
        self.record["upload_seconds_mix"] = await self.ensure(specs)
        await self.measure(f"mix_b{self.args.batch}", [s.id for s in specs])

    async def case_merged(self):
        b = self.args.batch
        a, c = distinct_specs(2)
        await self.ensure([a, c])
        await self.measure(f"merged_b{b}", [a.id] * b, floor=False)
        await self.measure(f"two_adapters_b{b}", [a.id, c.id] * (b // 2) + [a.id] * (b % 2))

    async def case_forcemerged(self):
        """On a server started with --merge-policy <adapter> --merge-format <fmt>: traffic until the
        merged weights are in use, then B rows of that adapter."""
        a, b = distinct_specs(1)[0], self.args.batch
        await self.ensure([a])
        deadline = time.monotonic() + 120
        while not engine_stats(await self.health()).get("merged_adapter") and time.monotonic() < deadline:
            await self.completions([a.id] * b, 8)
        name = f"merged_{self.merge_format}_b{b}"
        merged_bytes = (await self.measure(name, [a.id] * b, floor=False))["gauges_after"].get("merged_bytes")
        if merged_bytes is not None:
            print(f"  [{self.key}] merged {self.merge_format} copy: {merged_bytes / 1e9:.2f} GB", flush=True)

    async def case_unmerged(self):
        a = distinct_specs(1)[0]
        await self.ensure([a])
        await self.measure(f"merge_off_b{self.args.batch}", [a.id] * self.args.batch)

    async def case_residency(self):
        args, b = self.args, self.args.batch
        over = distinct_specs(OVER)
        await self.ensure(over)
        # up to --adapters-residency registered in all (earlier cases' adapters count), at least --resident new
        need = max(args.resident, args.adapters_residency - len(self.registered))
        qv = [qv_spec(i) for i in range(need)]
        upload_s = await self.ensure(qv, on_disk=False)
        hot = [s.id for s in qv[:args.resident]]
        t = time.perf_counter()
        for i in range(0, len(hot), b):  # one-token requests, a wave of B distinct adapters at a time
            await self.completions(hot[i:i + b], 1)
        touch_s = time.perf_counter() - t
        stats = engine_stats(await self.health())
        self.record["residency"] = {"registered": len(self.registered), "uploaded_qv": need,
                                    "qv_adapter_bytes": qv_spec(0).bytes_bf16(self.shape), "upload_seconds": upload_s,
                                    "touched": len(hot), "touch_seconds": touch_s,
                                    "resident_after_touch": stats.get("resident_adapters"),
                                    "adapter_memory_bytes_total": stats.get("adapter_memory_bytes_total")}
        self.save()
        await self.measure(f"over8_b{b}_resident{args.resident}", [over[i % OVER].id for i in range(b)])
        await self.measure(f"base_b{b}_resident{args.resident}", ["base"] * b)

    async def case_prefix(self):
        await features.case_prefix(self, sys.modules[__name__])

    async def case_structured(self):
        await features.case_structured(self, sys.modules[__name__])

    async def case_dora(self):
        await features.case_dora(self, sys.modules[__name__])

    async def case_hotload(self):
        runs = []
        for i in range(self.args.hotload_runs):
            targets = QV if self.args.hotload_targets == "qv" else PROJECTIONS
            spec = AdapterSpec(f"hot-{time.time_ns()}-{i}", 16, targets=targets, seed=500_000 + i + self.waves * 100)
            self.specs[spec.id] = spec
            payload = adapter_payload(spec, self.shape, self.pool)
            prompt = prompt_ids(1, self.args.prompt_tokens, self.shape.vocab, salt=900 + i)[0]
            t = time.perf_counter()
            await self.upload(spec.id, *payload)
            uploaded = time.perf_counter()
            first = None
            body = {"model": spec.id, "prompt": prompt, "max_tokens": 1, "temperature": 0, "ignore_eos": True,
                    "stream": True}
            async with self.client.stream("POST", "/v1/completions", json=body) as r:
                if r.status_code != 200:
                    raise RuntimeError(f"hot-load completion: HTTP {r.status_code}: {(await r.aread())[:500]!r}")
                async for line in r.aiter_lines():
                    if first is None and line.startswith("data: ") and line != "data: [DONE]":
                        first = time.perf_counter()
            runs.append({"total_ms": (first - t) * 1000, "upload_ms": (uploaded - t) * 1000,
                         "first_token_after_upload_ms": (first - uploaded) * 1000})
        totals = sorted(r["total_ms"] for r in runs)
        self.record["hotload"] = {"runs": runs, "p50_ms": statistics.median(totals), "min_ms": totals[0],
                                  "max_ms": totals[-1], "adapter_targets": self.args.hotload_targets,
                                  "adapter_bytes_bf16": spec.bytes_bf16(self.shape),
                                  "upload_p50_ms": statistics.median(r["upload_ms"] for r in runs),
                                  "prompt_tokens": self.args.prompt_tokens}
        self.save()
        print(f"  [{self.key}] hotload p50 {self.record['hotload']['p50_ms']:.1f} ms "
              f"(upload p50 {self.record['hotload']['upload_p50_ms']:.1f} ms)", flush=True)


async def run_server_cases(session: ShapeSession, server: Server, cases: list[str]) -> list[str]:
    """Each case in turn; a failing case is recorded under errors and the next one still runs."""
    failed = []
    await session.connect(server.url)
    try:
        for case in cases:
            t = time.perf_counter()
            try:
                if server.proc.poll() is not None:
                    raise RuntimeError(f"the server exited with code {server.proc.returncode}")
                await getattr(session, f"case_{case}")()
                session.record.get("errors", {}).pop(case, None)
            except Exception as e:
                traceback.print_exc()
                session.record.setdefault("errors", {})[case] = f"{type(e).__name__}: {e}"
                failed.append(case)
            session.record.setdefault("phase_seconds", {})[case] = time.perf_counter() - t
            session.save()
    finally:
        await session.client.aclose()
    return failed


def with_server(args, session: ShapeSession, cases: list[str], extra: tuple[str, ...] = ()) -> list[str]:
    """Start a server, run the cases on it, stop it; returns the cases that failed."""
    server = Server(session.model_dir, Path(args.work), args.device, args.port, extra)
    try:
        start_s = server.start(args.server_timeout)
        session.record.setdefault("phase_seconds", {})["server_start" + ("_merge_off" if extra else "")] = start_s
        print(f"  [{session.key}] server healthy after {start_s:.1f} s ({' '.join(server.cmd[3:])})", flush=True)
        failed = asyncio.run(run_server_cases(session, server, cases))
    except Exception as e:
        traceback.print_exc()
        for case in cases:
            session.record.setdefault("errors", {})[case] = f"{type(e).__name__}: {e}"
        session.save()
        failed = cases
    finally:
        server.stop()
    if failed:
        print(f"--- server log tail ({server.log_path}) ---\n{server.log_tail()}\n---", file=sys.stderr, flush=True)
    return failed


def load_previous(path: Path, settings: dict, device: str) -> dict | None:
    """The results of earlier runs to merge into, if they were taken on this device with these settings."""
    try:
        previous = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if previous.get("settings") != settings or previous.get("device") != device:
        print(f"{path}: other settings or device than this run's; starting a fresh file", flush=True)
        return None
    return previous


def offline_case(record: dict, key: str, name: str, run, describe) -> list[str]:
    """A case run after the servers stop (in a fresh process): its result under record[name], its error
    under record["errors"][name], its seconds under phase_seconds; returns [] or its failed-case name."""
    t = time.perf_counter()
    try:
        record[name] = run()
        record.get("errors", {}).pop(name, None)
        print(f"  [{key}] {describe(record[name])}", flush=True)
        return []
    except Exception as e:
        traceback.print_exc()
        record.setdefault("errors", {})[name] = f"{type(e).__name__}: {e}"
        return [f"{key}:{name}"]
    finally:
        record["phase_seconds"][name] = time.perf_counter() - t


def describe_fidelity(r: dict) -> str:
    verdict = "passed" if r["passed"] else "FAILED: " + "; ".join(r["failed"])
    return f"fast path vs eager reference ({', '.join(r['pieces'])}): {verdict}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="1b,8b", help=f"comma list of {', '.join(SHAPES)}")
    ap.add_argument("--cases", default=None, help=f"comma list of {', '.join(CASES)} (alias: mixed; default: all)")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--work", type=Path, default=Path("/tmp/serve_gpu"), help="checkpoints and adapters cache")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "serve_gpu.json")
    ap.add_argument("--port", type=int, default=None, help="server HTTP port (default: a free one)")
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--batch", type=int, default=32, help="B: the batch of every summary ratio")
    ap.add_argument("--big-batch", type=int, default=64)
    ap.add_argument("--adapters-residency", type=int, default=1000, help="adapters registered in the residency case")
    ap.add_argument("--resident", type=int, default=128, help="adapters made resident in the residency case")
    ap.add_argument("--hotload-runs", type=int, default=10)
    ap.add_argument("--hotload-targets", default="all", choices=["all", "qv"],
                    help="the hot-loaded rank-16 adapter: all seven projections or q/v only")
    ap.add_argument("--prefix-tokens", type=int, default=None, help="prefix case prompt (default: 1024; 256 on tiny)")
    ap.add_argument("--prefix-prompts", type=int, default=5, help="prefix case: distinct prompts, each miss then hit")
    ap.add_argument("--peft-new-tokens", type=int, default=32)
    ap.add_argument("--skip-peft", action="store_true")
    ap.add_argument("--skip-residency", action="store_true")
    ap.add_argument("--server-timeout", type=float, default=900, help="seconds to wait for /health")
    args = ap.parse_args()

    shape_keys = [s.strip() for s in args.shapes.split(",") if s.strip()]
    cases = [CASE_ALIASES.get(c.strip(), c.strip()) for c in (args.cases or ",".join(CASES)).split(",") if c.strip()]
    for bad in [s for s in shape_keys if s not in SHAPES] + [c for c in cases if c not in CASES]:
        ap.error(f"unknown shape or case {bad!r}")
    explicit_unmerged = "unmerged" in (args.cases or "")
    cases = [c for c in (dict.fromkeys(cases) if args.cases else CASES) if not (c == "peft" and args.skip_peft)
             and not (c == "residency" and args.skip_residency)]

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    model_dirs = {k: work / k / "model" for k in shape_keys}
    t = time.perf_counter()
    prepared = in_fresh_process(prepare_device, [SHAPES[k] for k in shape_keys],
                                [str(model_dirs[k]) for k in shape_keys], args.device)
    prepare_s = time.perf_counter() - t
    bandwidth = prepared["copy_bandwidth_bytes_per_s"]
    print(f"{prepared['device']}: copy bandwidth {bandwidth / 1e9:,.1f} GB/s; checkpoints ready in {prepare_s:.1f} s",
          flush=True)

    settings = {"prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens, "batch": args.batch,
                "big_batch": args.big_batch, "resident": args.resident, "device": args.device}
    result = (load_previous(args.out, settings, prepared["device"])
              or {"benchmark": "serve_gpu", "settings": settings, "shapes": {}})
    result.update({"device": prepared["device"], "copy_bandwidth_bytes_per_s": bandwidth, "torch": prepared["torch"],
                   "python": platform.python_version(), "targets": TARGETS, "summary_definitions": SUMMARY_DEFINITIONS,
                   "wave_definitions": WAVE_DEFINITIONS, "feature_definitions": features.FEATURE_DEFINITIONS,
                   "greedy": True, "ignore_eos": True, "server_flags": "defaults (only --model, --port, --grpc-port 0, "
                   "--adapter-dir, and --device cpu on a CPU); `unmerged` adds --merge-policy off"})

    def save():
        for rec in result["shapes"].values():
            rec["summary"] = summarize(rec, args.batch, args.resident)
            rec["summary_met"] = {k: met(rec["summary"].get(k), target) for k, target in TARGETS.items()}
            rec["features"] = features.summarize_features(rec, args.batch)
        present = [k for k in ("8b", "1b", "tiny") if k in result["shapes"]]
        if present:
            result["summary_shape"] = present[0]
            result["summary"] = {k: result["shapes"][present[0]]["summary"].get(k) for k in TARGETS}
            result["summary_features"] = result["shapes"][present[0]]["features"]
        args.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.out.with_name(args.out.name + ".tmp")
        tmp.write_text(json.dumps(result, indent=2))
        os.replace(tmp, args.out)

    failed = []
    for key in shape_keys:
        shape = SHAPES[key]
        record = result["shapes"].setdefault(key, {})
        record.update({"model": shape.name, "config": asdict(shape), "kv_bytes_per_token": kv_bytes_per_token(shape),
                       "base_bytes_per_step_nf4": base_bytes_per_step(shape, "nf4")})
        record.setdefault("phase_seconds", {})["prepare_checkpoint"] = prepared["checkpoint_seconds"].get(shape.name)
        session = ShapeSession(args, key, shape, model_dirs[key], record, save, bandwidth)
        print(f"\n{shape.name} ({key}): {', '.join(cases)}", flush=True)
        server_cases = [c for c in cases if c in SERVER_CASES]
        if server_cases:
            failed += [f"{key}:{c}" for c in with_server(args, session, server_cases)]
        if "unmerged" in cases and (key != "8b" or explicit_unmerged):
            failed += [f"{key}:{c}" for c in with_server(args, session, ["unmerged"], extra=("--merge-policy", "off"))]
        if "forcemerged" in cases:
            for fmt in ("bf16", "nf4"):
                session.merge_format = fmt
                failed += [f"{key}:forcemerged_{fmt}" for c in with_server(
                    args, session, ["forcemerged"],
                    extra=("--merge-policy", distinct_specs(1)[0].id, "--merge-format", fmt))]
        if "fidelity" in cases and (key != "8b" or "fidelity" in (args.cases or "")):
            failed += offline_case(record, key, "fidelity", lambda: in_fresh_process(
                fast_path_fidelity, str(model_dirs[key]), args.device), describe_fidelity)
        if "peft" in cases:
            dirs = lambda: [str(write_adapter(s, shape, session.pool, session.adapter_root))  # noqa: E731
                            for s in distinct_specs(args.batch)]
            failed += offline_case(record, key, "peft", lambda: in_fresh_process(
                hf_peft_baseline, str(model_dirs[key]), dirs(), args.device, args.prompt_tokens,
                args.peft_new_tokens, shape.vocab),
                lambda r: f"HF PEFT: base {r['base']['tokens_per_s']:.1f} tok/s, {args.batch} distinct adapters "
                          f"{r['mixed']['tokens_per_s']:.1f} tok/s")
        save()
    save()
    print_table(result)
    print(f"wrote {args.out}")
    figures.draw_after_run(args.out)
    if failed:
        sys.exit(f"serve_gpu: failed cases {', '.join(failed)} (their errors are in the JSON under shapes.*.errors)")


if __name__ == "__main__":
    main()
