"""Load and churn on a real server: many streaming clients over many adapters while adapters change.

    python bench/load.py [--clients 200] [--adapters 32] [--rounds 3] [--url http://127.0.0.1:8000 --pid PID]
                         [--out bench/results/load.json]

Without --url it starts `loraplex serve` on the default model (fp32, loopback, a fresh adapter store).
Each round: every client opens one streaming greedy completion at once, on adapter i % K; a fraction
(--disconnect) closes its stream after the first chunk; meanwhile a loop replaces adapters (new random
weights, a new version) and deletes and re-uploads them. After the rounds, every completed response is
compared with the single-request greedy reference of the adapter version it was admitted with: that
version's weights, uploaded again under a fresh id and run alone. A request is admitted at the version
current when the server resolved it, some time between sending it and the response headers, so the
candidates are the versions live in that window; a response matching none is a mismatch.
Also checked: zero 5xx, /health back to 0 running, 0 waiting, 0 KV blocks after each round, and the
server's RSS (VmRSS) after each round. Prints a table and writes JSON.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import torch
from safetensors.torch import save as save_safetensors

sys.path.insert(0, str(Path(__file__).parent))
from serve_gpu import Server  # noqa: E402  (a sibling benchmark script: same server handling)
import figures  # noqa: E402 - bench/, beside this file: a PNG beside the JSON

def idle(health: dict) -> bool:
    """Nothing running or waiting, and nothing it held still held: KV blocks and adapter pins."""
    return (health["running"], health["waiting"], health["kv_blocks_used"], health["pinned_adapters"]) == (0, 0, 0, 0)


PROMPTS = ["The capital of France is", "Once upon a time", "List three colours:", "def fibonacci(n):"]
TARGETS = ("q_proj", "o_proj")  # hidden x hidden on Llama-family models: shapes from /health alone


@dataclass
class Version:
    adapter_id: str
    version: int
    config: bytes
    weights: bytes
    live_from: float  # upload sent
    live_until: float = float("inf")  # replace or delete answered


@dataclass
class Result:
    adapter_id: str
    prompt: str
    sent: float
    headers_at: float | None = None
    status: int | None = None
    text: str = ""
    finished: bool = False
    disconnected: bool = False
    latency: float | None = None
    ttft: float | None = None
    error: str | None = None
    candidates: list[int] = field(default_factory=list)
    deleted: bool = False  # 404: the adapter was deleted while this request was sent


def adapter_payload(hidden: int, layers: int, rank: int, seed: int) -> tuple[bytes, bytes]:
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(layers):
        for proj in TARGETS:
            key = f"base_model.model.model.layers.{layer}.self_attn.{proj}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(rank, hidden, generator=g) * 0.05
            tensors[f"{key}.lora_B.weight"] = torch.randn(hidden, rank, generator=g) * 0.05
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": list(TARGETS),
              "lora_dropout": 0.0, "bias": "none", "task_type": "CAUSAL_LM"}
    return json.dumps(config).encode(), save_safetensors(tensors)


class Load:
    def __init__(self, args, client: httpx.AsyncClient, health: dict):
        self.args = args
        self.client = client
        self.hidden = health["model"]["hidden_size"]
        self.layers = health["model"]["num_layers"]
        self.versions: dict[str, list[Version]] = {}
        self.gaps: dict[str, list[list[float]]] = {}  # [delete sent, re-upload answered]: the id may be absent
        self.seed = 0

    async def upload(self, adapter_id: str, payload: tuple[bytes, bytes] | None = None) -> Version:
        if payload is None:
            self.seed += 1
            payload = adapter_payload(self.hidden, self.layers, self.args.rank, self.seed)
        sent = time.monotonic()
        files = {"config": ("adapter_config.json", payload[0], "application/json"),
                 "weights": ("adapter_model.safetensors", payload[1], "application/octet-stream")}
        r = await self.client.post("/v1/adapters", data={"id": adapter_id}, files=files)
        if r.status_code != 201:
            raise RuntimeError(f"upload {adapter_id}: HTTP {r.status_code}: {r.text[:300]}")
        version = Version(adapter_id, r.json()["version"], *payload, live_from=sent)
        history = self.versions.setdefault(adapter_id, [])
        if history and history[-1].live_until == float("inf"):
            history[-1].live_until = time.monotonic()  # replaced
        history.append(version)
        gaps = self.gaps.get(adapter_id)
        if gaps and gaps[-1][1] == float("inf"):
            gaps[-1][1] = time.monotonic()
        return version

    async def delete(self, adapter_id: str) -> None:
        self.gaps.setdefault(adapter_id, []).append([time.monotonic(), float("inf")])
        r = await self.client.delete(f"/v1/adapters/{adapter_id}")
        if r.status_code != 200:
            raise RuntimeError(f"delete {adapter_id}: HTTP {r.status_code}: {r.text[:300]}")
        self.versions[adapter_id][-1].live_until = time.monotonic()

    def maybe_absent(self, adapter_id: str, start: float, end: float) -> bool:
        return any(a <= end and b >= start for a, b in self.gaps.get(adapter_id, []))

    def live_versions(self, adapter_id: str, start: float, end: float) -> list[int]:
        return [v.version for v in self.versions.get(adapter_id, []) if v.live_from <= end and v.live_until >= start]

    def body(self, model: str, prompt: str, stream: bool) -> dict:
        return {"model": model, "prompt": prompt, "max_tokens": self.args.max_tokens, "temperature": 0,
                "ignore_eos": True, "stream": stream}

    async def stream(self, result: Result, disconnect: bool) -> None:
        try:
            async with self.client.stream("POST", "/v1/completions",
                                          json=self.body(result.adapter_id, result.prompt, True)) as r:
                result.headers_at = time.monotonic()
                result.status = r.status_code
                if r.status_code != 200:
                    result.error = (await r.aread()).decode(errors="replace")[:300]
                    return
                async for line in r.aiter_lines():
                    if not line.startswith("data: "):
                        continue
                    data = line[len("data: "):]
                    if data == "[DONE]":
                        result.finished = True
                        break
                    event = json.loads(data)
                    if "error" in event:
                        result.error = json.dumps(event["error"])[:300]
                        break
                    if result.ttft is None:
                        result.ttft = time.monotonic() - result.sent
                    result.text += event["choices"][0]["text"]
                    if disconnect:
                        result.disconnected = True
                        break  # leaving the context closes the connection mid-stream
        except httpx.HTTPError as e:
            result.error = f"{type(e).__name__}: {e}"
        finally:
            result.latency = time.monotonic() - result.sent

    async def churn(self, ids: list[str], stop: asyncio.Event) -> dict:
        """Replace and delete adapters until `stop`: replace, replace, delete + re-upload, in turn."""
        counts = {"replaced": 0, "deleted": 0}
        turn = 0
        while not stop.is_set() and turn < self.args.max_churn:
            adapter_id = ids[turn % len(ids)]
            if turn % 3 == 2:
                await self.delete(adapter_id)
                counts["deleted"] += 1
                await asyncio.sleep(self.args.churn_interval)
            await self.upload(adapter_id)
            counts["replaced"] += 1
            turn += 1
            try:
                await asyncio.wait_for(stop.wait(), self.args.churn_interval)
            except asyncio.TimeoutError:
                pass
        return counts

    async def round(self, ids: list[str], number: int) -> tuple[list[Result], dict]:
        rng = random.Random(number)
        disconnecting = set(rng.sample(range(self.args.clients), int(self.args.clients * self.args.disconnect)))
        results = [Result(ids[i % len(ids)], PROMPTS[i % len(PROMPTS)], 0.0) for i in range(self.args.clients)]
        stop = asyncio.Event()
        churn = asyncio.create_task(self.churn(ids, stop))

        async def client(i: int):
            results[i].sent = time.monotonic()
            await self.stream(results[i], i in disconnecting)

        await asyncio.wait_for(asyncio.gather(*(client(i) for i in range(self.args.clients))), self.args.round_timeout)
        stop.set()
        counts = await churn
        for r in results:
            r.candidates = self.live_versions(r.adapter_id, r.sent, r.headers_at or r.sent)
            if r.status == 404 and self.maybe_absent(r.adapter_id, r.sent, r.headers_at or r.sent):
                r.error, r.deleted = None, True  # sent while its adapter was deleted: the right answer
        return results, counts

    async def idle_health(self) -> dict:
        """/health once running, waiting and KV blocks are back to 0, or after --idle-timeout."""
        deadline = time.monotonic() + self.args.idle_timeout
        while True:
            health = (await self.client.get("/health")).json()
            if idle(health) \
                    or time.monotonic() > deadline:
                return health
            await asyncio.sleep(0.2)

    async def references(self, needed: set[tuple[str, int, str]]) -> dict[tuple[str, int, str], str]:
        """Greedy text of each (adapter, version, prompt), one request at a time, alone on the server."""
        refs = {}
        by_version = {(v.adapter_id, v.version): v for history in self.versions.values() for v in history}
        for n, (adapter_id, version) in enumerate(sorted({(a, v) for a, v, _ in needed})):
            v = by_version[(adapter_id, version)]
            ref_id = f"ref-{n}"
            await self.upload(ref_id, (v.config, v.weights))
            for a, ver, prompt in sorted(needed):
                if (a, ver) == (adapter_id, version):
                    r = await self.client.post("/v1/completions", json=self.body(ref_id, prompt, False))
                    r.raise_for_status()
                    refs[(a, ver, prompt)] = r.json()["choices"][0]["text"]
            await self.delete(ref_id)
        return refs


def rss_bytes(pid: int | None) -> int | None:
    if pid is None:
        return None
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return None


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


async def bench(args, url: str, pid: int | None) -> dict:
    limits = httpx.Limits(max_connections=args.clients + 8, max_keepalive_connections=args.clients + 8)
    async with httpx.AsyncClient(base_url=url, timeout=args.round_timeout, limits=limits, trust_env=False) as client:
        load = Load(args, client, (await client.get("/health")).json())
        ids = [f"load-{i}" for i in range(args.adapters)]
        for adapter_id in ids:
            await load.upload(adapter_id)
        rounds, all_results = [], []
        for number in range(args.rounds):
            t = time.monotonic()
            results, churn = await load.round(ids, number)
            health = await load.idle_health()
            statuses: dict[str, int] = {}
            for r in results:
                statuses[str(r.status)] = statuses.get(str(r.status), 0) + 1
            completed = [r for r in results if r.finished]
            rounds.append({
                "seconds": time.monotonic() - t, "clients": len(results), "completed": len(completed),
                "disconnected": sum(r.disconnected for r in results), "statuses": statuses,
                "not_found_while_deleted": sum(r.deleted for r in results),
                "errors": [r.error for r in results if r.error][:20],
                "error_count": sum(1 for r in results if r.error),
                "server_errors": sum(1 for r in results if (r.status or 0) >= 500 or (r.error and "server_error" in r.error)),
                "latency_p50_s": percentile([r.latency for r in completed], 0.5),
                "latency_p99_s": percentile([r.latency for r in completed], 0.99),
                "ttft_p50_s": percentile([r.ttft for r in completed if r.ttft is not None], 0.5),
                "ttft_p99_s": percentile([r.ttft for r in completed if r.ttft is not None], 0.99),
                **churn, "health_after": {k: health.get(k) for k in ("running", "waiting", "kv_blocks_used",
                                                                    "pinned_adapters", "resident_adapters", "adapter_memory_bytes_used")},
                "leaked": not idle(health),
                "rss_bytes": rss_bytes(pid)})
            all_results += completed
            print(f"  round {number}: {len(completed)}/{len(results)} completed, {rounds[-1]['disconnected']} "
                  f"disconnected, statuses {statuses}, {rounds[-1]['seconds']:.1f} s", flush=True)
        needed = {(r.adapter_id, v, r.prompt) for r in all_results for v in r.candidates}
        refs = await load.references(needed)
    mismatches = []
    for r in all_results:
        if not any(refs[(r.adapter_id, v, r.prompt)] == r.text for v in r.candidates):
            mismatches.append({"adapter": r.adapter_id, "candidates": r.candidates, "prompt": r.prompt,
                               "text": r.text, "references": [refs[(r.adapter_id, v, r.prompt)] for v in r.candidates]})
    rss = [r["rss_bytes"] for r in rounds if r["rss_bytes"] is not None]
    latencies = [r.latency for r in all_results]
    return {"settings": {k: v for k, v in vars(args).items() if k != "out"}, "rounds": rounds,
            "summary": {"completed": len(all_results), "checked_against_reference": len(all_results),
                        "mismatches": len(mismatches), "mismatch_examples": mismatches[:10],
                        "ambiguous_version": sum(len(r.candidates) > 1 for r in all_results),
                        "server_errors": sum(r["server_errors"] for r in rounds),
                        "errors": sum(r["error_count"] for r in rounds),
                        "leaked_rounds": sum(r["leaked"] for r in rounds),
                        "latency_p50_s": percentile(latencies, 0.5), "latency_p99_s": percentile(latencies, 0.99),
                        "rss_bytes": rss,
                        "rss_growth": (rss[-1] - rss[0]) / rss[0] if len(rss) > 1 else None},
            "at": time.strftime("%Y-%m-%d %H:%M:%S")}


def print_table(record: dict) -> None:
    print(f"\n{'round':>5} {'clients':>7} {'done':>5} {'cut':>4} {'p50 s':>7} {'p99 s':>7} {'ttft p50':>8} "
          f"{'5xx':>4} {'errors':>6} {'leak':>5} {'RSS MB':>7}")
    for i, r in enumerate(record["rounds"]):
        rss = f"{r['rss_bytes'] / 2**20:.0f}" if r["rss_bytes"] else "-"
        fmt = lambda x: f"{x:.2f}" if x is not None else "-"  # noqa: E731
        print(f"{i:>5} {r['clients']:>7} {r['completed']:>5} {r['disconnected']:>4} {fmt(r['latency_p50_s']):>7} "
              f"{fmt(r['latency_p99_s']):>7} {fmt(r['ttft_p50_s']):>8} {r['server_errors']:>4} {r['error_count']:>6} "
              f"{str(r['leaked']):>5} {rss:>7}")
    s = record["summary"]
    print(f"\n{s['completed']} completed responses checked, {s['mismatches']} mismatches "
          f"({s['ambiguous_version']} with more than one candidate version), {s['server_errors']} server errors, "
          f"RSS growth {s['rss_growth']}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", default=None, help="a running server on the default model (else one is started)")
    ap.add_argument("--pid", type=int, default=None, help="that server's pid, for RSS")
    ap.add_argument("--clients", type=int, default=200)
    ap.add_argument("--adapters", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--rank", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--disconnect", type=float, default=0.1, help="fraction of clients leaving mid-stream")
    ap.add_argument("--churn-interval", type=float, default=0.5, help="seconds between adapter replacements")
    ap.add_argument("--max-churn", type=int, default=1000, help="replacements per round at most")
    ap.add_argument("--round-timeout", type=float, default=900)
    ap.add_argument("--idle-timeout", type=float, default=30, help="wait for /health to drain after a round")
    ap.add_argument("--server-args", default="--dtype float32", help="extra `loraplex serve` flags")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "load.json")
    args = ap.parse_args()

    server = None
    if args.url is None:
        from loraplex.runtime.base_model import default_model_dir
        work = Path(tempfile.gettempdir()) / "loraplex-load"
        work.mkdir(exist_ok=True)
        server = Server(default_model_dir(), work, "cpu" if not torch.cuda.is_available() else "cuda", None,
                        extra=("--max-num-seqs", str(max(64, args.clients)), *args.server_args.split()))
        server.log_path = work / f"server-{server.port}.log"  # beside its store, not in the model cache
        server.start(timeout=300)
    try:
        url = args.url or server.url
        record = asyncio.run(bench(args, url, args.pid if server is None else server.proc.pid))
    except BaseException:
        if server is not None:
            print(server.log_tail(), file=sys.stderr)
        raise
    finally:
        if server is not None:
            server.stop()
    print_table(record)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {args.out}")
    figures.draw_after_run(args.out)


if __name__ == "__main__":
    main()
