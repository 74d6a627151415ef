"""The optimisation loop: gradient accumulation, LR schedule, progress bar, checkpoints and resume.

A checkpoint holds the trainable weights, optimizer, scheduler, RNG states and loss history; the
batch of every step is a pure function of (seed, step) (data.BatchStream), so a resumed run
replays the uninterrupted one exactly. Under torchrun (distributed.World) every rank trains on its
share of each global batch through DDP, and rank 0 alone writes checkpoints.
"""
from __future__ import annotations

import contextlib
import math
import os
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from .data import BatchStream, Example
from .distributed import SINGLE, World
from .objective import Objective, SpeedConfig


@dataclass
class LoopConfig:
    lr: float = 2e-4
    schedule: str = "cosine"  # linear | cosine | constant (with warmup)
    warmup: float = 0  # steps; below 1, a fraction of all steps
    epochs: float = 1.0
    max_steps: int | None = None
    batch_size: int = 4
    grad_accum: int = 1
    seed: int = 0
    save_every: int = 0  # steps; 0 = no intermediate checkpoints
    paged_adamw: bool = False
    max_grad_norm: float = 1.0

    def total_steps(self, stream: BatchStream) -> int:
        if self.max_steps:
            return self.max_steps
        return max(1, math.ceil(self.epochs * stream.batches_per_epoch / self.grad_accum))


class StepHook(Protocol):
    """Extra work after every optimiser step (Flexora's hyper-steps), with state to checkpoint."""

    def __call__(self, step: int) -> None: ...
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict) -> None: ...


@dataclass
class LoopResult:
    steps: int
    history: list[dict] = field(default_factory=list)  # {"step", "loss", "lr", "tokens", "seconds"} per step
    tokens: int = 0  # real tokens (no padding)
    seconds: float = 0.0
    peak_memory_bytes: int | None = None  # CUDA: the most allocated during the loop (this process)
    speed: SpeedConfig | None = None

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0


def trainable_parameters(model) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def make_optimizer(params: list[torch.nn.Parameter], cfg: LoopConfig, device: torch.device):
    if cfg.paged_adamw and device.type == "cuda":
        import bitsandbytes as bnb
        return bnb.optim.PagedAdamW32bit(params, lr=cfg.lr, weight_decay=0.0)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)


def make_scheduler(optimizer, cfg: LoopConfig, total: int):
    from transformers import get_scheduler
    name = {"constant": "constant_with_warmup"}.get(cfg.schedule, cfg.schedule)
    warmup = round(cfg.warmup * total) if cfg.warmup < 1 else int(cfg.warmup)
    return get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=total)


@torch.no_grad()
def evaluate(model, examples: list[Example], batch_size: int, pad_id: int, device, world: World = SINGLE,
             speed: SpeedConfig = SpeedConfig()) -> float:
    """Mean loss per completion token over examples (batches dealt round-robin over the ranks)."""
    was_training = model.training
    model.eval()
    objective = Objective(model, speed, pad_id)
    total, count = 0.0, 0
    for i in range(world.rank * batch_size, len(examples), batch_size * world.size):
        batch = objective.make_batch(examples[i:i + batch_size], device)
        total += float(objective(batch)) * batch["num_targets"]
        count += batch["num_targets"]
    model.train(was_training)
    total, count = world.all_sum([total, count])
    return total / max(count, 1)


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(directory: Path, step: int, params, optimizer, scheduler, result: LoopResult,
                    hook: StepHook | None) -> None:
    """Written to a temp dir and renamed: a run killed mid-save leaves the previous checkpoint."""
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / f".tmp-step-{step}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file({n: p.detach().cpu().contiguous() for n, p in params.items()}, str(tmp / "trainable.safetensors"))
    torch.save({"step": step, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "rng": _rng_state(), "history": result.history, "tokens": result.tokens, "seconds": result.seconds,
                "hook": hook.state_dict() if hook is not None else None}, tmp / "state.pt")
    os.replace(tmp, directory / f"step-{step}")
    for old in _checkpoints(directory)[:-2]:  # keep the newest two
        shutil.rmtree(old, ignore_errors=True)


