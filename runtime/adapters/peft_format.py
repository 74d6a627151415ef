"""Reading and validating adapters in the PEFT on-disk format, into one packed representation.

PEFT LoRA and GraLoRA (with its hybrid LoRA part) both become, per adapted projection, a
`ModuleDelta`: a block-structured low-rank pair with k blocks (k = 1 for LoRA), plus an optional
plain low-rank "general" pair; a DoRA LoRA (`use_dora`) also carries its magnitude vector, turned
into a per-output-channel factor once the base weights are known (see dora.py). Everything after
this module sees only that representation.

Nothing here unpickles: only `adapter_config.json` and `adapter_model.safetensors` are read.
Every config field is either honoured, known to be harmless metadata, or refused by name; the
regular expressions an upload carries (`rank_pattern` / `alpha_pattern` keys, a string
`target_modules`) run on RE2, a linear-time engine, so no pattern can stall the server
(config_patterns.py).
"""
from __future__ import annotations

import json
import math
import re
import struct
import threading
from dataclasses import dataclass, field

import torch

from ..model import PROJECTIONS
from .config_patterns import check_alpha_value, check_rank_value, layer_filter, pattern_value, patterns, target_filter
from .errors import CONFIG_FILE, WEIGHTS_FILE, AdapterError, is_count  # (importers use these from here too)

MAX_CONFIG_BYTES = 1 << 20
MAX_HEADER_BYTES = 100 << 20  # a safetensors header; safetensors' own bound
ALLOWED_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
_GROUP = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
          "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}
MAX_ABS_SCALE = 1e4  # |alpha / r|: beyond this a delta swamps the base model's activations (overflow in bf16)
_DTYPE_BYTES = {"F32": 4, "F16": 2, "BF16": 2}
# Config fields that change nothing we serve: provenance and training-time settings (initialisation,
# dropout), or fields whose effect we check on the tensors themselves (layers_pattern, exclude_modules).
METADATA_FIELDS = {"peft_type", "task_type", "auto_mapping", "base_model_name_or_path", "revision", "peft_version",
                   "inference_mode", "lora_dropout", "gralora_dropout", "init_lora_weights", "init_weights",
                   "loftq_config", "eva_config", "corda_config", "lora_ga_config", "runtime_config",
                   "layers_pattern", "exclude_modules", "megatron_core", "qalora_group_size", "ensure_weight_tying"}
HONOURED_FIELDS = {"LORA": {"r", "lora_alpha", "use_rslora", "rank_pattern", "alpha_pattern", "layers_to_transform",
                            "target_modules", "use_dora"},
                   "GRALORA": {"r", "alpha", "gralora_k", "hybrid_r", "layers_to_transform", "target_modules"}}
# Fields that change the computation in ways we do not implement: accepted only when off (null/false/empty).
OFF_FIELDS = {"bias": "trained biases", "lora_bias": "trained biases", "modules_to_save": "modules_to_save (only "
              "low-rank deltas are served)", "fan_in_fan_out": "fan_in_fan_out (Conv1D bases do not fit a Llama model)",
              "use_qalora": "QALoRA (use_qalora)",
              "layer_replication": "layer_replication", "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens)",
              "megatron_config": "Megatron parallel layers (megatron_config)",
              "trainable_token_indices": "trainable token embeddings (trainable_token_indices)",
              "target_parameters": "LoRA on parameters (target_parameters)", "arrow_config": "Arrow routing (arrow_config)",
              "use_bdlora": "use_bdlora", "kasa_config": "KaSA (kasa_config)", "monteclora_config": "MonteCLoRA",
              "velora_config": "VeLoRA (velora_config)"}
_KEY = re.compile(r"^(?:base_model\.model\.)?model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)\."
                  r"(lora_A\.weight|lora_B\.weight|gralora_A|gralora_B|gralora_A_general\.weight|"
                  r"gralora_B_general\.weight|lora_magnitude_vector)$")


