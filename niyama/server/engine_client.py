"""The HTTP side of the engine: starts the engine core, sends it adds and aborts, and turns its per-step
messages into each request's events (text and stop strings are made here, not in the engine).

Two threads talk to the pipes so that the event loop never blocks on them: a sender (a large prompt does
not fit the pipe's buffer while the engine is mid-step) and a reader, which detokenizes and hands each
message's events to the event loop in one call. If the engine dies, every request in flight gets an
error, new ones are refused (`EngineStopped`), and `/health` says why.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import multiprocessing
import queue
import threading
import time
from dataclasses import dataclass, field

from ..engine.sequence import stop_token_ids
from ..engine.text_output import TextOutput
from ..messages import (Abort, AddRequest, EngineStats, Fatal, LoadReport, Output, Ready, ReportLoad, Shutdown,
                        StepOutputs, check_version)
from .engine_core import EngineCore, serve_engine
from .protocol import Generation

log = logging.getLogger("niyama.server")


class EngineStopped(RuntimeError):
    """The engine is not running (it died, or the server is shutting down)."""


@dataclass
class Event:
    text: str                       # new text (may be empty: held back, or a token with no text)
    num_tokens: int                 # tokens generated so far
    finish_reason: str | None = None
    error: str | None = None        # the request failed; `status` is the HTTP status to answer with
    token_ids: list[int] = field(default_factory=list)   # the tokens new in this event
    logprobs: list | None = None    # their log-probabilities (engine entries), if the request asked for them
    status: int = 500
    retry_after_s: int | None = None   # with a 429: when the client may try again


ADMITTED = Event("", 0)     # marks a tier-rejecting request's admission (resolves its verdict; not queued)


class Stream:
    """One request's output as its handler sees it: an async iterator of `Event`s."""

    def __init__(self, rid: int, gen: Generation, arrival: float, text: TextOutput | None):
        self.rid = rid
        self.gen = gen
        self.arrival = arrival           # time.monotonic() when the request reached the server
        self.queue: asyncio.Queue[Event] = asyncio.Queue()
        self.text = text
        self.output_ids: list[int] = []  # reader thread
        self.done = False                # reader thread: the last event was made (later outputs are dropped)
        self.finished = False            # event loop: the handler has seen the last event
        self.relegated = False
        self.last_token_time: float | None = None
        # in a tier that rejects infeasible requests: resolves to None once admitted, or to the error Event
        self.verdict: asyncio.Future | None = None

    def __aiter__(self):
        return self

    async def __anext__(self) -> Event:
        if self.finished:
            raise StopAsyncIteration
        event = await self.queue.get()
        if event.finish_reason is not None or event.error is not None:
            self.finished = True
        return event

    def end(self, event: Event) -> None:
        """Event loop: end the stream now (its client left); the engine's later outputs are dropped."""
        self.done = True
        self.queue.put_nowait(event)

    def qos(self) -> dict:
        """What the response reports about QoS (read after the last event)."""
        return {"tier": self.gen.tier.name, "priority": self.gen.priority.name.lower(), "relegated": self.relegated}


