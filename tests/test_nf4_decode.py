"""The NF4 kernels' CUDA-only decodes (kernels/nf4_decode.py: byte permutes of the code table in inline PTX) on the
CPU: a PTX emulator runs the asm over the table words the kernel builds (interpreted Triton)."""

from triton_interpreter import fresh_process_test, needs_interpreter  # (first: it asks for the interpreter)
import bitsandbytes.functional as bnbf
import pytest
import torch
import triton.language as tl

from loraplex.kernels import nf4_decode


test_in_fresh_process = fresh_process_test(__file__)


def nf4_code() -> torch.Tensor:
    """The 16 fp32 values of bitsandbytes' NF4 type (QuantState.code)."""
    _, state = bnbf.quantize_4bit(torch.zeros(64, 64, dtype=torch.bfloat16), blocksize=64, quant_type="nf4")
    return state.code


def _run_ptx(asm: str, operands: dict[str, int]) -> dict[str, int]:
    """The subset of PTX in kernels/nf4_decode's permute decodes (and, or, shr, prmt, mov, 16-bit pair FMAs), run
    on Python ints: `operands` maps "$4".. to the inputs; returns every register and output written."""
    regs = dict(operands)
    value = lambda tok: regs[tok] if tok in regs else int(tok, 0)  # noqa: E731
    for line in asm.strip().strip("{}").splitlines():
        line = line.strip().rstrip(";")
        if not line or line.startswith(".reg"):
            continue
        op, rest = line.split(None, 1)
        if op == "mov.b32" and "{" not in rest:
            d, src = (t.strip() for t in rest.split(","))
            regs[d] = value(src)
            continue
        if op == "mov.b32":  # mov.b32 {$lo, $hi}, p
            pair, src = rest.rsplit(",", 1)
            lo, hi = (t.strip() for t in pair.strip(" {}").split(","))
            regs[lo], regs[hi] = value(src.strip()) & 0xFFFF, value(src.strip()) >> 16
            continue
        d, *args = (t.strip() for t in rest.split(","))
        a = [value(t) for t in args]
        if op == "and.b32":
            regs[d] = a[0] & a[1]
        elif op == "or.b32":
            regs[d] = a[0] | a[1]
        elif op == "shr.u32":
            regs[d] = a[0] >> a[1]
        elif op == "prmt.b32":  # default mode: bytes of {b, a}; a selector's bit 3 replicates the byte's sign
            src, out = a[0] | (a[1] << 32), 0
            for n in range(4):
                s = (a[2] >> (4 * n)) & 0xF
                byte = (src >> (8 * (s & 7))) & 0xFF
                out |= ((0xFF if byte & 0x80 else 0) if s & 8 else byte) << (8 * n)
            regs[d] = out
        elif op in ("fma.rn.bf16x2", "fma.rn.f16x2"):  # per 16-bit half: a * b + c rounded once, to nearest even
            dtype = torch.bfloat16 if op == "fma.rn.bf16x2" else torch.float16
            halves = torch.tensor([[(v >> shift) & 0xFFFF for shift in (0, 16)] for v in a], dtype=torch.int32)
            f = halves.to(torch.int16).view(dtype).double()  # (the int16 cast wraps: the same 16 bits)
            exact = f[0] * f[1] + f[2]  # products of two 16-bit floats are exact in float64
            bits = exact.to(dtype).view(torch.int16).int() & 0xFFFF
            regs[d] = int(bits[0]) | (int(bits[1]) << 16)
        else:
            raise AssertionError(f"unexpected PTX {line!r}")
    return regs


