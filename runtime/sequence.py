"""One request's state as it moves through the engine."""
from __future__ import annotations

import dataclasses
import enum
import itertools
import math
import random
import time
from dataclasses import dataclass, field
from typing import Callable

from .adapters.registry import AdapterRef
from .adapters.segments import NO_ADAPTER
from .structured import ResponseFormat


SEED_MIN, SEED_END = -(1 << 63), 1 << 64  # a seed is any signed or unsigned 64-bit integer
SEED_MASK = (1 << 64) - 1
CHOICE_SEED_STEP = 0x9E3779B97F4A7C15  # 2^64 / golden ratio: choice i of a seeded request has seed + i * step
MAX_LOGPROBS = 20  # top alternatives per token, as OpenAI's chat API allows
MAX_LOGIT_BIAS = 1024  # entries per request
MAX_STOP_TOKEN_IDS = 64


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False
    # OpenAI's penalties, over the generated tokens: logit - frequency * count - presence * (count > 0)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    # HF/vLLM's, over prompt + generated tokens: a seen token's logit is divided by it if positive, else multiplied
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] = field(default_factory=dict)  # token id -> added to its logit, in [-100, 100]
    min_tokens: int = 0  # end-of-sequence and stop_token_ids are masked until this many tokens are generated
    stop_token_ids: list[int] = field(default_factory=list)  # generating one of these ends the request ("stop")
    logprobs: int | None = None  # None: none; N: the chosen token's logprob and the N most likely alternatives
    response_format: ResponseFormat | None = None  # None: free text; else the grammar the output follows

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def penalized(self) -> bool:
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0 or self.repetition_penalty != 1.0

    def for_choice(self, index: int) -> SamplingParams:
        """The parameters of choice `index` of an n-choice request: a seeded request's choices each
        derive their own seed (choice 0 keeps it), so re-running it gives the same n choices."""
        if self.seed is None or index == 0:
            return dataclasses.replace(self)
        return dataclasses.replace(self, seed=(self.seed + index * CHOICE_SEED_STEP) & SEED_MASK)

    def validate(self, vocab_size: int | None = None) -> None:
        """Raise ValueError naming the first field the sampler cannot honour exactly (token ids are
        checked against `vocab_size` when given)."""
        if not _is_int(self.max_tokens) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if not _is_number(self.temperature) or not math.isfinite(self.temperature) or self.temperature < 0:
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature!r}")
        if not _is_number(self.top_p) or not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be a number in (0, 1], got {self.top_p!r}")
        if not _is_int(self.top_k) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0 (0 = off), got {self.top_k!r}")
        if self.seed is not None and (not _is_int(self.seed) or not SEED_MIN <= self.seed < SEED_END):
            raise ValueError(f"seed must be a 64-bit integer in [-2^63, 2^64), got {self.seed!r}")
        if not isinstance(self.stop, list) or not all(isinstance(s, str) and s for s in self.stop):
            raise ValueError("stop must be a list of non-empty strings")
        if not isinstance(self.ignore_eos, bool):
            raise ValueError(f"ignore_eos must be a boolean, got {self.ignore_eos!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not _is_number(value) or not -2.0 <= value <= 2.0:
                raise ValueError(f"{name} must be a number in [-2, 2], got {value!r}")
        if not _is_number(self.repetition_penalty) or not 0.0 < self.repetition_penalty <= 2.0:
            raise ValueError(f"repetition_penalty must be a number in (0, 2], got {self.repetition_penalty!r}")
        if not isinstance(self.logit_bias, dict) or len(self.logit_bias) > MAX_LOGIT_BIAS:
            raise ValueError(f"logit_bias must map up to {MAX_LOGIT_BIAS} token ids to biases")
        for token, bias in self.logit_bias.items():
            self._check_token_id("logit_bias", token, vocab_size)
            if not _is_number(bias) or not -100.0 <= bias <= 100.0:
                raise ValueError(f"logit_bias[{token}] must be a number in [-100, 100], got {bias!r}")
        if not _is_int(self.min_tokens) or not 0 <= self.min_tokens <= self.max_tokens:
            raise ValueError(f"min_tokens must be an integer in [0, max_tokens={self.max_tokens}], got {self.min_tokens!r}")
        if not isinstance(self.stop_token_ids, list) or len(self.stop_token_ids) > MAX_STOP_TOKEN_IDS:
            raise ValueError(f"stop_token_ids must be a list of up to {MAX_STOP_TOKEN_IDS} token ids")
        for token in self.stop_token_ids:
            self._check_token_id("stop_token_ids", token, vocab_size)
        if self.logprobs is not None and (not _is_int(self.logprobs) or not 0 <= self.logprobs <= MAX_LOGPROBS):
            raise ValueError(f"logprobs must be an integer in [0, {MAX_LOGPROBS}], got {self.logprobs!r}")
        if self.response_format is not None:
            if not isinstance(self.response_format, ResponseFormat):
                raise ValueError(f"response_format must be a ResponseFormat, got {self.response_format!r}")
            self.response_format.validate()
            if self.min_tokens:  # it would mask the end-of-sequence the completed grammar allows alone
                raise ValueError("min_tokens cannot be combined with response_format: the grammar decides where the output ends")

    @staticmethod
    def _check_token_id(name: str, token, vocab_size: int | None) -> None:
        if not _is_int(token) or token < 0 or (vocab_size is not None and token >= vocab_size):
            bound = f"[0, {vocab_size})" if vocab_size is not None else ">= 0"
            raise ValueError(f"{name}: token id {token!r} is not an integer in {bound}")


class SeqStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class TokenLogprob:
    """One generated token's log-probability and its most likely alternatives (token id, logprob)."""
    token_id: int
    logprob: float
    top: list[tuple[int, float]]


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
    logprobs: list[TokenLogprob] | None = None  # one per token id, when the request asked for logprobs


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
        self.admitted_at: float | None = None  # first entry into the running batch
        self.first_token_at: float | None = None
        self.last_token_at: float | None = None
        # the sampler's noise is a pure function of (seed, completion index, vocabulary index)
        self.seed: int = params.seed & SEED_MASK if params.seed is not None else _seed_source.getrandbits(64)
        # detokenizer state (see detokenizer.py)
        self.text = ""
        self.emitted_chars = 0
        self.prefix_offset = max(len(prompt_token_ids) - 5, 0)
        self.read_offset = len(prompt_token_ids)
        self.utf8 = None  # incremental UTF-8 decoder of the generated bytes (byte-level tokenizers)
        self.eos_token_ids: frozenset[int] = frozenset()  # set by the engine: masked before min_tokens
        self.logprobs: list[TokenLogprob] = []  # per generated token, when params.logprobs is set
        self.matcher = None  # set by the engine when params.response_format is: an xgrammar GrammarMatcher

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
