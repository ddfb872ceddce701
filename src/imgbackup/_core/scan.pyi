"""Type stubs for the native scan kernels (see scan.pyx and reference.py for the definitions)."""

import numpy as np
import numpy.typing as npt
from typing_extensions import Buffer

ZERO: int
DATA: int
ID_SIZE: int
KEY_SIZE: int

def chunk_id(key: Buffer, data: Buffer) -> bytes:
    """The keyed chunk id: keyed BLAKE3 (32-byte key), 32 bytes; the hash runs without the GIL."""

def scan_chunks(
    buf: Buffer, chunk_size: int, key: Buffer, *, nthreads: int = 0
) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.uint8]]:
    """Kinds (ZERO/DATA, (n,)) and ids ((n, 32), zero for ZERO) per chunk; nthreads 0 = all usable CPUs."""

def zero_blocks(buf: Buffer, block_size: int = 4096) -> npt.NDArray[np.uint8]:
    """1 for each all-zero block of ``block_size`` bytes (last may be short), else 0."""

def classify_chunks(buf: Buffer, chunk_size: int, *, nthreads: int = 1) -> npt.NDArray[np.uint8]:
    """ZERO or DATA per chunk of ``chunk_size`` (last may be short), without the GIL."""