def _checkpoints(directory: Path) -> list[Path]:
    if not directory.exists():
        return []
    return sorted(directory.glob("step-*"), key=lambda p: int(p.name.split("-")[1]))


def latest_checkpoint(directory: Path) -> Path | None:
    found = _checkpoints(directory)
    return found[-1] if found else None


def run_loop(model, stream: BatchStream, cfg: LoopConfig, *, pad_id: int, device, checkpoint_dir: Path | None,
             resume: bool = False, hook: StepHook | None = None, desc: str = "training",
             world: World = SINGLE, speed: SpeedConfig = SpeedConfig()) -> LoopResult:
    if world.distributed and hook is not None:
        raise ValueError("a step hook (Flexora's search) does not run under torchrun")
    params = trainable_parameters(model)
    optimizer = make_optimizer(list(params.values()), cfg, device)
    total = cfg.total_steps(stream)
    scheduler = make_scheduler(optimizer, cfg, total)
    result = LoopResult(steps=total, speed=speed)
    start_step = 0
    torch.manual_seed(cfg.seed)
    if checkpoint_dir and not resume and world.is_main:
        shutil.rmtree(checkpoint_dir, ignore_errors=True)  # a fresh run never resumes a stale checkpoint later
    world.barrier()
    checkpoint = latest_checkpoint(checkpoint_dir) if (resume and checkpoint_dir) else None
    if checkpoint is not None:
        weights = load_file(str(checkpoint / "trainable.safetensors"))
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(weights[n].to(p.device, p.dtype))
        state = torch.load(checkpoint / "state.pt", weights_only=True)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        _set_rng_state(state["rng"])
        result.history, result.tokens, result.seconds = state["history"], state["tokens"], state["seconds"]
        if hook is not None and state["hook"] is not None:
            hook.load_state_dict(state["hook"])
        start_step = state["step"]

    model.train()
    objective = Objective(model, speed, pad_id)
    # Every rank starts from the same weights (same seed, same checkpoint): DDP only averages gradients.
    net = torch.nn.parallel.DistributedDataParallel(objective) if world.distributed else objective
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    bar = tqdm(total=total, initial=start_step, desc=desc, unit="step", dynamic_ncols=True, disable=not world.is_main)
    for step in range(start_step, total):
        began = time.perf_counter()
        step_loss, step_tokens = 0.0, 0
        for micro in range(cfg.grad_accum):
            rows = stream.batch(step * cfg.grad_accum + micro)
            mine, weight = world.shard(rows)
            batch = objective.make_batch(mine, device)
            last = micro == cfg.grad_accum - 1
            with net.no_sync() if world.distributed and not last else contextlib.nullcontext():
                loss = net(batch) * weight / cfg.grad_accum
                loss.backward()
            step_loss += loss.item()
            step_tokens += sum(len(e.input_ids) for e in rows)
        step_loss = world.all_sum([step_loss])[0] / world.size
        torch.nn.utils.clip_grad_norm_(list(params.values()), cfg.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if hook is not None:
            hook(step)
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # the step's time includes its optimiser kernels
        took = time.perf_counter() - began
        result.seconds += took
        result.tokens += step_tokens
        result.history.append({"step": step + 1, "loss": step_loss, "lr": scheduler.get_last_lr()[0],
                               "tokens": step_tokens, "seconds": took})
        bar.set_postfix(loss=f"{step_loss:.4f}", tok_s=f"{result.tokens_per_s:.0f}")
        bar.update()
        if checkpoint_dir and ((cfg.save_every and (step + 1) % cfg.save_every == 0) or step + 1 == total):
            if world.is_main:
                save_checkpoint(checkpoint_dir, step + 1, params, optimizer, scheduler, result, hook)
            world.barrier()
    bar.close()
    if device.type == "cuda":
        result.peak_memory_bytes = torch.cuda.max_memory_allocated(device)
    return result
