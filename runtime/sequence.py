"""One request's state as it moves through the engine."""
from __future__ import annotations

import enum
import itertools
import random
import time
from dataclasses import dataclass, field
from typing import Callable

from .adapters.registry import AdapterRef
from .adapters.segments import NO_ADAPTER


@dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


class SeqStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class StepOutput:
    """What a request's consumer receives after each step that produced text or finished it."""
    request_id: int
    text: str  # new text since the last output
    token_ids: list[int]
    finished: bool
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int
    error: str | None = None


_ids = itertools.count(1)
_seed_source = random.SystemRandom()  # OS entropy: touches no global generator (this runs on request threads)


class Sequence:
    def __init__(self, prompt_token_ids: list[int], params: SamplingParams, adapter: AdapterRef | None,
                 emit: Callable[[StepOutput], None]):
        self.id = next(_ids)
        self.prompt_token_ids = list(prompt_token_ids)
        self.token_ids = list(prompt_token_ids)  # prompt + generated
        self.params = params
        self.adapter = adapter
        self.emit = emit
        self.status = SeqStatus.WAITING
        self.block_table: list[int] = []
        self.num_computed = 0  # tokens whose K/V are in the cache
        self.adapter_slot = NO_ADAPTER
        self.finish_reason: str | None = None
        self.aborted = False
        self.arrival = time.monotonic()
        self.first_token_at: float | None = None
        # the sampler's noise is a pure function of (seed, completion index, vocabulary index)
        self.seed: int = params.seed if params.seed is not None else _seed_source.getrandbits(63)
        # detokenizer state (see detokenizer.py)
        self.text = ""
        self.emitted_chars = 0
        self.prefix_offset = max(len(prompt_token_ids) - 5, 0)
        self.read_offset = len(prompt_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_completion_tokens(self) -> int:
        return len(self.token_ids) - len(self.prompt_token_ids)

    @property
    def generated_ids(self) -> list[int]:
        return self.token_ids[len(self.prompt_token_ids):]

    def __len__(self) -> int:
        return len(self.token_ids)
