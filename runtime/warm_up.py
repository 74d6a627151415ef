"""Start-up warm-up (CUDA): run what serving will run before the server reports healthy, so that the
first request after start is as fast as any later one.

What a cold first request used to pay (bench/profile_step.py, 1B shape on an H200, first run ÷ second:
32 decode rows over distinct adapters 3.3 s ÷ 0.23 s, a 2,048-token prefill with an adapter 5.2 s ÷
0.04 s): Triton compiling the segmented adapter kernels for each tile configuration, the paged-attention
and layer kernels at new row counts, and the capture of each batch size's decode graph with adapters.

1. Prefills of 1, 2, 8, 16, 32 and `max_batched_tokens` tokens, on the base model and with a rank-16 LoRA
   on every projection: one per tile configuration of the segmented kernels (kernels/tile_config.py) and
   of the paged-attention prefill, and the NF4 and layer kernels at those row counts. (Kernels that take
   the step's sequence count or table width leave them unspecialised, so no step compiles anew.) With
   the adapter also one prefill per mixed-step token bucket: the mixed graphs of the rank-16 launch plan
   (the base-only ones are captured when the engine starts), each twice: with the adapter's delta folded
   into the prefill matmuls (kernels/lora_fold.py), as a step whose chunk has the adapter, and not, as a
   step whose adapters' rows are too few to fold.
2. A decode step at every CUDA-graph batch size with that adapter: the decode graph of the rank-16
   launch plan per batch size (the base-only graphs are captured when the engine starts). Adapters of
   other ranks or kinds share the compiled kernels; their graphs are captured at first use.
3. One prefill of `max_batched_tokens` tokens after everything is compiled seeds the measured prefill
   cost that sizes the chunked-prefill budget (prefill_budget.py).

Triton keeps compiled kernels in its cache directory (~/.triton/cache), so a later start compiles
nothing. Afterwards the warm-up adapter is evicted, nothing of it stays in the prefix cache, and the
engine's counters start from zero.
"""
from __future__ import annotations

import logging
import time

import torch

from .adapters.peft_format import AdapterWeights, ModuleDelta
from .adapters.registry import AdapterRef
from .sequence import SamplingParams

log = logging.getLogger("loraplex.warm_up")
WARM_UP_RANK = 16
# + max_batched_tokens: one per tile configuration of the segmented kernels (1, 2, <= 16, <= 32, longer) and of
# the paged-attention prefill (query rows x heads per KV head <= 16, 32, 64, more)
PREFILL_LENGTHS = (1, 2, 8, 16, 32)


def warm_up_adapter(base, rank: int = WARM_UP_RANK) -> AdapterWeights:
    """A rank-`rank` LoRA on every projection of every layer, small random factors (never served)."""
    g = torch.Generator().manual_seed(0)
    modules = {}
    for layer in range(base.num_layers):
        for proj, (fin, fout) in base.projection_shapes.items():
            modules[(layer, proj)] = ModuleDelta(1, torch.randn(1, fin, rank, generator=g) * fin ** -0.5,
                                                 torch.randn(1, rank, fout, generator=g) * 0.01, 1.0)
    return AdapterWeights("LORA", rank, {}, modules)


def warm_up(engine) -> float:
    """Run the warm-up on `engine` (before its loop thread starts); returns the seconds it took."""
    if engine.base.device.type != "cuda":
        return 0.0
    started = time.perf_counter()
    vocab = engine.base.config.vocab_size
    g = torch.Generator().manual_seed(1)
    once = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    twice = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)  # the prefill, then one decode step

    def prompt(n: int) -> list[int]:
        return torch.randint(0, vocab, (n,), generator=g).tolist()

    ref = AdapterRef("loraplex-warm-up", 0, warm_up_adapter(engine.base))
    caching, engine.blocks.prefix_caching = engine.blocks.prefix_caching, False
    longest = min(engine.config.max_batched_tokens, engine.max_model_len - 2)
    try:
        with torch.inference_mode():
            # the mixed-step graph of every token bucket with the adapter (the base ones are captured at start)
            buckets = tuple(b for b in engine.runner.mixed_buckets if b <= longest)
            for adapter in (None, ref):
                for n in sorted(set(PREFILL_LENGTHS + (longest,) + (buckets if adapter is not None else ()))):
                    engine.generate([(prompt(n), once, adapter)])
            folding = getattr(engine.ops, "fold_blocks", 0)
            if folding:  # the same buckets' graphs that fold nothing
                engine.ops.fold_blocks = 0
                try:
                    for n in buckets:
                        engine.generate([(prompt(n), once, ref)])
                finally:
                    engine.ops.fold_blocks = folding
            for bucket in engine.runner.buckets if engine.runner.use_graphs else ():
                engine.generate([(prompt(4), twice, ref) for _ in range(bucket)])
            engine.slots.drop(ref)
            engine.prefill_budget.forget()
            engine.generate([(prompt(longest), once, None)])  # seeds the prefill budget, compiled
    finally:
        engine.blocks.prefix_caching = caching
    engine.reset_counters()
    seconds = time.perf_counter() - started
    log.info("warm-up: kernels compiled and %d decode graphs captured in %.1f s; prefill budget %d tokens "
             "a step beside decode rows (%.1f us a token)", len(engine.runner.graphs), seconds,
             engine.scheduler.prefill_budget, 1e6 * (engine.prefill_budget.seconds_per_token or 0.0))
    return seconds
