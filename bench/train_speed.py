"""Is `loraplex train` faster than the ordinary way? Tokens/s and peak memory against transformers `Trainer` + PEFT.

    python bench/train_speed.py [--shapes 1b,8b] [--methods lora,qlora,gralora,flexora] [--steps 24]
                                [--out bench/results/train_speed.json]
    python bench/train_speed.py --device cpu --shapes tiny --steps 3 --warmup 1   # the CI smoke run

Both sides train the same rows (prompt + completion of 32-512 tokens, loss on the completion), the same
random-weight checkpoint (Llama-3.2-1B / Llama-3.1-8B shapes, bench/serve_gpu_models.py), rank, batch,
learning rate, schedule (constant), optimiser (QLoRA: paged AdamW 32-bit on both) and gradient
checkpointing (QLoRA always, PEFT's prepare_model_for_kbit_training; the 8B shape also for LoRA and GraLoRA,
on both sides, so that the Trainer's padded batches fit 80 GB). The Trainer side is the ordinary recipe:
`DataCollatorForSeq2Seq` padding each batch to its longest row, `bf16=True`, its default optimiser for LoRA.
loraplex runs with its defaults (packing, fused linear + cross-entropy, compiled layers on CUDA).

tokens/s counts real tokens only (no padding), over the steps after --warmup (compilation and the
allocator's first steps excluded on both sides); peak memory is torch's max allocated over the training
loop, each case in a fresh process. Flexora's stage 1 (LoRA on every layer + a validation hyper-step after
each step) has no Trainer counterpart: its ratio is against the Trainer's LoRA. The 1B shape also checks,
on the GPU, that loraplex's fast path trains the same loss curve as its unfused path (`loss_match`).
Writes --out with a `summary` (the issue's ratios) and prints a table.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_gpu_models import SHAPES, write_checkpoint  # noqa: E402 - bench/, beside this file

SUMMARY_KEYS = ("lora_tok_s_over_peft_trainer", "qlora_tok_s_over_peft_trainer", "qlora_peak_mem_over_peft_trainer")


# -- the rows both sides train on ---------------------------------------------------------------------------
def make_rows(n: int, max_length: int, rng: random.Random) -> list[dict]:
    """Prompt and completion of 16 to max_length/2 tokens each (the bench tokenizer has no merges: a letter is
    one token)."""
    words = lambda k: "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(k))
    half = max_length // 2
    return [{"prompt": words(rng.randint(16, half - 2)), "completion": words(rng.randint(16, half - 2))}
            for _ in range(n)]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def steady(step_tokens: list[int], step_seconds: list[float], warmup: int) -> float:
    tokens, seconds = sum(step_tokens[warmup:]), sum(step_seconds[warmup:])
    return tokens / seconds if seconds else 0.0


# -- one case, in its own process ----------------------------------------------------------------------------
def run_loraplex(case: dict) -> dict:
    from loraplex.trainer.loop import LoopConfig
    from loraplex.trainer.methods import AdapterSpec
    from loraplex.trainer.train import TrainJob, train
    method, steps = case["method"], case["steps"]
    flexora = method == "flexora"
    job = TrainJob(data=Path(case["data"]), val=Path(case["val"]), output=Path(case["output"]), model=case["model"],
                   spec=AdapterSpec(method, rank=case["rank"]), max_length=case["max_length"],
                   loop=LoopConfig(lr=2e-4, schedule="constant", max_steps=1 if flexora else steps,
                                   batch_size=case["batch_size"], seed=0, paged_adamw=method == "qlora"),
                   gradient_checkpointing=case["gradient_checkpointing"],
                   packing=case.get("packing"), fused_ce=case.get("fused_ce"), compile=case.get("compile"),
                   flexora={"hypergrad": "first-order", "unroll": 1, "top_k": None, "search_steps": steps,
                            "alpha_lr": 0.01, "val_batches": 1})
    s = train(job).summary
    if flexora:  # stage 1 is the measured part; stage 2 ran one step
        s = json.loads((Path(case["output"]) / "flexora_report.json").read_text())["stage1"]
    return {"tok_s": steady(s["step_tokens"], s["step_seconds"], case["warmup"]), "peak_memory_gb": s["peak_memory_gb"],
            "losses": s["train_loss_history"], "speed": s["speed"], "speed_report": s.get("speed_report"),
            "steps": len(s["step_tokens"])}


class _CountingCollator:
    """The Trainer's collator, remembering each batch's real tokens (batches are collated in step order)."""

    def __init__(self, inner):
        self.inner, self.tokens, self.padded = inner, [], []

    def __call__(self, features):
        batch = self.inner(features)
        self.tokens.append(int(batch["attention_mask"].sum()))
        self.padded.append(batch["attention_mask"].numel())
        return batch


def run_peft_trainer(case: dict) -> dict:
    from peft import GraloraConfig, LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import (AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, DataCollatorForSeq2Seq,
                              Trainer, TrainerCallback, TrainingArguments)
    from loraplex.trainer.data import load_jsonl
    cuda = case["device"] == "cuda"
    method, rank = case["method"], case["rank"]
    tokenizer = AutoTokenizer.from_pretrained(case["model"])
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    examples, _ = load_jsonl(case["data"], tokenizer, case["max_length"])  # the very token ids loraplex trains on
    dataset = [{"input_ids": e.input_ids, "attention_mask": [1] * len(e.input_ids), "labels": e.labels} for e in examples]
    dtype = torch.bfloat16 if cuda else torch.float32
    if method == "qlora":
        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                   bnb_4bit_compute_dtype=torch.bfloat16)
        model = AutoModelForCausalLM.from_pretrained(case["model"], quantization_config=quant, dtype=torch.bfloat16,
                                                     device_map={"": case["device"]})
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    else:
        model = AutoModelForCausalLM.from_pretrained(case["model"], dtype=dtype).to(case["device"])
    model.config.use_cache = False
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    if method == "gralora":
        config = GraloraConfig(r=rank, alpha=2 * rank, gralora_k=2 if rank <= 32 else 4, target_modules=targets,
                               task_type="CAUSAL_LM")
    else:
        config = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=targets, task_type="CAUSAL_LM")
    model = get_peft_model(model, config)
    gc = case["gradient_checkpointing"] or method == "qlora"
    args = TrainingArguments(output_dir=case["output"], per_device_train_batch_size=case["batch_size"],
                             max_steps=case["steps"], learning_rate=2e-4, lr_scheduler_type="constant", warmup_steps=0,
                             weight_decay=0.0, max_grad_norm=1.0, bf16=cuda, use_cpu=not cuda, seed=0,
                             optim="paged_adamw_32bit" if method == "qlora" else TrainingArguments.optim,
                             gradient_checkpointing=gc, logging_strategy="no", save_strategy="no", report_to="none",
                             remove_unused_columns=False, disable_tqdm=True, dataloader_num_workers=0)
    collator = _CountingCollator(DataCollatorForSeq2Seq(tokenizer, padding="longest", label_pad_token_id=-100))
    times: list[float] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            if cuda:
                torch.cuda.synchronize()
            self.began = time.perf_counter()

        def on_step_end(self, *a, **k):
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - self.began)

    trainer = Trainer(model=model, args=args, train_dataset=dataset, data_collator=collator, callbacks=[Timer()])
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
    steps = len(times)
    return {"tok_s": steady(collator.tokens[:steps], times, case["warmup"]), "peak_memory_gb": peak, "steps": steps,
            "padding_fraction": 1 - sum(collator.tokens[:steps]) / max(1, sum(collator.padded[:steps]))}


def run_case(case: dict) -> dict:
    return run_peft_trainer(case) if case["impl"] == "peft_trainer" else run_loraplex(case)


def in_fresh_process(case: dict) -> dict:
    """A case in its own process (its peak memory its own); a failure is recorded, never fatal."""
    done = subprocess.run([sys.executable, __file__, "--worker", json.dumps(case)], capture_output=True, text=True)
    for line in reversed(done.stdout.splitlines()):
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    return {"error": (done.stderr or done.stdout)[-3000:]}


def worker(case_json: str) -> None:
    case = json.loads(case_json)
    try:
        result = run_case(case)
    except Exception:  # noqa: BLE001 - reported to the parent, which records it
        result = {"error": traceback.format_exc()[-3000:]}
    print("RESULT " + json.dumps(result), flush=True)


# -- the run ---------------------------------------------------------------------------------------------------
def cases_for(shape: str, methods: list[str], args) -> list[dict]:
    out = []
    for method in methods:
        out.append({"method": method, "impl": "loraplex"})
        if method != "flexora":
            out.append({"method": method, "impl": "peft_trainer"})
    if shape == "1b" and "lora" in methods:  # the GPU check: the fast path's loss curve is the unfused one's
        out.append({"method": "lora", "impl": "loraplex", "packing": False, "fused_ce": False, "compile": False,
                    "name": "lora/loraplex-unfused"})
    return out


def ratio(a, b):
    return round(a / b, 3) if isinstance(a, (int, float)) and isinstance(b, (int, float)) and b else None


def shape_summary(cases: dict) -> dict:
    get = lambda name, key: cases.get(name, {}).get(key)
    ratios = {}
    for method, base in (("lora", "lora"), ("qlora", "qlora"), ("gralora", "gralora"), ("flexora", "lora")):
        ratios[f"{method}_tok_s_over_peft_trainer"] = ratio(get(f"{method}/loraplex", "tok_s"),
                                                           get(f"{base}/peft_trainer", "tok_s"))
        ratios[f"{method}_peak_mem_over_peft_trainer"] = ratio(get(f"{method}/loraplex", "peak_memory_gb"),
                                                              get(f"{base}/peft_trainer", "peak_memory_gb"))
    return ratios


def loss_match(cases: dict) -> dict | None:
    fast, slow = cases.get("lora/loraplex", {}).get("losses"), cases.get("lora/loraplex-unfused", {}).get("losses")
    if not fast or not slow:
        return None
    worst = max(abs(a - b) / abs(b) for a, b in zip(fast, slow))
    return {"max_rel_diff": worst, "fast": fast, "unfused": slow, "within_bf16_noise": worst < 2e-2}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--shapes", default="1b,8b")
    ap.add_argument("--methods", default="lora,qlora,gralora,flexora")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--warmup", type=int, default=6, help="first steps left out of tokens/s")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/train_speed"))
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "train_speed.json")
    args = ap.parse_args()
    if args.worker:
        return worker(args.worker)

    methods = args.methods.split(",")
    result = json.loads(args.out.read_text()) if args.out.exists() else {}
    if result.get("benchmark") != "train_speed":
        result = {"benchmark": "train_speed", "shapes": {}}
    result["device"] = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    result["settings"] = {"steps": args.steps, "warmup": args.warmup, "batch_size": args.batch_size,
                          "max_length": args.max_length, "rank": args.rank, "methods": methods,
                          "rows": "prompt + completion, 16 to max_length/2 tokens each, loss on the completion"}
    for shape_name in args.shapes.split(","):
        shape = SHAPES[shape_name]
        root = args.workdir / shape_name
        root.mkdir(parents=True, exist_ok=True)
        began = time.perf_counter()
        model = write_checkpoint(shape, root / "model", args.device)
        print(f"{shape.name}: checkpoint ready in {time.perf_counter() - began:.0f} s", flush=True)
        rng = random.Random(0)
        data = write_jsonl(root / "train.jsonl", make_rows(args.batch_size * (args.steps + 2), args.max_length, rng))
        val = write_jsonl(root / "val.jsonl", make_rows(args.batch_size, args.max_length, rng))
        cases = result["shapes"].get(shape_name, {}).get("cases", {})  # a later run adds its methods
        for spec in cases_for(shape_name, methods, args):
            name = spec.pop("name", f"{spec['method']}/{spec['impl']}")
            case = {**spec, "model": str(model), "data": str(data), "val": str(val), "output": str(root / name),
                    "device": args.device, "steps": args.steps, "warmup": args.warmup, "batch_size": args.batch_size,
                    "max_length": args.max_length, "rank": args.rank, "gradient_checkpointing": shape_name == "8b"}
            began = time.perf_counter()
            r = in_fresh_process(case) if args.device == "cuda" else _in_process(case)
            if "error" in r and spec["impl"] == "loraplex" and spec.get("compile") is None:
                r = {**(in_fresh_process({**case, "compile": False}) if args.device == "cuda"
                        else _in_process({**case, "compile": False})), "compile_error": r["error"]}
            r["wall_s"] = round(time.perf_counter() - began, 1)
            cases[name] = r
            print(f"  {name}: " + (f"{r['tok_s']:.0f} tok/s, peak {r['peak_memory_gb'] or 0:.1f} GB"
                                   if "tok_s" in r else "FAILED " + r["error"][-400:]) + f" ({r['wall_s']} s)", flush=True)
            result["shapes"][shape_name] = {"model": shape.name, "cases": cases, "ratios": shape_summary(cases),
                                            "loss_match": loss_match(cases)}
            write(result, args.out)  # as it goes: a run cut short keeps what it measured
    print_table(result)
    write(result, args.out)
    print(f"wrote {args.out}")


def _in_process(case: dict) -> dict:
    try:
        return run_case(case)
    except Exception:  # noqa: BLE001 - recorded like a worker's failure
        return {"error": traceback.format_exc()[-3000:]}


def write(result: dict, out: Path) -> None:
    summary = {}
    for shape in ("8b", "1b"):
        ratios = result["shapes"].get(shape, {}).get("ratios", {})
        for key in SUMMARY_KEYS:
            summary[f"{key}_{shape}"] = ratios.get(key)
    result["summary"] = summary
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2))
    os.replace(tmp, out)


def print_table(result: dict) -> None:
    print(f"\ntrain_speed on {result['device']}: loraplex train vs transformers Trainer + PEFT "
          f"(tokens/s of real tokens; peak = max allocated)")
    print(f"{'shape':<6} {'method':<9} {'loraplex tok/s':>15} {'Trainer tok/s':>14} {'speed-up':>9} "
          f"{'loraplex GB':>12} {'Trainer GB':>11} {'memory':>7}")
    for shape, s in result["shapes"].items():
        cases, ratios = s["cases"], s["ratios"]
        for method in ("lora", "qlora", "gralora", "flexora"):
            mine = cases.get(f"{method}/loraplex")
            if mine is None:
                continue
            theirs = cases.get(f"{'lora' if method == 'flexora' else method}/peft_trainer", {})
            fmt = lambda v, spec: format(v, spec) if isinstance(v, (int, float)) else "-"
            print(f"{shape:<6} {method:<9} {fmt(mine.get('tok_s'), '15.0f')} {fmt(theirs.get('tok_s'), '14.0f')} "
                  f"{fmt(ratios[f'{method}_tok_s_over_peft_trainer'], '9.2f')} {fmt(mine.get('peak_memory_gb'), '12.1f')} "
                  f"{fmt(theirs.get('peak_memory_gb'), '11.1f')} {fmt(ratios[f'{method}_peak_mem_over_peft_trainer'], '7.2f')}")
        if s.get("loss_match"):
            print(f"{shape:<6} loss curve, fast path vs unfused: max relative difference {s['loss_match']['max_rel_diff']:.2e}")
    print("summary:", json.dumps(result["summary"]))


if __name__ == "__main__":
    main()
