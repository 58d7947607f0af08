"""Runs batches: each line through the server's `respond` (the same path as an HTTP request, without HTTP),
at most `concurrency` lines in flight over all batches, each answer stored as soon as it comes.

The completion window is the lines' deadline: a line is submitted with `ttlt_ms` = the time left until the
batch's created_at + window (any tier or explicit target in its body is replaced), so the scheduler treats
it as batch-tier work with its own time-to-last-token target and fills slack with it beside interactive
requests, relegating what can no longer make it. When the window ends, the lines in flight are aborted and
the batch expires; a cancel ends it the same way. A runner that stops (server shutdown, crash) finalizes
nothing: its batches resume from their pending lines when the data directory is opened again."""

from __future__ import annotations

import asyncio
import heapq
import itertools
import json
import logging
import time

from .batch_input import CANCELLED, ENDPOINTS, EXPIRED
from .errors import APIError

log = logging.getLogger("niyama.server")
QOS_FIELDS = ("tier", "service_tier", "ttft_ms", "tbt_ms", "ttlt_ms")   # the window's ttlt_ms replaces them
CHUNK = 512        # pending lines read from the store at a time


class EngineGone(Exception):
    """The engine stopped: the batch waits for a restart instead of failing its lines."""


class Slots:
    """At most `n` lines in flight; a freed slot goes to the waiting batch whose window ends first, so a short
    window is not stuck behind a big batch due tomorrow (the scheduler then orders what is in flight)."""

    def __init__(self, n: int):
        self.free = n
        self.waiting: list[tuple[float, int, asyncio.Future]] = []
        self._order = itertools.count()

    async def acquire(self, deadline: float) -> None:
        if self.free and not self.waiting:
            self.free -= 1
            return
        turn = asyncio.get_running_loop().create_future()
        heapq.heappush(self.waiting, (deadline, next(self._order), turn))
        try:
            await turn
        except asyncio.CancelledError:
            if turn.done() and not turn.cancelled():      # handed a slot just as it was cancelled: pass it on
                self.release()
            raise

    def release(self) -> None:
        while self.waiting:
            turn = heapq.heappop(self.waiting)[2]
            if not turn.done():                            # (a cancelled waiter's turn is done)
                turn.set_result(None)
                return
        self.free += 1


class BatchRunner:
    def __init__(self, store, respond, concurrency: int, call):
        """`respond(kind, body)`: app.py's; `call(fn, *args)`: awaits a store method on the store's thread."""
        self.store = store
        self.respond = respond
        self.call = call
        self.slots = Slots(concurrency)
        self.tasks: dict[str, asyncio.Task] = {}
        self.windows: dict[str, asyncio.Timeout] = {}     # a running batch's window (a cancel ends it early)
        self.cancelling: set[str] = set()

    def launch(self, batch: dict) -> None:
        """Run (or resume, or finish) an active batch."""
        task = asyncio.create_task(self._run(batch["id"], batch["endpoint"], batch["status"]),
                                   name=f"batch {batch['id']}")
        self.tasks[batch["id"]] = task
        task.add_done_callback(lambda t, key=batch["id"]: self.tasks.pop(key, None))

    def cancel(self, batch: dict) -> None:
        """The store has marked it `cancelling`: abort its lines in flight and finalize it."""
        self.cancelling.add(batch["id"])
        window = self.windows.get(batch["id"])
        if window is not None:
            window.reschedule(asyncio.get_running_loop().time())
        elif batch["id"] not in self.tasks:        # not running (stopped by an error): finalize it now
            self.launch(batch)

    async def stop(self) -> None:
        tasks = list(self.tasks.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _run(self, batch_id: str, endpoint: str, status: str) -> None:
        try:
            if status == "in_progress":
                status = await self._run_window(batch_id, endpoint)
            else:     # cancelled while not running, or found finalizing / cancelling at start-up
                status = "completed" if status == "finalizing" else "cancelled"
            unanswered = {"expired": EXPIRED, "cancelled": CANCELLED}.get(status)
            await self.call(self.store.finalize, batch_id, status, unanswered)
            log.info("batch %s %s", batch_id, status)
        except EngineGone:
            log.error("batch %s paused: the engine stopped; it resumes when the server restarts", batch_id)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("batch %s stopped by an internal error; it resumes when the server restarts", batch_id)
        finally:
            self.cancelling.discard(batch_id)

    async def _run_window(self, batch_id: str, endpoint: str) -> str:
        """Run the pending lines within the window: the status the batch ends in."""
        loop = asyncio.get_running_loop()
        deadline = await self.call(self.store.batch_deadline, batch_id)
        try:
            async with asyncio.timeout_at(loop.time() + deadline - time.time()) as window:
                self.windows[batch_id] = window
                if batch_id in self.cancelling:
                    window.reschedule(loop.time())
                await self._run_lines(batch_id, ENDPOINTS[endpoint], deadline)
        except TimeoutError:
            return "cancelled" if batch_id in self.cancelling else "expired"
        finally:
            self.windows.pop(batch_id, None)
        # all answered; a cancel that came meanwhile turned the batch to cancelling (its output is whole)
        moved = await self.call(self.store.move, batch_id, "in_progress", "finalizing")
        return "completed" if moved else "cancelled"

    async def _run_lines(self, batch_id: str, kind: str, deadline: float) -> None:
        try:
            async with asyncio.TaskGroup() as lines:
                after = -1
                while chunk := await self.call(self.store.pending_lines, batch_id, after, CHUNK):
                    for number, custom_id, body in chunk:
                        await self.slots.acquire(deadline)
                        lines.create_task(self._run_line(batch_id, kind, deadline, number, custom_id, body))
                    after = chunk[-1][0]
        except* EngineGone:
            raise EngineGone() from None

    async def _run_line(self, batch_id: str, kind: str, deadline: float, number: int, custom_id: str,
                        text: str) -> None:
        try:
            body = json.loads(text)
            for key in QOS_FIELDS:
                body.pop(key, None)
            await self.call(self.store.count_attempt, batch_id, number)
            status, answer = await self._answer(kind, body, deadline, batch_id, number, custom_id)
            await self.call(self.store.finish_line, batch_id, number, custom_id, status, answer)
        finally:
            self.slots.release()

    async def _answer(self, kind: str, body: dict, deadline: float, *where) -> tuple[int, dict]:
        """(status, response body) of one line."""
        while True:
            body["ttlt_ms"] = max(1.0, (deadline - time.time()) * 1000)
            try:
                return 200, await self.respond(kind, body)
            except APIError as e:
                if e.status == 503:        # only a stopped engine answers 503
                    raise EngineGone() from None
                if e.code != "deadline_infeasible":
                    return e.status, e.body()
                # admission control (--on-infeasible reject) predicts a miss now: the window may still allow
                # it later, when the queue is shorter; the window's end stops the retries
                await asyncio.sleep(float(e.headers.get("Retry-After", 1)))
            except Exception:
                log.exception("batch %s line %d (custom_id %r) failed", *where)
                return 500, APIError("internal error; the server log has the details", 500).body()
