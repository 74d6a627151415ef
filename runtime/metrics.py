"""Prometheus metrics: requests, tokens and latencies per adapter, rejections, engine gauges, the process.

Coupling to the rest of the server, all of it:
- `stats`: a callable returning the engine's `stats()` dict, read once per scrape (KV blocks, adapter
  memory, adapter loads and evictions, queue lengths) by `EngineCollector`;
- `on_finish(seq)`: the engine's one metrics hook. Whoever builds both wires it:
  `engine.on_finish = metrics.on_finish`. It runs on the engine thread, reads only the Sequence's
  timestamps and counts, and never raises into the engine;
- `rejected(status, transport)`: called by a transport for every request it refuses;
- `forget_adapter(adapter_id, version)`: called after a delete; removes that adapter's series.
"""
from __future__ import annotations

import logging
import time
from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Histogram, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from .sequence import Sequence

log = logging.getLogger("loraplex.metrics")

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
INTER_TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.15, 0.3, 0.6, 1.2, 2.5, 5)
BASE_LABEL = "base"  # the adapter label of requests on the base model

# engine stats() key -> (metric name, help); gauges are levels, counters only grow
ENGINE_GAUGES = {
    "running": ("loraplex_running", "Requests in the running batch"),
    "waiting": ("loraplex_waiting", "Requests waiting for admission"),
    "kv_blocks_used": ("loraplex_kv_blocks_used", "KV-cache blocks in use"),
    "kv_blocks_total": ("loraplex_kv_blocks_total", "KV-cache blocks in all"),
    "resident_adapters": ("loraplex_resident_adapters", "Adapters in accelerator slots"),
    "adapter_memory_bytes_used": ("loraplex_adapter_memory_used_bytes", "Accelerator memory held by adapters"),
    "adapter_memory_bytes_total": ("loraplex_adapter_memory_total_bytes", "Accelerator memory set aside for adapters"),
    "kv_blocks_cached": ("loraplex_kv_blocks_cached", "KV-cache blocks registered in the prefix cache"),
    "prefix_cache_hit_rate": ("loraplex_prefix_cache_hit_rate", "Prompt blocks reused / prompt blocks looked up"),
}
ENGINE_COUNTERS = {
    "adapter_loads": ("loraplex_adapter_loads", "Adapter loads into accelerator slots"),
    "adapter_evictions": ("loraplex_adapter_evictions", "Adapters evicted from accelerator slots"),
    "prefix_cache_queried_blocks": ("loraplex_prefix_cache_queried_blocks", "Full prompt blocks looked up in the prefix cache"),
    "prefix_cache_hit_blocks": ("loraplex_prefix_cache_hit_blocks", "Prompt blocks served from the prefix cache"),
    "prefix_cache_evictions": ("loraplex_prefix_cache_evictions", "Cached KV blocks evicted to make room"),
}


class EngineCollector(Collector):
    """The engine's gauges and counters, read from one `stats()` call at scrape time."""

    def __init__(self, stats: Callable[[], dict]):
        self.stats = stats

    def collect(self):
        stats = self.stats()
        for key, (name, doc) in ENGINE_GAUGES.items():
            if key in stats:
                yield GaugeMetricFamily(name, doc, value=stats[key])
        for key, (name, doc) in ENGINE_COUNTERS.items():
            if key in stats:
                yield CounterMetricFamily(name, doc, value=stats[key])


