"""Merged-weights serving: rows of the merged adapter give the same tokens and logits as the
unmerged path, with other rows (other adapters, base) in the same batch, and auto switches on/off."""
from __future__ import annotations

import pytest
import torch

from loraplex.runtime.adapters.registry import AdapterRef
from loraplex.runtime.base_model import load_base_model
from loraplex.runtime.engine import Engine, EngineConfig
from loraplex.runtime.merged import merged_linear, module_bytes
from loraplex.runtime.model import AdaptedLinear
from loraplex.runtime.sequence import SamplingParams
from test_engine import random_adapter


@pytest.fixture(scope="module")
def tiny_base(tiny_model_dir):
    return load_base_model(str(tiny_model_dir), dtype="float32", device="cpu")


@pytest.fixture(scope="module")
def refs(tiny_base):
    shapes, n = tiny_base.projection_shapes, tiny_base.num_layers
    return [AdapterRef("dom", 1, random_adapter(shapes, n, rank=8, seed=11)),
            AdapterRef("gra", 1, random_adapter(shapes, n, k=2, rank=4, hybrid=2, seed=12)),
            AdapterRef("qv", 1, random_adapter(shapes, n, k=4, rank=8, seed=13, projections=("q_proj", "v_proj")))]


def run(base, requests, policy):
    engine = Engine(base, EngineConfig(kv_cache_tokens=2048, merge_policy=policy))
    engine.merger.patience, engine.merger.min_rows, engine.merger.dwell_seconds = 2, 1, 0.0
    outs = engine.generate(requests)
    engine.merger.wait()
    return [[t for o in out for t in o.token_ids] for out in outs], engine


def test_merged_delta_equals_module_delta(tiny_base, refs):
    lin = next(m for m in tiny_base.model.modules() if isinstance(m, AdaptedLinear))
    for ref in refs[1:]:  # GraLoRA with a hybrid part, GraLoRA k=4 on q/v only
        merged = merged_linear(lin, ref, tiny_base.projection_shapes, "bf16", torch.float32)
        x = torch.randn(5, lin.base.in_features)
        y = lin.base(x)
        from loraplex.runtime.adapters.ops import module_delta
        col = 0
        for proj in lin.projections:
            out = tiny_base.projection_shapes[proj][1]
            m = ref.weights.modules.get((lin.layer_idx, proj))
            if m is not None:
                y[:, col:col + out] += module_delta(x, m)
            col += out
        torch.testing.assert_close(merged(x), y, rtol=1e-4, atol=1e-4)


def test_named_policy_merges_its_rows_in_a_mixed_batch(tiny_base, refs):
    tok = tiny_base.tokenizer
    prompts = ["The capital of France is", "One two three", "Hello", "A B C D"]
    params = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
    requests = [(tok(p)["input_ids"], params, r) for p, r in zip(prompts, [refs[0], refs[1], None, refs[0]])]
    requests += [(tok("Merged rows")["input_ids"], params, refs[2])]
    # Generate once so the build finishes, then again with the merged weights installed from the start.
    unmerged, _ = run(tiny_base, requests, "off")
    _, engine = run(tiny_base, requests, "dom")
    outs = engine.generate(requests)
    merged = [[t for o in out for t in o.token_ids] for out in outs]
    assert engine.merger.active is not None and engine.merger.active.id == "dom"
    assert engine.merger.merged_steps > 0
    assert merged == unmerged
    # the merged copy covers every linear the adapter touches (all of them): fp32 weights and biases here
    copy_bytes = sum(lin.base.weight.numel() * 4 + (0 if lin.base.bias is None else lin.base.bias.numel() * 4)
                     for lin in engine.merger.linears)
    assert engine.stats()["merged_bytes"] == engine.merger.merged_bytes == copy_bytes


def test_merged_copy_bytes_bf16_and_nf4(tiny_base, refs):
    """The bytes of a merged copy as stored: bf16 weights, or NF4 with its double-quantised statistics."""
    lin = next(m for m in tiny_base.model.modules() if isinstance(m, AdaptedLinear))
    weights = lin.base.weight.numel()
    dense = merged_linear(lin, refs[0], tiny_base.projection_shapes, "bf16", torch.bfloat16)
    assert module_bytes(dense) == 2 * weights + (0 if dense.bias is None else 2 * dense.bias.numel())
    nf4 = merged_linear(lin, refs[0], tiny_base.projection_shapes, "nf4", torch.bfloat16)
    blocks = weights // 64  # 4 bits a weight, a uint8 absmax per 64, an fp32 one per 256 of those, two code tables
    assert module_bytes(nf4) == weights // 2 + blocks + 4 * -(-blocks // 256) + 4 * (16 + 256)


def test_auto_merges_a_batch_of_one_adapter_and_stops_when_traffic_changes(tiny_base, refs):
    tok = tiny_base.tokenizer
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    only_dom = [(tok(p)["input_ids"], params, refs[0]) for p in ("x y z", "Hello there", "1 2 3 4")]
    reference, _ = run(tiny_base, only_dom, "off")
    first, engine = run(tiny_base, only_dom, "auto")
    assert engine.merger.builds == 1
    again = [[t for o in out for t in o.token_ids] for out in engine.generate(only_dom)]
    assert first == reference and again == reference
    steps = engine.merger.merged_steps
    assert steps > 0
    mixed = only_dom + [(tok("other")["input_ids"], params, refs[1])]
    engine.generate(mixed)  # another adapter joins: auto stops merging while it runs
    assert engine.merger.merged_steps == steps


