"""`--model PATH`: Llama, Mistral and Qwen2 checkpoints load into our decoder with transformers' logits."""
from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, MistralConfig, Qwen2Config

from loraplex.runtime.base_model import default_model_dir, load_base_model
from loraplex.runtime.engine import Engine, EngineConfig
from loraplex.runtime.sequence import SamplingParams

COMMON = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=256)
FAMILIES = {
    "llama3-rope": lambda v: LlamaConfig(vocab_size=v, rope_scaling={"rope_type": "llama3", "factor": 8.0,
                                         "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                         "original_max_position_embeddings": 64}, **COMMON),
    "mistral": lambda v: MistralConfig(vocab_size=v, tie_word_embeddings=False, **COMMON),
    "qwen2": lambda v: Qwen2Config(vocab_size=v, tie_word_embeddings=True, **COMMON),  # q/k/v biases
    # a window much shorter than the prompt: ignoring it changes every logit past position 8
    "mistral-window": lambda v: MistralConfig(vocab_size=v, tie_word_embeddings=False, sliding_window=8, **COMMON),
    # sliding attention in the second layer only (layer_types)
    "qwen2-window": lambda v: Qwen2Config(vocab_size=v, use_sliding_window=True, sliding_window=8, max_window_layers=1,
                                          **COMMON),
}


@pytest.mark.parametrize("family", FAMILIES)
def test_checkpoint_logits_match_transformers(family, tmp_path):
    tok = AutoTokenizer.from_pretrained(default_model_dir())
    torch.manual_seed(0)
    reference = AutoModelForCausalLM.from_config(FAMILIES[family](len(tok))).eval()
    if family.startswith("qwen2"):  # random init leaves biases at zero: make them count
        for layer in reference.model.layers:
            torch.nn.init.normal_(layer.self_attn.q_proj.bias, std=0.5)
            torch.nn.init.normal_(layer.self_attn.k_proj.bias, std=0.5)
    reference.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    base = load_base_model(str(tmp_path), dtype="float32", device="cpu")
    engine = Engine(base, EngineConfig(kv_cache_tokens=512))
    ids = tok("a prompt long enough to cover several positions of the rotary embedding " * 3)["input_ids"]
    [ours] = engine.score([(ids, None)])
    with torch.no_grad():
        expected = reference(torch.tensor([ids])).logits[0]
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-4)


def test_unsupported_model_type_is_refused(tmp_path):
    from transformers import GPT2Config
    GPT2Config(n_layer=1, n_embd=32, n_head=2).save_pretrained(tmp_path)
    with pytest.raises(SystemExit, match="not a supported Llama-family"):
        load_base_model(str(tmp_path), device="cpu")


@pytest.mark.parametrize("family", ["mistral-window", "qwen2-window"])
def test_sliding_window_decode_matches_transformers(family, tmp_path):
    """Greedy decode past the window: the decode path masks keys older than the window like transformers."""
    tok = AutoTokenizer.from_pretrained(default_model_dir())
    torch.manual_seed(1)
    reference = AutoModelForCausalLM.from_config(FAMILIES[family](len(tok))).eval()
    with torch.no_grad():  # sharpen the random model so greedy choices are far from ties
        reference.lm_head.weight.mul_(8)
    reference.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    base = load_base_model(str(tmp_path), dtype="float32", device="cpu")
    engine = Engine(base, EngineConfig(kv_cache_tokens=512))
    ids = tok("a prompt a little longer than the window")["input_ids"]
    [outputs] = engine.generate([(ids, SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True), None)])
    ours = [t for out in outputs for t in out.token_ids]
    with torch.no_grad():
        expected = reference.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False,
                                      eos_token_id=None, pad_token_id=0)[0, len(ids):].tolist()
    assert ours == expected