class Metrics:
    def __init__(self, stats: Callable[[], dict]):
        self.registry = r = CollectorRegistry()
        by_adapter = ["adapter"]
        self.requests = Counter("loraplex_requests", "Finished requests", ["adapter", "finish_reason"], registry=r)
        self.prompt_tokens = Counter("loraplex_prompt_tokens", "Prompt tokens processed", by_adapter, registry=r)
        self.completion_tokens = Counter("loraplex_completion_tokens", "Tokens generated", by_adapter, registry=r)
        self.latency = Histogram("loraplex_request_latency_seconds", "Arrival to finish", by_adapter,
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram("loraplex_time_to_first_token_seconds", "Arrival to first token", by_adapter,
                              buckets=LATENCY_BUCKETS, registry=r)
        # one observation per request: its mean gap, (last token - first token) / (tokens - 1)
        self.inter_token = Histogram("loraplex_inter_token_latency_seconds",
                                     "A request's mean time between two generated tokens",
                                     buckets=INTER_TOKEN_BUCKETS, registry=r)
        self.queue_wait = Histogram("loraplex_queue_wait_seconds", "Arrival to admission into the running batch",
                                    buckets=LATENCY_BUCKETS, registry=r)
        self.rejections = Counter("loraplex_rejected_requests", "Requests refused before reaching the engine",
                                  ["status", "transport"], registry=r)
        self.uploads = Counter("loraplex_adapter_uploads", "Adapter uploads", ["result"], registry=r)
        self._by_adapter = (self.prompt_tokens, self.completion_tokens, self.latency, self.ttft)
        self._deleted: dict[str, int] = {}  # adapter id -> newest deleted version
        self._finish_reasons: dict[str, set[str]] = {}  # adapter id -> finish_reason labels it has
        r.register(EngineCollector(stats))
        ProcessCollector(registry=r)  # process_resident_memory_bytes, process_cpu_seconds_total, process_open_fds

    # -- hooks ------------------------------------------------------------------------------
    def on_finish(self, seq: Sequence) -> None:
        """The engine's hook, called on its thread when a request finishes (any reason)."""
        try:
            self._record(seq, time.monotonic())
        except Exception:  # a metrics bug must never fail the request or the engine
            log.exception("recording metrics for request %s failed", seq.id)

    def rejected(self, status: int | str, transport: str) -> None:
        """A transport refused a request: HTTP status code or gRPC status name; transport 'http' | 'grpc'."""
        self.rejections.labels(str(status), transport).inc()

    def forget_adapter(self, adapter_id: str, version: int) -> None:
        """Remove every series labelled with a deleted adapter. Requests admitted with one of its
        versions (<= version) that finish later are not recorded under its label again."""
        self._deleted[adapter_id] = max(version, self._deleted.get(adapter_id, 0))
        series = [(m, (adapter_id,)) for m in self._by_adapter]
        series += [(self.requests, (adapter_id, reason)) for reason in self._finish_reasons.pop(adapter_id, ())]
        for metric, labels in series:
            try:  # remove(), not remove_by_labels() (prometheus_client >= 0.23 only)
                metric.remove(*labels)
            except KeyError:  # never observed, e.g. no first token
                pass

    def render(self) -> bytes:
        return generate_latest(self.registry)

    # -- recording --------------------------------------------------------------------------
    def _record(self, seq: Sequence, now: float) -> None:
        if seq.admitted_at is not None:
            self.queue_wait.observe(seq.admitted_at - seq.arrival)
        if seq.first_token_at is not None and seq.num_completion_tokens > 1:
            self.inter_token.observe((seq.last_token_at - seq.first_token_at) / (seq.num_completion_tokens - 1))
        adapter = seq.adapter
        if adapter is not None and adapter.version <= self._deleted.get(adapter.id, 0):
            return  # its series were removed: a late finish must not bring them back
        label = BASE_LABEL if adapter is None else adapter.id
        reason = seq.finish_reason or "unknown"
        self._finish_reasons.setdefault(label, set()).add(reason)
        self.requests.labels(label, reason).inc()
        self.prompt_tokens.labels(label).inc(seq.num_prompt_tokens)
        self.completion_tokens.labels(label).inc(seq.num_completion_tokens)
        self.latency.labels(label).observe(now - seq.arrival)
        if seq.first_token_at is not None:
            self.ttft.labels(label).observe(seq.first_token_at - seq.arrival)
