"""OpenAI's `n`: one request, n choices, each its own engine request, their events merged into one stream.

Choice 0 is submitted at once; the others when its first event arrives. By then its prompt is computed and
in the prefix cache, so the other choices start from it instead of computing the same prompt beside it in
the same step (two requests prefilled together cannot share blocks that neither has finished). All choices
keep the request's arrival time, so their deadlines are the request's.
"""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Awaitable, Callable

from .engine_client import Event, Stream
from .errors import APIError
from .protocol import Generation

SEED_LIMIT = 2**63


def choice_generations(gen: Generation) -> list[Generation]:
    """The n single-choice generations of `gen`: with a seed, choice i draws from seed + i (reproducible and
    distinct); without one, each draws its own."""
    if gen.n == 1:
        return [gen]
    seed = gen.params.seed
    return [dataclasses.replace(gen, n=1, params=gen.params if seed is None else
                                dataclasses.replace(gen.params, seed=(seed + i) % SEED_LIMIT))
            for i in range(gen.n)]


class Choices:
    """The streams of one request's choices: iterate for (index, Event) until every choice has ended."""

    def __init__(self, submit: Callable[[Generation], Awaitable[Stream]], abort: Callable[[Stream], None],
                 gens: list[Generation]):
        self._submit = submit
        self._abort = abort
        self._gens = gens
        self.streams: list[Stream | None] = [None] * len(gens)
        self._queue: asyncio.Queue = asyncio.Queue()
        self._tasks: list[asyncio.Task] = []
        self._open = len(gens)                # choices whose last event has not been read yet

    async def start(self) -> None:
        """Submit choice 0 (an admission verdict against it is the caller's error, before any response)."""
        self.streams[0] = await self._submit(self._gens[0])
        self._tasks.append(asyncio.create_task(self._pump(0, self.streams[0])))

    async def _pump(self, index: int, stream: Stream) -> None:
        first = True
        async for event in stream:
            self._queue.put_nowait((index, event))
            if first and index == 0 and len(self._gens) > 1:
                first = False
                if event.error is None:
                    self._tasks.append(asyncio.create_task(self._submit_rest()))
                else:                             # the request failed: the others end with its error
                    for i in range(1, len(self._gens)):
                        self._queue.put_nowait((i, event))

    async def _submit_rest(self) -> None:
        for i in range(1, len(self._gens)):
            try:
                stream = self.streams[i] = await self._submit(self._gens[i])
            except APIError as e:                 # rejected (deadline) or the engine stopped meanwhile
                self._queue.put_nowait((i, Event("", 0, error=e.message, status=e.status)))
                continue
            self._tasks.append(asyncio.create_task(self._pump(i, stream)))

    def __aiter__(self):
        return self

    async def __anext__(self) -> tuple[int, Event]:
        if not self._open:
            raise StopAsyncIteration
        index, event = await self._queue.get()
        if event.finish_reason is not None or event.error is not None:
            self._open -= 1
        return index, event

    @property
    def finished(self) -> bool:
        return not self._open

    def end(self, event: Event) -> None:
        """The client left: every stream ends now (their later outputs are dropped)."""
        for stream in self.streams:
            if stream is not None and not stream.finished:
                stream.end(event)

    def close(self) -> None:
        """Abort what has not finished and stop submitting (the handler is leaving)."""
        for task in self._tasks:
            task.cancel()
        for stream in self.streams:
            if stream is not None and not stream.finished:
                self._abort(stream)

    def qos(self) -> dict:
        out = self.streams[0].qos()
        out["relegated"] = any(s is not None and s.relegated for s in self.streams)
        return out
