"""How the engine sizes what it puts on the accelerator: KV cache tokens first, then the adapter pool in
bytes from what is left; which adapter-ops implementation serves the adapters (`make_ops`); and how pinned
host memory (the adapters' packed copies) is obtained."""
from __future__ import annotations

import logging
import os

import torch

from .adapters.ops import AdapterOps, TorchAdapterOps
from .base_model import BaseModel
from .model_runner import kv_bytes_per_token

DEFAULT_ADAPTER_SLOTS = 1024  # slot indices (module-table rows) when no count cap is given
CPU_MAX_NUM_SEQS = 64
MAX_AUTO_NUM_SEQS = 256  # CUDA: the largest default running batch (vLLM's default too)
MIN_AUTO_NUM_SEQS = 16
KV_TOKENS_PER_SEQ = 1024  # CUDA: the KV room per running sequence that the default batch leaves
DEFAULT_ADAPTER_SHARE = 0.5  # of the accelerator memory free after weights and KV
CPU_ADAPTER_MEMORY = 4 << 30
PINNED_REGISTER_THREADS = 8

log = logging.getLogger(__name__)


def use_registered_pinned_memory() -> bool:
    """Pinned host memory from malloc + cudaHostRegister, its pages touched by PINNED_REGISTER_THREADS threads,
    instead of one cudaHostAlloc per block (PyTorch's allocator options, its PR 108488: cudaHostAlloc maps and
    locks a whole block, rounded up to a power of two, on one thread under a global lock). Every uploaded
    adapter is packed into fresh pinned memory before its first load, so that allocation sits on the hot-load
    path. Left alone when PYTORCH_CUDA_ALLOC_CONF already chooses a pinned-memory option; False when not set."""
    if not torch.cuda.is_available() or "pinned" in os.environ.get("PYTORCH_CUDA_ALLOC_CONF", ""):
        return False
    settings = f"pinned_use_cuda_host_register:True,pinned_num_register_threads:{PINNED_REGISTER_THREADS}"
    try:  # (PyTorch >= 2.9 names it so; before, torch.cuda.memory._set_allocator_settings)
        (getattr(torch._C, "_accelerator_setAllocatorSettings", None) or torch.cuda.memory._set_allocator_settings)(settings)
    except Exception as e:  # noqa: BLE001 - a PyTorch without these options: its default stays, the server starts
        log.warning("pinned host memory stays cudaHostAlloc's: %s", e)
        return False
    return True


def make_ops(kind: str, base: BaseModel, num_slots: int, pool_bytes: int | None = None) -> AdapterOps:
    if kind == "auto":
        kind = "triton" if base.device.type == "cuda" else "torch"
    args = (num_slots, base.projection_shapes, base.num_layers, base.device, base.dtype)
    if kind == "torch":
        return TorchAdapterOps(*args, base_weight=base.projection_weight)
    if kind == "triton":
        from loraplex.kernels.ops import TritonAdapterOps
        if base.device.type == "cuda":
            use_registered_pinned_memory()
        return TritonAdapterOps(*args, pool_bytes=pool_bytes, base_weight=base.projection_weight)
    raise ValueError(f"unknown adapter ops {kind!r}: auto, torch or triton")


def adapter_memory_bytes(base: BaseModel, requested: float | None) -> int:
    """Adapter memory in bytes: `requested` bytes (> 1) or fraction of what is free now (after
    weights and KV); default half of that on CUDA, 4 GiB of host memory on the CPU."""
    if requested is not None and requested > 1:
        return int(requested)
    if base.device.type != "cuda":
        return CPU_ADAPTER_MEMORY if requested is None else int(requested * CPU_ADAPTER_MEMORY)
    free, _ = torch.cuda.mem_get_info(base.device)
    return int(free * (DEFAULT_ADAPTER_SHARE if requested is None else requested))


def kv_cache_tokens(base: BaseModel, requested: int | None) -> int:
    """KV cache size in tokens: `requested`, else half of the accelerator memory free now (at least 4096), or
    32k tokens on the CPU."""
    if requested:
        return requested
    if base.device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(base.device)
        return max(int(free * 0.5) // kv_bytes_per_token(base), 4096)
    return 32768


def default_max_num_seqs(base: BaseModel, kv_tokens: int) -> int:
    """The running batch when --max-num-seqs is not given: 64 on the CPU; on CUDA as many sequences as
    the KV cache holds at KV_TOKENS_PER_SEQ each, a multiple of 8 between 16 and 256 (the engine then
    lowers it if a decode step of that many rows is slower than its step-time target)."""
    if base.device.type != "cuda":
        return CPU_MAX_NUM_SEQS
    fits = kv_tokens // KV_TOKENS_PER_SEQ // 8 * 8
    return max(MIN_AUTO_NUM_SEQS, min(MAX_AUTO_NUM_SEQS, fits))

