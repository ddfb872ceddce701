"""The rescue root: a Debian system made by mmdebstrap, customised, and packed into a squashfs.

Everything comes from Debian's archive through apt (mmdebstrap resolves and installs); the
downloaded .deb files are kept in ``<cache>/apt-archives`` and handed back to the next build, so
a rebuild downloads only what changed. The initramfs is our own, tiny: busybox, the few drivers a
boot medium sits behind, and ``data/initramfs/init``. Debian's initramfs-tools (MODULES=most, udev)
made one of 22-35 MB whose coldplug took ~40 s under TCG; udev in the real root does that once.
"""

from __future__ import annotations

import gzip
import os
import re
import shutil
from collections.abc import Callable
from importlib import resources
from pathlib import Path

from imgbackup.device import tools
from imgbackup.errors import ImgBackupError

SUITE = "bookworm"
# Bump when the build steps below change what they produce: part of the cached root's key, with
# every constant and data file the build reads (media.debian_key).
ROOTFS_FORMAT = 3
# What a restore and a rescue shell need, by the tool each package brings.
PACKAGES = (
    "linux-image-amd64", "busybox-static", "zstd", "kmod", "udev", "systemd-sysv",
    "python3", "libgomp1",            # imgbackup (the compiled core uses OpenMP)
    "fuse3",                          # imgbackup mount, ntfs-3g
    "gdisk", "fdisk", "util-linux", "mount", "e2fsprogs", "xfsprogs", "dosfstools", "ntfs-3g",
    "btrfs-progs", "mtools",
    "lvm2", "thin-provisioning-tools",   # snapshots, dm-era (era_invalidate)
    "procps", "less", "psmisc",
)
# Docs, manuals and translations: ~40 MB nobody reads on rescue media.
DPKG_EXCLUDES = ("/usr/share/man/*", "/usr/share/doc/*", "/usr/share/info/*", "/usr/share/locale/*",
                 "/usr/share/lintian/*")
# Kernel module trees no restore needs (graphics, sound, radios, cameras): ~150 MB unpacked.
DROP_MODULE_DIRS = ("drivers/gpu", "sound", "drivers/media", "drivers/net/wireless", "net/wireless",
                    "net/mac80211", "net/bluetooth", "drivers/bluetooth", "drivers/staging",
                    "drivers/infiniband", "drivers/isdn", "drivers/iio", "drivers/comedi",
                    "drivers/input/joystick", "drivers/input/touchscreen", "drivers/hid/amd-sfh-hid")
# Units that do harm or only cost boot time on rescue media (fstrim would discard a target's blocks).
MASKED_UNITS = ("fstrim.timer", "fstrim.service", "e2scrub_all.timer", "e2scrub_reap.service",
                "lvm2-monitor.service", "systemd-timesyncd.service", "getty-static.service",
                "systemd-random-seed.service", "dev-hugepages.mount", "dev-mqueue.mount",
                "sys-kernel-debug.mount", "sys-kernel-tracing.mount", "systemd-pstore.service",
                "systemd-binfmt.service", "proc-sys-fs-binfmt_misc.automount", "systemd-journal-flush.service",
                # each of these cost 1-8 s of a TCG guest's CPU at boot and does nothing on a RAM root: users
                # are made at build time, fstab is empty, utmp has no readers, only root logs in
                "systemd-sysusers.service", "systemd-remount-fs.service", "systemd-update-utmp.service",
                "systemd-update-utmp-runlevel.service", "systemd-user-sessions.service",
                "dpkg-db-backup.timer", "systemd-tmpfiles-clean.timer")
# Boot-time files that only serve what the masked units did (/run/nologin is removed by user-sessions).
DROP_FILES = ("usr/lib/tmpfiles.d/systemd-nologin.conf",)
# zstd unpacks fast even under TCG; level 6 packs ~10x faster than 15 for ~8 % more bytes.
SQUASHFS_OPTS = ("-comp", "zstd", "-Xcompression-level", "6", "-b", "256K")
INITRAMFS_APPLETS = ("sh", "mount", "umount", "modprobe", "sleep", "cat", "mkdir", "echo", "switch_root",
                     "setsid")
Log = Callable[[str], None]


class BuildFailed(ImgBackupError):
    exit_code = 1


def data_file(name: str) -> bytes:
    return resources.files("imgbackup.engine.rescue").joinpath("data", name).read_bytes()


def _run(cmd: list[str], log: Log):
    """A build step; its length is the data's (mmdebstrap downloads), so no time limit."""
    proc = tools.run(cmd, timeout=None)
    if proc.returncode != 0:
        raise BuildFailed(f"{cmd[0]} failed ({proc.returncode}): {tools.output_tail(proc, 1500)}")
    return proc


