"""Throughput of the native kernels against plain Python/numpy baselines (run by hand, not a test).

    python benchmarks/bench_kernels.py [--mib 64] [--repeat 3]

scan_chunks is measured on a buffer of all-data, all-zero and half-zero 1 MiB chunks with
1 and 2 threads, against a loop of ``piece == zeros`` + ``hmac.digest``. The bitmap kernels run
on a 2^28-bit bitmap (a 1 TiB disk at 4 KiB blocks) shaped like a filesystem: used extents of
random length between free gaps. Prints a table, then one JSON line with every number.
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import json
import os
import time
from collections.abc import Callable

import numpy as np

from imgbackup._core import bitmap, scan

KEY = os.urandom(32)
CHUNK = 1 << 20


def best_seconds(fn: Callable[[], object], repeat: int) -> float:
    """Fastest of ``repeat`` runs: the least disturbed by other work on the machine."""
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def python_scan(buf: bytes, chunk_size: int, key: bytes) -> list[bytes | None]:
    """The obvious Python loop a kernel has to beat: compare to zeros, else hmac.digest."""
    zeros = bytes(chunk_size)
    mv = memoryview(buf)
    out: list[bytes | None] = []
    for off in range(0, len(mv), chunk_size):
        piece = mv[off:off + chunk_size]
        if piece.nbytes == chunk_size and piece.tobytes() == zeros:  # copy + memcmp: fast in CPython
            out.append(None)
        else:
            out.append(hmac.digest(key, piece, hashlib.sha256))
    return out


def real_zeros(size: int) -> np.ndarray:
    """Zeros in written pages: bytes(n) and np.zeros map the shared zero page, which stays in cache."""
    arr = np.empty(size, dtype=np.uint8)
    arr.fill(0)
    return arr


def scan_buffers(mib: int) -> dict[str, np.ndarray]:
    data = np.frombuffer(os.urandom(mib << 20), dtype=np.uint8).copy()
    mixed = data.copy()
    for off in range(0, len(mixed), 2 * CHUNK):
        mixed[off:off + CHUNK] = 0
    return {"data": data, "zero": real_zeros(mib << 20), "mixed": mixed}


def bench_scan(mib: int, repeat: int) -> list[tuple[str, float]]:
    rows = []
    for name, buf in scan_buffers(mib).items():
        size = buf.nbytes
        for threads in (1, 2):
            sec = best_seconds(lambda b=buf, t=threads: scan.scan_chunks(b, CHUNK, KEY, nthreads=t), repeat)
            rows.append((f"scan_chunks {name:5s} {threads}T", size / sec))
        sec = best_seconds(lambda b=buf: python_scan(b, CHUNK, KEY), repeat)
        rows.append((f"python loop {name:5s} 1T", size / sec))
    zeros = real_zeros(mib << 20)
    sec = best_seconds(lambda: scan.zero_blocks(zeros, 4096), repeat)
    rows.append(("zero_blocks zero  4K", zeros.nbytes / sec))
    return rows


def fs_like_bitmap(nbits: int, seed: int = 1) -> np.ndarray:
    """Used extents (1..4096 blocks) separated by free gaps (1..4096 blocks), about half used."""
    rng = np.random.default_rng(seed)
    bits = np.zeros((nbits + 7) >> 3, dtype=np.uint8)
    lengths = rng.integers(1, 4097, size=2 * (nbits // 2048) + 2)
    edges = np.cumsum(lengths)
    edges = edges[edges < nbits]
    for start, end in zip(edges[0::2], edges[1::2], strict=False):
        bitmap.set_range(bits, int(start), int(end - start))
    return bits


def bench_bitmap(repeat: int) -> list[tuple[str, float]]:
    nbits = 1 << 28
    bits = fs_like_bitmap(nbits)
    size = bits.nbytes
    cases: list[tuple[str, Callable[[], object]]] = [
        ("count", lambda: bitmap.count(bits, nbits)),
        ("numpy unpackbits().sum()", lambda: int(np.unpackbits(bits).sum())),
        ("coarsen x256", lambda: bitmap.coarsen(bits, nbits, 256)),
        ("coarsen x1", lambda: bitmap.coarsen(bits, nbits, 1)),
        ("runs", lambda: bitmap.runs(bits, nbits)),
        ("set_range all", lambda: bitmap.set_range(bits.copy(), 3, nbits - 6)),
    ]
    return [(f"bitmap {name}", size / best_seconds(fn, repeat)) for name, fn in cases]


def _numpy_clear_range(bits: np.ndarray, start: int, count: int) -> None:
    """The numpy slice version fsmap used before the native clear_range (the baseline)."""
    end = start + count
    first, last = start >> 3, (end - 1) >> 3
    lo, hi = (0xFF << (start & 7)) & 0xFF, 0xFF >> (7 - ((end - 1) & 7))
    if first == last:
        bits[first] &= ~(lo & hi) & 0xFF
        return
    bits[first] &= ~lo & 0xFF
    bits[first + 1:last] = 0
    bits[last] &= ~hi & 0xFF


def bench_ranges(repeat: int, n: int = 65536) -> list[tuple[str, float]]:
    """Many small clear_range calls, as fsmap makes clearing a filesystem's free runs: calls/s."""
    nbits = 1 << 28
    rng = np.random.default_rng(3)
    pairs = list(zip(np.sort(rng.integers(0, nbits - 5000, n)).tolist(), rng.integers(1, 4000, n).tolist(),
                     strict=True))
    bits = np.full(nbits >> 3, 0xFF, dtype=np.uint8)

    def calls(fn: Callable[[np.ndarray, int, int], None]) -> Callable[[], None]:
        def go() -> None:
            b = bits.copy()
            for start, count in pairs:
                fn(b, start, count)
        return go

    return [(f"bitmap {name} ({n} ranges)", n / best_seconds(calls(fn), repeat))
            for name, fn in (("clear_range", bitmap.clear_range), ("numpy slice clear_range", _numpy_clear_range))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mib", type=int, default=64, help="scan buffer size in MiB (default 64)")
    ap.add_argument("--repeat", type=int, default=3, help="runs per case; the best counts (default 3)")
    args = ap.parse_args()
    rows = bench_scan(args.mib, args.repeat) + bench_bitmap(args.repeat)
    ranges = bench_ranges(args.repeat)
    print(f"{'kernel':48s} {'GB/s':>9s}")
    for name, rate in rows:
        print(f"{name:48s} {rate / 1e9:9.2f}")
    for name, rate in ranges:
        print(f"{name:48s} {1e6 / rate:6.2f} us per call")
    print(json.dumps({"cpus": os.cpu_count(), "scan_mib": args.mib, "bitmap_bits": 1 << 28,
                      "gb_per_s": {name: round(rate / 1e9, 3) for name, rate in rows},
                      "us_per_call": {name: round(1e6 / rate, 3) for name, rate in ranges}}))


if __name__ == "__main__":
    main()
