"""Bare-metal restore: an image onto a whole disk of any size, or one partition onto a target.

The plan is made (and every refusal raised) before the target is opened: the image's partition
table is rewritten in memory for the new disk (``relocate_gpt`` / ``resize_mbr``), which proves it
fits and gives the resulting table for ``--dry-run``. ``run.py`` carries the plan out.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from imgbackup.device.identity import identify
from imgbackup.disklabel import Partition, PartitionTable, read_partition_table
from imgbackup.disklabel.relocate import relocate_gpt, resize_mbr
from imgbackup.engine.imageview import ImageView
from imgbackup.engine.restore.target import Target, inspect_target, logical_sector_size
from imgbackup.errors import TargetRefused
from imgbackup.format.imageindex import ImageIndex
from imgbackup.repository.repo import Repository

MIB = 1 << 20
GPT_TAIL_SECTORS = 33          # backup entry array (32 sectors of 128 x 128 bytes) + backup header
EXT_MAGIC_OFFSET = 1024 + 56


@dataclass
class DiskPlan:
    """What a restore will do. Byte offsets are on the target; ``window`` is an image byte range
    written verbatim at offset - ``shift``; ``fs_shrink`` = (image offset, image length, new length)."""

    image: ImageIndex
    target: Target
    disk_size: int
    sector_size: int
    table_kind: str | None
    partitions: list[dict]
    writes: list[dict]
    bytes_to_write: int
    window: tuple[int, int]
    shift: int = 0
    mode: str = "disk"
    grow: bool = False
    delta: bool = False
    partition: int | None = None
    relocate: bool = False
    last_end_lba: int | None = None
    fs_shrink: tuple[int, int, int] | None = None
    grow_range: tuple[int, int] | None = None
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"image": self.image.id, "image_size": self.image.size, "target": self.target.to_dict(),
                "identity": _identity(self.target),
                "disk_size": self.disk_size, "sector_size": self.sector_size, "mode": self.mode,
                "grow": self.grow, "delta": self.delta, "partition": self.partition,
                "table": self.table_kind, "partitions": self.partitions, "writes": self.writes,
                "bytes_to_write": self.bytes_to_write, "warnings": self.warnings}



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


def _read_table(image: ImageIndex, view: ImageView, ss: int) -> PartitionTable | None:
    return read_partition_table(view.read, image.size, ss)


def plan_disk_restore(repo: Repository, image_id: str, target_path: str, grow: bool = False,
                      delta: bool = False) -> DiskPlan:
    """Plan a whole-disk restore onto ``target_path``; TargetRefused when it cannot work."""
    image, target, ss = _open(repo, image_id, target_path)
    disk = _target_size(target, image.size)
    with ImageView(repo, image) as view:
        table = _read_table(image, view, ss)
        plan = DiskPlan(image, target, disk, ss, table.kind if table else None, [], [], 0,
                        (0, min(disk, image.size)), grow=grow, delta=delta)
        if table is None or not table.partitions:
            _plan_plain(plan)
        else:
            _plan_table(plan, table, view)
    if delta and (disk < image.size or plan.fs_shrink):
        raise TargetRefused("--delta needs a target at least as large as the image (no shrink)")
    _describe_writes(plan)
    return plan


def _plan_plain(plan: DiskPlan) -> None:
    """No partition table: the image fits when no data lies past the disk's end."""
    image = plan.image
    data = image.data_slot_numbers()
    end = 0 if len(data) == 0 else min(int(data[-1] + 1) * image.chunk_size, image.size)
    if plan.disk_size < end:
        raise TargetRefused(f"target {plan.target.path} is too small: {plan.disk_size} bytes, "
                            f"the image has data up to byte {end}: {end} bytes needed")
    if plan.grow:
        plan.warnings.append("no partition table: nothing to grow")


