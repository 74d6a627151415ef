"""bench/serve_trace.py end to end on the CPU: a tiny random-weight checkpoint, a real server, a 16-request
trace over 4 adapters all at once and at 8 req/s, both bursts, the prefill step; and the trace's pieces
(Zipf popularity, arrivals, the floor) on their own."""
from __future__ import annotations

import json
import math
import random
import subprocess
import sys
from pathlib import Path

from conftest import bench_module  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def bench():
    return bench_module("serve_trace")


def test_zipf_and_arrivals():
    st = bench()
    rng = random.Random(0)
    picks = st.zipf_choices(8, 1.0, 20000, rng)
    counts = [picks.count(i) for i in range(8)]
    assert counts == sorted(counts, reverse=True) and 1.7 < counts[0] / counts[1] < 2.3  # 1/r popularity
    assert st.arrivals(5, math.inf, 1.0, rng) == [0.0] * 5
    times = st.arrivals(4000, 4.0, 1.0, random.Random(1))
    gaps = [b - a for a, b in zip(times, times[1:])]
    mean = sum(gaps) / len(gaps)
    assert abs(mean - 0.25) < 0.02 and abs((sum((g - mean) ** 2 for g in gaps) / len(gaps)) ** 0.5 / mean - 1) < 0.1
    bursty = st.arrivals(4000, 4.0, 3.0, random.Random(2))
    gaps = [b - a for a, b in zip(bursty, bursty[1:])]
    mean = sum(gaps) / len(gaps)
    assert abs(mean - 0.25) < 0.05 and (sum((g - mean) ** 2 for g in gaps) / len(gaps)) ** 0.5 / mean > 2.0


def test_floor_counts_prefill_flops_and_decode_bytes():
    st = bench()
    shape = st.SHAPES["8b"]
    reqs = [st.Request(tuple(range(1000)), 2, "base", 0.0)]
    floor = st.trace_floor(reqs, shape, {}, peak=1e15, bandwidth=1e12)
    linear = st.linear_params(shape)
    assert math.isclose(floor["prefill_s"], st.prefill_flops(shape, 1000) / 1e15)
    assert 2 * linear * 1000 < st.prefill_flops(shape, 1000) < 2.2 * linear * 1000
    one_step = st.base_bytes_per_step(shape, "nf4")["total"] + 1001 * st.kv_bytes_per_token(shape)
    assert math.isclose(floor["decode_s"], one_step / 1e12)  # one decode step: the first token is the prefill's


def test_serve_trace_smoke_on_cpu(tmp_path):
    out = tmp_path / "serve_trace.json"
    done = subprocess.run([sys.executable, "bench/serve_trace.py", "--shapes", "tiny", "--device", "cpu",
                           "--requests", "16", "--rate-requests", "8", "--adapters", "4", "--prompt-len", "8,48",
                           "--output-len", "2,6", "--rates", "inf,8", "--burst", "4", "--burst-new-tokens", "4",
                           "--burst-prompt", "16", "--prefill-tokens", "64", "--work", str(tmp_path / "work"),
                           "--out", str(out)], cwd=REPO, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads(out.read_text())
    rec = result["shapes"]["tiny"]
    assert set(result["summary"]) >= set(result["targets"])
    for label in ("inf", "8"):
        for variant in ("base_only", "adapters"):
            run = rec["runs"][label][variant]
            assert run["errors"] == 0 and run["short_outputs"] == 0, run
            assert run["output_tokens"] > 0
            assert run["ttft_p50_ms"] > 0 and run["tpot_p50_ms"] > 0 and run["counters"]["steps"] > 0
    assert rec["runs"]["inf"]["base_only"]["output_tokens"] == rec["trace"]["output_tokens"]
    assert rec["trace"]["distinct_adapters"] >= 2 and rec["trace"]["base_requests"] < 16
    assert rec["first_burst_adapters"]["counters"]["adapter_loads"] == 4  # the burst's 4 adapters, first used
    assert rec["runs"]["inf"]["base_only"]["counters"]["adapter_loads"] == 0
    assert rec["runs"]["inf"]["base_only"]["floor"]["floor_s"] > 0 and rec["summary"]["trace_inf_base_over_floor"] > 1
    assert rec["prefill"]["steps"] == 1 and rec["prefill"]["mfu"] > 0
    for burst in ("first_burst", "first_burst_adapters", "warm_burst", "warm_burst_adapters"):
        assert rec[burst]["errors"] == 0 and rec[burst]["output_tokens"] == 16
    assert rec["engine"]["max_num_seqs"] == 64 and rec["engine"]["merge_policy"] == "off"
