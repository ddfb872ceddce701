"""Rescue media proven end to end under QEMU (TCG): a dead machine's disk restored unattended.

Disk A is a bootable source disk (tests/bootdisk.py), backed up into a repository on an ext4 disk
image B (label IBBACKUP, passphrase file beside the repository). The rescue media boot with B and a
blank, larger disk C that has a serial; the kernel parameters alone restore A's image onto C, grow
it, and power off. Then C boots alone to A's marker. A wrong target identity must stop the rescue
before C is written at all. Run alone with ``-m guest``.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest

from bootdisk import build_boot_disk, partitions
from disks import blank, loop_device, mounted
from guestlab import Disk, Guest
from imgbackup.engine.verify.qemu import boot_check, find_ovmf
from rescue_fixtures import BACKUP_LABEL, TARGET_SERIAL, UNATTENDED
from support import cli_json, need, need_root, need_tool, run
from test_bootdisk import qemu_holding

pytestmark = [pytest.mark.guest, pytest.mark.slow]
MIB = 1 << 20
PASSPHRASE = "rescue-test-passphrase"
# Time limits, not speed targets: they only decide how long a broken guest is waited for. Under TCG
# on a host loaded ~10 (other test runs) a UEFI rescue run took >240 s (firmware ~20 s, GRUB loading
# the kernel ~50 s, systemd to the rescue ~90 s, the restore ~60 s); unloaded it is about half.
RESCUE_TIMEOUT = 600      # boot + restore + poweroff
BOOT_TIMEOUT = 180        # the restored disk to its marker (22-57 s measured)
MENU_TIMEOUT = 180        # firmware to GRUB's menu
LOGIN_TIMEOUT = 480       # firmware, GRUB's 5 s, the boot and python's start


def _backup_disk(path: Path, source: Path, work: Path) -> Path:
    """B: an ext4 image labelled IBBACKUP holding /repo (source backed up as 'srcdisk') and /pass."""
    with open(path, "wb") as f:
        f.truncate(160 * MIB)
    run("mkfs.ext4", "-q", "-F", "-L", BACKUP_LABEL, path)
    with loop_device(path) as dev, mounted(dev, work / "mnt-b", "rw") as mnt:
        (mnt / "pass").write_text(PASSPHRASE + "\n")
        env = {"IMGBACKUP_PASSPHRASE_FILE": str(mnt / "pass")}
        cli_json("init", repo=mnt / "repo", passphrase=None, **env)
        cli_json("backup", source, "--name", "srcdisk", repo=mnt / "repo", passphrase=None, **env)
    return path


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Per firmware: the source disk A, its marker, and a pristine B holding its backup."""
    need_root()
    need_tool("extlinux", "mkfs.ext4", "qemu-system-x86_64", "mcopy")
    base = tmp_path_factory.mktemp("rescue-src")
    made = {}
    for kind, firmware in (("bios-gpt", "bios"), ("uefi", "uefi")):
        marker = f"RESCUED-{kind}-OK"
        a = build_boot_disk(base / f"a-{kind}.img", kind, size_mib=96, marker=marker)
        b = _backup_disk(base / f"b-{kind}.img", a, base)
        made[firmware] = {"a": a, "b": b, "marker": marker, "kind": kind}
    return made


def _is_zero(path: Path) -> bool:
    with open(path, "rb") as f:
        while block := f.read(8 * MIB):
            if block.count(0) != len(block):
                return False
    return True


def _rescue_log(b: Path, work: Path) -> str:
    """The log the rescue run left on the repository's device."""
    with loop_device(b, read_only=True) as dev, mounted(dev, work / "mnt-log", "ro,noload") as mnt:
        logs = sorted((mnt / "imgbackup-rescue-logs").glob("*.log"))
        assert logs, "no log on the repository device"
        return logs[-1].read_text()


def _case(sources: dict, firmware: str, tmp_path: Path) -> tuple[dict, Path, Path]:
    if firmware == "uefi":
        need(find_ovmf() is not None, "needs ovmf")
    src = sources[firmware]
    b = tmp_path / "b.img"
    shutil.copyfile(src["b"], b)
    c = blank(tmp_path / "c.img", 160 * MIB)
    return src, b, c


@pytest.mark.parametrize("firmware", ["bios", "uefi"])
def test_unattended_restore_then_the_disk_boots(rescue_media, sources: dict, firmware: str,
                                                 tmp_path: Path) -> None:
    src, b, c = _case(sources, firmware, tmp_path)
    disks = [Disk(b, serial="IBBACKUPDISK"), Disk(c, serial=TARGET_SERIAL)]
    start = time.monotonic()
    with Guest(rescue_media.unattended, tmp_path / "guest", disks, firmware=firmware) as guest:
        guest.wait_exit(RESCUE_TIMEOUT)
        console = guest.console
    rescue_s = time.monotonic() - start
    assert qemu_holding(c) == []
    assert "SUCCESS: restored image" in console, console[-4000:]
    log = _rescue_log(b, tmp_path)
    assert "SUCCESS: restored image" in log and f"virtio-{TARGET_SERIAL}" in log
    assert f"serial '{TARGET_SERIAL}'" in log                        # the target was shown by its identity
    assert "resize2fs" in log                                       # --grow: the last partition grew
    assert PASSPHRASE not in console and PASSPHRASE not in log
    root = partitions(c)[-1]
    assert (root["start"] + root["size"]) * 512 > 150 * MIB
    assert "No problems found" in run("sgdisk", "-v", c).stdout
    booted = boot_check(str(c), src["marker"], timeout=BOOT_TIMEOUT, firmware=firmware)
    assert booted.booted, booted.console_tail
    print(f"rescue {firmware}: restore run {rescue_s:.0f} s, restored disk booted in {booted.seconds:.0f} s")


