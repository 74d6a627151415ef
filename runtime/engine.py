"""The engine: one thread running schedule → model → sample → postprocess, fed by a thread-safe inbox.

Transports call `submit` / `abort` from any thread; outputs go back through each request's `emit`
callback (called on the engine thread: it must only hand the output over, never block).

Failures are contained to the request they belong to: `check` refuses bad parameters up front
(RequestError); a row whose logits are not finite (e.g. an adapter whose deltas overflow) ends
that request alone with an error, and so does a token that a row's response_format grammar refuses;
an `emit` callback that raises ends that request alone. Any other exception in the loop is a bug
the engine cannot reason about: the engine is then dead —
`alive` turns False, `error` holds the reason (both in `stats()`), every request in flight ends
with that error and `submit` raises EngineDead. The server must treat a dead engine as fatal
(health not ok, process exits); it never comes back to life.
"""
from __future__ import annotations

import logging
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable

import torch

from .adapters.registry import ADAPTER_HOST_WORK, AdapterRef
from .adapters.slots import LOADING, AdapterSlots
from .base_model import BaseModel
from .block_manager import BlockManager
from .detokenizer import Detokenizer, find_stop, releasable_text
from .gc_timer import gc_timer
from .merged import Merger
from .memory_budget import (DEFAULT_ADAPTER_SLOTS, adapter_memory_bytes, default_max_num_seqs, kv_cache_tokens,
                            make_ops)
from .model_runner import MIXED_QUANTUM, ModelRunner
from .prefill_budget import PrefillBudget
from .sampler import grammar_bitmask, sample_on_device, token_logprobs
from .scheduler import Scheduler
from .sequence import SamplingParams, Sequence, SeqStatus, StepOutput
from .structured import GrammarError, Grammars

log = logging.getLogger("loraplex.engine")


@dataclass
class EngineConfig:
    max_gpu_adapters: int | None = None  # optional cap on resident adapters; memory is set by adapter_memory
    adapter_memory: float | None = None  # bytes (> 1) or a fraction of the memory free after weights and KV
    max_num_seqs: int | None = None  # None: 64 on the CPU, sized from the KV cache on CUDA (memory_budget.py)
    max_batched_tokens: int = 2048
    kv_cache_tokens: int | None = None  # None: sized from the device's free memory (CUDA) or 32k tokens
    block_size: int = 16
    adapter_ops: str = "auto"  # auto | torch | triton
    cuda_graphs: bool = True  # decode steps replay CUDA graphs (CUDA only)
    merge_policy: str = "off"  # off | auto | an adapter id (see merged.py)
    merge_format: str = "auto"  # bf16 | nf4 | auto (= bf16): the merged copy's format
    # While decode rows run, a step's prefill chunk is capped so a long prompt cannot stall the streams,
    # sized from measured cost to keep such a step near max_step_seconds (prefill_budget.py)
    max_step_seconds: float | None = None  # None: 0.25 s on the CPU, 0.05 s on CUDA
    prefill_chunk_tokens: int = 512  # the cap until the first measurement; on CUDA also its least value
    prefix_caching: bool = True  # share computed prompt blocks between requests (block_manager.py)
    # adapters a mixed CUDA-graph step may fold into its NF4 prefill matmuls (kernels/lora_fold.py; Triton ops); None:
    # the ops' default_fold_blocks (the measured choice, see kernels/lora_fold.py), 0 without it
    fold_prefill_adapters: int | None = None


class RequestError(ValueError):
    """A request the engine cannot serve (too long, bad parameters)."""


class EngineDead(RuntimeError):
    """The engine thread died (see Engine.error); no request can be served any more."""


MERGE_REPORT_ROWS = (1, 2, 4, 8, 16, 32, 48, 64)  # batch sizes /health reports the merge decision for
GIL_SWITCH_SECONDS = 0.001  # sys.setswitchinterval while an engine runs (see Engine.start)


