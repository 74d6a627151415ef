"""Adapters at scale (issue #20), device part: `python bench/adapter_scale.py --gpu` runs this.

    python bench/adapter_scale.py --gpu [--shape 8b] [--repeats 5] [--skip-trace] [--out OUT.json]
    python bench/adapter_scale.py --gpu --shape tiny --device cpu --repeats 2 --trace-adapters 4,8 --requests 8 \\
        --prompt-len 8,48 --output-len 2,6                                                      # CPU smoke

One `loraplex serve` (default flags: NF4 base on a GPU, + `--adapter-source DIR`) on serve_gpu_models.py's
random-weight checkpoint of the Llama-3.1-8B shape (--shape: 1b or tiny for quicker runs), driven over HTTP on
loopback:

  upload      --repeats times, a new id each: a rank-16 LoRA on all seven projections saved in fp32, as PEFT's
              save_pretrained writes it (168 MB on 8B), sent as the CPU part's multipart POST /v1/adapters by a
              synchronous httpx client reading the weights from a file object, like loraplex's own client
              (post_adapter says why); upload_mb_s_gpu_host = weights MB / p50 of the seconds to the 201.
  hot-load    right after each upload's 201, a streamed 1-token completion (max_tokens 1, --prompt-tokens token
              ids) naming the new adapter: hotload_after_upload_ms_p50 = 201 -> first token event, p50.
  source      --repeats folders DIR/src-<i>/ (the same kind of adapter, fp32), none requested before: a streamed
              1-token completion naming one, send -> first token event; source_first_token_ms_p50 = p50.
  trace       serve_trace.py's trace (--requests 400 all at once, prompt --prompt-len 64-1,024 tokens, output
              --output-len 32-256, Zipf(--zipf 1.0) adapter popularity, --base-share 10% on base), run by its
              Session, twice on the same server: over 64 adapters, then over 1,000 (--trace-adapters);
              trace_1000_over_64 = output tok/s over 1,000 / over 64 (null unless both runs are free of errors).

The trace's adapters, for both runs alike: rank-16 LoRA on q_proj and v_proj, bf16 safetensors folders in DIR
(13.6 MB each on 8B: 14.5 GB for the 1,064 folders). The issue's PEFT-default kind (all seven projections, fp32)
would take 168 GB for 1,000, and bf16 84 GB: neither fits the device's 64 GiB disk beside the 16 GB checkpoint;
uploading 1,000 adapters over HTTP would also outlast the run. Each adapter is distinct (its own random
weights); the two sets share no id, so each run loads every adapter it uses on its first request, from DIR.
The two traces share prompt lengths, outputs and which requests are on base (all from --seed); the adapter
picks follow Zipf over each set, and the prompts' token ids are salted by the adapter count, so the second
run gets no prefix-cache hit from the first.

Checkpoint and folders are cached under --work/<shape>/ (serve_gpu.py's cache: `gpu_run.sh clean8b` removes
it). Before the server starts, `host_floors_mb_s` (host_floors.py): the loopback TCP, sha256 and O_DIRECT write
+ fsync rates of an upload's bytes on this host, the ceiling of upload_mb_s_gpu_host. The JSON is rewritten after
every part, so a run cut short keeps what it measured; `summary` holds the four keys (null when not measured), beside the raw lists, the trace runs, `settings` and `device`.
"""
from __future__ import annotations

import asyncio
import io
import json
import math
import os
import platform
import re
import statistics
import sys
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
from safetensors.torch import save as save_safetensors

from loraplex.client.http import upload_form

import figures  # bench/, beside this file: a PNG beside the JSON
from host_floors import host_floors
from py_spy import recording
from serve_gpu import Server
from serve_gpu_device import in_fresh_process, prepare_device, prompt_ids
from serve_gpu_models import QV, SHAPES, AdapterSpec, ModelShape, RandomPool, adapter_tensors, write_adapter
from serve_gpu_report import met, ratio
from serve_trace import Session, add_trace_arguments, brief, make_trace, pair, schedule

TARGETS = {"upload_mb_s_gpu_host": ">= 1000", "hotload_after_upload_ms_p50": "<= 60",
           "source_first_token_ms_p50": "<= 400", "trace_1000_over_64": ">= 0.9"}  # issue #20


