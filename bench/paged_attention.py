"""How fast is the paged attention kernel against today's gather + masked SDPA? (GPU)

Cases (bf16 cache, block size 16, block tables shuffled), on the head shapes of Llama-3.1-8B
(32 heads, 8 KV, head_dim 128) and Llama-3.2-1B (32 / 8 / 64), all timed as CUDA-graph replays
(median), which also checks that the kernel captures:
  decode    B sequences of one query at context C (B 32, 64; C 256, 2048)
  prefill   one 2048-token prompt (causal, begin 0)
  mixed     31 decode sequences at 2048 + one 512-token chunk at begin 1536, one call vs two
            (decode rows and the chunk launched separately)
Columns: kernel (default split-K choice), best split count of 1/2/4/8 and its time, gather = the
runtime's path today (gather each padded context from the cache, masked SDPA with enable_gqa),
floor = K/V bytes read once / device-to-device copy bandwidth, tflops = attention FLOPs / kernel
time, err = max abs error of the kernel against an fp32 gather reference (values are O(1)).

usage: python bench/paged_attention.py [--out bench/results/paged_attention.json]
       python bench/paged_attention.py --smoke   (CPU: one tiny case through the Triton interpreter)
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

if "--smoke" in sys.argv:
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported

import torch
import torch.nn.functional as F
import triton

from loraplex.kernels.paged_attention import paged_attention

from kernel_timing import copy_bandwidth, graph_us  # bench/, beside this file
import figures  # noqa: E402 - bench/, beside this file: a PNG beside the JSON

MODELS = {"llama-3.1-8b": (32, 8, 128), "llama-3.2-1b": (32, 8, 64)}  # heads, kv heads, head_dim
BLOCK_SIZE = 16
SPLITS = (1, 2, 4, 8)


class Batch:
    """Packed queries and a paged cache holding `seqs` [(context, queries)] in shuffled blocks."""

    def __init__(self, seqs, heads, kv_heads, head_dim, device, dtype=torch.bfloat16, seed=0):
        gen = torch.Generator(device=device).manual_seed(seed)
        self.seqs, self.heads, self.kv_heads, self.head_dim = seqs, heads, kv_heads, head_dim
        blocks = [triton.cdiv(ctx, BLOCK_SIZE) for ctx, _ in seqs]
        num_blocks = sum(blocks) + 1
        order = torch.randperm(num_blocks, device=device, generator=gen).int()
        self.block_tables = torch.zeros(len(seqs), max(blocks), dtype=torch.int32, device=device)
        used = 0
        for b, n in enumerate(blocks):
            self.block_tables[b, :n] = order[used:used + n]
            used += n
        shape = (num_blocks * BLOCK_SIZE, kv_heads, head_dim)
        self.k_cache = torch.randn(shape, device=device, generator=gen).to(dtype)
        self.v_cache = torch.randn(shape, device=device, generator=gen).to(dtype)
        counts = torch.tensor([n for _, n in seqs])
        self.query_start = torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)]).int().to(device)
        self.context_lens = torch.tensor([ctx for ctx, _ in seqs], dtype=torch.int32, device=device)
        self.q = torch.randn(int(counts.sum()), heads, head_dim, device=device, generator=gen).to(dtype)
        self.out = torch.empty_like(self.q)
        self.max_query_len = int(counts.max())
        self.scale = head_dim ** -0.5
        self._gather_setup()

    def slots(self, b: int) -> torch.Tensor:
        pos = torch.arange(self.seqs[b][0], device=self.q.device)
        return self.block_tables[b, pos // BLOCK_SIZE].long() * BLOCK_SIZE + pos % BLOCK_SIZE

    def _gather_setup(self):
        """The runtime's step metadata today: padded decode context slots + mask, per-chunk slots."""
        starts = self.query_start.tolist()
        decode = [b for b, (_, n) in enumerate(self.seqs) if n == 1]
        self.decode_rows = torch.tensor([starts[b] for b in decode], device=self.q.device)
        self.decode_slots = (torch.nn.utils.rnn.pad_sequence([self.slots(b) for b in decode], batch_first=True)
                             if decode else torch.zeros(0, 0, dtype=torch.long, device=self.q.device))
        lengths = torch.tensor([self.seqs[b][0] for b in decode], device=self.q.device)
        width = self.decode_slots.shape[1] if decode else 0
        self.decode_mask = (torch.arange(width, device=self.q.device)[None] < lengths[:, None]).view(len(decode), 1, 1, width)
        self.chunks = []
        for b, (ctx, n) in enumerate(self.seqs):
            if n > 1:
                mask = None
                if ctx > n:
                    q_pos = torch.arange(ctx - n, ctx, device=self.q.device)
                    mask = torch.arange(ctx, device=self.q.device)[None] <= q_pos[:, None]
                self.chunks.append((starts[b], n, self.slots(b), mask))

    def gather_sdpa(self, dtype=None) -> torch.Tensor:
        """Today's Attention.forward after the cache write (dtype: compute in it, for a reference)."""
        dtype = dtype or self.q.dtype
        q, out = self.q.to(dtype), torch.empty(self.q.shape, dtype=dtype, device=self.q.device)
        gqa = self.kv_heads != self.heads
        if len(self.decode_rows):
            kd = self.k_cache[self.decode_slots].transpose(1, 2).to(dtype)
            vd = self.v_cache[self.decode_slots].transpose(1, 2).to(dtype)
            od = F.scaled_dot_product_attention(q[self.decode_rows].unsqueeze(2), kd, vd, attn_mask=self.decode_mask,
                                                scale=self.scale, enable_gqa=gqa)
            out[self.decode_rows] = od.squeeze(2)
        for start, n, slots, mask in self.chunks:
            qp = q[start:start + n].transpose(0, 1).unsqueeze(0)
            kp = self.k_cache[slots].transpose(0, 1).unsqueeze(0).to(dtype)
            vp = self.v_cache[slots].transpose(0, 1).unsqueeze(0).to(dtype)
            op = F.scaled_dot_product_attention(qp, kp, vp, attn_mask=mask, is_causal=mask is None, scale=self.scale,
                                                enable_gqa=gqa)
            out[start:start + n] = op.squeeze(0).transpose(0, 1)
        return out

    def kernel(self, num_splits=None) -> torch.Tensor:
        return paged_attention(self.q, self.k_cache, self.v_cache, self.block_tables, self.context_lens,
                               self.query_start, BLOCK_SIZE, self.scale, max_query_len=self.max_query_len,
                               out=self.out, num_splits=num_splits)

    def kv_bytes(self) -> int:
        return sum(ctx for ctx, _ in self.seqs) * self.kv_heads * self.head_dim * 2 * self.k_cache.element_size()

    def flops(self) -> int:
        keys = sum(n * (ctx - n) + n * (n + 1) // 2 for ctx, n in self.seqs)  # causal (query, key) pairs
        return 4 * keys * self.heads * self.head_dim


def split_batch(batch: Batch) -> tuple[Batch, Batch]:
    """The same work as two batches: decode rows and the rest (same random data per part, not shared)."""
    decode = [(ctx, n) for ctx, n in batch.seqs if n == 1]
    rest = [(ctx, n) for ctx, n in batch.seqs if n != 1]
    dev = batch.q.device
    return (Batch(decode, batch.heads, batch.kv_heads, batch.head_dim, dev, seed=1),
            Batch(rest, batch.heads, batch.kv_heads, batch.head_dim, dev, seed=2))


def max_error(batch: Batch) -> float:
    ref = batch.gather_sdpa(torch.float32)
    return (batch.kernel().float() - ref).abs().max().item()


def cases():
    for model in MODELS:
        for b in (32, 64):
            for ctx in (256, 2048):
                yield model, f"decode B{b} ctx{ctx}", [(ctx, 1)] * b
        yield model, "prefill 2048", [(2048, 2048)]
        yield model, "mixed 31x2048 + 512@1536", [(2048, 1)] * 31 + [(2048, 512)]


def measure(model, name, seqs, bandwidth) -> dict:
    heads, kv_heads, head_dim = MODELS[model]
    batch = Batch(seqs, heads, kv_heads, head_dim, "cuda")
    row = {"model": model, "case": name, "err": max_error(batch)}
    row["kernel_us"] = graph_us(batch.kernel)
    if batch.max_query_len == 1:
        split_us = {s: graph_us(lambda s=s: batch.kernel(num_splits=s)) for s in SPLITS}
        best = min(split_us, key=split_us.get)
        row.update(best_split=best, best_split_us=split_us[best], split_us=split_us)
    if name.startswith("mixed"):
        decode, rest = split_batch(batch)
        row["two_calls_us"] = graph_us(lambda: (decode.kernel(), rest.kernel()))
    row["gather_us"] = graph_us(batch.gather_sdpa)
    row["speedup"] = row["gather_us"] / row["kernel_us"]
    row["floor_us"] = batch.kv_bytes() / bandwidth * 1e6
    row["kernel_over_floor"] = row["kernel_us"] / row["floor_us"]
    row["tflops"] = batch.flops() / (row["kernel_us"] * 1e-6) / 1e12
    del batch
    torch.cuda.empty_cache()
    return row


def table(rows: list[dict], columns: list[str]) -> str:
    fmt = lambda v: f"{v:.3g}" if isinstance(v, float) else str(v)
    lines = [" | ".join(columns), " | ".join("---" for _ in columns)]
    lines += [" | ".join(fmt(r.get(c, "")) for c in columns) for r in rows]
    return "\n".join(lines)


def smoke() -> None:
    """CPU, interpreter: the bench's batches and gather path agree with the kernel on a tiny case."""
    for seqs in ([(17, 1), (40, 1), (3, 1)], [(40, 24), (33, 1)], [(40, 40)]):  # decode, mixed, prefill only
        batch = Batch(seqs, 4, 2, 64, "cpu", dtype=torch.float32)
        err = max_error(batch)
        print(f"smoke {seqs}: max error {err:.2e}, floor bytes {batch.kv_bytes()}, flops {batch.flops()}")
        assert err < 1e-4


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "paged_attention.json"))
    parser.add_argument("--smoke", action="store_true", help="CPU only: a tiny correctness run, no timing")
    args = parser.parse_args()
    if args.smoke:
        return smoke()
    if not torch.cuda.is_available():
        sys.exit("bench/paged_attention.py needs a CUDA GPU (or --smoke)")
    began = time.time()
    bandwidth = copy_bandwidth()
    device = torch.cuda.get_device_name()
    print(f"{device}: copy bandwidth {bandwidth / 1e12:.2f} TB/s (read + write)", flush=True)
    result = {"device": device, "torch": torch.__version__, "triton": triton.__version__,
              "copy_bandwidth_TBps": bandwidth / 1e12, "block_size": BLOCK_SIZE, "rows": []}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    for model, name, seqs in cases():
        try:
            row = measure(model, name, seqs, bandwidth)
        except Exception as e:  # keep the other cases' numbers
            row = {"model": model, "case": name, "error": repr(e)[:500]}
        result["rows"].append(row)
        print(" ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()), flush=True)
        result["seconds"] = time.time() - began
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    print(table(result["rows"], ["model", "case", "kernel_us", "best_split", "best_split_us", "two_calls_us",
                                 "gather_us", "speedup", "floor_us", "kernel_over_floor", "tflops", "err"]))
    print(f"wrote {args.out} in {result['seconds']:.0f} s")
    figures.draw_after_run(args.out)


if __name__ == "__main__":
    main()
