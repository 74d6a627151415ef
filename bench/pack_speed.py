"""Where does a hot-load's pack go? (issue #20; GPU host, or the CPU for a smoke run)

    python bench/pack_speed.py [--shape 8b] [--repeats 5] [--out bench/results/pack_speed.json]

The pack (kernels/ops.py TritonAdapterOps.prepare) turns a parsed upload (fp32 views of the received safetensors
bytes, as the server holds them) into the pool layout in pinned host memory: most of a hot-load's time after the
201 (adapter_scale_gpu.json: pack 67-85 ms of 89-108 ms on 8B). Timed here, each on a fresh adapter:
  prepare      the server's path (serial/8 below; pinned memory from the spare block pinned in the background
               after the pack before, or allocated then: the first pack), GPU host only
  threads=N    a copy_ per piece (packed_layout.write_module) on N threads, into a buffer allocated beforehand (the
               server's path until 2026-12-06)
  foreach      one torch._foreach_copy_ over every piece (one call; PyTorch parallelises inside each copy)
  foreach/N    N threads, each one torch._foreach_copy_ over its share of the pieces (an OpenMP team per thread)
  serial/N     the same over the pieces cut into chunks PyTorch copies on the calling thread (no OpenMP: the server's
               path since 2026-12-06 evening, packed_layout.copy_shares)
  memcpy       a straight fp32 -> bf16 copy of as many elements (no layout, no per-piece work): the floor
Prints a table and writes JSON (ms per pack, p50 over --repeats).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from loraplex.kernels import packed_layout as layout
from loraplex.kernels.ops import TritonAdapterOps
from loraplex.runtime.adapters.peft_format import BaseShape, parse_adapter

import figures  # bench/, beside this file: a PNG beside the JSON
from adapter_scale_gpu import fp32_payload, upload_spec  # bench/, beside this file
from serve_gpu_models import SHAPES, RandomPool


def fresh_adapter(shape, pool: RandomPool, i: int):
    """A parsed upload: fp32 module views of the received bytes in fresh writable memory, as the server keeps them."""
    config, weights = fp32_payload(upload_spec(i), shape, pool)
    base = BaseShape(shape.layers, shape.projections())
    return parse_adapter(config, bytearray(weights), base, 1024, owned=True)


def pieces(adapter, data: torch.Tensor) -> tuple[list, list]:
    dst, src, offset = [], [], 0
    for m in adapter.modules.values():
        for _, piece in layout.pool_pieces(m):
            dst.append(data[offset:offset + piece.numel()].view(piece.shape))
            src.append(piece)
            offset += layout.aligned(piece.numel())
    return dst, src


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", default="8b", choices=sorted(SHAPES))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", default="1,2,4,8,16")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "pack_speed.json")
    args = parser.parse_args()
    shape, cuda = SHAPES[args.shape], torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    if cuda:
        from loraplex.runtime.memory_budget import use_registered_pinned_memory
        use_registered_pinned_memory()
    ops = TritonAdapterOps(4, shape.projections(), shape.layers, device, torch.bfloat16) if cuda else None
    pool = RandomPool()
    rows: dict[str, list[float]] = {}

    def timed(name: str, work, setup=lambda adapter, data: ()) -> None:
        for i in range(args.repeats):
            adapter = fresh_adapter(shape, pool, i)
            data = torch.empty(layout.aligned(layout.module_offsets(adapter.modules.values())[1]), dtype=torch.bfloat16, pin_memory=cuda)
            data.fill_(0)  # (pages in: only the copies are timed)
            extra = setup(adapter, data)
            t = time.perf_counter()
            work(adapter, data, *extra)
            rows.setdefault(name, []).append(1e3 * (time.perf_counter() - t))

    if ops is not None:
        for i in range(args.repeats):
            adapter = fresh_adapter(shape, pool, 100 + i)
            if ops.host_buffers.spare is not None:
                ops.host_buffers.spare.result()  # (pinned while the next upload arrives, in the server)
            t = time.perf_counter()
            ops.prepare(adapter)
            rows.setdefault("prepare", []).append(1e3 * (time.perf_counter() - t))
    offsets = lambda a, d: (layout.module_offsets(a.modules.values())[0],)
    for n in [int(x) for x in args.threads.split(",")]:
        with ThreadPoolExecutor(n) as workers:
            timed(f"threads={n}", lambda a, d, starts: list(workers.map(
                lambda m, o: layout.write_module(m, d, o), a.modules.values(), starts)), offsets)
    timed("foreach", lambda a, d, dst, src: torch._foreach_copy_(dst, src), pieces)
    for n in [int(x) for x in args.threads.split(",") if int(x) > 1]:
        with ThreadPoolExecutor(n) as workers:
            timed(f"foreach/{n}", lambda a, d, dst, src: list(workers.map(
                lambda share: torch._foreach_copy_(*share), layout.equal_shares(dst, src, n))), pieces)
            timed(f"serial/{n}", lambda a, d, dst, src: list(workers.map(
                lambda share: torch._foreach_copy_(*share), layout.copy_shares(dst, src, n))), pieces)
    timed("memcpy", lambda a, d, src: d[:src.numel()].copy_(src),
          lambda a, d: (torch.ones(sum(t.numel() for t in pieces(a, d)[1]), dtype=torch.float32),))
    result = {"benchmark": "pack_speed", "shape": shape.name, "device": torch.cuda.get_device_name() if cuda else "cpu",
              "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "repeats": args.repeats,
              "pinned": cuda, "ms_p50": {k: round(statistics.median(v), 1) for k, v in rows.items()}, "ms": rows}
    print(f"pack of a rank-16 all-projection {shape.name} adapter, {result['device']}, {os.cpu_count()} cores, ms p50")
    for name, ms in result["ms_p50"].items():
        print(f"  {name:<12} {ms:8.1f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")
    figures.draw_after_run(args.out)


if __name__ == "__main__":
    main()
