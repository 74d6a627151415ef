"""Metrics at unit level: a fake engine's stats and fake finished Sequences, read back from the exposition."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
from prometheus_client.parser import text_string_to_metric_families

from loraplex.runtime.adapters.registry import AdapterRef
from loraplex.runtime.metrics import Metrics
from loraplex.runtime.sequence import SamplingParams, Sequence

STATS = {"running": 2, "waiting": 3, "kv_blocks_total": 100, "kv_blocks_used": 7, "resident_adapters": 1,
         "adapter_memory_bytes_total": 4096, "adapter_memory_bytes_used": 1024, "adapter_loads": 5,
         "adapter_evictions": 2, "adapter_ops": "torch"}


def samples(metrics: Metrics) -> dict[tuple[str, tuple], float]:
    text = metrics.render().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(metrics: Metrics, name: str, **labels) -> float | None:
    return samples(metrics).get((name, tuple(sorted(labels.items()))))


def names(metrics: Metrics) -> set[str]:
    return {name for name, _ in samples(metrics)}


def finished(adapter: AdapterRef | None, *, arrival: float, first: float | None, completion: int,
             reason: str = "length", **timestamps) -> Sequence:
    """A real Sequence as the engine leaves it at finish, with chosen timestamps."""
    seq = Sequence([1, 2, 3], SamplingParams(max_tokens=completion), adapter, lambda out: None)
    seq.token_ids += [4] * completion
    seq.arrival, seq.first_token_at, seq.finish_reason = arrival, first, reason
    seq.last_token_at = first  # as the engine leaves it after one token; later ones set it explicitly
    for name, t in timestamps.items():
        setattr(seq, name, t)
    return seq


def ref(adapter_id: str, version: int = 1) -> AdapterRef:
    return AdapterRef(adapter_id, version, weights=None)


@pytest.fixture
def clock(monkeypatch):
    now = SimpleNamespace(t=100.0)
    monkeypatch.setattr("loraplex.runtime.metrics.time.monotonic", lambda: now.t)
    return now


def test_engine_gauges_and_counters_are_read_at_scrape_time():
    stats = dict(STATS)
    m = Metrics(lambda: stats)
    assert value(m, "loraplex_kv_blocks_used") == 7 and value(m, "loraplex_kv_blocks_total") == 100
    assert value(m, "loraplex_adapter_memory_used_bytes") == 1024
    assert value(m, "loraplex_adapter_memory_total_bytes") == 4096
    assert value(m, "loraplex_adapter_loads_total") == 5 and value(m, "loraplex_adapter_evictions_total") == 2
    assert value(m, "loraplex_running") == 2 and value(m, "loraplex_waiting") == 3
    stats.update(kv_blocks_used=0, adapter_loads=9)
    assert value(m, "loraplex_kv_blocks_used") == 0 and value(m, "loraplex_adapter_loads_total") == 9


def test_process_metrics_are_on_our_registry():
    m = Metrics(lambda: STATS)
    assert {"process_resident_memory_bytes", "process_cpu_seconds_total", "process_open_fds"} <= names(m)
    assert value(m, "process_resident_memory_bytes") > 0


def test_latency_and_ttft_by_adapter(clock):
    m = Metrics(lambda: STATS)
    clock.t = 100.0
    m.on_finish(finished(ref("a"), arrival=98.0, first=99.5, completion=4))
    m.on_finish(finished(None, arrival=99.9, first=99.95, completion=1, reason="stop"))
    assert value(m, "loraplex_request_latency_seconds_sum", adapter="a") == pytest.approx(2.0)
    assert value(m, "loraplex_request_latency_seconds_count", adapter="a") == 1
    assert value(m, "loraplex_time_to_first_token_seconds_sum", adapter="a") == pytest.approx(1.5)
    assert value(m, "loraplex_time_to_first_token_seconds_bucket", adapter="a", le="1.0") == 0
    assert value(m, "loraplex_time_to_first_token_seconds_bucket", adapter="a", le="2.5") == 1
    assert value(m, "loraplex_time_to_first_token_seconds_sum", adapter="base") == pytest.approx(0.05)
    assert value(m, "loraplex_requests_total", adapter="a", finish_reason="length") == 1
    assert value(m, "loraplex_requests_total", adapter="base", finish_reason="stop") == 1
    assert value(m, "loraplex_completion_tokens_total", adapter="a") == 4
    assert value(m, "loraplex_prompt_tokens_total", adapter="a") == 3


def test_inter_token_latency_is_a_requests_mean_gap(clock):
    m = Metrics(lambda: STATS)
    m.on_finish(finished(ref("a"), arrival=90.0, first=99.0, completion=5, last_token_at=100.0))  # 4 gaps, 1 s
    m.on_finish(finished(ref("a"), arrival=90.0, first=99.0, completion=3, reason="abort", last_token_at=99.2))
    m.on_finish(finished(ref("a"), arrival=90.0, first=99.0, completion=1, last_token_at=99.0))  # one token: no gap
    assert value(m, "loraplex_inter_token_latency_seconds_sum") == pytest.approx(0.25 + 0.1)
    assert value(m, "loraplex_inter_token_latency_seconds_count") == 2


def test_queue_wait_from_admission_time(clock):
    m = Metrics(lambda: STATS)
    m.on_finish(finished(ref("a"), arrival=90.0, first=99.0, completion=2, admitted_at=93.0))
    m.on_finish(finished(ref("a"), arrival=90.0, first=99.0, completion=2))  # no admitted_at yet: not observed
    assert value(m, "loraplex_queue_wait_seconds_sum") == pytest.approx(3.0)
    assert value(m, "loraplex_queue_wait_seconds_count") == 1


def test_rejected_by_status_and_transport():
    m = Metrics(lambda: STATS)
    m.rejected(400, "http")
    m.rejected(400, "http")
    m.rejected("RESOURCE_EXHAUSTED", "grpc")
    assert value(m, "loraplex_rejected_requests_total", status="400", transport="http") == 2
    assert value(m, "loraplex_rejected_requests_total", status="RESOURCE_EXHAUSTED", transport="grpc") == 1


def test_forget_adapter_removes_every_series_of_it(clock):
    m = Metrics(lambda: STATS)
    for reason in ("stop", "length", "abort"):
        m.on_finish(finished(ref("gone", 2), arrival=99.0, first=99.5, completion=2, reason=reason))
    m.on_finish(finished(ref("kept"), arrival=99.0, first=99.5, completion=2))
    m.on_finish(finished(ref("never-first"), arrival=99.0, first=None, completion=0, reason="abort"))
    m.forget_adapter("gone", 2)
    m.forget_adapter("never-first", 1)  # no TTFT series: still fine
    m.forget_adapter("never-seen", 1)
    labelled = [labels for _, labels in samples(m) if ("adapter", "gone") in labels or ("adapter", "never-first") in labels]
    assert labelled == []
    assert value(m, "loraplex_request_latency_seconds_count", adapter="kept") == 1
    # a request admitted with a deleted version that finishes later does not bring the series back ...
    m.on_finish(finished(ref("gone", 1), arrival=99.0, first=99.5, completion=2))
    m.on_finish(finished(ref("gone", 2), arrival=99.0, first=99.5, completion=2))
    assert value(m, "loraplex_request_latency_seconds_count", adapter="gone") is None
    # ... but a new upload under the same id (a newer version) is recorded again
    m.on_finish(finished(ref("gone", 3), arrival=99.0, first=99.5, completion=2))
    assert value(m, "loraplex_request_latency_seconds_count", adapter="gone") == 1


def test_on_finish_never_raises_into_the_engine():
    m = Metrics(lambda: STATS)
    broken = SimpleNamespace(id=1)  # nothing a Sequence has
    m.on_finish(broken)
