"""How sizes and times read to a person: IEC units, local time with its zone."""

from __future__ import annotations

import time

IEC_UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")


def iec(n: float) -> str:
    """``1536`` -> ``1.5 KiB``; whole bytes below 1 KiB."""
    for unit in IEC_UNITS:
        if abs(n) < 1024 or unit == IEC_UNITS[-1]:
            return f"{int(n)} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def local_time(timestamp: float) -> str:
    """A Unix time as local time with its zone: ``2025-01-31 14:02:11 CET``."""
    return time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(timestamp))
