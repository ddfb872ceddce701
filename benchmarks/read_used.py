"""The read ceiling of a used-block backup: read cold exactly the byte ranges imgbackup reads.

    python benchmarks/read_used.py DISK

Uses imgbackup's own used-block map and read plan (the slots an image of DISK must read, merged
into ranges), then reads them in 8 MiB pieces into one reused buffer and discards them: the time
an incremental by hash cannot beat, since it must read (and hash) every used block.
"""

from __future__ import annotations

import os
import sys

from imgbackup.device.source import alloc_buffer, open_source
from imgbackup.engine.backup.plan import plan_reads

CHUNK = 1 << 20      # the repository default: the read plan's granularity
PIECE = 8 << 20      # the backup's segment size


def main(path: str) -> None:
    total = 0
    with open_source(path) as src:
        plan = plan_reads(src, path, CHUNK, None, False, None)
        buf = memoryview(alloc_buffer(PIECE))
        for start, length in plan.ranges(CHUNK, src.size):
            pos, end = start, start + length
            while pos < end:
                n = min(PIECE, end - pos)
                total += src.read_into(pos, buf[:n])
                pos += n
    print(total, file=sys.stderr)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else os.devnull)
