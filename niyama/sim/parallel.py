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
                 total: int | None = None, unit: str = "run", show_progress: bool = True) -> list:
    """[fn(item, tick) for item in items], `processes` at a time (default: one per core).
    `total` is the expected number of ticks (default: one per item)."""
    from tqdm import tqdm

    global _job
    items = list(items)
    processes = max(1, min(processes or os.cpu_count() or 1, len(items) or 1))
    bar = tqdm(total=total or len(items), unit=unit, desc=desc, disable=not show_progress, dynamic_ncols=True)

    def tick(text: str = "") -> None:
        if bar.n + 1 > bar.total:
            bar.total = bar.n + 1
        bar.update(1)
        if text:
            bar.set_postfix_str(text)

    results: dict[int, object] = {}
    try:
        if processes == 1:
            for k, item in enumerate(items):
                results[k] = fn(item, tick)
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
                        results[k] = pending.pop(k).get()   # re-raises a worker's exception here
                while not q.empty():
                    tick(q.get())
    finally:
        _job = None
        bar.total = bar.n
        bar.close()
    return [results[k] for k in range(len(items))]
