"""`loraplex train`: every method on the default model, PEFT round trip, upload, Flexora, resume."""
from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from loraplex.trainer.data import DataError, load_jsonl
from loraplex.trainer.flexora import LayerGates, hypergradient, select_layers
from loraplex.trainer.loop import LoopConfig
from loraplex.trainer.methods import AdapterSpec, MethodError, check_targets, load_tokenizer
from loraplex.trainer.train import TrainJob, train


@pytest.fixture(scope="module")
def data_file(tmp_path_factory) -> Path:
    """A tiny arithmetic task, half prompt/completion rows and half chat rows."""
    rng = random.Random(0)
    rows = []
    for i in range(24):
        a, b = rng.randint(10, 49), rng.randint(10, 49)
        if i % 2:
            rows.append({"prompt": f"Add {a} and {b}.", "completion": f" {a + b}"})
        else:
            rows.append({"messages": [{"role": "user", "content": f"What is {a} plus {b}?"},
                                      {"role": "assistant", "content": f"{a + b}"}]})
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def job(data_file, out, method, **spec) -> TrainJob:
    steps, batch = (2, 2) if method == "qlora" else (3, 4)  # NF4 with bf16 compute is slow on CPUs
    return TrainJob(data=data_file, output=out, spec=AdapterSpec(method=method, rank=8, **spec), max_length=64,
                    loop=LoopConfig(lr=2e-3, max_steps=steps, batch_size=batch, seed=0, schedule="constant"),
                    flexora={"hypergrad": "first-order", "unroll": 1, "top_k": None, "search_steps": 2,
                             "alpha_lr": 0.05, "val_batches": 1})


def peft_logits_equal(outcome, out_dir: Path, method: str) -> None:
    from peft import PeftModel
    from loraplex.trainer.methods import load_model, training_device
    ids = torch.tensor([outcome.tokenizer("What is 12 plus 30?")["input_ids"]])
    outcome.model.eval()
    with torch.no_grad():
        in_memory = outcome.model(input_ids=ids).logits.float()
        reloaded = PeftModel.from_pretrained(load_model(None, "qlora" if method == "qlora" else "lora",
                                                        training_device(), False), out_dir).eval()
        from_disk = reloaded(input_ids=ids).logits.float()
    err = ((in_memory - from_disk).norm() / in_memory.norm()).item()
    assert err < (2e-3 if method == "qlora" else 1e-5), err


@pytest.mark.parametrize("method,spec", [("lora", {}), ("qlora", {}), ("gralora", {"hybrid_r": 4}), ("flexora", {})],
                         ids=["lora", "qlora", "gralora-hybrid", "flexora-first-order"])
def test_method_trains_round_trips_and_serves(method, spec, data_file, tmp_path, fp32_server):
    out = tmp_path / method
    outcome = train(job(data_file, out, method, **spec))
    s = json.loads((out / "training_summary.json").read_text())
    assert s["final_val_loss"] < s["initial_val_loss"], s
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == ("GRALORA" if method == "gralora" else "LORA")
    peft_logits_equal(outcome, out, method)
    r = fp32_server.upload(f"trained-{method}", out)
    assert r.status_code == 201, r.text
    assert fp32_server.complete(f"trained-{method}", "What is 12 plus 30?", 4)["usage"]["completion_tokens"] > 0
    if method == "flexora":
        report = json.loads((out / "flexora_report.json").read_text())
        assert len(report["alpha"]) == 30 and report["selected_layers"] == config["layers_to_transform"]
        layers = {int(k.split(".layers.")[1].split(".")[0]) for k in load_file(str(out / "adapter_model.safetensors"))}
        assert layers == set(report["selected_layers"])


def test_flexora_unrolled_top_k(data_file, tmp_path):
    j = job(data_file, tmp_path / "fx", "flexora")
    j.flexora = {**j.flexora, "hypergrad": "unrolled", "unroll": 2, "top_k": 5}
    j.loop = replace(j.loop, batch_size=2)
    j.loop = replace(j.loop, max_steps=1)
    train(j)
    report = json.loads((tmp_path / "fx" / "flexora_report.json").read_text())
    assert report["hypergrad"] == "unrolled" and report["unroll"] == 2
    assert len(report["selected_layers"]) == 5 and len(report["stage1"]["hyper_val_loss"]) == 2
    assert any(abs(a) > 0 for a in report["alpha"])  # the hyper-steps moved alpha
    alpha = torch.tensor(report["alpha"])
    assert report["selected_layers"] == sorted(torch.topk(alpha, 5).indices.tolist())


