"""Bare-metal restore: an image onto a whole disk of any size, or one partition onto a target.

The plan is made (and every refusal raised) before the target is opened: the image's partition
table is rewritten in memory for the new disk (``relocate_gpt`` / ``resize_mbr``), which proves it
fits and gives the resulting table for ``--dry-run``. ``run.py`` carries the plan out.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import NamedTuple

import numpy as np

from imgbackup.device.identity import identify
from imgbackup.disklabel import Partition, PartitionTable, read_partition_table
from imgbackup.disklabel.relocate import relocate_gpt, resize_mbr
from imgbackup.engine.imageview import ImageView
from imgbackup.engine.restore.stale import find_stale
from imgbackup.engine.restore.target import Target, inspect_target, logical_sector_size
from imgbackup.errors import TargetRefused
from imgbackup.format.imageindex import ImageIndex, bad_ranges
from imgbackup.repository.repo import Repository

MIB = 1 << 20
GPT_TAIL_SECTORS = 33          # backup entry array (32 sectors of 128 x 128 bytes) + backup header
EXT_MAGIC_OFFSET = 1024 + 56


@dataclass(frozen=True)
class Fit:
    """How the image fits the target, decided (with every refusal) before anything is written.

    ``window`` is the image byte range written verbatim at target offset - ``shift``;
    ``partitions`` is the table as it will be on the target; ``relocate``: the table is rewritten
    for the disk, ``last_end_lba`` the last partition's new end when it shrinks; ``fs_shrink`` =
    (image offset, image length, new length) of the ext filesystem resize2fs shrinks;
    ``grow_range`` = (target offset, length) of the filesystem grown after writing.
    """

    window: tuple[int, int]
    shift: int = 0
    partitions: list[dict] = field(default_factory=list)
    relocate: bool = False
    last_end_lba: int | None = None
    fs_shrink: tuple[int, int, int] | None = None
    grow_range: tuple[int, int] | None = None
    warnings: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class DiskPlan:
    """What a restore will do: the request, the target and the fit, made in one place by
    ``plan_disk_restore`` / ``plan_partition_restore``; the writes follow from them."""

    image: ImageIndex
    target: Target
    disk_size: int
    sector_size: int
    table_kind: str | None
    fit: Fit
    mode: str = "disk"
    grow: bool = False
    delta: bool = False
    partition: int | None = None
    stale: list[dict] = field(default_factory=list)     # signature areas to clear (stale.py), found
                                                        # before anything is written: see _with_stale

    @cached_property
    def writes(self) -> list[dict]:
        """What will be written where, in order (``--dry-run`` shows it)."""
        fit = self.fit
        lo, hi = fit.window
        writes = [{"what": "image bytes" + (" that differ (delta)" if self.delta else ""),
                   "offset": lo - fit.shift, "length": hi - lo}]
        if fit.fs_shrink:
            start, _, new_len = fit.fs_shrink
            writes.append({"what": "last partition's ext filesystem, shrunk by resize2fs",
                           "offset": start - fit.shift, "length": new_len})
        if fit.relocate and self.table_kind == "gpt":
            writes.append({"what": "GPT fitted to the disk (primary and backup header, protective MBR)",
                           "offset": 0, "length": self.disk_size})
        if fit.grow_range:
            writes.append({"what": "last partition's filesystem grown by its own tool",
                           "offset": fit.grow_range[0], "length": fit.grow_range[1]})
        return writes + self.stale

    @cached_property
    def bad_ranges(self) -> list[list[int]]:
        """Target byte ranges that restore as zeros because the source could not be read there
        (``backup --rescue``): [offset, length] on the target."""
        fit = self.fit
        if self.mode == "disk":
            lo, hi = 0, self.image.size
        else:
            lo, hi = (fit.fs_shrink[0], fit.fs_shrink[0] + fit.fs_shrink[1]) if fit.fs_shrink else fit.window
        out = []
        for off, length in bad_ranges(self.image.meta):
            a, b = max(off, lo), min(off + length, hi)
            if b > a:
                out.append([a - fit.shift, b - a])
        return out

    @cached_property
    def bytes_to_write(self) -> int:
        """Data bytes the restore reads from the repository and writes (the progress bar's total)."""
        fit = self.fit
        total = _data_bytes(self.image, *fit.window)
        if fit.fs_shrink:
            start, length, _ = fit.fs_shrink
            total += _data_bytes(self.image, start, start + length)
        return total

    def to_dict(self) -> dict:
        return {"image": self.image.id, "image_size": self.image.size, "target": self.target.to_dict(),
                "identity": _identity(self.target),
                "disk_size": self.disk_size, "sector_size": self.sector_size, "mode": self.mode,
                "grow": self.grow, "delta": self.delta, "partition": self.partition,
                "table": self.table_kind, "partitions": self.fit.partitions, "writes": self.writes,
                "bytes_to_write": self.bytes_to_write, "warnings": self.fit.warnings, "bad_ranges": self.bad_ranges}


class _Sizing(NamedTuple):
    """What the sizing decisions depend on (besides the table and the image's bytes)."""

    image: ImageIndex
    path: str            # the target, named in refusals
    disk_size: int
    sector_size: int
    grow: bool


def _identity(target: Target) -> dict:
    """Model, serial and size of a block device target (what a sysadmin checks before overwriting)."""
    if not target.is_block_device:
        return {"kind": "file", "size": target.size}
    ident = identify(target.path)
    return {"kind": ident.kind, "model": ident.model, "serial": ident.serial, "vendor": ident.vendor,
            "size": ident.size, "backing_file": ident.backing_file}


def _part_dict(p: Partition, ss: int) -> dict:
    return {"number": p.number, "start": p.start, "end": p.end, "size": p.size, "start_lba": p.start // ss,
            "end_lba": p.end // ss - 1, "type": p.type_id, "name": p.name}


def _data_bytes(image: ImageIndex, lo: int, hi: int) -> int:
    """Bytes of data slots inside the image byte range [lo, hi)."""
    cs = image.chunk_size
    starts = image.data_slot_numbers().astype(np.int64) * cs
    return int(np.clip(np.minimum(starts + cs, min(hi, image.size)) - np.maximum(starts, lo), 0, None).sum())


def _target_size(target: Target, default: int) -> int:
    """A device's size; an existing non-empty file is a disk of its size; a new file gets ``default``."""
    return target.size if target.is_block_device or target.size > 0 else default


def _open(repo: Repository, image_id: str, target_path: str) -> tuple[ImageIndex, Target, int]:
    image = repo.images.load(image_id)
    target = inspect_target(target_path, 0)
    ss = int(image.meta.get("source", {}).get("logical_sector_size") or 512)
    tss = logical_sector_size(target.path) if target.exists else None
    if tss is not None and tss != ss:
        raise TargetRefused(f"{target.path} has {tss}-byte sectors, the image was made with {ss}-byte sectors")
    return image, target, ss


def plan_disk_restore(repo: Repository, image_id: str, target_path: str, grow: bool = False,
                      delta: bool = False) -> DiskPlan:
    """Plan a whole-disk restore onto ``target_path``; TargetRefused when it cannot work."""
    image, target, ss = _open(repo, image_id, target_path)
    disk = _target_size(target, image.size)
    sizing = _Sizing(image, target.path, disk, ss, grow)
    with ImageView(repo, image) as view:
        table = read_partition_table(view.read, image.size, ss)
        fit = _fit_table(sizing, table, view) if table and table.partitions else _fit_plain(sizing)
    if delta and (disk < image.size or fit.fs_shrink):
        raise TargetRefused("--delta needs a target at least as large as the image (no shrink)")
    return _with_stale(DiskPlan(image, target, disk, ss, table.kind if table else None, fit, grow=grow, delta=delta))


def _fit_plain(s: _Sizing) -> Fit:
    """No partition table: the image fits when no data lies past the disk's end."""
    image = s.image
    data = image.data_slot_numbers()
    end = 0 if len(data) == 0 else min(int(data[-1] + 1) * image.chunk_size, image.size)
    if s.disk_size < end:
        raise TargetRefused(f"target {s.path} is too small: {s.disk_size} bytes, "
                            f"the image has data up to byte {end}: {end} bytes needed")
    warnings = ["no partition table: nothing to grow"] if s.grow else []
    return Fit((0, min(s.disk_size, image.size)), warnings=warnings)


def _new_limit_lba(s: _Sizing, kind: str) -> int:
    sectors = s.disk_size // s.sector_size
    return sectors - 1 - GPT_TAIL_SECTORS if kind == "gpt" else min(sectors, 1 << 32) - 1


def _fit_table(s: _Sizing, table: PartitionTable, view: ImageView) -> Fit:
    """Partitions before the last must fit as they are; the last shrinks (ext only) or may grow."""
    image, ss = s.image, s.sector_size
    tail = GPT_TAIL_SECTORS * ss if table.kind == "gpt" else 0
    last = max(table.partitions, key=lambda p: p.end)
    limit = _new_limit_lba(s, table.kind)
    for p in table.partitions:
        if p is not last and p.end // ss - 1 > limit:
            raise TargetRefused(f"target {s.path} is too small: partition {p.number} ends at byte "
                                f"{p.end}: {p.end + tail} bytes needed")
    _refuse_data_after(s, table, last.end, tail, view)
    window, fs_shrink, end_lba = (0, min(s.disk_size, image.size)), None, None
    if last.end // ss - 1 > limit:
        end_lba, new_len = _shrunk_end(s, table, last, limit, view)
        window, fs_shrink = (0, last.start), (last.start, last.size, new_len)
    grow = end_lba is None and s.grow and s.disk_size > image.size
    relocate = s.disk_size != image.size or end_lba is not None
    new_table = _rewritten_table(s, table, view, grow, end_lba) if relocate else table
    grow_range, warnings = None, []
    if grow:
        new_last = max(new_table.partitions, key=lambda p: p.end)
        if new_last.end > last.end:
            grow_range = (new_last.start, new_last.size)
        else:
            warnings.append("the last partition already ends at the disk's end: nothing to grow")
    return Fit(window, 0, [_part_dict(p, ss) for p in new_table.partitions], relocate, end_lba, fs_shrink,
               grow_range, warnings)


def _refuse_data_after(s: _Sizing, table: PartitionTable, last_end: int, tail: int, view: ImageView) -> None:
    """Data after the last partition (other than the table's own backup copy) must fit the disk.

    Slots are chunk-sized, so a slot holding the backup GPT is read and its other bytes checked.
    """
    image = s.image
    cs, room = image.chunk_size, s.disk_size - tail
    if s.disk_size >= image.size:
        return
    meta = [(o, o + n) for o, n in table.metadata_extents if o >= last_end]
    for slot in image.data_slot_numbers():
        lo, hi = max(int(slot) * cs, last_end, room), min((int(slot) + 1) * cs, image.size)
        if hi <= lo:
            continue
        data = bytearray(view.read(lo, hi - lo))
        for a, b in meta:
            a, b = max(a, lo), min(b, hi)
            if b > a:
                data[a - lo:b - lo] = bytes(b - a)
        used = len(data.rstrip(b"\0"))
        if used:
            raise TargetRefused(f"target {s.path} is too small: the image has data up to byte "
                                f"{lo + used} after the last partition: {lo + used + tail} bytes needed")


def _shrunk_end(s: _Sizing, table: PartitionTable, last: Partition, limit: int,
                view: ImageView) -> tuple[int, int]:
    """The last partition must shrink: only ext can, by resize2fs; its new end LBA and byte length."""
    ss = s.sector_size
    per_mib = max(1, MIB // ss)
    end_lba = (limit + 1) // per_mib * per_mib - 1
    new_len = (end_lba + 1) * ss - last.start
    tail = GPT_TAIL_SECTORS * ss if table.kind == "gpt" else 0
    if new_len <= 0:
        raise TargetRefused(f"target {s.path} is too small: partition {last.number} starts at byte "
                            f"{last.start}")
    _check_shrinkable(s, last.start, last.size, new_len, view, last.start + MIB + tail)
    return end_lba, new_len


def _check_shrinkable(s: _Sizing, start: int, size: int, new_len: int, view: ImageView, overhead: int) -> None:
    """Refuse non-ext filesystems, and ext ones whose used blocks cannot fit (used-map estimate)."""
    if view.read(start + EXT_MAGIC_OFFSET, 2) != b"\x53\xef":
        raise TargetRefused(f"target {s.path} is smaller than the image and the partition at byte "
                            f"{start} holds no ext filesystem: only ext2/3/4 can be shrunk (resize2fs); "
                            f"{start + size} bytes needed")
    for region in s.image.meta.get("used_map", {}).get("regions", []):
        if region.get("start") == start and region.get("mode") == "bitmap":
            used = int(region.get("used_bytes") or 0)
            if used > new_len:
                raise TargetRefused(f"target {s.path} is too small: the filesystem uses {used} bytes, "
                                    f"about {overhead + used} bytes needed")


def _rewritten_table(s: _Sizing, table: PartitionTable, view: ImageView, grow: bool,
                     end_lba: int | None) -> PartitionTable:
    """The table as it will be on the target, made in memory; ValueError becomes a refusal."""
    ss, image = s.sector_size, s.image
    old, new = image.size // ss, s.disk_size // ss
    pieces: dict[int, bytes] = {}
    try:
        if table.kind == "gpt":
            region = (table.first_usable_lba or 34) * ss
            rw = relocate_gpt(view.read(0, region), old, new, ss, grow, end_lba)
            pieces = {0: rw.primary, rw.backup_entries_offset: rw.backup}
        elif grow or end_lba is not None:
            rw = resize_mbr(view.read(0, 512), old, new, ss, grow, end_lba)
            pieces = {0: rw.mbr}
    except ValueError as exc:
        raise TargetRefused(f"the partition table cannot be fitted to {s.path}: {exc}") from None

    def read(offset: int, length: int) -> bytes:
        for at, data in pieces.items():
            if at <= offset and offset + length <= at + len(data):
                return data[offset - at:offset - at + length]
        return view.read(offset, length) if offset + length <= image.size else bytes(length)

    new_table = read_partition_table(read, s.disk_size, ss)
    if new_table is None:
        raise TargetRefused("the rewritten partition table does not read back (a bug: please report it)")
    return new_table


def plan_partition_restore(repo: Repository, image_id: str, number: int, target_path: str,
                           grow: bool = False) -> DiskPlan:
    """Plan restoring partition ``number`` of the image onto a partition, a disk or a file."""
    image, target, ss = _open(repo, image_id, target_path)
    with ImageView(repo, image) as view:
        table = read_partition_table(view.read, image.size, ss)
        parts = {p.number: p for p in table.partitions} if table else {}
        if number not in parts:
            raise TargetRefused(f"image {image.id[:12]} has no partition {number} (it has: "
                                f"{', '.join(map(str, sorted(parts))) or 'none'})")
        part = parts[number]
        size = _target_size(target, part.size)
        partitions = [_part_dict(Partition(number, 0, min(size, part.size), part.type_id, part.name), ss)]
        if size < part.size:
            new_len = size // 4096 * 4096
            _check_shrinkable(_Sizing(image, target.path, size, ss, grow), part.start, part.size, new_len, view, 0)
            fit = Fit((part.start, part.start), part.start, partitions,
                      fs_shrink=(part.start, part.size, new_len))
        else:
            fit = Fit((part.start, part.end), part.start, partitions,
                      grow_range=(0, size) if grow and size > part.size else None)
    return _with_stale(DiskPlan(image, target, size, ss, table.kind, fit, mode="partition", grow=grow,
                                partition=number))


def _with_stale(plan: DiskPlan) -> DiskPlan:
    """The plan with the stale signature areas of the target as it is now: once the image's bytes
    are written, its old tables (which say where the old partitions were) are gone."""
    return replace(plan, stale=find_stale(plan))
