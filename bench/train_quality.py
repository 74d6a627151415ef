"""Which training method should I pick? The comparisons the LoRA-variant papers make, on a task the default model
does not saturate, each over 3 seeds (mean ± std) with a one-line verdict.

    python bench/train_quality.py [--steps 120] [--seeds 0,1,2] [--comparisons gralora,hybrid,flexora,qlora]
                                  [--out bench/results/train_quality.json]
    python bench/train_quality.py --smoke --model TINY_CHECKPOINT   # the CI run: 1 seed, 2 steps, rank 4

Task (generated, nothing downloaded): add two --digits-digit numbers ("What is 48213 + 90872?" → "139085"),
chat form. Carries make it compositional: the base model scores near 0 and a short run moves it without
finishing it. Held-out rows are number pairs no training row holds. Metric: exact match, greedy decoding of
the trained PEFT model (and the held-out loss per completion token).

Comparisons (the same rows, steps, batch and learning rate everywhere; a method's trainable-parameter
budget equals LoRA's at the same rank, as GraLoRA's paper holds it: GraLoRA rank r with k blocks has
exactly LoRA rank r's parameters, hybrid splits r between the two):
- gralora: LoRA vs GraLoRA k=2 and k=4 at ranks 16, 64, 128 (claim: GraLoRA ≥ LoRA, the gap growing with rank).
- hybrid: LoRA vs GraLoRA k=4 vs hybrid GraLoRA (k=4, r·3/4 + hybrid r/4) at rank 64.
- flexora: Flexora (its layers chosen in stage 1) vs LoRA on all layers vs LoRA on as many randomly chosen
  layers, rank 16 (claim: Flexora beats both).
- qlora: QLoRA vs LoRA at rank 16 (claim: NF4 base costs little accuracy).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import time
from dataclasses import replace
from pathlib import Path

import torch

from loraplex.trainer.data import load_jsonl
from loraplex.trainer.loop import LoopConfig, evaluate
from loraplex.trainer.methods import AdapterSpec, load_model, load_tokenizer, training_device
from loraplex.trainer.objective import SpeedConfig
from loraplex.trainer.train import TrainJob, train

COMPARISONS = ("gralora", "hybrid", "flexora", "qlora")
SETTINGS = ("task", "model", "steps", "batch_size", "lr", "seeds", "ranks", "train_rows", "test_rows", "device")


# -- the task ---------------------------------------------------------------------------------------------------
def make_rows(n: int, digits: int, rng: random.Random, exclude: set | None = None) -> list[dict]:
    """n addition rows of two `digits`-digit numbers; pairs in `exclude` are skipped, pairs taken are added."""
    rows, seen = [], exclude if exclude is not None else set()
    low, high = 10 ** (digits - 1), 10 ** digits - 1
    while len(rows) < n:
        a, b = rng.randint(low, high), rng.randint(low, high)
        if (a, b) in seen:
            continue
        seen.add((a, b))
        rows.append({"messages": [{"role": "user", "content": f"What is {a} + {b}?"},
                                  {"role": "assistant", "content": str(a + b)}]})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@torch.no_grad()
def exact_match(model, tokenizer, rows: list[dict], device, max_new_tokens: int, batch_size: int = 64) -> float:
    """Greedy answers of the model (a PEFT model or the base) against the rows' answers."""
    model.eval()
    tokenizer.padding_side = "left"
    hits = 0
    for i in range(0, len(rows), batch_size):
        chunk = rows[i:i + batch_size]
        prompts = [tokenizer.apply_chat_template(r["messages"][:1], tokenize=False, add_generation_prompt=True)
                   for r in chunk]
        enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, use_cache=True,
                             pad_token_id=tokenizer.pad_token_id)
        answers = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        hits += sum(a.strip() == r["messages"][1]["content"] for a, r in zip(answers, chunk))
    return hits / len(rows)


