"""Tensors in, logits out: packs one step's tokens, owns the paged KV cache, runs the model."""
from __future__ import annotations

import torch

from .adapters.ops import AdapterOps
from .adapters.segments import NO_ADAPTER
from .base_model import BaseModel
from .block_manager import BlockManager
from .model import PrefillChunk, StepContext, head_dim, n_kv_heads
from .sequence import Sequence


def kv_bytes_per_token(base: BaseModel) -> int:
    cfg = base.config
    return 2 * cfg.num_hidden_layers * n_kv_heads(cfg) * head_dim(cfg) * torch.finfo(base.dtype).bits // 8


class ModelRunner:
    def __init__(self, base: BaseModel, blocks: BlockManager, ops: AdapterOps | None):
        self.base = base
        self.blocks = blocks
        self.ops = ops
        self.device = base.device
        cfg = base.config
        shape = (blocks.num_blocks * blocks.block_size, n_kv_heads(cfg), head_dim(cfg))
        for layer in base.model.layers:
            attn = layer.self_attn
            attn.k_cache = torch.zeros(shape, dtype=base.dtype, device=self.device)
            attn.v_cache = torch.zeros(shape, dtype=base.dtype, device=self.device)

    def _context(self, batch: list[tuple[Sequence, int]], all_logits: bool) -> tuple[torch.Tensor, StepContext]:
        dev = self.device
        input_ids, positions, slots, token_slots, logits_idx = [], [], [], [], []
        decode_idx, decode_ctx, prefills = [], [], []
        for seq, n in batch:
            start, begin = len(input_ids), seq.num_computed
            ctx_slots = self.blocks.slots(seq, begin + n)  # the whole context, this step's tokens last
            input_ids.extend(seq.token_ids[begin:begin + n])
            positions.append(torch.arange(begin, begin + n))
            slots.append(ctx_slots[begin:])
            token_slots.extend([seq.adapter_slot] * n)
            if n == 1:
                decode_idx.append(start)
                decode_ctx.append(ctx_slots)
            else:
                mask = None
                if begin > 0:  # a later chunk of a prompt: attends to everything cached before it
                    q_pos = torch.arange(begin, begin + n).unsqueeze(1)
                    mask = (torch.arange(begin + n).unsqueeze(0) <= q_pos).to(dev)
                prefills.append(PrefillChunk(start, n, ctx_slots.to(dev), mask))
            if begin + n == len(seq):
                logits_idx.append(len(input_ids) - 1)
        ctx = StepContext(positions=torch.cat(positions).to(dev), slot_mapping=torch.cat(slots).to(dev),
                          prefills=prefills)
        if decode_idx:
            lengths = torch.tensor([len(c) for c in decode_ctx])
            ctx.decode_token_idx = torch.tensor(decode_idx, device=dev)
            ctx.decode_ctx_slots = torch.nn.utils.rnn.pad_sequence(decode_ctx, batch_first=True).to(dev)
            width = ctx.decode_ctx_slots.shape[1]
            ctx.decode_mask = (torch.arange(width).unsqueeze(0) < lengths.unsqueeze(1)).view(-1, 1, 1, width).to(dev)
        if self.ops is not None and any(s != NO_ADAPTER for s in token_slots):
            ctx.lora, ctx.lora_meta = self.ops, self.ops.metadata(token_slots)
        if not all_logits:
            ctx.logits_idx = torch.tensor(logits_idx, dtype=torch.long, device=dev)
        return torch.tensor(input_ids, device=dev), ctx

    @torch.inference_mode()
    def run(self, batch: list[tuple[Sequence, int]], all_logits: bool = False) -> torch.Tensor:
        """Logits [rows, vocab] for the last token of every sequence whose context is now complete
        (all tokens of the batch with all_logits). Updates each sequence's num_computed."""
        input_ids, ctx = self._context(batch, all_logits)
        logits = self.base.model(input_ids, ctx)
        for seq, n in batch:
            seq.num_computed += n
        return logits