GRUB_DOWN, GRUB_END, GRUB_BOOT = "\x0e", "\x05", "\x18"   # Ctrl-N next line, Ctrl-E its end, Ctrl-X boot


def _keys_to_the_linux_line() -> str:
    """From the editor's first line to the end of the default entry's ``linux`` line. GRUB's editor
    shows ``setparams 'TITLE'`` and then the entry's body as written, from just after its ``{``
    (so a blank line first): counted from the media's own grub.cfg, not guessed."""
    from imgbackup.engine.rescue import rootfs

    body = rootfs.data_file("grub.cfg.in").decode().split("menuentry ", 1)[1].split("{", 1)[1].split("}", 1)[0]
    index = 1 + next(i for i, line in enumerate(body.split("\n")) if line.strip().startswith("linux "))
    return GRUB_DOWN * index + GRUB_END


def test_wrong_target_typed_at_the_boot_menu_writes_nothing_then_the_guided_restore(
        rescue_media, sources: dict, tmp_path: Path) -> None:
    """One boot of the plain media proves two things (a TCG boot costs minutes; both need a fresh C).

    1. Parameters typed at the boot menu; the target's serial does not exist: the rescue must stop
       before writing (C stays all zero), say why on the console and in the log, and leave a shell
       (``imgbackup.on-failure=shell``) whose login shows the outcome.
    2. On that shell the guided menu (``imgbackup rescue menu``, what the menu entry runs at login) is
       driven expect-style over the serial console: repository, passphrase, image, disk by serial,
       typed name; then C boots to the source's marker."""
    src, b, c = _case(sources, "bios", tmp_path)
    wrong = (UNATTENDED.replace(TARGET_SERIAL, "NOSUCHDISK").replace("on-failure=poweroff", "on-failure=shell")
             .replace("wait=20", "wait=5"))          # the missing target is waited for; 5 s is enough here
    disks = [Disk(b, serial="IBBACKUPDISK"), Disk(c, serial=TARGET_SERIAL)]
    # a headless server (serial console, no display adapter): GRUB's editor redraws its screen for every
    # typed key, and drawing it on an emulated VGA too took 70 s of TCG for this line (14 s without)
    with Guest(rescue_media.plain, tmp_path / "guest", disks, screen=False) as guest:
        guest.expect(r"executed automatically in", MENU_TIMEOUT)
        guest.send("e")
        guest.expect(r"Minimum Emacs-like screen editing", 30)
        guest.send(_keys_to_the_linux_line() + " " + wrong + GRUB_BOOT, pace=0.005)
        failed = guest.expect(r"FAILED: target /dev/disk/by-id/virtio-NOSUCHDISK not found after 5 s", RESCUE_TIMEOUT)
        guest.expect(r"a root shell is open on every console", 60, failed.end())
        assert _is_zero(c), "the rescue wrote to a disk it was not told to"    # C as the guest left it
        banner = guest.expect(r"unattended restore FAILED: target /dev/disk/by-id/virtio-NOSUCHDISK not found",
                              LOGIN_TIMEOUT, failed.end())
        guest.expect(r"root@imgbackup-rescue:[^\r\n]*# ", 60, banner.end())
        mark = guest.mark()
        guest.send("imgbackup rescue menu\n")
        _drive_the_guided_restore(guest, mark)
        guest.send("4\n")                                         # power off
        guest.wait_exit(60)
        console = guest.console
    wrong_run = console.split("imgbackup rescue menu", 1)[0]
    assert f"serial '{TARGET_SERIAL}'" in wrong_run                 # the disks present are listed
    assert "restoring image" not in wrong_run and "running: imgbackup restore" not in wrong_run
    log = _rescue_log(b, tmp_path)
    assert "FAILED: target" in log and "nothing was written" in log
    booted = boot_check(str(c), src["marker"], timeout=BOOT_TIMEOUT)
    assert booted.booted, booted.console_tail


def _drive_the_guided_restore(guest: Guest, since: int) -> None:
    """The guided menu from its first question to 'restore finished' and the menu again."""
    guest.expect(r"choose \[1\]: ", LOGIN_TIMEOUT, since)
    guest.send("1\n")
    guest.expect(r"repository \(LABEL=.*\[LABEL=BACKUP:/repo\]: ", 60, since)
    guest.send(f"LABEL={BACKUP_LABEL}:/repo\n")
    guest.expect(r"repository passphrase: ", 60, since)
    guest.send(PASSPHRASE + "\n")
    guest.expect(r"images \(newest first\):\r?\n\s+1\) srcdisk .*\r?\n.*number: ", 60, since)
    guest.send("1\n")
    disk_menu = guest.expect(r"disks:\r?\n((?:\s+\d\) .*\r?\n)+).*number: ", 60, since)
    rows = disk_menu.group(1).decode()
    assert "IBBACKUPDISK" not in rows                        # the repository's disk is not offered
    number = next(line.split(")")[0].strip() for line in rows.splitlines() if TARGET_SERIAL in line)
    mark = guest.mark()
    guest.send(number + "\n")
    guest.expect(r"grow the last partition\? \(yes/no\) \[yes\]: ", 60, mark)
    guest.send("\n")
    confirm = guest.expect(r"type '(\w+)' to OVERWRITE (/dev/\w+)", 120, mark)
    guest.send(confirm.group(1).decode() + "\n")
    guest.expect(r"restore finished", 180, mark)
    guest.expect(r"choose \[1\]: ", 30, mark)
