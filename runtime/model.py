"""The decoder (Llama family: Llama, Mistral, Qwen2) as plain PyTorch modules.

Tokens of one engine step arrive packed as one [T, hidden] tensor; `StepContext` says where each
token's K/V goes in the paged cache, which cached keys each token attends to, and which adapter
slot each token uses. q/k/v and gate/up are fused linears; the adapter delta of each projection is
added to its slice of the fused output by the adapter ops.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

QKV = ("q_proj", "k_proj", "v_proj")
GATE_UP = ("gate_proj", "up_proj")
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class PrefillChunk:
    """Tokens [start, start+length) of the packed batch are positions [ctx_len-length, ctx_len)."""
    start: int
    length: int
    ctx_slots: torch.Tensor  # [ctx_len] cache slots of the whole context so far
    causal_mask: torch.Tensor | None  # [length, ctx_len] bool, None when the chunk is the whole context


@dataclass
class PagedAttentionMeta:
    """What the paged attention kernel reads: each sequence's block table and lengths (device)."""
    block_tables: torch.Tensor  # [B, max_blocks] int32
    context_lens: torch.Tensor  # [B] int32, cached tokens including this step's
    query_start: torch.Tensor  # [B+1] int32, sequence b owns packed rows query_start[b]:query_start[b+1]
    max_query_len: int
    block_size: int


@dataclass
class StepContext:
    positions: torch.Tensor  # [T]
    slot_mapping: torch.Tensor  # [T] cache slot each token's K/V is written to
    paged: PagedAttentionMeta | None = None  # set: attention reads the pages directly (CUDA)
    merged_rows: torch.Tensor | None = None  # [T] bool: rows computed with the merged weights
    all_merged: bool = False  # every row uses the merged weights (no base pass)
    decode_token_idx: torch.Tensor | None = None  # [Bd] packed index of each one-token row
    decode_ctx_slots: torch.Tensor | None = None  # [Bd, max_ctx]
    decode_mask: torch.Tensor | None = None  # [Bd, 1, 1, max_ctx] bool
    prefills: list[PrefillChunk] = field(default_factory=list)
    lora: object | None = None  # adapters.ops.AdapterOps, or None when no row uses an adapter
    lora_meta: object | None = None  # the ops' per-step token→slot metadata
    logits_idx: torch.Tensor | None = None  # [S] rows whose logits are needed; None = all
    fused_layer_ops: bool = False  # norms, rotary + cache write, SiLU-mul as fused kernels (CUDA)


def n_kv_heads(cfg) -> int:
    return getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads


def head_dim(cfg) -> int:
    return getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads


def layer_sliding_window(cfg, layer_idx: int) -> int | None:
    """The attention window of one layer (a query sees the keys at positions > pos - window), or None.

    Mistral windows every layer; configs with `layer_types` (Qwen2 with use_sliding_window) say per layer.
    """
    window = getattr(cfg, "sliding_window", None)
    if not window:
        return None
    layer_types = getattr(cfg, "layer_types", None)
    if layer_types is not None:
        return int(window) if layer_types[layer_idx] == "sliding_attention" else None
    return int(window) if cfg.model_type == "mistral" else None


def projection_shapes(cfg) -> dict[str, tuple[int, int]]:
    """(in_features, out_features) of each adaptable projection."""
    h, hd = cfg.hidden_size, head_dim(cfg)
    q_out, kv_out, inter = cfg.num_attention_heads * hd, n_kv_heads(cfg) * hd, cfg.intermediate_size
    return {"q_proj": (h, q_out), "k_proj": (h, kv_out), "v_proj": (h, kv_out), "o_proj": (q_out, h),
            "gate_proj": (h, inter), "up_proj": (h, inter), "down_proj": (inter, h)}


