"""Sizes as people read them, for messages from any layer (the CLI has its own column formats)."""

from __future__ import annotations


def iec(n: int | float) -> str:
    """'1.5 MiB', '512 B'."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{int(value)} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"
