"""On a CUDA GPU: the fast path (CUDA-graph decode, paged attention, fused NF4, Triton adapter kernels,
merged rows) equals the eager PyTorch reference on the same GPU and weights — logits within bf16
tolerance and the same greedy tokens, on the default model, with a mixed batch of adapters.
Skipped without CUDA (CI has none); bench/gpu_run.sh runs it on the device."""
from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _adapters(base):
    from loraplex.runtime.adapters.registry import AdapterRef
    from test_engine import random_adapter
    shapes, n = base.projection_shapes, base.num_layers
    scaled = lambda w: (w.modules.update({k: type(m)(m.k, m.A * 0.1, m.B * 0.1, m.scale, m.general_A, m.general_B)
                                           for k, m in w.modules.items()}), w)[1]
    made = [random_adapter(shapes, n, rank=16, seed=1), random_adapter(shapes, n, k=4, rank=16, seed=2),
            random_adapter(shapes, n, rank=8, seed=3, projections=("q_proj", "v_proj")),
            random_adapter(shapes, n, k=2, rank=8, hybrid=4, seed=4)]
    return [AdapterRef(f"a{i}", 1, scaled(w)) for i, w in enumerate(made)]


def _run(base, requests, fast: bool, merge_policy: str):
    import loraplex.runtime.engine as engine_module
    from loraplex.runtime.engine import Engine, EngineConfig
    from loraplex.runtime import nf4_linear
    if not fast:  # the reference: bitsandbytes' own matmul for every row count
        saved = dict(nf4_linear.DISPATCH)
        for m in base.model.modules():
            if isinstance(m, nf4_linear.NF4Linear):
                nf4_linear.DISPATCH[(m.out_features, m.in_features)] = frozenset()
    config = EngineConfig(kv_cache_tokens=8192, cuda_graphs=fast, adapter_ops="triton" if fast else "torch",
                          merge_policy=merge_policy if fast else "off")
    engine = Engine(base, config)
    engine.runner.paged = fast
    engine.merger.patience, engine.merger.min_rows = 1, 1
    steps = []
    real_sample = engine_module.sample
    engine_module.sample = lambda logits, seqs: steps.append(logits.float().cpu()) or real_sample(logits, seqs)
    try:
        engine.generate(requests)  # first pass: merged weights get built; graphs captured
        engine.merger.wait()
        steps.clear()
        outs = engine.generate(requests)
    finally:
        engine_module.sample = real_sample
        if not fast:
            nf4_linear.DISPATCH.clear()
            nf4_linear.DISPATCH.update(saved)
    return [[t for o in out for t in o.token_ids] for out in outs], steps, engine


def test_fast_path_equals_eager_reference():
    from loraplex.runtime.base_model import load_base_model
    from loraplex.runtime.sequence import SamplingParams
    base = load_base_model(None, quantization="nf4", device="cuda")
    refs = _adapters(base)
    tok = base.tokenizer
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    prompts = ["The capital of France is", "Write a haiku about the sea.", "1, 2, 3,", "Translate: bonjour",
               "def fibonacci(n):", "Once upon a time", "The quick brown fox", "Q: What is 7*8? A:"]
    owners = [refs[0], refs[0], refs[1], None, refs[2], refs[3], refs[0], None]
    requests = [(tok(p)["input_ids"], params, r) for p, r in zip(prompts, owners)]
    ref_tokens, ref_steps, _ = _run(base, requests, fast=False, merge_policy="off")
    fast_tokens, fast_steps, engine = _run(base, requests, fast=True, merge_policy="a0")
    assert engine.runner.graph_steps > 0 and engine.merger.merged_steps > 0
    agree = sum(a == b for a, b in zip(fast_tokens, ref_tokens))
    assert agree >= len(requests) - 1, f"greedy tokens differ in {len(requests) - agree} of {len(requests)} requests"
    for a, b in zip(fast_steps[:4], ref_steps[:4]):  # before any token could diverge
        rel = (a - b).norm() / b.norm()
        assert rel < 2e-2, f"logits differ by {rel:.3e} (relative)"
