"""Flexora (arXiv 2408.10774): learn which layers deserve an adapter, then fine-tune only those.

Stage 1 puts LoRA on every layer and scales layer i's adapter output by g_i = L·softmax(α)_i
(α starts at 0, so every gate starts at 1 and stage 1 starts as plain LoRA). After each LoRA
step, one Adam step moves α down the gradient of the validation loss — first-order (DARTS-style:
∂L_val/∂α at the current weights) or unrolled (back-propagated through K virtual SGD steps of the
LoRA weights). Layers with α_i above the mean (or the top-k) are kept; stage 2 trains a fresh LoRA
on those layers only.

The authors' code applies the gate as a pre-hook on every LoRA submodule, which scales the delta
by g_i³; we apply the linear gate g_i·ΔW_i that the paper describes.
"""
from __future__ import annotations

import re
from typing import Callable

import torch
from torch.func import functional_call

from .data import BatchStream, collate

_LAYER = re.compile(r"layers\.(\d+)\.")


class LayerGates(torch.nn.Module):
    """g = L·softmax(α) over the decoder layers, applied to each LoRA layer's output."""

    def __init__(self, num_layers: int, device):
        super().__init__()
        self.alpha = torch.nn.Parameter(torch.zeros(num_layers, device=device))
        self._handles = []

    def values(self) -> torch.Tensor:
        return self.alpha.numel() * torch.softmax(self.alpha, dim=0)

    def attach(self, peft_model) -> int:
        """Hook the lora_B output of every LoRA layer; returns how many were hooked."""
        for name, module in peft_model.named_modules():
            lora_b = getattr(module, "lora_B", None)
            if not isinstance(lora_b, torch.nn.ModuleDict) or "default" not in lora_b:
                continue
            layer = int(_LAYER.search(name)[1])
            hook = lambda _m, _inp, out, layer=layer: out * self.values()[layer].to(out.dtype)
            self._handles.append(lora_b["default"].register_forward_hook(hook))
        return len(self._handles)

    def detach_hooks(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


def hypergradient(loss_fn: Callable[[dict, object], torch.Tensor], params: dict[str, torch.Tensor],
                  alpha: torch.Tensor, train_batches: list, val_batch, inner_lr: float) -> tuple[torch.Tensor, float]:
    """d L_val(w_K(α), α) / dα, where w_K is K = len(train_batches) SGD steps from `params`.

    K = 0 is the first-order (DARTS) approximation. loss_fn(params, batch) must read α through
    the gates so that the graph reaches it.
    """
    weights = {n: p.detach().requires_grad_(bool(train_batches)) for n, p in params.items()}
    for batch in train_batches:
        loss = loss_fn(weights, batch)
        grads = torch.autograd.grad(loss, list(weights.values()), create_graph=True)
        weights = {n: w - inner_lr * g for (n, w), g in zip(weights.items(), grads)}
    val_loss = loss_fn(weights, val_batch)
    (grad,) = torch.autograd.grad(val_loss, alpha)
    return grad, val_loss.item()


class FlexoraSearch:
    """The stage-1 step hook: one hyper-step on α after every LoRA optimiser step."""

    def __init__(self, model, gates: LayerGates, val_stream: BatchStream, train_stream: BatchStream, *,
                 mode: str, unroll: int, inner_lr: float, alpha_lr: float, val_batches: int, pad_id: int, device):
        self.model, self.gates = model, gates
        self.val_stream, self.train_stream = val_stream, train_stream
        self.unroll = unroll if mode == "unrolled" else 0
        self.inner_lr, self.val_batches = inner_lr, val_batches
        self.pad_id, self.device = pad_id, device
        self.optimizer = torch.optim.Adam([gates.alpha], lr=alpha_lr)
        self.params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        self.val_history: list[dict] = []

    def _loss(self, weights: dict[str, torch.Tensor], batch) -> torch.Tensor:
        return functional_call(self.model, weights, args=(), kwargs=batch).loss

    def __call__(self, step: int) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        total, losses = torch.zeros_like(self.gates.alpha), []
        for v in range(self.val_batches):
            val = collate(self.val_stream.batch(step * self.val_batches + v), self.pad_id, self.device)
            inner = [collate(self.train_stream.batch(step * self.unroll + k), self.pad_id, self.device)
                     for k in range(self.unroll)]
            grad, loss = hypergradient(self._loss, self.params, self.gates.alpha, inner, val, self.inner_lr)
            total += grad / self.val_batches
            losses.append(loss)
        self.gates.alpha.grad = total
        self.optimizer.step()
        self.val_history.append({"step": step + 1, "val_loss": sum(losses) / len(losses)})

    def state_dict(self) -> dict:
        return {"alpha": self.gates.alpha.detach().cpu(), "optimizer": self.optimizer.state_dict(),
                "val_history": self.val_history}

    def load_state_dict(self, state: dict) -> None:
        with torch.no_grad():
            self.gates.alpha.copy_(state["alpha"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.val_history = state["val_history"]


def select_layers(alpha: torch.Tensor, top_k: int | None) -> list[int]:
    """Layers with α above the mean (default), or the top_k largest α."""
    a = alpha.detach().float().cpu()
    if top_k:
        return sorted(torch.topk(a, min(top_k, a.numel())).indices.tolist())
    chosen = [i for i, v in enumerate(a.tolist()) if v > float(a.mean())]
    return chosen or [int(a.argmax())]
