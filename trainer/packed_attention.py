"""Attention within each row of a packed sequence, computing only the rows' own causal blocks.

With `position_ids` restarting per row, transformers' SDPA path builds one [T, T] block-diagonal mask and
the masked SDPA kernel computes every score of it: for 8 rows of ~270 tokens, T² is 8x the rows' own Σ L²,
where the padded layout computes only each row's own scores. Here the rows' boundaries (`cu_seq_lens_q`,
the names transformers' FlashAttention path reads, passed by `Objective` for packed batches) go to
FlashAttention's varlen kernel on CUDA (torch.nn.attention.varlen) and to one causal SDPA per row
elsewhere. A batch without boundaries (a padded one) takes transformers' SDPA path with its mask.

`use_packed_attention(model)` registers the function with transformers' attention interface and sets it
on the model.
"""
from __future__ import annotations

import inspect
import logging

import torch
import torch.nn.functional as F

NAME = "loraplex_packed"
log = logging.getLogger(__name__)

try:
    from torch.nn.attention.varlen import varlen_attn
    _VARLEN_PARAMS = set(inspect.signature(varlen_attn).parameters)
except ImportError:  # torch < 2.10
    varlen_attn, _VARLEN_PARAMS = None, set()
_use_varlen = varlen_attn is not None  # False after a failed probe on this machine (use_packed_attention)


def packed_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling: float | None = None,
                     **kwargs):
    """transformers' attention interface: query [1, heads, T, dim], key/value [1, kv heads, T, dim]; returns
    ([1, T, heads, dim], None)."""
    bounds = kwargs.get("cu_seq_lens_q")
    if bounds is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # [T, heads, dim]
    if _flash_varlen_fits(q, dropout, scaling):
        out = _flash_varlen(q, k, v, bounds, int(kwargs["max_length_q"]), scaling)
    else:
        out = _per_row(q, k, v, bounds, dropout, scaling)
    return out.unsqueeze(0), None


def _flash_varlen_fits(q: torch.Tensor, dropout: float, scaling: float | None) -> bool:
    if not _use_varlen or not q.is_cuda or q.dtype not in (torch.float16, torch.bfloat16) or dropout:
        return False
    default_scale = scaling is None or abs(scaling - q.shape[-1] ** -0.5) < 1e-12
    return default_scale or "scale" in _VARLEN_PARAMS


def _flash_varlen(q, k, v, bounds: torch.Tensor, max_len: int, scaling: float | None) -> torch.Tensor:
    options = {}
    if "window_size" in _VARLEN_PARAMS:  # torch >= 2.11 spells causal as a window; 2.10 as is_causal
        options["window_size"] = (-1, 0)
    else:
        options["is_causal"] = True
    if "scale" in _VARLEN_PARAMS and scaling is not None:
        options["scale"] = scaling
    if k.shape[1] != q.shape[1]:  # grouped-query attention
        if "enable_gqa" in _VARLEN_PARAMS:
            options["enable_gqa"] = True
        else:
            k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
            v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
    bounds = bounds.to(device=q.device, dtype=torch.int32)
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()  # token-major [T, heads, dim], as FlashAttention reads
    return varlen_attn(q, k, v, bounds, bounds, max_len, max_len, **options)


def _per_row(q, k, v, bounds: torch.Tensor, dropout: float, scaling: float | None) -> torch.Tensor:
    edges = bounds.tolist()
    rows = []
    for start, end in zip(edges[:-1], edges[1:]):
        rows.append(F.scaled_dot_product_attention(
            q[start:end].transpose(0, 1), k[start:end].transpose(0, 1), v[start:end].transpose(0, 1),
            dropout_p=dropout, is_causal=True, scale=scaling, enable_gqa=k.shape[1] != q.shape[1]).transpose(0, 1))
    return torch.cat(rows)


def _varlen_works(device: torch.device) -> bool:
    """Forward and backward of the varlen kernel on two tiny rows (the torch build may lack it for this GPU)."""
    try:
        q, k, v = (torch.randn(8, 2, 64, device=device, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
        bounds = torch.tensor([0, 3, 8], device=device, dtype=torch.int32)
        _flash_varlen(q, k, v, bounds, 8, None).float().sum().backward()
        return True
    except Exception as e:  # noqa: BLE001 - any failure: the per-row path computes the same attention
        log.warning("varlen FlashAttention unavailable here (%s: %s); packed rows use one SDPA call per row",
                    type(e).__name__, e)
        return False


def speed_report(model) -> dict:
    """What the speed switches did in this process: the attention the model ran (and for packed rows whether
    through varlen FlashAttention), and torch.compile's frames compiled and graph breaks (0 and 0 when off)."""
    from torch._dynamo.utils import counters
    attention = model.get_base_model().config._attn_implementation
    weight = next(model.parameters())
    varlen = _use_varlen and weight.is_cuda and weight.dtype in (torch.float16, torch.bfloat16)
    return {"attention": attention, "packed_rows": ("varlen" if varlen else "per-row") if attention == NAME else None,
            "compiled_frames": counters["frames"]["ok"], "graph_breaks": sum(counters["graph_break"].values())}


def use_packed_attention(model) -> None:
    """Register `packed_attention` with transformers and make it the model's attention (padded batches keep
    the SDPA mask they had)."""
    global _use_varlen
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    device = next(model.parameters()).device
    if device.type == "cuda" and _use_varlen:
        _use_varlen = _varlen_works(device)
    AttentionInterface.register(NAME, packed_attention)
    AttentionMaskInterface.register(NAME, sdpa_mask)
    model.set_attn_implementation(NAME)
