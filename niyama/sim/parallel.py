"""Run independent simulations in worker processes with one progress bar.

Workers are forked, so the function and the items are inherited, not
pickled; only each item's index goes out and its result comes back. A
worker advances the shared bar by calling `tick(text)` as often as it likes
(a capacity search ticks once per simulated run).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue as queue_mod
from typing import Callable, Sequence

_job: tuple | None = None          # (fn, items, progress queue), set before forking


def _call(k: int):
    fn, items, q = _job
    return fn(items[k], lambda text="": q.put(text))


def run_parallel(fn: Callable, items: Sequence, *, processes: int | None = None, desc: str = "simulating",
                 ticks_per_item: int = 1, ticks_of: Callable[[object], int] | None = None, unit: str = "run",
                 show_progress: bool = True) -> list:
    """[fn(item, tick) for item in items], `processes` at a time (default: one per core).
    `ticks_per_item`: at most how many ticks an item makes; when an item is done, `ticks_of(result)` says how
    many it made and the bar's total shrinks by the difference, so the bar reaches 100% only at the end."""
    from tqdm import tqdm

    global _job
    items = list(items)
    processes = max(1, min(processes or os.cpu_count() or 1, len(items) or 1))
    bar = tqdm(total=ticks_per_item * len(items), unit=unit, desc=desc, disable=not show_progress,
               dynamic_ncols=True)

    def tick(text: str = "") -> None:
        if bar.n + 1 > bar.total:
            bar.total = bar.n + 1
        bar.update(1)
        if text:
            bar.set_postfix_str(text)

    def done(k: int, result) -> None:
        results[k] = result
        if ticks_of is not None:
            bar.total = max(bar.n, bar.total - (ticks_per_item - ticks_of(result)))
            bar.refresh()

    results: dict[int, object] = {}
    try:
        if processes == 1:
            for k, item in enumerate(items):
                done(k, fn(item, tick))
        else:
            ctx = mp.get_context("fork")
            q = ctx.Queue()
            _job = (fn, items, q)
            with ctx.Pool(processes) as pool:
                pending = {k: pool.apply_async(_call, (k,)) for k in range(len(items))}
                while pending:
                    try:
                        tick(q.get(timeout=0.2))
                    except queue_mod.Empty:
                        pass
                    for k in [k for k, r in pending.items() if r.ready()]:
                        done(k, pending.pop(k).get())       # re-raises a worker's exception here
                while not q.empty():
                    tick(q.get())
    finally:
        _job = None
        bar.total = bar.n
        bar.close()
    return [results[k] for k in range(len(items))]
