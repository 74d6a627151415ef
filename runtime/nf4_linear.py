"""NF4 linear layers that keep bitsandbytes' storage and run a fused Triton kernel for few rows.

`NF4Linear` is a `bnb.nn.Linear4bit` (same Params4bit and QuantState, same state dict, bitsandbytes
still quantises and owns the format). On CUDA its forward runs `loraplex.kernels.nf4_matmul` (reads
the packed weights once) for the row counts in `DISPATCH[(out, in)]` (a row count is looked up as the
smallest calibrated count >= it, as CUDA-graph batches are padded), and `bnb.matmul_4bit` (its gemv
for one row; from 2 rows on it dequantises the whole weight first) otherwise. On the CPU,
and whenever a gradient is needed, it is exactly bitsandbytes' Linear4bit.

The start-up calibration (runtime/nf4_calibration.py) fills the tables below: DISPATCH, the fused
kernel's fastest tiles per shape and row count (TILES), and the times of both paths and of a dense
matmul of the same shape (NF4_US, DENSE_US); without it the committed defaults apply.
`dense_faster(rows)` says whether a bf16 merged copy of the layers would beat the NF4 path at that
batch size (runtime/merged.py's `auto` asks it).
"""
from __future__ import annotations

import copy

import bitsandbytes as bnb
import bitsandbytes.functional as bnbf
import torch
from bitsandbytes.nn.modules import fix_4bit_weight_quant_state_from_module

from loraplex.kernels.lora_fold import MAX_FOLD_COLUMNS
from loraplex.kernels.nf4_dequant import nf4_dequantize
from loraplex.kernels.nf4_matmul import nf4_matmul
from loraplex.kernels.nf4_tiles import NF4Tiles

# Up to 64: decode batches. Above: large decode batches and short prefill chunks, where the fused kernel
# (128 rows per program) competes with dequantising the whole weight to bf16 and a dense matmul.
CALIBRATION_ROWS = (1, 2, 4, 8, 16, 32, 48, 64, 96, 128, 192, 256)
# Shapes missing from DISPATCH: H100 (bench/nf4_matmul.py, 2026-11-25): bitsandbytes' gemv wins at one
# row, the fused kernel from 8 rows to 64 on every Llama-3 8B / 3.2-1B shape (about 2x).
DEQUANT_ROWS = 64  # not fused above this many rows: dequantise the weight once, then a dense matmul
DEFAULT_FUSED_ROWS = frozenset({2, 4, 8, 16, 32, 48, 64})  # (above 64 rows: only where calibrated faster)
# (out_features, in_features) -> calibrated row counts at which the fused kernel is faster.
DISPATCH: dict[tuple[int, int], frozenset[int]] = {}
# (out_features, in_features, calibrated rows) -> the fused kernel's fastest tiles there (None: its rule)
TILES: dict[tuple[int, int, int], NF4Tiles] = {}
# (out_features, in_features) -> {rows: microseconds}: the faster NF4 path, and a dense matmul.
NF4_US: dict[tuple[int, int], dict[int, float]] = {}
DENSE_US: dict[tuple[int, int], dict[int, float]] = {}
# (out_features, in_features) -> whether kernels/nf4_dequant.py dequantised that weight faster than bitsandbytes'
# dequantize_4bit at start-up (prefill's dequantise-then-matmul path); not calibrated: bitsandbytes'
TRITON_DEQUANT: dict[tuple[int, int], bool] = {}
DEQUANT_US: dict[tuple[int, int], dict[str, float]] = {}  # (out_features, in_features) -> measure_dequant's times
# (shape, dtype, device) -> room for one dequantised weight and its folded adapter columns (kernels/lora_fold.py),
# flat, rewritten by each layer's prefill matmul in turn (one stream, in order: a captured graph that uses it
# replays in the same order). Allocated once at its largest: captured graphs keep its address.
_DEQUANT_SCRATCH: dict[tuple, torch.Tensor] = {}


def _scratch_weight(shape: tuple[int, int], dtype: torch.dtype, device: torch.device, columns: int) -> torch.Tensor:
    """The shared scratch as a contiguous [out, columns] weight (columns: in, or in + folded columns)."""
    key = (shape, dtype, device)
    flat = _DEQUANT_SCRATCH.get(key)
    if flat is None:
        flat = _DEQUANT_SCRATCH[key] = torch.empty(shape[0] * (shape[1] + MAX_FOLD_COLUMNS), dtype=dtype,
                                                   device=device)
    return flat[:shape[0] * columns].view(shape[0], columns)


