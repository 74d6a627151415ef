"""Does each training method learn a held-out task on the default model? Accuracy, loss, step time.

    python bench/train_quality.py [--rank 16] [--steps 150] [--out bench/results/train_quality.json]

The task (generated deterministically): reverse the order of 3-5 words, in chat form. Every
method trains on the same rows with the same seed, step budget and learning rate; accuracy is exact
match on held-out rows, decoded greedily by loraplex's own engine with all adapters in one batch.
"""
from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch

from loraplex.runtime.adapters.peft_format import BaseShape, parse_adapter
from loraplex.runtime.adapters.registry import AdapterRef
from loraplex.runtime.base_model import load_base_model
from loraplex.runtime.engine import Engine, EngineConfig
from loraplex.runtime.sequence import SamplingParams
from loraplex.trainer.data import load_jsonl
from loraplex.trainer.loop import LoopConfig, evaluate
from loraplex.trainer.methods import AdapterSpec, load_model, load_tokenizer, training_device
from loraplex.trainer.train import TrainJob, train
import figures  # noqa: E402 - bench/, beside this file: a PNG beside the JSON

WORDS = ("apple river stone cloud green music table winter light paper horse silver garden ocean candle "
         "forest window bread yellow mountain train coffee violin tiger rocket purple island summer bridge "
         "pencil dragon orange castle planet mirror basket thunder lemon shadow engine").split()
INSTRUCTION = "Reverse the order of these words: "


def make_rows(n: int, rng: random.Random) -> list[dict]:
    rows = []
    for _ in range(n):
        words = rng.sample(WORDS, rng.randint(3, 5))
        rows.append({"messages": [{"role": "user", "content": INSTRUCTION + " ".join(words)},
                                  {"role": "assistant", "content": " ".join(reversed(words))}]})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def method_specs(rank: int) -> dict[str, AdapterSpec]:
    hybrid_r = rank // 4
    return {
        "lora": AdapterSpec("lora", rank=rank),
        "gralora": AdapterSpec("gralora", rank=rank),
        "hybrid gralora": AdapterSpec("gralora", rank=rank - hybrid_r, hybrid_r=hybrid_r, alpha=2 * rank),
        "flexora": AdapterSpec("flexora", rank=rank),
        "qlora": AdapterSpec("qlora", rank=rank),
    }


def accuracy(engine: Engine, tokenizer, rows: list[dict], adapters: dict[str, AdapterRef | None]) -> dict[str, float]:
    """Exact-match accuracy of every adapter, all decoded in one continuous batch."""
    requests, keys = [], []
    for name, ref in adapters.items():
        for row in rows:
            ids = tokenizer.apply_chat_template(row["messages"][:1], add_generation_prompt=True, tokenize=True)
            ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
            requests.append((ids, SamplingParams(max_tokens=24, temperature=0.0), ref))
            keys.append((name, row["messages"][1]["content"]))
    results = engine.generate(requests)
    hits: dict[str, int] = {name: 0 for name in adapters}
    for (name, answer), outs in zip(keys, results):
        hits[name] += "".join(o.text for o in outs).strip() == answer
    return {name: hits[name] / len(rows) for name in adapters}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--train-rows", type=int, default=2000)
    ap.add_argument("--test-rows", type=int, default=100)
    ap.add_argument("--methods", default="lora,gralora,hybrid gralora,flexora,qlora")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/loraplex-train-quality"))
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "train_quality.json")
    args = ap.parse_args()

    rng = random.Random(1234)
    args.workdir.mkdir(parents=True, exist_ok=True)
    train_path = write_jsonl(args.workdir / "train.jsonl", make_rows(args.train_rows, rng))
    test_rows = make_rows(args.test_rows, random.Random(99))
    test_path = write_jsonl(args.workdir / "test.jsonl", test_rows)
    device = training_device()
    tokenizer = load_tokenizer(None)
    test_examples, _ = load_jsonl(test_path, tokenizer, 128)

    base_model = load_model(None, "lora", device, False)
    rows = {"base": {"test_loss": evaluate(base_model, test_examples, args.batch_size, tokenizer.pad_token_id, device)}}
    del base_model

    specs = {k: v for k, v in method_specs(args.rank).items() if k in args.methods.split(",")}
    for name, spec in specs.items():
        out = args.workdir / name.replace(" ", "-")
        job = TrainJob(data=train_path, output=out, spec=spec, max_length=128,
                       loop=LoopConfig(lr=args.lr, max_steps=args.steps, batch_size=args.batch_size, seed=0,
                                       warmup=0.05, save_every=0, paged_adamw=spec.method == "qlora"),
                       flexora={"hypergrad": "first-order", "unroll": 1, "top_k": None, "search_steps": None,
                                "alpha_lr": 0.01, "val_batches": 1})
        started = time.perf_counter()
        outcome = train(job)
        s = outcome.summary
        rows[name] = {"test_loss": evaluate(outcome.model, test_examples, args.batch_size, tokenizer.pad_token_id, device),
                      "step_time_s": s["step_time_s"], "wall_s": time.perf_counter() - started,
                      "final_val_loss": s["final_val_loss"], "path": str(out),
                      "train_loss_history": s["train_loss_history"]}
        if spec.method == "flexora":
            rows[name]["layers_kept"] = s["selected_layers"]
        del outcome
        if device.type == "cuda":
            torch.cuda.empty_cache()

    base = load_base_model(None, quantization="none", dtype="float32" if device.type == "cpu" else "bfloat16")
    shape = BaseShape(base.num_layers, base.projection_shapes)
    refs: dict[str, AdapterRef | None] = {"base": None}
    for name in specs:
        path = Path(rows[name]["path"])
        weights = parse_adapter((path / "adapter_config.json").read_bytes(),
                                (path / "adapter_model.safetensors").read_bytes(), shape, max_rank=256)
        refs[name] = AdapterRef(name.replace(" ", "-"), 1, weights)
    engine = Engine(base, EngineConfig(max_gpu_adapters=len(refs), max_num_seqs=256))
    for name, acc in accuracy(engine, base.tokenizer, test_rows, refs).items():
        rows[name]["accuracy"] = acc

    lora_step = rows.get("lora", {}).get("step_time_s")
    print(f"\ntrain_quality: reverse 3-5 words (chat), default model, rank {args.rank}, {args.steps} steps x "
          f"batch {args.batch_size}, lr {args.lr}, device {device} "
          f"({torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'})")
    print(f"{'method':<16} {'accuracy':>9} {'test loss':>10} {'step time vs LoRA':>18}  layers kept")
    for name, r in rows.items():
        rel = f"{r['step_time_s'] / lora_step:.2f}" if lora_step and "step_time_s" in r else "-"
        r["step_time_vs_lora"] = None if rel == "-" else float(rel)
        kept = len(r["layers_kept"]) if "layers_kept" in r else ""
        print(f"{name:<16} {r['accuracy']:>9.2%} {r['test_loss']:>10.4f} {rel:>18}  {kept}")
    beats = {name: rows[name]["accuracy"] > rows["base"]["accuracy"] for name in specs}
    print("every method beats the base model:", all(beats.values()), beats)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"benchmark": "train_quality", "task": "reverse 3-5 words (chat)", "rank": args.rank,
                                    "steps": args.steps, "batch_size": args.batch_size, "lr": args.lr,
                                    "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                                    "train_rows": args.train_rows, "test_rows": args.test_rows,
                                    "rows": rows, "all_beat_base": all(beats.values())}, indent=2))
    print(f"wrote {args.out}")
    figures.draw_after_run(args.out)


if __name__ == "__main__":
    main()
