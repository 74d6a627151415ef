"""The fused NF4 kernel compiled for Hopper (sm90) without a GPU: Triton's front end and ptxas run on the
CPU, so a tiling that the start-up calibration may pick but that does not compile fails here, not on the
device (a returned-type mismatch the interpreter accepted once did). In a fresh process: the other test
modules import Triton in interpreter mode."""
import json
import os
import re
import subprocess
import sys

COMPILE = r"""
import json
import triton
from triton.backends.compiler import GPUTarget


def compile_all(jobs):
    # jobs: (jit function, constexprs, argument types, warps, stages); prints what compiled and what failed
    failures = []
    for fn, constexprs, types, warps, stages in jobs:
        signature = {a: "constexpr" if a in constexprs else types.get(a, "i32") for a in fn.arg_names}
        src = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=constexprs)
        try:
            triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps, "num_stages": stages})
        except Exception as e:
            cause = e
            while cause.__cause__ is not None:
                cause = cause.__cause__
            failures.append(f"{fn.__name__} {constexprs}: {type(cause).__name__}: {str(cause)[-400:]}")
    print(json.dumps({"compiled": len(jobs), "failures": failures}))
"""

SCRIPT = r"""
import json, sys
import triton
from triton.backends.compiler import GPUTarget
from loraplex.kernels import nf4_matmul as k
from loraplex.kernels.nf4_tiles import candidate_tiles
from loraplex.runtime.nf4_linear import CALIBRATION_ROWS

SHAPES = [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336), (3072, 2048), (2048, 8192)]  # 8B, 1B
variants = {}
from dataclasses import replace
def with_sums_in_kernel(m, n, kk):  # not a candidate (NF4Tiles.sum_in_kernel: slower); bench/nf4_matmul.py --sum-ab times it
    return [replace(t, sum_in_kernel=True) for t in candidate_tiles(m, n, kk, 64, 132) if t.splits > 1]
for n, kk in SHAPES:
    for m in CALIBRATION_ROWS:
        for t in candidate_tiles(m, n, kk, 64, 132) + (with_sums_in_kernel(m, n, kk) if (n, kk, m) in (
                (4096, 4096, 16), (4096, 4096, 64)) else []):
            sub = min(t.block_k, 64) // 2
            for nested in (True, False) if not t.permute else (True,):  # (the decodes read absmax alike)
                key = dict(BLOCKSIZE=64, SUB=sub, KB=t.block_k // (2 * sub), NESTED=nested, NESTED_BLOCKSIZE=256,
                           OFFSET_IN_MEMORY=True, HAS_BIAS=False, SPLIT=t.splits > 1,
                           SUM_IN_KERNEL=t.splits > 1 and t.sum_in_kernel, BLOCK_M=t.block_m,
                           BLOCK_N=t.block_n, BLOCK_K=t.block_k, FP32_DOT=False,
                           PDL=t.splits > 1 and not t.sum_in_kernel, PREFETCH=t.prefetch, PERMUTE=t.permute,
                           PRESCALE=t.prescale, CODES_AS_B=t.codes_as_b, EARLY=True)
                # the scaled decode's asm differs by type (bf16x2 / f16x2 FMAs): fp16 inputs too
                for x in ("*bf16", "*fp16") if t.prescale else ("*bf16",):
                    variants[json.dumps([key, x], sort_keys=True)] = (key, t.num_warps, t.num_stages, x)
types = {"packed_ptr": "*u8", "code_ptr": "*fp32", "nested_absmax_ptr": "*fp32",
         "nested_code_ptr": "*fp32", "offset_ptr": "*fp32", "partial_ptr": "*fp32", "arrivals_ptr": "*i32",
         "offset": "fp32"}
compile_all([(k._nf4_matmul_kernel, constexprs, dict(types, absmax_ptr="*u8" if constexprs["NESTED"] else "*fp32",
                                                     x_ptr=x, bias_ptr=x, out_ptr=x),
              warps, stages) for constexprs, warps, stages, x in variants.values()])
print(json.dumps({"prescaled": sum(c["PRESCALE"] for c, *_ in variants.values())}), file=sys.stderr)
"""


def compile_for_sm90(script: str) -> tuple[dict, str]:
    """Run COMPILE + script in a fresh process with Triton compiled (not interpreted): its result line and stderr."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", COMPILE + script], capture_output=True, text=True, env=env, timeout=900)
    assert run.returncode == 0, run.stderr[-4000:]
    return json.loads(run.stdout.strip().splitlines()[-1]), run.stderr


def test_every_candidate_tiling_compiles_for_sm90():
    result, stderr = compile_for_sm90(SCRIPT)
    assert result["compiled"] >= 8 and not result["failures"], "\n".join(result["failures"])
    assert int(re.search(r'"prescaled": (\d+)', stderr).group(1)) >= 4  # the scaled decode is among them


LORA_SCRIPT = r"""
import json
import triton
from triton.backends.compiler import GPUTarget
from loraplex.kernels import segmented_lora as k
from loraplex.kernels.ops import GRAPH_DECODE_CONFIG, MIXED_GRAPH_CONFIG
from loraplex.kernels.tile_config import choose_tile_config