@needs_interpreter
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_permute_decode_gives_each_nibbles_code(dtype):
    """The CUDA-only decode (kernels/nf4_decode.PERMUTE_DECODE: 8 codes from a 32-bit word by byte permutes of the
    code table) run by a PTX emulator on the table words the kernel builds (table_words, interpreted): every
    nibble value in every position gives its code's 16 bits, in the format's element order (high nibble first)."""
    import triton

    @triton.jit
    def table_kernel(code_ptr, out_ptr):  # (codes given in the 16-bit type: the interpreter's bf16 casts truncate)
        code = tl.load(code_ptr + tl.arange(0, 16))
        words = nf4_decode.table_words(code, tl.arange(0, 1) < 1)
        for i in tl.static_range(8):
            tl.store(out_ptr + i + tl.arange(0, 1), words[i])

    code_fp32 = nf4_code()
    words = torch.zeros(8, dtype=torch.int32)
    table_kernel[(1,)](code_fp32.to(dtype), words)
    table = {f"${5 + i}": w & 0xFFFFFFFF for i, w in enumerate(words.tolist())}
    bits = code_fp32.to(dtype).view(torch.int16).int().tolist()
    samples = [int.from_bytes(bytes([a, b, c, d]), "little") for a in range(0, 256, 17) for b, c, d in
               ((a ^ 0xFF, (a * 7) & 0xFF, (a * 13 + 5) & 0xFF),)] + [0, 0xFFFFFFFF, 0x88888888, 0x77777777, 0x01234567]
    generator = torch.Generator().manual_seed(4)
    samples += torch.randint(0, 2 ** 32, (2000,), generator=generator, dtype=torch.int64).tolist()
    for word in samples:
        regs = _run_ptx(nf4_decode.PERMUTE_DECODE.value, {"$4": word, **table})
        nibbles = [n for byte in word.to_bytes(4, "little") for n in (byte >> 4, byte & 15)]
        pairs = [regs[f"${i}"] for i in range(4)]  # codes 2i (low half) and 2i + 1 (high half)
        assert [half for p in pairs for half in (p & 0xFFFF, p >> 16)] == [bits[n] & 0xFFFF for n in nibbles], hex(word)


@needs_interpreter
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_scaled_permute_decode_gives_each_code_times_the_scale_rounded_once(dtype):
    """The decode of permute_dot_scaled (kernels/nf4_decode.PERMUTE_DECODE_SCALED_*), run by the PTX emulator: each
    code times the block's absmax given in both halves of $13, both in the 16-bit type, the product rounded to
    nearest even once; the sign of a zero product kept (+ -0.0)."""
    code = nf4_code().to(dtype)
    bits = code.view(torch.int16).int() & 0xFFFF
    table = {}
    for w in range(4):  # the words table_words builds (its own test checks them): low bytes, then high bytes
        table[f"${5 + w}"] = sum(int(bits[4 * w + j] & 0xFF) << (8 * j) for j in range(4))
        table[f"${9 + w}"] = sum(int(bits[4 * w + j] >> 8) << (8 * j) for j in range(4))
    scaled = nf4_decode.PERMUTE_DECODE_SCALED_BF16 if dtype == torch.bfloat16 else nf4_decode.PERMUTE_DECODE_SCALED_F16
    asm = scaled.value
    generator = torch.Generator().manual_seed(6)
    scales = torch.cat([torch.rand(40, generator=generator) * 0.2, torch.tensor([0.0, -0.0, 1.0, 3e-3])]).to(dtype)
    words = torch.randint(0, 2 ** 32, (len(scales),), generator=generator, dtype=torch.int64).tolist()
    for word, scale in zip(words, scales):
        s16 = int(scale.view(torch.int16)) & 0xFFFF
        regs = _run_ptx(asm, {"$4": word, "$13": s16 | (s16 << 16), **table})
        nibbles = [n for byte in word.to_bytes(4, "little") for n in (byte >> 4, byte & 15)]
        expected = (code[nibbles].double() * scale.double()).to(dtype).view(torch.int16).int() & 0xFFFF
        got = [half for i in range(4) for half in (regs[f"${i}"] & 0xFFFF, regs[f"${i}"] >> 16)]
        assert got == expected.tolist(), (hex(word), float(scale))
