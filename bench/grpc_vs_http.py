"""Per-request overhead of gRPC vs HTTP on one server: a 1-token completion (unary and streamed) and a
health check (no engine work: transport and framework only).

    python bench/grpc_vs_http.py [--requests 200] [--out bench/results/grpc_vs_http.json]
    python bench/grpc_vs_http.py --url http://127.0.0.1:8000 --grpc-target 127.0.0.1:50051  # a running server

Without --url it starts `loraplex serve` (default model) on free ports. Each transport uses one kept-alive
connection from this process (httpx / grpcio, the clients a Python backend would use); calls are
sequential and interleaved (HTTP, gRPC, HTTP, ...) so that drift hits both alike. Latencies are end to
end as the client sees them; the 1-token completion includes the same engine step on both transports.
"""
from __future__ import annotations

import argparse
import json
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import grpc
import httpx
from grpc_health.v1 import health_pb2, health_pb2_grpc

from loraplex.client.grpc import completion_request
from loraplex.protos.loraplex.v1 import serving_pb2_grpc as pb_grpc
import figures  # noqa: E402 - bench/, beside this file: a PNG beside the JSON

PROMPT = "The capital of France is"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(extra: list[str]) -> tuple[subprocess.Popen, str, str]:
    port, grpc_port = free_port(), free_port()
    exe = shutil.which("loraplex", path=str(Path(sys.executable).parent)) or "loraplex"
    store = Path(tempfile.mkdtemp(prefix="grpc-vs-http-")) / "adapters"
    proc = subprocess.Popen([exe, "serve", "--port", str(port), "--grpc-port", str(grpc_port), "--adapter-dir",
                             str(store), "--log-level", "warning", *extra])
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 300
    while time.time() < deadline:
        if proc.poll() is not None:
            sys.exit("the server exited")
        try:
            if httpx.get(f"{url}/health").status_code == 200:
                return proc, url, f"127.0.0.1:{grpc_port}"
        except httpx.TransportError:
            time.sleep(0.5)
    proc.terminate()
    sys.exit("the server did not become healthy")


def calls(http: httpx.Client, channel: grpc.Channel) -> dict[str, dict[str, Callable[[], None]]]:
    """Per benchmark row, one zero-argument call per transport; each checks its answer."""
    completions = pb_grpc.CompletionsStub(channel)
    health = health_pb2_grpc.HealthStub(channel)
    body = {"model": "base", "prompt": PROMPT, "max_tokens": 1, "temperature": 0}
    request = completion_request("base", PROMPT, max_tokens=1, temperature=0)

    def http_complete():
        assert http.post("/v1/completions", json=body).json()["usage"]["completion_tokens"] == 1

    def grpc_complete():
        assert completions.Complete(request).usage.completion_tokens == 1

    def http_stream():
        with http.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
            assert [line for line in r.iter_lines() if line][-1] == "data: [DONE]"

    def grpc_stream():
        assert len(list(completions.CompleteStream(request))) == 1

    def http_health():
        assert http.get("/health").json()["status"] == "ok"

    def grpc_health():
        assert health.Check(health_pb2.HealthCheckRequest()).status == health_pb2.HealthCheckResponse.SERVING

    return {"completion, 1 token": {"http": http_complete, "grpc": grpc_complete},
            "completion, 1 token, streamed": {"http": http_stream, "grpc": grpc_stream},
            "health check": {"http": http_health, "grpc": grpc_health}}


def summary(seconds: list[float]) -> dict:
    ms = sorted(s * 1000 for s in seconds)
    return {"p50_ms": statistics.median(ms), "mean_ms": statistics.fmean(ms), "p90_ms": ms[int(0.9 * (len(ms) - 1))],
            "min_ms": ms[0], "requests_per_s": 1000 / statistics.fmean(ms)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=200, help="timed calls per row and transport")
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--url", default=None, help="a running server's HTTP URL (default: start one)")
    ap.add_argument("--grpc-target", default="127.0.0.1:50051", help="with --url: its gRPC host:port")
    ap.add_argument("--serve-args", default="", help="extra `loraplex serve` arguments when starting one")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "grpc_vs_http.json")
    args = ap.parse_args()

    proc = None
    url, target = args.url, args.grpc_target
    if url is None:
        proc, url, target = start_server(args.serve_args.split())
    try:
        with httpx.Client(base_url=url, timeout=120) as http, grpc.insecure_channel(target) as channel:
            model = http.get("/health").json()["model"]["name"]
            rows = {}
            for name, by_transport in calls(http, channel).items():
                for call in by_transport.values():
                    for _ in range(args.warmup):
                        call()
                timings = {transport: [] for transport in by_transport}
                for _ in range(args.requests):
                    for transport, call in by_transport.items():
                        start = time.perf_counter()
                        call()
                        timings[transport].append(time.perf_counter() - start)
                rows[name] = {transport: summary(t) for transport, t in timings.items()}
                rows[name]["grpc_minus_http_p50_ms"] = rows[name]["grpc"]["p50_ms"] - rows[name]["http"]["p50_ms"]
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(30)

    print(f"\ngrpc_vs_http: {args.requests} sequential calls per row and transport, one connection each, "
          f"interleaved; server model {model}")
    print(f"{'call':<30} {'transport':<9} {'p50 ms':>8} {'mean ms':>8} {'p90 ms':>8} {'req/s':>8}")
    for name, row in rows.items():
        for transport in ("http", "grpc"):
            r = row[transport]
            print(f"{name:<30} {transport:<9} {r['p50_ms']:>8.2f} {r['mean_ms']:>8.2f} {r['p90_ms']:>8.2f} "
                  f"{r['requests_per_s']:>8.1f}")
        print(f"{'':<30} {'gRPC-HTTP':<9} {row['grpc_minus_http_p50_ms']:>+8.2f}  (p50)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "benchmark": "grpc_vs_http", "model": model, "requests": args.requests, "warmup": args.warmup,
        "prompt": PROMPT, "grpcio": grpc.__version__, "httpx": httpx.__version__, "python": platform.python_version(),
        "machine": platform.machine(), "results": rows}, indent=2))
    print(f"wrote {args.out}")
    figures.draw_after_run(args.out)


if __name__ == "__main__":
    main()
