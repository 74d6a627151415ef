"""Adapters at scale (issue #20), CPU part: upload speed, hot-load, on-demand (--adapter-source) first token,
server start with 10,000 stored adapters, and the first page of /v1/models over them.

    python bench/adapter_scale.py [--repeats 5] [--stored 10000] [--out bench/results/adapter_scale.json]

It starts `loraplex serve` (default model, CPU) twice on free ports: once on an empty store with an
--adapter-source, once on a store of `--stored` tiny adapters (written straight into the store's on-disk
layout, digests included, as committed uploads leave it). The upload is a rank-64 LoRA on all seven
projections of the default model (78 MB fp32, random weights), sent as a multipart POST /v1/adapters over
loopback by httpx, one at a time.

Summary keys (issue #20): upload_mb_s_cpu (p50 over the repeats), hotload_after_upload_ms_p50 (upload start
to the first streamed token of the new adapter), source_first_token_ms_p50 (a request naming a source
folder not loaded yet, to its first token), start_s_10k_over_0 (start with `--stored` adapters ÷ start on
an empty store; process start to /health ok), models_list_ms_10k (GET /v1/models?limit=100 p50).
upload_mb_s_gpu_host and trace_1000_over_64 need the device: not measured here (null).

The device part, `--gpu` (bench/adapter_scale_gpu.py says what it measures and how): upload MB/s, hot-load and
source first token of 8B-shape adapters on a GPU server, and the serve_trace.py trace over 1,000 adapters / 64.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch
from safetensors.torch import save as save_safetensors

from loraplex.runtime.adapters.digest import adapter_digest
from loraplex.client.http import upload_form
import adapter_scale_gpu  # noqa: E402 - bench/, beside this file: the --gpu part
import figures  # noqa: E402 - bench/, beside this file: a PNG beside the JSON

# the default model (SmolLM2-135M): 30 layers, hidden 576, 3 KV heads of 64, intermediate 1536
LAYERS, HIDDEN, KV, INTER = 30, 576, 192, 1536
SHAPES = {"q_proj": ("self_attn", HIDDEN, HIDDEN), "k_proj": ("self_attn", HIDDEN, KV),
          "v_proj": ("self_attn", HIDDEN, KV), "o_proj": ("self_attn", HIDDEN, HIDDEN),
          "gate_proj": ("mlp", HIDDEN, INTER), "up_proj": ("mlp", HIDDEN, INTER), "down_proj": ("mlp", INTER, HIDDEN)}
PROMPT = "The capital of France is"


def adapter_files(rank: int, projections, layers, seed: int) -> tuple[bytes, bytes]:
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in layers:
        for proj in projections:
            group, fan_in, fan_out = SHAPES[proj]
            prefix = f"base_model.model.model.layers.{layer}.{group}.{proj}"
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(rank, fan_in, generator=g) * 0.02
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(fan_out, rank, generator=g) * 0.002
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": list(projections),
              "task_type": "CAUSAL_LM"}
    if list(layers) != list(range(LAYERS)):
        config["layers_to_transform"] = list(layers)
    return json.dumps(config).encode(), save_safetensors(tensors)


def write_folder(folder: Path, config_raw: bytes, weights_raw: bytes) -> None:
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_bytes(config_raw)
    (folder / "adapter_model.safetensors").write_bytes(weights_raw)


def fill_store(root: Path, count: int) -> None:
    """`count` committed adapters in the store's layout (<id>/v1/files + CURRENT with the digest)."""
    config_raw, weights_raw = adapter_files(1, ["q_proj"], [0], seed=1)
    digest = adapter_digest(config_raw, weights_raw)
    for i in range(count):
        adapter_id = f"tiny-{i:05d}"
        write_folder(root / adapter_id / "v1", config_raw, weights_raw)
        record = {"id": adapter_id, "version": 1, "peft_type": "LORA", "rank": 1, "size_bytes": len(weights_raw),
                  "created": time.time(), "sha256": digest}
        (root / adapter_id / "CURRENT").write_text(json.dumps(record))


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()}, {os.cpu_count()} cores"
    except OSError:
        pass
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, store: Path, *extra: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        exe = shutil.which("loraplex", path=str(Path(sys.executable).parent)) or "loraplex"
        start = time.perf_counter()
        self.proc = subprocess.Popen([exe, "serve", "--port", str(self.port), "--grpc-port", "0", "--adapter-dir",
                                      str(store), "--log-level", "warning", *extra])
        self.client = httpx.Client(base_url=self.url, timeout=300)
        deadline = time.time() + 600
        while time.time() < deadline:
            if self.proc.poll() is not None:
                sys.exit("the server exited")
            try:
                if self.client.get("/health").status_code == 200:
                    self.start_s = time.perf_counter() - start
                    return
            except httpx.TransportError:
                time.sleep(0.1)
        self.stop()
        sys.exit("the server did not become healthy")

    def stop(self) -> None:
        self.client.close()
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()

    def upload(self, adapter_id: str, config_raw: bytes, weights_raw: bytes) -> None:
        # sent as loraplex's own client sends an adapter's folder (runtime/client/http.py: the weights read as
        # they go out, in 1 MiB pieces)
        headers, body = upload_form(adapter_id, config_raw, io.BytesIO(weights_raw), len(weights_raw))
        r = self.client.post("/v1/adapters", headers=headers, content=body)
        assert r.status_code == 201, r.text

    def first_token_s(self, model: str, start: float) -> float:
        body = {"model": model, "prompt": PROMPT, "max_tokens": 2, "temperature": 0, "stream": True}
        with self.client.stream("POST", "/v1/completions", json=body) as r:
            assert r.status_code == 200, r.read()
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    assert "error" not in json.loads(line[6:]), line
                    return time.perf_counter() - start
        raise AssertionError("no token")


