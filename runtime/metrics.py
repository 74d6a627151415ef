"""Prometheus metrics: requests, tokens, latencies, per-adapter counters and engine gauges."""
from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from .sequence import Sequence

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class Metrics:
    def __init__(self, engine):
        self.registry = r = CollectorRegistry()
        self.requests = Counter("loraplex_requests", "Finished requests", ["adapter", "finish_reason"], registry=r)
        self.prompt_tokens = Counter("loraplex_prompt_tokens", "Prompt tokens processed", ["adapter"], registry=r)
        self.completion_tokens = Counter("loraplex_completion_tokens", "Tokens generated", ["adapter"], registry=r)
        self.latency = Histogram("loraplex_request_latency_seconds", "Arrival to finish", buckets=LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram("loraplex_time_to_first_token_seconds", "Arrival to first token", buckets=LATENCY_BUCKETS, registry=r)
        self.uploads = Counter("loraplex_adapter_uploads", "Adapter uploads", ["result"], registry=r)
        gauges = {"running": "Requests in the running batch", "waiting": "Requests waiting for admission",
                  "kv_blocks_used": "KV-cache blocks in use", "resident_adapters": "Adapters in accelerator slots"}
        for name, doc in gauges.items():
            Gauge(f"loraplex_{name}", doc, registry=r).set_function(lambda name=name: engine.stats()[name])
        engine.on_finish = self.record

    def record(self, seq: Sequence) -> None:
        adapter = seq.adapter.id if seq.adapter is not None else "base"
        now = time.monotonic()
        self.requests.labels(adapter, seq.finish_reason or "unknown").inc()
        self.prompt_tokens.labels(adapter).inc(seq.num_prompt_tokens)
        self.completion_tokens.labels(adapter).inc(seq.num_completion_tokens)
        self.latency.observe(now - seq.arrival)
        if seq.first_token_at is not None:
            self.ttft.observe(seq.first_token_at - seq.arrival)

    def render(self) -> bytes:
        return generate_latest(self.registry)