def add_arguments(ap) -> None:
    g = ap.add_argument_group("the device part (--gpu; bench/adapter_scale_gpu.py)")
    g.add_argument("--shape", choices=list(SHAPES), default="8b", help="the random-weight checkpoint's shape")
    g.add_argument("--device", choices=["cuda", "cpu"], default="cuda", help="cpu: a smoke run (--shape tiny)")
    g.add_argument("--work", type=Path, default=Path("/tmp/serve_gpu"),
                   help="checkpoints and adapter folders (serve_gpu.py's cache)")
    g.add_argument("--prompt-tokens", type=int, default=16, help="prompt of the 1-token requests (token ids)")
    g.add_argument("--trace-adapters", type=pair, default=(64, 1000), help="FEW,MANY: the trace's two adapter counts")
    g.add_argument("--skip-trace", action="store_true", help="upload, hot-load and source only")
    g.add_argument("--server-args", default="", help="extra `loraplex serve` flags (the product is the defaults)")
    g.add_argument("--server-timeout", type=float, default=900, help="seconds to wait for /health")
    g.add_argument("--py-spy", type=Path, default=None, metavar="DIR",
                   help="py-spy the server during the uploads and each trace: DIR/uploads.txt, DIR/trace_<N>.txt")
    add_trace_arguments(g)


# -- the adapters each part uses ---------------------------------------------------------------------------
def upload_spec(i: int) -> AdapterSpec:
    return AdapterSpec(f"up-{i}", 16, seed=700_000 + i)  # all seven projections


def source_spec(i: int) -> AdapterSpec:
    return AdapterSpec(f"src-{i}", 16, seed=710_000 + i)


def trace_specs(count: int) -> list[AdapterSpec]:
    """`count` distinct rank-16 q/v adapters; another count gives another set (no id or seed in common)."""
    return [AdapterSpec(f"z{count}-{i}", 16, targets=QV, seed=count * 1_000_000 + i) for i in range(count)]


def fp32_payload(spec: AdapterSpec, shape: ModelShape, pool: RandomPool) -> tuple[bytes, bytes]:
    """(adapter_config.json, adapter_model.safetensors) with fp32 tensors, as PEFT's save_pretrained writes them."""
    tensors = {k: v.float() for k, v in adapter_tensors(spec, shape, pool).items()}
    return json.dumps(spec.config()).encode(), save_safetensors(tensors)


def write_fp32_adapter(spec: AdapterSpec, shape: ModelShape, pool: RandomPool, root: Path) -> Path:
    """write_adapter's folder with fp32 weights (cached: written once)."""
    return write_adapter(spec, shape, pool, root, payload=fp32_payload)


def write_source(root: Path, shape: ModelShape, pool: RandomPool, fp32: list[AdapterSpec],
                 bf16: list[AdapterSpec]) -> None:
    """The --adapter-source folders, a few at a time (the tensor work and the writes release the GIL)."""
    root.mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(min(16, os.cpu_count() or 1)) as ex:
        jobs = [ex.submit(write_fp32_adapter, s, shape, pool, root) for s in fp32]
        jobs += [ex.submit(write_adapter, s, shape, pool, root) for s in bf16]
        for job in jobs:
            job.result()


# -- the measurements --------------------------------------------------------------------------------------
def post_adapter(client: httpx.Client, adapter_id: str, config: bytes, weights: bytes) -> None:
    """The CPU part's form, as loraplex's own client sends an adapter's folder (runtime/client/http.py
    upload_form: the weights read as they go out, in 1 MiB pieces; httpx's own file parts go in 64 KiB ones,
    and handed one 168 MB bytes object httpcore re-slices the rest of it after every socket write)."""
    headers, body = upload_form(adapter_id, config, io.BytesIO(weights), len(weights))
    r = client.post("/v1/adapters", headers=headers, content=body)
    if r.status_code != 201:
        raise RuntimeError(f"upload of {adapter_id}: HTTP {r.status_code}: {r.text[:300]}")


