"""Stale signatures: what an earlier partition table or filesystem left where a restore writes nothing.

A restore writes the image's bytes (data, and zeros where the image has none) over its own
range of the target, but a larger disk keeps its old content past that range: the backup GPT in
the last sectors (``sgdisk`` then "regenerates" the old table from it), RAID and ZFS labels at the
end, and superblocks at the old partitions' starts, which ``blkid``/``wipefs`` find as soon as
a partition is made there again. So before the table is fitted, the signature areas — the first
and last ``SIGNATURE_AREA`` bytes of the target, of every partition of its current tables (the
MBR and both GPT copies) and of every partition of the restored table — are zeroed wherever
the restore does not write them and they are not zero already. ``--dry-run`` lists them.

Regular files need nothing: a restore empties them first (a ``--delta`` restore keeps them and
is handled like a disk).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from imgbackup.disklabel import Partition, read_partition_table
from imgbackup.disklabel.gpt import read_gpt
from imgbackup.errors import ImgBackupError

if TYPE_CHECKING:
    from imgbackup.engine.restore.plan import DiskPlan

SIGNATURE_AREA = 1 << 20    # covers what probes read near a start (btrfs 64 KiB, ZFS L0/L1 512 KiB) and an
                            # end (backup GPT 33 sectors, md 0.90/1.0 superblocks, ZFS L2/L3 512 KiB)
GPT_ENTRY_ARRAY = 16384     # a standard GPT's 128 entries of 128 bytes: the backup copy's size with its header
READ_BLOCK = 1 << 20


def _written(plan: DiskPlan) -> list[tuple[int, int]]:
    """Target byte ranges [a, b) the restore writes in full (data or zeros) before the table."""
    fit = plan.fit
    if plan.delta:  # every chunk of the image range is rewritten, zeroed or already equal to the image
        return [(0, plan.image.size)]
    lo, hi = fit.window
    spans = [(lo - fit.shift, hi - fit.shift)]
    if fit.fs_shrink:
        start, _, new_len = fit.fs_shrink
        spans.append((start - fit.shift, start - fit.shift + new_len))
    if fit.relocate and plan.mode == "disk" and plan.table_kind == "gpt":
        ss = plan.sector_size
        spans.append((plan.disk_size - (-(-GPT_ENTRY_ARRAY // ss) + 1) * ss, plan.disk_size))
    return [(a, b) for a, b in spans if b > a]


def _old_partitions(fd: int, size: int, ss: int) -> list[Partition]:
    """Partitions of the target's current tables: the one in use and any GPT copy beside an MBR."""
    def read(offset: int, length: int) -> bytes:
        return os.pread(fd, length, offset) if 0 <= offset < size else b""

    found: dict[tuple[int, int], Partition] = {}
    for reader in (read_partition_table, read_gpt):
        try:
            table = reader(read, size, ss)
        except (ImgBackupError, OSError, ValueError):
            continue   # unreadable or nonsense: the disk's own start and end are still cleared
        for p in table.partitions if table else []:
            found.setdefault((p.start, p.end), p)
    return sorted(found.values(), key=lambda p: p.start)


def _areas(plan: DiskPlan, old: list[Partition]) -> list[tuple[int, int, str]]:
    size = plan.disk_size
    areas = [(0, SIGNATURE_AREA, "start of the disk"),
             (size - SIGNATURE_AREA, size, "end of the disk: backup GPT, RAID and ZFS labels")]
    for kind, parts in (("old partition", [(p.number, p.start, p.end) for p in old]),
                        ("partition", [(p["number"], p["start"], p["end"]) for p in plan.fit.partitions])):
        for number, start, end in parts:
            areas.append((start, min(end, start + SIGNATURE_AREA), f"start of {kind} {number}"))
            areas.append((max(start, end - SIGNATURE_AREA), end, f"end of {kind} {number}"))
    return [(max(a, 0), min(b, size), what) for a, b, what in areas if min(b, size) > max(a, 0)]


def _subtract(a: int, b: int, covered: list[tuple[int, int]]) -> list[tuple[int, int]]:
    pieces = [(a, b)]
    for c, d in covered:
        pieces = [piece for x, y in pieces for piece in ((x, min(y, c)), (max(x, d), y)) if piece[1] > piece[0]]
    return pieces


def _merge(areas: list[tuple[int, int, str]]) -> list[tuple[int, int, list[str]]]:
    merged: list[tuple[int, int, list[str]]] = []
    for a, b, what in sorted(areas):
        if merged and a <= merged[-1][1]:
            last = merged[-1]
            merged[-1] = (last[0], max(last[1], b), last[2] + ([what] if what not in last[2] else []))
        else:
            merged.append((a, b, [what]))
    return merged


def _nonzero(fd: int, a: int, b: int) -> bool:
    pos = a
    while pos < b:
        block = os.pread(fd, min(READ_BLOCK, b - pos), pos)
        if not block:
            return False
        if block.count(0) != len(block):
            return True
        pos += len(block)
    return False


def find_stale(plan: DiskPlan) -> list[dict]:
    """The signature areas the restore would leave as they are, and which are not zero now.

    Each is ``{"what", "offset", "length"}`` (target bytes), in disk order.
    """
    target = plan.target
    if not target.exists or not (target.is_block_device or plan.delta):
        return []
    fd = os.open(target.path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        current = min(plan.disk_size, os.lseek(fd, 0, os.SEEK_END))
        old = _old_partitions(fd, current, plan.sector_size)
        covered = _written(plan)
        pieces = [(x, y, what) for a, b, what in _areas(plan, old) for x, y in _subtract(a, b, covered)]
        return [{"what": "stale signatures cleared (" + "; ".join(whats) + ")", "offset": a, "length": b - a}
                for a, b, whats in _merge(pieces) if a < current and _nonzero(fd, a, min(b, current))]
    finally:
        os.close(fd)
