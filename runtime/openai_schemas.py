"""OpenAI-compatible request schemas (completions and chat) and response builders.

Types are strict (`max_tokens: true` or `stream: "yes"` is refused, not coerced) and unknown fields
are refused by name: a field we do not implement must not be silently ignored.
"""
from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Callable, Literal

from pydantic import (AfterValidator, BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, field_validator,
                      model_validator)

from .choices import MAX_N, Choice
from .sequence import MAX_LOGIT_BIAS, MAX_LOGPROBS, MAX_STOP_TOKEN_IDS, SamplingParams, StepOutput, TokenLogprob
from .structured import ResponseFormat

SEED_MIN, SEED_MAX = -(1 << 63), (1 << 64) - 1  # what a 64-bit generator seed can hold
# OpenAI fields we do not implement: refused by name unless they carry their no-op value.
UNSUPPORTED = {"tools": (None, []), "tool_choice": (None, "none"), "functions": (None, []), "function_call": (None,),
               "best_of": (None, 1), "suffix": (None,), "parallel_tool_calls": (None,), "modalities": (None,),
               "audio": (None,), "prediction": (None,), "reasoning_effort": (None,), "web_search_options": (None,)}
TokenText = Callable[[int], str]  # a token id's text, as the tokenizer decodes it alone


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


class TextFormat(Strict):
    type: Literal["text"]

    def response_format(self) -> ResponseFormat | None:
        return None


class JsonObjectFormat(Strict):
    type: Literal["json_object"]

    def response_format(self) -> ResponseFormat | None:
        return ResponseFormat("json_object")


class JsonSchemaSpec(Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: Text | None = None
    schema_: dict[str, Any] = Field(alias="schema")
    # xgrammar's strict mode is used either way (properties the schema does not name are never
    # generated): that is what OpenAI's strict asks for, and with strict false it is still valid output
    strict: bool | None = None


class JsonSchemaFormat(Strict):
    type: Literal["json_schema"]
    json_schema: JsonSchemaSpec

    def response_format(self) -> ResponseFormat | None:
        return ResponseFormat.json_schema(self.json_schema.schema_)


ResponseFormatField = Annotated[TextFormat | JsonObjectFormat | JsonSchemaFormat, Field(discriminator="type")]
_response_format_json = TypeAdapter(ResponseFormatField)


def response_format_from_json(text: str) -> ResponseFormat | None:
    """gRPC's `response_format_json`: the HTTP field's JSON, checked the same way; ValueError naming the problem."""
    try:
        return _response_format_json.validate_json(text).response_format()
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(str(p) for p in err['loc']) or 'response_format'}: {err['msg']}"
                             for err in e.errors())
        raise ValueError(f"response_format_json: {problems}") from None


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
    n: int = Field(1, ge=1, le=MAX_N)
    ignore_eos: bool = False
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0, allow_inf_nan=False)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0, allow_inf_nan=False)
    repetition_penalty: float | None = Field(None, gt=0.0, le=2.0, allow_inf_nan=False)
    logit_bias: dict[str, float] | None = Field(None, max_length=MAX_LOGIT_BIAS)
    min_tokens: int = Field(0, ge=0)
    stop_token_ids: list[Annotated[int, Field(ge=0)]] | None = Field(None, max_length=MAX_STOP_TOKEN_IDS)
    stream_options: StreamOptions | None = None
    response_format: ResponseFormatField | None = None
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

    @field_validator("logit_bias")
    @classmethod
    def _bias(cls, v):
        """JSON keys are strings: each must be a token id in decimal; a bias lies in [-100, 100] (OpenAI)."""
        if v is None:
            return {}
        bias = {}
        for key, value in v.items():
            if not key.isascii() or not key.isdigit():
                raise ValueError(f"key {key!r} is not a token id (a non-negative integer)")
            if not -100.0 <= value <= 100.0:
                raise ValueError(f"the bias of token {key} is {value}, outside [-100, 100]")
            bias[int(key)] = value
        return bias

    def requested_logprobs(self) -> int | None:
        """How many alternatives per token the request wants (None: no logprobs)."""
        return None

    def sampling_params(self, default_max_tokens: int) -> SamplingParams:
        return SamplingParams(max_tokens=self.max_tokens or default_max_tokens, temperature=self.temperature,
                              top_p=self.top_p, top_k=self.top_k, seed=self.seed, stop=list(self.stop or []),
                              ignore_eos=self.ignore_eos, presence_penalty=self.presence_penalty or 0.0,
                              frequency_penalty=self.frequency_penalty or 0.0,
                              repetition_penalty=self.repetition_penalty or 1.0, logit_bias=dict(self.logit_bias or {}),
                              min_tokens=self.min_tokens, stop_token_ids=list(self.stop_token_ids or []),
                              logprobs=self.requested_logprobs(),
                              response_format=self.response_format.response_format() if self.response_format else None)

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class CompletionRequest(SamplingFields):
    prompt: Text | list[Text] | list[int]
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)  # the top-N alternatives per token

    @model_validator(mode="after")
    def _echo_without_logprobs(self):
        if self.echo and self.logprobs is not None:
            raise ValueError("echo with logprobs (the prompt's logprobs) is not supported by this server")
        return self

    def requested_logprobs(self) -> int | None:
        return self.logprobs

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
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)

    @model_validator(mode="after")
    def _top_logprobs_need_logprobs(self):
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        return self

    def requested_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    def sampling_params(self, default_max_tokens: int) -> SamplingParams:
        params = super().sampling_params(default_max_tokens)
        if self.max_completion_tokens and not self.max_tokens:
            params.max_tokens = self.max_completion_tokens
        return params

