"""The fused NF4 kernel compiled for Hopper (sm90) without a GPU: Triton's front end and ptxas run on the
CPU, so a tiling that the start-up calibration may pick but that does not compile fails here, not on the
device (a returned-type mismatch the interpreter accepted once did). In a fresh process: the other test
modules import Triton in interpreter mode."""
import json
import os
import subprocess
import sys

SCRIPT = r"""
import json, sys
import triton
from triton.backends.compiler import GPUTarget
from loraplex.kernels import nf4_matmul as k
from loraplex.runtime.nf4_linear import CALIBRATION_ROWS

SHAPES = [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336), (3072, 2048), (2048, 8192)]  # 8B, 1B
variants = {}
for n, kk in SHAPES:
    for m in CALIBRATION_ROWS:
        for t in k.candidate_tiles(m, n, kk, 64, 132):
            sub = min(t.block_k, 64) // 2
            for nested in (True, False):
                key = dict(BLOCKSIZE=64, SUB=sub, KB=t.block_k // (2 * sub), NESTED=nested, NESTED_BLOCKSIZE=256,
                           OFFSET_IN_MEMORY=True, HAS_BIAS=False, SPLIT=t.splits > 1, BLOCK_M=t.block_m,
                           BLOCK_N=t.block_n, BLOCK_K=t.block_k, FP32_DOT=False, PDL=t.splits > 1,
                           PREFETCH=t.prefetch)
                variants[json.dumps(key, sort_keys=True)] = (key, t.num_warps, t.num_stages)
types = {"x_ptr": "*bf16", "packed_ptr": "*u8", "code_ptr": "*fp32", "nested_absmax_ptr": "*fp32",
         "nested_code_ptr": "*fp32", "offset_ptr": "*fp32", "bias_ptr": "*bf16", "out_ptr": "*bf16",
         "partial_ptr": "*fp32", "offset": "fp32"}
failures = []
for constexprs, warps, stages in variants.values():
    t = dict(types, absmax_ptr="*u8" if constexprs["NESTED"] else "*fp32")
    signature = {a: "constexpr" if a in constexprs else t.get(a, "i32") for a in k._nf4_matmul_kernel.arg_names}
    src = triton.compiler.ASTSource(fn=k._nf4_matmul_kernel, signature=signature, constexprs=constexprs)
    try:
        triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps, "num_stages": stages})
    except Exception as e:
        cause = e
        while cause.__cause__ is not None:
            cause = cause.__cause__
        failures.append(f"{constexprs}: {type(cause).__name__}: {str(cause)[-400:]}")
print(json.dumps({"compiled": len(variants), "failures": failures}))
"""


def test_every_candidate_tiling_compiles_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=900)
    assert run.returncode == 0, run.stderr[-4000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["compiled"] >= 8 and not result["failures"], "\n".join(result["failures"])