@dataclass
class ModuleDelta:
    """delta(x) = scale * (block_lora(x) + general_B(general_A(x))), on one projection.

    block_lora: x split into k input chunks; chunk n goes through A[n] ([in/k, r]); the rank-r result
    of chunk n is cut into k pieces of r/k and piece j feeds output chunk j through B[j]'s rows
    n*r/k..(n+1)*r/k ([r, out/k]). k = 1 is plain LoRA with A = lora_A.T and B = lora_B.T.
    """
    k: int
    A: torch.Tensor  # [k, in/k, r]
    B: torch.Tensor  # [k, r, out/k]
    scale: float
    general_A: torch.Tensor | None = None  # [in, hybrid_r]
    general_B: torch.Tensor | None = None  # [hybrid_r, out]
    magnitude: torch.Tensor | None = None  # [out] DoRA's m (lora_magnitude_vector)
    # DoRA on the served base, [2, out]: rows g = m / |W + scale*BA| - 1 and c = -g * bias; the output
    # of a DoRA row becomes (1 + g) * (base + delta) + c. Set by dora.prepare_dora, None until then.
    rescale: torch.Tensor | None = None

    @property
    def rank(self) -> int:
        return self.A.shape[-1]

    @property
    def is_dora(self) -> bool:
        return self.magnitude is not None

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.A, self.B, self.general_A, self.general_B, self.magnitude, self.rescale)
                if t is not None]

    def to(self, device, dtype) -> "ModuleDelta":
        cast = lambda t: None if t is None else t.to(device=device, dtype=dtype).contiguous()
        return ModuleDelta(self.k, cast(self.A), cast(self.B), self.scale, cast(self.general_A), cast(self.general_B),
                           cast(self.magnitude), cast(self.rescale))


@dataclass
class AdapterWeights:
    peft_type: str  # "LORA" | "GRALORA"
    rank: int  # largest rank of any module (GraLoRA: r + hybrid_r)
    config: dict
    modules: dict[tuple[int, str], ModuleDelta] = field(default_factory=dict)
    packed: object | None = field(default=None, repr=False, compare=False)  # the adapter ops' load-ready form
    # held while `packed` is computed: this adapter is packed once, other adapters meanwhile (engine.prepare_adapter)
    pack_lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for m in self.modules.values() for t in m.tensors())

    @property
    def is_dora(self) -> bool:
        return any(m.is_dora for m in self.modules.values())


@dataclass(frozen=True)
class BaseShape:
    """What an adapter is checked against: the served base model's layer count and projection shapes."""
    num_layers: int
    projections: dict[str, tuple[int, int]]  # name -> (in_features, out_features)


def parse_config(raw: bytes) -> dict:
    if len(raw) > MAX_CONFIG_BYTES:
        raise AdapterError(f"{CONFIG_FILE} is larger than {MAX_CONFIG_BYTES} bytes", 413)
    try:
        config = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise AdapterError(f"{CONFIG_FILE} is not valid JSON: {e}", 400)
    if not isinstance(config, dict):
        raise AdapterError(f"{CONFIG_FILE} must hold a JSON object", 400)
    peft_type = config.get("peft_type")
    if peft_type not in ("LORA", "GRALORA"):
        raise AdapterError(f"unsupported peft_type {peft_type!r}: loraplex serves LORA and GRALORA adapters")
    _check_fields(config)
    return config


def _is_off(value) -> bool:
    return value is None or value is False or value == [] or value == {} or value == "none"


def _check_fields(config: dict) -> None:
    """Refuse, by name, every field we do not honour and that is not harmless metadata."""
    honoured = HONOURED_FIELDS[config["peft_type"]]
    for key, value in config.items():
        if key in honoured or key in METADATA_FIELDS:
            continue
        if key in OFF_FIELDS:
            if not _is_off(value):
                raise AdapterError(f"{CONFIG_FILE}: {OFF_FIELDS[key]} is not supported ({key}={value!r})", 400)
        elif not _is_off(value):
            raise AdapterError(f"{CONFIG_FILE}: unsupported field {key!r} for a {config['peft_type']} adapter "
                               f"(value {value!r}); loraplex refuses what it would otherwise ignore", 400)


