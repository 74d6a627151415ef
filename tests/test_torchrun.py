"""`loraplex train` under torchrun (DDP, gloo on the CPU) equals one process on the same global batch."""
from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from loraplex.trainer.data import Example
from loraplex.trainer.distributed import World

EXE = str(Path(sys.executable).parent / "loraplex")


@pytest.fixture(scope="module")
def data_file(tmp_path_factory) -> Path:
    """Rows of different lengths, so the two ranks' shares hold different numbers of loss tokens."""
    rng = random.Random(1)
    rows = []
    for i in range(10):
        a, b = rng.randint(10, 49), rng.randint(10, 999)
        rows.append({"prompt": f"Add {a} and {b}." + " Please." * (i % 3), "completion": f" {a + b}" + " ok" * (i % 4)})
    path = tmp_path_factory.mktemp("ddp-data") / "train.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def _train(data_file: Path, out: Path, nproc: int, *extra: str) -> subprocess.CompletedProcess:
    # 5 rows per epoch at batch 2 (the 10 rows less one for validation is 9, an odd last batch of 1 row)
    args = ["train", "--method", "lora", "--data", str(data_file), "--output", str(out), "--rank", "4",
            "--target-modules", "q_proj,v_proj", "--batch-size", "2", "--max-length", "32", "--lr", "1e-2",
            "--schedule", "constant", "--save-every", "1", "--seed", "5", *extra]
    cmd = [EXE, *args] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                           "--nproc-per-node", str(nproc), "--no-python", EXE, *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def _assert_same_adapter(a: Path, b: Path) -> None:
    wa, wb = load_file(str(a / "adapter_model.safetensors")), load_file(str(b / "adapter_model.safetensors"))
    assert wa.keys() == wb.keys()
    # Adam at lr 1e-2 lifts fp32 summation-order noise to a relative error of at most ~4e-4 in a tensor (a
    # single element flips); weighting each rank's mean loss equally instead moves every tensor by 10-20%
    worst = max(((wa[k] - wb[k]).norm() / wa[k].norm()).item() for k in wa)
    assert worst < 2e-3, (a.name, b.name, worst)


def test_two_ranks_equal_one_process_and_resume_across_world_sizes(data_file, tmp_path):
    # steps 1-5 cover one epoch, step 5 is the 1-row batch: rank 1 runs at weight 0
    _train(data_file, tmp_path / "one", 1, "--max-steps", "5")
    done = _train(data_file, tmp_path / "two", 2, "--max-steps", "5")
    _assert_same_adapter(tmp_path / "one", tmp_path / "two")
    one = json.loads((tmp_path / "one" / "training_summary.json").read_text())
    two = json.loads((tmp_path / "two" / "training_summary.json").read_text())
    assert two["world_size"] == 2 and one["world_size"] == 1
    assert two["train_loss_history"] == pytest.approx(one["train_loss_history"], rel=1e-4)
    assert two["final_val_loss"] == pytest.approx(one["final_val_loss"], rel=1e-4)
    assert done.stdout.count("adapter written to") == 1  # rank 0 reports once

    # resume across world sizes: each run's step-4 checkpoint, finished by the other world size
    for source, nproc in (("two", 1), ("one", 2)):
        part = tmp_path / f"{source}-resumed-by-{nproc}"
        shutil.copytree(tmp_path / source, part)
        (part / "adapter_model.safetensors").unlink()
        shutil.rmtree(part / "checkpoints" / "step-5")
        _train(data_file, part, nproc, "--max-steps", "5", "--resume")
        _assert_same_adapter(tmp_path / "one", part)


def test_shard_weights_make_the_global_token_mean():
    rows = [Example([1, 2, 3, 4], [-100, 5, 6, 7]), Example([1, 2], [-100, 5]), Example([1, 2, 3], [-100, -100, 9])]
    # loss tokens (after the causal shift): 3, 1, 1 = 5 in all
    world0, world1 = World(rank=0, size=2), World(rank=1, size=2)
    mine0, w0 = world0.shard(rows)
    mine1, w1 = world1.shard(rows)
    assert mine0 == [rows[0], rows[2]] and mine1 == [rows[1]]
    assert (w0, w1) == (4 * 2 / 5, 1 * 2 / 5)  # mean over ranks of w * local mean = global mean
    empty, w = World(rank=3, size=4).shard(rows)
    assert empty == rows[:1] and w == 0.0
    assert World().shard(rows) == (rows, 1.0)
