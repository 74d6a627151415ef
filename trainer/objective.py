"""How a micro-batch becomes a loss: the batch layout (padded or packed), the loss (HF's, or fused linear +
cross-entropy) and whether the decoder layers run compiled. `SpeedConfig` holds the three switches
(`--packing`, `--fused-ce`, `--compile`; on by default on CUDA); every combination computes the same loss,
the mean over the micro-batch's target tokens, up to float summation order.

`Objective` is an nn.Module around the PEFT model so that DDP wraps it (DDP syncs gradients of whatever
its forward ran); its parameters are the model's.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .data import Example, collate
from .fused_loss import linear_cross_entropy
from .packing import num_targets, pack, padded


@dataclass(frozen=True)
class SpeedConfig:
    packing: bool = False
    fused_ce: bool = False
    compile: bool = False

    @staticmethod
    def resolve(device: torch.device, packing: bool | None = None, fused_ce: bool | None = None,
                compile: bool | None = None) -> "SpeedConfig":
        """None means the default: on for CUDA, off elsewhere (on the CPU compiling costs more than it saves)."""
        on_cuda = device.type == "cuda"
        pick = lambda value: on_cuda if value is None else value
        return SpeedConfig(pick(packing), pick(fused_ce), pick(compile))


class Objective(torch.nn.Module):
    def __init__(self, model, speed: SpeedConfig, pad_id: int):
        super().__init__()
        self.model, self.speed, self.pad_id = model, speed, pad_id

    def make_batch(self, examples: list[Example], device) -> dict:
        if self.speed.packing:
            return pack(examples, self.pad_id, device)
        if self.speed.fused_ce:
            return padded(examples, self.pad_id, device)
        batch = collate(examples, self.pad_id, device)  # the unfused path: exactly HF's own loss
        return {**batch, "num_targets": num_targets(examples), "real_tokens": sum(len(e.input_ids) for e in examples)}

    def forward(self, batch: dict) -> torch.Tensor:
        """Mean cross-entropy over the batch's target tokens."""
        if not self.speed.packing and not self.speed.fused_ce:
            return self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                              labels=batch["labels"]).loss
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}
        inputs["use_cache"] = False  # with a KV cache transformers ignores packing: attention would cross rows
        if "cu_seq_lens" in batch:  # the names transformers' attention functions read for packed rows
            inputs.update(cu_seq_lens_q=batch["cu_seq_lens"], cu_seq_lens_k=batch["cu_seq_lens"],
                          max_length_q=batch["max_length"], max_length_k=batch["max_length"])
        count = max(batch["num_targets"], 1)
        if self.speed.fused_ce:
            causal_lm = self.model.get_base_model()  # the LoRA layers sit inside it
            hidden = causal_lm.model(**inputs).last_hidden_state
            return linear_cross_entropy(hidden, causal_lm.lm_head.weight, batch["targets"]) / count
        logits = self.model(**inputs).logits.float()
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch["targets"].flatten(),
                                                 reduction="sum") / count


def compile_decoder_layers(peft_model, backend: str = "inductor") -> int:
    """torch.compile each decoder layer (dynamic in the token count: packed lengths vary); returns how many.

    Under gradient checkpointing a layer's call is a checkpoint around its forward, and transformers' hub-kernel
    wrappers (the `kernels` package) set a context variable in that forward: Dynamo refuses side effects inside
    the checkpoint and fell back to running every layer eagerly (QLoRA always, the 8B shape's LoRA). Replaying the
    forward's side effects in the recomputation is not needed (the variable only selects kernels), so they are
    skipped there and the layer compiles whole."""
    import torch._dynamo.config as dynamo_config
    try:
        dynamo_config.skip_fwd_side_effects_in_bwd_under_checkpoint = True
    except AttributeError:  # an older torch without the switch: checkpointed layers stay eager there
        pass
    layers = peft_model.get_base_model().model.layers
    for layer in layers:
        layer.compile(dynamic=True, backend=backend)
    return len(layers)