_PICKLE_MAGIC = (b"\x80", b"PK\x03\x04")  # protocol-2+ pickles, torch.save zip archives


def refuse_pickle(weights_head) -> None:
    """Refuse a weights file (or its first bytes) that looks like a pickle."""
    if bytes(weights_head[:4]).startswith(_PICKLE_MAGIC):
        raise AdapterError("the weights look like a pickle (.bin/.pt): loraplex never unpickles; "
                           "upload adapter_model.safetensors", 400)


def safetensors_header_length(head) -> int:
    """The header length of a safetensors file from its first 8 bytes (`head`, bytes-like, at least 8 long)."""
    (header_len,) = struct.unpack("<Q", bytes(head[:8]))
    if header_len > MAX_HEADER_BYTES:
        raise AdapterError(f"{WEIGHTS_FILE} is not a safetensors file (a header of {header_len} bytes)", 400)
    return header_len


def read_safetensors_header(raw, data_len: int | None) -> dict:
    """The header of a safetensors file (`raw`: its bytes, at least the header's), checked before any tensor is
    read: every tensor F32/F16/BF16 with a well-formed shape whose bytes match its offsets, and the tensors
    tiling the data section with no gap or overlap. `data_len`: the data section's length, None while the
    file is still arriving (then only the offsets' order is checked, not where the data ends)."""
    header_len = safetensors_header_length(raw)
    if data_len is not None and data_len < 0:
        raise AdapterError(f"{WEIGHTS_FILE} is not a safetensors file or is truncated "
                           f"(header of {header_len} bytes in a {header_len + 8 + data_len}-byte file)", 400)
    try:
        header = json.loads(bytes(raw[8:8 + header_len]))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise AdapterError(f"{WEIGHTS_FILE} is not a safetensors file (unreadable header)", 400)
    if not isinstance(header, dict):
        raise AdapterError(f"{WEIGHTS_FILE} is not a safetensors file (header is not an object)", 400)
    spans = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(info, dict) or info.get("dtype") not in ALLOWED_DTYPES:
            raise AdapterError(f"{WEIGHTS_FILE}: tensor {name!r} has dtype {info.get('dtype') if isinstance(info, dict) else '?'};"
                               f" expected one of {sorted(ALLOWED_DTYPES)}")
        offsets, shape = info.get("data_offsets"), info.get("shape")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(is_count(o) for o in offsets)):
            raise AdapterError(f"{WEIGHTS_FILE}: tensor {name!r} has malformed data_offsets {offsets!r}", 400)
        if not (isinstance(shape, list) and all(is_count(d) for d in shape)):
            raise AdapterError(f"{WEIGHTS_FILE}: tensor {name!r} has malformed shape {shape!r}", 400)
        if not offsets[0] <= offsets[1] or (data_len is not None and offsets[1] > data_len):
            raise AdapterError(f"{WEIGHTS_FILE} is truncated: tensor {name!r} lies past the end of the file", 400)
        if offsets[1] - offsets[0] != math.prod(shape) * _DTYPE_BYTES[info["dtype"]]:
            raise AdapterError(f"{WEIGHTS_FILE}: tensor {name!r} holds {offsets[1] - offsets[0]} bytes, but shape "
                               f"{shape} of {info['dtype']} needs {math.prod(shape) * _DTYPE_BYTES[info['dtype']]}", 400)
        spans.append((offsets[0], offsets[1], name))
    end = 0  # safetensors' own rule, which its loader enforced here before: tensors tile the data, in any order
    for start, stop, name in sorted(spans):
        if start != end:
            raise AdapterError(f"{WEIGHTS_FILE}: tensor {name!r} starts at byte {start} of the data, expected {end} "
                               "(tensors must not overlap or leave gaps)", 400)
        end = stop
    if data_len is not None and end != data_len:
        raise AdapterError(f"{WEIGHTS_FILE}: the tensors cover {end} of the {data_len} data bytes", 400)
    return header


