"""bench/train_speed.py end to end on the CPU: the tiny random-weight shape, every method on both sides
(loraplex train and transformers Trainer + PEFT), 2 steps each; the JSON's summary keys and the rows."""
from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

from conftest import bench_module  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def test_rows_fit_max_length():
    train_speed = bench_module("train_speed")
    rows = train_speed.make_rows(200, 128, random.Random(0))
    lengths = [len(r["prompt"]) + len(r["completion"]) for r in rows]
    assert min(lengths) >= 32 and max(lengths) <= 124 and len(set(lengths)) > 20  # varied: padding would matter
    assert train_speed.steady([100, 10, 10], [9.0, 1.0, 1.0], 1) == 10.0


def test_cpu_smoke_run_writes_the_summary(tmp_path):
    out = tmp_path / "train_speed.json"
    done = subprocess.run([sys.executable, str(REPO / "bench" / "train_speed.py"), "--device", "cpu", "--shapes", "tiny",
                           "--steps", "2", "--warmup", "1", "--batch-size", "4", "--max-length", "96",
                           "--workdir", str(tmp_path / "work"), "--out", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert set(result["summary"]) == {f"{k}_{s}" for k in ("lora_tok_s_over_peft_trainer", "qlora_tok_s_over_peft_trainer",
                                                             "qlora_peak_mem_over_peft_trainer") for s in ("8b", "1b")}
    cases = result["shapes"]["tiny"]["cases"]
    assert set(cases) == {f"{m}/{i}" for m in ("lora", "qlora", "gralora") for i in ("loraplex", "peft_trainer")} | {
        "flexora/loraplex"}
    for name, case in cases.items():
        assert "error" not in case, (name, case["error"])
        assert case["tok_s"] > 0 and case["steps"] == 2, name
    assert cases["lora/peft_trainer"]["padding_fraction"] > 0.05  # the Trainer's padded batches
    assert result["shapes"]["tiny"]["ratios"]["lora_tok_s_over_peft_trainer"] > 0
    assert "lora" in done.stdout and "speed-up" in done.stdout