def _new_limit_lba(plan: DiskPlan, kind: str) -> int:
    sectors = plan.disk_size // plan.sector_size
    return sectors - 1 - GPT_TAIL_SECTORS if kind == "gpt" else min(sectors, 1 << 32) - 1


def _plan_table(plan: DiskPlan, table: PartitionTable, view: ImageView) -> None:
    image, ss = plan.image, plan.sector_size
    tail = GPT_TAIL_SECTORS * ss if table.kind == "gpt" else 0
    last = max(table.partitions, key=lambda p: p.end)
    limit = _new_limit_lba(plan, table.kind)
    for p in table.partitions:
        if p is not last and p.end // ss - 1 > limit:
            raise TargetRefused(f"target {plan.target.path} is too small: partition {p.number} ends at byte "
                                f"{p.end}: {p.end + tail} bytes needed")
    _refuse_data_after(plan, table, last.end, tail, view)
    shrink_to = None
    if last.end // ss - 1 > limit:
        shrink_to = _plan_shrink(plan, table, last, limit, view)
    elif plan.grow and plan.disk_size > image.size:
        plan.grow_range = (last.start, 0)    # the end comes from the rewritten table
    plan.relocate = plan.disk_size != image.size or shrink_to is not None
    plan.last_end_lba = shrink_to
    new_table = _rewritten_table(plan, table, view) if plan.relocate else table
    plan.partitions = [_part_dict(p, ss) for p in new_table.partitions]
    if plan.grow_range:
        new_last = max(new_table.partitions, key=lambda p: p.end)
        if new_last.end > last.end:
            plan.grow_range = (new_last.start, new_last.size)
        else:
            plan.grow_range = None
            plan.warnings.append("the last partition already ends at the disk's end: nothing to grow")


def _refuse_data_after(plan: DiskPlan, table: PartitionTable, last_end: int, tail: int, view: ImageView) -> None:
    """Data after the last partition (other than the table's own backup copy) must fit the disk.

    Slots are chunk-sized, so a slot holding the backup GPT is read and its other bytes checked.
    """
    image = plan.image
    cs, room = image.chunk_size, plan.disk_size - tail
    if plan.disk_size >= image.size:
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
            raise TargetRefused(f"target {plan.target.path} is too small: the image has data up to byte "
                                f"{lo + used} after the last partition: {lo + used + tail} bytes needed")