def parse_weights(raw, owned: bool = False) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file (`raw`: bytes-like) as views of one buffer the caller may keep: `raw`
    itself when `owned` (the caller hands over writable memory nobody else writes), else one copy of it. Read
    straight from the buffer after the header checks (safetensors' loader made two copies of every tensor; one
    clone per tensor, in a worker thread, cost 200 ms for 78 MB on the 2-core CI host: small allocations from a
    thread's malloc arena, each faulting its pages in); every value is checked finite."""
    view = memoryview(raw).cast("B")
    if len(view) < 8:
        raise AdapterError(f"{WEIGHTS_FILE} is truncated: {len(view)} bytes", 400)
    data_start = 8 + safetensors_header_length(view)
    header = read_safetensors_header(view, len(view) - data_start)
    if view.readonly or not owned:  # torch.frombuffer wants writable memory; what the adapter keeps is ours
        view = memoryview(bytearray(view)).cast("B")
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        start, stop = info["data_offsets"]
        dtype = ALLOWED_DTYPES[info["dtype"]]
        size = _DTYPE_BYTES[info["dtype"]]
        if stop == start:
            tensors[name] = torch.empty(info["shape"], dtype=dtype)
        elif (data_start + start) % size:  # misaligned in the file: a copy of its bytes, re-typed
            flat = torch.frombuffer(view, dtype=torch.uint8, count=stop - start, offset=data_start + start)
            tensors[name] = flat.clone().view(dtype).view(info["shape"])
        else:
            tensors[name] = torch.frombuffer(view, dtype=dtype, count=(stop - start) // size,
                                             offset=data_start + start).view(info["shape"])
    _check_finite(view, data_start, header, tensors)
    return tensors


def _check_finite(view: memoryview, data_start: int, header: dict, tensors: dict[str, torch.Tensor]) -> None:
    """No NaN or inf in any tensor. The tensors tile the data section (read_safetensors_header), so with one
    dtype the whole section is checked in one reduction; the tensors one by one only to name a culprit."""
    dtypes = {info["dtype"] for name, info in header.items() if name != "__metadata__"}
    if len(dtypes) == 1:
        dtype = ALLOWED_DTYPES[dtypes.pop()]
        size = torch.empty((), dtype=dtype).element_size()
        data_len = len(view) - data_start
        if data_start % size == 0 and data_len % size == 0 and _all_finite(
                torch.frombuffer(view, dtype=dtype, count=data_len // size, offset=data_start) if data_len else
                torch.empty(0)):
            return
    for name, t in tensors.items():
        if not _all_finite(t):
            raise AdapterError(f"tensor {name!r} holds NaN or infinite values")


def _check_targets(config: dict, grouped: dict) -> None:
    """Every tensor belongs to a module the config says it adapts."""
    layers, targeted = layer_filter(config), target_filter(config)
    for layer, proj in sorted(grouped):
        name = _module_name(layer, proj)
        if layers is not None and layer not in layers:
            raise AdapterError(f"{name}: weights for a layer outside layers_to_transform")
        if targeted is not None and not targeted(name):
            raise AdapterError(f"{name}: weights for a module outside target_modules", 400)


def _checked_scale(name: str, scale: float) -> float:
    if not math.isfinite(scale) or abs(scale) > MAX_ABS_SCALE:
        raise AdapterError(f"{name}: scale {scale!r} (alpha / rank) is not a finite number of magnitude at most "
                           f"{MAX_ABS_SCALE:g}", 400)
    return scale


def _positive_int(config: dict, key: str, default=None) -> int:
    value = config.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise AdapterError(f"{CONFIG_FILE}: {key} must be a positive integer, got {value!r}")
    return value


def _all_finite(t: torch.Tensor) -> bool:
    """No NaN or inf in t: its min and max (NaN propagates through both) are finite. Two reductions,
    several times faster than isfinite(t).all() on a CPU."""
    return t.numel() == 0 or bool(torch.isfinite(torch.stack(torch.aminmax(t))).all())


def _group_tensors(tensors: dict[str, torch.Tensor], base: BaseShape) -> dict[tuple[int, str], dict[str, torch.Tensor]]:
    grouped: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        m = _KEY.match(key)
        if m is None:
            raise AdapterError(f"unexpected tensor {key!r}: expected PEFT LoRA/GraLoRA weights of a Llama model")
        layer, group, proj, part = int(m[1]), m[2], m[3], m[4]
        if proj not in PROJECTIONS or _GROUP[proj] != group:
            raise AdapterError(f"tensor {key!r}: {group}.{proj} is not an adaptable projection of the base model")
        if layer >= base.num_layers:
            raise AdapterError(f"tensor {key!r}: layer {layer} does not exist (the base model has {base.num_layers})")
        # the host copy stays in the file's dtype (fp32, fp16 or bf16): every consumer casts it up where it
        # computes (kernel pool, torch ops, merging, DoRA), which is exact; an fp32 copy of a bf16 file cost
        # 2x the host memory and most of an upload's parse time (0.77 of 0.95 s for 84 MB here).
        # (parse_weights has checked that every value is finite)
        grouped.setdefault((layer, proj), {})[part] = t
    if not grouped:
        raise AdapterError(f"{WEIGHTS_FILE} holds no adapter tensors")
    return grouped


def _expect(key: str, t: torch.Tensor | None, shape: tuple[int, ...]) -> torch.Tensor:
    if t is None:
        raise AdapterError(f"{key} is missing")
    if tuple(t.shape) != shape:
        raise AdapterError(f"{key} has shape {list(t.shape)}, expected {list(shape)} for the base model")
    return t


def _module_name(layer: int, proj: str) -> str:
    return f"model.layers.{layer}.{_GROUP[proj]}.{proj}"


def _lora_modules(config, grouped, base: BaseShape, max_rank: int) -> dict[tuple[int, str], ModuleDelta]:
    r = _positive_int(config, "r", 8)
    alpha = config.get("lora_alpha", 8)
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not math.isfinite(alpha):
        raise AdapterError(f"{CONFIG_FILE}: lora_alpha must be a finite number, got {alpha!r}", 400)
    rslora = config.get("use_rslora", False)
    if not isinstance(rslora, bool):
        raise AdapterError(f"{CONFIG_FILE}: use_rslora must be true or false, got {rslora!r}", 400)
    dora = config.get("use_dora", False)
    if not isinstance(dora, bool):
        raise AdapterError(f"{CONFIG_FILE}: use_dora must be true or false, got {dora!r}", 400)
    rank_pattern = patterns(config, "rank_pattern", check_rank_value)
    alpha_pattern = patterns(config, "alpha_pattern", check_alpha_value)
    modules = {}
    for (layer, proj), parts in sorted(grouped.items()):
        name = _module_name(layer, proj)
        if set(parts) - {"lora_A.weight", "lora_B.weight", "lora_magnitude_vector"}:
            raise AdapterError(f"{name}: GraLoRA tensors in a LORA adapter")
        if "lora_magnitude_vector" in parts and not dora:
            raise AdapterError(f"{name}.lora_magnitude_vector in an adapter without use_dora: true", 400)
        rank = pattern_value(rank_pattern, name, r)
        a = pattern_value(alpha_pattern, name, alpha)
        if rank > max_rank:
            raise AdapterError(f"{name}: rank {rank} is above the server's --max-lora-rank {max_rank}")
        fin, fout = base.projections[proj]
        A = _expect(f"{name}.lora_A.weight", parts.get("lora_A.weight"), (rank, fin))
        B = _expect(f"{name}.lora_B.weight", parts.get("lora_B.weight"), (fout, rank))
        scale = _checked_scale(name, a / math.sqrt(rank) if rslora else a / rank)
        magnitude = None
        if dora:
            if "lora_magnitude_vector" not in parts:
                raise AdapterError(f"{name}.lora_magnitude_vector is missing: a DoRA adapter (use_dora: true) needs one per module", 400)
            magnitude = _expect(f"{name}.lora_magnitude_vector", parts["lora_magnitude_vector"], (fout,))
        # views of parse_weights' buffer: A of PEFT's [r, in] (the kernels' pool layout is that one,
        # packed_layout.pool_pieces), B of [out, r], transposed when packed
        modules[(layer, proj)] = ModuleDelta(1, A.t().unsqueeze(0), B.t().unsqueeze(0), scale, magnitude=magnitude)
    return modules


def _gralora_modules(config, grouped, base: BaseShape, max_rank: int) -> dict[tuple[int, str], ModuleDelta]:
    r = _positive_int(config, "r", 32)
    k = _positive_int(config, "gralora_k", 2)
    hybrid_r = config.get("hybrid_r", 0)
    if not isinstance(hybrid_r, int) or isinstance(hybrid_r, bool) or hybrid_r < 0:
        raise AdapterError(f"{CONFIG_FILE}: hybrid_r must be a non-negative integer, got {hybrid_r!r}")
    if r % k:
        raise AdapterError(f"{CONFIG_FILE}: gralora_k={k} must divide r={r}")
    if r + hybrid_r > max_rank:
        raise AdapterError(f"rank {r + hybrid_r} (r + hybrid_r) is above the server's --max-lora-rank {max_rank}")
    alpha = config.get("alpha", 64)
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not math.isfinite(alpha):
        raise AdapterError(f"{CONFIG_FILE}: alpha must be a finite number, got {alpha!r}", 400)
    scale = _checked_scale(CONFIG_FILE, alpha / (r + hybrid_r))
    modules = {}
    for (layer, proj), parts in sorted(grouped.items()):
        name = _module_name(layer, proj)
        fin, fout = base.projections[proj]
        if fin % k or fout % k:
            raise AdapterError(f"{name}: gralora_k={k} must divide in_features={fin} and out_features={fout}")
        A = _expect(f"{name}.gralora_A", parts.get("gralora_A"), (k, fin // k, r))
        B = _expect(f"{name}.gralora_B", parts.get("gralora_B"), (k, r, fout // k))
        gA = gB = None
        expected = {"gralora_A", "gralora_B"} | ({"gralora_A_general.weight", "gralora_B_general.weight"} if hybrid_r else set())
        if set(parts) - expected:
            raise AdapterError(f"{name}: unexpected tensors {sorted(set(parts) - expected)}")
        if hybrid_r:
            gA = _expect(f"{name}.gralora_A_general.weight", parts.get("gralora_A_general.weight"), (hybrid_r, fin)).t()
            gB = _expect(f"{name}.gralora_B_general.weight", parts.get("gralora_B_general.weight"), (fout, hybrid_r)).t()
        modules[(layer, proj)] = ModuleDelta(k, A, B, scale, gA, gB)
    return modules


def parse_adapter(config_raw: bytes, weights_raw, base: BaseShape, max_rank: int, owned: bool = False) -> AdapterWeights:
    """Validate an uploaded adapter against the base model; raises AdapterError naming the problem.
    `owned`: the adapter may keep views of `weights_raw` (see parse_weights)."""
    config = parse_config(config_raw)
    grouped = _group_tensors(parse_weights(weights_raw, owned), base)
    _check_targets(config, grouped)
    if config["peft_type"] == "LORA":
        modules = _lora_modules(config, grouped, base, max_rank)
    else:
        modules = _gralora_modules(config, grouped, base, max_rank)
    rank = max(m.rank + (0 if m.general_A is None else m.general_A.shape[1]) for m in modules.values())
    return AdapterWeights(peft_type=config["peft_type"], rank=rank, config=config, modules=modules)
