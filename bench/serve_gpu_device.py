"""bench/serve_gpu.py's device work outside the server, each piece in a fresh process so the benchmark
never holds accelerator memory: copy bandwidth, checkpoints written, and the HF transformers + PEFT
baseline; plus the token-id prompts every wave sends."""
from __future__ import annotations

import multiprocessing
import os
import platform
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

from serve_gpu_models import SPECIAL_TOKENS, ModelShape, write_checkpoint

# -- device work, each in a fresh process so this one never holds accelerator memory -----------------------
def in_fresh_process(fn, *args):
    """fn(*args) in a spawned child: accelerator memory is gone when it returns."""
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(fn, *args).result()


def copy_bandwidth(device: str) -> float:
    """Bytes read + written per second by a large device-to-device copy; median of 10."""
    n = (1 << 30) if device == "cuda" else (1 << 26)
    src = torch.ones(n, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    times = []
    for _ in range(10):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            dst.copy_(src)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1000)
        else:
            t = time.perf_counter()
            dst.copy_(src)
            times.append(time.perf_counter() - t)
    return 2 * n / statistics.median(times)


def matmul_peak(device: str) -> float:
    """FLOP/s of a large matrix product on random data (CUDA: bf16 8192^3; CPU: fp32 1024^3); median of 10."""
    n, dtype = (8192, torch.bfloat16) if device == "cuda" else (1024, torch.float32)
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    for _ in range(3):
        a @ b
    times = []
    for _ in range(10):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            a @ b
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1000)
        else:
            t = time.perf_counter()
            a @ b
            times.append(time.perf_counter() - t)
    return 2 * n ** 3 / statistics.median(times)


def prepare_device(shapes: list[ModelShape], paths: list[str], device: str, with_matmul: bool = False) -> dict:
    """Write the missing checkpoints (random numbers drawn on the device), measure copy bandwidth (and the
    matmul peak)."""
    timings = {}
    for shape, path in zip(shapes, paths):
        t = time.perf_counter()
        write_checkpoint(shape, Path(path), device)
        timings[shape.name] = time.perf_counter() - t
    if device == "cuda":
        name = torch.cuda.get_device_name()
        torch.cuda.empty_cache()
    else:
        name = f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    return {"device": name, "copy_bandwidth_bytes_per_s": copy_bandwidth(device), "checkpoint_seconds": timings,
            "torch": torch.__version__, **({"matmul_peak_flops": matmul_peak(device)} if with_matmul else {})}


def prompt_ids(rows: int, length: int, vocab: int, salt: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(salt)
    return torch.randint(len(SPECIAL_TOKENS), vocab, (rows, length), generator=g).tolist()


def hf_peft_baseline(model_dir: str, adapter_dirs: list[str], device: str, prompt_len: int, new_tokens: int,
                     vocab: int) -> dict:
    """HF transformers + PEFT generate, batch = len(adapter_dirs): the base alone, one adapter, and every row
    its own adapter in one batch (PEFT's mixed-batch `adapter_names`). NF4 on CUDA with the server's settings."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig
    quant = None
    if device == "cuda":
        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                   bnb_4bit_compute_dtype=torch.bfloat16)
    t = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16, quantization_config=quant,
                                                 device_map=device)
    model.eval()
    load_s = time.perf_counter() - t
    batch = len(adapter_dirs)
    ids = torch.tensor(prompt_ids(batch, prompt_len, vocab, salt=777), device=device)

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    def generate(net, tokens, **kw) -> dict:
        sync()
        t = time.perf_counter()
        with torch.inference_mode():
            out = net.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=tokens,
                               min_new_tokens=tokens, do_sample=False, pad_token_id=3, **kw)
        sync()
        seconds = time.perf_counter() - t
        generated = (out.shape[1] - ids.shape[1]) * batch
        return {"seconds": seconds, "completion_tokens": generated, "tokens_per_s": generated / seconds}

    generate(model, 2)
    base = generate(model, new_tokens)
    t = time.perf_counter()
    names = [f"a{i}" for i in range(batch)]
    peft_model = PeftModel.from_pretrained(model, adapter_dirs[0], adapter_name=names[0])
    for name, d in zip(names[1:], adapter_dirs[1:]):
        peft_model.load_adapter(d, adapter_name=name)
    adapters_load_s = time.perf_counter() - t
    peft_model.set_adapter(names[0])
    generate(peft_model, 2)
    one = generate(peft_model, new_tokens)
    generate(peft_model, 2, adapter_names=names)
    mixed = generate(peft_model, new_tokens, adapter_names=names)
    import peft
    import transformers
    return {"batch": batch, "new_tokens": new_tokens, "prompt_tokens": prompt_len,
            "quantization": "nf4 (bitsandbytes, double quant, bf16 compute)" if quant else "none (bf16)",
            "base": base, "one_adapter": one, "mixed": mixed, "model_load_seconds": load_s,
            "adapters_load_seconds": adapters_load_s, "peak_memory_bytes":
                torch.cuda.max_memory_allocated() if device == "cuda" else None,
            "transformers": transformers.__version__, "peft": peft.__version__}


def fast_path_fidelity(model_dir: str, device: str) -> dict:
    """tests/test_gpu_fastpath.py's check on this checkpoint: the fast path's pieces, alone and together,
    against the eager reference (teacher-forced, bounded by eager bf16's own error against fp32), and a
    negative control. On a CPU only the merged rows exist of the fast path."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from test_gpu_fastpath import PIECES, fast_path_report
    pieces = PIECES if device == "cuda" else {"merged": PIECES["merged"]}
    report, failed = fast_path_report(device, pieces, model_dir)
    return {"passed": not failed, "failed": failed, "pieces": list(pieces), "report": report}
