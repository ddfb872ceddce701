"""Point-in-time sources: image a snapshot of a live source, never the source being written.

``lvm``: a snapshot LV of the source LV (``lvcreate -s``; a thin snapshot for a thin LV). Creating
it suspends the origin, which freezes a mounted filesystem first, so the snapshot holds a clean
filesystem even while writers keep going. ``reflink``: a copy-on-write clone of an image file
(``cp --reflink=always``) beside it, on XFS or btrfs: instant and taking no space until the
original changes. ``auto`` picks ``lvm`` for an LV and ``reflink`` for a regular file.

The snapshot is removed when the backup ends, however it ends: success, failure, Ctrl-C or
SIGTERM (both unwind through ``finally``). Its name carries the host and PID that made it, so one
left behind by a killed process (SIGKILL, power loss) is recognised and removed by the next backup
of the same source. A classic (non-thin) snapshot that overflowed its copy-on-write space is
invalid: its reads fail, and it is checked again before the image is committed.
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import stat
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from imgbackup.device import tools
from imgbackup.errors import ImgBackupError, SourceError, ToolTimeout, UsageError

KINDS = ("lvm", "reflink", "auto")
SNAP_TAG = "imgbsnap"
# Copy-on-write space of a classic snapshot, as a share of the origin: room for a quarter of it to be
# rewritten while the backup runs (the backup fails cleanly, never silently, if that is exceeded).
COW_FRACTION = 0.25
MIN_COW_BYTES = 16 << 20
REMOVE_ATTEMPTS = 10     # x 0.5 s
TOOL_TIMEOUT = 300.0     # lvcreate/lvremove/cp --reflink take seconds; minutes means a hung device
HOOK_ENV = "IMGBACKUP_SNAPSHOT_HOOK"   # run with the snapshot's path before it is read (checks, tests)


class SnapshotError(ImgBackupError):
    exit_code = 7


@dataclass
class Snapshot:
    kind: str
    origin: str
    path: str          # what the backup reads
    name: str          # LV name or file name of the snapshot

    def to_meta(self) -> dict:
        return {"kind": self.kind, "origin": self.origin, "snapshot": self.name}


def _tool(cmd: list[str], what: str) -> str:
    try:
        proc = tools.run(cmd, timeout=TOOL_TIMEOUT)
    except ToolTimeout as exc:
        raise SnapshotError(f"{what}: {exc}") from None
    if proc.returncode != 0:
        raise SnapshotError(f"{what}: {(proc.stderr or proc.stdout).strip().splitlines()[-1:] or ['failed']}"[0:400])
    return proc.stdout


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9]", "", socket.gethostname())[:20] or "host"


def _tag() -> str:
    return f"{SNAP_TAG}_{_host()}_{os.getpid()}"


def _stale(name: str) -> bool:
    """A snapshot of ours whose maker (a process on this host) is gone."""
    m = re.search(rf"{SNAP_TAG}_([A-Za-z0-9]*)_(\d+)$", name)
    if not m or m.group(1) != _host():
        return False
    pid = int(m.group(2))
    return pid != os.getpid() and not Path(f"/proc/{pid}").exists()


# -- LVM --------------------------------------------------------------------------------------------
def _lv_fields(path: str) -> dict[str, str]:
    fields = ("vg_name", "lv_name", "lv_size", "lv_attr", "vg_free", "origin", "pool_lv")
    out = _tool(["lvs", "--noheadings", "--nosuffix", "--units", "b", "--separator", "|", "-o",
                 ",".join(fields), path], f"{path} is not an LVM logical volume")
    values = out.strip().split("|")
    if len(values) != len(fields):
        raise SnapshotError(f"{path}: unexpected lvs output {out.strip()!r}")
    return dict(zip(fields, (v.strip() for v in values), strict=True))


def _remove_stale_lvm(vg: str, origin: str) -> list[str]:
    out = _tool(["lvs", "--noheadings", "--separator", "|", "-o", "lv_name,origin", vg], f"listing {vg}")
    removed = []
    for line in out.splitlines():
        name, _, of = (p.strip() for p in line.partition("|"))
        if of == origin and _stale(name):
            _tool(["lvremove", "-f", f"{vg}/{name}"], f"removing stale snapshot {vg}/{name}")
            removed.append(f"{vg}/{name}")
    return removed


def _lvm_create(source: str) -> tuple[Snapshot, list[str]]:
    lv = _lv_fields(source)
    if lv["origin"]:
        raise UsageError(f"{source} is itself a snapshot of {lv['origin']}", "back it up without --snapshot")
    vg, name = lv["vg_name"], lv["lv_name"]
    notes = [f"removed snapshot {s} left by a process that died" for s in _remove_stale_lvm(vg, name)]
    snap = f"{name[:60]}-{_tag()}"
    thin = lv["lv_attr"].startswith("V")
    if thin:
        cmd = ["lvcreate", "-qq", "-s", "-kn", "-n", snap, f"{vg}/{name}"]
    else:
        size, free = int(lv["lv_size"]), int(lv["vg_free"] or 0)
        want = max(MIN_COW_BYTES, int(size * COW_FRACTION))
        if free < MIN_COW_BYTES:
            raise SnapshotError(f"volume group {vg} has {free} bytes free: no room for a snapshot of {name}",
                                f"free at least {want} bytes in {vg} (or use a thin pool)")
        cmd = ["lvcreate", "-qq", "-s", "-L", f"{min(want, free) // 512}s", "-n", snap, f"{vg}/{name}"]
    try:
        _tool(cmd, f"cannot snapshot {vg}/{name}")
    except BaseException:          # interrupted or failed half-way: remove it if lvcreate made it
        with contextlib.suppress(SnapshotError):
            if snap in _tool(["lvs", "--noheadings", "-o", "lv_name", vg], f"listing {vg}").split():
                _tool(["lvremove", "-f", f"{vg}/{snap}"], f"removing {vg}/{snap}")
        raise
    path = f"/dev/{vg}/{snap}"
    return Snapshot("lvm", source, path, f"{vg}/{snap}"), notes


def _lvm_check(snap: Snapshot) -> None:
    """A classic snapshot that ran out of copy-on-write space is invalid ('I' in lv_attr)."""
    attr = _lv_fields(snap.path)["lv_attr"]
    if len(attr) > 4 and attr[4] == "I":
        raise SnapshotError(f"the snapshot {snap.name} overflowed while the backup ran: nothing was stored",
                            "give the volume group more free space, or back up when less is written")


def _lvm_remove(snap: Snapshot) -> None:
    """lvremove, retried briefly: udev's probe of a just-closed LV can hold it for a moment."""
    for attempt in range(REMOVE_ATTEMPTS):
        try:
            _tool(["lvremove", "-f", snap.name], f"cannot remove the snapshot {snap.name}")
            return
        except SnapshotError:
            if attempt == REMOVE_ATTEMPTS - 1:
                raise
            time.sleep(0.5)