def _mmdebstrap(root: Path, apt_cache: Path, mirror: str | None, log: Log) -> None:
    """Debian's essential set plus PACKAGES into ``root``, with apt's cache handed in and back out."""
    stage = root.parent / "setup"
    (stage / "var/cache/apt/archives").mkdir(parents=True)
    apt_cache.mkdir(parents=True, exist_ok=True)
    cmd = ["mmdebstrap", "--variant=essential", "--mode=root", "--skip=essential/unlink",
           "--include=" + ",".join(PACKAGES),
           *(f"--dpkgopt=path-exclude={p}" for p in DPKG_EXCLUDES),
           f"--setup-hook=sync-in {stage} /",
           f"--setup-hook=sync-in {apt_cache} /var/cache/apt/archives",
           f"--customize-hook=sync-out /var/cache/apt/archives {apt_cache}",
           SUITE, str(root)]
    if mirror:
        cmd.append(mirror)
    log(f"mmdebstrap {SUITE}: {len(PACKAGES)} packages and their dependencies")
    _run(cmd, log)


def _kernel_version(root: Path) -> str:
    versions = sorted(p.name for p in (root / "usr/lib/modules").iterdir() if (p / "modules.dep").exists())
    if not versions:
        raise BuildFailed("the rescue root has no kernel modules (linux-image-amd64 not installed?)")
    return versions[-1]


def _take_boot_files(root: Path, kver: str, parts: Path) -> None:
    """The kernel out of the root (the boot loader loads it from the ISO), /boot emptied."""
    shutil.copy2(root / f"boot/vmlinuz-{kver}", parts / "vmlinuz")
    for p in (root / "boot").iterdir():
        if p.is_file() or p.is_symlink():
            p.unlink()


def _module_closure(moddir: Path, wanted: list[str]) -> list[str]:
    """Paths (relative to ``moddir``) of ``wanted`` modules and everything they depend on."""
    deps: dict[str, list[str]] = {}
    by_name: dict[str, str] = {}
    for line in (moddir / "modules.dep").read_text().splitlines():
        path, _, rest = line.partition(":")
        deps[path] = rest.split()
        by_name[Path(path).name.split(".ko")[0].replace("-", "_")] = path
    builtin = {Path(p).name.split(".ko")[0].replace("-", "_")
               for p in (moddir / "modules.builtin").read_text().split()}
    todo = [by_name[n] for n in wanted if n in by_name]
    missing = [n for n in wanted if n not in by_name and n not in builtin]
    if len(missing) * 2 > len(wanted):     # a few may be gone in a newer kernel; most gone is a bug
        raise BuildFailed(f"kernel modules not found: {', '.join(missing)}")
    seen: list[str] = []
    while todo:
        path = todo.pop()
        if path not in seen:
            seen.append(path)
            todo.extend(deps.get(path, []))
    return sorted(seen)


def build_initramfs(root: Path, kver: str, out: Path, log: Log) -> None:
    """busybox + the medium's drivers + our /init, as a gzip'd newc cpio (the initramfs format)."""
    stage = out.parent / "initramfs-root"
    for d in ("bin", "dev", "proc", "sys", "run", "newroot"):
        (stage / d).mkdir(parents=True, exist_ok=True)
    shutil.copy2(root / "usr/bin/busybox", stage / "bin/busybox")
    for applet in INITRAMFS_APPLETS:
        os.symlink("busybox", stage / "bin" / applet)
    moddir = root / "usr/lib/modules" / kver
    wanted, more = ([w.strip() for w in data_file(f"initramfs/{name}").decode().splitlines()
                     if w.strip() and not w.startswith("#")] for name in ("modules", "modules-more"))
    dest = stage / "lib/modules" / kver
    for rel in _module_closure(moddir, wanted + more):
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(moddir / rel, dest / rel)
    for name in ("modules.builtin", "modules.builtin.modinfo", "modules.order"):
        shutil.copy2(moddir / name, dest / name)
    _run(["depmod", "-b", str(stage), kver], log)
    (stage / "lib/modules/wanted").write_text("\n".join(wanted) + "\n")
    (stage / "lib/modules/more").write_text("\n".join(more) + "\n")
    (stage / "init").write_bytes(data_file("initramfs/init"))
    (stage / "init").chmod(0o755)
    with gzip.open(out, "wb", compresslevel=6) as f:
        f.write(newc_archive(stage))
    shutil.rmtree(stage)


def _newc_entry(name: str, mode: int, data: bytes, ino: int, mtime: int) -> bytes:
    fields = (ino, mode, 0, 0, 1, mtime, len(data), 0, 0, 0, 0, len(name) + 1, 0)
    head = b"070701" + b"".join(b"%08X" % v for v in fields) + name.encode() + b"\0"
    return head + bytes(-len(head) % 4) + data + bytes(-len(data) % 4)


