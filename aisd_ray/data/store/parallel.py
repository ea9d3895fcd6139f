"""Cases read and windowed side by side: ``map(fn, items)`` functions for ``prepare``.

A map runs ``fn`` on every item and yields the results in the items' order (whatever order they
finish in), so that what is written from them is the same whatever the number of workers. Here
the local one: a pool of processes (``concurrent.futures.ProcessPoolExecutor``, started as
``START_METHOD`` says). The Ray one (Ray tasks on this node) is ``stages.data.case_map``: this
layer imports no Ray.
"""

from __future__ import annotations

import multiprocessing
import os
import sys
from concurrent.futures import ProcessPoolExecutor
from typing import Any, Callable, Iterable, Iterator

# Linux: workers forked from this process, starting with its modules loaded. A fork server (a fresh
# interpreter that forks the workers) was measured 1.5..3x slower than one worker on the 2-core
# machine for 8 patients of 512x512x8 (Dec 2026), where forked workers were 1.1..1.7x faster. The
# workers run numpy, scipy and the readers only, never TensorFlow or Ray, which the caller may hold.
# Elsewhere the platform's default (spawn on macOS and Windows).
START_METHOD = "fork" if sys.platform == "linux" else None
Map = Callable[[Callable[[Any], Any], Iterable[Any]], Iterator[Any]]


def worker_count(workers: int, items: int) -> int:
    """``workers`` (``data.prepare_workers``; 0: this machine's CPU count), at most one per item, at least 1."""
    return max(1, min(workers or os.cpu_count() or 1, items))


def local_map(workers: int = 0) -> Map:
    """A map over a pool of ``worker_count(workers, len(items))`` processes; with one, the items are
    done here, one after another. An exception raised for an item (a DataError naming its file) is
    raised here, and the items not started yet are dropped."""

    def run(fn: Callable[[Any], Any], items: Iterable[Any]) -> Iterator[Any]:
        items = list(items)
        count = worker_count(workers, len(items))
        if count == 1:
            yield from (fn(item) for item in items)
            return
        context = multiprocessing.get_context(START_METHOD)
        pool = ProcessPoolExecutor(count, mp_context=context)
        try:
            yield from pool.map(fn, items)
        finally:
            pool.shutdown(wait=True, cancel_futures=True)

    return run
