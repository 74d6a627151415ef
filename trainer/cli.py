"""Arguments of `loraplex train` (a contract: other tools use these flag names) and its entry point."""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path

from loraplex.runtime.model import PROJECTIONS


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--method", required=True, choices=["lora", "qlora", "gralora", "flexora"])
    p.add_argument("--data", required=True, type=Path, help="training JSONL: {prompt, completion} or {messages}")
    p.add_argument("--val", type=Path, default=None, help="validation JSONL (default: carved from --data)")
    p.add_argument("--val-fraction", type=float, default=0.1, help="share of --data held out when --val is absent")
    p.add_argument("--output", required=True, type=Path, help="directory for the PEFT adapter and reports")
    p.add_argument("--model", default=None, help="local Hugging Face checkpoint (default: SmolLM2-135M-Instruct)")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--alpha", type=float, default=None, help="scaling numerator (default: 2 x rank)")
    p.add_argument("--dropout", type=float, default=0.0)
    p.add_argument("--target-modules", nargs="+", default=list(PROJECTIONS),
                   help="projections to adapt, space or comma separated (default: all seven linear projections)")
    p.add_argument("--use-rslora", action="store_true", help="scale by alpha/sqrt(rank) (rsLoRA)")
    p.add_argument("--use-dora", action="store_true", help="DoRA: LoRA plus a trained magnitude per output channel "
                   "(--method lora or qlora)")
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--schedule", choices=["cosine", "linear", "constant"], default="cosine")
    p.add_argument("--warmup", type=float, default=0, help="warm-up steps (a value below 1 is a fraction of all steps)")
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--max-steps", type=int, default=None, help="optimiser steps (overrides --epochs)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--save-every", type=int, default=50, help="checkpoint every N steps (0: only at the end)")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --output")
    p.add_argument("--skip-bad-rows", action="store_true", help="skip malformed rows (counted) instead of failing")
    s = p.add_argument_group("speed (each on by default on CUDA, off on the CPU; the loss is the same either way)")
    s.add_argument("--packing", action=argparse.BooleanOptionalAction, default=None,
                   help="lay a micro-batch's rows end to end without padding, attention kept within each row")
    s.add_argument("--fused-ce", action=argparse.BooleanOptionalAction, default=None,
                   help="fused lm_head + cross-entropy over target tokens only: the vocabulary logits are never stored")
    s.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the decoder layers (not during Flexora's layer search)")
    g = p.add_argument_group("GraLoRA")
    g.add_argument("--gralora-k", type=int, default=None, help="blocks per side (default: 2 for rank <= 32, else 4)")
    g.add_argument("--hybrid-r", type=int, default=0, help="rank of the shared plain-LoRA part (hybrid GraLoRA)")
    f = p.add_argument_group("Flexora")
    f.add_argument("--flexora-hypergrad", choices=["first-order", "unrolled"], default="first-order")
    f.add_argument("--flexora-unroll", type=int, default=1, help="inner steps differentiated through (unrolled)")
    f.add_argument("--flexora-top-k", type=int, default=None, help="keep the k layers of largest alpha (default: alpha above mean)")
    f.add_argument("--flexora-search-steps", type=int, default=None, help="stage-1 steps (default: as many as stage 2)")
    f.add_argument("--flexora-alpha-lr", type=float, default=0.01)
    f.add_argument("--flexora-val-batches", type=int, default=1, help="validation batches per hyper-step")
    u = p.add_argument_group("upload")
    u.add_argument("--upload", default=None, metavar="URL", help="upload the adapter to a running loraplex server")
    u.add_argument("--api-key", default=os.environ.get("LORAPLEX_API_KEY"), help="default: $LORAPLEX_API_KEY")
    u.add_argument("--adapter-id", default=None, help="id for --upload (default: the output directory's name)")
    u.add_argument("--verbose", action="store_true", help="also print the libraries' progress bars and log each HTTP request of --upload")


def job_from_args(args):
    from .loop import LoopConfig
    from .methods import AdapterSpec
    from .train import TrainJob
    targets = tuple(t for item in args.target_modules for t in item.split(",") if t)
    spec = AdapterSpec(method=args.method, rank=args.rank, alpha=args.alpha, dropout=args.dropout,
                       target_modules=targets, use_rslora=args.use_rslora, gralora_k=args.gralora_k,
                       hybrid_r=args.hybrid_r, use_dora=args.use_dora)
    loop = LoopConfig(lr=args.lr, schedule=args.schedule, epochs=args.epochs, max_steps=args.max_steps,
                      batch_size=args.batch_size, grad_accum=args.grad_accum, seed=args.seed,
                      save_every=args.save_every, paged_adamw=args.method == "qlora", warmup=args.warmup)
    job = TrainJob(data=args.data, output=args.output, spec=spec, loop=loop, val=args.val, model=args.model,
                   max_length=args.max_length, val_fraction=args.val_fraction, skip_bad_rows=args.skip_bad_rows,
                   gradient_checkpointing=args.gradient_checkpointing, resume=args.resume,
                   packing=args.packing, fused_ce=args.fused_ce, compile=args.compile,
                   flexora={"hypergrad": args.flexora_hypergrad, "unroll": args.flexora_unroll,
                            "top_k": args.flexora_top_k, "search_steps": args.flexora_search_steps,
                            "alpha_lr": args.flexora_alpha_lr, "val_batches": args.flexora_val_batches})
    return job


def run(args) -> None:
    from .data import DataError
    from .methods import MethodError
    from .train import train
    job = job_from_args(args)
    try:
        outcome = train(job)
    except (DataError, MethodError) as e:
        sys.exit(f"loraplex train: {e}")
    if not outcome.wrote_output:
        return  # torchrun: rank 0 reports and uploads
    s = outcome.summary
    print(f"adapter written to {args.output} (val loss {s['initial_val_loss']:.4f} -> {s['final_val_loss']:.4f})")
    if args.upload:
        from loraplex.client import ClientError, HttpClient
        from loraplex.client.http import quiet_transport_logs
        quiet_transport_logs(args.verbose)
        adapter_id = args.adapter_id or re.sub(r"[^A-Za-z0-9._-]", "-", args.output.resolve().name).lstrip(".-_") or "adapter"
        try:
            record = HttpClient(args.upload, api_key=args.api_key).upload_adapter(args.output, adapter_id)
        except ClientError as e:
            sys.exit(f"loraplex train: upload to {args.upload} failed: {e}")
        print(json.dumps(record))
        print(f"uploaded: use \"model\": \"{record['id']}\" (version {record['version']})")
