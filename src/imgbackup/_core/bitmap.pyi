"""Type stubs for the native bitmap kernels over packed LSB-first bit arrays (see bitmap.pyx)."""

import numpy as np
import numpy.typing as npt
from typing_extensions import Buffer

def count(bits: Buffer, nbits: int) -> int:
    """Number of set bits among the first ``nbits``."""

def coarsen(bits: Buffer, nbits: int, factor: int) -> npt.NDArray[np.uint8]:
    """OR-reduce groups of ``factor`` bits (a partial last group counts): fine -> coarse blocks."""

def runs(bits: Buffer, nbits: int) -> npt.NDArray[np.int64]:
    """Runs of set bits as an int64 array of shape (k, 2): (first bit, length)."""

def set_range(bits: npt.NDArray[np.uint8] | bytearray, start: int, length: int) -> None:
    """Set bits [start, start+length) in place; IndexError (nothing changed) past the end."""

def clear_range(bits: npt.NDArray[np.uint8] | bytearray, start: int, length: int) -> None:
    """Clear bits [start, start+length) in place; IndexError (nothing changed) past the end."""
