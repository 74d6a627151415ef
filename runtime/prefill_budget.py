"""How many prompt tokens a step may prefill beside running streams: stall-free chunked prefill in the
manner of Sarathi-Serve, sized from measured cost.

A step that prefills while other sequences decode is one inter-token gap of each of those streams, so
its prompt tokens are capped to keep such a step near `target_seconds` (CPU 0.25 s; CUDA 50 ms, the
usual TPOT service level). The cost per prefill token is a moving average over steps with prompt
tokens, each step's whole time charged to them; the cap still settles where decode rows + chunk take
the target (b = T / ((d + c*b) / b) has its fixed point at d + c*b = T).

Two guards, both from H200 runs (bench/serve_trace.py):
- one stalled step (a first kernel compile, a collection) counts at most OUTLIER times the average, so
  it cannot shrink the cap to its floor for many steps;
- the floor on CUDA is the initial chunk (512 tokens). An eager step with decode rows has a fixed cost
  of its own that on the 8B shape alone reaches 50 ms; smaller chunks then cut no step time, only
  prefill throughput (the all-at-once trace: the cap fell to 32 tokens and 5,388 steps of ~60 ms
  prefilled 200k prompt tokens).
"""
from __future__ import annotations

COST_EMA = 0.3  # weight of the newest step in the seconds-per-token average
OUTLIER = 4.0  # a step's cost per token counts at most this many times the average
CPU_TARGET_SECONDS = 0.25
CUDA_TARGET_SECONDS = 0.05
CPU_FLOOR_TOKENS = 32  # prompt tokens per step even when decode rows alone exceed the target


class PrefillBudget:
    def __init__(self, device_type: str, initial_tokens: int, max_tokens: int, target_seconds: float | None = None):
        cuda = device_type == "cuda"
        self.target_seconds = target_seconds or (CUDA_TARGET_SECONDS if cuda else CPU_TARGET_SECONDS)
        self.floor = initial_tokens if cuda else CPU_FLOOR_TOKENS
        self.max_tokens = max_tokens
        self.tokens = initial_tokens  # the cap the scheduler applies while decode rows run
        self.seconds_per_token: float | None = None

    def measure(self, prefill_tokens: int, seconds: float) -> int:
        """Fold in one step that prefilled `prefill_tokens` in `seconds` (synchronised); returns the new cap."""
        if prefill_tokens == 0:
            return self.tokens
        sample = seconds / prefill_tokens
        average = self.seconds_per_token
        if average is not None:
            sample = min(sample, OUTLIER * average)
        average = sample if average is None else average + COST_EMA * (sample - average)
        self.seconds_per_token = average
        self.tokens = min(max(int(self.target_seconds / average), self.floor), self.max_tokens)
        return self.tokens

    def forget(self) -> None:
        """Drop the measurements (after the warm-up's compiling steps)."""
        self.seconds_per_token = None
