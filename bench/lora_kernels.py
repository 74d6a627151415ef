"""How fast are the segmented LoRA kernels on one decoder layer, against PyTorch references? (GPU)

Every case is one whole decoder layer's adapter work (fused q/k/v, o, fused gate/up, down: four
`apply` calls) for T tokens spread over n distinct adapters, timed as CUDA-graph replays (median):
  kernel   TritonAdapterOps (shrink + expand per fused group, programmatic dependent launch on Hopper)
  gather   PyTorch: gather each segment's weights and tokens, padded, then bmm (one pass per projection)
  loop     PyTorch: TorchAdapterOps, a loop over adapters
bw = adapter bytes (the weights of the n adapters) / kernel time / device-to-device copy bandwidth
(bytes read + written). A bf16/fp16 correctness check against an fp32 PyTorch reference runs first.
The summary (targets in the JSON) is measured on Llama-3.1-8B with 64 decode tokens.

usage: python bench/lora_kernels.py [--quick] [--sweep] [--no-grid] [--skip-check] [--out bench/results/kernels.json]
       python bench/lora_kernels.py --prefill-sweep --out OUT.json   (prefill tile variants only)
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time

import torch
import triton

from loraplex.kernels.ops import TritonAdapterOps
from loraplex.kernels.tile_config import TileConfig
from loraplex.runtime.adapters.ops import TorchAdapterOps
from loraplex.runtime.adapters.peft_format import AdapterWeights, ModuleDelta

from kernel_timing import GatherBmm, copy_bandwidth, graph_us, median_us  # bench/, beside this file
import figures  # noqa: E402 - bench/, beside this file: a PNG beside the JSON

MODELS = {  # hidden, intermediate, q heads, kv heads, head_dim
    "llama-3.2-1b": (2048, 8192, 32, 8, 64),
    "llama-3.1-8b": (4096, 14336, 32, 8, 128),
}
QKV, O, GATE_UP, DOWN = ("q_proj", "k_proj", "v_proj"), ("o_proj",), ("gate_proj", "up_proj"), ("down_proj",)
GROUPS = (QKV, O, GATE_UP, DOWN)
KINDS = {"lora": (1, 0), "gralora_k2": (2, 0), "gralora_k4": (4, 0)}  # (k, hybrid rank)
DEVICE = "cuda"


def projection_shapes(model: str) -> dict[str, tuple[int, int]]:
    hidden, inter, heads, kv_heads, head_dim = MODELS[model]
    q, kv = heads * head_dim, kv_heads * head_dim
    return {"q_proj": (hidden, q), "k_proj": (hidden, kv), "v_proj": (hidden, kv), "o_proj": (q, hidden),
            "gate_proj": (hidden, inter), "up_proj": (hidden, inter), "down_proj": (inter, hidden)}


def random_adapter(shapes, k, r, hybrid_r, dtype, gen) -> AdapterWeights:
    """One layer's adapter with random weights of unit-ish output scale (never zeros)."""
    modules = {}
    for proj, (fin, fout) in shapes.items():
        rand = lambda *s: torch.randn(*s, device=DEVICE, generator=gen).to(dtype)
        A, B = rand(k, fin // k, r) / fin ** 0.5, rand(k, r, fout // k) / r ** 0.5
        gA = rand(fin, hybrid_r) / fin ** 0.5 if hybrid_r else None
        gB = rand(hybrid_r, fout) / hybrid_r ** 0.5 if hybrid_r else None
        modules[(0, proj)] = ModuleDelta(k, A, B, 2.0, gA, gB)
    return AdapterWeights("GRALORA" if k > 1 else "LORA", k * r + hybrid_r, {}, modules)


def token_slots(num_tokens: int, num_adapters: int, prefill: bool) -> list[int]:
    if prefill:  # one prompt per adapter, contiguous
        return [i * num_adapters // num_tokens for i in range(num_tokens)]
    return [i % num_adapters for i in range(num_tokens)]  # decode: requests interleaved


# -- one case -------------------------------------------------------------------------------
class LayerCase:
    def __init__(self, model, num_tokens, num_adapters, rank, kind, prefill, dtype=torch.bfloat16, seed=0,
                 adapters: list[AdapterWeights] | None = None):
        self.shapes = projection_shapes(model)
        gen = torch.Generator(device=DEVICE).manual_seed(seed)
        k, hybrid_r = KINDS.get(kind, (1, 0))
        self.adapters = adapters or [random_adapter(self.shapes, k, rank, hybrid_r, dtype, gen)
                                     for _ in range(num_adapters)]
        self.slots = token_slots(num_tokens, len(self.adapters), prefill)
        self.ops = TritonAdapterOps(len(self.adapters), self.shapes, 1, DEVICE, dtype)
        for slot, adapter in enumerate(self.adapters):
            self.ops.load(slot, adapter)
        self.meta = self.ops.metadata(self.slots)
        self.xs = {g: torch.randn(num_tokens, self.shapes[g[0]][0], device=DEVICE, generator=gen).to(dtype)
                   for g in GROUPS}
        self.ys = {g: torch.randn(num_tokens, sum(self.shapes[p][1] for p in g), device=DEVICE,
                                  generator=gen).to(dtype) for g in GROUPS}
        self.adapter_bytes = sum(a.nbytes for a in self.adapters)

    def run_kernel(self, groups=GROUPS):
        for g in groups:
            self.ops.apply(0, g, self.xs[g], self.ys[g], self.meta)

    def references(self):
        torch_ops = TorchAdapterOps(len(self.adapters), self.shapes, 1, DEVICE, self.ops.dtype)
        for slot, adapter in enumerate(self.adapters):
            torch_ops.load(slot, adapter)
        torch_meta = torch_ops.metadata(self.slots)
        gather = GatherBmm(self.shapes, self.adapters, self.slots)
        loop = lambda: [torch_ops.apply(0, g, self.xs[g], self.ys[g], torch_meta) for g in GROUPS]
        gathered = lambda: [gather.apply(g, self.xs[g], self.ys[g]) for g in GROUPS]
        return gathered, loop


def kernel_us(case: LayerCase) -> float:
    return graph_us(case.run_kernel)


def eager_us(case: LayerCase) -> float:
    return median_us(case.run_kernel)


# -- correctness ----------------------------------------------------------------------------
def untouched_mask(adapters, slots, projections, shapes) -> torch.Tensor:
    """Elements of y no delta should reach: rows without adapter, columns of modules a slot lacks."""
    rows = []
    for slot in slots:
        present = [slot >= 0 and (0, p) in adapters[slot].modules for p in projections]
        rows.append([not has for has, p in zip(present, projections) for _ in range(shapes[p][1])])
    return torch.tensor(rows, device=DEVICE)


def check(dtype) -> list[dict]:
    """TritonAdapterOps vs an fp32 TorchAdapterOps on mixed adapters; every touched row compared."""
    shapes = projection_shapes("llama-3.2-1b")
    gen = torch.Generator(device=DEVICE).manual_seed(123)
    specs = [(1, 8, 0), (1, 16, 0), (1, 64, 0), (1, 256, 0), (2, 16, 0), (4, 64, 0), (2, 32, 16), (4, 16, 8)]
    adapters = [random_adapter(shapes, k, r, hr, torch.float32, gen) for k, r, hr in specs]
    # one adapter lacks k_proj and down_proj: those columns must stay untouched for its rows
    for key in [(0, "k_proj"), (0, "down_proj")]:
        del adapters[3].modules[key]
    ops = TritonAdapterOps(len(specs) + 2, shapes, 1, DEVICE, dtype)
    ref = TorchAdapterOps(len(specs) + 2, shapes, 1, DEVICE, torch.float32)
    for slot, a in enumerate(adapters):
        ops.load(slot, a)
        ref.load(slot, a)
    results = []
    decode = [-1 if s % 5 == 4 else s % len(specs) for s in range(48)]
    prefill = [s // 40 if s % 50 else -1 for s in range(300)]
    configs = [("auto", None, None, 1, False), ("auto_pdl", None, None, 1, True),
               ("split4_two_pass_pdl", None, 4, 2, True),
               ("two_row_tiles_pdl", TileConfig(2, 256, 16, 512, 4, 2, 1), None, 1, True),
               ("prefill_tiles", TileConfig(64, 64, 32, 128, 4, 4, 2), None, 1, False)]
    one_token = [-1] + list(range(len(specs))) + [-1]
    phases = [("one_token", one_token), ("decode", decode), ("prefill", prefill)]
    for (name, cfg, splits, passes, pdl), (phase, slots) in itertools.product(configs, phases):
        ops.tile_config, ops.num_splits, ops.hybrid_passes, ops.pdl = cfg, splits, passes, pdl
        meta = ops.metadata(slots)
        meta.partials.fill_(float("nan"))
        worst = 0.0
        for g in GROUPS:
            x = torch.randn(len(slots), shapes[g[0]][0], device=DEVICE, generator=gen).to(dtype)
            y0 = torch.randn(len(slots), sum(shapes[p][1] for p in g), device=DEVICE, generator=gen).to(dtype)
            y, y_ref = y0.clone(), y0.float()
            ops.apply(0, g, x, y, meta)
            ref.apply(0, g, x.float(), y_ref, ref.metadata(slots))
            untouched = untouched_mask(adapters, slots, g, shapes)
            assert torch.equal(y[untouched], y0[untouched]), f"{name}/{phase}/{g}: untouched elements changed"
            err = ((y.float() - y_ref).norm() / (y_ref - y0.float()).norm()).item()
            assert err < 2e-2 and err == err, f"{name}/{phase}/{g}: relative error {err:.2e}"
            worst = max(worst, err)
        results.append({"dtype": str(dtype).replace("torch.", ""), "config": name, "phase": phase,
                        "max_rel_err": worst})
        print(f"check {results[-1]}", flush=True)
    return results


# -- the runs -------------------------------------------------------------------------------
def measure_case(model, tokens, adapters, rank, kind, prefill, with_refs=True) -> dict:
    case = LayerCase(model, tokens, adapters, rank, kind, prefill)
    row = {"model": model, "tokens": tokens, "phase": "prefill" if prefill else "decode", "adapters": adapters,
           "rank": rank, "kind": kind, "adapter_MB": case.adapter_bytes / 1e6}
    row["kernel_us"] = kernel_us(case)
    row["kernel_eager_us"] = eager_us(case)
    row["bw_fraction"] = case.adapter_bytes / (row["kernel_us"] * 1e-6) / COPY_BW
    if with_refs:
        gathered, loop = case.references()
        row["gather_us"] = graph_us(gathered)
        row["loop_us"] = graph_us(loop)
        row["gather_over_kernel"] = row["gather_us"] / row["kernel_us"]
        row["loop_over_kernel"] = row["loop_us"] / row["kernel_us"]
    del case
    torch.cuda.empty_cache()
    return row


def case_grid(quick: bool):
    models = ["llama-3.1-8b"] if quick else list(MODELS)
    token_counts = [(1, False), (32, False), (128, False), (2048, True)]
    adapter_counts = [1, 32, 128] if quick else [1, 8, 32, 64, 128]
    for model, (tokens, prefill), adapters, rank, kind in itertools.product(
            models, token_counts, adapter_counts, [16, 64], KINDS):
        if adapters <= tokens:
            yield model, tokens, adapters, rank, kind, prefill


def summary_cases() -> dict:
    m = "llama-3.1-8b"
    lora16 = measure_case(m, 64, 64, 16, "lora", False, with_refs=False)
    lora64 = measure_case(m, 64, 64, 64, "lora", False, with_refs=False)
    gra64 = measure_case(m, 64, 64, 64, "gralora_k4", False, with_refs=False)
    lora16_32 = measure_case(m, 64, 32, 16, "lora", False)
    return {
        "decode_bw_fraction": lora16["bw_fraction"],
        "gralora_k4_over_lora": gra64["kernel_us"] / lora64["kernel_us"],
        "speedup_vs_torch_32_adapters": lora16_32["gather_over_kernel"],
        "targets": {"decode_bw_fraction": ">= 0.6", "gralora_k4_over_lora": "<= 1.10",
                    "speedup_vs_torch_32_adapters": ">= 5"},
        "layer": "llama-3.1-8b, one decoder layer (q/k/v fused, o, gate/up fused, down), 64 decode tokens, bf16, "
                 "CUDA-graph replay",
        "rows": [lora16, lora64, gra64, lora16_32],
    }


def per_group(model="llama-3.1-8b", tokens=64, adapters=64, rank=16, kind="lora") -> list[dict]:
    """Where the layer's time goes: each fused group alone (shrink + expand)."""
    case = LayerCase(model, tokens, adapters, rank, kind, False)
    rows = []
    for g in GROUPS:
        t = graph_us(lambda: case.run_kernel([g]))
        nbytes = sum(a.modules[(0, p)].A.nbytes + a.modules[(0, p)].B.nbytes for a in case.adapters for p in g)
        rows.append({"group": "+".join(g), "us": t, "MB": nbytes / 1e6, "bw_fraction": nbytes / (t * 1e-6) / COPY_BW})
    return rows


def hybrid_passes() -> list[dict]:
    """GraLoRA k=2 r=32 + hybrid r=16: the general part in the same expand pass or its own."""
    rows = []
    for tokens, prefill in [(64, False), (2048, True)]:
        gen = torch.Generator(device=DEVICE).manual_seed(7)
        shapes = projection_shapes("llama-3.1-8b")
        n = 8 if prefill else 64
        adapters = [random_adapter(shapes, 2, 32, 16, torch.bfloat16, gen) for _ in range(n)]
        case = LayerCase("llama-3.1-8b", tokens, n, 32, "hybrid", prefill, adapters=adapters)
        for passes in (1, 2):
            case.ops.hybrid_passes = passes
            t = kernel_us(case)
            rows.append({"tokens": tokens, "adapters": n, "passes": passes, "kernel_us": t,
                         "bw_fraction": case.adapter_bytes / (t * 1e-6) / COPY_BW})
        del case
    return rows


def mixed_ranks() -> dict:
    """Ranks 8/16/64/256 and GraLoRA/hybrid adapters in one launch (kernel only: GatherBmm stacks one shape)."""
    shapes = projection_shapes("llama-3.1-8b")
    gen = torch.Generator(device=DEVICE).manual_seed(9)
    specs = [(1, 8, 0), (1, 16, 0), (1, 64, 0), (1, 256, 0), (4, 16, 0), (2, 32, 16)] * 8
    adapters = [random_adapter(shapes, k, r, hr, torch.bfloat16, gen) for k, r, hr in specs]
    case = LayerCase("llama-3.1-8b", 64, len(adapters), 0, "mixed", False, adapters=adapters)
    t = kernel_us(case)
    return {"adapters": len(adapters), "tokens": 64, "ranks": "8/16/64/256 LoRA, GraLoRA k4 r16, hybrid k2 r32+16",
            "kernel_us": t, "adapter_MB": case.adapter_bytes / 1e6,
            "bw_fraction": case.adapter_bytes / (t * 1e-6) / COPY_BW}


def sweep() -> list[dict]:
    """Tile shapes and warps around the heuristic's choice on decode layers (to tune it)."""
    rows = []
    cases = [  # tokens, adapters, rank, kind, variants (block_m, block_k, shrink warps, block_n, expand warps)
        (64, 64, 16, "lora", [(1, 256, 4, 256, 1), (1, 512, 4, 256, 1), (1, 256, 8, 256, 1)]),
        (64, 32, 16, "lora", [(2, 128, 4, 256, 1), (2, 256, 4, 256, 1), (2, 64, 4, 256, 1), (1, 256, 4, 256, 1)]),
        (128, 32, 16, "lora", [(4, 64, 4, 256, 1), (4, 64, 4, 256, 2), (4, 128, 4, 256, 2), (16, 256, 4, 256, 4)]),
        (128, 8, 16, "lora", [(16, 256, 4, 256, 4), (16, 128, 4, 128, 4), (16, 256, 4, 256, 2), (4, 64, 4, 256, 1)]),
        (64, 64, 64, "lora", [(1, 256, 4, 256, 1), (1, 128, 4, 256, 1)]),
    ]
    for tokens, adapters, rank, kind, variants in cases:
        case = LayerCase("llama-3.1-8b", tokens, adapters, rank, kind, False)
        for bm, bk, shrink_warps, bn, expand_warps in variants:
            case.ops.tile_config = TileConfig(bm, bk, 16, bn, shrink_warps, expand_warps, 1 if bm < 16 else 3)
            case.meta = case.ops.metadata(case.slots)
            try:
                t = kernel_us(case)
            except Exception as e:
                print(f"sweep variant failed: {e!r}"[:300], flush=True)
                continue
            rows.append({"tokens": tokens, "adapters": adapters, "rank": rank, "kind": kind, "block_m": bm,
                         "block_k": bk, "shrink_warps": shrink_warps, "block_n": bn, "expand_warps": expand_warps,
                         "kernel_us": t, "bw_fraction": case.adapter_bytes / (t * 1e-6) / COPY_BW})
            print(f"sweep {rows[-1]}", flush=True)
        del case
    return rows


PREFILL_VARIANTS = [  # (block_m, block_k, block_r, block_n, shrink warps, expand warps, stages, splits, presum)
    # splits None: the rule (tile_config.choose_splits)
    (32, 128, 16, 128, 4, 4, 2, None, True),  # the rule's prefill tiles (tile_config.choose_tile_config)
    (64, 64, 32, 128, 4, 4, 2, None, True),  # the rule's tiles before
    (32, 128, 16, 128, 4, 4, 3, None, True), (32, 64, 16, 128, 4, 4, 2, None, True), (32, 128, 16, 64, 4, 4, 2, None, True),
    (32, 128, 16, 128, 4, 2, 2, None, True), (16, 128, 16, 128, 4, 4, 2, None, True), (32, 128, 16, 128, 4, 4, 2, None, False),
    (64, 64, 32, 128, 4, 4, 2, 1, False),
    (64, 64, 32, 128, 4, 4, 2, 2, False), (64, 64, 32, 128, 4, 4, 2, 4, True), (64, 64, 16, 128, 4, 4, 2, None, True),
    (64, 64, 32, 256, 4, 8, 2, None, True), (64, 64, 32, 256, 4, 8, 2, None, False), (64, 64, 16, 256, 4, 8, 2, 1, False),
    (128, 64, 32, 128, 8, 8, 2, None, True), (128, 64, 32, 256, 8, 8, 2, None, True), (128, 64, 16, 128, 8, 8, 2, 1, False),
    (64, 128, 32, 128, 4, 4, 2, None, True), (64, 64, 16, 64, 4, 4, 2, None, True),
    (64, 64, 32, 128, 4, 4, 3, None, True), (64, 64, 32, 128, 4, 8, 2, None, True),
]


def prefill_sweep() -> list[dict]:
    """A 2,048-token prefill layer (8B, rank 16: one adapter, and 8 of 256 tokens each): the whole layer, the
    shrinks alone and the expands alone, per tile variant (PREFILL_VARIANTS), to tune the prefill tiles."""
    import loraplex.kernels.ops as kernel_ops
    rows = []
    for adapters in (1, 8):
        case = LayerCase("llama-3.1-8b", 2048, adapters, 16, "lora", True)
        for bm, bk, br, bn, shrink_warps, expand_warps, stages, splits, presum in PREFILL_VARIANTS:
            config = TileConfig(bm, bk, br, bn, shrink_warps, expand_warps, stages)
            case.ops.tile_config, case.ops.num_splits, case.ops.presum = config, splits, presum
            case.meta = case.ops.metadata(case.slots)
            row = {"adapters": adapters, "block_m": bm, "block_k": bk, "block_r": br, "block_n": bn,
                   "shrink_warps": shrink_warps, "expand_warps": expand_warps, "stages": stages,
                   "splits": splits or case.ops.splits(case.meta.plan, GROUPS[2]),
                   "presum": presum}
            try:
                row["layer_us"] = kernel_us(case)
                for only, other in (("shrink", "expand"), ("expand", "shrink")):
                    original = getattr(kernel_ops, other)
                    setattr(kernel_ops, other, lambda *a, **k: None)
                    try:
                        row[f"{only}_us"] = kernel_us(case)
                    finally:
                        setattr(kernel_ops, other, original)
            except Exception as e:  # noqa: BLE001 - a variant the compiler refuses is skipped
                print(f"prefill sweep variant failed: {e!r}"[:300], flush=True)
                continue
            rows.append(row)
            print(f"prefill sweep {row}", flush=True)
        del case
    return rows


def per_kernel(tile_config: TileConfig | None, pdl: bool) -> list[dict]:
    """Shrinks alone and expands alone (the other patched out) on the r16, 64-adapter decode layer."""
    import loraplex.kernels.ops as kernel_ops
    case = LayerCase("llama-3.1-8b", 64, 64, 16, "lora", False)
    case.ops.tile_config, case.ops.pdl = tile_config, pdl
    case.meta = case.ops.metadata(case.slots)
    case.run_kernel()
    rows = []
    for only in ("shrink", "expand"):
        other = "expand" if only == "shrink" else "shrink"
        original = getattr(kernel_ops, other)
        setattr(kernel_ops, other, lambda *a, **k: None)
        try:
            for groups in [[g] for g in GROUPS] + [list(GROUPS)]:
                t = graph_us(lambda: case.run_kernel(groups))
                part = "A" if only == "shrink" else "B"
                nbytes = sum(getattr(a.modules[(0, p)], part).nbytes for a in case.adapters for g in groups for p in g)
                rows.append({"kernel": only, "groups": " ".join("+".join(g) for g in groups), "us": t,
                             "MB": nbytes / 1e6, "bw_fraction": nbytes / (t * 1e-6) / COPY_BW})
        finally:
            setattr(kernel_ops, other, original)
    return rows


def table(rows: list[dict], columns: list[str]) -> str:
    fmt = lambda v: f"{v:.3g}" if isinstance(v, float) else str(v)
    lines = [" | ".join(columns), " | ".join("---" for _ in columns)]
    lines += [" | ".join(fmt(r.get(c, "")) for c in columns) for r in rows]
    return "\n".join(lines)


def main() -> None:
    global COPY_BW
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="Llama-3.1-8B only, fewer adapter counts")
    parser.add_argument("--sweep", action="store_true", help="also time tile-shape variants of the summary cases")
    parser.add_argument("--prefill-sweep", action="store_true", help="only: prefill tile variants (PREFILL_VARIANTS)")
    parser.add_argument("--skip-check", action="store_true")
    parser.add_argument("--no-grid", action="store_true", help="summary, per-group and extras only")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "kernels.json"))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench/lora_kernels.py needs a CUDA GPU")
    began = time.time()
    torch.backends.cuda.matmul.allow_tf32 = False
    device = torch.cuda.get_device_name()
    COPY_BW = copy_bandwidth()
    print(f"{device}: copy bandwidth {COPY_BW / 1e12:.2f} TB/s (read + write)", flush=True)
    result = {"device": device, "torch": torch.__version__, "triton": triton.__version__,
              "copy_bandwidth_TBps": COPY_BW / 1e12}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)

    def save():  # after every section, so an interrupted run still leaves its numbers
        result["seconds"] = time.time() - began
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)

    if args.prefill_sweep:
        result["prefill_sweep"] = prefill_sweep()
        save()
        return
    if not args.skip_check:
        result["check"] = check(torch.bfloat16) + check(torch.float16)
    result["summary"] = summary_cases()
    save()
    print(json.dumps({k: v for k, v in result["summary"].items() if k != "rows"}, indent=1), flush=True)
    result["per_group"] = per_group()
    print(table(result["per_group"], ["group", "us", "MB", "bw_fraction"]), flush=True)
    if args.sweep:
        result["sweep"] = sweep()
        for cfg, pdl in [(None, True)]:
            rows = per_kernel(cfg, pdl)
            result.setdefault("per_kernel", []).append({"config": str(cfg), "pdl": pdl, "rows": rows})
            print(f"per kernel, {cfg}, pdl={pdl}")
            print(table(rows, ["kernel", "groups", "us", "MB", "bw_fraction"]), flush=True)
    result["hybrid_passes"] = hybrid_passes()
    result["mixed_ranks"] = mixed_ranks()
    save()
    cases = result["cases"] = []
    for spec in [] if args.no_grid else case_grid(args.quick):
        cases.append(measure_case(*spec))
        print(" ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in cases[-1].items()),
              flush=True)
        if len(cases) % 20 == 0:
            save()
    save()
    columns = ["model", "phase", "tokens", "adapters", "rank", "kind", "adapter_MB", "kernel_us", "bw_fraction",
               "gather_over_kernel", "loop_over_kernel"]
    print(table(cases, columns))
    print(table(result["hybrid_passes"], ["tokens", "adapters", "passes", "kernel_us", "bw_fraction"]))
    print(json.dumps(result["mixed_ranks"]))
    print("summary", json.dumps({k: v for k, v in result["summary"].items() if k != "rows"}))
    print(f"wrote {args.out} in {result['seconds']:.0f} s")
    figures.draw_after_run(args.out)


if __name__ == "__main__":
    main()
