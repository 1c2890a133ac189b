"""How many torch threads a training loop should use.

A step of a small problem (176 channels, a few variants) is a few million FLOP: splitting each op over
threads costs a synchronisation per op, and when another process keeps the cores busy every op waits
for the slowest thread (measured: a 31k-element vdot took 13 ms with two busy processes on 2 cores).
One thread is then faster and degrades gracefully under contention; large problems use every core.
Several independent problems of that size (the classes of Protocol A) are better spread over the cores
one problem per thread (:func:`split_threads`): no op then waits for another core, so a busy core slows
only the problem running on it.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from typing import TypeVar

import torch

T = TypeVar("T")
R = TypeVar("R")

PARALLEL_FLOP = 2e8  # below this many FLOP per step, one thread wins on a loaded CPU


def threads_for(flop_per_step: float, device: str = "cpu") -> int:
    """Torch threads for a loop whose steps cost ``flop_per_step``: 1 for small steps, every core otherwise."""
    cores = os.cpu_count() or 1
    if device != "cpu":
        return cores  # the work is on the accelerator; host threads only feed it
    return 1 if flop_per_step < PARALLEL_FLOP else cores


def split_threads(total: int, tasks: int) -> tuple[int, int]:
    """Spread ``total`` threads over ``tasks`` independent loops: (loops run at once, torch threads each).

    Whole loops run side by side first (1 thread each, up to ``tasks`` of them); only threads left over go
    into each loop's ops.
    """
    workers = max(1, min(total, tasks))
    return workers, max(1, total // workers)


@contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """Run the block with ``count`` intra-op threads, then restore the previous setting."""
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def in_order(work: Callable[[T], R], items: list[T], workers: int) -> Iterator[R]:
    """``work(item)`` of every item, yielded in order; up to ``workers`` run at once on threads (torch ops
    release the GIL), at most that many results wait ahead of the consumer."""
    if workers <= 1:
        yield from map(work, items)
        return
    with ThreadPoolExecutor(workers, thread_name_prefix="polarocc-fit") as pool:
        pending: deque[Future[R]] = deque(pool.submit(work, item) for item in items[:workers])
        upcoming = iter(items[workers:])
        try:
            while pending:
                result = pending.popleft().result()
                for item in upcoming:
                    pending.append(pool.submit(work, item))
                    break
                yield result
        finally:  # an error or an abandoned generator: drop what has not started
            for future in pending:
                future.cancel()
