"""A read-ahead thread over a source: large aligned segments from a fixed pool of buffers.

Memory is fixed: ``buffers`` page-aligned buffers of one segment each, reused for the whole run
(fresh buffers per segment cost a page fault per 4 KiB, about a second of system time per
1.6 GB here). The consumer hands each segment back with ``release`` once it no longer needs it.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass

from imgbackup.device.source import Source, SourceReadError, alloc_buffer
from imgbackup.engine.backup.rescue import Rescue

_DONE = object()


@dataclass
class Segment:
    offset: int
    data: memoryview   # exactly the bytes read (the last segment may be short)
    buffer: memoryview


class SegmentReader:
    """Reads ``ranges`` (byte offset, length) of a source in order, ``segment_size`` at a time.

    With ``rescue``, a segment whose read fails on the medium is postponed and comes last,
    recovered piece by piece (rescue.py); segments then arrive out of order.
    """

    def __init__(self, source: Source, ranges: list[tuple[int, int]], segment_size: int, buffers: int = 5,
                 rescue: Rescue | None = None) -> None:
        self.source = source
        self.rescue = rescue
        self.ranges = ranges
        self.segment_size = segment_size
        self._queue: queue.Queue = queue.Queue()
        self._free: queue.Queue = queue.Queue()
        self._allocated = 0
        self._max_buffers = max(buffers, 1)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="imgbackup-reader", daemon=True)

    def _take_buffer(self) -> memoryview | None:
        if self._free.empty() and self._allocated < self._max_buffers:
            self._allocated += 1
            return memoryview(alloc_buffer(self.segment_size))
        while not self._stop.is_set():
            try:
                return self._free.get(timeout=0.2)
            except queue.Empty:
                continue
        return None

    def _run(self) -> None:
        postponed: list[tuple[int, int]] = []    # rescue: segments that failed, read again at the end
        try:
            for start, length in self.ranges:
                pos, end = start, start + length
                while pos < end:
                    buf = self._take_buffer()
                    if buf is None:
                        return
                    n = min(self.segment_size, end - pos)
                    try:
                        got = self.source.read_into(pos, buf[:n])
                    except SourceReadError as exc:
                        if self.rescue is None or not exc.media_error:
                            raise
                        postponed.append((pos, n))
                        self._free.put(buf)
                        pos += n
                        continue
                    self._queue.put(Segment(pos, buf[:got], buf))
                    if got < n:
                        return
                    pos += n
            for pos, n in postponed:
                buf = self._take_buffer()
                if buf is None:
                    return
                self.rescue.recover(self.source, pos, buf[:n])
                self._queue.put(Segment(pos, buf[:n], buf))
        except BaseException as exc:  # handed to the consumer, which raises it
            self._queue.put(exc)
        finally:
            self._queue.put(_DONE)

    def release(self, segment: Segment) -> None:
        """Give a segment's buffer back for reuse; its data must not be used afterwards."""
        self._free.put(segment.buffer)

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
