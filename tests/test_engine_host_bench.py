"""bench/engine_host.py on a short trace: a real Engine with the model stubbed out runs every request of the trace to
its length in both variants (base-only, adapters over the Triton ops' pool under the interpreter), and the JSON holds
the per-step host times the README quotes."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_engine_host_smoke(tmp_path):
    out = tmp_path / "engine_host.json"
    done = subprocess.run([sys.executable, "bench/engine_host.py", "--requests", "24", "--adapters", "4",
                           "--prompt-len", "8,64", "--output-len", "2,8", "--repeats", "1", "--prefill-budget", "32",
                           "--work", str(tmp_path / "work"), "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads(out.read_text())
    base, adapters = result["runs"]["base_only"], result["runs"]["adapters"]
    # every request ran to its max_tokens, in both runs
    assert base["tokens_generated"] == adapters["tokens_generated"] == result["trace_output_tokens"] > 24
    assert adapters["adapter_loads"] == 4 and base["adapter_loads"] == 0
    for run in (base, adapters):
        assert run["decode_steps"] + run["mixed_steps"] == run["steps"] > 0
        parts = run["schedule_ms_per_step"] + run["runner_ms_per_step"] + run["rest_ms_per_step"]
        assert abs(parts - run["host_ms_per_step"]) < 1e-6 and min(run["schedule_ms_per_step"],
                                                                     run["runner_ms_per_step"]) > 0
    assert result["summary"]["adapters_over_base"] > 0
    assert "ops.py" in adapters["profile_tottime"] or "metadata" in adapters["profile_tottime"]
    assert "adapters ÷ base-only host time a step" in done.stdout