def dense_faster(rows: int) -> bool | None:
    """Whether dense (compute-dtype) weights of every calibrated shape, summed, take less time than their
    NF4 path at this row count; None before a calibration that timed both (the CPU, or a failed timing)."""
    m = calibrated_rows(rows)
    shapes = [s for s in NF4_US if m in NF4_US[s] and m in DENSE_US.get(s, {})]
    if not shapes:
        return None
    return sum(DENSE_US[s][m] for s in shapes) < sum(NF4_US[s][m] for s in shapes)


def calibrated_rows(rows: int) -> int:
    """The calibrated row count that stands for `rows` (the next one up; beyond the last: the last)."""
    return next((m for m in CALIBRATION_ROWS if m >= rows), CALIBRATION_ROWS[-1] + 1)


class NF4Linear(bnb.nn.Linear4bit):
    """A Linear4bit whose CUDA forward uses the fused NF4 kernel for few rows (see the module docstring)."""

    @classmethod
    def from_bnb(cls, linear: bnb.nn.Linear4bit) -> NF4Linear:
        """The same layer, sharing `linear`'s weight (Params4bit + QuantState) and bias."""
        weight = linear.weight
        new = cls(linear.in_features, linear.out_features, bias=linear.bias is not None,
                  compute_dtype=linear.compute_dtype, compress_statistics=getattr(weight, "compress_statistics", True),
                  quant_type=getattr(weight, "quant_type", "fp4"), quant_storage=linear.quant_storage, device="meta")
        new.weight = weight
        new.bias = linear.bias
        if isinstance(weight, bnb.nn.Params4bit):
            weight.module = new  # bitsandbytes records the quant state on the owning module when it quantises
        new.quant_state = linear.quant_state
        new.compute_type_is_set = linear.compute_type_is_set
        new.support_avx512bf16_for_cpu = linear.support_avx512bf16_for_cpu
        new.train(linear.training)
        return new

    def use_fused(self, rows: int) -> bool:
        return calibrated_rows(rows) in DISPATCH.get((self.out_features, self.in_features), DEFAULT_FUSED_ROWS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // max(x.shape[-1], 1)
        if self.use_fused(rows) and self._fusable(x):
            return self.fused_forward(x)
        if rows > DEQUANT_ROWS and self._fusable(x):
            return self.dequant_forward(x)
        return super().forward(x)

    def dequant_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Prefill-sized inputs: dequantise the weight into a scratch buffer shared by every layer of this
        shape, then one dense matmul. What bitsandbytes does past its kernels' row range, without its
        per-call dispatch (about 0.2 ms of host time a call, measured on an H200 host: a 1B prefill step
        of 64 such calls was bound by it) and without a fresh weight-sized allocation."""
        fix_4bit_weight_quant_state_from_module(self)
        if not self.compute_type_is_set:
            self.set_compute_type(x)
            self.compute_type_is_set = True
        state = self.weight.quant_state
        weight = _scratch_weight(tuple(state.shape), state.dtype, x.device, self.in_features)
        dequantize_into(weight, self.weight.data, state, TRITON_DEQUANT.get((self.out_features, self.in_features), False))
        in_dtype = x.dtype
        dtype = self.compute_dtype or in_dtype
        bias = None if self.bias is None else self.bias.to(dtype)
        return torch.nn.functional.linear(x.to(dtype), weight.to(dtype), bias).to(in_dtype)

    def can_fold(self, rows: int, device: torch.device, dtype: torch.dtype) -> bool:
        """Whether folded_forward serves `rows` input rows: the prefill path (dequantise, then a dense matmul),
        on a weight stored in the compute dtype's scratch (kernels/lora_fold.py)."""
        state = self._kernel_state()
        return (device.type == "cuda" and rows > DEQUANT_ROWS and not self.use_fused(rows) and state is not None
                and state.dtype == dtype and (self.compute_dtype is None or self.compute_dtype == dtype)
                and not (torch.is_grad_enabled() and self.weight.requires_grad))

    def folded_forward(self, xw: torch.Tensor, write_columns) -> torch.Tensor:
        """[x | s] @ [W | E]^T (+ bias) for xw [T, in + c]: W dequantised into the scratch's first in columns,
        `write_columns(view)` fills the other c (the folded adapters' B columns). See can_fold."""
        fix_4bit_weight_quant_state_from_module(self)
        state = self.weight.quant_state
        columns = xw.shape[1]
        if not self.in_features < columns <= self.in_features + MAX_FOLD_COLUMNS:
            raise ValueError(f"{columns - self.in_features} folded columns (at most {MAX_FOLD_COLUMNS})")
        weight = _scratch_weight(tuple(state.shape), state.dtype, xw.device, columns)
        nf4_dequantize(self.weight.data, state.absmax, state.code, state.blocksize, weight[:, :self.in_features],
                       **_nested(state))
        write_columns(weight[:, self.in_features:])
        bias = None if self.bias is None else self.bias.to(xw.dtype)
        return torch.nn.functional.linear(xw, weight, bias)

    def _kernel_state(self):
        """The weight's QuantState when our kernels can read its storage (2-D, not repacked by a CPU forward, rows of
        whole absmax blocks), else None."""
        state = getattr(self.weight, "quant_state", None)
        if state is None:
            state = self.quant_state
        if (state is None or len(state.shape) != 2 or getattr(state, "packing_format_for_cpu", False)
                or self.in_features % state.blocksize):
            return None
        return state

    def _fusable(self, x: torch.Tensor) -> bool:
        needs_grad = torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad
                                                  or (self.bias is not None and self.bias.requires_grad))
        return x.is_cuda and not needs_grad and self._kernel_state() is not None

    def fused_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The fused kernel, whatever the row count (CUDA; Linear4bit's dtype handling)."""
        fix_4bit_weight_quant_state_from_module(self)
        if not self.compute_type_is_set:
            self.set_compute_type(x)
            self.compute_type_is_set = True
        in_dtype = x.dtype
        if self.compute_dtype is not None:
            x = x.to(self.compute_dtype)
        rows = x.numel() // max(x.shape[-1], 1)
        tiles = TILES.get((self.out_features, self.in_features, calibrated_rows(rows)))
        return fused_matmul(x, self.weight.data, self.weight.quant_state, self.out_features, self.bias,
                            tiles).to(in_dtype)

    def bnb_forward(self, x: torch.Tensor) -> torch.Tensor:
        """bitsandbytes' Linear4bit forward, whatever the row count."""
        return super().forward(x)

    def dequantize_weight(self) -> torch.Tensor:
        """The dense [out, in] weight in the quantised weight's dtype (bitsandbytes' dequantize_4bit)."""
        state, data = self.weight.quant_state, self.weight.data
        if getattr(state, "packing_format_for_cpu", False):  # repacked by a CPU forward: undo on copies
            data, state = bnbf._convert_weight_packed_for_cpu_inverse(data, copy.deepcopy(state))
        return bnbf.dequantize_4bit(data, state)


def _nested(state) -> dict:
    """The kernels' double-quantisation arguments from a QuantState (none without it)."""
    if not state.nested:
        return {}
    return dict(nested_absmax=state.state2.absmax, nested_code=state.state2.code,
                nested_blocksize=state.state2.blocksize, offset=state.offset)


def fused_matmul(x: torch.Tensor, packed: torch.Tensor, state, out_features: int, bias: torch.Tensor | None = None,
                 tiles=None, compile_only: bool = False) -> torch.Tensor:
    """x @ W.T (+ bias) by the fused kernel, W given as bitsandbytes' packed data and QuantState."""
    return nf4_matmul(x, packed, state.absmax, state.code, state.blocksize, out_features, bias=bias, tiles=tiles,
                      compile_only=compile_only, **_nested(state))


def dequantize_into(out: torch.Tensor, packed: torch.Tensor, state, triton_kernel: bool) -> torch.Tensor:
    """The dense weight into `out` (state.shape, contiguous): kernels/nf4_dequant.py or bitsandbytes'."""
    if triton_kernel:
        return nf4_dequantize(packed, state.absmax, state.code, state.blocksize, out, **_nested(state))
    return bnbf.dequantize_4bit(packed, state, out=out)