def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(choices: list[StepOutput]) -> dict:
    """The prompt once, the completion tokens of every choice."""
    prompt = choices[0].prompt_tokens
    completion = sum(out.completion_tokens for out in choices)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def completion_logprobs(entries: list[TokenLogprob], token_text: TokenText, offset: int = 0) -> dict:
    """OpenAI's legacy completions logprobs; text_offset counts characters from `offset`."""
    tokens, offsets = [], []
    for e in entries:
        tokens.append(token_text(e.token_id))
        offsets.append(offset)
        offset += len(tokens[-1])
    return {"tokens": tokens, "token_logprobs": [e.logprob for e in entries],
            "top_logprobs": [{token_text(t): lp for t, lp in e.top} for e in entries], "text_offset": offsets}


def _chat_token(token_id: int, logprob: float, token_text: TokenText) -> dict:
    text = token_text(token_id)
    return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}


def chat_logprobs(entries: list[TokenLogprob], token_text: TokenText) -> dict:
    return {"content": [{**_chat_token(e.token_id, e.logprob, token_text),
                         "top_logprobs": [_chat_token(t, lp, token_text) for t, lp in e.top]} for e in entries],
            "refusal": None}


def completion_response(rid: str, model: str, choices: list[Choice], token_text: TokenText, wants_logprobs: bool,
                        prefix: str = "") -> dict:
    """`prefix`: the prompt text, for echo."""
    return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": [{"index": c.index, "text": prefix + c.text, "finish_reason": c.last.finish_reason,
                         "logprobs": completion_logprobs(c.logprobs, token_text) if wants_logprobs else None}
                        for c in choices],
            "usage": usage([c.last for c in choices])}


def completion_chunk(rid: str, model: str, index: int, out: StepOutput, logprobs: dict | None = None) -> dict:
    return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": [{"index": index, "text": out.text, "logprobs": logprobs,
                         "finish_reason": out.finish_reason if out.finished else None}]}


def chat_response(rid: str, model: str, choices: list[Choice], token_text: TokenText, wants_logprobs: bool) -> dict:
    return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": c.index, "message": {"role": "assistant", "content": c.text},
                         "logprobs": chat_logprobs(c.logprobs, token_text) if wants_logprobs else None,
                         "finish_reason": c.last.finish_reason} for c in choices],
            "usage": usage([c.last for c in choices])}


def chat_chunk(rid: str, model: str, index: int, delta: dict, finish_reason: str | None = None,
               logprobs: dict | None = None) -> dict:
    return {"id": rid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
            "choices": [{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}]}


def usage_chunk(rid: str, model: str, obj: str, lasts: list[StepOutput]) -> dict:
    return {"id": rid, "object": obj, "created": int(time.time()), "model": model, "choices": [],
            "usage": usage(lasts)}
