"""Cases read and windowed side by side: ``map(fn, items)`` functions for ``prepare``.

A map runs ``fn`` on every item and yields the results in the items' order (whatever order they
finish in), so that what is written from them is the same whatever the number of workers. Here
the local one: a pool of processes (``concurrent.futures.ProcessPoolExecutor``, started through a
fork server: a fresh small process forks the workers, never the caller, which may hold
TensorFlow's or Ray's threads). The Ray one (Ray tasks on the cluster) is ``stages.data.case_map``:
this layer imports no Ray.
"""

from __future__ import annotations

import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from typing import Any, Callable, Iterable, Iterator

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
        context = multiprocessing.get_context("forkserver")
        module = getattr(getattr(fn, "func", fn), "__module__", None)
        if module:  # imported once by the fork server (when it starts), not again by every worker
            context.set_forkserver_preload([module])
        pool = ProcessPoolExecutor(count, mp_context=context)
        try:
            yield from pool.map(fn, items)
        finally:
            pool.shutdown(wait=True, cancel_futures=True)

    return run