def _dense_beats_nf4(rows: int) -> bool:
    from .nf4_linear import dense_faster  # bitsandbytes: imported only for an NF4 base
    return dense_faster(rows) is True


class Engine:
    def __init__(self, base: BaseModel, config: EngineConfig | None = None):
        self.base = base
        self.config = config = config or EngineConfig()
        tokens = kv_cache_tokens(base, config.kv_cache_tokens)
        self.blocks = BlockManager(tokens // config.block_size, config.block_size, config.prefix_caching)
        self.max_num_seqs = config.max_num_seqs or default_max_num_seqs(base, tokens)
        self.prefill_budget = PrefillBudget(base.device.type, config.prefill_chunk_tokens, config.max_batched_tokens,
                                            config.max_step_seconds)
        # KV first (the runner allocates it), then the adapter pool from what is left
        self.runner = ModelRunner(base, self.blocks, None, cuda_graphs=config.cuda_graphs,
                                  max_graph_batch=self.max_num_seqs, max_graph_tokens=config.max_batched_tokens)
        adapter_bytes = adapter_memory_bytes(base, config.adapter_memory)
        num_slots = config.max_gpu_adapters or DEFAULT_ADAPTER_SLOTS
        self.ops = make_ops(config.adapter_ops, base, num_slots, adapter_bytes)
        fold = config.fold_prefill_adapters
        if fold is None:
            fold = getattr(self.ops, "default_fold_blocks", 0)
        elif fold and not hasattr(self.ops, "set_fold_blocks"):
            raise ValueError("--fold-prefill-adapters needs the Triton adapter ops")
        if fold:
            self.ops.set_fold_blocks(fold)
        self.runner.attach_ops(self.ops)
        self.slots = AdapterSlots(self.ops, adapter_bytes, config.max_gpu_adapters)
        merge_format = "bf16" if config.merge_format == "auto" else config.merge_format
        self.merger = Merger(base.model, base.projection_shapes, config.merge_policy, merge_format, base.dtype)
        # A re-quantised NF4 copy moves the logits by up to 0.6 (relative; bench/profile_step.py), so the
        # merged copy of an NF4 base is bf16: it reads 4x the bytes, and pays only where the start-up
        # timing says a dense matmul beats the NF4 kernels at the batch size (H200: it does at 32 rows,
        # bench/results/serve_gpu.json; H100, earlier kernels: it did not). Not calibrated: never.
        if base.quantization == "nf4" and merge_format == "bf16":
            self.merger.merge_pays = _dense_beats_nf4
        self.runner.capture_base_graphs()
        self.runner.capture_mixed_graphs()
        if config.max_num_seqs is None and self.runner.use_graphs:  # the KV-sized default, if a step keeps pace
            self.max_num_seqs = self.runner.largest_batch_within(self.max_step_seconds)
        self.detokenizer = Detokenizer(base.tokenizer)
        self.grammars = Grammars(base.tokenizer, base.config.vocab_size, list(base.eos_token_ids))
        self.scheduler = Scheduler(self.blocks, self.slots, max_num_seqs=self.max_num_seqs,
                                   max_batched_tokens=config.max_batched_tokens)
        self.scheduler.prefill_budget = self.prefill_budget.tokens  # replaced once measured
        if self.runner.use_graphs:  # a step's tokens fill its mixed graph's bucket (no padding computed)
            self.scheduler.token_quantum = MIXED_QUANTUM
        self.max_model_len = min(getattr(base.config, "max_position_embeddings", 1 << 30),
                                 self.blocks.num_blocks * config.block_size)
        self._inbox: deque[Sequence] = deque()
        self._aborts: deque[int] = deque()
        self._submit_lock = threading.Lock()  # submit vs. death: no request is queued after the last drain
        self.alive = True
        self.error: str | None = None  # why the engine died
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._stop = False
        self._by_id: dict[int, Sequence] = {}
        self._pending: list[tuple[Sequence, int]] = []  # rows of the last step whose token is not yet settled
        self.reset_counters()
        self.warm_up_seconds = 0.0  # set by warm_up.py
        self.on_finish: Callable[[Sequence], None] | None = None  # metrics hook

    @property
    def max_step_seconds(self) -> float:
        """The step-time target of a step that prefills beside decode rows (and of the largest decode batch)."""
        return self.prefill_budget.target_seconds

    def reset_counters(self) -> None:
        """Zero the step counters (at start, and after the warm-up)."""
        self.steps = 0
        self.tokens_generated = 0
        self.decode_steps = 0
        self.decode_seconds = 0.0
        self.decode_rows = 0
        self.decode_context_tokens = 0
        self.prefill_steps = 0
        # where the loop's wall time goes (with decode_seconds): steps with prompt tokens, the per-token work
        # after sampling (grammar, detokenizer, stop checks, handing outputs over), waiting for work
        self.prefill_seconds = 0.0
        self.bookkeeping_seconds = 0.0
        self.idle_seconds = 0.0
        # of decode_seconds + prefill_seconds: blocked on the device for a step's tokens (near 0: the host
        # is the bottleneck and the GPU waits for it; most of the step: the GPU is)
        self.device_wait_seconds = 0.0
        self.runner.graph_steps, self.runner.graph_gpu_seconds, self.runner.mixed_gpu_seconds = 0, 0.0, 0.0
        self.runner.folded_steps = 0
        self.slots.loads = self.slots.evictions = 0

    # -- called from any thread -------------------------------------------------------------
    def check(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        try:
            params.validate(self.base.config.vocab_size)
        except ValueError as e:
            raise RequestError(str(e)) from None
        if not isinstance(prompt_token_ids, list) or not prompt_token_ids:
            raise RequestError("the prompt is empty")
        if any(not isinstance(t, int) or isinstance(t, bool) for t in prompt_token_ids):
            raise RequestError("prompt token ids must be integers")
        if len(prompt_token_ids) + params.max_tokens > self.max_model_len:
            raise RequestError(f"prompt ({len(prompt_token_ids)} tokens) + max_tokens ({params.max_tokens}) exceeds "
                               f"the model's context of {self.max_model_len} tokens")
        vocab = self.base.config.vocab_size
        if any(not 0 <= t < vocab for t in prompt_token_ids):
            raise RequestError(f"prompt token ids must lie in [0, {vocab})")
        if params.response_format is not None:  # compiles on the caller's thread (cached): never on the loop's
            try:
                self.grammars.compile(params.response_format)
            except GrammarError as e:
                raise RequestError(str(e)) from None

    def submit(self, prompt_token_ids: list[int], params: SamplingParams, adapter: AdapterRef | None,
               emit: Callable[[StepOutput], None]) -> int:
        self.check(prompt_token_ids, params)
        seq = Sequence(prompt_token_ids, params, adapter, emit)
        seq.eos_token_ids = frozenset(self.base.eos_token_ids)
        if params.response_format is not None:
            seq.matcher = self.grammars.matcher(params.response_format)  # compiled by check: a cache hit
        with self._submit_lock:
            if not self.alive:
                raise EngineDead(f"the engine is dead: {self.error}")
            self._by_id[seq.id] = seq  # from here on an abort finds it, wherever it is
            self._inbox.append(seq)
        self._wake.set()
        return seq.id

    def abort(self, request_id: int) -> None:
        """End a request (reason "abort") at the engine's next iteration: in the inbox, waiting or running."""
        self._aborts.append(request_id)
        self._wake.set()

    @property
    def running(self) -> int:
        """Sequences the engine has started and not finished (stats()["running"], without building the rest: the
        service asks on every request's admission)."""
        return len(self.scheduler.running)

    def stats(self) -> dict:
        return {"alive": self.alive, "error": self.error, "running": self.running, "waiting": len(self.scheduler.waiting),
                "kv_blocks_total": self.blocks.num_blocks, "kv_blocks_used": self.blocks.num_used,
                "kv_block_size": self.blocks.block_size, "kv_blocks_cached": self.blocks.num_cached,
                "prefix_caching": self.blocks.prefix_caching,
                "prefix_cache_queried_blocks": self.blocks.queried_blocks,
                "prefix_cache_hit_blocks": self.blocks.hit_blocks, "prefix_cache_hit_rate": self.blocks.hit_rate,
                "prefix_cache_evictions": self.blocks.evictions, "resident_adapters": len(self.slots.resident),
                "pinned_adapters": self.slots.pinned,
                "adapter_slots": self.slots.capacity, "adapter_ops": self.ops.name, "steps": self.steps,
                "tokens_generated": self.tokens_generated,
                "adapter_memory_bytes_total": self.slots.capacity_bytes,
                "adapter_memory_bytes_used": self.slots.used_bytes,
                "adapter_loads": self.slots.loads, "adapter_evictions": self.slots.evictions,
                "decode_steps": self.decode_steps, "decode_seconds": self.decode_seconds,
                "decode_rows": self.decode_rows, "decode_context_tokens": self.decode_context_tokens,
                "prefill_steps": self.prefill_steps, "graph_steps": self.runner.graph_steps,
                "graph_gpu_seconds": self.runner.graph_gpu_seconds, "mixed_gpu_seconds": self.runner.mixed_gpu_seconds,
                "folded_steps": self.runner.folded_steps, "fold_blocks": getattr(self.ops, "fold_blocks", 0),
                "prefill_seconds": self.prefill_seconds,
                "bookkeeping_seconds": self.bookkeeping_seconds, "idle_seconds": self.idle_seconds,
                "device_wait_seconds": self.device_wait_seconds,
                "gc_seconds": gc_timer.seconds, "gc_full_collections": gc_timer.full_collections,
                "cuda_graphs": len(self.runner.graphs) + len(self.runner.mixed_graphs), "max_num_seqs": self.max_num_seqs,
                "prefill_budget": self.scheduler.prefill_budget, "max_step_seconds": self.max_step_seconds,
                "prefill_seconds_per_token": self.prefill_budget.seconds_per_token,
                "warm_up_seconds": self.warm_up_seconds, "merge_policy": self.merger.policy,
                "merged_adapter": None if self.merger.active is None else self.merger.active.id,
                "merged_bytes": self.merger.merged_bytes,
                "merged_steps": self.merger.merged_steps,
                "merge_pays_rows": [m for m in MERGE_REPORT_ROWS if self.merger.merge_pays(m)],
                "nf4_calibration_us": self._nf4_calibration(), "nf4_dequant_us": self._nf4_dequant()}

    def _nf4_calibration(self) -> dict | None:
        """The start-up timing of an NF4 base on CUDA: {"OUTxIN": {rows: [NF4 path us, dense bf16 us]}}."""
        if self.base.quantization != "nf4" or self.base.device.type != "cuda":
            return None
        from .nf4_linear import DENSE_US, NF4_US
        return {f"{o}x{i}": {m: [us, DENSE_US.get((o, i), {}).get(m)] for m, us in rows.items()}
                for (o, i), rows in NF4_US.items()}

    def _nf4_dequant(self) -> dict | None:
        """Start-up timing of prefill's whole-weight dequantisation: {"OUTxIN": {"triton": us, "bitsandbytes": us}}."""
        if self.base.quantization != "nf4" or self.base.device.type != "cuda":
            return None
        from .nf4_linear import DEQUANT_US
        return {f"{o}x{i}": times for (o, i), times in DEQUANT_US.items()}

    def prepare_adapter(self, ref: AdapterRef) -> None:
        """Host-side work for loading ref later (packing, pinned memory): call off the engine thread. Each adapter
        under its own lock: a request and the packing after an upload never pack the same adapter twice. The packing
        itself runs one adapter at a time in the process (ADAPTER_HOST_WORK: it is mostly Python, which only
        crowds the engine thread's GIL when several run at once); an adapter already packed returns at once."""
        with ref.weights.pack_lock:
            if not self.ops.prepared(ref.weights):
                with ADAPTER_HOST_WORK:  # one adapter's Python-heavy host work at a time (adapters/registry.py)
                    self.ops.prepare(ref.weights)

    def prepared(self, weights) -> bool:
        """Whether prepare_adapter has nothing left to do for these weights (no packing to wait for)."""
        return self.ops.prepared(weights)

    def start(self) -> None:
        # Each step gives the GIL up while it waits for the GPU; taking it back waits until a thread running Python
        # (an adapter being parsed or packed, the HTTP loop) is told to drop it: by default after 5 ms. 1 ms keeps
        # that wait under the step's own host time.
        sys.setswitchinterval(min(sys.getswitchinterval(), GIL_SWITCH_SECONDS))
        self._thread = threading.Thread(target=self._loop, name="loraplex-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    # -- engine thread ----------------------------------------------------------------------
    def _loop(self) -> None:
        try:
            while not self._stop:
                self._drain_inbox()
                if not self.scheduler.has_work():
                    self.flush()
                if not self.scheduler.has_work():
                    waited = time.perf_counter()
                    self._wake.wait(timeout=0.5)
                    self._wake.clear()
                    self.idle_seconds += time.perf_counter() - waited
                    continue
                self.step()
        except Exception as e:  # not attributable to one request: the engine's state is unknown
            log.exception("engine thread died")
            self._die(f"{type(e).__name__}: {e}")

    def _die(self, reason: str) -> None:
        with self._submit_lock:
            self.alive, self.error = False, reason
        for seq in list(self._by_id.values()):
            try:
                self._finish(seq, "error", error=f"engine error: {reason}")
            except Exception:  # the scheduler's state may be what broke: still tell the client
                self._by_id.pop(seq.id, None)
                self._emit(seq, StepOutput(seq.id, "", [], True, "error", seq.num_prompt_tokens,
                                           seq.num_completion_tokens, f"engine error: {reason}"))
        self._inbox.clear()

    def _drain_inbox(self) -> None:
        while self._inbox:
            seq = self._inbox.popleft()
            if seq.status is not SeqStatus.FINISHED:  # not aborted while in the inbox
                self.scheduler.add(seq)
        while self._aborts:
            seq = self._by_id.get(self._aborts.popleft())
            if seq is not None and seq.status is not SeqStatus.FINISHED:
                self._finish(seq, "abort")

    def _emit(self, seq: Sequence, out: StepOutput) -> bool:
        """Hand an output to its request's consumer; a consumer that raises ends its own request only."""
        try:
            seq.emit(out)
            return True
        except Exception:
            log.exception("emit of request %d failed; ending that request", seq.id)
            if not out.finished:
                self._finish(seq, "error", error="the request's output consumer failed", notify=False)
            return False

    def _merged_rows(self, batch: list[tuple[Sequence, int]]) -> set[int] | None:
        """Rows of a decode step that the merged weights compute (see merged.py)."""
        ref, changed = self.merger.choose([seq.adapter for seq, _ in batch])
        if changed:
            self.runner.merged_key = None if self.merger.active is None else self.merger.active.key
            self.runner.drop_graphs(merged_only=True)
        if ref is None:
            return None
        return {i for i, (seq, _) in enumerate(batch) if seq.adapter is not None and seq.adapter.key == ref.key}

    def step(self) -> None:
        """One engine step. The previous step's per-token host work for rows that go on (detokenising, stop
        strings, handing outputs over) runs after this step's launch, while the GPU computes it; rows that
        end (end of sequence, length, errors) are settled before the next schedule, so the scheduler never
        gives them another step. A row that a stop string (or its consumer's failure) ends during that
        overlap was already launched once more: that token is dropped."""
        started = time.perf_counter()
        batch = self.scheduler.schedule()
        if not batch:
            self.flush()
            time.sleep(0.001)  # everything waits for adapter slots or KV blocks held by finishing requests
            self.idle_seconds += time.perf_counter() - started
            return
        decode = all(n == 1 for _, n in batch)
        merged = self._merged_rows(batch) if decode else None
        prefill_tokens = sum(n for _, n in batch if n > 1)
        run_started = time.perf_counter()
        logits = self.runner.run(batch, merged=merged)
        ready = [seq for seq, _ in batch if seq.num_computed == len(seq)]  # one logits row each, in order
        for seq, n in batch:
            self.blocks.cache_computed(seq, n)
        self.flush()  # host work of the last step while the GPU runs this one (may finish rows of this batch)
        bitmask = grammar_bitmask(ready, logits.shape[1])  # host work while the GPU still runs the step
        chosen = sample_on_device(logits, ready, bitmask)
        waiting = time.perf_counter()
        tokens = chosen.tolist()  # the step's one device->host copy: waits for the GPU
        self.device_wait_seconds += time.perf_counter() - waiting
        logprobs = token_logprobs(logits, ready, tokens)  # a second one, only when a row asks for logprobs
        self.steps += 1
        sampled = time.perf_counter()
        if ready or self.base.device.type == "cpu":  # a step that samples nothing has not synchronised
            self.scheduler.prefill_budget = self.prefill_budget.measure(prefill_tokens, sampled - run_started)
        if decode:
            self.decode_steps += 1
            self.decode_seconds += sampled - started
            self.decode_rows += len(batch)
            self.decode_context_tokens += sum(seq.num_computed for seq, _ in batch)
        else:
            self.prefill_steps += 1
            self.prefill_seconds += sampled - started
        ending = []
        for seq, token, logprob in zip(ready, tokens, logprobs):
            if seq.status is SeqStatus.FINISHED:  # ended during the overlap: this token is not its
                continue
            if token < 0:  # the sampler's mark for a row whose logits were NaN/inf: fail this request alone
                # its NaN/inf K/V must reach neither the prefix cache nor the block's next owner
                self.runner.clear_kv(self.blocks.uncache(seq))
                self._finish(seq, "error", error="the model produced non-finite logits (NaN or inf) for this request")
            elif seq.matcher is not None and not seq.matcher.accept_token(token):
                self._finish(seq, "error", error="no token the response_format grammar allows could be sampled")
            else:
                previous_len = len(seq.text)
                seq.token_ids.append(token)
                if logprob is not None:
                    seq.logprobs.append(logprob)
                (ending if self._ends_here(seq) else self._pending).append((seq, previous_len))
        self._settle(ending)
        self.bookkeeping_seconds += time.perf_counter() - sampled

    def _ends_here(self, seq: Sequence) -> bool:
        """Whether seq's newest token ends it whatever its text says: such rows are settled before the next
        schedule."""
        return self._token_end_reason(seq) is not None

    def _token_end_reason(self, seq: Sequence) -> str | None:
        """Why seq's newest token ends it, text aside: end of sequence or a stop token ("stop"; the sampler
        masked both while fewer than min_tokens were generated), a grammar that allows nothing more ("stop"),
        or length."""
        token = seq.token_ids[-1]
        if token in seq.params.stop_token_ids or (token in self.base.eos_token_ids and not seq.params.ignore_eos):
            return "stop"
        if seq.matcher is not None and seq.matcher.is_terminated():
            return "stop"
        if seq.num_completion_tokens >= seq.params.max_tokens or len(seq) >= self.max_model_len:
            return "length"
        return None

    def _settle(self, rows: list[tuple[Sequence, int]]) -> None:
        """Detokenise the newest token of these rows, then stop checks and hand-over (or finish)."""
        if rows:
            self.detokenizer.append([seq for seq, _ in rows])
            for seq, previous_len in rows:
                self._after_token(seq, previous_len)

    def flush(self) -> None:
        """Settle the rows that went on after the last step (see step)."""
        started = time.perf_counter()
        rows, self._pending = self._pending, []
        self._settle([(seq, n) for seq, n in rows if seq.status is not SeqStatus.FINISHED])
        self.bookkeeping_seconds += time.perf_counter() - started

    def _after_token(self, seq: Sequence, previous_len: int) -> None:
        """Stop strings, end of sequence, length; then emit the new text or finish."""
        token = seq.token_ids[-1]
        self.tokens_generated += 1
        seq.last_token_at = time.monotonic()
        if seq.first_token_at is None:
            seq.first_token_at = seq.last_token_at
        stop_at = find_stop(seq, previous_len) if seq.num_completion_tokens >= seq.params.min_tokens else None
        if stop_at is not None:
            seq.text = seq.text[:stop_at]
        reason = "stop" if stop_at is not None else self._token_end_reason(seq)
        if reason is not None:
            self._finish(seq, reason, last_token=token)
        else:
            self._emit(seq, StepOutput(seq.id, releasable_text(seq, False), [token], False, None,
                                       seq.num_prompt_tokens, seq.num_completion_tokens,
                                       logprobs=seq.logprobs[-1:] if seq.params.logprobs is not None else None))

    def _finish(self, seq: Sequence, reason: str, last_token: int | None = None, error: str | None = None,
                notify: bool = True) -> None:
        self.scheduler.finish(seq, reason)
        self._by_id.pop(seq.id, None)
        if self.on_finish is not None:
            try:
                self.on_finish(seq)
            except Exception:  # a metrics hook must not take the engine down
                log.exception("on_finish hook failed for request %d", seq.id)
        if notify:
            logprobs = None
            if seq.params.logprobs is not None:
                logprobs = seq.logprobs[-1:] if last_token is not None else []
            self._emit(seq, StepOutput(seq.id, releasable_text(seq, True), [] if last_token is None else [last_token],
                                       True, reason, seq.num_prompt_tokens, seq.num_completion_tokens, error, logprobs))

    # -- synchronous helpers (tests, benchmarks) ---------------------------------------------
    def generate(self, requests: list[tuple[list[int], SamplingParams, AdapterRef | None]]) -> list[list[StepOutput]]:
        """Run requests to completion in one continuous batch; with the loop thread started or not."""
        results: list[list[StepOutput]] = [[] for _ in requests]
        done = threading.Semaphore(0)

        def collector(i):
            def emit(out: StepOutput):
                results[i].append(out)
                if out.finished:
                    done.release()
            return emit

        for i, (ids, params, adapter) in enumerate(requests):
            self.submit(ids, params, adapter, collector(i))
        if self._thread is None:
            self._drain_inbox()
            while self.scheduler.has_work():
                self.step()
                self._drain_inbox()
            self.flush()
        for _ in requests:
            done.acquire()
        return results

    @torch.inference_mode()
    def score(self, requests: list[tuple[list[int], AdapterRef | None]]) -> list[torch.Tensor]:
        """Logits of every position of every request, all computed in ONE mixed batch (tests).
        Only while the loop thread is not running."""
        assert self._thread is None, "score() runs without the engine thread"
        seqs = [Sequence(ids, SamplingParams(max_tokens=1, temperature=0.0), ref, lambda out: None)
                for ids, ref in requests]
        batch = []
        for seq in seqs:
            if seq.adapter is not None:
                seq.adapter_slot = self.slots.acquire(seq.adapter)
                while seq.adapter_slot == LOADING:
                    torch.cuda.synchronize(self.base.device)
                    seq.adapter_slot = self.slots.acquire(seq.adapter)
                assert seq.adapter_slot is not None, "more distinct adapters than slots"
            self.blocks.allocate(seq, len(seq))
            batch.append((seq, len(seq)))
        try:
            logits = self.runner.run(batch, all_logits=True)
        finally:
            for seq in seqs:
                self.blocks.free(seq)
                if seq.adapter is not None:
                    self.slots.release(seq.adapter)
        return list(logits.split([len(s) for s in seqs]))
