"""OpenAI-compatible request schemas (completions and chat) and response builders.

Types are strict (`max_tokens: true` or `stream: "yes"` is refused, not coerced) and unknown fields
are refused by name: a field we do not implement must not be silently ignored.
"""
from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator

from .sequence import SamplingParams, StepOutput

SEED_MIN, SEED_MAX = -(1 << 63), (1 << 64) - 1  # what a 64-bit generator seed can hold
# OpenAI fields we do not implement: refused by name unless they carry their no-op value.
UNSUPPORTED = {"logprobs": (None, False), "top_logprobs": (None, 0), "presence_penalty": (None, 0),
               "frequency_penalty": (None, 0), "logit_bias": (None, {}), "response_format": (None, {"type": "text"}),
               "tools": (None, []), "tool_choice": (None, "none"), "functions": (None, []), "function_call": (None,),
               "best_of": (None, 1), "suffix": (None,), "parallel_tool_calls": (None,), "modalities": (None,),
               "audio": (None,), "prediction": (None,), "reasoning_effort": (None,), "web_search_options": (None,)}


def _valid_unicode(text: str) -> str:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("the text holds a lone UTF-16 surrogate (not valid Unicode)") from None
    return text


Text = Annotated[str, AfterValidator(_valid_unicode)]


class Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")


class StreamOptions(Strict):
    include_usage: bool = False


class AdapterWeight(Strict):
    id: Text
    weight: float = Field(allow_inf_nan=False)


class SamplingFields(Strict):
    model: Text
    # a per-request mix on the base model (`model` "base"): sum of weight * each adapter's delta
    adapters: list[AdapterWeight] | None = Field(None, min_length=2, max_length=8)
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0, allow_inf_nan=False)
    top_p: float = Field(1.0, gt=0.0, le=1.0, allow_inf_nan=False)
    top_k: int = Field(0, ge=0)
    seed: int | None = Field(None, ge=SEED_MIN, le=SEED_MAX)
    stop: Text | list[Text] | None = None
    stream: bool = False
    n: int = Field(1, ge=1, le=1, description="one choice per request")
    ignore_eos: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None  # accepted and unused, as OpenAI's own servers use it only for abuse tracking

    @model_validator(mode="before")
    @classmethod
    def _refuse_unsupported(cls, data: Any) -> Any:
        """An unimplemented OpenAI field with a value that would change the answer is refused by name;
        one carrying its no-op value (`logprobs: false`, `presence_penalty: 0`) is dropped."""
        if not isinstance(data, dict):
            return data
        for name in UNSUPPORTED.keys() & data.keys():
            value = data[name]
            if not any(value == v and isinstance(value, bool) == isinstance(v, bool) for v in UNSUPPORTED[name]):
                raise ValueError(f"{name} is not supported by this server")
        return {k: v for k, v in data.items() if k not in UNSUPPORTED}

    @field_validator("adapters")
    @classmethod
    def _distinct_adapters(cls, v):
        ids = [a.id for a in v or []]
        if len(set(ids)) != len(ids):
            raise ValueError("each adapter id may appear once in adapters")
        return v

    @field_validator("stop")
    @classmethod
    def _stops(cls, v):
        stops = [v] if isinstance(v, str) else (v or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("stop takes up to 4 non-empty strings")
        return stops

    def sampling_params(self, default_max_tokens: int) -> SamplingParams:
        return SamplingParams(max_tokens=self.max_tokens or default_max_tokens, temperature=self.temperature,
                              top_p=self.top_p, top_k=self.top_k, seed=self.seed, stop=list(self.stop or []),
                              ignore_eos=self.ignore_eos)

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class CompletionRequest(SamplingFields):
    prompt: Text | list[Text] | list[int]
    echo: bool = False

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, v):
        if isinstance(v, list) and v and isinstance(v[0], str):
            if len(v) != 1:
                raise ValueError("one prompt per request")
            return v[0]
        return v


class TextPart(Strict):
    type: Literal["text"]
    text: Text


class ChatMessage(Strict):
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: Text | list[TextPart] | None = None
    name: Text | None = None  # accepted; the chat template decides whether it is shown

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)

    def sampling_params(self, default_max_tokens: int) -> SamplingParams:
        params = super().sampling_params(default_max_tokens)
        if self.max_completion_tokens and not self.max_tokens:
            params.max_tokens = self.max_completion_tokens
        return params

def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(out: StepOutput) -> dict:
    return {"prompt_tokens": out.prompt_tokens, "completion_tokens": out.completion_tokens,
            "total_tokens": out.prompt_tokens + out.completion_tokens}


def completion_response(rid: str, model: str, text: str, last: StepOutput) -> dict:
    return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": last.finish_reason}],
            "usage": usage(last)}


def completion_chunk(rid: str, model: str, out: StepOutput) -> dict:
    return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "text": out.text, "logprobs": None,
                         "finish_reason": out.finish_reason if out.finished else None}]}


def chat_response(rid: str, model: str, text: str, last: StepOutput) -> dict:
    return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "finish_reason": last.finish_reason}],
            "usage": usage(last)}


def chat_chunk(rid: str, model: str, delta: dict, finish_reason: str | None = None) -> dict:
    return {"id": rid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}]}


def usage_chunk(rid: str, model: str, obj: str, last: StepOutput) -> dict:
    return {"id": rid, "object": obj, "created": int(time.time()), "model": model, "choices": [], "usage": usage(last)}
