"""Acceptance 2: one batch mixing LoRA, rsLoRA, GraLoRA k=2, hybrid GraLoRA, a layers_to_transform
LoRA and base-only rows gives PEFT's per-adapter logits; greedy generations over HTTP equal PEFT's."""
from __future__ import annotations

import pytest
import torch

from loraplex.runtime.adapters.peft_format import BaseShape
from loraplex.runtime.adapters.registry import AdapterRegistry
from loraplex.runtime.adapters.store import AdapterStore
from loraplex.runtime.base_model import load_base_model
from loraplex.runtime.engine import Engine, EngineConfig

from conftest import ADAPTER_KINDS, peft_reference

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a land far away,",
           "Translate to German: good morning", "1, 2, 3, 5, 8,", "The quick brown fox", "Hello"]


@pytest.fixture(scope="module")
def engine_and_refs(tmp_path_factory, peft_adapters):
    base = load_base_model(None, dtype="float32", device="cpu")
    engine = Engine(base, EngineConfig(max_gpu_adapters=len(ADAPTER_KINDS) + 1, kv_cache_tokens=2048))
    registry = AdapterRegistry(AdapterStore(tmp_path_factory.mktemp("store")), BaseShape(base.num_layers, base.projection_shapes))
    refs = {}
    for kind in ADAPTER_KINDS + ("gralora4",):
        d = peft_adapters[kind]
        registry.upload(kind, (d / "adapter_config.json").read_bytes(), (d / "adapter_model.safetensors").read_bytes())
        refs[kind] = registry.resolve(kind)
    return base, engine, refs


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def test_mixed_batch_logits_match_peft(engine_and_refs, peft_adapters):
    base, engine, refs = engine_and_refs
    tok = base.tokenizer
    # rows: every adapter kind + gralora k=4, interleaved with base-only rows
    rows = [(kind, PROMPTS[i % len(PROMPTS)]) for i, kind in enumerate(ADAPTER_KINDS + ("gralora4",))]
    rows.insert(2, (None, PROMPTS[5]))
    rows.append((None, PROMPTS[6]))
    rows.append(("lora", PROMPTS[6]))  # same adapter twice in one batch
    got = engine.score([(tok(p)["input_ids"], refs[k] if k else None) for k, p in rows])
    for (kind, prompt), logits in zip(rows, got):
        ref_model = peft_reference(peft_adapters[kind] if kind else None)
        with torch.no_grad():
            expected = ref_model(torch.tensor([tok(prompt)["input_ids"]])).logits[0]
        base_only = peft_reference(None)(torch.tensor([tok(prompt)["input_ids"]])).logits[0] if kind else None
        err = rel_err(logits, expected)
        assert err <= 1e-4, f"{kind}: relative error {err:.2e}"
        if kind:  # the adapter really changes the output, so the comparison has teeth
            assert rel_err(base_only.detach(), expected) > 1e-3, kind


def test_greedy_generation_over_http_matches_peft(fp32_server, peft_adapters):
    tok = None
    for kind in ADAPTER_KINDS:
        r = fp32_server.upload(f"peft-{kind}", peft_adapters[kind])
        assert r.status_code == 201, r.text
    import concurrent.futures as cf
    prompt = "The capital of France is"
    with cf.ThreadPoolExecutor(len(ADAPTER_KINDS) + 1) as pool:  # all in flight together: one mixed batch
        futures = {kind: pool.submit(fp32_server.complete, f"peft-{kind}" if kind else "base", prompt, 12, ignore_eos=True)
                   for kind in ADAPTER_KINDS + (None,)}
        served = {kind: f.result()["choices"][0]["text"] for kind, f in futures.items()}
    for kind in ADAPTER_KINDS + (None,):
        model = peft_reference(peft_adapters[kind] if kind else None)
        from transformers import AutoTokenizer
        from loraplex.runtime.base_model import default_model_dir
        tok = tok or AutoTokenizer.from_pretrained(default_model_dir())
        ids = torch.tensor([tok(prompt)["input_ids"]])
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0)
        expected = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
        assert served[kind] == expected, f"{kind}: {served[kind]!r} != {expected!r}"
    assert len(set(served.values())) > 3  # adapters produce different generations
