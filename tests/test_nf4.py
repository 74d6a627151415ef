"""NF4 base weights through bitsandbytes on the CPU: blocksize 64, double quantisation, bf16 compute."""
from __future__ import annotations

import bitsandbytes.functional as bnbf
import pytest
import torch

from loraplex.runtime.base_model import NF4_BLOCKSIZE, load_base_model
from loraplex.runtime.engine import Engine, EngineConfig
from loraplex.runtime.sequence import SamplingParams


@pytest.mark.parametrize("shape", [(576, 576), (1536, 576), (576, 1536), (192, 576)])
def test_nf4_round_trip_on_model_shapes(shape):
    """bitsandbytes' CPU dequantise is wrong for some block sizes: keep ours honest on real shapes."""
    w = torch.randn(shape, dtype=torch.bfloat16) * 0.02
    packed, state = bnbf.quantize_4bit(w, blocksize=NF4_BLOCKSIZE, quant_type="nf4", compress_statistics=True)
    back = bnbf.dequantize_4bit(packed, state, quant_type="nf4", blocksize=NF4_BLOCKSIZE)
    rel = ((back.float() - w.float()).norm() / w.float().norm()).item()
    assert rel < 0.12, rel  # NF4 keeps ~10% relative error on Gaussian weights; garbage is ~1.0


def test_nf4_default_model_generates_coherently():
    base = load_base_model(None, quantization="nf4", dtype="bfloat16", device="cpu")
    qkv = base.model.layers[0].self_attn.qkv_proj.base
    assert type(qkv).__name__ == "Linear4bit"
    assert qkv.weight.quant_type == "nf4" and qkv.weight.quant_state.blocksize == NF4_BLOCKSIZE
    assert qkv.weight.quant_state.nested  # double quantisation
    engine = Engine(base, EngineConfig(kv_cache_tokens=1024))
    ids = base.tokenizer("The capital of France is")["input_ids"]
    [outputs] = engine.generate([(ids, SamplingParams(max_tokens=8, temperature=0), None)])
    assert "Paris" in "".join(o.text for o in outputs)