# -- the runs ---------------------------------------------------------------------------------------------------
def spec_for(label: str, rank: int) -> AdapterSpec:
    """'lora', 'gralora k2', 'gralora k4', 'hybrid k4', 'flexora', 'qlora' at a rank (alpha = 2 x rank everywhere)."""
    if label.startswith("gralora"):
        return AdapterSpec("gralora", rank=rank, gralora_k=int(label[-1]), alpha=2 * rank)
    if label.startswith("hybrid"):
        return AdapterSpec("gralora", rank=rank * 3 // 4, hybrid_r=rank // 4, gralora_k=int(label[-1]), alpha=2 * rank)
    return AdapterSpec(label, rank=rank, alpha=2 * rank)


def plan(comparisons: list[str], ranks: dict) -> list[tuple[str, int]]:
    """(method label, rank) pairs to train, each once per seed; shared runs (LoRA r16) listed once."""
    runs = []
    add = lambda run: runs.append(run) if run not in runs else None
    if "gralora" in comparisons:
        for r in ranks["gralora"]:
            for label in ("lora", "gralora k2", "gralora k4"):
                add((label, r))
    if "hybrid" in comparisons:
        for label in ("lora", "gralora k4", "hybrid k4"):
            add((label, ranks["hybrid"]))
    if "flexora" in comparisons:
        for label in ("lora", "flexora", "lora random layers"):  # random layers after flexora: it takes its count
            add((label, ranks["flexora"]))
    if "qlora" in comparisons:
        for label in ("lora", "qlora"):
            add((label, ranks["qlora"]))
    return runs


def train_one(label: str, rank: int, seed: int, layers_kept: list[int] | None, context: dict) -> dict:
    """One run: train, then the held-out exact match and loss. layers_kept: Flexora's layers for this rank and seed
    (a 'lora random layers' run takes as many random layers)."""
    args, paths, tokenizer = context["args"], context["paths"], context["tokenizer"]
    spec = spec_for("lora" if label == "lora random layers" else label, rank)
    if label == "lora random layers":
        count = len(layers_kept)
        spec = replace(spec, layers_to_transform=sorted(random.Random(1000 + seed).sample(range(args.num_layers), count)))
    out = args.workdir / f"{label.replace(' ', '-')}-r{rank}-s{seed}"
    job = TrainJob(data=paths["train"], val=paths["val"], output=out, spec=spec, model=args.model, max_length=64,
                   loop=LoopConfig(lr=args.lr, max_steps=args.steps, batch_size=args.batch_size, seed=seed,
                                   warmup=0.05, save_every=0, paged_adamw=spec.method == "qlora"),
                   compile=False,  # ~40 short runs: compiling each would cost more than it saves
                   flexora={"hypergrad": "first-order", "unroll": 1, "top_k": None, "search_steps": None,
                            "alpha_lr": 0.01, "val_batches": 1})
    began = time.perf_counter()
    outcome = train(job)
    device = training_device()
    row = {"accuracy": exact_match(outcome.model, tokenizer, context["test_rows"], device, args.digits + 3),
           "test_loss": evaluate(outcome.model, context["test_examples"], args.batch_size, tokenizer.pad_token_id,
                                 device, speed=SpeedConfig.resolve(device)),
           "final_train_loss": outcome.summary["final_train_loss"], "wall_s": round(time.perf_counter() - began, 1)}
    if spec.method == "flexora":
        row["layers"] = outcome.summary["selected_layers"]
    if spec.layers_to_transform is not None:
        row["layers"] = spec.layers_to_transform
    del outcome
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def load_context(args, paths: dict) -> dict:
    """What every run reads: the settings, the data files, the tokenizer and the held-out rows."""
    tokenizer = load_tokenizer(args.model)
    test_examples, _ = load_jsonl(paths["test"], tokenizer, 64)
    test_rows = [json.loads(line) for line in paths["test"].read_text().splitlines()]
    return {"args": args, "paths": paths, "tokenizer": tokenizer, "test_examples": test_examples,
            "test_rows": test_rows}


_WORKER: dict = {}  # a worker process's context (set once by start_worker)


def start_worker(args, paths: dict, threads: int) -> None:
    torch.set_num_threads(threads)
    _WORKER.update(load_context(args, paths))


def run_in_worker(label: str, rank: int, seed: int, layers_kept) -> dict:
    return train_one(label, rank, seed, layers_kept, _WORKER)


def run_jobs(jobs: list[tuple[str, int, int]], workers: int, args, paths: dict, context: dict | None,
             flexora_layers: dict):
    """Yield (job, row) as runs finish. With workers > 1 the runs share the GPU from that many processes (a
    135M-parameter model leaves the GPU idle between one process's kernels); a 'lora random layers' run is started
    once the Flexora run of its rank and seed has chosen its layers. Flexora runs (two stages, the longest) first."""
    jobs = sorted(jobs, key=lambda j: j[0] != "flexora")
    ready = lambda j: j[0] != "lora random layers" or (j[1], j[2]) in flexora_layers
    if workers <= 1:
        while jobs:
            job = next(j for j in jobs if ready(j))
            jobs.remove(job)
            yield job, train_one(*job, flexora_layers.get((job[1], job[2])), context)
        return
    import multiprocessing
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
    threads = max(1, (os.cpu_count() or 2) // workers)
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"), initializer=start_worker,
                             initargs=(args, paths, threads)) as pool:
        running: dict = {}
        while jobs or running:
            for job in [j for j in jobs if ready(j)]:
                jobs.remove(job)
                running[pool.submit(run_in_worker, *job, flexora_layers.get((job[1], job[2])))] = job
            if not running:
                raise RuntimeError(f"runs that wait on a Flexora run that never ran: {jobs}")
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in done:
                yield running.pop(future), future.result()


# -- the verdicts -----------------------------------------------------------------------------------------------
def stats(values: list[float]) -> dict:
    return {"per_seed": values, "mean": statistics.fmean(values),
            "std": statistics.stdev(values) if len(values) > 1 else 0.0}


def versus(a: dict, b: dict) -> tuple[float, str]:
    """a's mean minus b's, and whether that gap is beyond the seeds' spread (the larger std)."""
    gap = a["mean"] - b["mean"]
    noise = max(a["std"], b["std"])
    if abs(gap) <= noise or gap == 0:
        return gap, "within noise"
    return gap, "ahead" if gap > 0 else "behind"


def pts(x: float) -> str:
    return f"{100 * x:+.1f} pts"


def comparisons_report(results: dict, comparisons: list[str], ranks: dict) -> list[dict]:
    g = lambda label, rank: results.get(f"{label} r{rank}", {}).get("accuracy")
    report = []
    if "gralora" in comparisons:
        groups, gaps = {}, {}
        for r in ranks["gralora"]:
            for label in ("lora", "gralora k2", "gralora k4"):
                if g(label, r):
                    groups[f"{label} r{r}"] = g(label, r)
            if g("lora", r) and g("gralora k4", r) and g("gralora k2", r):
                best = max((g("gralora k2", r), g("gralora k4", r)), key=lambda s: s["mean"])
                gaps[r] = versus(best, g("lora", r))
        if gaps:
            ordered = [gaps[r][0] for r in sorted(gaps)]
            grows = all(b >= a for a, b in zip(ordered, ordered[1:])) and ordered[-1] > ordered[0]
            ahead_all = all(v[1] == "ahead" for v in gaps.values())
            detail = ", ".join(f"r{r}: {pts(gap)} ({word})" for r, (gap, word) in sorted(gaps.items()))
            holds = "holds" if ahead_all and grows else ("partly holds" if any(v[1] == "ahead" for v in gaps.values())
                                                          else "does not hold")
            verdict = (f"{holds} at this scale: best GraLoRA minus LoRA {detail}; the gap "
                       f"{'grows' if grows else 'does not grow'} with rank")
            report.append({"comparison": "gralora", "claim": "GraLoRA beats LoRA at the same rank, more so at higher rank",
                           "metric": "held-out exact match", "groups": groups, "verdict": verdict})
    if "hybrid" in comparisons:
        r = ranks["hybrid"]
        if g("hybrid k4", r) and g("lora", r) and g("gralora k4", r):
            gl, wl = versus(g("hybrid k4", r), g("lora", r))
            gg, wg = versus(g("hybrid k4", r), g("gralora k4", r))
            holds = "holds" if wl == "ahead" and wg != "behind" else ("does not hold" if wl == "behind" else "unclear")
            report.append({"comparison": "hybrid", "claim": "hybrid GraLoRA (r/4 shared LoRA) beats LoRA and matches "
                           "or beats GraLoRA at the same budget", "metric": "held-out exact match",
                           "groups": {f"{k} r{r}": g(k, r) for k in ("lora", "gralora k4", "hybrid k4")},
                           "verdict": f"{holds} at rank {r}: hybrid vs LoRA {pts(gl)} ({wl}), vs GraLoRA {pts(gg)} ({wg})"})
    if "flexora" in comparisons:
        r = ranks["flexora"]
        if g("flexora", r) and g("lora", r) and g("lora random layers", r):
            ga, wa = versus(g("flexora", r), g("lora", r))
            gr, wr = versus(g("flexora", r), g("lora random layers", r))
            holds = "holds" if wa == "ahead" and wr == "ahead" else (
                "does not hold" if "behind" in (wa, wr) else "not shown (within noise)")
            layers = results.get(f"flexora r{r}", {}).get("layer_counts")
            report.append({"comparison": "flexora", "claim": "Flexora's chosen layers beat LoRA on all layers and LoRA on "
                           "as many random layers", "metric": "held-out exact match",
                           "groups": {f"{k} r{r}": g(k, r) for k in ("flexora", "lora", "lora random layers")},
                           "verdict": f"{holds}: Flexora vs all layers {pts(ga)} ({wa}), vs random layers {pts(gr)} "
                                      f"({wr}); layers kept per seed {layers}"})
    if "qlora" in comparisons:
        r = ranks["qlora"]
        if g("qlora", r) and g("lora", r):
            gap, word = versus(g("qlora", r), g("lora", r))
            holds = "holds" if word != "behind" else "does not hold"
            report.append({"comparison": "qlora", "claim": "QLoRA (NF4 base) matches LoRA", "metric": "held-out exact match",
                           "groups": {f"{k} r{r}": g(k, r) for k in ("qlora", "lora")},
                           "verdict": f"{holds}: QLoRA vs LoRA {pts(gap)} ({word})"})
    return report


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--comparisons", default=",".join(COMPARISONS))
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--digits", type=int, default=5, help="digits of each addend (the task's difficulty)")
    ap.add_argument("--train-rows", type=int, default=4000)
    ap.add_argument("--test-rows", type=int, default=200)
    ap.add_argument("--model", default=None, help="default: SmolLM2-135M-Instruct")
    ap.add_argument("--workers", type=int, default=None,
                    help="runs at once, each in its own process (default: 1 on the CPU; on CUDA half the cores, at "
                         "most 8: the small model leaves the GPU idle between one process's kernels)")
    ap.add_argument("--smoke", action="store_true", help="CI: 1 seed, 2 steps, small ranks, 8 test rows")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/loraplex-train-quality"))
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "train_quality.json")
    args = ap.parse_args()
    comparisons = args.comparisons.split(",")
    seeds = [int(s) for s in args.seeds.split(",")]
    ranks = {"gralora": [16, 64, 128], "hybrid": 64, "flexora": 16, "qlora": 16}
    if args.smoke:
        seeds, args.steps, args.batch_size, args.train_rows, args.test_rows = [0], 2, 4, 32, 8
        ranks = {"gralora": [4], "hybrid": 16, "flexora": 4, "qlora": 4}

    args.workdir.mkdir(parents=True, exist_ok=True)
    taken: set = set()
    test_rows = make_rows(args.test_rows, args.digits, random.Random(99), taken)
    paths = {"test": write_jsonl(args.workdir / "test.jsonl", test_rows),
             "val": write_jsonl(args.workdir / "val.jsonl", make_rows(max(16, args.batch_size), args.digits,
                                                                      random.Random(98), taken)),
             "train": write_jsonl(args.workdir / "train.jsonl", make_rows(args.train_rows, args.digits,
                                                                          random.Random(1234), taken))}
    device = training_device()
    workers = args.workers if args.workers is not None else (min(8, (os.cpu_count() or 2) // 2)
                                                             if device.type == "cuda" else 1)
    context = load_context(args, paths)
    base = load_model(args.model, "lora", device, False)
    args.num_layers = base.config.num_hidden_layers
    base_row = {"accuracy": exact_match(base, context["tokenizer"], test_rows, device, args.digits + 3),
                "test_loss": evaluate(base, context["test_examples"], args.batch_size,
                                      context["tokenizer"].pad_token_id, device)}
    del base
    if device.type == "cuda":
        torch.cuda.empty_cache()

    result = {"benchmark": "train_quality", "task": f"add two {args.digits}-digit numbers (chat), exact match",
              "model": args.model or "SmolLM2-135M-Instruct", "steps": args.steps, "batch_size": args.batch_size,
              "lr": args.lr, "seeds": seeds, "ranks": ranks, "train_rows": args.train_rows, "test_rows": args.test_rows,
              "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "workers": workers,
              "base": base_row, "runs": {}}
    print(f"base model: exact match {base_row['accuracy']:.1%}, held-out loss {base_row['test_loss']:.3f}", flush=True)
    previous = json.loads(args.out.read_text()) if args.out.exists() else {}
    if all(previous.get(k) == result[k] for k in SETTINGS):  # a run split over calls (or cut short) goes on
        result["runs"] = previous.get("runs", {})
    flexora_layers: dict = {}
    jobs = []
    for label, rank in plan(comparisons, ranks):
        done = result["runs"].get(f"{label} r{rank}")
        if done:
            print(f"  {label} r{rank}: kept from {args.out}", flush=True)
            if label == "flexora":
                flexora_layers.update({(rank, seed): row["layers"] for seed, row in zip(seeds, done["seeds"])})
            continue
        jobs += [(label, rank, seed) for seed in seeds]
    per_seed: dict = {}
    began = time.perf_counter()
    for (label, rank, seed), row in run_jobs(jobs, workers, args, paths, context, flexora_layers):
        name = f"{label} r{rank}"
        if label == "flexora":
            flexora_layers[(rank, seed)] = row["layers"]
        per_seed.setdefault(name, {})[seed] = row
        print(f"  {name} seed {seed}: exact match {row['accuracy']:.1%}, held-out loss {row['test_loss']:.3f} "
              f"({row['wall_s']} s)", flush=True)
        if len(per_seed[name]) == len(seeds):
            runs = [per_seed[name][s] for s in seeds]
            result["runs"][name] = {"accuracy": stats([r["accuracy"] for r in runs]),
                                    "test_loss": stats([r["test_loss"] for r in runs]), "seeds": runs}
            write(result, args.out)  # as it goes: a run cut short keeps what it measured
    result["runs"] = {f"{label} r{rank}": result["runs"][f"{label} r{rank}"] for label, rank in plan(comparisons, ranks)
                      if f"{label} r{rank}" in result["runs"]} | result["runs"]  # the plan's order
    result["wall_s_this_call"] = round(time.perf_counter() - began, 1)

    best = max(result["runs"].items(), key=lambda kv: kv[1]["accuracy"]["mean"])
    result["best"] = {"run": best[0], "accuracy": best[1]["accuracy"]["mean"],
                      "saturated": best[1]["accuracy"]["mean"] >= 0.95,
                      "over_base": best[1]["accuracy"]["mean"] - base_row["accuracy"]}
    write(result, args.out)
    print(f"\ntrain_quality: {result['task']}, {args.steps} steps x batch {args.batch_size}, lr {args.lr}, "
          f"seeds {seeds}, device {result['device']}; base {base_row['accuracy']:.1%}")
    print(f"{'run':<26} {'exact match (mean ± std)':>25} {'held-out loss':>14}")
    for name, r in result["runs"].items():
        a, l = r["accuracy"], r["test_loss"]
        print(f"{name:<26} {100 * a['mean']:>17.1f} ± {100 * a['std']:<5.1f} {l['mean']:>14.3f}")
    for c in result["comparisons"]:
        print(f"{c['comparison']}: {c['verdict']}")
    print(f"best: {best[0]} {result['best']['accuracy']:.1%} ({'saturated' if result['best']['saturated'] else 'not saturated'})")
    print(f"wrote {args.out}")
    import figures  # bench/, beside this file: a PNG beside the JSON
    figures.draw_after_run(args.out)


def write(result: dict, out: Path) -> None:
    """The JSON, with the comparisons' verdicts from every run it holds so far."""
    summary = {k: {"accuracy": v["accuracy"], "layer_counts": [len(s["layers"]) for s in v["seeds"] if "layers" in s]}
               for k, v in result["runs"].items()}
    result["comparisons"] = comparisons_report(summary, list(COMPARISONS), result["ranks"])
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2))
    tmp.replace(out)


if __name__ == "__main__":
    main()
