"""bench/serve_gpu.py end to end on the CPU: a tiny random-weight checkpoint, real server processes, every case
but the HF PEFT baseline, with reduced counts (batch 8 / 16, 20 registered / 8 resident, 4 new tokens)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WAVES = ("base_b1", "base_b8", "base_b16", "over8_b8", "distinct_b8", "distinct_b16", "one_adapter_b1", "mix_b8",
         "merged_b8", "two_adapters_b8", "over8_b8_resident8", "base_b8_resident8", "merge_off_b8")


def test_serve_gpu_bench_tiny_on_cpu(tmp_path):
    out = tmp_path / "serve_gpu.json"
    cmd = [sys.executable, str(REPO / "bench" / "serve_gpu.py"), "--shapes", "tiny", "--device", "cpu",
           "--new-tokens", "4", "--skip-peft", "--batch", "8", "--big-batch", "16", "--adapters-residency", "20",
           "--resident", "8", "--hotload-runs", "3", "--work", str(tmp_path / "work"), "--out", str(out)]
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)  # its own process group: the servers go with it on a time-out
    try:
        log, _ = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        log, _ = proc.communicate()
        raise AssertionError(f"bench/serve_gpu.py took over 240 s:\n{log[-4000:]}")
    assert proc.returncode == 0, log[-4000:]

    result = json.loads(out.read_text())
    assert result["device"].startswith("cpu") and result["copy_bandwidth_bytes_per_s"] > 0
    assert result["summary_shape"] == "tiny"
    assert set(result["summary"]) == set(result["targets"]) == {
        "step_over_floor_b32", "adapter_overhead_over_floor", "mixed_over_base", "mixed_over_peft",
        "base_with_128_resident_over_base_with_0", "resident128_over_8", "hotload_p50_ms", "merged_over_unmerged"}
    tiny = result["shapes"]["tiny"]
    assert set(result["targets"]) <= set(tiny["summary"])
    for key in ("mixed_over_base", "base_with_128_resident_over_base_with_0", "resident128_over_8", "hotload_p50_ms",
                "merged_over_unmerged"):
        assert tiny["summary"][key] > 0, key
    assert tiny["summary"]["merged_over_unmerged_basis"].endswith("/ merge_off_b8")
    assert tiny["summary"]["mixed_over_peft"] is None  # --skip-peft
    for name in WAVES:
        wave = tiny["waves"][name]
        assert wave["completion_tokens"] == 4 * wave["rows"], name
    assert tiny["waves"]["distinct_b16"]["distinct_adapters"] == 16
    assert tiny["waves"]["mix_b8"]["adapters"] == ["GRALORA r32 k4", "LORA r16", "LORA r32", "LORA r64", "LORA r8"]
    floor = tiny["waves"]["distinct_b8"]["floor"]
    assert floor["adapter_bytes"] == 8 * 2 * 2 * 16 * (64 * 2 + 96 * 2 + 64 * 2 + 192 * 3)  # 8 adapters, 2 layers, bf16
    assert tiny["residency"]["registered"] >= 20 and tiny["residency"]["touched"] == 8
    assert len(tiny["hotload"]["runs"]) == 3
    assert "wrote" in log