def test_hypergradient_matches_finite_differences():
    """Unrolled (K=0..3) hypergradient of a gated toy regression against central differences."""
    torch.manual_seed(0)
    L, d = 4, 6
    X, Y = torch.randn(16, d, dtype=torch.float64), torch.randn(16, 1, dtype=torch.float64)
    Xv, Yv = torch.randn(8, d, dtype=torch.float64), torch.randn(8, 1, dtype=torch.float64)
    W0 = {f"w{i}": torch.randn(d, 1, dtype=torch.float64) * 0.3 for i in range(L)}

    def loss_fn(alpha):
        def f(w, batch):
            x, y = batch
            g = L * torch.softmax(alpha, 0)
            pred = sum(g[i] * (x @ w[f"w{i}"]) for i in range(L))
            return ((pred - y) ** 2).mean()
        return f

    def val_after_k(alpha, k, lr=0.1):
        w = dict(W0)
        for _ in range(k):
            w = {n: t.requires_grad_() for n, t in w.items()}
            loss = loss_fn(alpha)(w, (X, Y))
            grads = torch.autograd.grad(loss, list(w.values()))
            w = {n: (t - lr * g).detach() for (n, t), g in zip(w.items(), grads)}
        return float(loss_fn(alpha)(w, (Xv, Yv)))

    base_alpha = torch.tensor([0.1, -0.2, 0.3, 0.0], dtype=torch.float64)
    for k in range(4):
        alpha = base_alpha.clone().requires_grad_()
        grad, _ = hypergradient(loss_fn(alpha), W0, alpha, [(X, Y)] * k, (Xv, Yv), inner_lr=0.1)
        eps = 1e-6
        numeric = torch.tensor([(val_after_k(base_alpha + eps * e, k) - val_after_k(base_alpha - eps * e, k)) / (2 * eps)
                                for e in torch.eye(L, dtype=torch.float64)], dtype=torch.float64)
        torch.testing.assert_close(grad, numeric, rtol=1e-5, atol=1e-8)


def test_gates_scale_the_adapter_output_linearly():
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    model = get_peft_model(LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32,
                                                        num_hidden_layers=2, num_attention_heads=2)),
                           LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    gates = LayerGates(2, "cpu")
    assert gates.attach(model) == 2
    layer = model.base_model.model.model.layers[1].self_attn.q_proj
    x = torch.randn(3, 16)
    delta = lambda: layer(x) - layer.base_layer(x)
    at_one = delta().detach()
    with torch.no_grad():
        gates.alpha.copy_(torch.tensor([0.0, 1.0]))
    g1 = float(gates.values()[1])
    torch.testing.assert_close(delta().detach(), g1 * at_one)
    assert select_layers(gates.alpha, None) == [1] and select_layers(torch.tensor([3.0, 1, 2]), 2) == [0, 2]


def test_bad_rows_name_file_and_line(tmp_path):
    tok = load_tokenizer(None)
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": 3}\nnot json\n'
                    '{"messages": [{"role": "user", "content": "hi"}]}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: expected"):
        load_jsonl(path, tok, 64)
    examples, skipped = load_jsonl(path, tok, 64, skip_bad_rows=True)
    assert len(examples) == 1 and skipped == 3
    assert examples[0].labels[0] == -100 and examples[0].labels[-1] == tok.eos_token_id


def test_gralora_k_must_divide(tiny_model_dir):
    from transformers import AutoConfig
    cfg = AutoConfig.from_pretrained(tiny_model_dir)
    with pytest.raises(MethodError, match="must divide --rank 6"):
        check_targets(AdapterSpec("gralora", rank=6, gralora_k=4), cfg)
    with pytest.raises(MethodError, match="in_features 64"):
        check_targets(AdapterSpec("gralora", rank=24, gralora_k=3), cfg)


def test_resume_after_kill_equals_uninterrupted(data_file, tiny_model_dir, tmp_path):
    exe = str(Path(sys.executable).parent / "loraplex")
    common = ["train", "--method", "lora", "--data", str(data_file), "--model", str(tiny_model_dir),
              "--max-steps", "6", "--batch-size", "2", "--save-every", "2", "--lr", "1e-2", "--dropout", "0.1",
              "--seed", "3", "--max-length", "48"]
    subprocess.run([exe, *common, "--output", str(tmp_path / "full")], check=True, capture_output=True, timeout=600)
    killed = subprocess.Popen([exe, *common, "--output", str(tmp_path / "part")], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    checkpoints = tmp_path / "part" / "checkpoints"
    deadline = time.time() + 300
    while time.time() < deadline and not (checkpoints / "step-2").exists():
        time.sleep(0.02)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert not (tmp_path / "part" / "adapter_model.safetensors").exists(), "the run finished before the kill"
    subprocess.run([exe, *common, "--output", str(tmp_path / "part"), "--resume"], check=True, capture_output=True,
                   timeout=600)
    full = load_file(str(tmp_path / "full" / "adapter_model.safetensors"))
    resumed = load_file(str(tmp_path / "part" / "adapter_model.safetensors"))
    assert full.keys() == resumed.keys()
    for k in full:
        assert torch.equal(full[k], resumed[k]), k
    summary = json.loads((tmp_path / "part" / "training_summary.json").read_text())
    assert len(summary["train_loss_history"]) == 6


def test_cli_trains_and_uploads_to_a_running_server(data_file, tmp_path, fp32_server):
    exe = str(Path(sys.executable).parent / "loraplex")
    done = subprocess.run([exe, "train", "--method", "lora", "--data", str(data_file), "--output", str(tmp_path / "up"),
                           "--max-steps", "1", "--batch-size", "2", "--max-length", "64", "--rank", "4",
                           "--upload", fp32_server.url, "--adapter-id", "cli-trained"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert 'uploaded: use "model": "cli-trained"' in done.stdout
    assert "cli-trained" in [a["id"] for a in fp32_server.client.get("/v1/adapters").json()["data"]]
    bad = subprocess.run([exe, "train", "--method", "lora", "--data", str(tmp_path / "missing.jsonl"),
                          "--output", str(tmp_path / "x")], capture_output=True, text=True, timeout=600)
    assert bad.returncode != 0 and "missing.jsonl: no such file" in bad.stderr