class EngineClient:
    def __init__(self, commands, outputs, info: dict, runner, metrics=None, tokenizer=None):
        """Use `spawn` (the server) or `in_thread` (tests)."""
        self._commands = commands            # writable end of the command pipe
        self._outputs = outputs              # readable end of the output pipe
        self.info = info
        self._runner = runner                # the engine's Process or Thread
        self.metrics = metrics
        self.tokenizer = tokenizer
        self.streams: dict[int, Stream] = {}
        self.stats = EngineStats(time.monotonic(), info["kv_blocks"], info["kv_blocks"], 0, 0, None)
        self.stopped: str | None = None      # why the engine is not running
        self.load: LoadReport | None = None  # the engine's last load report (`report_load`), for a router
        self._ids = itertools.count()        # request ids: the engine uses the same
        self._send_queue: queue.SimpleQueue = queue.SimpleQueue()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._threads: list[threading.Thread] = []

    # --- starting ----------------------------------------------------------
    @classmethod
    def spawn(cls, config, tiers, metrics=None, tokenizer_factory=None) -> "EngineClient":
        """Start the engine in its own process and wait until its model is loaded (its log goes to stderr).
        `tokenizer_factory(info)` loads the tokenizer on this side."""
        ctx = multiprocessing.get_context("spawn")      # CUDA cannot be forked; a fresh interpreter is safe
        cmd_read, cmd_write = ctx.Pipe(duplex=False)
        out_read, out_write = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=serve_engine, args=(config, tiers, cmd_read, out_write), name="niyama-engine",
                           daemon=True)
        proc.start()
        cmd_read.close()                                # the child holds these ends now: EOF when it exits
        out_write.close()
        try:
            message = out_read.recv()
        except EOFError:
            proc.join(5)
            raise RuntimeError(f"the engine process exited (code {proc.exitcode}) before it was ready; "
                               "see the log above") from None
        if isinstance(message, Fatal):
            proc.join(10)
            raise RuntimeError(f"the engine did not start: {message.message}")
        if not isinstance(message, Ready):
            proc.terminate()
            raise RuntimeError(f"the engine process sent {type(message).__name__} before Ready")
        check_version(message.version, "the engine process")
        info = {**message.info._asdict(), "pid": proc.pid, "mode": "process"}
        return cls(cmd_write, out_read, info, proc, metrics, tokenizer_factory(info) if tokenizer_factory else None)

    @classmethod
    def in_thread(cls, engine, metrics=None) -> "EngineClient":
        """The same loop on a thread of this process (tests, debugging): shares the GIL with HTTP."""
        cmd_read, cmd_write = multiprocessing.Pipe(duplex=False)
        out_read, out_write = multiprocessing.Pipe(duplex=False)
        core = EngineCore(engine, cmd_read, out_write)
        thread = threading.Thread(target=core.run, name="niyama-engine", daemon=True)
        info = {**engine.info()._asdict(), "pid": None, "mode": "thread"}
        return cls(cmd_write, out_read, info, thread, metrics, engine.tokenizer)

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Start talking to the engine; events go to `loop` (the server's event loop)."""
        self._loop = loop
        if isinstance(self._runner, threading.Thread):
            self._runner.start()
        for target, name in ((self._read_loop, "niyama-engine-reader"), (self._send_loop, "niyama-engine-sender")):
            t = threading.Thread(target=target, name=name, daemon=True)
            t.start()
            self._threads.append(t)

    def shutdown(self, timeout: float = 10) -> None:
        if self.stopped is None:
            self.stopped = "the server is shutting down"
        self._send_queue.put(Shutdown())
        self._send_queue.put(None)
        self._runner.join(timeout)
        if isinstance(self._runner, multiprocessing.process.BaseProcess) and self._runner.is_alive():
            log.warning("the engine process did not stop in %.0f s; terminating it", timeout)
            self._runner.terminate()
            self._runner.join(5)
        for t in self._threads:
            t.join(timeout)

    @property
    def alive(self) -> bool:
        return self.stopped is None

    # --- requests (event loop) ---------------------------------------------
    def submit(self, gen: Generation, arrival: float) -> Stream:
        """Queue a generation; `arrival` is `time.monotonic()` when it reached the server."""
        if self.stopped is not None:
            raise EngineStopped(self.stopped)
        rid = next(self._ids)
        text = None
        if self.tokenizer is not None:
            text = TextOutput(self.tokenizer, gen.params.stop, stop_token_ids(gen.params, self.info["eos_token_ids"]),
                              gen.params.include_stop_str_in_output)
        stream = Stream(rid, gen, arrival, text)
        if gen.tier.rejects_infeasible:
            stream.verdict = asyncio.get_running_loop().create_future()
        self.streams[rid] = stream          # before the engine can answer
        if self.stopped is not None:        # the engine died meanwhile: the reader may not have seen this one
            del self.streams[rid]
            raise EngineStopped(self.stopped)
        if self.metrics is not None:
            self.metrics.request_added(len(gen.prompt_ids))
        self._send_queue.put(AddRequest(rid, gen.prompt_ids, gen.params, gen.tier, gen.priority, arrival))
        return stream

    def abort(self, stream: Stream, reason: str = "abort") -> None:
        """Stop a request (its client left, or a stop string ended it); its blocks return at the engine's next
        pause, and the engine's final output for it still comes (for the metrics)."""
        self._send_queue.put(Abort(stream.rid, reason))

    def report_load(self, period_s: float) -> None:
        """Ask the engine for its load (`LLMEngine.load_report`) at most every `period_s` while it works."""
        self._send_queue.put(ReportLoad(period_s))

    def render_metrics(self) -> bytes:
        return self.metrics.render()

    # --- the threads ---------------------------------------------------------
    def _send_loop(self) -> None:
        while (cmd := self._send_queue.get()) is not None:
            try:
                self._commands.send(cmd)
            except (BrokenPipeError, OSError):
                return              # the engine is gone; the reader reports it

    def _read_loop(self) -> None:
        while True:
            try:
                message = self._outputs.recv()
            except (EOFError, OSError):
                self._engine_gone()
                return
            if type(message) is tuple:          # StepOutputs' wire form (messages.py)
                self._on_outputs(*StepOutputs.from_wire(message))
            else:
                log.error("ignoring an unexpected engine message %s", type(message).__name__)

    def _on_outputs(self, rids: list[int], tokens: list[int], ends: list[Output], stats: EngineStats,
                    logprobs: dict) -> None:
        now = time.monotonic()
        if self.metrics is not None:
            self.metrics.observe(stats)
        streams = self.streams
        ready = [(streams[rid], ADMITTED) for rid in stats.admitted if rid in streams]
        for rid, token in zip(rids, tokens):
            stream = streams.get(rid)
            lp = logprobs.get(rid)
            if stream is not None and (event := self._advance(stream, [token], None, now,
                                                              None if lp is None else [lp])) is not None:
                ready.append((stream, event))
        for end in ends:
            stream = streams.pop(end.rid, None)       # the engine is done with it
            if stream is None:
                continue
            stream.relegated = end.relegated
            if (event := self._advance(stream, end.token_ids, end, now, end.logprobs)) is not None:
                ready.append((stream, event))
            if self.metrics is not None:
                self.metrics.request_finished(stream, end, now)
        if ready:
            self._deliver(ready)
        if stats.load is not None:
            self.load = stats.load
        self.stats = stats          # last: once /health shows a request's blocks free, its metrics are recorded

    def _advance(self, stream: Stream, new: list[int], end: Output | None, now: float,
                 logprobs: list | None = None) -> Event | None:
        """The event that `new` tokens (with their `logprobs`, if asked for) and the request's `end`, if it
        ended, make for its stream, or None."""
        if stream.done:
            return None
        if end is not None and end.error is not None:
            stream.done = True
            return Event("", len(stream.output_ids), error=end.error, status=end.status,
                         retry_after_s=end.retry_after_s)
        finish = end.finish_reason if end is not None else None
        stream.output_ids += new
        text = ""
        if stream.text is not None:
            if stream.text.update(stream.output_ids, finish is not None):
                cut = len(stream.output_ids) - stream.text.num_tokens      # tokens past the stop string
                if cut:
                    new = new[:len(new) - cut]
                    logprobs = logprobs[:len(new)] if logprobs is not None else None
                    del stream.output_ids[stream.text.num_tokens:]
                if finish is None:
                    self.abort(stream, "stop")
                finish = "stop"
            text = stream.text.take_text()
        if new and self.metrics is not None:
            self.metrics.tokens_emitted(stream, len(new), now)
        if finish is not None:
            stream.done = True
        elif not new:
            return None
        return Event(text, len(stream.output_ids), finish, token_ids=new, logprobs=logprobs)

    def _deliver(self, ready: list) -> None:
        def put():
            for stream, event in ready:
                verdict = stream.verdict
                if verdict is not None and not verdict.done():     # the first news decides it
                    verdict.set_result(event if event.error is not None else None)
                if event is not ADMITTED:
                    stream.queue.put_nowait(event)
        try:
            self._loop.call_soon_threadsafe(put)
        except (RuntimeError, AttributeError):      # the event loop is closed (shutting down) or never started
            pass

    def _engine_gone(self) -> None:
        if self.stopped is None:
            self._runner.join(2)                # a process that died has an exit code a moment later
            code = getattr(self._runner, "exitcode", None)
            self.stopped = (f"the engine process exited (code {code}); restart the server" if code is not None
                            else "the engine stopped; restart the server")
            log.error("%s; failing %d requests in flight", self.stopped, len(self.streams))
        message = f"internal error: {self.stopped}"
        streams = list(self.streams.values())
        self.streams.clear()
        ready = [(s, Event("", len(s.output_ids), error=message, status=503)) for s in streams if not s.done]
        if ready:
            self._deliver(ready)
