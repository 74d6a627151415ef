"""bench/serve_gpu.py's random-weight world: the Llama-3.2-1B / Llama-3.1-8B shapes (and a tiny one for
CPU smoke runs), the bytes a decode step reads from each, rank-r LoRA / GraLoRA / DoRA adapters in the
PEFT format, and bf16 checkpoints with a tokenizer that decodes every id."""
from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save as save_safetensors
from safetensors.torch import save_file

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
QV = ("q_proj", "v_proj")
GROUP = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
         "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}
SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<pad>")  # ids 0..3; not word-like (see NOTES.md)

# -- model shapes and the bytes a decode step reads --------------------------------------------------------
@dataclass(frozen=True)
class ModelShape:
    name: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tied: bool
    rope_factor: float

    def projections(self) -> dict[str, tuple[int, int]]:
        """name -> (in_features, out_features)"""
        h, q, kv, i = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim, self.intermediate
        return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
                "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}

    def hf_config(self) -> dict:
        return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": self.hidden,
                "intermediate_size": self.intermediate, "num_hidden_layers": self.layers,
                "num_attention_heads": self.heads, "num_key_value_heads": self.kv_heads, "head_dim": self.head_dim,
                "vocab_size": self.vocab, "max_position_embeddings": 131072, "rms_norm_eps": 1e-5,
                "rope_theta": 500000.0,
                "rope_scaling": {"factor": self.rope_factor, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                 "original_max_position_embeddings": 8192, "rope_type": "llama3"},
                "tie_word_embeddings": self.tied, "hidden_act": "silu", "attention_bias": False, "mlp_bias": False,
                "initializer_range": 0.02, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 3,
                "torch_dtype": "bfloat16", "use_cache": True}


SHAPES = {
    "tiny": ModelShape("tiny", 64, 2, 4, 2, 16, 128, 512, True, 32.0),
    "1b": ModelShape("Llama-3.2-1B-shape", 2048, 16, 32, 8, 64, 8192, 128256, True, 32.0),
    "8b": ModelShape("Llama-3.1-8B-shape", 4096, 32, 32, 8, 128, 14336, 128256, False, 8.0),
}


def base_bytes_per_step(shape: ModelShape, quantization: str, dtype_bytes: int = 2) -> dict:
    """Bytes of base weights one decode step reads: every layer's seven projections, lm_head, norms."""
    linear = shape.layers * sum(i * o for i, o in shape.projections().values())
    if quantization == "nf4":  # packed 4-bit + uint8 absmax per 64-block + fp32 absmax per 256 blocks
        linear_bytes = linear // 2 + linear // 64 + (linear // 64 // 256) * 4
    else:
        linear_bytes = linear * dtype_bytes
    lm_head = shape.vocab * shape.hidden * dtype_bytes
    norms = (2 * shape.layers + 1) * shape.hidden * dtype_bytes
    return {"linear_params": linear, "linear_bytes": linear_bytes, "lm_head_bytes": lm_head, "norm_bytes": norms,
            "total": linear_bytes + lm_head + norms}


def kv_bytes_per_token(shape: ModelShape, dtype_bytes: int = 2) -> int:
    return shape.layers * 2 * shape.kv_heads * shape.head_dim * dtype_bytes


# -- adapters: PEFT format, written directly ---------------------------------------------------------------
@dataclass(frozen=True)
class AdapterSpec:
    id: str
    rank: int
    peft_type: str = "LORA"  # LORA | GRALORA
    k: int = 1  # GraLoRA blocks
    targets: tuple[str, ...] = PROJECTIONS
    seed: int = 0
    dora: bool = False  # LoRA with use_dora: a magnitude vector per module

    def config(self) -> dict:
        common = {"target_modules": list(self.targets), "bias": "none", "task_type": "CAUSAL_LM",
                  "inference_mode": True}
        if self.peft_type == "GRALORA":
            return {"peft_type": "GRALORA", "r": self.rank, "gralora_k": self.k, "alpha": self.rank, "hybrid_r": 0,
                    **common}
        return {"peft_type": "LORA", "r": self.rank, "lora_alpha": self.rank, "lora_dropout": 0.0, "use_rslora": False,
                **({"use_dora": True} if self.dora else {}), **common}

    def bytes_bf16(self, shape: ModelShape) -> int:
        """A and B of every targeted module in bf16 (GraLoRA's blocks hold as many values as a rank-r LoRA);
        DoRA adds the two per-output-channel factors a step reads (g and c, runtime/adapters/dora.py)."""
        proj = shape.projections()
        values = sum(self.rank * (proj[p][0] + proj[p][1]) + (2 * proj[p][1] if self.dora else 0) for p in self.targets)
        return shape.layers * values * 2


class RandomPool:
    """Distinct random adapters fast: every tensor is a slice of one N(0, 1) bf16 pool at an offset of its own."""

    def __init__(self, size: int = 1 << 23, seed: int = 0):
        self.values = torch.randn(size, generator=torch.Generator().manual_seed(seed), dtype=torch.bfloat16)

    def take(self, shape: tuple[int, ...], std: float, key: int) -> torch.Tensor:
        n = math.prod(shape)
        room = len(self.values) - n
        offset = (key * 2654435761) % room if room > 0 else 0
        return (self.values[offset:offset + n] * std).view(shape)  # the product is a new tensor


