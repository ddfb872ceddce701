"""One timed step and the correctness check of one restore.

A step is ``bash -c CMD`` after a cache drop; ``os.wait4`` gives its CPU seconds and peak RSS, which on
Linux include the reaped processes of the whole pipeline (peak RSS is the largest single process).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import subprocess
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from benchlib import content_hash, drop_caches, loop, mounted, sh, tree_hash


@dataclass
class Step:
    wall_s: float
    cpu_s: float
    rss_mib: float
    ok: bool
    error: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


def _kill_group(pid: int) -> None:
    """Timeout: end the step's own process group (bash and its pipeline), nothing else."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)


def timed(cmd: str, env: dict[str, str], cold: bool = True, timeout: float = 900) -> Step:
    """Run one step cold: sync + drop caches, then time it (wall clock; CPU and peak RSS by /usr/bin/time).

    Every step ends with ``sync`` inside the timing: a backup or restore is done when its data is on
    disk, and tools that fsync (imgbackup, borg) must not be compared with tools that leave dirty pages.

    /usr/bin/time forks the step from its own small process: a child forked from this Python process would
    inherit its resident size as the floor of ``ru_maxrss``.
    """
    if cold:
        drop_caches()
    with tempfile.TemporaryFile() as err, tempfile.NamedTemporaryFile("r") as usage:
        t0 = time.monotonic()
        proc = subprocess.Popen(["/usr/bin/time", "-q", "-f", "%U %S %M", "-o", usage.name,
                                 "bash", "-o", "pipefail", "-c", f"{cmd}\nrc=$?; sync; exit $rc"],
                                env=env, stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)
        killer = threading.Timer(timeout, _kill_group, (proc.pid,))
        killer.start()
        try:
            proc.wait()
        finally:
            killer.cancel()
        wall = time.monotonic() - t0
        err.seek(0)
        tail = err.read()[-1500:].decode(errors="replace").strip()
        fields = usage.read().split()
    try:
        user, system, rss_kib = float(fields[-3]), float(fields[-2]), float(fields[-1])
    except (IndexError, ValueError):
        user = system = rss_kib = 0.0  # killed before /usr/bin/time could write
    ok = proc.returncode == 0
    return Step(round(wall, 3), round(user + system, 3), round(rss_kib / 1024, 1), ok,
                "" if ok else f"exit {proc.returncode}: {tail}")


def _fs_facts(img: Path, part: dict, work: Path) -> dict:
    """Checker verdict and file-tree hash of one partition of ``img`` (read-only)."""
    if part["fs"] == "ext4":
        with loop(img, part["offset"], part["size"], read_only=True) as dev:
            fsck = sh("e2fsck", "-fn", dev, check=False).returncode
            with mounted(dev, "ro,noload") as mnt:
                digest, files = tree_hash(mnt)
        return {"fsck": fsck, "tree": digest, "files": files}
    if part["fs"] == "fat":
        with loop(img, part["offset"], part["size"], read_only=True) as dev:
            fsck = sh("fsck.vfat", "-n", dev, check=False).returncode
        out = Path(tempfile.mkdtemp(prefix="imgb-bench-fat-", dir=work))
        try:
            sh("mcopy", "-s", "-n", "-m", "-i", f"{img}@@{part['offset']}", "::/", str(out))
            digest, files = tree_hash(out)
        finally:
            sh("rm", "-rf", str(out))
        return {"fsck": fsck, "tree": digest, "files": files}
    return {}


def _outside_bytes(img: Path, head: int, tail: int) -> str:
    """The bytes outside the partitions: protective MBR, GPT and its backup copy."""
    with open(img, "rb") as f:
        data = f.read(head)
        f.seek(tail)
        data += f.read()
    return hashlib.sha256(data).hexdigest()


def reference(disk: Path, layout: dict, work: Path) -> dict:
    """What a restore must reproduce: the content hash, and per partition the fsck verdict and tree hash."""
    cache = disk.with_suffix(".reference.json")
    if cache.exists() and cache.stat().st_mtime >= disk.stat().st_mtime:
        return json.loads(cache.read_text())
    ref = {"content": content_hash(disk), "parts": {}}
    if layout["parts"]:
        ref["outside"] = _outside_bytes(disk, layout["head"], layout["tail"])
        for p in layout["parts"]:
            ref["parts"][str(p["number"])] = _fs_facts(disk, p, work)
    cache.write_text(json.dumps(ref, indent=1))
    return ref


def check_restore(restored: Path, ref: dict, layout: dict, used_blocks: bool, work: Path) -> str:
    """'exact' (same bytes), 'fs-equal' (used-block tools: same GPT, clean fsck, same file trees) or 'FAIL: ...'."""
    if not restored.exists():
        return "FAIL: no restored file"
    if content_hash(restored) == ref["content"]:
        return "exact"
    if not used_blocks or not layout["parts"]:
        return "FAIL: content differs"
    if _outside_bytes(restored, layout["head"], layout["tail"]) != ref["outside"]:
        return "FAIL: GPT / bytes outside the partitions differ"
    for p in layout["parts"]:
        got, want = _fs_facts(restored, p, work), ref["parts"][str(p["number"])]
        if got.get("fsck") != 0:
            return f"FAIL: partition {p['number']} fsck exit {got.get('fsck')}"
        if got != want:
            return f"FAIL: partition {p['number']} file tree differs ({got.get('files')} vs {want.get('files')} files)"
    return "fs-equal"
