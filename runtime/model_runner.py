"""Tensors in, logits out: packs one step's tokens, owns the paged KV cache, runs the model.

Decode steps (one token per sequence) on CUDA replay a CUDA graph captured per (batch-size bucket,
adapter launch plan, merged mode): the step's inputs are written into fixed buffers that the graph
reads, padding rows write their K/V into one spare cache block and use no adapter. Other steps
(prefills, chunked prefills beside decode rows) replay a mixed graph captured per (token-count bucket,
adapter launch plan): an eager step of this kind is bound by the host launching ~20 kernels a layer
(bench/step_host.py: host time = GPU time, 1B on an H100), which a replay removes. Padding tokens
belong to no sequence (the attention writes nothing for them) and write their K/V into the spare block;
padding sequences have no tokens. Steps a graph cannot take (all-position logits, merged rows, more
tokens than the largest bucket) run eagerly. On CUDA attention reads the KV pages
directly (loraplex.kernels.paged_attention) and a layer's norms, rotary embedding + cache write and
SiLU-mul run as fused kernels (loraplex.kernels.layer_ops); on the CPU it gathers each context and
runs plain PyTorch (the reference path).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from .adapters.ops import AdapterOps
from .adapters.segments import NO_ADAPTER
from .base_model import BaseModel
from .block_manager import BlockManager
from .model import PagedAttentionMeta, PrefillChunk, StepContext, head_dim, n_kv_heads
from .sequence import Sequence
from .step_inputs import stage_decode, stage_mixed, token_slots

log = logging.getLogger(__name__)


def kv_bytes_per_token(base: BaseModel) -> int:
    cfg = base.config
    return 2 * cfg.num_hidden_layers * n_kv_heads(cfg) * head_dim(cfg) * torch.finfo(base.dtype).bits // 8


MIXED_QUANTUM = 128  # token counts of mixed graphs: multiples of this (the scheduler fills a step up to one)


def mixed_buckets(max_tokens: int) -> list[int]:
    """Token counts with a captured mixed-step graph: every MIXED_QUANTUM tokens up to max_tokens."""
    return list(range(MIXED_QUANTUM, max_tokens + MIXED_QUANTUM, MIXED_QUANTUM))


def graph_buckets(max_batch: int) -> list[int]:
    """Batch sizes with a captured decode graph (a step pads its rows to the next one): every 8 rows up
    to 64, every 16 up to 128, every 32 beyond (a decode step reads the weights once whatever its rows,
    so padding a large batch costs little), and max_batch itself."""
    small = [b for b in (1, 2, 4, 8) if b < max_batch]
    steps = list(range(16, 65, 8)) + list(range(80, 129, 16)) + list(range(160, 1 << 20, 32))
    return small + [b for b in steps if b < max_batch] + [max_batch]


@dataclass
class _DecodeGraph:
    graph: torch.cuda.CUDAGraph
    logits: torch.Tensor  # [bucket, vocab], written by every replay


class ModelRunner:
    def __init__(self, base: BaseModel, blocks: BlockManager, ops: AdapterOps | None, *,
                 cuda_graphs: bool = True, max_graph_batch: int = 64, max_graph_tokens: int = 2048):
        self.base = base
        self.blocks = blocks
        self.ops = ops
        self.device = base.device
        cfg = base.config
        cuda = self.device.type == "cuda"
        # one spare block past the pool: padding rows of a graph batch write their K/V there
        self.spare_slot = blocks.num_blocks * blocks.block_size
        shape = ((blocks.num_blocks + 1) * blocks.block_size, n_kv_heads(cfg), head_dim(cfg))
        for layer in base.model.layers:
            attn = layer.self_attn
            attn.k_cache = torch.zeros(shape, dtype=base.dtype, device=self.device)
            attn.v_cache = torch.zeros(shape, dtype=base.dtype, device=self.device)
        self.paged = cuda
        self.fused_layer_ops = cuda and self._layer_ops_work()
        self.merged_key = None  # (adapter id, version) whose merged weights the model holds, or None
        self.use_graphs = cuda and cuda_graphs
        self.buckets = graph_buckets(max_graph_batch)
        self.graphs: dict[tuple, _DecodeGraph] = {}
        self.mixed_buckets = mixed_buckets(max_graph_tokens) if self.use_graphs else []
        self.mixed_graphs: dict[tuple, _DecodeGraph] = {}  # (token bucket, launch plan) -> graph
        self.uncapturable: set[tuple[bool, tuple]] = set()  # (mixed, key) of graphs whose capture failed
        self.graph_pool = None
        if self.use_graphs:
            n, width = self.buckets[-1], -(-base.config.max_position_embeddings // blocks.block_size)
            width = min(width, blocks.num_blocks)
            i32 = dict(dtype=torch.int32, device=self.device)
            # a step's host values go through two pinned staging buffers and two copies
            self.staging64 = torch.zeros(5, n, dtype=torch.long, pin_memory=True)
            self.staging_tables = torch.zeros(n, width, dtype=torch.int32, pin_memory=True)
            self.rows64 = torch.zeros(5, n, dtype=torch.long, device=self.device)
            self.static = {
                "input_ids": self.rows64[0], "positions": self.rows64[1], "slot_mapping": self.rows64[2],
                "block_tables": torch.zeros(n, width, **i32),
                "context_lens": torch.zeros(n, **i32),
                "query_start": torch.arange(n + 1, **i32),
                "merged_rows": torch.zeros(n, dtype=torch.bool, device=self.device),
            }
            # mixed steps: token rows (ids, positions, slots) and sequence rows (context length, query
            # start, logits row), staged in pinned memory and copied in one go each
            t = self.mixed_buckets[-1]
            self.mixed_rows = n
            self.mixed_staging_tokens = torch.zeros(3, t, dtype=torch.long, pin_memory=True)
            self.mixed_staging_seqs = torch.zeros(3, n + 1, dtype=torch.int32, pin_memory=True)
            self.mixed_staging_tables = torch.zeros(n, width, dtype=torch.int32, pin_memory=True)
            self.mixed_tokens = torch.zeros(3, t, dtype=torch.long, device=self.device)
            self.mixed_seqs = torch.zeros(3, n + 1, **i32)
            self.mixed_tables = torch.zeros(n, width, **i32)
            self.mixed_logits_idx = torch.zeros(n, dtype=torch.long, device=self.device)
            self.mixed_logits: torch.Tensor | None = None  # [n, vocab] written by every mixed replay
        self.attach_ops(ops)
        self.graph_steps = 0
        # GPU time of the graph replays (CUDA events, read one replay late, when it is complete): beside the
        # engine's wall time per decode step it says how much of a step the host takes
        self.graph_gpu_seconds = 0.0
        self.mixed_gpu_seconds = 0.0  # the same for mixed-step replays (beside the engine's prefill_seconds)
        self.folded_steps = 0  # mixed-step replays with adapter deltas folded into the prefill matmuls (lora_fold.py)
        self._replay_events: tuple[torch.cuda.Event, torch.cuda.Event, bool] | None = None

    def _layer_ops_work(self) -> bool:
        from loraplex.kernels.layer_ops import self_check
        problem = self_check(self.device, self.base.dtype)
        if problem:
            log.warning("fused layer kernels disabled, running PyTorch ops instead: %s", problem)
        return problem is None

    def attach_ops(self, ops: AdapterOps | None) -> None:
        self.ops = ops
        if self.use_graphs and ops is not None:
            ops.graph_rows = self.buckets[-1]
            ops.graph_tokens = self.mixed_buckets[-1]

    # -- eager steps -----------------------------------------------------------------------
    def _context(self, batch: list[tuple[Sequence, int]], all_logits: bool,
                 token_slots: list[int]) -> tuple[torch.Tensor, StepContext]:
        dev = self.device
        input_ids, positions, slots, logits_idx = [], [], [], []
        decode_idx, decode_ctx, prefills = [], [], []
        for seq, n in batch:
            start, begin = len(input_ids), seq.num_computed
            input_ids.extend(seq.token_ids[begin:begin + n])
            positions.append(torch.arange(begin, begin + n))
            if begin + n == len(seq):
                logits_idx.append(len(input_ids) - 1)
            if self.paged:
                slots.append(self.blocks.slots(seq, begin + n)[begin:])
                continue
            ctx_slots = self.blocks.slots(seq, begin + n)  # the whole context, this step's tokens last
            slots.append(ctx_slots[begin:])
            if n == 1:
                decode_idx.append(start)
                decode_ctx.append(ctx_slots)
            else:
                mask = None
                if begin > 0:  # a later chunk of a prompt: attends to everything cached before it
                    q_pos = torch.arange(begin, begin + n).unsqueeze(1)
                    mask = (torch.arange(begin + n).unsqueeze(0) <= q_pos).to(dev)
                prefills.append(PrefillChunk(start, n, ctx_slots.to(dev), mask))
        ctx = StepContext(positions=torch.cat(positions).to(dev), slot_mapping=torch.cat(slots).to(dev),
                          prefills=prefills, fused_layer_ops=self.fused_layer_ops)
        if self.paged:
            ctx.paged = self._paged_meta(batch)
        elif decode_idx:
            lengths = torch.tensor([len(c) for c in decode_ctx])
            ctx.decode_token_idx = torch.tensor(decode_idx, device=dev)
            # padding gathers the spare slot, which no sequence owns: never another request's stale K/V
            # (masked out, but 0 * NaN is NaN)
            ctx.decode_ctx_slots = torch.nn.utils.rnn.pad_sequence(decode_ctx, batch_first=True,
                                                                   padding_value=self.spare_slot).to(dev)
            width = ctx.decode_ctx_slots.shape[1]
            ctx.decode_mask = (torch.arange(width).unsqueeze(0) < lengths.unsqueeze(1)).view(-1, 1, 1, width).to(dev)
        if self.ops is not None and any(s != NO_ADAPTER for s in token_slots):
            ctx.lora, ctx.lora_meta = self.ops, self.ops.metadata(token_slots)
        if not all_logits:
            ctx.logits_idx = torch.tensor(logits_idx, dtype=torch.long, device=dev)
        return torch.tensor(input_ids, device=dev), ctx

    def _paged_meta(self, batch: list[tuple[Sequence, int]]) -> PagedAttentionMeta:
        tables = [seq.block_table for seq, _ in batch]
        width = max(len(t) for t in tables)
        padded = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32)
        lens = torch.tensor([seq.num_computed + n for seq, n in batch], dtype=torch.int32)
        starts = torch.zeros(len(batch) + 1, dtype=torch.int32)
        starts[1:] = torch.tensor([n for _, n in batch]).cumsum(0)
        dev = self.device
        return PagedAttentionMeta(padded.to(dev), lens.to(dev), starts.to(dev), max(n for _, n in batch),
                                  self.blocks.block_size)

    @torch.inference_mode()
    def clear_kv(self, blocks: list[int]) -> None:
        """Zero the K/V of these blocks (before freeing them when they may hold NaN/inf)."""
        if not blocks:
            return
        size = self.blocks.block_size
        slots = (torch.tensor(blocks)[:, None] * size + torch.arange(size)).flatten().to(self.device)
        for layer in self.base.model.layers:
            layer.self_attn.k_cache.index_fill_(0, slots, 0)
            layer.self_attn.v_cache.index_fill_(0, slots, 0)

    @torch.inference_mode()
    def run(self, batch: list[tuple[Sequence, int]], all_logits: bool = False,
            merged: set[int] | None = None) -> torch.Tensor:
        """Logits [rows, vocab] for the last token of every sequence whose context is now complete
        (all tokens of the batch with all_logits). Updates each sequence's num_computed.
        merged: indices into batch of the decode rows to compute with the merged weights."""
        slots = token_slots(batch, merged)
        decode = all(n == 1 for _, n in batch)
        logits = None
        if self.use_graphs and decode and not all_logits and len(batch) <= self.buckets[-1] and \
                self._ops_graph_safe(slots):
            logits = self._replay(batch, slots, merged or set())
        elif self._mixed_graph_fits(batch, slots, all_logits, merged):
            logits = self._replay_mixed(batch, slots)
        if logits is None:  # no graph for this step (or its capture failed): eager
            input_ids, ctx = self._context(batch, all_logits, slots)
            if merged:
                ctx.merged_rows = torch.tensor([i in merged for i in range(len(batch))], device=self.device)
                ctx.all_merged = len(merged) == len(batch)
            logits = self.base.model(input_ids, ctx)
        for seq, n in batch:
            seq.num_computed += n
        return logits

    # -- CUDA-graph decode -------------------------------------------------------------------
    def _replay(self, batch: list[tuple[Sequence, int]], token_slots: list[int], merged: set[int]) -> torch.Tensor:
        B = len(batch)
        bucket = next(b for b in self.buckets if b >= B)
        s, size = self.static, self.blocks.block_size
        # the previous replay may still read the staging buffers' last copy: wait for it first
        torch.cuda.current_stream(self.device).synchronize()
        self._account_replay()
        width = stage_decode(batch, merged, self.staging64.numpy(), self.staging_tables.numpy(), size,
                             self.spare_slot, bucket)
        self.rows64[:, :bucket].copy_(self.staging64[:, :bucket], non_blocking=True)
        s["block_tables"][:B, :width].copy_(self.staging_tables[:B, :width], non_blocking=True)
        s["context_lens"][:bucket].copy_(self.rows64[3, :bucket])
        if merged:
            s["merged_rows"][:bucket].copy_(self.rows64[4, :bucket])

        lora_meta, plan = None, None
        if any(t != NO_ADAPTER for t in token_slots):
            lora_meta = self.ops.metadata(token_slots + [NO_ADAPTER] * (bucket - B), pad_to=bucket)
            plan = lora_meta.plan
        mode = "all" if merged and len(merged) == B else "some" if merged else None
        key = (bucket, plan, mode, self.merged_key if mode else None)
        entry = self._graph(self.graphs, key, lambda: self._capture(bucket, lora_meta, mode))
        if entry is None:
            return None
        self._timed_replay(entry.graph, mixed=False)
        return entry.logits[:B]

    def _graph(self, graphs: dict, key: tuple, capture) -> _DecodeGraph | None:
        """graphs[key], captured now if new; None if its capture failed (now or before): the step runs
        eagerly instead, so a graph that cannot be captured (out of memory in the pool, a kernel that is
        not capturable) slows its steps down but fails no request."""
        failed = (graphs is self.mixed_graphs, key)
        if failed in self.uncapturable:
            return None
        entry = graphs.get(key)
        if entry is None:
            try:
                entry = graphs[key] = capture()
            except Exception as e:  # noqa: BLE001
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
                self.uncapturable.add(failed)
                log.warning("CUDA graph capture failed for %s, running those steps eagerly: %s", key, e)
                return None
        return entry

    def _timed_replay(self, graph: torch.cuda.CUDAGraph, mixed: bool) -> None:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        self._replay_events = (start, end, mixed)
        self.graph_steps += 1

    def _account_replay(self) -> None:
        """Add the last replay's GPU time (complete: the stream was synchronised) to its counter."""
        if self._replay_events is not None:
            start, end, mixed = self._replay_events
            seconds = start.elapsed_time(end) / 1e3
            if mixed:
                self.mixed_gpu_seconds += seconds
            else:
                self.graph_gpu_seconds += seconds
            self._replay_events = None

    # -- CUDA-graph mixed steps -------------------------------------------------------------
    def _mixed_graph_fits(self, batch, token_slots: list[int], all_logits: bool, merged) -> bool:
        return (self.use_graphs and self.paged and not all_logits and not merged and len(batch) <= self.mixed_rows
                and sum(n for _, n in batch) <= self.mixed_buckets[-1] and self._ops_graph_safe(token_slots))

    def _ops_graph_safe(self, token_slots: list[int]) -> bool:
        """Whether a graph may capture this step's adapter math (graph-safe ops, or no row uses an adapter)."""
        return (self.ops is None or getattr(self.ops, "graph_safe", False)
                or all(s == NO_ADAPTER for s in token_slots))

    def _replay_mixed(self, batch: list[tuple[Sequence, int]], token_slots: list[int]) -> torch.Tensor:
        T = sum(n for _, n in batch)
        bucket = next(b for b in self.mixed_buckets if b >= T)
        B, size = len(batch), self.blocks.block_size
        torch.cuda.current_stream(self.device).synchronize()  # the last copy out of the staging buffers
        self._account_replay()
        width, num_logits = stage_mixed(batch, self.mixed_staging_tokens.numpy(), self.mixed_staging_seqs.numpy(),
                                        self.mixed_staging_tables.numpy(), size, self.spare_slot, bucket)
        self.mixed_tokens[:, :bucket].copy_(self.mixed_staging_tokens[:, :bucket], non_blocking=True)
        self.mixed_seqs.copy_(self.mixed_staging_seqs, non_blocking=True)
        self.mixed_tables[:B, :width].copy_(self.mixed_staging_tables[:B, :width], non_blocking=True)
        self.mixed_logits_idx.copy_(self.mixed_seqs[2, :self.mixed_rows])

        lora_meta, plan = None, None
        if any(t != NO_ADAPTER for t in token_slots):
            lora_meta = self.ops.metadata(token_slots + [NO_ADAPTER] * (bucket - T), pad_to=bucket, mixed=True)
            plan = lora_meta.plan
        key = (bucket, plan)
        entry = self._graph(self.mixed_graphs, key, lambda: self._capture_mixed(bucket, lora_meta))
        if entry is None:
            return None
        self._timed_replay(entry.graph, mixed=True)
        self.folded_steps += plan is not None and plan.fold > 0
        return entry.logits[:num_logits]

    def _mixed_context(self, bucket: int, lora_meta) -> StepContext:
        n = self.mixed_rows
        ctx = StepContext(positions=self.mixed_tokens[1, :bucket], slot_mapping=self.mixed_tokens[2, :bucket],
                          paged=PagedAttentionMeta(self.mixed_tables, self.mixed_seqs[0, :n], self.mixed_seqs[1],
                                                   bucket, self.blocks.block_size),
                          logits_idx=self.mixed_logits_idx, fused_layer_ops=self.fused_layer_ops)
        if lora_meta is not None:
            ctx.lora, ctx.lora_meta = self.ops, lora_meta
        return ctx

    def _capture_mixed(self, bucket: int, lora_meta) -> _DecodeGraph:
        if self.mixed_logits is None:
            self.mixed_logits = torch.empty(self.mixed_rows, self.base.config.vocab_size, dtype=torch.float32,
                                            device=self.device)
        # every mixed graph writes its logits into one shared buffer: the model's own output is freed at the
        # end of the capture, so [rows, vocab] fp32 (131 MB on Llama-3 vocabularies) is not held per graph
        return self._capture_graph(self.mixed_tokens[0, :bucket], self._mixed_context(bucket, lora_meta),
                                   out=self.mixed_logits)

    @torch.inference_mode()
    def capture_mixed_graphs(self) -> None:
        """Capture the base-only mixed graph of every token bucket (largest first: later ones reuse its
        memory), on padding only: no sequence, every token's K/V into the spare block."""
        if not self.use_graphs:
            return
        self.mixed_tokens.zero_()
        self.mixed_tokens[2].fill_(self.spare_slot)
        self.mixed_seqs.zero_()
        self.mixed_logits_idx.zero_()
        for bucket in reversed(self.mixed_buckets):
            if (bucket, None) not in self.mixed_graphs:
                self.mixed_graphs[(bucket, None)] = self._capture_mixed(bucket, None)

    def _graph_context(self, bucket: int, lora_meta, mode: str | None) -> StepContext:
        s = self.static
        ctx = StepContext(positions=s["positions"][:bucket], slot_mapping=s["slot_mapping"][:bucket],
                          paged=PagedAttentionMeta(s["block_tables"][:bucket], s["context_lens"][:bucket],
                                                   s["query_start"][:bucket + 1], 1, self.blocks.block_size),
                          fused_layer_ops=self.fused_layer_ops)
        if lora_meta is not None:
            ctx.lora, ctx.lora_meta = self.ops, lora_meta
        if mode is not None:
            ctx.merged_rows, ctx.all_merged = s["merged_rows"][:bucket], mode == "all"
        return ctx

    def _capture(self, bucket: int, lora_meta, mode: str | None) -> _DecodeGraph:
        return self._capture_graph(self.static["input_ids"][:bucket], self._graph_context(bucket, lora_meta, mode))

    def _capture_graph(self, ids: torch.Tensor, ctx: StepContext, out: torch.Tensor | None = None) -> _DecodeGraph:
        """A graph of the model on these fixed inputs (all graphs share one memory pool); its logits are the
        model's own output, or copied into `out`."""
        self.base.model(ids, ctx)  # warm-up: compiles kernels; writes the same K/V the replay will
        torch.cuda.synchronize(self.device)
        graph = torch.cuda.CUDAGraph()
        # thread_local: HTTP threads pin adapter buffers and the merge thread runs kernels meanwhile
        with torch.cuda.graph(graph, pool=self.graph_pool, capture_error_mode="thread_local"):
            logits = self.base.model(ids, ctx)
            if out is not None:
                logits = out.copy_(logits)
        if self.graph_pool is None:
            self.graph_pool = graph.pool()
        return _DecodeGraph(graph, logits)

    @torch.inference_mode()
    def capture_base_graphs(self) -> None:
        """Capture the base-only decode graph of every batch bucket now (at start-up), on dummy rows
        that write into the spare block; adapter and merged variants are captured on first use."""
        if not self.use_graphs:
            return
        self.rows64.zero_()
        self.rows64[2].fill_(self.spare_slot)
        self.static["block_tables"].fill_(self.blocks.num_blocks)  # the spare block
        self.static["context_lens"].fill_(1)
        for bucket in self.buckets:
            key = (bucket, None, None, None)
            if key not in self.graphs:
                self.graphs[key] = self._capture(bucket, None, None)

    def largest_batch_within(self, seconds: float) -> int:
        """The largest graph batch size whose base decode step (captured, replayed on the dummy rows of
        capture_base_graphs) takes at most `seconds` of GPU time; the buckets above it are dropped."""
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        for bucket in reversed(self.buckets):
            graph = self.graphs[(bucket, None, None, None)].graph
            graph.replay()  # warm
            start.record()
            for _ in range(3):
                graph.replay()
            end.record()
            end.synchronize()
            if start.elapsed_time(end) / 3e3 <= seconds or bucket == self.buckets[0]:
                break
            log.warning("a decode step of %d rows takes %.1f ms, over the %.0f ms step target: fewer rows",
                        bucket, start.elapsed_time(end) / 3, seconds * 1e3)
        self.buckets = [b for b in self.buckets if b <= bucket]
        self.graphs = {k: g for k, g in self.graphs.items() if k[0] <= bucket}
        return bucket

    def drop_graphs(self, merged_only: bool = False) -> None:
        """Forget captured graphs (all, or those that use the merged weights: decode graphs only)."""
        self.graphs = {k: g for k, g in self.graphs.items() if merged_only and k[2] is None}
        if not merged_only:
            self.mixed_graphs = {}
        self.uncapturable = set()  # memory freed: a capture that failed may fit now
