"""The trainer's speed path (packing, fused linear + cross-entropy) computes the unfused path's loss: same
loss curve and adapter in fp32 on the CPU, no padded token counted, attention never across rows, resume
bit-exact with it on."""
from __future__ import annotations

import argparse
import json
import random
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from loraplex.trainer.data import IGNORE, Example, collate
from loraplex.trainer.fused_loss import linear_cross_entropy
from loraplex.trainer.loop import LoopConfig
from loraplex.trainer.methods import AdapterSpec
from loraplex.trainer.objective import Objective, SpeedConfig
from loraplex.trainer.packing import PACK_MULTIPLE, pack
from loraplex.trainer.train import TrainJob, train


@pytest.fixture(scope="module")
def data_file(tmp_path_factory) -> Path:
    """Rows of very different lengths, so padding would be most of a padded batch."""
    rng = random.Random(2)
    rows = []
    for i in range(16):
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        pad = " Show your work." * (i % 5)
        rows.append({"prompt": f"Add {a} and {b}.{pad}", "completion": f" {a + b}" + " indeed" * (i % 3)})
    path = tmp_path_factory.mktemp("speed-data") / "train.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def _model(tiny_model_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    return get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))


def _rows() -> list[Example]:
    rng = random.Random(0)
    out = []
    for n in (5, 17, 9, 30):
        ids = [rng.randrange(3, 1000) for _ in range(n)]
        out.append(Example(ids, [IGNORE] * (n // 2) + ids[n // 2:]))
    return out


def test_fused_cross_entropy_matches_unfused_loss_and_gradients():
    torch.manual_seed(0)
    h = torch.randn(3, 11, 16, dtype=torch.float64, requires_grad=True)
    w = torch.randn(40, 16, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, 40, (3, 11))
    t[0, :4] = IGNORE
    t[2, -1] = IGNORE
    ref = torch.nn.functional.cross_entropy((h @ w.T).flatten(0, 1), t.flatten(), reduction="sum")
    ref_grads = torch.autograd.grad(ref * 0.3, [h, w])
    for chunk in (1, 4, 1000):  # chunk boundaries inside, at and past the end
        out = linear_cross_entropy(h, w, t, chunk=chunk)
        torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
        for got, want in zip(torch.autograd.grad(out * 0.3, [h, w]), ref_grads):
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    frozen = w.detach()
    (gh,) = torch.autograd.grad(linear_cross_entropy(h, frozen, t), [h])  # a frozen lm_head: no weight gradient
    torch.testing.assert_close(gh, ref_grads[0] / 0.3)


def test_attention_never_crosses_rows(tiny_model_dir):
    """Each row's logits inside a pack equal the row run alone; one causal sequence over the same tokens
    (what a pack without restarting positions would be) changes every row after the first."""
    model = _model(tiny_model_dir).eval()
    rows = _rows()
    batch = pack(rows, pad_id=0, device="cpu")
    with torch.no_grad():
        # as the trainer runs it (use_cache=False: with a cache transformers ignores packing)
        packed = Objective(model, SpeedConfig(packing=True), 0).model(input_ids=batch["input_ids"], use_cache=False,
                                                                       position_ids=batch["position_ids"]).logits[0]
        crossing = model(input_ids=batch["input_ids"]).logits[0]
        start = 0
        for i, e in enumerate(rows):
            alone = model(input_ids=torch.tensor([e.input_ids])).logits[0]
            n = len(e.input_ids)
            torch.testing.assert_close(packed[start:start + n], alone, rtol=1e-4, atol=1e-4)
            if i:
                assert not torch.allclose(crossing[start:start + n], alone, rtol=1e-3, atol=1e-3)
            start += n


def test_packed_attention_computes_each_rows_own_scores(tiny_model_dir, monkeypatch):
    """The trainer's attention for packed batches (packed_attention, set when packing is on) gets the rows'
    boundaries and computes each row alone: every row's logits equal the row run alone, the filler is a row of
    its own, and the loss is HF's on the padded batch. A padded batch through the same model keeps its mask."""
    from loraplex.trainer import packed_attention
    model = _model(tiny_model_dir).eval()
    packed_attention.use_packed_attention(model.get_base_model())
    rows = _rows()
    batch = pack(rows, pad_id=0, device="cpu")
    lengths = [len(e.input_ids) for e in rows]
    filler = batch["input_ids"].shape[1] - sum(lengths)
    assert filler and batch["cu_seq_lens"].tolist() == [sum(lengths[:i]) for i in range(len(rows) + 1)] + [
        sum(lengths) + filler] and batch["max_length"] == 32 >= max(lengths + [filler])  # rounded up to 2^k
    seen, per_row = [], packed_attention._per_row
    monkeypatch.setattr(packed_attention, "_per_row", lambda q, k, v, bounds, *a: seen.append(bounds.tolist())
                        or per_row(q, k, v, bounds, *a))
    objective = Objective(model, SpeedConfig(packing=True), 0)
    with torch.no_grad():
        inputs = {"cu_seq_lens_q": batch["cu_seq_lens"], "max_length_q": batch["max_length"]}
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False,
                       **inputs).logits[0]
        assert seen and all(b == batch["cu_seq_lens"].tolist() for b in seen)
        start = 0
        for e in rows:
            seen.clear()
            alone = model(input_ids=torch.tensor([e.input_ids])).logits[0]
            assert not seen  # no boundaries: transformers' SDPA path
            torch.testing.assert_close(packed[start:start + len(e.input_ids)], alone, rtol=1e-4, atol=1e-4)
            start += len(e.input_ids)
        hf = model(**collate(rows, 0, "cpu")).loss  # padded, with its mask, through the same attention function
        torch.testing.assert_close(objective(batch), hf, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "gradient-checkpointing"])
def test_compiled_layers_have_no_graph_break(tiny_model_dir, checkpointing):
    """--compile compiles each decoder layer whole, also inside gradient checkpointing (QLoRA, the 8B shape), and
    computes the eager loss and gradients (Dynamo's eager backend: the graph capture is what can break)."""
    import torch._dynamo
    from torch._dynamo.utils import counters
    from loraplex.trainer.objective import compile_decoder_layers
    rows = _rows()
    batch = pack(rows, pad_id=0, device="cpu")
    results = []
    for compiled in (False, True):
        model = _model(tiny_model_dir).train()
        if checkpointing:
            model.get_base_model().gradient_checkpointing_enable()
            model.get_base_model().enable_input_require_grads()
        if compiled:
            torch._dynamo.reset()
            counters.clear()
            compile_decoder_layers(model, backend="eager")
        loss = Objective(model, SpeedConfig(packing=True), 0)(batch)
        loss.backward()
        grads = [p.grad.clone() for p in model.parameters() if p.requires_grad]
        results.append((loss.detach(), grads))
    assert counters["frames"]["ok"] >= 1 and not counters["graph_break"], dict(counters["graph_break"])
    torch.testing.assert_close(results[1][0], results[0][0])
    for compiled_grad, eager_grad in zip(results[1][1], results[0][1]):
        torch.testing.assert_close(compiled_grad, eager_grad)


def test_padding_is_not_counted(tiny_model_dir):
    model = _model(tiny_model_dir).eval()
    rows = _rows()
    real = sum(len(e.input_ids) for e in rows)
    targets = sum(1 for e in rows for t in e.labels[1:] if t != IGNORE)
    tight = pack(rows, 0, "cpu", multiple=1)
    filled = pack(rows, 0, "cpu")
    assert tight["input_ids"].shape[1] == real and filled["input_ids"].shape[1] % PACK_MULTIPLE == 0
    assert filled["input_ids"].shape[1] > real  # the filler is there, with no target and not counted
    assert tight["real_tokens"] == filled["real_tokens"] == real
    assert tight["num_targets"] == filled["num_targets"] == targets == int((filled["targets"] != IGNORE).sum())
    with torch.no_grad():
        hf = model(**collate(rows, 0, "cpu")).loss  # HF's own loss on the padded batch: the reference
        for speed in (SpeedConfig(packing=True, fused_ce=True), SpeedConfig(packing=True), SpeedConfig(fused_ce=True)):
            objective = Objective(model, speed, pad_id=0)
            for batch in (tight, filled) if speed.packing else (objective.make_batch(rows, "cpu"),):
                torch.testing.assert_close(objective(batch), hf, rtol=1e-5, atol=1e-6)


def _job(data_file, tiny_model_dir, out: Path, fast: bool, **loop) -> TrainJob:
    return TrainJob(data=data_file, output=out, model=str(tiny_model_dir), max_length=64,
                    spec=AdapterSpec("lora", rank=4, target_modules=("q_proj", "v_proj", "down_proj")),
                    loop=LoopConfig(lr=1e-2, max_steps=4, batch_size=4, seed=1, schedule="constant", **loop),
                    packing=fast, fused_ce=fast, compile=False)


@pytest.mark.parametrize("method", ["lora", "gralora"])
def test_loss_curve_matches_unfused_path(method, data_file, tiny_model_dir, tmp_path):
    runs = {}
    for fast in (False, True):
        job = _job(data_file, tiny_model_dir, tmp_path / f"{method}-{fast}", fast)
        job.spec = replace(job.spec, method=method)
        runs[fast] = train(job).summary
    assert runs[True]["speed"] == {"packing": True, "fused_ce": True, "compile": False}
    assert runs[False]["speed"] == {"packing": False, "fused_ce": False, "compile": False}
    # the summary says which attention ran: packed rows one SDPA each on the CPU (varlen FlashAttention on CUDA)
    assert (runs[True]["speed_report"]["attention"], runs[True]["speed_report"]["packed_rows"]) == (
        "loraplex_packed", "per-row")
    assert runs[False]["speed_report"]["attention"] == "sdpa" and runs[False]["speed_report"]["packed_rows"] is None
    torch.testing.assert_close(torch.tensor(runs[True]["train_loss_history"]),
                               torch.tensor(runs[False]["train_loss_history"]), rtol=1e-5, atol=1e-6)
    for key in ("initial_val_loss", "final_val_loss"):
        assert runs[True][key] == pytest.approx(runs[False][key], rel=1e-5)
    assert runs[True]["step_tokens"] == runs[False]["step_tokens"]  # real tokens, padding not counted
    slow = load_file(str(tmp_path / f"{method}-False" / "adapter_model.safetensors"))
    fast = load_file(str(tmp_path / f"{method}-True" / "adapter_model.safetensors"))
    for k in slow:
        torch.testing.assert_close(fast[k], slow[k], rtol=1e-4, atol=1e-5)


def test_resume_is_bit_exact_with_packing_and_fused_ce(data_file, tiny_model_dir, tmp_path):
    full = tmp_path / "full"
    train(_job(data_file, tiny_model_dir, full, True, save_every=2))
    part = tmp_path / "part"  # as if killed after step 2: its output holds step 2's checkpoint only
    (part / "checkpoints").mkdir(parents=True)
    shutil.copytree(full / "checkpoints" / "step-2", part / "checkpoints" / "step-2")
    job = _job(data_file, tiny_model_dir, part, True, save_every=2)
    job.resume = True
    train(job)
    a, b = load_file(str(full / "adapter_model.safetensors")), load_file(str(part / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (json.loads((full / "training_summary.json").read_text())["train_loss_history"]
            == json.loads((part / "training_summary.json").read_text())["train_loss_history"])


def test_speed_flags_default_on_cuda_only():
    from loraplex.trainer.cli import add_arguments
    p = argparse.ArgumentParser()
    add_arguments(p)
    base = ["--method", "lora", "--data", "d.jsonl", "--output", "o"]
    args = p.parse_args(base)
    assert (args.packing, args.fused_ce, args.compile) == (None, None, None)
    args = p.parse_args(base + ["--no-packing", "--no-fused-ce", "--no-compile"])
    assert (args.packing, args.fused_ce, args.compile) == (False, False, False)
    assert SpeedConfig.resolve(torch.device("cuda")) == SpeedConfig(True, True, True)
    assert SpeedConfig.resolve(torch.device("cpu")) == SpeedConfig(False, False, False)
    assert SpeedConfig.resolve(torch.device("cuda"), packing=False) == SpeedConfig(False, True, True)
