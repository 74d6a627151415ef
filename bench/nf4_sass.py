"""The fused NF4 kernel's main loop in sm90 SASS, per tiling, without a GPU: instructions a loop step and a weight.

Triton's front end and ptxas run on the CPU (`GPUTarget("cuda", 90, 32)`), so the kernel compiles here the way it
compiles on an H100/H200, with the launch's integer and pointer arguments specialised as divisible by 16 as a real
launch specialises them (without that, x and the codes load 2 bytes at a time and the counts mean nothing).
nvdisasm (shipped with Triton) prints the cubin; the loop is the shortest backward branch around the HGMMAs.
Per tiling: instructions a loop step (one warp), warp instructions a weight (x warps / weights a step), the most
frequent opcodes, the HGMMA waits, spills. This is the count that a device run's time should be read against: the
kernel is bound by issue and latency, not bandwidth (kernels/nf4_matmul.py).

usage: python bench/nf4_sass.py [--out bench/results/nf4_sass.json]
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import re
import subprocess
import tempfile
from dataclasses import asdict

os.environ.pop("TRITON_INTERPRET", None)

import figures  # noqa: E402 - bench/, beside this file: a PNG beside the JSON
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from loraplex.kernels import nf4_matmul as nf4  # noqa: E402
from loraplex.kernels.nf4_tiles import NF4Tiles  # noqa: E402

TILINGS = [  # the calibration's usual winners at 16 / 32 / 48-64 / 128 rows, then this session's options
    NF4Tiles(16, 128, 64, 4, 4, 3, permute=True),
    NF4Tiles(32, 128, 128, 4, 4, 2, permute=True),
    NF4Tiles(64, 64, 64, 4, 4, 3, permute=True),
    NF4Tiles(64, 64, 64, 4, 4, 3, permute=True, prescale=True),
    NF4Tiles(64, 128, 64, 4, 4, 3, permute=True),
    NF4Tiles(128, 128, 64, 1, 8, 2, permute=True),
    NF4Tiles(64, 64, 64, 4, 4, 3, permute=True, prescale=True, codes_as_b=True),
    NF4Tiles(64, 128, 64, 4, 4, 3, permute=True, prescale=True, codes_as_b=True),
    NF4Tiles(64, 128, 64, 4, 4, 3, permute=True, codes_as_b=True),
    NF4Tiles(64, 128, 64, 4, 8, 3, permute=True, prescale=True, codes_as_b=True),
    NF4Tiles(64, 64, 64, 4, 4, 3, permute=True, sum_in_kernel=True),
]
POINTERS = {"x_ptr": "*bf16", "packed_ptr": "*u8", "absmax_ptr": "*u8", "code_ptr": "*fp32",
            "nested_absmax_ptr": "*fp32", "nested_code_ptr": "*fp32", "offset_ptr": "*fp32", "bias_ptr": "*bf16",
            "out_ptr": "*bf16", "partial_ptr": "*fp32", "arrivals_ptr": "*i32"}
NVDISASM = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "nvdisasm")


def compile_tiles(t: NF4Tiles):
    """The kernel for an 8B-shaped call with these tiles (double-quantised absmax, bf16 x, no bias)."""
    fn = nf4._nf4_matmul_kernel
    sub = min(t.block_k, 64) // 2
    split = t.splits > 1
    constexprs = dict(BLOCKSIZE=64, SUB=sub, KB=t.block_k // (2 * sub), NESTED=True, NESTED_BLOCKSIZE=256,
                      OFFSET_IN_MEMORY=True, HAS_BIAS=False, SPLIT=split, SUM_IN_KERNEL=split and t.sum_in_kernel,
                      BLOCK_M=t.block_m, BLOCK_N=t.block_n, BLOCK_K=t.block_k, FP32_DOT=False,
                      PDL=split and not t.sum_in_kernel, PREFETCH=t.prefetch, PERMUTE=t.permute, PRESCALE=t.prescale,
                      CODES_AS_B=t.codes_as_b, EARLY=True)
    signature = {a: "constexpr" if a in constexprs else POINTERS.get(a, "fp32" if a == "offset" else "i32")
                 for a in fn.arg_names}
    # what a launch on 16-byte aligned tensors with dimensions divisible by 16 specialises
    aligned = [a for a in fn.arg_names if a in POINTERS or signature[a] == "i32"]
    attrs = {(fn.arg_names.index(a),): [["tt.divisibility", 16]] for a in aligned}
    return triton.compile(ASTSource(fn, signature, constexprs, attrs), target=GPUTarget("cuda", 90, 32),
                          options={"num_warps": t.num_warps, "num_stages": t.num_stages})


def main_loop(cubin: bytes) -> list[str]:
    """The instructions of the shortest loop (backward branch) that issues HGMMAs."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        sass = subprocess.run([NVDISASM, "-c", f.name], capture_output=True, text=True, check=True).stdout
    labels, instructions = {}, []
    for line in sass.splitlines():
        label = re.match(r"\s*(\.L_x_\d+):", line)
        if label:
            labels[label.group(1)] = len(instructions)
        op = re.search(r"/\*[0-9a-f]{4}\*/\s+(.*?)\s*;", line)
        if op:
            instructions.append(op.group(1))
    loops = []
    for end, text in enumerate(instructions):
        target = re.search(r"BRA.*?(\.L_x_\d+)", text)
        if target and labels.get(target.group(1), end + 1) <= end:
            body = instructions[labels[target.group(1)]:end + 1]
            if any("HGMMA" in i for i in body):
                loops.append(body)
    return min(loops, key=len) if loops else []


def opcode(instruction: str) -> str:
    return re.sub(r"^@!?U?P\w+\s+", "", instruction).split()[0].split(".")[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "nf4_sass.json"))
    args = parser.parse_args()
    rows = []
    print(f"{'tiles':58} {'loop':>5} {'/weight':>8}  top opcodes")
    for t in TILINGS:
        loop = main_loop(compile_tiles(t).asm["cubin"])
        ops = collections.Counter(opcode(i) for i in loop)
        weights = t.block_n * t.block_k
        row = {"tiles": asdict(t), "loop_instructions": len(loop),
               "warp_instructions_per_weight": len(loop) * t.num_warps / weights,
               "hgmma": ops.get("HGMMA", 0), "hgmma_waits": sum("WARPGROUP.DEPBAR" in i for i in loop),
               "spills": ops.get("LDL", 0) + ops.get("STL", 0), "opcodes": dict(ops.most_common())}
        rows.append(row)
        label = (f"{t.block_m}x{t.block_n}x{t.block_k} s{t.splits} w{t.num_warps} st{t.num_stages}"
                 + "".join(f" +{n}" for n, on in (("ps", t.prescale), ("xb", t.codes_as_b),
                                                  ("sk", t.sum_in_kernel)) if on))
        print(f"{label:58} {len(loop):5d} {row['warp_instructions_per_weight']:8.3f}  "
              + " ".join(f"{k}:{v}" for k, v in ops.most_common(8)))
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"target": "sm90 (ptxas from triton " + triton.__version__ + ")", "tilings": rows}, f, indent=1)
    print(f"wrote {args.out}")
    figures.draw_after_run(args.out)


if __name__ == "__main__":
    main()
