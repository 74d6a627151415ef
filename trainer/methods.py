"""The base model and PEFT adapter for each training method (LoRA, QLoRA, GraLoRA; Flexora builds on LoRA).

`use_dora` turns a LoRA or QLoRA adapter into DoRA (PEFT's `use_dora`: a trained magnitude per output channel)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from loraplex.runtime.base_model import resolve_model_dir
from loraplex.runtime.model import PROJECTIONS, projection_shapes


class MethodError(ValueError):
    pass


@dataclass
class AdapterSpec:
    method: str  # lora | qlora | gralora | flexora
    rank: int = 16
    alpha: float | None = None  # default: 2 * rank
    dropout: float = 0.0
    target_modules: tuple[str, ...] = PROJECTIONS
    use_rslora: bool = False
    gralora_k: int | None = None  # default: 2 for rank <= 32, else 4
    hybrid_r: int = 0
    layers_to_transform: list[int] | None = None
    use_dora: bool = False

    @property
    def lora_alpha(self) -> float:
        return self.alpha if self.alpha is not None else 2 * self.rank

    @property
    def k(self) -> int:
        return self.gralora_k or (2 if self.rank <= 32 else 4)


def training_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_tokenizer(model: str | None):
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_dir(model))
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(model: str | None, method: str, device: torch.device, gradient_checkpointing: bool,
               attn_implementation: str | None = None):
    """The base model for training: bf16 on a GPU / fp32 on the CPU; NF4 base for QLoRA."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig
    path = resolve_model_dir(model)
    extra = {"attn_implementation": attn_implementation} if attn_implementation else {}
    if method == "qlora":
        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                   bnb_4bit_compute_dtype=torch.bfloat16)
        net = AutoModelForCausalLM.from_pretrained(path, quantization_config=quant, dtype=torch.bfloat16,
                                                   device_map={"": str(device)}, **extra)
        prepare_nf4_for_training(net)
        keep_nf4_storage_layout(net)
    else:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        net = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **extra).to(device)
        if gradient_checkpointing:
            net.gradient_checkpointing_enable()
            net.enable_input_require_grads()
    net.config.use_cache = False
    return net


def prepare_nf4_for_training(net) -> None:
    """PEFT's prepare_model_for_kbit_training without its fp32 copies of every non-quantised weight.

    The base is frozen and gradient checkpointing is on, with the inputs requiring grad so checkpointed blocks
    see a graph. PEFT also upcasts the embeddings, the LM head and the norms to fp32: on a Llama-3 8B that is
    two 128k x 4,096 matrices, 4.2 GB beyond their bf16 copies, and every LM-head product then runs in fp32
    (several times slower than bf16 on a GPU). They are frozen, so fp32 gives training nothing to use; the norms
    compute their statistics in fp32 anyway (LlamaRMSNorm), and compute stays bf16, as QLoRA specifies; the
    LoRA weights themselves are fp32 (PEFT's autocast_adapter_dtype), as in the LoRA path.
    """
    for param in net.parameters():
        param.requires_grad_(False)
    net.enable_input_require_grads()
    net.gradient_checkpointing_enable()


def keep_nf4_storage_layout(net) -> None:
    """Turn off bitsandbytes' CPU inference repacking of NF4 weights (AVX512-BF16 CPUs).

    Its first no-grad eval forward repacks each weight and rounds absmax to bf16; every state_dict()
    (so every save_pretrained) undoes that by re-quantising absmax, which changes the in-memory base
    model. A trained model then differs from the same adapter reloaded from disk (~1% logits).
    """
    import bitsandbytes as bnb
    for module in net.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


def check_targets(spec: AdapterSpec, config) -> None:
    unknown = set(spec.target_modules) - set(PROJECTIONS)
    if unknown:
        raise MethodError(f"--target-modules: unknown {sorted(unknown)}; choose from {', '.join(PROJECTIONS)}")
    if spec.use_dora and spec.method not in ("lora", "qlora"):
        raise MethodError(f"--use-dora applies to --method lora or qlora, not {spec.method}")
    if spec.method != "gralora":
        return
    k = spec.k
    if spec.rank % k:
        raise MethodError(f"--gralora-k {k} must divide --rank {spec.rank}")
    shapes = projection_shapes(config)
    for proj in spec.target_modules:
        fin, fout = shapes[proj]
        if fin % k or fout % k:
            raise MethodError(f"--gralora-k {k} must divide {proj}'s in_features {fin} and out_features {fout}")


def peft_config(spec: AdapterSpec):
    from peft import GraloraConfig, LoraConfig
    targets = list(spec.target_modules)
    if spec.method == "gralora":
        return GraloraConfig(r=spec.rank, alpha=spec.lora_alpha, gralora_k=spec.k, hybrid_r=spec.hybrid_r,
                             gralora_dropout=spec.dropout, target_modules=targets,
                             layers_to_transform=spec.layers_to_transform, task_type="CAUSAL_LM")
    return LoraConfig(r=spec.rank, lora_alpha=spec.lora_alpha, lora_dropout=spec.dropout, target_modules=targets,
                      use_rslora=spec.use_rslora, use_dora=spec.use_dora, layers_to_transform=spec.layers_to_transform,
                      task_type="CAUSAL_LM")


def attach_adapter(model, spec: AdapterSpec):
    import warnings

    from peft import get_peft_model
    check_targets(spec, model.config)
    with warnings.catch_warnings():  # PEFT (0.21) still reads the alias transformers 5 deprecates; not ours to act on
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.* is deprecated", category=FutureWarning)
        return get_peft_model(model, peft_config(spec))
