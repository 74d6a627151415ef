"""bench/loader_contention.py end to end on a few loads: every mode runs in its own process through the runtime's
parse and pack, the gated mode under the runtime's ADAPTER_HOST_WORK, and the JSON and its figure are written."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_loader_contention_runs_each_mode_and_writes_its_json(tmp_path):
    out = tmp_path / "loader_contention.json"
    run = subprocess.run([sys.executable, str(REPO / "bench" / "loader_contention.py"), "--repeats", "1", "--loads",
                          "4", "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(out.read_text())
    assert set(result["runs"]) == {"none", "free", "gated"}
    assert all(r["steps"] > 0 and r["step_ms_mean"] >= 4.0 for runs in result["runs"].values() for r in runs)
    assert result["runs"]["none"][0]["loads_s"] is None and result["runs"]["gated"][0]["loads_s"] > 0
    assert result["summary"]["gated_step_over_free"] > 0 and out.with_suffix(".png").exists()
    assert "gated" in run.stdout and "wrote" in run.stdout
