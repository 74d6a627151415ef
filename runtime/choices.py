"""A request's `n` choices: one engine request each (all admitted through `Service.open_request`, so
they batch with everything else), iterated together, closed together.

Choice i runs with `params.for_choice(i)`: a seeded request's choices each derive their own seed.
The prompt is tokenised once for all of them.
"""
from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import AsyncIterator, Callable

from .sequence import SamplingParams, StepOutput, TokenLogprob
from .service import Generation, Service
from .tenants import Tenant

MAX_N = 16  # choices per request; each is one engine request and counts against the server's limits


@dataclass
class Choice:
    """One finished choice: its text, tokens, logprobs (when asked for) and last output."""
    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    last: StepOutput | None = None

    def add(self, out: StepOutput) -> None:
        self.text += out.text
        self.token_ids += out.token_ids
        self.logprobs += out.logprobs or []
        self.last = out


def encode_once(encode: Callable[[], list[int]]) -> Callable[[], list[int]]:
    ids: list[int] | None = None

    def cached() -> list[int]:
        nonlocal ids
        if ids is None:
            ids = encode()
        return list(ids)
    return cached


class Choices:
    def __init__(self, generations: list[Generation]):
        self.generations = generations
        self._pumps: list[asyncio.Future] = []  # n > 1: one task per choice feeding outputs()

    @classmethod
    async def open(cls, service: Service, tenant: Tenant, model: str, encode: Callable[[], list[int]],
                   params: SamplingParams, n: int, adapters: list[tuple[str, float]] | None = None) -> Choices:
        """Admit the n engine requests (on `model`, or on a mix of `adapters`: see Service.open_request);
        if one is refused, those already admitted are closed."""
        encode = encode_once(encode)
        generations: list[Generation] = []
        try:
            for i in range(n):
                generations.append(await service.open_request(tenant, model, encode, params.for_choice(i), adapters))
        except BaseException:
            for generation in generations:
                generation.close()
            raise
        return cls(generations)

    async def outputs(self) -> AsyncIterator[tuple[int, StepOutput]]:
        """(choice index, output) in the order they arrive; the first error of any choice is raised."""
        if len(self.generations) == 1:
            async for out in self.generations[0]:
                yield 0, out
            return
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(index: int, generation: Generation) -> None:
            try:
                async for out in generation:
                    queue.put_nowait((index, out, None))
                queue.put_nowait((index, None, None))
            except Exception as e:
                queue.put_nowait((index, None, e))
        self._pumps = tasks = [asyncio.ensure_future(pump(i, g)) for i, g in enumerate(self.generations)]
        try:
            running = len(tasks)
            while running:
                index, out, error = await queue.get()
                if error is not None:
                    raise error
                if out is None:
                    running -= 1
                else:
                    yield index, out
        finally:
            for task in tasks:
                task.cancel()

    async def collect(self) -> list[Choice]:
        choices = [Choice(i) for i in range(len(self.generations))]
        async for index, out in self.outputs():
            choices[index].add(out)
        return choices

    def close(self) -> None:
        """Abort every unfinished choice; also when outputs() was left without being closed (a
        cancelled task), so no pump is left waiting on a closed generation."""
        for task in self._pumps:
            task.cancel()
        for generation in self.generations:
            generation.close()

    async def aclose(self) -> None:
        self.close()
