"""schemathesis over every route of a real server's OpenAPI schema (default model, loopback).

Each operation gets a bounded number of generated requests, valid and invalid (both generation modes).
A response fails the test when it is a 5xx, does not match its documented schema or content type,
accepts data the schema forbids, or is an error outside the project's shape: every error is JSON
`{"error": {"message", "type", "code"}}`, and a bad request is 400, never FastAPI's 422 `{"detail"}`.
"""
from __future__ import annotations

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis.checks import not_a_server_error
from schemathesis.core.failures import FailureGroup
from schemathesis.generation import GenerationMode
from schemathesis.specs.openapi.checks import (content_type_conformance, negative_data_rejection,
                                               response_schema_conformance)

from conftest import ServerProcess

EXAMPLES_PER_OPERATION = 20
MAX_TOKENS = 4  # generated token budgets above this are lowered so completions stay fast on a CPU
TOKEN_BUDGETS = ("max_tokens", "max_completion_tokens")
MAX_PROMPT = 200  # characters of a prompt or message content (items of a token-id list)
MAX_MESSAGES = 6  # chat messages of a request
STUCK = "server stuck"
REQUEST_TIMEOUT = 20  # seconds; a request of at most MAX_TOKENS tokens that takes longer is a hang


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory):
    """A server of its own: the fuzzer uploads and deletes adapters, which the shared one must not see."""
    server = ServerProcess("--max-gpu-adapters", "2", "--max-adapter-mb", "8", "--kv-cache-tokens", "4096",
                           adapter_dir=tmp_path_factory.mktemp("fuzz-store") / "adapters")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def api_schema(fuzz_server):
    return schemathesis.openapi.from_url(f"{fuzz_server.url}/openapi.json")


@schemathesis.check
def openai_error_shape(ctx, response, case):
    """Errors are 4xx/5xx JSON in the OpenAI shape; bad input is 400, not 422."""
    if response.status_code < 400:
        return None
    if response.status_code == 422:
        raise AssertionError(f"422 for a bad request (the API answers 400): {response.text[:300]}")
    try:
        body = response.json()
    except ValueError:
        raise AssertionError(f"HTTP {response.status_code} error is not JSON: {response.text[:300]!r}")
    error = body.get("error") if isinstance(body, dict) else None
    if not (isinstance(error, dict) and isinstance(error.get("message"), str) and isinstance(error.get("type"), str)
            and "code" in error):
        raise AssertionError(f"HTTP {response.status_code} error is not {{'error': {{message, type, code}}}}: "
                             f"{response.text[:300]}")
    return True


CHECKS = [not_a_server_error, response_schema_conformance, content_type_conformance, negative_data_rejection,
          openai_error_shape]


def steer(case, mode: GenerationMode) -> None:
    """Keep generation requests fast and make valid ones reach the engine: a valid (integer) token
    budget is lowered to MAX_TOKENS (and set when absent), prompts are cut to MAX_PROMPT (chats to MAX_MESSAGES), and a valid request names the
    base model (a random model name only ever meets a 404). Invalid values are sent as generated."""
    if not isinstance(case.body, dict):
        return
    for key in TOKEN_BUDGETS:
        value = case.body.get(key)
        if type(value) is int and value > MAX_TOKENS:
            case.body[key] = MAX_TOKENS
    if mode is GenerationMode.POSITIVE and "model" in case.body:
        case.body["model"] = "base"
        if all(case.body.get(key) is None for key in TOKEN_BUDGETS):  # not the server's default of 256 tokens
            case.body["max_tokens"] = MAX_TOKENS
    prompt = case.body.get("prompt")
    if isinstance(prompt, (str, list)):  # prefill of thousands of tokens takes seconds on this CPU
        case.body["prompt"] = prompt[:MAX_PROMPT]
    if isinstance(case.body.get("messages"), list):  # dozens of messages make a prompt of thousands of tokens
        case.body["messages"] = case.body["messages"][:MAX_MESSAGES]
    for message in case.body.get("messages") or []:
        if isinstance(message, dict) and isinstance(message.get("content"), (str, list)):
            message["content"] = message["content"][:MAX_PROMPT]


def failures_of(exc: BaseException) -> list[str]:
    """One line per failed check (schemathesis raises a group of them), or the error itself."""
    if isinstance(exc, BaseExceptionGroup):
        return [line for e in exc.exceptions for line in failures_of(e)]
    return [f"{getattr(exc, 'title', type(exc).__name__)}: {str(getattr(exc, 'message', exc)).strip()[:400]}"]


def fuzz(operation, mode: GenerationMode, found: dict[str, str]) -> None:
    """EXAMPLES_PER_OPERATION generated requests; every distinct failure lands in `found` with its first input."""

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(max_examples=EXAMPLES_PER_OPERATION, deadline=None, derandomize=True, database=None,
              phases=[Phase.explicit, Phase.generate],  # no shrinking: bounded time
              suppress_health_check=list(HealthCheck))
    def run(case):
        if STUCK in found:  # every further request would wait out its timeout: bounded time instead
            return
        steer(case, mode)
        try:
            response = case.call(timeout=REQUEST_TIMEOUT)
        except Exception as exc:  # a reset connection or a hung server
            found.setdefault(f"{operation.label} [{mode.value}] {type(exc).__name__}",
                             f"{exc}\n    input: {case.as_curl_command()[:600]}")
            if isinstance(exc, requests.Timeout):
                found[STUCK] = f"no answer within {REQUEST_TIMEOUT} s after the input above: fuzzing stopped"
            return
        try:
            case.validate_response(response, checks=CHECKS)
        except (FailureGroup, Exception) as exc:  # collect, not stop: the report lists every distinct failure
            for failure in failures_of(exc):
                title = failure.partition(":")[0] if "Custom check" not in failure else failure.split("`")[1]
                key = f"{operation.label} [{mode.value}] HTTP {response.status_code} {title}"
                found.setdefault(key, f"{failure}\n    input: {case.as_curl_command()[:600]}")

    try:
        run()
    except Unsatisfiable:  # negative mode on a route without inputs (GET /health): nothing invalid to send
        assert mode is GenerationMode.NEGATIVE, operation.label


def test_api_never_fails_itself(api_schema):
    found: dict[str, str] = {}
    operations = [result.ok() for result in api_schema.get_all_operations()]
    assert len(operations) >= 9, [op.label for op in operations]  # every route is in the schema
    for operation in operations:
        for mode in GenerationMode:
            fuzz(operation, mode, found)
    assert not found, f"{len(found)} distinct failures:\n" + "\n".join(f"- {k}\n  {v}" for k, v in found.items())
