"""Session fixtures for the guest tests: the rescue media, built at most once per session.

The builder caches the slow part (the Debian root, ~2-4 min cold) by a hash of its inputs, and
imgbackup's own squashfs by its files' content, under its cache dir (``IMGBACKUP_RESCUE_CACHE``,
default /var/cache/imgbackup/rescue); the test ISOs are cached there too, keyed by those two and
the baked-in parameters. A developer's second run therefore starts its guests at once; a clean CI
machine builds once per session.

Two runs at once (two worktrees, two xdist workers) share that cache safely: everything there is
built and pruned under its lock (``media.cache_lock``) and appears by an atomic rename, and each
run boots its own hard link of the ISO in its own temp dir, so another run's prune never takes
away media this run is about to boot.
"""

from __future__ import annotations

import functools
import hashlib
import os
import shutil
import time
from pathlib import Path

import pytest

from imgbackup.engine.rescue.media import DEFAULT_CACHE
from support import need, need_root, need_tool

RESCUE_CACHE = DEFAULT_CACHE     # shared with 'imgbackup rescue build': one apt cache, one Debian root
BACKUP_LABEL = "IBBACKUP"
TARGET_SERIAL = "IBTARGET01"
# The unattended media the restore tests boot: everything by label or stable identity.
UNATTENDED = (f"imgbackup.action=restore imgbackup.repo=LABEL={BACKUP_LABEL}:/repo imgbackup.image=latest "
              f"imgbackup.name=srcdisk imgbackup.target=/dev/disk/by-id/virtio-{TARGET_SERIAL} "
              f"imgbackup.passphrase-file=LABEL={BACKUP_LABEL}:/pass imgbackup.grow=yes "
              "imgbackup.after=poweroff imgbackup.on-failure=poweroff imgbackup.wait=20")


class RescueMedia:
    """The session's two test media, each built (or taken from the cache) when a test first needs it:
    a run of the guest lab alone does not pay for the unattended ISO."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir, self.built, self.build_seconds = run_dir, [], 0.0

    def _get(self, name: str, cmdline: str, timeout: int) -> Path:
        start = time.monotonic()
        path = _iso(name, cmdline, timeout, self.run_dir, self.built)
        self.build_seconds += time.monotonic() - start
        print(f"rescue media {name} ready in {time.monotonic() - start:.0f} s: {'; '.join(self.built)}")
        return path

    @functools.cached_property
    def plain(self) -> Path:
        """Boot menu (5 s), default entry: the guided menu."""
        return self._get("plain", "", 5)

    @functools.cached_property
    def unattended(self) -> Path:
        """UNATTENDED baked into the default entry, 1 s menu."""
        return self._get("unattended", UNATTENDED, 1)


KEEP_TEST_ISOS = 4        # per kind: room for a few worktrees' runs at once (~200 MB each)


def _iso(name: str, cmdline: str, timeout: int, run_dir: Path, log: list[str]) -> Path:
    """The ``name`` media for this imgbackup (built into the cache when missing), hard-linked into ``run_dir``."""
    from imgbackup.engine.rescue import media

    with media.cache_lock(RESCUE_CACHE):
        debian, _, _ = media.ensure_debian(RESCUE_CACHE, None, log.append)
        fs = media.ensure_payload(RESCUE_CACHE, debian, log.append)
        key = hashlib.sha256(f"{debian.name}\n{fs.name}\n{cmdline}\n{timeout}".encode()).hexdigest()[:16]
        cached = RESCUE_CACHE / f"test-{name}-{key}.iso"
        if not cached.exists():
            tmp = cached.with_suffix(".part")
            media.assemble_iso(debian, fs, tmp, cmdline, timeout, None, None, log.append)
            os.replace(tmp, cached)
            log.append(f"built {cached.name}")
        os.utime(cached)
        mine = run_dir / cached.name
        try:
            os.link(cached, mine)
        except OSError:       # another filesystem
            shutil.copyfile(cached, mine)
        others = sorted((p for p in RESCUE_CACHE.glob(f"test-{name}-*.iso") if p != cached),
                        key=lambda p: p.stat().st_mtime, reverse=True)
        for old in others[KEEP_TEST_ISOS - 1:]:
            old.unlink(missing_ok=True)
    return mine


@pytest.fixture(scope="session")
def rescue_media(tmp_path_factory: pytest.TempPathFactory) -> RescueMedia:
    need_root()
    need_tool("mmdebstrap", "mksquashfs", "grub-mkrescue", "xorriso", "qemu-system-x86_64", "mformat")
    from imgbackup.engine.rescue import media

    try:
        media.check_tools()
    except Exception as exc:  # noqa: BLE001 - turned into need()'s skip/fail
        need(False, str(exc))
    return RescueMedia(tmp_path_factory.mktemp("rescue-media"))


# The guest lab: one booted rescue system shared by the lab's modules (test_guestlab, and the first
# boot of test_guestlab_jobs): a TCG boot to a settled shell costs 1.5-3 min, the tests seconds to a
# minute each. Every module's disks are attached from the start.
LAB_WWN = "0x5000c50012345678"
LAB_ENV = "export IMGBACKUP_REPO=/root/repo IMGBACKUP_PASSPHRASE=lab-pass IMGBACKUP_TEST_CHEAP_KDF=1"
JOB_DISKS = (("a", 1, "DISKA"), ("b", 2, "DISKB"), ("c", 3, "DISKC"), ("d", 4, None))   # d: boot 2 only


def _job_disk(path: Path, seed: int) -> Path:
    from disks import random_image
    from support import run

    random_image(path, 16 << 20, seed=seed, data_fraction=0.5)
    run("sgdisk", "-o", "-n", "1:2048:0", path)
    return path


JOBS = (("joba", "DISKA"), ("jobc", "DISKC"))          # test_guestlab_jobs' two jobs and their disks' serials


def job_toml(name: str, serial: str) -> bytes:
    """A job for the disk with ``serial``, by its by-id name, into the jobs' repository disk (/mnt/r)."""
    return (f'source = "/dev/disk/by-id/virtio-{serial}"\nrepository = "/mnt/r/repo"\n'
            f'passphrase_file = "/mnt/r/pass"\nrpo = "24h"\ninhibit_sleep = false\n'
            f'audit = ["file:/mnt/r/audit.jsonl"]\n[verify]\nsample_percent = 0\n').encode()


