"""Jobs in the guest lab (issue 16 with 17's lab): a job naming /dev/disk/by-id/… follows its disk when
the kernel names change between boots, and refuses another disk that turns up under the same name.

Two boots of the rescue system with the same repository disk. Boot 1 is the lab guest (rescue_fixtures'
lab_pool, shared with test_guestlab), which has disks A, B, C in this order after the lab's own; a
job for A and one for C (by-id names that udev made from the QEMU serials). Boot 2: B before A (A's
/dev/vdX name changes) and in C's place another disk D of the same size that carries C's serial: job A
images its own disk again (incremental, same identity), job C refuses D (exit 17: the partition table
GUID differs) and stores nothing.
"""

from __future__ import annotations

import contextlib
import json
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from guestlab import Disk, Guest

pytestmark = [pytest.mark.guest, pytest.mark.slow]
MIB = 1 << 20
# (the lab guest's shell has the lab's repository and passphrase exported: not these jobs')
SETUP = ("unset IMGBACKUP_REPO IMGBACKUP_PASSPHRASE IMGBACKUP_PASSPHRASE_FILE; export IMGBACKUP_TEST_CHEAP_KDF=1; "
         "mkdir -p /mnt/r && mount /dev/disk/by-id/virtio-JOBREPO /mnt/r")


WRONG_TARGET = ("imgbackup.action=restore imgbackup.repo=/dev/disk/by-id/virtio-JOBREPO:/repo imgbackup.image=latest "
                "imgbackup.name=joba imgbackup.target=/dev/disk/by-id/virtio-NOSUCHDISK "
                "imgbackup.passphrase-file=/dev/disk/by-id/virtio-JOBREPO:/pass imgbackup.wait=2 "
                "imgbackup.on-failure=poweroff")
BOOT_WAIT = 300      # lab()'s 120 s (and its 30 s udev settle) are too short on a host loaded by other suites


@contextlib.contextmanager
def lab(iso: Path, workdir: Path, disks: list[Disk]) -> Iterator[Guest]:
    """guestlab.lab with room for a slow boot: a root shell on the lab console, udev settled."""
    guest = Guest(iso, workdir, disks, append="imgbackup.action=shell", lab_shell=True)
    try:
        guest.start()
        guest.wait_shell(BOOT_WAIT)
        guest.run("dmesg -n 1; udevadm settle --timeout=180", 200).check()
        yield guest
    finally:
        guest.close()


def _run(g: Guest, job: str) -> tuple[int, dict]:
    res = g.run(f"imgbackup job run {job} --config-dir /mnt/r/jobs --state-dir /mnt/r/state --json", 300)
    doc, _ = json.JSONDecoder().raw_decode(res.output[res.output.index("{"):])   # the error line follows it
    return res.rc, doc


def _finish(g: Guest) -> None:
    g.run("sync; umount /mnt/r", 60).check()


def test_by_id_jobs_follow_their_disks_and_refuse_an_impostor(lab_pool, tmp_path: Path) -> None:
    files = lab_pool.files
    repo_disk = Disk(files["repo"], serial="JOBREPO")
    a, b, d = files["a"], files["b"], files["d"]

    g = lab_pool.get()          # boot 1: the lab guest, which has A, B, C in this order after the lab's disks
    g.run(SETUP, 60).check()    # (the repository disk holds the repository, its passphrase and the job files)
    runs1 = {job: _run(g, job) for job in ("joba", "jobc")}
    _finish(g)
    lab_pool.close()            # the lab's last user: its CPU goes to boot 2 (a later user boots it again)
    assert all(code == 0 for code, _ in runs1.values()), runs1
    assert all(s["steps"][1]["result"]["type"] == "full" for _, s in runs1.values())

    second = [repo_disk, Disk(b, serial="DISKB"), Disk(a, serial="DISKA"), Disk(d, serial="DISKC")]
    with lab(lab_pool.iso, tmp_path / "boot2", second) as g:
        g.run(SETUP, 60).check()
        runs2 = {job: _run(g, job) for job in ("joba", "jobc")}
        state_a = json.loads(g.run("cat /mnt/r/state/joba.json").check().output)
        images = g.run("IMGBACKUP_PASSPHRASE_FILE=/mnt/r/pass imgbackup list -r /mnt/r/repo --json", 120).check()
        _finish(g)
        # Last, in the same boot: the rescue run's imgbackup.on-failure=poweroff. A target disk that is not
        # there stops the run with the reason on the console, and the machine powers off by itself.
        g.put_file("/tmp/wrong-target", WRONG_TARGET.encode())
        since = g.mark()
        g.run("setsid imgbackup rescue run --cmdline-file /tmp/wrong-target >/dev/null 2>&1 < /dev/null &", 30).check()
        g.wait_exit(240)
        after = g.console[since:]
    assert "NOSUCHDISK" in after and "poweroff now" in after, after[-3000:]
    log_name = re.search(r"this log: (\S+\.log) in imgbackup-rescue-logs/", after).group(1)
    kept = subprocess.run(["debugfs", "-R", f"cat /imgbackup-rescue-logs/{log_name}", str(files["repo"])],
                          capture_output=True, text=True, check=True).stdout     # the log on the repository's disk
    assert "FAILED: target /dev/disk/by-id/virtio-NOSUCHDISK not found" in kept and "nothing was written" in kept, kept
    listed = json.loads(images.output[images.output.index("{"):])["images"]

    code, summary = runs2["joba"]
    assert code == 0 and summary["steps"][1]["result"]["type"] == "incremental", summary
    assert summary["device"] != runs1["joba"][1]["device"]         # the kernel name changed, the job followed
    assert state_a["identity"]["serial"] == "DISKA" and state_a["identity"]["size"] == 16 * MIB
    code, refused = runs2["jobc"]
    assert code == 17, refused
    source_step = refused["steps"][0]
    assert source_step["status"] == "failed" and "partition table GUID" in source_step["error"]
    assert [i["name"] for i in listed].count("jobc") == 1 and len(listed) == 3
