"""Bootable test disks and the QEMU boot check: good disks boot, broken ones do not.

The builder is judged by outside tools (sfdisk, blkid, e2fsck, debugfs, mtools, fsck.vfat);
the boot check by booting under TCG. After every boot no qemu may still hold the disk.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from tests.disks import loop_device
from tests.support import need, need_root, need_tool, run

from bootdisk import DEFAULT_CACHE, ROOT_LABEL, build_boot_disk, partitions
from imgbackup.device.tools import wait_until
from imgbackup.disklabel.relocate import apply_gpt_relocation, apply_mbr_resize
from imgbackup.engine.verify import qemu as boot
from imgbackup.engine.verify.qemu import boot_check

KINDS = ["bios-mbr", "bios-gpt", "uefi"]
FIRMWARE = {"bios-mbr": "bios", "bios-gpt": "bios", "uefi": "uefi"}
BOOT_TIMEOUT = 180  # generous: TCG on a loaded 2-core machine; a good disk ends far earlier
MIB = 1 << 20


def need_builder(kind: str) -> None:
    need_tool("apt-get", "dpkg-deb", "busybox", "cpio", "sfdisk", "mkfs.ext4", "modinfo")
    if kind == "uefi":
        need_tool("mkfs.vfat", "mcopy", "mdir", "fsck.vfat")
        need(Path("/usr/lib/systemd/boot/efi/systemd-bootx64.efi").exists(), "needs systemd-boot-efi")
    else:
        need_root()
        need_tool("extlinux")


def need_qemu(kind: str) -> None:
    need_tool("qemu-system-x86_64")
    if kind == "uefi":
        need(boot.find_ovmf() is not None, "needs ovmf")


def qemu_holding(path: Path) -> list[int]:
    """PIDs of qemu processes whose command line names ``path`` (a leftover guest would)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                argv = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"qemu-system" in argv[0] and any(str(path).encode() in a for a in argv):
                pids.append(int(entry.name))
    return pids


