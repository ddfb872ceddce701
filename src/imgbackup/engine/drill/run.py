"""Restore drills: prove an image restores, and measure how long it takes (the RTO), before the day it matters.

A drill runs, in order and each only when asked:

1. ``filesystems``: the image is mounted read-only through FUSE and each partition's own checker
   runs on it, then each mountable filesystem is mounted and walked (``verify --filesystems``);
2. ``restore``: the whole image is restored to a scratch file or device (``restore_to``), timed
   from the first read to the final fsync: that time is the RTO. The scratch target is then read
   back and every chunk compared by its keyed id with the image, so the drill proves the bytes on
   the target, not only the bytes sent. A scratch file the drill created is removed afterwards;
3. ``boot``: the restored copy (or, without a restore, the image through FUSE) is booted in QEMU
   with ``-snapshot`` and must print ``expect`` on its serial console.

The result is kept as a ``drill`` check record in the repository (``repository/records.py``) for
``status`` and the metrics, and announced as a ``drill`` audit event.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field

import numpy as np

from imgbackup import audit
from imgbackup._core import scan
from imgbackup.engine.restore.plan import plan_disk_restore
from imgbackup.engine.restore.run import run_disk_restore
from imgbackup.errors import ImgBackupError, UsageError
from imgbackup.format.imageindex import ImageIndex
from imgbackup.format.layout import SLOT_DATA
from imgbackup.repository.records import write_record
from imgbackup.repository.repo import Repository

READBACK_CHUNKS = 16    # the read-back compares this many chunks per read: large sequential reads


@dataclass
class DrillRequest:
    filesystems: bool = True
    restore_to: str | None = None
    boot: bool = False
    expect: str | None = None
    timeout: float = 120.0
    firmware: str = "bios"
    keep: bool = False          # keep a scratch file the drill created


@dataclass
class DrillStep:
    step: str
    ok: bool
    duration_s: float
    detail: dict = field(default_factory=dict)
    error: str | None = None


@dataclass
class DrillResult:
    image: str
    name: str
    ok: bool
    rto_s: float | None
    duration_s: float
    steps: list[DrillStep]
    record: str | None = None
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def compare_target(path: str, image: ImageIndex, key: bytes) -> int:
    """Read ``path`` back and count the slots whose content differs from the image (0: identical)."""
    cs = image.chunk_size
    want = image.ids_by_slot()
    differ = 0
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        step = READBACK_CHUNKS * cs
        for pos in range(0, image.size, step):
            buf = os.pread(fd, min(step, image.size - pos), pos)
            if len(buf) < min(step, image.size - pos):
                return differ + image.slots - pos // cs
            kinds, ids = scan.scan_chunks(buf, cs, key)
            s0 = pos // cs
            is_data = image.kinds[s0:s0 + len(kinds)] == SLOT_DATA
            same_data = (kinds == scan.DATA) & np.all(ids == want[s0:s0 + len(kinds)], axis=1)
            differ += int(np.count_nonzero(np.where(is_data, ~same_data, kinds != scan.ZERO)))
    finally:
        os.close(fd)
    return differ


def _timed(steps: list[DrillStep], name: str, fn) -> DrillStep:
    started = time.monotonic()
    try:
        ok, detail, error = fn()
    except ImgBackupError as exc:
        ok, detail, error = False, {"exit_code": exc.exit_code}, str(exc)
    step = DrillStep(name, ok, round(time.monotonic() - started, 3), detail, error)
    steps.append(step)
    return step


def _filesystems(repo: Repository, image_id: str):
    from imgbackup.engine.verify.filesystems import check_filesystems

    report = check_filesystems(repo, image_id)
    failed = [f"{p.name}: {'; '.join(p.errors)}" for p in report.partitions if not p.ok]
    detail = {"partitions": [{"name": p.name, "fstype": p.fstype, "ok": p.ok, "files": p.files,
                              "checker_exit": p.checker_exit} for p in report.partitions]}
    return report.ok, detail, "; ".join(failed) or None


def _restore(repo: Repository, image_id: str, target: str, created: list[str]):
    existed = os.path.exists(target)
    plan = plan_disk_restore(repo, image_id, target)
    if not existed:
        created.append(target)
    started = time.monotonic()
    result = run_disk_restore(repo, plan)
    rto = time.monotonic() - started
    read_started = time.monotonic()
    differ = compare_target(target, plan.image, repo.keys.id_key)
    detail = {"target": target, "rto_s": round(rto, 3), "bytes_written": result.bytes_written,
              "disk_size": result.disk_size, "readback_s": round(time.monotonic() - read_started, 3),
              "slots_differing": differ}
    return differ == 0, detail, (f"{differ} chunk(s) of the restored copy differ from the image" if differ else None)


def _boot(repo: Repository, image_id: str, req: DrillRequest, restored: str | None):
    from imgbackup.engine.verify.boot import boot_verify
    from imgbackup.engine.verify.qemu import boot_check

    if restored:
        res = boot_check(restored, req.expect or "", timeout=req.timeout, firmware=req.firmware, snapshot=True)
        booted, reason, seconds, tail = res.booted, res.reason, res.seconds, res.console_tail
    else:
        bv = boot_verify(repo, image_id, req.expect or "", req.timeout, req.firmware)
        booted, reason, seconds, tail = bv.booted, bv.reason, bv.seconds, bv.console_tail
    detail = {"booted": booted, "reason": reason, "seconds": round(seconds, 1), "expect": req.expect,
              "firmware": req.firmware, "from": "restored copy" if restored else "repository",
              "console_tail": "\n".join(tail.splitlines()[-20:])}
    return booted, detail, None if booted else f"did not boot ({reason})"


def run_drill(repo: Repository, image_id: str, req: DrillRequest, now: float | None = None) -> DrillResult:
    """Run the drill's steps, record the result in the repository, emit the audit event."""
    if req.boot and not req.expect:
        raise UsageError("a boot drill needs --expect TEXT (what the booted system prints)")
    if not (req.filesystems or req.restore_to or req.boot):
        raise UsageError("a drill with nothing to do", "ask for filesystems, --restore-to or --boot")
    started = time.monotonic()
    name = repo.images.read_meta(image_id).get("name") or ""
    steps: list[DrillStep] = []
    created: list[str] = []
    restored = None
    try:
        if req.filesystems:
            _timed(steps, "filesystems", lambda: _filesystems(repo, image_id))
        if req.restore_to:
            step = _timed(steps, "restore", lambda: _restore(repo, image_id, req.restore_to, created))
            restored = req.restore_to if step.ok else None
        if req.boot and (restored or not req.restore_to):
            _timed(steps, "boot", lambda: _boot(repo, image_id, req, restored))
    finally:
        if not req.keep:
            for path in created:
                if os.path.isfile(path):
                    os.unlink(path)
    restore = next((s for s in steps if s.step == "restore"), None)
    rto = restore.detail.get("rto_s") if restore and restore.ok else None
    ok = all(s.ok for s in steps) and (not req.boot or any(s.step == "boot" for s in steps))
    result = DrillResult(image_id, name, ok, rto, round(time.monotonic() - started, 3), steps)
    data = {"rto_s": rto, "duration_s": result.duration_s, "steps": [asdict(s) for s in steps]}
    try:
        result.record = write_record(repo, "drill", name, ok, [image_id], data, now).id
    except ImgBackupError as exc:
        result.warnings.append(f"the drill result was not recorded in the repository: {exc}")
    audit.emit("drill", "ok" if ok else "failed", repository=repo.config.id, location=repo.location,
               image=image_id, name=name, rto_s=rto, duration_s=result.duration_s,
               steps=",".join(f"{s.step}:{'ok' if s.ok else 'failed'}" for s in steps),
               error="; ".join(s.error for s in steps if s.error) or None)
    return result
