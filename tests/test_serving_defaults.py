"""Defaults the engine sizes itself: the running batch from the KV cache (CUDA), the CUDA-graph batch sizes,
and nothing of the start-up warm-up on the CPU."""
from __future__ import annotations

from types import SimpleNamespace

import torch

from loraplex.runtime.memory_budget import (CPU_MAX_NUM_SEQS, KV_TOKENS_PER_SEQ, MAX_AUTO_NUM_SEQS,
                                            MIN_AUTO_NUM_SEQS, default_max_num_seqs)
from loraplex.runtime.model_runner import graph_buckets
from loraplex.runtime.warm_up import warm_up, warm_up_adapter


def test_default_batch_is_sized_from_the_kv_cache_on_cuda():
    cuda, cpu = SimpleNamespace(device=torch.device("cuda")), SimpleNamespace(device=torch.device("cpu"))
    assert default_max_num_seqs(cpu, 10 ** 7) == CPU_MAX_NUM_SEQS == 64
    assert default_max_num_seqs(cuda, 500_000) == MAX_AUTO_NUM_SEQS == 256  # H200, 8B shape: 508k tokens
    assert default_max_num_seqs(cuda, 100 * KV_TOKENS_PER_SEQ) == 96
    assert default_max_num_seqs(cuda, 4096) == MIN_AUTO_NUM_SEQS


def test_graph_buckets_cover_every_batch_size_up_to_the_largest():
    for largest in (1, 2, 8, 9, 24, 64, 100, 256):
        buckets = graph_buckets(largest)
        assert buckets == sorted(set(buckets)) and buckets[-1] == largest
        assert all(any(b >= rows for b in buckets) for rows in range(1, largest + 1))
    assert graph_buckets(64) == [1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64]  # as before for the old default
    assert len(graph_buckets(256)) == 19  # every 16 rows up to 128, every 32 beyond


def test_warm_up_is_a_no_op_on_the_cpu(tiny_model_dir):
    from loraplex.runtime.base_model import load_base_model
    from loraplex.runtime.engine import Engine, EngineConfig
    base = load_base_model(str(tiny_model_dir), dtype="float32", device="cpu")
    engine = Engine(base, EngineConfig(kv_cache_tokens=1024))
    assert warm_up(engine) == 0.0 and engine.steps == 0
    adapter = warm_up_adapter(base)
    assert adapter.rank == 16 and len(adapter.modules) == base.num_layers * len(base.projection_shapes)