def newc_archive(stage: Path) -> bytes:
    """``stage`` as a newc cpio archive (the kernel's initramfs format), owned by root: files,
    directories and symlinks."""
    parts = []
    paths = [stage, *sorted(stage.rglob("*"))]
    for ino, path in enumerate(paths, 1):
        st = path.lstat()
        name = "." if path == stage else str(path.relative_to(stage))
        if path.is_symlink():
            data = os.readlink(path).encode()
        elif path.is_file():
            data = path.read_bytes()
        else:
            data = b""
        parts.append(_newc_entry(name, st.st_mode, data, ino, int(st.st_mtime)))
    parts.append(_newc_entry("TRAILER!!!", 0, b"", 0, 0))
    return b"".join(parts)


def _trim_modules(root: Path, kver: str, log: Log) -> None:
    kernel = root / "usr/lib/modules" / kver / "kernel"
    for d in DROP_MODULE_DIRS:
        shutil.rmtree(kernel / d, ignore_errors=True)
    _run(["depmod", "-b", str(root), kver], log)


def _write(root: Path, rel: str, data: bytes | str, mode: int = 0o644) -> Path:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    path.chmod(mode)
    return path


def _symlink(root: Path, rel: str, target: str) -> None:
    link = root / rel
    link.parent.mkdir(parents=True, exist_ok=True)
    if link.is_symlink() or link.exists():
        link.unlink()
    os.symlink(target, link)


def _lvm_no_autoactivation(root: Path) -> None:
    """LVM on a target disk must not be activated behind the restore's back (it would hold the disk)."""
    conf = root / "etc/lvm/lvm.conf"
    text = conf.read_text()
    new, n = re.subn(r"^(\s*)# auto_activation_volume_list = .*$", r"\1auto_activation_volume_list = []",
                     text, count=1, flags=re.M)
    if n != 1:
        raise BuildFailed("lvm.conf has no auto_activation_volume_list line to set")
    conf.write_text(new)


def _systemd_setup(root: Path) -> None:
    unit = "etc/systemd/system/imgbackup-rescue.service"
    _write(root, unit, data_file("systemd/imgbackup-rescue.service"))
    _symlink(root, "etc/systemd/system/multi-user.target.wants/imgbackup-rescue.service",
             "/" + unit)
    _write(root, "etc/systemd/system/getty@.service.d/imgbackup.conf", data_file("systemd/getty-autologin.conf"))
    _write(root, "etc/systemd/system/serial-getty@.service.d/imgbackup.conf",
           data_file("systemd/serial-getty-autologin.conf"))
    _write(root, "etc/systemd/system/systemd-udev-trigger.service.d/imgbackup.conf",
           data_file("systemd/udev-trigger.conf"))
    for name in MASKED_UNITS:
        _symlink(root, f"etc/systemd/system/{name}", "/dev/null")
    for rel in DROP_FILES:
        (root / rel).unlink(missing_ok=True)


def root_python(root: Path) -> str:
    """The root's python3 minor version, e.g. ``3.11``."""
    have = sorted(p.name[len("python"):] for p in (root / "usr/bin").glob("python3.*")
                  if re.fullmatch(r"python3\.\d+", p.name))
    if not have:
        raise BuildFailed("the rescue root has no python3")
    return have[-1]


def customise(root: Path, parts: Path, log: Log) -> str:
    """Turn the mmdebstrap tree into the rescue root (imgbackup itself comes separately)."""
    kver = _kernel_version(root)
    _take_boot_files(root, kver, parts)
    _trim_modules(root, kver, log)
    build_initramfs(root, kver, parts / "initrd.img", log)
    _write(root, "etc/hostname", "imgbackup-rescue\n")
    _write(root, "etc/hosts", "127.0.0.1 localhost\n127.0.1.1 imgbackup-rescue\n")
    _write(root, "etc/fstab", "# imgbackup rescue: the root is the medium's squashfs under a RAM overlay\n")
    _write(root, "root/.bash_profile", data_file("bash_profile"))
    _write(root, "root/.hushlogin", "")
    _write(root, "root/.inputrc", "$include /etc/inputrc\nset enable-bracketed-paste off\n")
    _write(root, "etc/udev/rules.d/90-imgbackup-lab-console.rules",
           data_file("udev/90-imgbackup-lab-console.rules"))
    _lvm_no_autoactivation(root)
    _systemd_setup(root)
    shutil.rmtree(root / "var/cache/apt/archives", ignore_errors=True)
    return kver


def squash(root: Path, out: Path, log: Log) -> None:
    log(f"mksquashfs {out.name} (zstd)")
    _run(["mksquashfs", str(root), str(out), "-noappend", "-quiet", "-no-progress", *SQUASHFS_OPTS], log)


def build_debian(parts: Path, work: Path, apt_cache: Path, mirror: str | None, log: Log) -> dict:
    """vmlinuz, initrd.img and root.squashfs into ``parts``; returns what the manifest records."""
    root = work / "root"
    _mmdebstrap(root, apt_cache, mirror, log)
    kver = customise(root, parts, log)
    python = root_python(root)
    squash(root, parts / "root.squashfs", log)
    shutil.rmtree(root)
    return {"kernel": kver, "python": python}