class AdaptedLinear(nn.Module):
    """A base linear (dense or NF4) computing one or several fused projections, plus adapter deltas.

    `merged`, when set, is this linear with one adapter's delta merged in (runtime/merged.py): the
    step's `merged_rows` are computed with it instead of base + delta.
    """

    def __init__(self, base: nn.Module, layer_idx: int, projections: tuple[str, ...]):
        super().__init__()
        self.base = base
        self.layer_idx = layer_idx
        self.projections = projections
        self.merged: nn.Module | None = None
        # the wider buffer input_buffer handed out for this layer's next input (a view's _base does not say:
        # inference mode, where graphs are captured, records none)
        self._wide_input: torch.Tensor | None = None

    def forward(self, x: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        wide, self._wide_input = self._wide_input, None
        merged = self.merged if ctx.merged_rows is not None else None
        if merged is not None and ctx.all_merged:
            return merged(x)
        y = None
        if ctx.lora is not None and merged is None:  # some deltas inside the base matmul (kernels/lora_fold.py)
            y = ctx.lora.folded(self.layer_idx, self.projections, x, self.base, ctx.lora_meta, wide=wide)
        if y is not None:
            ctx.lora.apply(self.layer_idx, self.projections, x, y, ctx.lora_meta, folded=True)
            return y
        y = self.base(x)
        if ctx.lora is not None:
            ctx.lora.apply(self.layer_idx, self.projections, x, y, ctx.lora_meta)
        if merged is not None:
            y = torch.where(ctx.merged_rows.unsqueeze(1), merged(x), y)
        return y

    def input_buffer(self, rows: int, dtype: torch.dtype, device: torch.device, ctx: StepContext) -> torch.Tensor | None:
        """Where a producer may write this layer's input so that a folding step needs no copy of it: the first
        in_features columns of a wider buffer (see TritonAdapterOps.folded); None when this step does not fold here."""
        if ctx.lora is None or ctx.merged_rows is not None:
            return None
        width = ctx.lora.fold_width(self.projections, ctx.lora_meta)
        can_fold = getattr(self.base, "can_fold", None)
        if not width or can_fold is None or not can_fold(rows, device, dtype):
            return None
        self._wide_input = torch.empty(rows, self.base.in_features + width, dtype=dtype, device=device)
        return self._wide_input[:, :self.base.in_features]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)

    def fused(self, x: torch.Tensor, residual: torch.Tensor | None = None,
              into: AdaptedLinear | None = None, ctx: StepContext | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(forward(s), s) with s = x (+ residual), in one kernel; forward(s) written where `into` takes its input."""
        from loraplex.kernels.layer_ops import rms_norm
        out = None
        if into is not None:
            out = into.input_buffer(x.shape[0], torch.promote_types(self.weight.dtype, x.dtype), x.device, ctx)
        return rms_norm(x, self.weight, self.eps, residual, out=out)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class Attention(nn.Module):
    def __init__(self, cfg, layer_idx: int):
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = cfg.num_attention_heads, n_kv_heads(cfg), head_dim(cfg)
        qkv_bias = bool(getattr(cfg, "attention_bias", False)) or cfg.model_type == "qwen2"
        out = (self.n_heads + 2 * self.n_kv) * self.head_dim
        self.qkv_proj = AdaptedLinear(nn.Linear(cfg.hidden_size, out, bias=qkv_bias), layer_idx, QKV)
        self.o_proj = AdaptedLinear(nn.Linear(self.n_heads * self.head_dim, cfg.hidden_size,
                                              bias=bool(getattr(cfg, "attention_bias", False))),
                                    layer_idx, ("o_proj",))
        self.scale = self.head_dim ** -0.5
        self.sliding_window = layer_sliding_window(cfg, layer_idx)
        self.k_cache: torch.Tensor | None = None  # [num_slots, n_kv, head_dim], set by the runner
        self.v_cache: torch.Tensor | None = None

    def forward(self, x, cos, sin, ctx: StepContext) -> torch.Tensor:
        T = x.shape[0]
        qkv = self.qkv_proj(x, ctx)
        if ctx.fused_layer_ops:
            from loraplex.kernels.layer_ops import rope_and_cache
            q = rope_and_cache(qkv, cos, sin, self.k_cache, self.v_cache, ctx.slot_mapping,
                               self.n_heads, self.n_kv, self.head_dim)
        else:
            q, k, v = qkv.split([self.n_heads * self.head_dim, self.n_kv * self.head_dim,
                                 self.n_kv * self.head_dim], dim=-1)
            q = rotate(q.view(T, self.n_heads, self.head_dim), cos, sin)
            k = rotate(k.view(T, self.n_kv, self.head_dim), cos, sin)
            v = v.view(T, self.n_kv, self.head_dim)
            self.k_cache[ctx.slot_mapping] = k.to(self.k_cache.dtype)
            self.v_cache[ctx.slot_mapping] = v.to(self.v_cache.dtype)

        if ctx.paged is not None:
            from loraplex.kernels.paged_attention import paged_attention
            p = ctx.paged
            out = paged_attention(q, self.k_cache, self.v_cache, p.block_tables, p.context_lens, p.query_start,
                                  p.block_size, self.scale, max_query_len=p.max_query_len,
                                  sliding_window=self.sliding_window)
            return self.o_proj(out.reshape(T, -1), ctx)
        out = torch.empty_like(q)
        if ctx.decode_token_idx is not None:
            qd = q[ctx.decode_token_idx].unsqueeze(2)  # [Bd, H, 1, D]
            kd = self.k_cache[ctx.decode_ctx_slots].transpose(1, 2)  # [Bd, KV, ctx, D]
            vd = self.v_cache[ctx.decode_ctx_slots].transpose(1, 2)
            mask = ctx.decode_mask
            if self.sliding_window is not None and kd.shape[2] > self.sliding_window:
                key_pos = torch.arange(kd.shape[2], device=q.device)  # decode_ctx_slots hold positions 0..ctx-1
                query_pos = ctx.positions[ctx.decode_token_idx].unsqueeze(1)
                mask = mask & (key_pos > query_pos - self.sliding_window).view(len(qd), 1, 1, -1)
            od = F.scaled_dot_product_attention(qd, kd.to(q.dtype), vd.to(q.dtype), attn_mask=mask,
                                                scale=self.scale, enable_gqa=self.n_kv != self.n_heads)
            out[ctx.decode_token_idx] = od.squeeze(2)
        for chunk in ctx.prefills:
            s = slice(chunk.start, chunk.start + chunk.length)
            qp = q[s].transpose(0, 1).unsqueeze(0)  # [1, H, n, D]
            kp = self.k_cache[chunk.ctx_slots].transpose(0, 1).unsqueeze(0).to(q.dtype)
            vp = self.v_cache[chunk.ctx_slots].transpose(0, 1).unsqueeze(0).to(q.dtype)
            mask = chunk.causal_mask
            ctx_len = chunk.ctx_slots.numel()
            if self.sliding_window is not None and ctx_len > self.sliding_window:
                key_pos = torch.arange(ctx_len, device=q.device)
                query_pos = torch.arange(ctx_len - chunk.length, ctx_len, device=q.device).unsqueeze(1)
                window = (key_pos <= query_pos) & (key_pos > query_pos - self.sliding_window)
                mask = window if mask is None else mask & window
            op = F.scaled_dot_product_attention(qp, kp, vp, attn_mask=mask,
                                                is_causal=mask is None, scale=self.scale,
                                                enable_gqa=self.n_kv != self.n_heads)
            out[s] = op.squeeze(0).transpose(0, 1)
        return self.o_proj(out.reshape(T, -1), ctx)


class MLP(nn.Module):
    def __init__(self, cfg, layer_idx: int):
        super().__init__()
        self.inter = cfg.intermediate_size
        self.gate_up_proj = AdaptedLinear(nn.Linear(cfg.hidden_size, 2 * self.inter, bias=False), layer_idx, GATE_UP)
        self.down_proj = AdaptedLinear(nn.Linear(self.inter, cfg.hidden_size, bias=False), layer_idx, ("down_proj",))

    def forward(self, x, ctx: StepContext) -> torch.Tensor:
        gate_up = self.gate_up_proj(x, ctx)
        if ctx.fused_layer_ops:
            from loraplex.kernels.layer_ops import silu_and_mul
            out = self.down_proj.input_buffer(gate_up.shape[0], gate_up.dtype, gate_up.device, ctx)
            return self.down_proj(silu_and_mul(gate_up, out=out), ctx)
        gate, up = gate_up.split(self.inter, dim=-1)
        return self.down_proj(F.silu(gate) * up, ctx)


class DecoderLayer(nn.Module):
    def __init__(self, cfg, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer_idx)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg, layer_idx)

    def forward(self, x, cos, sin, ctx: StepContext) -> torch.Tensor:
        if ctx.fused_layer_ops:
            h, _ = self.input_layernorm.fused(x, into=self.self_attn.qkv_proj, ctx=ctx)
            h, x = self.post_attention_layernorm.fused(self.self_attn(h, cos, sin, ctx), residual=x,
                                                       into=self.mlp.gate_up_proj, ctx=ctx)
            return x + self.mlp(h, ctx)
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, ctx)
        return x + self.mlp(self.post_attention_layernorm(x), ctx)


class CausalLM(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if getattr(cfg, "tie_word_embeddings", False):
            self.lm_head.weight = self.embed_tokens.weight
        # transformers' rotary module knows every rope_scaling variant (llama3, yarn, dynamic, ...)
        self.rotary = LlamaRotaryEmbedding(cfg)

    def forward(self, input_ids: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        x = self.embed_tokens(input_ids)
        cos, sin = self.rotary(x, ctx.positions.unsqueeze(0))
        cos, sin = cos[0].unsqueeze(1).to(x.dtype), sin[0].unsqueeze(1).to(x.dtype)  # [T, 1, D]
        for layer in self.layers:
            x = layer(x, cos, sin, ctx)
        if ctx.logits_idx is not None:
            x = x[ctx.logits_idx]
        x = self.norm.fused(x)[0] if ctx.fused_layer_ops else self.norm(x)
        return self.lm_head(x).float()
