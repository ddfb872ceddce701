"""Carrying out a restore plan (made, with every refusal, by ``plan.py``), in this order:

1. pre-flight, when the target holds anything (a device or an existing file): every chunk the image
   needs is authenticated before the target is opened, so a damaged repository cannot leave a
   half-overwritten disk. A new file has nothing to lose: it skips the pre-flight (saving a full
   read of the image's packs) and is removed if the restore fails; its chunks are still checked
   one by one as they are written;
2. shrink only: the last partition is restored into a sparse temporary file, checked with
   ``e2fsck -f`` and shrunk with ``resize2fs`` (a refusal naming the bytes needed comes from here,
   still before the target is opened). Chosen over ``resize2fs`` on the target because the blocks
   past the new end must be readable while resize2fs moves them, and the target has no room;
3. the image bytes that stay where they were (all of them, or those before the last partition),
   zero/unused ranges cleared on devices; with ``delta`` only chunks whose keyed id differs from
   the target's current chunk are written;
4. the shrunk filesystem at the last partition's start;
5. stale signatures of an earlier table or filesystem cleared where nothing else wrote (stale.py);
   the partition table fitted to the disk (GPT backup header and last usable LBA at the new end,
   CRCs recomputed; MBR only when a partition changes);
6. ``grow``: the last partition's filesystem grown by its own tool over a loop device.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from imgbackup import audit, interrupts
from imgbackup.disklabel.relocate import apply_gpt_relocation, apply_mbr_resize
from imgbackup.engine.restore.plan import GPT_TAIL_SECTORS, MIB, DiskPlan
from imgbackup.engine.restore.resize import grow_filesystem, shrink_ext_file
from imgbackup.engine.restore.target import open_for_writing
from imgbackup.engine.restore.write import (
    check_digest,
    check_lengths,
    clear_unwritten,
    write_delta,
    write_slots,
    zero_nonzero,
)
from imgbackup.errors import StorageError
from imgbackup.repository.chunkreader import ChunkReader
from imgbackup.repository.repo import Repository

COPY_BLOCK = 4 * MIB   # the shrunk filesystem is copied in blocks this size: all-zero ones are skipped or zeroed


@dataclass
class BareMetalResult:
    image: str
    target: str
    disk_size: int
    bytes_read: int
    bytes_written: int
    bytes_zeroed: int
    duration_s: float
    verified: bool
    partitions: list[dict]
    notes: list[str]
    bad_ranges: list[list[int]] = field(default_factory=list)   # restored as zeros: unreadable at backup


def run_disk_restore(repo: Repository, plan: DiskPlan, discard: bool = False,
                     progress: Callable[[int], None] | None = None) -> BareMetalResult:
    """Carry out a plan (see the module docstring for the order); a ``restore`` audit event records it."""
    with audit.audited("restore", repository=repo.config.id, location=repo.location, image=plan.image.id,
                       name=plan.image.meta.get("name"), target=plan.target.path, mode=plan.mode) as event:
        result = _restore(repo, plan, discard, progress)
        event.update(bytes=result.bytes_written, duration_s=result.duration_s)
    return result


def _restore(repo: Repository, plan: DiskPlan, discard: bool,
             progress: Callable[[int], None] | None) -> BareMetalResult:
    started = time.monotonic()
    target = plan.target.path
    interrupts.set_status(f"{target} was not changed" if plan.target.exists else f"{target} was not created")
    reader = ChunkReader(repo)
    workers = max(os.cpu_count() or 2, reader.parallelism)   # every core opening, every read in flight
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="imgbackup-restore") as pool, \
            tempfile.TemporaryDirectory(prefix="imgbackup-shrink-") as tmp:
        job = _Restore(repo, plan, reader, pool, discard, progress, list(plan.fit.warnings))
        job.write(tmp)
    if plan.fit.grow_range:
        interrupts.set_status(f"{target} holds the image; growing its last filesystem did not finish "
                              "(check it with its fsck)")
        job.notes.append(grow_filesystem(plan.target.path, *plan.fit.grow_range))
    interrupts.set_status(f"{target} was fully restored")
    return BareMetalResult(plan.image.id, plan.target.path, plan.disk_size, job.read, job.written, job.zeroed,
                           round(time.monotonic() - started, 3), True, plan.fit.partitions, job.notes,
                           plan.bad_ranges)


@dataclass
class _Restore:
    """One restore under way: what its steps share, and the byte counts they add up."""

    repo: Repository
    plan: DiskPlan
    reader: ChunkReader
    pool: ThreadPoolExecutor
    discard: bool
    progress: Callable[[int], None] | None
    notes: list[str]
    read: int = 0
    written: int = 0
    zeroed: int = 0

    def write(self, tmp: str) -> None:
        """Steps 1-5 of the module docstring; a new target file is removed when one fails."""
        plan, image, target = self.plan, self.plan.image, self.plan.target
        check_lengths(self.reader, image)
        if target.exists:
            self.reader.authenticate_all((bytes(row) for row in image.ids), self.pool)
        shrunk = self._shrink_in_temp(tmp) if plan.fit.fs_shrink else None
        interrupts.set_status(f"{target.path} is partly written and not usable")
        fd = open_for_writing(target, plan.disk_size, keep=plan.delta)
        try:
            try:
                verified = self._write_target(fd, shrunk)
                os.fsync(fd)
            finally:
                os.close(fd)
            if plan.fit.window == (0, image.size) and not plan.fit.fs_shrink:
                check_digest(image, verified, target.path)
        except BaseException as exc:
            if not target.exists:  # a file this restore created holds nothing worth keeping
                os.unlink(target.path)
                interrupts.set_status(f"{target.path}, the new file it was writing, was removed")
            if isinstance(exc, OSError):
                raise StorageError(f"writing {target.path} failed: {exc.strerror or exc}") from None
            raise

    def _write_target(self, fd: int, shrunk: str | None) -> np.ndarray:
        """Steps 3-5: the image bytes, the shrunk filesystem, the fitted table; the verified ids."""
        plan, fit, image = self.plan, self.plan.fit, self.plan.image
        if plan.delta:
            self.read, self.written, self.zeroed, verified = write_delta(fd, image, self.repo.keys.id_key,
                                                                         self.reader, self.pool, self.progress)
        else:
            self.written, verified = write_slots(fd, image, self.reader, self.pool, window=fit.window,
                                                 shift=fit.shift, progress=self.progress)
            if plan.target.is_block_device:
                self.zeroed = clear_unwritten(fd, image, self.discard, fit.window, fit.shift)
        if shrunk:
            written, zeroed = _copy_file_into(fd, shrunk, fit.fs_shrink[0] - fit.shift)
            self.written, self.zeroed = self.written + written, self.zeroed + zeroed
            self.notes.append(f"filesystem shrunk by resize2fs to {fit.fs_shrink[2]} bytes")
        for area in plan.stale:
            self.zeroed += zero_nonzero(fd, area["offset"], area["offset"] + area["length"])
        _fit_table(fd, plan)
        return verified

    def _shrink_in_temp(self, tmp: str) -> str:
        """Step 2: the last partition restored into a sparse file in ``tmp`` and shrunk there."""
        plan, fit = self.plan, self.plan.fit
        start, length, new_len = fit.fs_shrink
        path = os.path.join(tmp, "partition.img")
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.ftruncate(fd, length)
            write_slots(fd, plan.image, self.reader, self.pool, window=(start, start + length), shift=start)
        finally:
            os.close(fd)
        tail = GPT_TAIL_SECTORS * plan.sector_size if plan.table_kind == "gpt" else 0
        shrink_ext_file(path, new_len, start - fit.shift + tail)
        return path


def _copy_file_into(fd: int, path: str, offset: int) -> tuple[int, int]:
    """Copy a (sparse) file to ``offset``: data written, all-zero blocks zeroed only where not zero."""
    written = zeroed = 0
    with open(path, "rb") as f:
        pos = 0
        while block := f.read(COPY_BLOCK):
            if block.count(0) == len(block):
                zeroed += zero_nonzero(fd, offset + pos, offset + pos + len(block))
            else:
                os.pwrite(fd, block, offset + pos)
                written += len(block)
            pos += len(block)
    return written, zeroed


def _fit_table(fd: int, plan: DiskPlan) -> None:
    """Step 5: the same table rewrite planning made in memory, now on the target."""
    fit = plan.fit
    if not fit.relocate or plan.mode != "disk":
        return
    ss = plan.sector_size
    old, new = plan.image.size // ss, plan.disk_size // ss
    grow = fit.grow_range is not None
    try:
        if plan.table_kind == "gpt":
            apply_gpt_relocation(fd, old, new, ss, grow, fit.last_end_lba)
        elif grow or fit.last_end_lba is not None:
            apply_mbr_resize(fd, old, new, ss, grow, fit.last_end_lba)
    except ValueError as exc:  # the same rewrite succeeded in memory during planning
        raise StorageError(f"fitting the partition table failed: {exc}") from None
