"""Shared fixtures: the default model in fp32, PEFT-made adapters on it, and a real server process."""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

from loraplex.runtime.offline import stay_offline

stay_offline()  # before anything imports transformers, peft or bitsandbytes

import httpx  # noqa: E402
import pytest
import torch

from loraplex.runtime.base_model import default_model_dir

REPO = Path(__file__).resolve().parents[1]


def make_peft_adapter(kind: str, out_dir: Path, seed: int) -> Path:
    """A PEFT adapter on the default model with random (non-zero) weights, saved in PEFT format."""
    from peft import GraloraConfig, LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(default_model_dir(), dtype=torch.float32)
    all_linear = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    configs = {
        "lora": LoraConfig(r=8, lora_alpha=16, target_modules=all_linear, init_lora_weights=False),
        "rslora": LoraConfig(r=16, lora_alpha=8, use_rslora=True, target_modules=["q_proj", "v_proj", "down_proj"],
                             rank_pattern={"down_proj": 4}, alpha_pattern={"v_proj": 32}, init_lora_weights=False),
        "gralora": GraloraConfig(r=8, gralora_k=2, alpha=16, target_modules=all_linear, init_weights=False),
        "gralora4": GraloraConfig(r=8, gralora_k=4, alpha=16, target_modules=["q_proj", "o_proj", "up_proj"],
                                  init_weights=False),
        "hybrid": GraloraConfig(r=8, hybrid_r=4, gralora_k=2, alpha=24, target_modules=["q_proj", "v_proj", "gate_proj", "down_proj"],
                                init_weights=False),
        "layers": LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                             layers_to_transform=[0, 5, 29], init_lora_weights=False),
    }
    peft_model = get_peft_model(model, configs[kind])
    with torch.no_grad():  # random B at kaiming scale swamps the base model; keep outputs near-sensible
        for name, p in peft_model.named_parameters():
            if "lora_B" in name or "gralora_B" in name:
                p.mul_(0.3)
    peft_model.save_pretrained(out_dir)
    return out_dir


ADAPTER_KINDS = ("lora", "rslora", "gralora", "hybrid", "layers")


@pytest.fixture(scope="session")
def peft_adapters(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("peft")
    return {kind: make_peft_adapter(kind, root / kind, seed=i) for i, kind in enumerate(ADAPTER_KINDS + ("gralora4",))}


def peft_reference(adapter_dir: Path | None):
    """The default model in fp32 with one PEFT adapter loaded (or none), the way PEFT users run it."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(default_model_dir(), dtype=torch.float32)
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, adapter_dir)
    return model.eval()


def bench_module(name: str):
    """A script of bench/ imported as a module (the benchmarks are scripts, not a package)."""
    import importlib
    bench_dir = str(Path(__file__).resolve().parents[1] / "bench")
    sys.path.insert(0, bench_dir)
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(bench_dir)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`loraplex serve` in a child process, healthy when constructed. exe: another install's `loraplex`;
    env: the child's whole environment (default: this one's); log_level None: the command's default output."""

    def __init__(self, *args: str, adapter_dir: Path, port: int | None = None, grpc_port: int | None = None,
                 exe: str | None = None, cwd: Path | None = None, env: dict | None = None,
                 log_level: str | None = "warning"):
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.grpc_port = free_port() if grpc_port is None else grpc_port  # 0: no gRPC
        self.grpc_target = f"127.0.0.1:{self.grpc_port}"
        exe = exe or shutil.which("loraplex", path=str(Path(sys.executable).parent)) or shutil.which("loraplex")
        cmd = [exe, "serve", "--port", str(self.port), "--grpc-port", str(self.grpc_port), "--adapter-dir",
               str(adapter_dir), *(["--log-level", log_level] if log_level else []), *args]
        self.log_path = adapter_dir.parent / f"server-{self.port}.log"
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, cwd=cwd,
                                     env={**(os.environ if env is None else env), "PYTHONUNBUFFERED": "1"})
        self.client = httpx.Client(base_url=self.url, timeout=120)
        deadline = time.time() + 240
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {Path(self.log.name).read_text()[-3000:]}")
            try:
                if self.client.get("/health").status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        raise RuntimeError("server did not become healthy")

    def stop(self) -> None:
        self.client.close()
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()

    def upload(self, adapter_id: str, directory: Path):
        with open(directory / "adapter_config.json", "rb") as c, open(directory / "adapter_model.safetensors", "rb") as w:
            return self.client.post("/v1/adapters", data={"id": adapter_id},
                                    files={"config": ("adapter_config.json", c), "weights": ("adapter_model.safetensors", w)})

    def complete(self, model: str, prompt: str, max_tokens: int = 12, **kw) -> dict:
        r = self.client.post("/v1/completions", json={"model": model, "prompt": prompt, "max_tokens": max_tokens,
                                                      "temperature": 0, **kw})
        assert r.status_code == 200, r.text
        return r.json()


def sse_events(lines):
    """Server-sent events as they arrive: parsed JSON objects, then the final "[DONE]"."""
    for line in lines:
        if line.startswith("data: "):
            data = line[len("data: "):]
            yield data if data == "[DONE]" else json.loads(data)


@pytest.fixture(scope="session")
def fp32_server(tmp_path_factory):
    """One real server (fp32, so greedy outputs match PEFT's exactly) shared by the HTTP tests."""
    server = ServerProcess("--dtype", "float32", "--max-gpu-adapters", "4", "--max-adapter-mb", "64",
                           adapter_dir=tmp_path_factory.mktemp("store") / "adapters")
    yield server
    server.stop()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny random Llama checkpoint (GQA, 2 layers) with the default model's tokenizer: fast engine tests."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
    out = tmp_path_factory.mktemp("tiny-llama")
    tok = AutoTokenizer.from_pretrained(default_model_dir())
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      tie_word_embeddings=True, eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id)
    LlamaForCausalLM(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def rerun_under_triton_interpreter(test_file: str) -> None:
    """Triton picks interpreter or compiler at its first import; a test module that needs the
    interpreter but found triton already compiled-mode runs itself again in a fresh process."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test_file],
                          env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]


@pytest.fixture(scope="session")
def default_tokenizer():
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(default_model_dir())
