"""`loraplex train`: data → model + adapter → loop → PEFT adapter, summary and (optionally) upload.

Under `torchrun --nproc-per-node N --no-python loraplex train ...` the same job runs data-parallel
(distributed.py: --batch-size stays the global batch); rank 0 alone writes the output."""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from .data import BatchStream, load_jsonl, split_validation
from .distributed import SINGLE, World, close_world, init_world
from .flexora import FlexoraSearch, LayerGates, select_layers
from .loop import LoopConfig, LoopResult, evaluate, run_loop
from .methods import AdapterSpec, MethodError, attach_adapter, load_model, load_tokenizer
from .objective import SpeedConfig, compile_decoder_layers
from .packed_attention import speed_report, use_packed_attention


@dataclass
class TrainJob:
    data: Path
    output: Path
    spec: AdapterSpec
    loop: LoopConfig
    val: Path | None = None
    model: str | None = None
    max_length: int = 512
    val_fraction: float = 0.1
    skip_bad_rows: bool = False
    gradient_checkpointing: bool = False
    resume: bool = False
    # --packing / --fused-ce / --compile; None: on for CUDA, off elsewhere (objective.SpeedConfig)
    packing: bool | None = None
    fused_ce: bool | None = None
    compile: bool | None = None
    flexora: dict = field(default_factory=lambda: {"hypergrad": "first-order", "unroll": 1, "top_k": None,
                                                   "search_steps": None, "alpha_lr": 0.01, "val_batches": 1})


@dataclass
class TrainOutcome:
    model: object  # the trained PeftModel, in memory
    tokenizer: object
    summary: dict
    wrote_output: bool = True  # False on the ranks other than 0 under torchrun


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)


def _prepare_data(job: TrainJob, tokenizer):
    train_rows, skipped = load_jsonl(job.data, tokenizer, job.max_length, job.skip_bad_rows)
    if job.val is not None:
        val_rows, val_skipped = load_jsonl(job.val, tokenizer, job.max_length, job.skip_bad_rows)
        skipped += val_skipped
    else:
        train_rows, val_rows = split_validation(train_rows, job.val_fraction, job.loop.seed)
    return train_rows, val_rows, skipped


def _train_stage(job: TrainJob, spec: AdapterSpec, train_rows, val_rows, tokenizer, device, checkpoints: Path,
                 *, desc: str, loop: LoopConfig | None = None, gates: bool = False, world: World = SINGLE):
    """One LoRA/QLoRA/GraLoRA training run; with `gates`, Flexora's stage-1 search runs alongside."""
    loop = loop or job.loop
    torch.manual_seed(loop.seed)  # adapter init is part of the run's determinism
    unrolled = gates and job.flexora["hypergrad"] == "unrolled"
    base = load_model(job.model, spec.method, device, job.gradient_checkpointing and not unrolled,
                         attn_implementation="eager" if unrolled else None)
    model = attach_adapter(base, spec)
    speed = SpeedConfig.resolve(device, job.packing, job.fused_ce, job.compile)
    if gates and job.compile is None:
        speed = replace(speed, compile=False)  # the search's functional_call swaps weights: a recompile per hyper-step
    if speed.packing and not unrolled:  # (the unrolled search differentiates twice: eager attention)
        use_packed_attention(model.get_base_model())
    if speed.compile:
        compile_decoder_layers(model)
    pad = tokenizer.pad_token_id
    stream = BatchStream(train_rows, loop.batch_size, loop.seed)
    initial_val = evaluate(model, val_rows, loop.batch_size, pad, device, world, speed)
    hook = None
    if gates:
        layer_gates = LayerGates(model.config.num_hidden_layers, device)
        layer_gates.attach(model)
        hook = FlexoraSearch(model, layer_gates, BatchStream(val_rows, loop.batch_size, loop.seed + 1),
                             BatchStream(train_rows, loop.batch_size, loop.seed + 2), mode=job.flexora["hypergrad"],
                             unroll=job.flexora["unroll"], inner_lr=loop.lr, alpha_lr=job.flexora["alpha_lr"],
                             val_batches=job.flexora["val_batches"], pad_id=pad, device=device)
    result = run_loop(model, stream, loop, pad_id=pad, device=device, checkpoint_dir=checkpoints, resume=job.resume,
                      hook=hook, desc=desc, world=world, speed=speed)
    final_val = evaluate(model, val_rows, loop.batch_size, pad, device, world, speed)
    return model, result, initial_val, final_val, hook