configs = {choose_tile_config(n) for n in (1, 2, 16, 32, 64)} | {GRAPH_DECODE_CONFIG, MIXED_GRAPH_CONFIG}
common = {"pool_ptr": "*bf16", "table_ptr": "*i64", "token_order_ptr": "*i64", "tiles_ptr": "*i32",
          "tile_count_ptr": "*i32", "partial_ptr": "*fp32", "x_ptr": "*bf16", "y_ptr": "*bf16", "scale_ptr": "*fp32"}
jobs = []
for cfg in configs:
    for aligned in (True, False):
        jobs.append((k._shrink_kernel, dict(BLOCK_M=cfg.block_m, BLOCK_K=cfg.block_k, BLOCK_R=cfg.block_r,
                                            ALIGNED=aligned, UPCAST=False, PDL=True), cfg.shrink_warps, cfg.num_stages))
        for blocks, general in ((True, False), (True, True), (False, True)):
            jobs.append((k._expand_kernel, dict(BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_R=cfg.block_r,
                                                DO_BLOCKS=blocks, DO_GENERAL=general, ALIGNED=aligned, UPCAST=False,
                                                PDL=True), cfg.expand_warps, cfg.num_stages))
compile_all([(fn, constexprs, common, warps, stages) for fn, constexprs, warps, stages in jobs])
"""


def test_segmented_lora_kernels_compile_for_sm90():
    """The shrink and expand (tile loop, programmatic dependent launch) in every tile config serving uses."""
    result, _ = compile_for_sm90(LORA_SCRIPT)
    assert result["compiled"] >= 20 and not result["failures"], "\n".join(result["failures"])


ATTENTION_SCRIPT = r"""
from loraplex.kernels import paged_attention as k

types = {"q_ptr": "*bf16", "k_cache": "*bf16", "v_cache": "*bf16", "out_ptr": "*bf16", "part_out": "*fp32",
         "part_lse": "*fp32", "block_tables": "*i32", "context_lens": "*i32", "query_start": "*i32", "qk_scale": "fp32"}
jobs = []
for head_dim in (64, 128):  # the 1B and 8B shapes (4 query heads a KV head)
    for decode, split, block_m in ((True, False, 16), (True, True, 16), (False, False, 16), (False, False, 64),
                                   (False, False, 128)):
        constexprs = dict(GROUP=4, HEAD_DIM=head_dim, BLOCK_D=head_dim, BLOCK_M=block_m,
                          BLOCK_Q=1 if decode else block_m // 4, BLOCK_N=64, BLOCK_SIZE=16, DECODE=decode, SPLIT=split,
                          UPCAST=False, PRECISION="tf32", DECODE_M=16)
        jobs.append((k._paged_attention_kernel, constexprs, types, 8 if block_m >= 128 else 4, 3))
compile_all(jobs)
"""


def test_paged_attention_compiles_for_sm90():
    """Decode (with and without split-K) and prefill / mixed launches, the latter with the one-query tile that
    a mixed batch's decode rows take."""
    result, _ = compile_for_sm90(ATTENTION_SCRIPT)
    assert result["compiled"] == 10 and not result["failures"], "\n".join(result["failures"])


FOLD_SCRIPT = r"""
from loraplex.kernels import lora_fold as k
from loraplex.kernels import nf4_dequant as d

common = {"xw_ptr": "*bf16", "w_ptr": "*bf16", "pool_ptr": "*bf16", "table_ptr": "*i64", "token_block_ptr": "*i32",
          "token_row_ptr": "*i32", "partial_ptr": "*fp32", "fold_slots_ptr": "*i32", "scale_ptr": "*fp32",
          "largest": "fp32"}
jobs = []
for projections in (1, 2, 3):
    for rank in (16, 32, 64):
        jobs.append((k._fold_inputs_kernel, dict(P=projections, RB=rank, BLOCK_T=32), common, 4, 3))
        jobs.append((k._fold_weights_kernel, dict(P=projections, RB=rank, BLOCK_N=64), common, 4, 3))
dequant = {"packed_ptr": "*u8", "absmax_ptr": "*u8", "code_ptr": "*fp32", "nested_absmax_ptr": "*fp32",
           "nested_code_ptr": "*fp32", "offset": "fp32", "offset_ptr": "*fp32", "out_ptr": "*bf16"}
jobs.append((d._nf4_dequant_kernel, dict(BLOCKSIZE=64, BLOCKS=32, NESTED=True, NESTED_BLOCKSIZE=256,
                                         OFFSET_IN_MEMORY=True), dequant, 4, 3))
compile_all(jobs)
"""


def test_fold_kernels_and_row_strided_dequant_compile_for_sm90():
    """kernels/lora_fold.py in the widths a folding step uses, and the dequantisation into rows of the wider weight."""
    result, _ = compile_for_sm90(FOLD_SCRIPT)
    assert result["compiled"] == 19 and not result["failures"], "\n".join(result["failures"])