# -- reflink ----------------------------------------------------------------------------------------
def _reflink_create(source: str) -> tuple[Snapshot, list[str]]:
    src = Path(source)
    notes = []
    for old in src.parent.glob(f".{src.name}.{SNAP_TAG}_*"):
        if _stale(old.name):
            old.unlink(missing_ok=True)
            notes.append(f"removed snapshot {old} left by a process that died")
    copy = src.parent / f".{src.name}.{_tag()}"
    try:
        _tool(["cp", "--reflink=always", "--preserve=mode", str(src), str(copy)], f"cannot reflink {source}")
    except SnapshotError as exc:
        copy.unlink(missing_ok=True)
        raise SnapshotError(f"{exc}; --snapshot reflink needs a filesystem with reflinks (XFS with reflink=1, "
                            "btrfs)", "use --snapshot lvm for a logical volume") from None
    except BaseException:          # interrupted while cp ran: the half-made clone goes too
        copy.unlink(missing_ok=True)
        raise
    return Snapshot("reflink", source, str(copy), copy.name), notes


def _kind_for(source: str, kind: str) -> str:
    if kind not in KINDS:
        raise UsageError(f"--snapshot {kind}: expected one of {', '.join(KINDS)}")
    try:
        mode = os.stat(source).st_mode
    except OSError as exc:
        raise SourceError(f"{source}: {exc.strerror}") from None
    if kind == "auto":
        kind = "reflink" if stat.S_ISREG(mode) else "lvm"
    if kind == "reflink" and not stat.S_ISREG(mode):
        raise UsageError(f"--snapshot reflink is for image files; {source} is not one", "use --snapshot lvm")
    if kind == "lvm" and not stat.S_ISBLK(mode):
        raise UsageError(f"--snapshot lvm is for LVM logical volumes; {source} is not a block device")
    return kind


def _run_hook(snap: Snapshot) -> None:
    hook = os.environ.get(HOOK_ENV)
    if not hook:
        return
    proc = tools.run_as_group([hook, snap.path], timeout=None)   # an interrupt kills all the hook started
    if proc.returncode != 0:
        raise SnapshotError(f"{HOOK_ENV} {hook} failed ({proc.returncode}): {proc.stderr.strip()[-300:]}")


@contextlib.contextmanager
def snapshot_of(source: str, kind: str, notes: list[str]) -> Iterator[Snapshot]:
    """A snapshot of ``source`` for the body's duration; removed however the body ends."""
    kind = _kind_for(source, kind)
    snap, found = _lvm_create(source) if kind == "lvm" else _reflink_create(source)
    notes.extend(found)
    try:
        _run_hook(snap)
        yield snap
    finally:
        if kind == "lvm":
            _lvm_remove(snap)
        else:
            Path(snap.path).unlink(missing_ok=True)


def check_still_valid(snap: Snapshot) -> None:
    """Called before the image is committed: the snapshot's content held for the whole read."""
    if snap.kind == "lvm":
        _lvm_check(snap)
