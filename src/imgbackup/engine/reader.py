"""A read-ahead thread over a source: large aligned segments, a bounded queue, fixed memory."""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass

from imgbackup.device.source import Source, alloc_buffer

_DONE = object()


@dataclass
class Segment:
    offset: int
    data: memoryview   # exactly the bytes read (the last segment may be short)


class SegmentReader:
    """Reads ``ranges`` (byte offset, length) of a source in order, ``segment_size`` at a time.

    Memory is bounded: at most ``depth`` segments wait in the queue while one is being consumed.
    """

    def __init__(self, source: Source, ranges: list[tuple[int, int]], segment_size: int, depth: int = 2) -> None:
        self.source = source
        self.ranges = ranges
        self.segment_size = segment_size
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="imgbackup-reader", daemon=True)

    def _run(self) -> None:
        try:
            for start, length in self.ranges:
                pos, end = start, start + length
                while pos < end and not self._stop.is_set():
                    n = min(self.segment_size, end - pos)
                    buf = alloc_buffer(n)
                    view = memoryview(buf)[:n]
                    got = self.source.read_into(pos, view)
                    self._put(Segment(pos, view[:got]))
                    if got < n:
                        return
                    pos += n
        except BaseException as exc:  # handed to the consumer, which raises it
            self._put(exc)
        finally:
            self._put(_DONE)

    def _put(self, item) -> None:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.2)
                return
            except queue.Full:
                continue

    def __iter__(self) -> Iterator[Segment]:
        self._thread.start()
        try:
            while True:
                item = self._queue.get()
                if item is _DONE:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            self.close()

    def close(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