def first_token_at(client: httpx.Client, model: str, prompt: list[int]) -> float:
    """Streams a 1-token completion naming `model`; perf_counter() at its first token event."""
    body = {"model": model, "prompt": prompt, "max_tokens": 1, "temperature": 0, "ignore_eos": True, "stream": True}
    first = None
    with client.stream("POST", "/v1/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"completion with {model}: HTTP {r.status_code}: {r.read()[:300]!r}")
        for line in r.iter_lines():
            if line.startswith("data: {"):
                data = json.loads(line[6:])
                if "error" in data:
                    raise RuntimeError(f"completion with {model}: {str(data['error'])[:300]}")
                if first is None and data.get("choices"):
                    first = time.perf_counter()
    if first is None:
        raise RuntimeError(f"completion with {model}: no token event")
    return first


def measure_uploads(client: httpx.Client, shape: ModelShape, pool: RandomPool, args, result: dict, save) -> None:
    """Each repeat: a new fp32 adapter uploaded (timed to its 201), then its first token (timed from the 201)."""
    for i in range(args.repeats):
        spec = upload_spec(i)
        config, weights = fp32_payload(spec, shape, pool)
        prompt = prompt_ids(1, args.prompt_tokens, shape.vocab, salt=1000 + i)[0]
        start = time.perf_counter()
        post_adapter(client, spec.id, config, weights)
        answered = time.perf_counter()
        first = first_token_at(client, spec.id, prompt)
        result["upload_mb"] = len(weights) / 1e6
        result["upload_s"].append(answered - start)
        result["hotload_after_upload_s"].append(first - answered)
        print(f"  upload {len(weights) / 1e6:.1f} MB in {1e3 * (answered - start):.1f} ms "
              f"({len(weights) / 1e6 / (answered - start):,.0f} MB/s); first token {1e3 * (first - answered):.1f} ms "
              "after the 201", flush=True)
        save()


def measure_source(client: httpx.Client, shape: ModelShape, args, result: dict, save) -> None:
    for i in range(args.repeats):
        prompt = prompt_ids(1, args.prompt_tokens, shape.vocab, salt=2000 + i)[0]
        start = time.perf_counter()
        first = first_token_at(client, source_spec(i).id, prompt)
        result["source_first_token_s"].append(first - start)
        print(f"  source folder {source_spec(i).id}: first token {1e3 * (first - start):.1f} ms", flush=True)
        save()


def trace_summary(trace: list) -> dict:
    models = [m for _, _, m in trace]
    return {"requests": len(trace), "prompt_tokens": sum(len(p) for p, _, _ in trace),
            "output_tokens": sum(o for _, o, _ in trace), "base_requests": models.count("base"),
            "distinct_adapters": len(set(models) - {"base"})}


async def trace_runs(server: Server, shape: ModelShape, args, result: dict, save) -> None:
    """The trace over each adapter count in turn, all at once, on one Session (serve_trace.py's client)."""
    session = Session(server.url)
    try:
        for count in args.trace_adapters:
            trace = make_trace(args, shape, [s.id for s in trace_specs(count)], prompt_salt=args.seed + count)
            with recording(server.proc.pid, args.py_spy and args.py_spy / f"trace_{count}.txt"):
                run = await session.run(schedule(trace, math.inf, len(trace), False, args))
            run["trace"] = trace_summary(trace)
            result["trace"][str(count)] = run
            used = run["trace"]["distinct_adapters"]
            print(f"  trace over {count:>5} adapters ({used} used): {brief(run)}", flush=True)
            save()
    finally:
        await session.client.aclose()


# -- the server's own timings -------------------------------------------------------------------------------
# (since 2026-12-07 the files sync beside the validation: "validated" then counts from the last byte received)
UPLOAD_LINE = re.compile(r"upload (\S+): ([\d.]+) MB received in (\d+) ms, then synced in (\d+) ms"
                         r"(?: beside its validation)?, validated and committed in (\d+) ms")
PACK_LINE = re.compile(r"packed an adapter of (\d+) modules: ([\d.]+) MB of \S+ \S+ host memory in (\d+) ms "
                       r"\(allocation (\d+) ms\)")


def server_timings(log_text: str) -> dict:
    """Each upload's phases and each pack's time (its pinned allocation apart), from the server's log lines
    (runtime/service.py and kernels/ops.py write them), with their medians: where an upload's and a hot-load's
    milliseconds go."""
    uploads = [{"id": m[1], "mb": float(m[2]), "received_ms": int(m[3]), "synced_ms": int(m[4]),
                "validated_ms": int(m[5])} for m in UPLOAD_LINE.finditer(log_text)]
    packs = [{"modules": int(m[1]), "mb": float(m[2]), "ms": int(m[3]), "allocation_ms": int(m[4])}
             for m in PACK_LINE.finditer(log_text)]

    def median(rows, key):
        return statistics.median(r[key] for r in rows) if rows else None
    return {"uploads": uploads, "packs": packs,
            "p50_ms": {"upload_received": median(uploads, "received_ms"), "upload_synced": median(uploads, "synced_ms"),
                       "upload_validated": median(uploads, "validated_ms"), "pack": median(packs, "ms"),
                       "pack_allocation": median(packs, "allocation_ms")}}


# -- summary and run ---------------------------------------------------------------------------------------
def summarize(result: dict) -> dict:
    def p50_ms(values):
        return round(1000 * statistics.median(values), 1) if values else None

    uploads = result.get("upload_s") or []
    few, many = (result.get("trace", {}).get(str(n)) for n in result["settings"]["trace_adapters"])
    clean = all(run is not None and run["errors"] == 0 and run["short_outputs"] == 0 for run in (few, many))
    trace_ratio = ratio(many["output_tok_s"], few["output_tok_s"]) if clean else None
    return {"upload_mb_s_gpu_host": round(result["upload_mb"] / statistics.median(uploads), 1) if uploads else None,
            "hotload_after_upload_ms_p50": p50_ms(result.get("hotload_after_upload_s")),
            "source_first_token_ms_p50": p50_ms(result.get("source_first_token_s")),
            "trace_1000_over_64": round(trace_ratio, 3) if trace_ratio is not None else None}


def settings(args, shape: ModelShape) -> dict:
    few, many = args.trace_adapters
    return {
        "shape": args.shape, "device": args.device, "repeats": args.repeats, "prompt_tokens": args.prompt_tokens,
        "upload_adapter": "LoRA r16 (alpha 16), all seven projections, fp32 safetensors as PEFT saves it, random "
                          "weights; a new id per upload, synchronous httpx multipart POST /v1/adapters, the weights "
                          "from a file object (io.BytesIO, read in 64 KB pieces)",
        "upload_adapter_mb": 2 * upload_spec(0).bytes_bf16(shape) / 1e6,
        "source_adapter": "the upload's kind (r16, all projections, fp32), a folder DIR/src-<i>/ per repeat",
        "trace_adapters": [few, many],
        "trace_adapter": "LoRA r16 (alpha 16) on q_proj and v_proj, bf16 safetensors, a folder DIR/z<count>-<i>/ "
                         "each, distinct random weights, the same kind in both runs (fp32 all-projection adapters "
                         "would need 168 GB of disk for 1,000)",
        "trace_adapter_mb": trace_specs(1)[0].bytes_bf16(shape) / 1e6,
        "trace": {"requests": args.requests, "arrivals": "all at once", "prompt_len": list(args.prompt_len),
                  "output_len": list(args.output_len), "zipf": args.zipf, "base_share": args.base_share,
                  "seed": args.seed, "prompt_salt": "seed + adapter count", "greedy": True, "ignore_eos": True},
        "skip_trace": args.skip_trace,
        "server_flags": "defaults (--model, --port, --grpc-port 0, --adapter-dir, --device cpu on a CPU) + "
                        "--adapter-source DIR" + (f" + {args.server_args}" if args.server_args else ""),
    }


def print_summary(result: dict) -> None:
    print(f"\nadapter_scale --gpu: {result.get('device')}, {result['model']}")
    for key, value in result["summary"].items():
        verdict = {True: "met", False: "NOT met", None: ""}[result["summary_met"][key]]
        print(f"  {key:<30} {'-' if value is None else value:>10}   target {TARGETS[key]:<9} {verdict}")


def main(args, host_cpu: str) -> None:
    shape = SHAPES[args.shape]
    if len(set(args.trace_adapters)) != 2:
        sys.exit("--trace-adapters: two different counts, FEW,MANY")
    work = args.work / args.shape
    model_dir, source = work / "model", work / "scale_source"
    out = args.out or Path(__file__).parent / "results" / "adapter_scale_gpu.json"
    result = {"benchmark": "adapter_scale", "mode": "gpu", "model": shape.name, "host_cpu": host_cpu,
              "python": platform.python_version(), "load_average_1min_before": round(os.getloadavg()[0], 2),
              "settings": settings(args, shape), "targets": TARGETS, "summary": {}, "summary_met": {},
              "upload_mb": None, "upload_s": [], "hotload_after_upload_s": [], "source_first_token_s": [],
              "trace": {}, "phase_seconds": {}, "errors": {}}

    def save():
        result["summary"] = summarize(result)
        result["summary_met"] = {k: met(v, TARGETS[k]) for k, v in result["summary"].items()}
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_text(json.dumps(result, indent=2) + "\n")
        os.replace(tmp, out)

    def part(name: str, run) -> None:
        t = time.perf_counter()
        try:
            run()
        except Exception as e:
            traceback.print_exc()
            result["errors"][name] = f"{type(e).__name__}: {e}"
        finally:
            result["phase_seconds"][name] = round(time.perf_counter() - t, 2)
            save()

    t = time.perf_counter()
    prepared = in_fresh_process(prepare_device, [shape], [str(model_dir)], args.device)
    result.update(device=prepared["device"], torch=prepared["torch"])
    result["phase_seconds"]["checkpoint"] = round(time.perf_counter() - t, 2)
    t = time.perf_counter()
    pool = RandomPool()
    counts = [] if args.skip_trace else args.trace_adapters
    write_source(source, shape, pool, [source_spec(i) for i in range(args.repeats)],
                 [s for n in counts for s in trace_specs(n)])
    result["phase_seconds"]["adapter_folders"] = round(time.perf_counter() - t, 2)
    save()
    print(f"{prepared['device']}: {shape.name} checkpoint and {len(os.listdir(source))} adapter folders ready "
          f"({result['phase_seconds']['checkpoint']:.0f} s + {result['phase_seconds']['adapter_folders']:.0f} s)",
          flush=True)

    _, weights = fp32_payload(upload_spec(0), shape, pool)
    result["host_floors_mb_s"] = host_floors(weights, args.work)
    print(f"host floors for an upload of {len(weights) / 1e6:.0f} MB, MB/s: {result['host_floors_mb_s']}", flush=True)
    extra = ("--adapter-source", str(source), *args.server_args.split())
    server = Server(model_dir, args.work, args.device, None, extra)
    try:
        result["phase_seconds"]["server_start"] = round(server.start(args.server_timeout), 2)
        print(f"server healthy after {result['phase_seconds']['server_start']:.1f} s", flush=True)
        # a connection per request, as serve_trace's Session: none is reused just as the server closes it as idle
        with httpx.Client(base_url=server.url, timeout=600, trust_env=False,
                          limits=httpx.Limits(max_keepalive_connections=0)) as client:
            with recording(server.proc.pid, args.py_spy and args.py_spy / "uploads.txt"):
                part("upload_hotload", lambda: measure_uploads(client, shape, pool, args, result, save))
            part("source", lambda: measure_source(client, shape, args, result, save))
        if not args.skip_trace:
            part("trace", lambda: asyncio.run(trace_runs(server, shape, args, result, save)))
    except Exception as e:
        traceback.print_exc()
        result["errors"]["server"] = f"{type(e).__name__}: {e}"
    finally:
        server.stop()
        result["server_log"] = str(server.log_path)
        try:
            result["server_timings"] = server_timings(Path(server.log_path).read_text(errors="replace"))
            print(f"server timings, p50 ms: {result['server_timings']['p50_ms']}", flush=True)
        except OSError as e:
            result["server_timings"] = {"error": str(e)}
        save()
    if result["errors"]:
        print(f"--- server log tail ({server.log_path}) ---\n{server.log_tail()}\n---", file=sys.stderr, flush=True)
    print_summary(result)
    print(f"wrote {out}")
    figures.draw_after_run(out)
    if result["errors"]:
        sys.exit(f"adapter_scale --gpu: failed parts {', '.join(result['errors'])} (errors in the JSON)")
