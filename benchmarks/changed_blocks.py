"""Writes the bytes of a disk that a change list names (``OFFSET LENGTH`` per line) to stdout.

    python3 benchmarks/changed_blocks.py DISK CHANGES | zstd -3 -c > true-change.zst

The compressed size of that stream is the true change the issue compares incremental backups with:
the zstd-compressed 4 KiB blocks that differ between the two states, without any chunking.
"""

from __future__ import annotations

import os
import sys


def main(disk: str, changes: str) -> None:
    out = sys.stdout.buffer
    with open(disk, "rb") as f, open(changes) as lines:
        for line in lines:
            if not line.strip() or line.startswith("#"):
                continue
            offset, length = (int(x) for x in line.split()[:2])
            while length:
                piece = os.pread(f.fileno(), min(length, 8 << 20), offset)
                if not piece:
                    raise SystemExit(f"{disk} ends before {offset}")
                out.write(piece)
                offset += len(piece)
                length -= len(piece)


if __name__ == "__main__":
    main(*sys.argv[1:3])