def p50(values: list[float]) -> float:
    return statistics.median(values)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5, help="uploads, hot-loads and source folders (both parts)")
    parser.add_argument("--stored", type=int, default=10_000)
    parser.add_argument("--out", type=Path, default=None,
                        help="default: bench/results/adapter_scale.json (--gpu: adapter_scale_gpu.json)")
    parser.add_argument("--gpu", action="store_true", help="the device part instead of the CPU part")
    adapter_scale_gpu.add_arguments(parser)
    args = parser.parse_args()
    if args.gpu:
        adapter_scale_gpu.main(args, cpu_model())
        return
    args.out = args.out or Path(__file__).parent / "results" / "adapter_scale.json"
    load_before = os.getloadavg()[0]  # other work on the machine skews every number here: recorded with them
    work = Path(tempfile.mkdtemp(prefix="adapter-scale-"))
    try:
        config_raw, weights_raw = adapter_files(64, list(SHAPES), range(LAYERS), seed=0)
        mb = len(weights_raw) / 1e6
        source = work / "source"
        for i in range(args.repeats):
            write_folder(source / f"src-{i}", config_raw, weights_raw)
        fill_store(work / "store10k", args.stored)

        empty = Server(work / "store0", "--adapter-source", str(source))
        try:
            uploads, hotloads, source_first = [], [], []
            for i in range(args.repeats):
                start = time.perf_counter()
                empty.upload(f"up-{i}", config_raw, weights_raw)
                uploads.append(time.perf_counter() - start)
            for i in range(args.repeats):
                start = time.perf_counter()
                empty.upload(f"hot-{i}", config_raw, weights_raw)
                hotloads.append(empty.first_token_s(f"hot-{i}", start))
            for i in range(args.repeats):
                source_first.append(empty.first_token_s(f"src-{i}", time.perf_counter()))
            start_0 = empty.start_s
        finally:
            empty.stop()

        crowded = Server(work / "store10k")
        try:
            start_10k = crowded.start_s
            listing = []
            for _ in range(max(args.repeats, 20)):
                start = time.perf_counter()
                r = crowded.client.get("/v1/models", params={"limit": 100})
                listing.append(time.perf_counter() - start)
                assert r.status_code == 200 and len(r.json()["data"]) == 100 and r.json()["has_more"]
            listed = crowded.client.get("/v1/adapters", params={"limit": 1000}).json()
            assert listed["data"][0]["id"] == "tiny-00000"
        finally:
            crowded.stop()
    finally:
        shutil.rmtree(work, ignore_errors=True)

    summary = {
        "upload_mb_s_cpu": round(mb / p50(uploads), 1),
        "upload_mb_s_gpu_host": None,
        "hotload_after_upload_ms_p50": round(1000 * p50(hotloads), 1),
        "source_first_token_ms_p50": round(1000 * p50(source_first), 1),
        "start_s_10k_over_0": round(start_10k / start_0, 3),
        "models_list_ms_10k": round(1000 * p50(listing), 2),
        "trace_1000_over_64": None,
    }
    result = {
        "benchmark": "adapter_scale", "cpu_model": cpu_model(), "device": "cpu",
        "adapter_mb": round(mb, 1), "adapter": "rank-64 LoRA, all seven projections, default model, fp32",
        "load_average_1min": {"before": round(load_before, 2), "after": round(os.getloadavg()[0], 2)},
        "repeats": args.repeats, "stored": args.stored, "summary": summary,
        "upload_s": uploads, "hotload_after_upload_s": hotloads, "source_first_token_s": source_first,
        "start_s": {"empty": start_0, "stored": start_10k}, "models_list_s": listing,
        "not_measured": {"upload_mb_s_gpu_host": "needs --gpu on the device",
                         "trace_1000_over_64": "needs --gpu on the device"},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    figures.draw_after_run(args.out)


if __name__ == "__main__":
    main()