@pytest.fixture(scope="module")
def disks(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Build each kind at most once per module; ``disks(kind)`` returns (path, marker)."""
    made: dict[str, tuple[Path, str]] = {}
    base = tmp_path_factory.mktemp("bootdisks")

    def get(kind: str) -> tuple[Path, str]:
        need_builder(kind)
        if kind not in made:
            marker = f"IB-{kind}-{os.getpid()}-OK"
            made[kind] = (build_boot_disk(base / f"{kind}.img", kind, marker=marker), marker)
        return made[kind]

    return get


def extract(disk: Path, part: dict, out: Path) -> Path:
    with open(disk, "rb") as f_in, open(out, "wb") as f_out:
        f_in.seek(part["start"] * 512)
        f_out.write(f_in.read(part["size"] * 512))
    return out


@pytest.mark.parametrize("kind", KINDS)
def test_built_disk_layout(kind: str, disks, tmp_path: Path) -> None:
    disk, marker = disks(kind)
    need_tool("e2fsck", "debugfs", "blkid")
    parts = partitions(disk)
    assert len(parts) == (1 if kind == "bios-mbr" else 2)
    root = parts[-1]
    assert (root["start"] + root["size"]) * 512 > disk.stat().st_size - 2 * MIB  # fills the disk
    fs = extract(disk, root, tmp_path / "root.img")
    assert f'LABEL="{ROOT_LABEL}"' in run("blkid", "-p", fs).stdout
    assert run("e2fsck", "-fn", fs, check=False).returncode == 0
    assert marker in run("debugfs", "-R", "cat /sbin/init", fs).stdout
    if kind == "uefi":
        esp = extract(disk, parts[0], tmp_path / "esp.img")
        assert run("fsck.vfat", "-n", esp, check=False).returncode == 0
        listing = run("mdir", "-i", esp, "-b", "-/", "::/").stdout
        for name in ("EFI/BOOT/BOOTX64.EFI", "vmlinuz", "initrd.img", "loader/entries/ib.conf"):
            assert f"::/{name}" in listing
    else:
        code = Path("/usr/lib/syslinux/mbr") / ("mbr.bin" if kind == "bios-mbr" else "gptmbr.bin")
        assert disk.read_bytes()[:440] == code.read_bytes()[:440]
        assert "syslinux" in run("debugfs", "-R", "ls -l /boot/syslinux", fs).stdout.lower()


def _cached_parts() -> dict[Path, tuple[int, int]]:
    """Inode and mtime of each cached kernel and initramfs: a rebuild replaces the file."""
    return {p: (p.stat().st_ino, p.stat().st_mtime_ns)
            for pattern in ("linux-image-*/vmlinuz", "linux-image-*/initrd-*.img") for p in DEFAULT_CACHE.glob(pattern)}


def test_second_build_is_cached(disks, tmp_path: Path) -> None:
    disks("uefi")  # the first build fills the cache
    before = _cached_parts()
    assert any(p.name == "vmlinuz" for p in before) and any(p.name.startswith("initrd-") for p in before)
    build_boot_disk(tmp_path / "again.img", "uefi", marker="AGAIN-OK")
    assert _cached_parts() == before   # nothing fetched or rebuilt: the same files, untouched


def test_bad_arguments_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="kind"):
        build_boot_disk(tmp_path / "x.img", "bios-lvm")
    with pytest.raises(ValueError, match="marker"):
        build_boot_disk(tmp_path / "x.img", "uefi", marker="it's; rm -rf /")


def check_boot(drive: Path, expect: str, kind: str, timeout: float = BOOT_TIMEOUT, **kw) -> boot.BootResult:
    """boot_check plus the rule that no qemu outlives it."""
    result = boot_check(str(drive), expect, timeout=timeout, firmware=FIRMWARE[kind], **kw)
    assert qemu_holding(drive) == [], f"qemu left running: {result.command}"
    return result


@contextlib.contextmanager
def read_only_view(disk: Path, mnt: Path) -> Iterator[Path]:
    """``disk`` seen through a read-only bind mount (like a read-only FUSE image); unmounted after."""
    mnt.mkdir()
    run("mount", "--bind", disk.parent, mnt)
    try:
        run("mount", "-o", "remount,ro,bind", mnt)
        yield mnt / disk.name
    finally:
        run("umount", mnt, check=False)


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_disk_boots_to_marker(kind: str, disks, tmp_path: Path) -> None:
    """Each kind boots; bios-gpt does so from a read-only file (snapshot overlay takes the writes)."""
    disk, marker = disks(kind)
    need_qemu(kind)
    before = disk.read_bytes()
    with contextlib.ExitStack() as stack:
        drive = disk
        if kind == "bios-gpt":
            drive = stack.enter_context(read_only_view(disk, tmp_path / "ro"))
            with pytest.raises(OSError):
                open(drive, "r+b").close()
        result = check_boot(drive, marker, kind)
    assert result.booted, result.console_tail
    assert result.reason == "found"
    root_number = len(partitions(disk))
    assert f"ibinit: root is /dev/vda{root_number}" in result.console_tail
    assert disk.read_bytes() == before  # -snapshot: the guest changed nothing


def test_boot_check_timeout_kills_qemu(disks) -> None:
    disk, _ = disks("uefi")
    need_qemu("uefi")
    result = check_boot(disk, "NEVER-PRINTED", "uefi", timeout=2)
    assert not result.booted and result.reason == "timeout"
    assert result.seconds >= 2          # it waited its timeout (check_boot: and left no qemu behind)
    assert result.command[0] == "qemu-system-x86_64" and "-snapshot" in result.command


def test_qemu_dies_with_a_killed_caller(disks) -> None:
    """SIGKILL of the process running boot_check must not leave its qemu behind."""
    disk, _ = disks("uefi")
    need_qemu("uefi")
    code = ("import sys; from imgbackup.engine.verify.qemu import boot_check; "
            "boot_check(sys.argv[1], 'NEVER-PRINTED', timeout=120, firmware='uefi')")
    caller = subprocess.Popen([sys.executable, "-c", code, str(disk)])
    try:
        assert wait_until(lambda: bool(qemu_holding(disk)), 30, 0.2), "qemu never started"
    finally:
        caller.kill()
        caller.wait()
    wait_until(lambda: not qemu_holding(disk), 10, 0.2)
    leftovers = qemu_holding(disk)
    for pid in leftovers:  # clean up our own orphan before failing
        os.kill(pid, signal.SIGKILL)
    assert leftovers == []


def test_boot_check_without_qemu(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(boot, "QEMU", "qemu-system-imgbackup-missing")
    result = boot_check(str(tmp_path / "none.img"), "X", timeout=5)
    assert not result.booted and result.reason == "qemu-missing"
    assert "not found" in result.console_tail


@pytest.mark.slow
def test_zeroed_boot_code_does_not_boot(disks, tmp_path: Path) -> None:
    disk, marker = disks("bios-mbr")
    need_qemu("bios-mbr")
    broken = tmp_path / "broken.img"
    shutil.copyfile(disk, broken)
    with open(broken, "r+b") as f:
        f.write(bytes(440))
    result = check_boot(broken, marker, "bios-mbr", timeout=10)
    assert not result.booted, result.console_tail
    assert "SeaBIOS" in result.console_tail  # the firmware ran ...
    assert "SYSLINUX" not in result.console_tail  # ... but no boot loader, however long we wait


@pytest.mark.slow
def test_wiped_esp_does_not_boot(disks, tmp_path: Path) -> None:
    disk, marker = disks("uefi")
    need_qemu("uefi")
    broken = tmp_path / "broken.img"
    shutil.copyfile(disk, broken)
    esp = partitions(broken)[0]
    with open(broken, "r+b") as f:
        f.seek(esp["start"] * 512)
        f.write(bytes(esp["size"] * 512))
    result = check_boot(broken, marker, "uefi", timeout=60)
    assert not result.booted, result.console_tail
    assert result.reason in ("gave-up", "timeout")


def grow_copy(disk: Path, out: Path) -> tuple[int, int]:
    """``disk`` written onto a blank disk twice its size; returns (old, new) sector counts."""
    with open(disk, "rb") as f_in, open(out, "wb") as f_out:
        f_out.truncate(2 * disk.stat().st_size)
        f_out.write(f_in.read())
    return disk.stat().st_size // 512, out.stat().st_size // 512


def resize_root(disk: Path) -> None:
    """resize2fs the last partition's ext4 to fill it; e2fsck -fn must find it clean."""
    root = partitions(disk)[-1]
    with loop_device(disk, offset=root["start"] * 512, sizelimit=root["size"] * 512) as dev:
        run("e2fsck", "-fp", dev)
        run("resize2fs", dev)
        fsck = run("e2fsck", "-fn", dev, check=False)
        assert fsck.returncode == 0, fsck.stdout
        info = run("dumpe2fs", "-h", dev).stdout
    fields = dict(line.split(":", 1) for line in info.splitlines() if ":" in line)
    assert int(fields["Block count"]) * int(fields["Block size"]) == root["size"] * 512


@pytest.mark.slow
@pytest.mark.root
def test_grown_gpt_disk_boots(disks, tmp_path: Path) -> None:
    """A bios-gpt disk written onto a disk twice its size, table relocated, root grown."""
    disk, marker = disks("bios-gpt")
    need_qemu("bios-gpt")
    need_tool("sgdisk", "resize2fs", "e2fsck", "dumpe2fs")
    grown = tmp_path / "grown.img"
    old, new = grow_copy(disk, grown)
    with open(grown, "r+b") as f:
        rw = apply_gpt_relocation(f.fileno(), old, new, 512, grow_last_partition=True)
    assert "No problems found" in run("sgdisk", "-v", grown).stdout
    root = partitions(grown)[-1]
    assert root["start"] + root["size"] - 1 == rw.last_partition_new_end_lba
    resize_root(grown)
    result = check_boot(grown, marker, "bios-gpt")
    assert result.booted, result.console_tail


@pytest.mark.slow
@pytest.mark.root
def test_grown_mbr_disk_boots(disks, tmp_path: Path) -> None:
    """The same for a bios-mbr disk: resize_mbr grows the (bootable) last primary partition."""
    disk, marker = disks("bios-mbr")
    need_qemu("bios-mbr")
    need_tool("resize2fs", "e2fsck", "dumpe2fs")
    grown = tmp_path / "grown.img"
    old, new = grow_copy(disk, grown)
    with open(grown, "r+b") as f:
        rw = apply_mbr_resize(f.fileno(), old, new, 512)
    root = partitions(grown)[-1]
    assert root["start"] + root["size"] - 1 == rw.last_partition_new_end_lba == new - 1
    assert "No errors detected" in run("sfdisk", "--verify", grown).stdout
    resize_root(grown)
    result = check_boot(grown, marker, "bios-mbr")
    assert result.booted, result.console_tail
