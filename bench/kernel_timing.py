"""What bench/lora_kernels.py compares against and times with: the gather + bmm PyTorch reference and
CUDA-event / CUDA-graph timing helpers (GPU only)."""
from __future__ import annotations

import statistics

import torch

from loraplex.runtime.adapters.peft_format import AdapterWeights
from loraplex.runtime.adapters.segments import build_segments

DEVICE = "cuda"


# -- the gather + bmm reference -------------------------------------------------------------
class GatherBmm:
    """Per segment: gather its tokens (padded to the longest segment) and its slot's weights, bmm."""

    def __init__(self, shapes, adapters: list[AdapterWeights], slots: list[int]):
        self.shapes = shapes
        self.stacks = {p: (torch.stack([a.modules[(0, p)].A for a in adapters]),
                           torch.stack([a.modules[(0, p)].B for a in adapters]),
                           torch.tensor([a.modules[(0, p)].scale for a in adapters], device=DEVICE))
                       for p in shapes}
        seg = build_segments(slots, DEVICE)
        num_tokens, longest = len(slots), seg.max_length
        index = torch.full((len(seg.host), longest), num_tokens, dtype=torch.int64)
        for i, (start, length, _) in enumerate(seg.host):
            index[i, :length] = seg.token_order[start:start + length].cpu()
        self.gather_index = index.to(DEVICE)  # padding points at an extra zero row of x
        self.add_index = torch.where(self.gather_index == num_tokens, 0, self.gather_index).flatten()
        self.seg_slots = seg.slots.long()

    def apply(self, projections, x, y):
        x_ext = torch.cat([x, x.new_zeros(1, x.shape[1])])
        xs = x_ext[self.gather_index]  # [S, L, in]
        S, L, fin = xs.shape
        col = 0
        for proj in projections:
            A_all, B_all, scales = self.stacks[proj]
            A, B = A_all[self.seg_slots], B_all[self.seg_slots]  # [S, k, in/k, r], [S, k, r, out/k]
            k, r = A.shape[1], A.shape[3]
            h = xs.view(S, L, k, fin // k).transpose(1, 2) @ A  # [S, k(n), L, r]
            if k > 1:  # piece j of block n feeds output block j
                h = h.view(S, k, L, k, r // k).permute(0, 3, 2, 1, 4).reshape(S, k, L, r)
            out = (h @ B).transpose(1, 2).reshape(S, L, -1) * scales[self.seg_slots].view(S, 1, 1).to(h.dtype)
            width = out.shape[-1]
            y.narrow(1, col, width).index_add_(0, self.add_index, out.reshape(S * L, width))
            col += width


# -- timing ---------------------------------------------------------------------------------
def graph_of(fn) -> torch.cuda.CUDAGraph:
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()  # warm-up (and Triton compilation) outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph


def median_us(run, target_us=300.0, batches=15) -> float:
    """Median time of one `run()`, from batches of back-to-back runs timed with CUDA events."""
    run()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record(); run(); end.record(); end.synchronize()
    inner = max(1, min(200, int(target_us / max(start.elapsed_time(end) * 1e3, 1.0))))
    times = []
    for _ in range(batches):
        start.record()
        for _ in range(inner):
            run()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / inner)
    return statistics.median(times)


def graph_us(fn) -> float:
    graph = graph_of(fn)
    t = median_us(graph.replay)
    del graph
    return t


def copy_bandwidth() -> float:
    """Bytes read + written per second of a large device-to-device copy."""
    src = torch.empty(1 << 30, dtype=torch.uint8, device=DEVICE).random_()
    dst = torch.empty_like(src)
    t = median_us(lambda: dst.copy_(src), target_us=5000, batches=7)
    del src, dst
    return 2 * (1 << 30) / (t * 1e-6)