def _losses(result: LoopResult, initial_val: float, final_val: float) -> dict:
    return {"initial_val_loss": initial_val, "final_val_loss": final_val,
            "final_train_loss": result.history[-1]["loss"] if result.history else None,
            "train_loss_history": [h["loss"] for h in result.history], "steps": result.steps,
            "tokens_per_s": result.tokens_per_s, "train_seconds": result.seconds,
            "step_time_s": result.seconds / max(len(result.history), 1),
            "step_tokens": [h.get("tokens") for h in result.history],
            "step_seconds": [h.get("seconds") for h in result.history],
            "peak_memory_gb": result.peak_memory_bytes / 2**30 if result.peak_memory_bytes else None,
            "speed": asdict(result.speed) if result.speed else None}


def train(job: TrainJob) -> TrainOutcome:
    world = init_world()
    try:
        return _train(job, world)
    finally:
        close_world(world)


def _train(job: TrainJob, world: World) -> TrainOutcome:
    if world.distributed and job.spec.method == "flexora":
        raise MethodError("--method flexora does not run under torchrun yet (its layer search is single-process); "
                          "run it as one process")
    device = world.device()
    tokenizer = load_tokenizer(job.model)
    train_rows, val_rows, skipped = _prepare_data(job, tokenizer)
    job.output.mkdir(parents=True, exist_ok=True)
    checkpoints = job.output / "checkpoints"
    spec = job.spec
    summary = {"method": spec.method, "model": job.model or "SmolLM2-135M-Instruct (default)",
               "device": str(device), "world_size": world.size, "rank": spec.rank, "alpha": spec.lora_alpha, "target_modules": list(spec.target_modules),
               "train_rows": len(train_rows), "val_rows": len(val_rows), "skipped_rows": skipped,
               "loop": asdict(job.loop)}

    if spec.method == "flexora":
        lora = replace(spec, method="lora", layers_to_transform=None)
        search_loop = replace(job.loop, max_steps=job.flexora["search_steps"] or job.loop.total_steps(
            BatchStream(train_rows, job.loop.batch_size, job.loop.seed)))
        _, s1, s1_initial, s1_final, search = _train_stage(job, lora, train_rows, val_rows, tokenizer, device,
                                                           checkpoints / "stage1", desc="flexora search",
                                                           loop=search_loop, gates=True)
        selected = select_layers(search.gates.alpha, job.flexora["top_k"])
        stage2_spec = replace(lora, layers_to_transform=selected)
        model, result, initial_val, final_val, _ = _train_stage(job, stage2_spec, train_rows, val_rows, tokenizer,
                                                                device, checkpoints / "stage2", desc="flexora stage 2")
        alpha = search.gates.alpha.detach().cpu()
        report = {"num_layers": alpha.numel(), "alpha": alpha.tolist(), "gates": (alpha.numel() * alpha.softmax(0)).tolist(),
                  "selection_rule": f"top-{job.flexora['top_k']}" if job.flexora["top_k"] else "alpha above mean",
                  "selected_layers": selected, "hypergrad": job.flexora["hypergrad"],
                  "unroll": job.flexora["unroll"] if job.flexora["hypergrad"] == "unrolled" else 0,
                  "stage1": {**_losses(s1, s1_initial, s1_final), "hyper_val_loss": [h["val_loss"] for h in search.val_history]},
                  "stage2": _losses(result, initial_val, final_val)}
        _write_json(job.output / "flexora_report.json", report)
        summary["selected_layers"] = selected
    else:
        model, result, initial_val, final_val, _ = _train_stage(job, spec, train_rows, val_rows, tokenizer, device,
                                                                checkpoints, desc=f"{spec.method} training", world=world)
    summary.update(_losses(result, initial_val, final_val))
    summary["speed_report"] = speed_report(model)
    if world.is_main:
        model.save_pretrained(job.output)
        tokenizer.save_pretrained(job.output / "tokenizer")
        _write_json(job.output / "training_summary.json", summary)
    world.barrier()  # no rank exits (and no caller reads the output) before rank 0 has written it
    return TrainOutcome(model, tokenizer, summary, wrote_output=world.is_main)
