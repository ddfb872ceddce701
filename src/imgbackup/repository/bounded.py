"""Results of a thread pool taken in order with what is in flight bounded, so a consumer slower than
the pool never holds every result at once (chunk reads, index files, copies)."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

J = TypeVar("J")
T = TypeVar("T")


def bounded_map(pool: ThreadPoolExecutor, fn: Callable[[J], T], jobs: Iterable[J],
                cost: Callable[[J], int], budget: int, max_tasks: int = 64) -> Iterator[T]:
    """``fn`` over ``jobs`` on ``pool``, results in order, with at most ``budget`` (by ``cost``) and
    ``max_tasks`` jobs submitted and not yet consumed. A job larger than the budget runs alone."""
    pending: deque[tuple[Future, int]] = deque()
    held = 0
    try:
        for job in jobs:
            weight = cost(job)
            while pending and (held + weight > budget or len(pending) >= max_tasks):
                fut, w = pending.popleft()
                held -= w
                yield fut.result()
            pending.append((pool.submit(fn, job), weight))
            held += weight
        while pending:
            fut, w = pending.popleft()
            held -= w
            yield fut.result()
    finally:
        for fut, _ in pending:   # the consumer stopped or failed: do not start what is queued
            fut.cancel()
