"""Two decodes of bitsandbytes' packed 4-bit codes into the 16-bit codes a tl.dot multiplies (the NF4 kernels'
inner step; kernels/nf4_matmul.py says how the codes are laid out and scaled).

- gather_dot: each nibble indexes the 16 codes with tl.gather (a shared-memory table, one load per weight).
  Runs everywhere, the interpreter included, and in fp32 for fp32 inputs.
- permute_dot: the codes' low and high bytes sit in 8 registers (table_words) and byte permutes (PTX prmt,
  inline assembly: CUDA only) turn each 32-bit word of packed bytes into 8 codes, 21 instructions for 8
  weights. Calibration times both (NF4Tiles.permute); on an H100 the permute decode was 7-22% faster on every
  8B shape and row count (bench/results/nf4_decode_ab.json) and gave the same product bit for bit.
- permute_dot_scaled: the permute decode with each code pair multiplied by its block's absmax (a bf16x2 / f16x2
  FMA, 4 instructions for 8 weights) before a dot that accumulates in place. Unscaled, every block's product is
  rescaled into the fp32 accumulator: one FFMA per weight at 64 rows, two at 128, and the dot must finish before
  it; scaled, the absmax is rounded to the 16-bit type and each weight rounded once more (relative error
  <= 2^-8 per weight against bitsandbytes' one rounding), and the tensor cores accumulate.
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def gather_codes(q, code, BLOCK_N: tl.constexpr, SUB: tl.constexpr):
    """The [BLOCK_N, 2 * SUB] codes (code's type) of q [BLOCK_N, SUB] packed bytes, unscaled."""
    q = q.to(tl.int32)
    # high nibble = even input feature, low nibble = the next one
    nibbles = tl.reshape(tl.join(q >> 4, q & 15), (BLOCK_N * 2 * SUB,))
    return tl.reshape(tl.gather(code, nibbles, 0), (BLOCK_N, 2 * SUB))


@triton.jit
def gather_dot(q, code, xt, BLOCK_N: tl.constexpr, SUB: tl.constexpr, FP32_DOT: tl.constexpr):
    """codes(q [BLOCK_N, SUB] packed bytes) @ xt [2 * SUB, BLOCK_M] in fp32 (unscaled)."""
    w = gather_codes(q, code, BLOCK_N, SUB)
    if FP32_DOT:
        return tl.dot(w, xt.to(tl.float32), input_precision="ieee")
    return tl.dot(w, xt)


# 8 codes from one 32-bit word of packed bytes ($4) by byte permutes (prmt) of the 16-entry code table in
# registers: $5-$8 hold the low bytes of the 16 codes (4 a register), $9-$12 the high bytes. A prmt
# picks 4 bytes out of 8 by the 4 nibbles in its selector's low half (bit 3 would replicate a sign, so it
# is masked off: the first prmt pair reads entries 0-7, the second 8-15, and a third picks per byte by
# bit 3). Then two prmts interleave low and high bytes into pairs of 16-bit codes: $0-$3 hold codes
# (0, 1) .. (6, 7), the even one in the low half. Element 2i is the high nibble of byte i, so the
# selector nibbles come in the order 1, 0, 3, 2.
_HALF = """prmt.b32 a, $5, $6, i7;
prmt.b32 b, $7, $8, i7;
prmt.b32 lo, a, b, s2;
prmt.b32 a, $9, $10, i7;
prmt.b32 b, $11, $12, i7;
prmt.b32 hi, a, b, s2;
prmt.b32 {even}, lo, hi, 0x4051;
prmt.b32 {odd}, lo, hi, 0x6273;
"""  # the 4 codes of the selectors' low 16 bits into two output pairs
_DECODE = """.reg .b32 i7, s2, a, b, lo, hi;
and.b32 i7, $4, 0x77777777;
shr.u32 s2, $4, 1;
and.b32 s2, s2, 0x44444444;
or.b32 s2, s2, 0x32103210;
""" + _HALF.format(even="$0", odd="$1") + """shr.u32 i7, i7, 16;
shr.u32 s2, s2, 16;
""" + _HALF.format(even="$2", odd="$3")
PERMUTE_DECODE = tl.constexpr("{\n" + _DECODE + "}")
# ... then each pair times $13 (the block's absmax in both halves); + -0.0 keeps the product's sign of zero
_SCALE = """.reg .b32 z;
mov.b32 z, 0x80008000;
""" + "".join(f"fma.rn.{{t}}x2 ${i}, ${i}, $13, z;\n" for i in range(4))
PERMUTE_DECODE_SCALED_BF16 = tl.constexpr("{\n" + _DECODE + _SCALE.format(t="bf16") + "}")
PERMUTE_DECODE_SCALED_F16 = tl.constexpr("{\n" + _DECODE + _SCALE.format(t="f16") + "}")


@triton.jit
def table_words(code, keep):
    """The 16 codes (16-bit floats) as 8 int32 words, 4 of their low bytes, then 4 of their high bytes; each
    broadcast to `keep`'s shape (a boolean tensor): the word where it is true, else 0."""
    bits = code.to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
    i = tl.arange(0, 16)
    shift = 8 * (i % 4)
    low, high = (bits & 0xFF) << shift, (bits >> 8) << shift  # disjoint bit fields: their sum is their OR
    return (_word(low, i, 0, keep), _word(low, i, 1, keep), _word(low, i, 2, keep), _word(low, i, 3, keep),
            _word(high, i, 0, keep), _word(high, i, 1, keep), _word(high, i, 2, keep), _word(high, i, 3, keep))


@triton.jit
def _word(shifted_bytes, i, word: tl.constexpr, keep):
    return tl.where(keep, tl.sum(tl.where(i // 4 == word, shifted_bytes, 0)), 0)


@triton.jit
def permute_codes(words, table, dtype: tl.constexpr, BLOCK_N: tl.constexpr, SUB: tl.constexpr):
    """The [BLOCK_N, 2 * SUB] 16-bit codes (dtype) of words [BLOCK_N, SUB // 4] int32 of packed bytes, unscaled."""
    l0, l1, l2, l3, h0, h1, h2, h3 = table
    p0, p1, p2, p3 = tl.inline_asm_elementwise(
        PERMUTE_DECODE, "=r,=r,=r,=r,r,r,r,r,r,r,r,r,r", [words, l0, l1, l2, l3, h0, h1, h2, h3],
        dtype=(tl.int32,) * 4, is_pure=True, pack=1)
    return _code_tile(p0, p1, p2, p3, dtype, BLOCK_N, SUB)


@triton.jit
def permute_codes_scaled(words, table, scale, dtype: tl.constexpr, BLOCK_N: tl.constexpr, SUB: tl.constexpr):
    """permute_codes times scale[:, None] (scale [BLOCK_N] fp32: each row's absmax of this block), rounded to dtype
    (bf16 or fp16)."""
    bits = scale.to(dtype).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
    pair = (bits | (bits << 16))[:, None]
    l0, l1, l2, l3, h0, h1, h2, h3 = table
    asm: tl.constexpr = PERMUTE_DECODE_SCALED_BF16 if dtype == tl.bfloat16 else PERMUTE_DECODE_SCALED_F16
    p0, p1, p2, p3 = tl.inline_asm_elementwise(
        asm, "=r,=r,=r,=r,r,r,r,r,r,r,r,r,r,r", [words, l0, l1, l2, l3, h0, h1, h2, h3, pair],
        dtype=(tl.int32,) * 4, is_pure=True, pack=1)
    return _code_tile(p0, p1, p2, p3, dtype, BLOCK_N, SUB)


@triton.jit
def permute_dot(words, table, xt, BLOCK_N: tl.constexpr, SUB: tl.constexpr):
    """codes(words [BLOCK_N, SUB // 4] int32 of packed bytes) @ xt [2 * SUB, BLOCK_M] in fp32 (unscaled)."""
    return tl.dot(permute_codes(words, table, xt.dtype, BLOCK_N, SUB), xt)


@triton.jit
def permute_dot_scaled(words, table, scale, xt, acc, BLOCK_N: tl.constexpr, SUB: tl.constexpr):
    """acc + (codes(words) * scale[:, None]) @ xt, the scaled codes rounded to xt's 16-bit type."""
    return tl.dot(permute_codes_scaled(words, table, scale, xt.dtype, BLOCK_N, SUB), xt, acc)


@triton.jit
def _code_tile(p0, p1, p2, p3, dtype: tl.constexpr, BLOCK_N: tl.constexpr, SUB: tl.constexpr):
    """The [BLOCK_N, 2 * SUB] 16-bit codes from the decode's four pair outputs per word."""
    # tl.join adds a new minor dimension: the last join sets the lowest bit of the code's index in the word
    pairs = tl.join(tl.join(p0, p2), tl.join(p1, p3))  # pair 2 * a + b of each word at [..., a, b]
    # the halves as 16-bit codes: compiled back into the same registers (32-bit outputs let ptxas place each
    # pair where the shared-memory store wants it; 16-bit ones cost a register move per pair)
    lo = (pairs & 0xFFFF).to(tl.uint16).to(dtype, bitcast=True)
    hi = ((pairs >> 16) & 0xFFFF).to(tl.uint16).to(dtype, bitcast=True)
    return tl.reshape(tl.join(lo, hi), (BLOCK_N, 2 * SUB))
