"""bench/paged_attention.py --smoke on the CPU: the benchmark's batches (decode only, mixed, prefill only) and its
gather + SDPA reference agree with the kernel, so the GPU run measures what it says (its prefill cases once
failed on a batch without decode rows, and only on the device)."""
import os
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench"


def test_paged_attention_bench_smoke():
    run = subprocess.run([sys.executable, str(BENCH / "paged_attention.py"), "--smoke"], capture_output=True,
                         text=True, timeout=600, env=dict(os.environ, TRITON_INTERPRET="1"), cwd=BENCH)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count("smoke [") == 3, run.stdout
