"""The engine loop on a background thread; HTTP handlers only add requests, read streams and abort.

Everything that touches the engine (adding, stepping, aborting) runs on the engine thread, so the
engine needs no locks. Handlers send commands through a queue and await a future; after every step
the thread pushes each request's new text to that request's asyncio queue with
`call_soon_threadsafe`. One event per step per request: a client sees tokens as they are made.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import threading
from dataclasses import dataclass, field

from ..engine import LLMEngine
from ..engine.sequence import Sequence
from .protocol import Generation

log = logging.getLogger("niyama.server")


@dataclass
class Event:
    text: str                       # new text (may be empty: held back, or a token with no text)
    num_tokens: int                 # tokens generated so far
    finish_reason: str | None = None
    error: str | None = None        # the engine failed on this request
    token_ids: list[int] = field(default_factory=list)   # the tokens new in this event


class Stream:
    """One request's output as its handler sees it: an async iterator of `Event`s."""

    def __init__(self, loop: asyncio.AbstractEventLoop, gen: Generation):
        self.loop = loop
        self.gen = gen
        self.queue: asyncio.Queue[Event] = asyncio.Queue()
        self.seq: Sequence | None = None
        self.finished = False            # set by the handler when it has seen the last event
        self.sent_tokens = 0             # engine thread only

    def put(self, event: Event) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, event)
        except RuntimeError:             # the event loop is closed (server shutting down)
            pass

    def __aiter__(self):
        return self

    async def __anext__(self) -> Event:
        if self.finished:
            raise StopAsyncIteration
        event = await self.queue.get()
        if event.finish_reason is not None or event.error is not None:
            self.finished = True
        return event

    def qos(self) -> dict:
        """What the response reports about QoS (read after the last event)."""
        req = self.seq.request if self.seq is not None else None
        return {"tier": self.gen.tier.name, "priority": self.gen.priority.name.lower(),
                "relegated": bool(req is not None and req.relegated)}


class AsyncEngine:
    def __init__(self, engine: LLMEngine, metrics=None):
        self.engine = engine
        self.metrics = metrics
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._active: dict[Sequence, Stream] = {}
        self._stop = threading.Event()
        self.degraded: str | None = None     # why /health says "degraded" (KV blocks lost after a failure)
        self._thread = threading.Thread(target=self._run, name="niyama-engine", daemon=True)
        if metrics is not None:
            engine.replica.on_step.append(metrics.observe_step)

    # --- called from the event loop -------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def shutdown(self) -> None:
        self._stop.set()
        self._commands.put(None)
        self._thread.join(timeout=10)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    async def submit(self, gen: Generation) -> Stream:
        """Queue a generation; raises ValueError if the engine refuses it (e.g. the KV cache is too small)."""
        if not self.alive:
            raise RuntimeError("the engine thread has stopped")
        stream = Stream(asyncio.get_running_loop(), gen)
        arrival_s = self.engine.now()       # the clock is monotonic time: safe to read from any thread
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._commands.put((self._add, (stream, arrival_s), future))
        await asyncio.wrap_future(future)
        return stream

    def abort(self, stream: Stream) -> None:
        """Stop a request whose client went away; its KV blocks return at the engine's next pause."""
        self._commands.put((self._abort, (stream,), None))

    # --- the engine thread ---------------------------------------------------
    def _run(self) -> None:
        while not self._stop.is_set():
            if not self._drain(block=not self.engine.has_work):
                break
            if not self.engine.has_work:
                continue
            try:
                self.engine.step()
                self._publish()
            except Exception:                 # keep serving: fail the requests in flight, free their blocks
                log.exception("engine step failed")
                self._fail_all("internal error: the engine step running this request failed (see the server log)")

    def _drain(self, block: bool) -> bool:
        """Run queued commands; with `block`, wait (briefly) for one. False when asked to stop."""
        try:
            cmd = self._commands.get(timeout=0.5) if block else self._commands.get_nowait()
        except queue.Empty:
            return True
        while True:
            if cmd is None:
                return False
            fn, args, future = cmd
            try:
                result = fn(*args)
            except Exception as e:
                if future is None:
                    log.exception("engine command failed")
                else:
                    future.set_exception(e)
            else:
                if future is not None:
                    future.set_result(result)
            try:
                cmd = self._commands.get_nowait()
            except queue.Empty:
                return True

    def _add(self, stream: Stream, arrival_s: float) -> None:
        gen = stream.gen
        seq = self.engine.add_request(gen.prompt_ids, gen.params, tier=gen.tier, priority=gen.priority,
                                      arrival_s=arrival_s)
        stream.seq = seq
        self._active[seq] = stream
        if self.metrics is not None:
            self.metrics.request_added(len(gen.prompt_ids))
            self.metrics.set_gauges(self.engine)

    def _abort(self, stream: Stream) -> None:
        seq = stream.seq
        if seq is None or self._active.pop(seq, None) is None:
            return
        if self.engine.abort(seq) and self.metrics is not None:
            self.metrics.request_finished(seq, self.engine.now())
            self.metrics.set_gauges(self.engine)

    def _publish(self) -> None:
        done = []
        for seq, stream in self._active.items():
            n = len(seq.output_ids)
            if n == stream.sent_tokens and not seq.finished:
                continue
            if self.metrics is not None and n > stream.sent_tokens:
                self.metrics.tokens_emitted(seq, n - stream.sent_tokens, self.engine.now())
            stream.put(Event(seq.take_text(), n, seq.finish_reason, token_ids=seq.output_ids[stream.sent_tokens:n]))
            stream.sent_tokens = n
            if seq.finished:
                done.append(seq)
        for seq in done:
            del self._active[seq]
            if self.metrics is not None:
                self.metrics.request_finished(seq, self.engine.now())
        if self.metrics is not None:
            self.metrics.set_gauges(self.engine)

    def _fail_all(self, message: str) -> None:
        for seq, stream in list(self._active.items()):
            try:
                self.engine.abort(seq)
            except Exception:
                log.exception("abort after a failed step")
            stream.put(Event("", len(seq.output_ids), error=message))
        self._active.clear()
        try:
            self.engine.replica.check_blocks()
        except AssertionError as e:
            log.error("KV blocks lost after a failed step: %s", e)
            self.degraded = f"KV blocks lost after a failed step: {e}"