def _plan_shrink(plan: DiskPlan, table: PartitionTable, last: Partition, limit: int, view: ImageView) -> int:
    """The last partition must shrink: only ext can, by resize2fs; returns its new end LBA."""
    ss = plan.sector_size
    per_mib = max(1, MIB // ss)
    end_lba = (limit + 1) // per_mib * per_mib - 1
    new_len = (end_lba + 1) * ss - last.start
    tail = GPT_TAIL_SECTORS * ss if table.kind == "gpt" else 0
    if new_len <= 0:
        raise TargetRefused(f"target {plan.target.path} is too small: partition {last.number} starts at byte "
                            f"{last.start}")
    _check_shrinkable(plan, last.start, last.size, new_len, view, last.start + MIB + tail)
    plan.fs_shrink = (last.start, last.size, new_len)
    plan.window = (0, last.start)
    return end_lba


def _check_shrinkable(plan: DiskPlan, start: int, size: int, new_len: int, view: ImageView,
                      overhead: int) -> None:
    """Refuse non-ext filesystems, and ext ones whose used blocks cannot fit (used-map estimate)."""
    if view.read(start + EXT_MAGIC_OFFSET, 2) != b"\x53\xef":
        raise TargetRefused(f"target {plan.target.path} is smaller than the image and the partition at byte "
                            f"{start} holds no ext filesystem: only ext2/3/4 can be shrunk (resize2fs); "
                            f"{start + size} bytes needed")
    for region in plan.image.meta.get("used_map", {}).get("regions", []):
        if region.get("start") == start and region.get("mode") == "bitmap":
            used = int(region.get("used_bytes") or 0)
            if used > new_len:
                raise TargetRefused(f"target {plan.target.path} is too small: the filesystem uses {used} bytes, "
                                    f"about {overhead + used} bytes needed")


def _rewritten_table(plan: DiskPlan, table: PartitionTable, view: ImageView) -> PartitionTable:
    """The table as it will be on the target, made in memory; ValueError becomes a refusal."""
    ss, image = plan.sector_size, plan.image
    old, new = image.size // ss, plan.disk_size // ss
    pieces: dict[int, bytes] = {}
    try:
        if table.kind == "gpt":
            region = (table.first_usable_lba or 34) * ss
            rw = relocate_gpt(view.read(0, region), old, new, ss, bool(plan.grow_range), plan.last_end_lba)
            pieces = {0: rw.primary, rw.backup_entries_offset: rw.backup}
        elif plan.grow_range or plan.last_end_lba is not None:
            rw = resize_mbr(view.read(0, 512), old, new, ss, bool(plan.grow_range), plan.last_end_lba)
            pieces = {0: rw.mbr}
    except ValueError as exc:
        raise TargetRefused(f"the partition table cannot be fitted to {plan.target.path}: {exc}") from None

    def read(offset: int, length: int) -> bytes:
        for at, data in pieces.items():
            if at <= offset and offset + length <= at + len(data):
                return data[offset - at:offset - at + length]
        return view.read(offset, length) if offset + length <= image.size else bytes(length)

    new_table = read_partition_table(read, plan.disk_size, ss)
    if new_table is None:
        raise TargetRefused("the rewritten partition table does not read back (a bug: please report it)")
    return new_table


def _describe_writes(plan: DiskPlan) -> None:
    lo, hi = plan.window
    writes = [{"what": "image bytes" + (" that differ (delta)" if plan.delta else ""),
               "offset": lo - plan.shift, "length": hi - lo}]
    total = _data_bytes(plan.image, lo, hi)
    if plan.fs_shrink:
        start, _, new_len = plan.fs_shrink
        writes.append({"what": "last partition's ext filesystem, shrunk by resize2fs",
                       "offset": start - plan.shift, "length": new_len})
        total += _data_bytes(plan.image, start, start + plan.fs_shrink[1])
    if plan.relocate and plan.table_kind == "gpt":
        writes.append({"what": "GPT fitted to the disk (primary and backup header, protective MBR)",
                       "offset": 0, "length": plan.disk_size})
    if plan.grow_range:
        writes.append({"what": "last partition's filesystem grown by its own tool",
                       "offset": plan.grow_range[0], "length": plan.grow_range[1]})
    plan.writes, plan.bytes_to_write = writes, total


def plan_partition_restore(repo: Repository, image_id: str, number: int, target_path: str,
                           grow: bool = False) -> DiskPlan:
    """Plan restoring partition ``number`` of the image onto a partition, a disk or a file."""
    image, target, ss = _open(repo, image_id, target_path)
    with ImageView(repo, image) as view:
        table = _read_table(image, view, ss)
        parts = {p.number: p for p in table.partitions} if table else {}
        if number not in parts:
            raise TargetRefused(f"image {image.id[:12]} has no partition {number} (it has: "
                                f"{', '.join(map(str, sorted(parts))) or 'none'})")
        part = parts[number]
        size = _target_size(target, part.size)
        plan = DiskPlan(image, target, size, ss, table.kind, [], [], 0, (part.start, part.end),
                        shift=part.start, mode="partition", grow=grow, partition=number)
        if size < part.size:
            new_len = size // 4096 * 4096
            _check_shrinkable(plan, part.start, part.size, new_len, view, 0)
            plan.fs_shrink = (part.start, part.size, new_len)
            plan.window = (part.start, part.start)
        elif grow and size > part.size:
            plan.grow_range = (0, size)
    plan.partitions = [_part_dict(Partition(number, 0, min(size, part.size), part.type_id, part.name), ss)]
    _describe_writes(plan)
    return plan