def adapter_tensors(spec: AdapterSpec, shape: ModelShape, pool: RandomPool) -> dict[str, torch.Tensor]:
    """PEFT keys and layouts (NOTES.md "PEFT formats"); A ~ N(0, 0.02), B ~ N(0, 0.01): non-zero, logits sane."""
    proj, out = shape.projections(), {}
    key = spec.seed * 1_000_003
    for layer in range(shape.layers):
        for p in spec.targets:
            fin, fout = proj[p]
            prefix = f"base_model.model.model.layers.{layer}.{GROUP[p]}.{p}"
            key += 2
            if spec.peft_type == "GRALORA":
                out[f"{prefix}.gralora_A"] = pool.take((spec.k, fin // spec.k, spec.rank), 0.02, key)
                out[f"{prefix}.gralora_B"] = pool.take((spec.k, spec.rank, fout // spec.k), 0.01, key + 1)
            else:
                out[f"{prefix}.lora_A.weight"] = pool.take((spec.rank, fin), 0.02, key)
                out[f"{prefix}.lora_B.weight"] = pool.take((fout, spec.rank), 0.01, key + 1)
            if spec.dora:  # m near the rows' norm |W_i| ~ 0.02 sqrt(in) of the random base: factors near 1
                out[f"{prefix}.lora_magnitude_vector"] = 0.02 * math.sqrt(fin) * (1 + pool.take((fout,), 0.05, -key))
    return out


def adapter_payload(spec: AdapterSpec, shape: ModelShape, pool: RandomPool) -> tuple[bytes, bytes]:
    """(adapter_config.json, adapter_model.safetensors) as bytes, never touching the disk."""
    return json.dumps(spec.config()).encode(), save_safetensors(adapter_tensors(spec, shape, pool))


def write_adapter(spec: AdapterSpec, shape: ModelShape, pool: RandomPool, root: Path, payload=None) -> Path:
    """The adapter as a PEFT directory under root (cached: written once); payload: adapter_payload's stand-in."""
    d = root / spec.id
    if (d / "adapter_model.safetensors").exists():
        return d
    d.mkdir(parents=True, exist_ok=True)
    config, weights = (payload or adapter_payload)(spec, shape, pool)
    (d / "adapter_config.json").write_bytes(config)
    (d / "adapter_model.safetensors.tmp").write_bytes(weights)
    os.replace(d / "adapter_model.safetensors.tmp", d / "adapter_model.safetensors")
    return d


def distinct_specs(n: int) -> list[AdapterSpec]:
    return [AdapterSpec(f"d{i}", 16, seed=i) for i in range(n)]


def mix_specs(rows: int) -> list[AdapterSpec]:
    """rows distinct adapters cycling LoRA r8, r16 (the distinct set's), r32, r64 and GraLoRA r32 k=4."""
    specs = []
    for i in range(rows):
        kind = i % 5
        if kind == 1:
            specs.append(AdapterSpec(f"d{i}", 16, seed=i))
        elif kind == 4:
            specs.append(AdapterSpec(f"mix-gra32k4-{i}", 32, "GRALORA", 4, seed=10_000 + i))
        else:
            rank = {0: 8, 2: 32, 3: 64}[kind]
            specs.append(AdapterSpec(f"mix-r{rank}-{i}", rank, seed=10_000 + i))
    return specs


def qv_spec(i: int) -> AdapterSpec:
    return AdapterSpec(f"qv{i}", 16, targets=QV, seed=100_000 + i)


# -- checkpoint and tokenizer ------------------------------------------------------------------------------
def write_tokenizer(shape: ModelShape, path: Path) -> None:
    """A byte-level BPE tokenizer (like Llama 3's) over the whole vocabulary: the 256 byte symbols, then
    synthetic words, so every id the random model emits decodes and the server detokenizes as it
    would for a real Llama-3 checkpoint."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    byte_symbols = list(pre_tokenizers.ByteLevel.alphabet())
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for symbol in sorted(byte_symbols):
        vocab[symbol] = len(vocab)
    i = 0
    while len(vocab) < shape.vocab:
        vocab.setdefault(f"\u0120w{i}", len(vocab))  # "Ġw17" decodes to " w17"
        i += 1
    tok = Tokenizer(models.BPE(vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", model_max_length=131072)
    fast.save_pretrained(path)


def write_checkpoint(shape: ModelShape, path: Path, device: str, shard_bytes: int = 2 << 30) -> Path:
    """A random-weight HF Llama checkpoint in bf16 safetensors, one shard in host memory at a time."""
    if (path / "config.json").exists():
        return path
    tmp = path.with_name(path.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    write_tokenizer(shape, tmp)
    gen = torch.Generator(device).manual_seed(0)

    def normal(*size):
        return (torch.randn(size, generator=gen, device=device, dtype=torch.bfloat16) * 0.02).cpu()

    def tensors():
        h = shape.hidden
        yield "model.embed_tokens.weight", normal(shape.vocab, h)
        for i in range(shape.layers):
            for p, (fin, fout) in shape.projections().items():
                yield f"model.layers.{i}.{GROUP[p]}.{p}.weight", normal(fout, fin)
            yield f"model.layers.{i}.input_layernorm.weight", torch.ones(h, dtype=torch.bfloat16)
            yield f"model.layers.{i}.post_attention_layernorm.weight", torch.ones(h, dtype=torch.bfloat16)
        yield "model.norm.weight", torch.ones(h, dtype=torch.bfloat16)
        if not shape.tied:
            yield "lm_head.weight", normal(shape.vocab, h)

    weight_map, shard, size, total, index = {}, {}, 0, 0, 0

    def flush():
        nonlocal shard, size, index
        name = f"model-{index:05d}.safetensors"
        save_file(shard, str(tmp / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in shard})
        shard, size, index = {}, 0, index + 1

    for key, t in tensors():
        shard[key] = t
        size += t.numel() * 2
        total += t.numel() * 2
        if size >= shard_bytes:
            flush()
    if shard:
        flush()
    (tmp / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                  "weight_map": weight_map}))
    (tmp / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 3}))
    (tmp / "config.json").write_text(json.dumps(shape.hf_config(), indent=2))
    shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)
    return path