def _jobs_repository_disk(path: Path, work: Path) -> Path:
    """The jobs' repository disk: ext4 with the repository (made here: one imgbackup start less in the
    guest), its passphrase file and the two job files."""
    from disks import blank, loop_device, mounted
    from support import cli_json, run

    blank(path, 160 << 20)
    run("mkfs.ext4", "-q", "-F", path)
    with loop_device(path) as dev, mounted(dev, work / "mnt-jobrepo", "rw") as mnt:
        (mnt / "pass").write_text("guest-job-pass\n")
        (mnt / "jobs").mkdir()
        for job, serial in JOBS:
            (mnt / "jobs" / f"{job}.toml").write_bytes(job_toml(job, serial))
        cli_json("init", repo=mnt / "repo", passphrase=None, IMGBACKUP_PASSPHRASE_FILE=str(mnt / "pass"))
    return path


def _lab_setup(guest) -> None:
    guest.run(f"{LAB_ENV}; imgbackup init --json >/dev/null", 120).check()


@pytest.fixture(scope="session")
def lab_pool(rescue_media: RescueMedia, tmp_path_factory: pytest.TempPathFactory):
    """The lab guest (``guestlab.LabPool``) with ``pool.files``: the jobs module's disk images by name."""
    from disks import blank
    from guestlab import Disk, LabPool
    from test_bootdisk import qemu_holding

    need_tool("mkfs.ext4", "sgdisk", "qemu-system-x86_64")
    base = tmp_path_factory.mktemp("lab")
    files = {name: _job_disk(base / f"{name}.img", seed) for name, seed, _ in JOB_DISKS}
    files["repo"] = _jobs_repository_disk(base / "jobrepo.img", base)
    disks = [Disk(blank(base / "lvm.img", 192 << 20), serial="LABLVM"),
             Disk(blank(base / "era.img", 96 << 20), serial="LABERA"),
             Disk(blank(base / "scsi.img", 32 << 20), serial="LABSERIAL01", model="LabModel9000", vendor="IMGB",
                  wwn=LAB_WWN, bus="scsi"),
             Disk(files["repo"], serial="JOBREPO"),
             *(Disk(files[name], serial=serial) for name, _, serial in JOB_DISKS if serial)]
    pool = LabPool(rescue_media.plain, base / "guest", disks, setup=_lab_setup)
    pool.files = files
    try:
        yield pool
    finally:
        pool.close()
        print(f"lab guest boots (s): {[round(b) for b in pool.boots]}")
    for d in disks:
        assert qemu_holding(d.path) == [], "qemu left running"
