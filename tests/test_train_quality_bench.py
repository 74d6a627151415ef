"""bench/train_quality.py on the CPU: the task's rows, the verdict logic, and a smoke run of every comparison on
the tiny checkpoint (1 seed, 2 steps) that writes the JSON and its figure."""
from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

from conftest import bench_module  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def bench():
    return bench_module("train_quality")


def test_held_out_rows_share_no_pair_with_training_rows():
    tq = bench()
    taken: set = set()
    test = tq.make_rows(50, 5, random.Random(1), taken)
    train = tq.make_rows(500, 5, random.Random(1), taken)  # the same seed: every repeat is skipped
    key = lambda r: r["messages"][0]["content"]
    assert not {key(r) for r in test} & {key(r) for r in train}
    q, a = test[0]["messages"][0]["content"], test[0]["messages"][1]["content"]
    x, y = q.removeprefix("What is ").removesuffix("?").split(" + ")
    assert len(x) == len(y) == 5 and int(x) + int(y) == int(a)


def test_same_budget_specs_and_verdicts():
    tq = bench()
    hybrid = tq.spec_for("hybrid k4", 64)
    assert (hybrid.rank + hybrid.hybrid_r, hybrid.k, hybrid.lora_alpha) == (64, 4, 128)
    assert tq.spec_for("gralora k2", 16).k == 2 and tq.spec_for("lora", 16).lora_alpha == 32
    s = tq.stats
    ranks = {"gralora": [16, 64], "hybrid": 64, "flexora": 16, "qlora": 16}
    results = {"lora r16": s([0.30, 0.32, 0.31]), "gralora k2 r16": s([0.33, 0.35, 0.34]),
               "gralora k4 r16": s([0.30, 0.31, 0.30]), "lora r64": s([0.40, 0.41, 0.40]),
               "gralora k2 r64": s([0.50, 0.52, 0.51]), "gralora k4 r64": s([0.45, 0.47, 0.46]),
               "qlora r16": s([0.10, 0.12, 0.11])}
    report = {c["comparison"]: c for c in tq.comparisons_report({k: {"accuracy": v} for k, v in results.items()},
                                                                ["gralora", "qlora"], ranks)}
    assert report["gralora"]["verdict"].startswith("holds") and "grows" in report["gralora"]["verdict"]
    assert report["qlora"]["verdict"].startswith("does not hold")


def test_smoke_run_writes_every_comparison(tiny_model_dir, tmp_path):
    """Two worker processes (as on the GPU): a random-layers run waits for its Flexora run's layer count."""
    out = tmp_path / "train_quality.json"
    done = subprocess.run([sys.executable, str(REPO / "bench" / "train_quality.py"), "--smoke", "--model",
                           str(tiny_model_dir), "--workers", "2", "--workdir", str(tmp_path / "work"), "--out", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert [c["comparison"] for c in result["comparisons"]] == ["gralora", "hybrid", "flexora", "qlora"]
    assert all(c["verdict"] for c in result["comparisons"])
    assert {"lora r4", "gralora k2 r4", "gralora k4 r4", "hybrid k4 r16", "flexora r4", "lora random layers r4",
            "qlora r4"} <= set(result["runs"])
    flexora, random_layers = result["runs"]["flexora r4"]["seeds"][0], result["runs"]["lora random layers r4"]["seeds"][0]
    assert len(flexora["layers"]) == len(random_layers["layers"])  # the same number of layers
    assert list(result["runs"])[:3] == ["lora r4", "gralora k2 r4", "gralora k4 r4"] and result["workers"] == 2
    assert out.with_suffix(".png").exists()
    again = subprocess.run([sys.executable, str(REPO / "bench" / "train_quality.py"), "--smoke", "--model",
                            str(tiny_model_dir), "--comparisons", "qlora", "--workdir", str(tmp_path / "work"),
                            "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "lora r4: kept from" in again.stdout and "qlora r4: kept from" in again.stdout  # a split run goes on
    assert json.loads(out.read_text())["runs"] == result["runs"]
