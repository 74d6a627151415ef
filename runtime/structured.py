"""Structured output: a request's `response_format` compiled by xgrammar into a grammar over the base
model's tokenizer, and one matcher per sequence that says which tokens may come next.

Compiling builds per-token tables over the whole vocabulary (tens of milliseconds and up), so it
happens at admission, off the engine thread, once per distinct format: `Grammars` keeps the compiled
grammars in a bounded LRU. On the engine thread a matcher costs one bitmask fill per step (rows
without a format have no matcher and cost nothing) and one `accept_token` per sampled token.
"""
from __future__ import annotations

import json
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass

import torch
import xgrammar as xgr

MAX_CACHED_GRAMMARS = 256
_CPP_LOG_PREFIX = re.compile(r"^\[[\d:]+\] \S+:\d+: ")  # "[21:17:59] /project/cpp/file.cc:94: " before the reason


@dataclass(frozen=True)
class ResponseFormat:
    """A constraint on the output: `json_object` (any JSON object) or `json_schema` (`schema`, JSON text)."""
    type: str
    schema: str | None = None

    @classmethod
    def json_schema(cls, schema: dict) -> ResponseFormat:
        # sorted keys: the same schema written in another key order shares one compiled grammar
        return cls("json_schema", json.dumps(schema, sort_keys=True, separators=(",", ":")))

    def validate(self) -> None:
        if self.type == "json_object" and self.schema is None:
            return
        if self.type == "json_schema" and isinstance(self.schema, str):
            return
        raise ValueError(f"response_format must be json_object or json_schema with a schema, got {self!r}")


class GrammarError(ValueError):
    """A response_format the grammar library cannot compile (its message is the reason)."""


class Grammars:
    """Compiles response formats for one tokenizer and caches the results (thread-safe)."""

    def __init__(self, tokenizer, vocab_size: int, stop_token_ids: list[int], max_cached: int = MAX_CACHED_GRAMMARS):
        self._tokenizer = tokenizer
        self._vocab_size = vocab_size
        self._stop_token_ids = list(stop_token_ids)
        self._max_cached = max_cached
        self._compiler: xgr.GrammarCompiler | None = None  # built on first use: it scans the vocabulary
        self._cache: OrderedDict[ResponseFormat, xgr.CompiledGrammar] = OrderedDict()
        self._lock = threading.Lock()
        self.compiles = 0  # grammars compiled (cache misses)

    def compile(self, fmt: ResponseFormat) -> xgr.CompiledGrammar:
        """The compiled grammar of `fmt`; raises GrammarError with the library's message."""
        with self._lock:
            compiled = self._cache.get(fmt)
            if compiled is not None:
                self._cache.move_to_end(fmt)
                return compiled
            if self._compiler is None:
                info = xgr.TokenizerInfo.from_huggingface(self._tokenizer, vocab_size=self._vocab_size,
                                                          stop_token_ids=self._stop_token_ids)
                self._compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)
            try:
                if fmt.type == "json_object":
                    compiled = self._compiler.compile_builtin_json_grammar()
                else:
                    # compact JSON (no free whitespace): a model cannot wander off into blank lines;
                    # strict_mode: properties a schema does not name are not generated (always valid output)
                    compiled = self._compiler.compile_json_schema(fmt.schema, any_whitespace=False, strict_mode=True)
            except Exception as e:  # xgrammar raises RuntimeError / ValueError / its own types
                reason = _CPP_LOG_PREFIX.sub("", str(e)).strip()
                raise GrammarError(f"response_format: the JSON schema cannot be compiled: {reason}") from None
            self.compiles += 1
            self._cache[fmt] = compiled
            if len(self._cache) > self._max_cached:
                self._cache.popitem(last=False)
            return compiled

    def matcher(self, fmt: ResponseFormat) -> xgr.GrammarMatcher:
        """A fresh matcher (one sequence's state) over the compiled grammar of `fmt`."""
        return xgr.GrammarMatcher(self.compile(fmt))


def allowed_tokens(matchers: list[xgr.GrammarMatcher], vocab_size: int) -> torch.Tensor:
    """[len(matchers), ceil(vocab/32)] int32 bitmask (host) of the tokens each matcher accepts next."""
    bitmask = xgr.allocate_token_bitmask(len(matchers), vocab_size)
    for row, matcher in enumerate(matchers):
        matcher.fill_next_token_bitmask(bitmask, row)
    return bitmask


def apply_allowed(logits: torch.Tensor, bitmask: torch.Tensor) -> None:
    """Set, in place, the float32 `logits` [R, V] of tokens the bitmask [R, ceil(V/32)] forbids to -inf."""
    xgr.apply_token_bitmask_inplace(logits, bitmask.to(logits.device, non_blocking=True), vocab_size=logits.shape[1])
