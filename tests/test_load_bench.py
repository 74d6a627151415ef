"""bench/load.py end to end at tiny counts: it starts a server, streams, churns adapters, checks references."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_load_bench_small(tmp_path):
    out = tmp_path / "load.json"
    done = subprocess.run([sys.executable, str(REPO / "bench" / "load.py"), "--clients", "8", "--adapters", "3",
                           "--rounds", "1", "--max-tokens", "6", "--disconnect", "0.25", "--churn-interval", "0.3",
                           "--round-timeout", "120", "--out", str(out)],
                          capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    record = json.loads(out.read_text())
    (round_,) = record["rounds"]
    summary = record["summary"]
    assert round_["clients"] == 8 and round_["disconnected"] == 2
    assert round_["completed"] + round_["not_found_while_deleted"] == 6, round_
    assert round_["completed"] >= 3, round_
    assert round_["replaced"] >= 1, round_  # the churn loop ran during the round
    assert summary["checked_against_reference"] == round_["completed"]
    assert summary["mismatches"] == 0, summary["mismatch_examples"]
    assert summary["server_errors"] == 0 and summary["errors"] == 0, round_["errors"]
    assert summary["leaked_rounds"] == 0, round_["health_after"]
    assert round_["rss_bytes"] > 0
    assert "mismatches" in done.stdout and summary["latency_p50_s"] > 0