def test_auto_merges_only_at_batch_sizes_where_merging_pays(tiny_base, refs):
    """`merge_pays(rows)` gates auto (the engine sets it from the start-up timing on an NF4 base)."""
    tok = tiny_base.tokenizer
    params = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
    only_dom = [(tok(p)["input_ids"], params, refs[0]) for p in ("x y z", "Hello there", "1 2 3 4")]
    engine = Engine(tiny_base, EngineConfig(kv_cache_tokens=2048, merge_policy="auto"))
    engine.merger.patience, engine.merger.min_rows, engine.merger.dwell_seconds = 2, 1, 0.0
    asked = []
    engine.merger.merge_pays = lambda rows: asked.append(rows) or rows >= 8
    engine.generate(only_dom)
    engine.merger.wait()
    assert asked and max(asked) <= 3 and engine.merger.builds == 0 and engine.merger.merged_steps == 0
    assert engine.stats()["merge_pays_rows"] == [8, 16, 32, 48, 64]
    engine.merger.merge_pays = lambda rows: True
    engine.generate(only_dom)
    engine.merger.wait()
    assert engine.merger.builds == 1


def test_dense_faster_compares_the_summed_layer_shapes(monkeypatch):
    from loraplex.runtime import nf4_linear
    monkeypatch.setattr(nf4_linear, "NF4_US", {(8, 4): {16: 10.0, 32: 14.0}, (4, 8): {16: 10.0, 32: 14.0}})
    monkeypatch.setattr(nf4_linear, "DENSE_US", {(8, 4): {16: 12.0, 32: 12.0}, (4, 8): {16: 9.0, 32: 12.0}})
    assert nf4_linear.dense_faster(16) is False  # 21 us dense vs 20 us NF4
    assert nf4_linear.dense_faster(32) is True  # 24 vs 28
    assert nf4_linear.dense_faster(20) is True  # looked up at the next calibrated count, 32
    monkeypatch.setattr(nf4_linear, "DENSE_US", {})
    assert nf4_linear.dense_faster(32) is None  # not timed: the engine then never merges an NF4 base


@pytest.mark.skipif(not __import__("bitsandbytes.functional").functional.has_avx512bf16(),
                    reason="bitsandbytes repacks NF4 weights for its CPU kernel only where the CPU has AVX512-bf16")
def test_merged_copy_of_a_cpu_repacked_nf4_base_equals_its_forward(tiny_model_dir, refs):
    """On such a CPU the first forward rewrites a Linear4bit's weight into another layout; the merged copy
    (and DoRA's weight norms) must still read the weight the forward computes with."""
    base = load_base_model(str(tiny_model_dir), quantization="nf4", dtype="bfloat16", device="cpu")
    lin = next(m for m in base.model.modules() if isinstance(m, AdaptedLinear))
    x = torch.randn(5, lin.base.in_features, dtype=torch.bfloat16)
    with torch.inference_mode():
        y = lin.base(x).float()  # repacks
        assert lin.base.weight.quant_state.packing_format_for_cpu
        merged = merged_linear(lin, refs[0], base.projection_shapes, "bf16", torch.bfloat16)
        from loraplex.runtime.adapters.ops import module_delta
        col = 0
        for proj in lin.projections:
            out = base.projection_shapes[proj][1]
            m = refs[0].weights.modules.get((lin.layer_idx, proj))
            if m is not None:
                y[:, col:col + out] += module_delta(x.float(), m)
            col += out
        torch.testing.assert_close(merged(x).float(), y, rtol=0.02, atol=0.02)


def test_auto_waits_its_dwell_time_before_building_and_frees_the_copy_after(tiny_base, refs, monkeypatch):
    """Hysteresis: a dominant adapter is merged only after dwell_seconds of dominance, and its copy is freed
    once it has not dominated for dwell_seconds (the clock is the merger's; no real waiting)."""
    from loraplex.runtime import merged as merged_module
    clock = [1000.0]
    monkeypatch.setattr(merged_module.time, "monotonic", lambda: clock[0])
    engine = Engine(tiny_base, EngineConfig(kv_cache_tokens=2048, merge_policy="auto"))
    merger = engine.merger
    merger.patience, merger.min_rows, merger.dwell_seconds = 1, 1, 30.0
    dom, other = refs[0], refs[1]
    for _ in range(5):  # dominant for 4 s: not yet
        merger.choose([dom, dom])
        clock[0] += 1.0
    assert merger.builds == 0
    clock[0] += 30.0
    merger.choose([dom, dom])
    merger.wait()
    assert merger.builds == 1
    chosen, changed = merger.choose([dom, dom])
    assert changed and chosen is dom and merger.active is dom
    clock[0] += 10.0
    assert merger.choose([other, dom]) == (None, False)  # not dominant: unmerged rows, the copy kept
    assert merger.active is dom and merger.merged_bytes > 0
    clock[0] += 31.0
    chosen, changed = merger.choose([other, dom])
    assert chosen is None and changed and merger.active is None and merger.merged_bytes == 0


def test_merge_policy_is_off_by_default(tiny_base):
    assert EngineConfig().merge_policy == "off"
    assert Engine(tiny_base, EngineConfig(kv_cache_tokens=1024)).stats()["merge_policy"] == "off"
