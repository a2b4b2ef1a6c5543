"""Worker processes for the data generators: the worker count, and an ordered map over a process pool.

The generators make their output independent of the number of workers by seeding each unit of work (a
ListOps batch, a Pathfinder image) from ``(seed, index)`` and consuming the results in index order; the pool
here only decides where the work runs.

Workers are forked from a ``forkserver`` that has imported the generator modules once (``spawn`` where
there is no forkserver, as on Windows): unlike ``fork``, this is safe with torch and its threads loaded in
the caller, and unlike ``spawn`` it does not import torch again in every worker (seconds each). Starting
the server still takes a few seconds, once per process, so the generators keep short jobs in the calling
process (:data:`MIN_PARALLEL_SECONDS`).
"""

from __future__ import annotations

import multiprocessing
import os
import sys
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from typing import Any

from .._checks import check_int

__all__ = ["MIN_PARALLEL_SECONDS", "available_cores", "ordered_map", "resolve_workers"]

MIN_PARALLEL_SECONDS = 5.0
"""A generator starts worker processes only when the rest of its job would take longer than this here
(estimated from its first unit of work)."""

_PRELOAD = ["ssm.data.listops", "ssm.data.pathfinder"]


def available_cores() -> int:
    """The cores this process may run on (``os.sched_getaffinity``, else ``os.cpu_count()``)."""
    try:
        return max(len(os.sched_getaffinity(0)), 1)
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def resolve_workers(workers: int | None) -> int:
    """``workers`` checked (an integer >= 1), or :func:`available_cores` for ``None``."""
    if workers is None:
        return available_cores()
    return check_int("workers", workers, minimum=1)


def _context() -> multiprocessing.context.BaseContext:
    if "forkserver" in multiprocessing.get_all_start_methods():
        ctx = multiprocessing.get_context("forkserver")
        # Used when this process starts its forkserver. A worker runs the caller's __main__ again (as
        # __mp_main__); under `python -m ssm.data.listops` that module must not be preloaded too.
        main = getattr(getattr(sys.modules.get("__main__"), "__spec__", None), "name", None)
        ctx.set_forkserver_preload([name for name in _PRELOAD if name != main])
        return ctx
    return multiprocessing.get_context("spawn")


def ordered_map(
    fn: Callable[..., Any], tasks: Iterable[tuple], workers: int, *, ahead: int | None = None
) -> Iterator[Any]:
    """Yield ``fn(*task)`` for each task, in task order.

    With ``workers == 1`` everything runs here, lazily. Otherwise ``fn`` runs in a pool of ``workers``
    processes (``fn`` and the tasks must be picklable), with at most ``ahead`` (default
    ``2 * workers``) tasks submitted and not yet yielded, so ``tasks`` may be endless. Closing the iterator
    early (``contextlib.closing``, or ``break`` in a ``for`` loop over it) cancels the tasks not yet started
    and waits for the running ones. An exception raised by ``fn`` is raised here, at its task's turn.
    """
    if workers == 1:
        for task in tasks:
            yield fn(*task)
        return
    ahead = 2 * workers if ahead is None else check_int("ahead", ahead, minimum=1)
    todo = iter(tasks)
    with ProcessPoolExecutor(max_workers=workers, mp_context=_context()) as pool:
        pending: deque = deque()
        try:
            for task in todo:
                pending.append(pool.submit(fn, *task))
                if len(pending) == ahead:
                    break
            while pending:
                result = pending.popleft().result()
                for task in todo:
                    pending.append(pool.submit(fn, *task))
                    break
                yield result
        finally:
            for future in pending:
                future.cancel()
