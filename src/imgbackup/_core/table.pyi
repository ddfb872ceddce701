"""Type stubs for the native sorted-table kernels (see table.pyx; references in tableref.py)."""

import numpy as np
import numpy.typing as npt

def table_sort(rows: npt.NDArray[np.uint8]) -> None:
    """Sort (n, stride) rows in place by their 32-byte id (48-byte chunk rows: by preference too)."""

def table_partition(rows: npt.NDArray[np.uint8]) -> npt.NDArray[np.int64]:
    """Group rows by the id's first byte in place; the 257 group boundaries."""

def directory_bits(n: int) -> int:
    """Prefix bits of a directory for ``n`` rows (about 8 rows per entry)."""

def table_directory(rows: npt.NDArray[np.uint8], bits: int) -> npt.NDArray[np.uint32]:
    """First row of each ``bits``-bit id prefix (2^bits + 1 entries) of sorted rows."""

def table_lookup(rows: npt.NDArray[np.uint8], directory: npt.NDArray[np.uint32],
                 ids: npt.NDArray[np.uint8]) -> npt.NDArray[np.int64]:
    """The first row of each id in sorted rows, or -1."""

def table_dedup(rows: npt.NDArray[np.uint8]) -> tuple[int, npt.NDArray[np.uint8]]:
    """Keep the first row of each id in place; (rows kept, the other rows)."""

def table_compact(rows: npt.NDArray[np.uint8], keep: npt.NDArray[np.uint8]) -> int:
    """Move the rows flagged in ``keep`` to the front in order; their count."""

def table_merge(rows: npt.NDArray[np.uint8], used: int, more: npt.NDArray[np.uint8]) -> int:
    """Merge sorted ``more`` into the sorted first ``used`` rows (room after them); rows now used."""

def table_scatter(rows: npt.NDArray[np.uint8], out: npt.NDArray[np.uint8], fill: npt.NDArray[np.int64],
                  capacity: int, pack_offset: int, spill: npt.NDArray[np.uint8]) -> int:
    """Copy rows into 256 buckets of ``out`` by first id byte (48-byte rows: pack number + offset);
    rows of a full bucket go to ``spill``; how many did."""

def table_close_buckets(rows: npt.NDArray[np.uint8], fill: npt.NDArray[np.int64], capacity: int) -> int:
    """Move 256 scattered buckets together in order (spare room given back to the system); rows used."""
